"""Absurd results are never passed as confident: an untrained model's masks are flagged for review with the
reason; a run below the validation-Dice floor is warned about after fit and once by test and predict from its
checkpoint; calibration refuses settings with implausible validation masks and shows its progress."""

from __future__ import annotations

import csv
import json
import logging

import pytest
import torch

from la_seg.checkpoints import stored_calibration
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
