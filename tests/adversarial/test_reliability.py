"""Reliability, round 2 (issue 18): signals, full disks, loops in the data tree, and the last silent results.

Each test drives `la-seg` in this process where the subject is not the process itself; those that need a
process of their own (a real SIGTERM, file modes that root ignores) run one and carry the `slow` marker.
"""

from __future__ import annotations

import errno
import io
import os
import shutil
from pathlib import Path

import nrrd
import numpy as np
from conftest import TINY, assert_refused, snapshot
from hostile import phantom, valid_image


def predict(checkpoint: Path, source: Path, output_dir: Path, *extra: str) -> list[str]:
    return ["predict", *TINY, "--ckpt_path", str(checkpoint), "--data.predict_root", str(source),
            "--writer.output_dir", str(output_dir), *extra]  # fmt: skip


def utah_nrrd(path: Path, seed: int = 0, **header) -> Path:
    """An NRRD as 3D Slicer writes it: LPS space, space directions and origin, gzip encoding."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = {
        "space": "left-posterior-superior",
        "space directions": np.diag([1.6, 1.6, 4.0]),
        "space origin": np.array([-38.4, -35.2, -20.0]),
        "kinds": ["domain", "domain", "domain"],
        "encoding": "gzip",
    } | header
    nrrd.write(str(path), phantom(seed)[0], fields)
    return path


# ---- 8 and 11: never write into the input, one rule -----------------------------------------------------
def test_output_inside_a_single_input_files_folder_is_refused(la_seg, trained_checkpoint, tmp_path):
    """The folder rule holds for a single input file too (README): in/n.nrrd -> in/masks is refused."""
    source = utah_nrrd(tmp_path / "in" / "n.nrrd")
    before = snapshot(tmp_path / "in")
    result = la_seg(*predict(trained_checkpoint, source, tmp_path / "in" / "masks"))
    assert_refused(result, "--writer.output_dir", before, tmp_path / "in")
    assert not (tmp_path / "in" / "masks").exists()


def test_output_into_the_labelled_training_data_is_refused(la_seg, trained_checkpoint, tmp_path, synth_root):
    root = tmp_path / "train_data"
    shutil.copytree(synth_root, root)
    image = valid_image(tmp_path / "new")
    before = snapshot(root)
    result = la_seg(*predict(trained_checkpoint, image, root, "--data.root", str(root)))
    assert_refused(result, str(root), before, root)
    assert not list(root.glob("*.nii.gz")) and not (root / "volumes.csv").exists()


# ---- 1: a full disk while a checkpoint is written ---------------------------------------------------------
class FullDisk:
    """The disk holding `disk` (the run folder) with `budget` bytes left; other folders (/tmp) are on another
    disk. The writes that put checkpoints there (torch.save into a file; a move from another disk, which
    copies) write up to the budget, then raise ENOSPC as a full disk does. In-memory targets are not disks."""

    def __init__(self, monkeypatch, disk: Path, budget: int) -> None:
        import shutil as shutil_module

        import torch

        self.disk, self.left = disk.resolve(), budget
        real_save, real_move = torch.save, shutil_module.move

        def save(obj, f, *args, **kwargs):
            target = f if isinstance(f, (str, os.PathLike)) else getattr(f, "name", None)
            if not isinstance(target, (str, os.PathLike)) or not self.holds(target):
                return real_save(obj, f, *args, **kwargs)
            buffer = io.BytesIO()
            real_save(obj, buffer, *args, **kwargs)
            if isinstance(f, (str, os.PathLike)):
                with open(f, "wb") as handle:
                    return self.write(handle, buffer.getvalue())
            return self.write(f, buffer.getvalue())

        def move(src, dst, *args, **kwargs):
            if self.holds(src) or not self.holds(dst):
                return real_move(src, dst, *args, **kwargs)  # a rename, or not onto the full disk
            with open(dst, "wb") as handle:  # across disks a move copies
                self.write(handle, Path(src).read_bytes())
            os.remove(src)
            return dst

        monkeypatch.setattr(torch, "save", save)
        monkeypatch.setattr(shutil_module, "move", move)

    def holds(self, path) -> bool:
        return Path(path).absolute().resolve().is_relative_to(self.disk)

    def write(self, handle, data: bytes) -> None:
        handle.write(data[: max(self.left, 0)])
        self.left -= len(data)
        if self.left < 0:
            handle.flush()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_full_disk_while_a_checkpoint_is_written(la_seg, tmp_path, synth_root, monkeypatch):
    """No truncated checkpoint under a final name (where --ckpt_path best/last would pick it up), and the
    error names the run's folder that is full, not a temporary file elsewhere."""
    import torch

    FullDisk(monkeypatch, tmp_path, budget=20_000)
    result = la_seg("fit", *TINY, "--data.root", str(synth_root), "--trainer.max_epochs", "1",
                    "--trainer.limit_train_batches", "2")  # fmt: skip
    folder = tmp_path / "runs" / "demo" / "version_0" / "checkpoints"
    assert_refused(result, str(folder), snapshot(synth_root), synth_root)
    assert "no space left" in result.error_lines[0]
    for checkpoint in tmp_path.rglob("*.ckpt"):
        torch.load(checkpoint, map_location="cpu", weights_only=True)  # complete, or not there at all
    assert not [p for p in folder.iterdir() if p.name.startswith(".")] if folder.exists() else True
