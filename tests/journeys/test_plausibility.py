"""Absurd results are never passed as confident: an untrained model's masks are flagged for review with the
reason; a run below the validation-Dice floor is warned about after fit and once by test and predict from its
checkpoint; calibration refuses settings with implausible validation masks and shows its progress."""

from __future__ import annotations

import csv
import json
import logging
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch

from la_seg.checkpoints import stored_calibration
from la_seg.data.io import read_label
from la_seg.plausibility import expected_dice
from tests.journeys.conftest import TINY

pytestmark = pytest.mark.slow
LOW_DICE = "reached a best val/dice of only"


def read_csv(path) -> list[dict]:
    with open(path) as handle:
        return list(csv.DictReader(handle))


def test_an_untrained_models_masks_are_flagged_for_review(la_seg, journey_data, tmp_path, caplog):
    caplog.set_level(logging.INFO)  # Lightning's info lines reach the console through the root logger here
    out, err = la_seg("predict", *TINY, "--untrained", "true", "--data.predict_root", journey_data,
                      "--writer.output_dir", "masks")  # fmt: skip
    rows = read_csv(tmp_path / "masks" / "volumes.csv")
    assert len(rows) == 8
    for row in rows:
        assert row["review"] == "True" and row["review_reason"], row
    console = out + err + caplog.text
    first = rows[0]
    assert f"la-seg: review {first['case_id']} ({first['image_path']}): {first['review_reason']}" in console
    assert "8 flagged for review" in console


def test_a_failed_fit_is_warned_about_and_its_implausible_settings_refused(la_seg, journey_data, tmp_path):
    # a floor no model reaches, and a volume range nothing fits in: every setting is implausible
    strict = ["--model.plausibility.min_val_dice", "1.0", "--model.plausibility.min_volume_ml", "0",
              "--model.plausibility.max_volume_ml", "0.001"]  # fmt: skip
    data = ["--data.root", journey_data]
    refused = "calibration: no threshold and post-processing gives plausible masks on every validation case"
    with pytest.warns(UserWarning, match=refused):
        _, err = la_seg("fit", *TINY, *data, *strict, "--trainer.max_epochs", "1",
                        "--calibration.thresholds", "[0.3, 0.5]")  # fmt: skip
    run = tmp_path / "runs" / "demo" / "version_0"
    warnings = [line for line in err.splitlines() if LOW_DICE in line]
    assert len(warnings) == 1 and "run runs/demo/version_0 " in warnings[0] and "min_val_dice" in warnings[0]
    validation = len(json.loads((run / "split.json").read_text())["val"])
    segmented = "calibration: validation cases segmented"  # la_seg.progress's lines
    progress = [line for line in err.splitlines() if line.startswith(segmented)]
    assert progress[0] == f"{segmented}: 0/{validation}"
    assert progress[-1].startswith(f"{segmented}: {validation}/{validation}, in ")
    best = "runs/demo/version_0/checkpoints/best.ckpt"
    assert stored_calibration(torch.load(best, weights_only=True)) is None  # nothing chosen, nothing stored

    # test and predict from that checkpoint say so once each; every case is flagged, with its reason
    _, err = la_seg("test", *TINY, *data, *strict, "--ckpt_path", best)
    assert [line for line in err.splitlines() if LOW_DICE in line] == [
        warnings[0].replace("run runs/demo/version_0", f"the run of checkpoint {best}")
    ]
    report = read_csv(run / "test_heldout.csv")
    assert report and all(row["review"] == "1" and row["review_reason"] for row in report)
    _, err = la_seg("predict", *TINY, *strict, "--ckpt_path", best, "--data.predict_root", journey_data,
                    "--writer.output_dir", "masks")  # fmt: skip
    assert sum(LOW_DICE in line for line in err.splitlines()) == 1

    # a failed run's masks are flagged even where they look plausible (a model may learn the wrong
    # structure), alone and in an ensemble; a run above the floor adds no such reason
    rules = {"min_volume_ml": 0, "max_volume_ml": 1e9, "max_border_fraction": 1, "max_components": 99999}
    lenient = [arg for field, value in rules.items() for arg in (f"--model.plausibility.{field}", str(value))]
    lenient += ["--model.review_expected_dice", "0"]
    shutil.copy(best, "copy.ckpt")  # another member of the same run
    for floor, ckpt, folder in [("1.0", best, "failed"), ("1.0", f"[{best}, copy.ckpt]", "ensemble"),
                                ("0.0", best, "passed")]:  # fmt: skip
        la_seg("predict", *TINY, *lenient, "--model.plausibility.min_val_dice", floor, "--ckpt_path", ckpt,
               "--data.predict_root", journey_data, "--writer.output_dir", folder)  # fmt: skip
        for row in read_csv(tmp_path / folder / "volumes.csv"):
            failed = [r for r in row["review_reason"].split("; ") if r.startswith("failed run: ")]
            assert len(failed) == (folder != "passed"), row
            assert folder != "ensemble" or "2 of 2 ensemble members" in failed[0]
            assert row["review"] == ("True" if failed else row["review"])
            assert all("below min_val_dice 1" in reason for reason in failed)


def test_a_mask_the_model_doubts_is_flagged_and_its_expected_dice_is_that_of_its_written_maps(
    la_seg, journey_data, tmp_path, caplog
):
    """volumes.csv's expected_dice is the written mask's Dice under the written probability map (the seam
    between the writer's table and its files); a case is flagged "model unsure" exactly when it is below
    `model.review_expected_dice`."""
    # untrained weights give probabilities in a narrow band: thresholded at their median, masks to doubt
    predict = ["predict", *TINY, "--untrained", "true", "--data.predict_root", journey_data,
               "--writer.save_probabilities", "true"]  # fmt: skip
    la_seg(*predict, "--writer.output_dir", "maps")
    maps = [nib.load(path).get_fdata() for path in sorted((tmp_path / "maps").glob("*_prob.nii.gz"))]
    predict += ["--model.threshold", f"{np.median(np.concatenate([m.ravel() for m in maps])):.6f}"]
    la_seg(*predict, "--writer.output_dir", "masks")
    rows = read_csv(tmp_path / "masks" / "volumes.csv")
    for row in rows:
        mask = read_label(tmp_path / "masks" / f"{row['case_id']}.nii.gz").data > 0
        prob = nib.load(tmp_path / "masks" / f"{row['case_id']}_prob.nii.gz").get_fdata()
        own = expected_dice(torch.from_numpy(prob), torch.from_numpy(mask))
        assert float(row["expected_dice"]) == pytest.approx(own, abs=1e-4)
        assert "model unsure" not in row["review_reason"]  # model.review_expected_dice 0: never
    caplog.set_level(logging.INFO)  # the review lines reach the console through the root logger here
    ranked = sorted(float(row["expected_dice"]) for row in rows)
    assert ranked[0] < ranked[-1]
    floor = (ranked[0] + ranked[-1]) / 2
    out, err = la_seg(*predict, "--writer.output_dir", "doubted", "--model.review_expected_dice", str(floor))
    for row in read_csv(tmp_path / "doubted" / "volumes.csv"):
        unsure = float(row["expected_dice"]) < floor
        assert ("model unsure" in row["review_reason"]) == unsure and (row["review"] == "True" or not unsure)
        assert not unsure or f"la-seg: review {row['case_id']}" in out + err + caplog.text
