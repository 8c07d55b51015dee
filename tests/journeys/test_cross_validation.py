"""fit the folds -> ensemble of the run folder -> export-nnunet --split (fit's own split.json) -> evaluate."""

from __future__ import annotations

import csv
import json

import pytest

from tests.journeys.conftest import TINY

FLIPS = ["--data.augmentation.hflip", "true", "--data.augmentation.vflip", "true"]
pytestmark = pytest.mark.slow


def test_folds_ensemble_export_and_evaluate(la_seg, journey_data, tmp_path):
    data = ["--data.root", journey_data, "--data.folds", "2"]
    for fold in (0, 1):
        la_seg("fit", *TINY, *data, *FLIPS, "--data.fold", fold, "--trainer.max_epochs", "1")
    runs = tmp_path / "runs" / "demo"
    assert sorted(p.name for p in runs.iterdir()) == ["fold_0", "fold_1"]
    splits = [json.loads((runs / f"fold_{i}" / "version_0" / "split.json").read_text()) for i in (0, 1)]

    # resume of one fold finds that fold's own last.ckpt
    _, err = la_seg("fit", *TINY, *data, *FLIPS, "--data.fold", 1, "--trainer.max_epochs", "2",
                    "--ckpt_path", "last")  # fmt: skip
    assert "fold_1/version_0/checkpoints/last.ckpt" in err

    _, err = la_seg("predict", *TINY, "--ckpt_path", runs, "--model.tta", "flips",
                    "--data.predict_root", journey_data, "--writer.output_dir", "masks")  # fmt: skip
    assert "ensemble of" in err and "fold_0" in err and "fold_1" in err

    la_seg("export-nnunet", "--data.root", journey_data, "--out", "raw",
           "--split", runs / "fold_0" / "version_0" / "split.json")  # fmt: skip
    dataset = tmp_path / "raw" / "Dataset501_LA"
    assert json.loads((dataset / "splits_final.json").read_text()) == [
        {"train": s["train"], "val": s["val"]} for s in splits
    ]
    assert sorted(p.name for p in (dataset / "labelsTs").iterdir()) == [
        f"{c}.nii.gz" for c in splits[0]["test"]
    ]

    la_seg("evaluate", "--pred", "masks", "--ref", journey_data)
    with open(tmp_path / "masks_evaluation" / "test_metrics.csv") as handle:
        assert len(list(csv.DictReader(handle))) == 8


def test_a_folder_mixing_two_cross_validations_is_refused(la_seg, journey_data, tmp_path):
    quick = [*TINY, "--data.root", journey_data, "--data.folds", "2", "--trainer.max_epochs", "1",
             "--trainer.limit_train_batches", "1"]  # fmt: skip
    la_seg("fit", *quick, "--data.fold", 0)
    la_seg("fit", *quick, "--data.fold", 1, "--data.seed", 5)  # another cross-validation's fold
    _, err = la_seg("predict", *TINY, "--ckpt_path", "runs/demo", "--data.predict_root", journey_data,
                    "--writer.output_dir", "masks", expect=2)  # fmt: skip
    line = err.splitlines()[-1]
    assert "different cross-validations" in line and "fold_0" in line and "fold_1" in line
    assert not (tmp_path / "masks").exists()
