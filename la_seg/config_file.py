"""Config files: `--config NAME` finds the configs shipped with la-seg, and every config is checked as YAML
first (a key twice, a "billion laughs" of aliases, not a mapping), naming the file and the place, which
jsonargparse does not do (and it expands every alias)."""

from __future__ import annotations

from pathlib import Path

import yaml

from la_seg.errors import DataError

CONFIG_DIR = Path(__file__).parent / "configs"


def resolve_config_paths(argv: list[str]) -> list[str]:
    """`--config giant.yaml` that is not a file is looked up among the configs shipped with la-seg."""
    resolved = list(argv)
    for i, arg in enumerate(resolved):
        if arg == "--config" and i + 1 < len(resolved):
            resolved[i + 1] = _shipped_config(resolved[i + 1])
        elif arg.startswith("--config="):
            resolved[i] = "--config=" + _shipped_config(arg.split("=", 1)[1])
    return resolved


def _shipped_config(name: str) -> str:
    for candidate in (Path(name), CONFIG_DIR / name, CONFIG_DIR / f"{name}.yaml"):
        if candidate.is_file():
            check_yaml(candidate)
            return str(candidate)
    return name


MAX_CONFIG_NODES = 100_000  # values a config may expand to through its aliases (la-seg's own: a few hundred)


class _ConfigLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key twice in one mapping (safe_load keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` merges, not a key
                continue
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                line = key_node.start_mark.line + 1
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one mapping (lines {seen[key]} and {line})",
                    key_node.start_mark,
                )  # fmt: skip
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def _expanded_size(node: yaml.Node | None, sizes: dict[int, float]) -> float:
    """How many values `node` becomes once its aliases are expanded (inf for an alias cycle), counted on the
    composed graph, where each alias is one shared node: linear time, whatever the expansion."""
    if node is None:
        return 0
    if id(node) in sizes:
        return sizes[id(node)]
    sizes[id(node)] = float("inf")  # while counting: meeting it again is a cycle
    children: list = []
    if isinstance(node, yaml.SequenceNode):
        children = node.value
    elif isinstance(node, yaml.MappingNode):
        children = [part for pair in node.value for part in pair]
    sizes[id(node)] = 1 + sum(_expanded_size(child, sizes) for child in children)
    return sizes[id(node)]


def check_yaml(path: Path) -> None:
    """A config that is not valid YAML, holds a key twice or expands without bound through its aliases (a
    "billion laughs"): name the file and the place (jsonargparse names neither, and expands every alias)."""
    try:
        loader = _ConfigLoader(path.read_text())
        try:
            node = loader.get_single_node()
            if (size := _expanded_size(node, {})) > MAX_CONFIG_NODES:
                expands = "an endless cycle" if size == float("inf") else f"{size:.3g} values"
                raise DataError(
                    f"config {path} expands through its YAML aliases (&name / *name) to {expands}, more than "
                    f"{MAX_CONFIG_NODES}: write the values out"
                )
            document = loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or type(error).__name__
        raise DataError(f"config {path} is not valid YAML{where}: {problem}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"cannot read config {path}: {error}") from None
    if not isinstance(document, dict):
        found = "nothing (an empty file)" if document is None else f"a {type(document).__name__}"
        raise DataError(
            f"config {path} holds {found}; a config is a mapping of sections (model:, data:, trainer:)"
        )
