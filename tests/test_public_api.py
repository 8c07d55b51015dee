"""la-seg uses other libraries through their public API only: a private name (one leading underscore) of
torch, Lightning, timm, jsonargparse, argparse or pynrrd changes without notice in any release.

The scan reads la_seg/ and benchmarks/ with `ast` and reports, as file:line,
* an import of a private module or name from those libraries (`from timm.models._manipulate import ...`);
* an attribute or getattr/setattr/hasattr of a private name that la-seg does not define itself
  (`parser._option_string_actions`, `self._get` in a LightningCLI subclass): it can only be another library's;
* a method that overrides a private method of a base class from those libraries.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("la_seg", "benchmarks")
LIBRARIES = ("torch", "lightning", "pytorch_lightning", "timm", "jsonargparse", "argparse", "nrrd")
# The uses that must remain, each with why; the versions they were tested with are bounded in pyproject.toml.
ALLOWED = {
    "benchmarks/ensemble.py: imports torch._subclasses.fake_tensor": (
        "FakeTensorMode, for FLOPs without memory, has no public import path (torch's docs use this one); "
        "torch < 3"
    ),
}
# Underscore names that are documented public API: namedtuple's methods, os._exit (exit without cleanup).
DOCUMENTED = {"_replace", "_asdict", "_fields", "_make", "_exit"}


def private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__") and name != "_" and name not in DOCUMENTED


def watched(module: str) -> bool:
    return module.split(".")[0] in LIBRARIES


def sources() -> dict[Path, ast.Module]:
    files = sorted(path for folder in SCANNED for path in (ROOT / folder).rglob("*.py"))
    return {path: ast.parse(path.read_text(encoding="utf-8"), filename=str(path)) for path in files}


def own_names(trees: dict[Path, ast.Module]) -> set[str]:
    """Every name la-seg defines: functions, classes, arguments, assigned names and attributes."""
    names: set[str] = set()
    for tree in trees.values():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.arg):
                names.add(node.arg)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
            elif isinstance(node, ast.alias) and node.asname:
                names.add(node.asname)
    return names


def library_aliases(tree: ast.Module) -> dict[str, str]:
    """Names bound by imports from the watched libraries -> the dotted path they stand for."""
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if watched(alias.name):
                    bound = alias.asname or alias.name.split(".")[0]
                    aliases[bound] = alias.name if alias.asname else bound
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and watched(node.module):
            for alias in node.names:
                aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return aliases


def resolve(path: str):
    """The object a dotted path names (module, then attributes), or None."""
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            target = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for part in parts[cut:]:
            target = getattr(target, part, None)
        return target
    return None


def dotted(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = dotted(node.value)
        return f"{base}.{node.attr}" if base else None
    return None


def private_uses(path: Path, tree: ast.Module, own: set[str]) -> list[str]:
    where = path.relative_to(ROOT)
    found = []
    aliases = library_aliases(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and watched(node.module):
            if any(private(part) for part in node.module.split(".")):
                found.append(f"{where}:{node.lineno}: imports {node.module}")
            found += [
                f"{where}:{node.lineno}: imports {node.module}.{alias.name}"
                for alias in node.names
                if private(alias.name)
            ]
        elif isinstance(node, ast.Import):
            found += [
                f"{where}:{node.lineno}: imports {alias.name}"
                for alias in node.names
                if watched(alias.name) and any(private(part) for part in alias.name.split("."))
            ]
        elif isinstance(node, ast.Attribute) and private(node.attr) and node.attr not in own:
            found.append(f"{where}:{node.lineno}: uses {ast.unparse(node)}")
        elif isinstance(node, ast.Attribute) and private(node.attr):
            root = dotted(node.value)
            head = root.split(".")[0] if root else None
            if head in aliases:  # `torch._dynamo`: a library's private attribute, whatever la-seg defines
                found.append(f"{where}:{node.lineno}: uses {ast.unparse(node)}")
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("getattr", "setattr", "hasattr", "delattr")
            and len(node.args) >= 2
            and isinstance(node.args[1], ast.Constant)
            and isinstance(node.args[1].value, str)
            and private(node.args[1].value)
            and node.args[1].value not in own
        ):
            found.append(f"{where}:{node.lineno}: {node.func.id}(..., {node.args[1].value!r})")
        elif isinstance(node, ast.ClassDef):
            bases = [resolve(aliases[d]) if (d := dotted(b)) in aliases else None for b in node.bases]
            bases = [b for b in bases if isinstance(b, type)]
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and private(item.name):
                    overridden = [b.__qualname__ for b in bases if hasattr(b, item.name)]
                    found += [f"{where}:{item.lineno}: overrides {b}.{item.name}" for b in overridden]
    return found


def test_no_private_name_of_another_library_is_used():
    trees = sources()
    own = own_names(trees)
    found = [line for path, tree in trees.items() for line in private_uses(path, tree, own)]
    found = [line for line in found if _without_line(line) not in ALLOWED]
    assert not found, "private API of another library:\n" + "\n".join(found)


def _without_line(found: str) -> str:
    where, _, what = found.split(":", 2)
    return f"{where}:{what}"


def test_the_scan_finds_each_kind_of_private_use(tmp_path):
    """The scan itself: each kind of use it must report, and la-seg's own private names, which it must not."""
    code = """
import torch
from timm.models._manipulate import checkpoint_seq
from nrrd.reader import _determine_datatype
from lightning.pytorch.callbacks import ModelCheckpoint

class Keep(ModelCheckpoint):
    def _save_last_checkpoint(self, trainer, candidates):
        return self._own_helper()

    def _own_helper(self):
        return getattr(self.parser, "_option_string_actions", None), torch._dynamo
"""
    path = ROOT / "la_seg" / "scan_example.py"  # reported relative to the repository, as real files are
    tree = ast.parse(code)
    found = private_uses(path, tree, own_names({path: tree}))
    assert sorted((line.split(":", 1)[1] for line in found), key=lambda rest: int(rest.split(":")[0])) == [
        "3: imports timm.models._manipulate",
        "4: imports nrrd.reader._determine_datatype",
        "8: overrides ModelCheckpoint._save_last_checkpoint",
        "12: getattr(..., '_option_string_actions')",
        "12: uses torch._dynamo",
    ]
    assert all(line.startswith("la_seg/scan_example.py:") for line in found)
