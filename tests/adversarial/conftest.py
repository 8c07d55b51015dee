"""Fixtures of the adversarial suite: one tiny trained run, an in-process `la-seg`, and the checks every
refusal must pass (exit 2, one error line naming the culprit, no traceback, inputs untouched, no partial
output under a final name)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import pytest

from la_seg.cli import main

TINY = [
    "--config", "demo.yaml",
    "--data.img_size", "28",
    "--data.num_workers", "0",
    "--data.batch_size", "8",
    "--model.net.backbone_kwargs", "{depth: 2, embed_dim: 24, num_heads: 2}",
    "--model.net.decoder_channels", "[8, 8, 8, 8]",
    "--trainer.enable_progress_bar", "false",
    "--trainer.enable_model_summary", "false",
]  # fmt: skip


@dataclass
class Result:
    code: int | str | None
    out: str
    err: str

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.startswith("la-seg: error:")]


@pytest.fixture(scope="session")
def trained_checkpoint(tmp_path_factory, synth_root) -> Path:
    """A checkpoint of a tiny model fitted for one short epoch (weights only need to be real, not good)."""
    work = tmp_path_factory.mktemp("adversarial_run")
    previous = os.getcwd()
    os.chdir(work)
    try:
        main(["fit", *TINY, "--data.root", str(synth_root), "--trainer.max_epochs", "1",
              "--trainer.limit_train_batches", "2"])  # fmt: skip
    finally:
        os.chdir(previous)
    return work / "runs" / "demo" / "version_0" / "checkpoints" / "last.ckpt"


@pytest.fixture
def la_seg(capfd, monkeypatch, tmp_path):
    """Run `la-seg ARGS` in this process, in tmp_path (runs/ lands there); returns its exit status and what
    it printed."""
    monkeypatch.delenv("LA_SEG_DEBUG", raising=False)
    monkeypatch.chdir(tmp_path)

    def run(*argv: str) -> Result:
        capfd.readouterr()
        try:
            main([str(a) for a in argv])
            code = 0
        except SystemExit as exit_:
            code = exit_.code
        out, err = capfd.readouterr()
        return Result(code, out, err)

    return run


def la_seg_subprocess(argv: list[str], cwd: Path, prefix: list[str] = (), timeout: int = 300) -> Result:
    """`la-seg` as a user runs it, in a fresh process (optionally under `prefix`, e.g. setpriv or unshare)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    env.pop("LA_SEG_DEBUG", None)
    command = [*prefix, sys.executable, "-m", "la_seg.cli", *map(str, argv)]
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    return Result(done.returncode, done.stdout, done.stderr)


def snapshot(*roots: Path) -> dict[str, str]:
    """sha256 of every file under `roots` (a file root is hashed itself)."""
    digests = {}
    for root in roots:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for path in files:
            digests[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digests


def assert_refused(result: Result, culprit: str, inputs_before: dict[str, str], *input_roots: Path,
                   output_dir: Path | None = None) -> None:  # fmt: skip
    """The refusal contract of README's "Bad input" section."""
    printed = result.out + result.err
    assert "Traceback" not in printed, printed[-3000:]
    assert result.code == 2, printed[-3000:]
    assert len(result.error_lines) == 1, printed[-3000:]
    assert result.err.strip().splitlines()[-1] == result.error_lines[0], "the error must be one, final line"
    assert culprit in result.error_lines[0], result.error_lines[0]
    assert snapshot(*input_roots) == inputs_before, "an input file was changed"
    if output_dir is not None:
        assert_no_partial_outputs(output_dir)


def assert_no_partial_outputs(output_dir: Path) -> None:
    """Every visible file under a final name is complete: masks load in full, volumes.csv lists only them."""
    if not output_dir.exists():
        return
    masks = []
    for path in output_dir.iterdir():
        if path.name.startswith("."):
            continue
        if path.name.endswith((".nii.gz", ".nii")):
            assert nib.load(path).get_fdata().size > 0, path
            masks.append(path.name)
    listed = output_dir / "volumes.csv"
    if listed.exists():
        for line in listed.read_text().splitlines()[1:]:
            if line and not line.startswith("#"):
                case_id = line.split(",")[0]
                assert f"{case_id}.nii.gz" in masks, f"volumes.csv lists {case_id} but its mask is missing"
