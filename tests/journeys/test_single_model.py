"""fit -> test -> test on other data -> predict (single, test-time flips) -> evaluate, each on what the
previous command wrote; and the flips a model was not trained for are refused."""

from __future__ import annotations

import csv
import json

import pytest
import torch
import yaml

from la_seg.checkpoints import stored_calibration
from la_seg.config_file import CONFIG_DIR
from la_seg.data.synthetic import write_dataset
from tests.journeys.conftest import TINY

FLIPS = ["--data.augmentation.hflip", "true", "--data.augmentation.vflip", "true"]
pytestmark = pytest.mark.slow


def test_fit_test_other_data_predict_and_evaluate(la_seg, journey_data, tmp_path):
    data = ["--data.root", journey_data]
    out, _ = la_seg("fit", *TINY, *data, *FLIPS, "--trainer.max_epochs", "2")
    run = tmp_path / "runs" / "demo" / "version_0"
    assert (
        "best val/dice" in out and "runs/demo/version_0/checkpoints/best.ckpt" in out and "la-seg test" in out
    )
    split = json.loads((run / "split.json").read_text())
    shipped = yaml.safe_load((CONFIG_DIR / "demo.yaml").read_text())["model"]["loss"]
    hparams = torch.load(run / "checkpoints" / "best.ckpt", weights_only=True)["hyper_parameters"]
    assert hparams["loss"] == shipped == "batch_dice_bce"  # the demo's loss trained this model

    # the run's held-out cases: a plain CSV table and a JSON saying what was scored
    la_seg("test", *TINY, *data, "--ckpt_path", "best")
    with open(run / "test_heldout.csv") as handle:
        assert [row["case_id"] for row in csv.DictReader(handle)] == split["test"]
    heldout = (run / "test_heldout.json").read_bytes()
    assert "test part" in json.loads(heldout)["header"]["scored"]["what"]

    # another centre's folder: its own report, the first one untouched
    other = tmp_path / "other_centre"
    write_dataset(other, cases=2, seed=7, shape=(40, 40, 10), spacing=(1.3, 1.3, 4.0))
    la_seg("test", *TINY, "--data.test_root", other, "--ckpt_path", run / "checkpoints" / "best.ckpt")
    report = json.loads((run / "test_other_centre.json").read_text())
    assert [case["case_id"] for case in report["cases"]] == ["train_1", "train_2"]
    assert report["header"]["scored"]["folder"] == str(other)
    assert (run / "test_heldout.json").read_bytes() == heldout
    la_seg("test", *TINY, *data, "--ckpt_path", "best", "--model.tta", "flips")  # again: a new name
    assert json.loads((run / "test_heldout-2.json").read_text())["header"]["inference"]["tta"] == "flips"
    assert (run / "test_heldout.json").read_bytes() == heldout

    # predict with and without flips, then score the flipped folder (its uncertainty maps are not masks)
    best = run / "checkpoints" / "best.ckpt"
    uncalibrated = "carries no inference settings chosen on validation"
    for name, extra in (("masks", []), ("flipped", ["--model.tta", "flips"])):
        _, err = la_seg("predict", *TINY, "--ckpt_path", best, "--data.predict_root", journey_data,
                        "--writer.output_dir", tmp_path / name, *extra)  # fmt: skip
        assert (uncalibrated in err) == (stored_calibration(torch.load(best, weights_only=True)) is None)
    # last.ckpt carries no calibration: la-seg says what applies instead (the doubt level among it)
    last = run / "checkpoints" / "last.ckpt"
    _, err = la_seg("predict", *TINY, "--ckpt_path", last, "--data.predict_root", journey_data,
                    "--writer.output_dir", tmp_path / "from_last")  # fmt: skip
    assert [line for line in err.splitlines() if uncalibrated in line] == [
        f"la-seg: {last} {uncalibrated} (a last.ckpt, or a fit whose calibration chose none): the config's "
        "threshold and post-processing apply, and a case is flagged 'model unsure' only below "
        "model.review_expected_dice (0)"
    ]
    assert (tmp_path / "flipped" / "train_1_uncertainty.nii.gz").is_file()
    la_seg("evaluate", "--pred", tmp_path / "flipped", "--ref", journey_data)
    with open(tmp_path / "flipped_evaluation" / "test_metrics.csv") as handle:
        assert len(list(csv.DictReader(handle))) == 8
    assert not list(tmp_path.glob("**/.la-seg.lock")), "no lock file is left behind"


def test_flips_the_model_was_not_trained_with_are_refused(la_seg, journey_data, tmp_path):
    la_seg("fit", *TINY, "--data.root", journey_data, "--trainer.max_epochs", "1",
           "--trainer.limit_train_batches", "1")  # fmt: skip
    _, err = la_seg("predict", *TINY, "--ckpt_path", "runs/demo/version_0/checkpoints/last.ckpt",
                    "--data.predict_root", journey_data, "--writer.output_dir", "masks",
                    "--model.tta", "flips",
                    expect=2)  # fmt: skip
    assert "data.augmentation.hflip true and data.augmentation.vflip true" in err.splitlines()[-1]
    assert not (tmp_path / "masks").exists()
    _, err = la_seg("test", *TINY, "--data.root", journey_data, "--ckpt_path", "last",
                    "--model.tta", "rot180", expect=2)  # fmt: skip
    assert "model.tta rot180" in err.splitlines()[-1] and "hflip" in err.splitlines()[-1]
