"""A Utah 2018 folder whose NRRD headers hold no spacing (as the challenge's files): fit -> test; and a plain
NRRD without spacing: refused naming --data.spacing, then predicted with it."""

from __future__ import annotations

import json

import nibabel as nib
import nrrd
import numpy as np
import pytest

from la_seg.data.synthetic import write_dataset
from tests.journeys.conftest import TINY

pytestmark = pytest.mark.slow


def write_utah(root, source) -> None:
    """`Training Set/<ID>/{lgemri,laendo}.nrrd` with the challenge's header fields only (no spacing), label
    255, beside a stray file as in the release."""
    for case in sorted(source.iterdir()):
        folder = root / "Training Set" / f"ID{case.name.upper().replace('_', '')}"
        folder.mkdir(parents=True)
        image = np.asarray(nib.load(case / "enhanced.nii.gz").dataobj)
        label = np.asarray(nib.load(case / "atriumSegImgMO.nii.gz").dataobj)
        nrrd.write(str(folder / "lgemri.nrrd"), np.clip(image, 0, 255).astype(np.uint8), {"encoding": "gzip"})
        nrrd.write(
            str(folder / "laendo.nrrd"), np.where(label > 0, 255, 0).astype(np.uint8), {"encoding": "gzip"}
        )
    (root / "Training Set" / "README.txt").write_text("stray file\n")


def test_utah_headers_without_spacing_train_and_test(la_seg, tmp_path):
    source, utah = tmp_path / "source", tmp_path / "utah"
    write_dataset(source, cases=6, seed=3, shape=(40, 40, 12), spacing=(0.625, 0.625, 0.625))
    write_utah(utah, source)
    la_seg("fit", *TINY, "--data.root", utah, "--trainer.max_epochs", "1")
    la_seg("test", *TINY, "--data.root", utah, "--ckpt_path", "best")
    report = json.loads((tmp_path / "runs" / "demo" / "version_0" / "test_heldout.json").read_text())
    assert report["header"]["data"]["spacing_sources"] == [
        "utah2018: header says 1 mm or nothing, true 0.625 mm"
    ]

    plain = tmp_path / "new" / "scan.nrrd"
    plain.parent.mkdir()
    nrrd.write(str(plain), np.zeros((40, 40, 12), np.uint8), {"encoding": "gzip"})
    predict = ["predict", *TINY, "--ckpt_path", "runs/demo/version_0/checkpoints/best.ckpt",
               "--data.predict_root", plain, "--writer.output_dir", "masks"]  # fmt: skip
    _, err = la_seg(*predict, expect=2)
    assert "scan.nrrd" in err and "--data.spacing '[x, y, z]'" in err.splitlines()[-1]
    la_seg(*predict, "--data.spacing", "[0.7, 0.7, 2.0]")
    assert (tmp_path / "masks" / "scan.nii.gz").is_file()
