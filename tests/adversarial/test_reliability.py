"""Reliability, round 2 (issue 18): signals, full disks, loops in the data tree, and the last silent results.

Each test drives `la-seg` in this process where the subject is not the process itself; those that need a
process of their own (a real SIGTERM, file modes that root ignores) run one and carry the `slow` marker.
"""

from __future__ import annotations

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
