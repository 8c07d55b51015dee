"""README and docs/ are executable: every shell block of README.md and then of each docs/ page runs here,
command by command, in one working folder (a page's commands may use what README's wrote), on small synthetic
data, and their Python snippets run on what those commands wrote.

Substitutions (real data and hardware -> this test):

| README                                   | here                                                        |
|------------------------------------------|-------------------------------------------------------------|
| /data/LAScarQS2022/task2/train_data, ... | `data`: 12 synthetic LAScarQS-style cases (`la-seg synth`'s) |
| /data/other_centre                       | `other_centre`: 2 synthetic cases of another geometry       |
| new_cases/                               | `new_cases/`: 3 unlabelled synthetic images                 |
| patients.csv                             | two scans per patient                                       |
| --config giant.yaml                      | demo.yaml with a tiny ViT, 1 short epoch, logger name giant |
| /models/dinov2_vitg14_pretrain.pth       | random weights of that tiny ViT, saved as a file            |
| $nnUNet_raw                              | `nnunet_raw`                                                |
| `la-seg analyse` of LAScarQS-size atria  | `--blood_pool.erosion_mm 1`: these phantoms' atria hold 1-3 mL |
| nnunet_pred (nnU-Net's predictions)      | the exported reference labels (a perfect stand-in)          |

Skipped, saying so: `make` (CI runs `make test`; `make demo` is the demo), `tensorboard` (a viewer), and
nnU-Net's own commands (`nnUNetv2_*`, copying into `$nnUNet_preprocessed`: nnU-Net is not installed).
"""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import pytest
import timm
import torch

from la_seg.data.synthetic import write_dataset
from tests.journeys.conftest import TINY

REPOSITORY = Path(__file__).resolve().parents[2]
README = REPOSITORY / "README.md"
# README first, then the reference pages in a fixed order
DOCUMENTS = [README, *sorted((REPOSITORY / "docs").glob("*.md"))]
SKIPPED = {
    "make": "CI runs `make test`; `make demo` is the demo itself",
    "tensorboard": "a viewer, nothing to check",
    "nnUNetv2_plan_and_preprocess": "nnU-Net is not installed here",
    "nnUNetv2_train": "nnU-Net is not installed here (and trains on a GPU)",
    "nnUNetv2_predict": "nnU-Net is not installed here: the exported labels stand in for its predictions",
    "cp": "copies into nnU-Net's preprocessed folder",
}
PATHS = {
    "/data/LAScarQS2022/task2/train_data": "data",
    "/data/other_centre": "other_centre",
    "/models/dinov2_vitg14_pretrain.pth": "models/dinov2_vitg14_pretrain.pth",
    "$nnUNet_raw": "nnunet_raw",
}
TINY_MODEL = [arg for arg in TINY if arg not in ("--config", "demo.yaml")]
SHORT_FIT = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2"]
pytestmark = pytest.mark.slow


def shell_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def commands(block: str) -> list[list[str]]:
    """The block's commands as argument lists: continuations joined, comments dropped, for-loops unrolled."""
    lines = block.replace("\\\n", " ").splitlines()
    found: list[list[str]] = []
    loop: tuple[str, list[str]] | None = None
    body: list[str] = []
    for line in lines:
        words = shlex.split(line, comments=True)
        if not words:
            continue
        if words[0] == "for":  # for VAR in A B C; do
            loop, body = (words[1], [w.rstrip(";") for w in words[3:] if w not in ("do", "do;")]), []
        elif words[0] == "done":
            name, values = loop
            found += [[w.replace(f"${name}", value) for w in command] for value in values for command in body]
            loop = None
        elif loop is not None:
            body.append(words)
        else:
            found.append(words)
    return found


def substitute(argv: list[str]) -> list[str]:
    """README's real data and hardware -> this test's (see the module docstring)."""
    out: list[str] = []
    for word in argv:
        for real, here in PATHS.items():
            word = word.replace(real, here)
        out.append("data" if word == "..." else word)
    if out[0] == "analyse":  # the sandbox's small phantoms: 3 mm of erosion would leave no blood pool
        out += ["--blood_pool.erosion_mm", "1"]
    if "--config" in out and out[out.index("--config") + 1] == "giant.yaml":
        at = out.index("--config")
        tiny = [*TINY_MODEL, "--trainer.logger.init_args.name", "giant"]
        out[at : at + 2] = ["--config", "demo.yaml", *tiny, *(SHORT_FIT if out[0] == "fit" else [])]
    return out


@pytest.fixture
def sandbox(tmp_path) -> Path:
    """The data README's commands name, in the working folder."""
    write_dataset(tmp_path / "data", cases=12, seed=4, shape=(40, 40, 10), spacing=(1.6, 1.6, 4.0))
    write_dataset(tmp_path / "other_centre", cases=2, seed=5, shape=(44, 40, 8), spacing=(1.3, 1.3, 4.0))
    write_dataset(tmp_path / "scans", cases=3, seed=6, shape=(40, 40, 10), spacing=(1.6, 1.6, 4.0))
    (tmp_path / "new_cases").mkdir()
    for i in (1, 2, 3):
        shutil.copy(
            tmp_path / "scans" / f"train_{i}" / "enhanced.nii.gz", tmp_path / "new_cases" / f"case_{i}.nii.gz"
        )
    rows = [f"train_{i},patient_{(i + 1) // 2}" for i in range(1, 13)]
    (tmp_path / "patients.csv").write_text("case_id,patient_id\n" + "\n".join(rows) + "\n")
    (tmp_path / "models").mkdir()
    vit = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=28, depth=2, embed_dim=24,
                            num_heads=2)  # fmt: skip
    torch.save(vit.state_dict(), tmp_path / "models" / "dinov2_vitg14_pretrain.pth")
    return tmp_path


def run_block(la_seg, block: str, sandbox: Path, skipped: list[str]) -> None:
    for argv in commands(block):
        if argv[0] != "la-seg":
            assert argv[0] in SKIPPED, f"README runs {argv[0]!r}: add it to this test's table"
            skipped.append(f"{argv[0]}: {SKIPPED[argv[0]]}")
            continue
        argv = substitute(argv[1:])
        if argv[0] == "evaluate" and argv[argv.index("--pred") + 1] == "nnunet_pred":
            if not (sandbox / "nnunet_pred").exists():  # nnU-Net's predictions: the references stand in
                shutil.copytree(
                    sandbox / "nnunet_raw" / "Dataset501_LA" / "labelsTs", sandbox / "nnunet_pred"
                )
        la_seg(*argv)


def test_every_readme_and_docs_shell_block_runs(la_seg, sandbox):
    text = "\n".join(document.read_text(encoding="utf-8") for document in DOCUMENTS)
    blocks = shell_blocks(text)
    assert len(shell_blocks(README.read_text(encoding="utf-8"))) >= 3, "README lost its command blocks?"
    skipped: list[str] = []
    first, *others = blocks
    run_block(la_seg, first, sandbox, skipped)  # make demo / make test
    for block in others:
        if "nnUNetv2_plan_and_preprocess" in block:  # the comparison starts afresh: a new export and report
            for earlier in ("nnunet_raw", "nnunet_pred", "nnunet_pred_evaluation"):
                shutil.rmtree(sandbox / earlier)
        run_block(la_seg, block, sandbox, skipped)
    assert (sandbox / "runs" / "giant" / "fold_4").is_dir() and (sandbox / "laseg_pred_evaluation").is_dir()
    assert {line.split(":")[0] for line in skipped} == set(SKIPPED)  # each skip is one README really has

    assert (sandbox / "analysis" / "analysis.csv").is_file()

    # the Python snippets, on the fold runs the commands above wrote
    python = re.compile(r"```python\n(.*?)```", re.S)
    snippets = [(doc, code) for doc in DOCUMENTS for code in python.findall(doc.read_text(encoding="utf-8"))]
    assert snippets, "the docs lost their Python example?"
    for document, snippet in snippets:
        scope: dict = {}
        exec(compile(snippet, str(document.relative_to(REPOSITORY)), "exec"), scope)  # noqa: S102 (our own docs)
        if "result" in scope:  # the ensemble example
            assert scope["result"].mask.shape == scope["image"].shape
