"""`la-seg evaluate`: any folder of masks scored against la-seg's references with the `la-seg test` report."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import shutil

import numpy as np
import pytest

from la_seg.cli import main
from la_seg.data.io import Volume, read_image, read_label, write_nifti
from la_seg.data.layouts import find_cases
from la_seg.errors import DataError
from la_seg.evaluate import EvaluationMetrics, evaluate
from la_seg.nnunet import ExportData, export_nnunet


@pytest.fixture
def pred(synth_root, tmp_path):
    """The references themselves as predictions, as `<case>.nii.gz` with their raw values (LA = 420)."""
    folder = tmp_path / "pred"
    folder.mkdir()
    for case in find_cases(synth_root):
        shutil.copy(case.label_path, folder / f"{case.case_id}.nii.gz")
    return folder


def reference(synth_root, case_id: str) -> Volume:
    return read_label(next(c for c in find_cases(synth_root) if c.case_id == case_id).label_path)


def overwrite_mask(path, data, like: Volume, affine=None) -> None:
    path.unlink()
    grid = like.geometry if affine is None else dataclasses.replace(like.geometry, affine=affine)
    write_nifti(path, data, dataclasses.replace(grid, shape=data.shape))


def read_report(folder):
    document = json.loads((folder / "test_metrics.json").read_text())
    return {row["case_id"]: row for row in document["cases"]}, document["summary"]


def test_references_against_themselves_score_dice_1_and_hd95_0(synth_root, pred, capsys, monkeypatch):
    monkeypatch.chdir(pred)
    main(["evaluate", "--pred", ".", "--ref", str(synth_root)])
    out = pred.with_name("pred_evaluation")
    rows, summary = read_report(out)
    assert sorted(rows) == [c.case_id for c in find_cases(synth_root)]
    for row in rows.values():
        assert (row["dice"], row["iou"], row["hd95_mm"], row["assd_mm"]) == (1.0, 1.0, 0.0, 0.0)
        assert row["volume_pred_ml"] == row["volume_ref_ml"] > 0
    assert summary["dice"] == {"mean": 1.0, "sd": 0.0, "n": 6}
    with open(out / "test_metrics.csv") as handle:  # a plain table, one row per case
        assert [row["case_id"] for row in csv.DictReader(handle)] == sorted(rows)
    printed = capsys.readouterr().out
    assert "train_1" in printed and f"Report: {out / 'test_metrics.csv'}" in printed


def test_shifted_and_emptied_masks_give_lower_scores_and_one_failure(synth_root, pred, tmp_path):
    shifted, emptied = reference(synth_root, "train_1"), reference(synth_root, "train_2")
    overwrite_mask(pred / "train_1.nii.gz", np.roll(shifted.data, 2, axis=0), shifted)
    overwrite_mask(pred / "train_2.nii.gz", np.zeros_like(emptied.data), emptied)
    rows, summary = evaluate(pred, synth_root, out=tmp_path / "nan")
    shift_mm = 2 * shifted.geometry.spacing[0]
    assert 0 < rows[0]["dice"] < 1 and 0 < rows[0]["hd95_mm"] <= shift_mm + 1e-6
    assert rows[1]["dice"] == 0 and math.isnan(rows[1]["hd95_mm"]) and math.isnan(rows[1]["assd_mm"])
    assert summary["hd95_mm"]["n"] == len(rows) - 1  # the empty prediction is the one failure
    assert summary["dice"]["n"] == len(rows)
    rows, summary = evaluate(pred, synth_root, out=tmp_path / "max", metrics=EvaluationMetrics("max"))
    diagonal = math.dist((0, 0, 0), np.multiply(emptied.data.shape, emptied.geometry.spacing))
    assert rows[1]["hd95_mm"] == rows[1]["assd_mm"] == pytest.approx(diagonal)
    assert summary["hd95_mm"]["n"] == len(rows)


def test_prediction_on_another_grid_is_refused_naming_both_files(synth_root, pred):
    truth = reference(synth_root, "train_3")
    moved = truth.geometry.affine.copy()
    moved[0, 3] += 1.0
    overwrite_mask(pred / "train_3.nii.gz", truth.data, truth, affine=moved)
    with pytest.raises(DataError, match="different affines") as error:
        evaluate(pred, synth_root)
    assert str(pred / "train_3.nii.gz") in str(error.value) and str(truth.geometry.source) in str(error.value)
    overwrite_mask(pred / "train_3.nii.gz", truth.data[:-1], truth)
    with pytest.raises(DataError, match="has shape .* predictions must be on the reference's grid"):
        evaluate(pred, synth_root)


def test_unmatched_predictions_and_references(synth_root, pred, tmp_path, capsys):
    shutil.copy(pred / "train_1.nii.gz", pred / "ghost.nii.gz")
    with pytest.raises(DataError, match="have no reference") as error:
        evaluate(pred, synth_root)
    assert str(pred / "ghost.nii.gz") in str(error.value)
    (pred / "ghost.nii.gz").unlink()
    (pred / "train_4.nii.gz").unlink()
    with pytest.raises(DataError, match="have no prediction.*--missing fail") as error:
        evaluate(pred, synth_root)
    assert str(reference(synth_root, "train_4").geometry.source) in str(error.value)
    rows, summary = evaluate(pred, synth_root, out=tmp_path / "report", missing="fail")
    missing = next(row for row in rows if row["case_id"] == "train_4")
    assert missing["dice"] == 0 and missing["volume_pred_ml"] == 0 and summary["hd95_mm"]["n"] == 5
    assert "1 reference(s) without a prediction scored as empty masks: ['train_4']" in capsys.readouterr().out


def test_label_maps_take_a_label_value_and_probability_maps_are_refused(synth_root, pred, tmp_path):
    truth = reference(synth_root, "train_5")
    label_map = np.where(truth.data > 0, 2, 0).astype(np.uint8)
    label_map[:3] = 1  # another structure, not the LA
    overwrite_mask(pred / "train_5.nii.gz", label_map, truth)
    rows, _ = evaluate(pred, synth_root, out=tmp_path / "any")
    assert rows[4]["dice"] < 1  # default: every value > 0 counts
    rows, _ = evaluate(pred, synth_root, out=tmp_path / "two", label=2)
    assert rows[4]["dice"] == 1
    overwrite_mask(pred / "train_5.nii.gz", truth.data * np.float32(0.7), truth)
    with pytest.raises(DataError, match="is not a label mask.*probability map") as error:
        evaluate(pred, synth_root, out=tmp_path / "prob")
    assert str(pred / "train_5.nii.gz") in str(error.value)
    with pytest.raises(DataError, match="--label must be a mask value >= 1"):
        evaluate(pred, synth_root, label=0)


def test_probability_companions_of_la_seg_predict_are_skipped(synth_root, pred, tmp_path):
    truth = reference(synth_root, "train_1")
    write_nifti(pred / "train_1_prob.nii.gz", truth.data * np.float32(0.9), truth.geometry)
    rows, _ = evaluate(pred, synth_root, out=tmp_path / "report")
    assert [row["case_id"] for row in rows] == [c.case_id for c in find_cases(synth_root)]


def test_report_never_overwrites_or_lands_in_the_inputs(synth_root, pred, tmp_path):
    out = tmp_path / "report"
    evaluate(pred, synth_root, out=out)
    first = (out / "test_metrics.csv").read_text()
    with pytest.raises(DataError, match="report files exist.*--overwrite true"):
        evaluate(pred, synth_root, out=out)
    evaluate(pred, synth_root, out=out, overwrite=True)
    assert (out / "test_metrics.csv").read_text() == first
    for inside in (pred / "report", synth_root / "report"):
        with pytest.raises(DataError, match="lies inside the input"):
            evaluate(pred, synth_root, out=inside)
    assert not (synth_root / "report").exists()


def test_export_labels_folder_serves_as_reference_and_images_are_refused(synth_root, pred, tmp_path):
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": ["train_1", "train_2"], "val": ["train_3"], "test": ["train_4"]}))
    dataset = export_nnunet(ExportData(synth_root), tmp_path / "raw", split=split)
    only_test = tmp_path / "test_pred"
    only_test.mkdir()
    shutil.copy(pred / "train_4.nii.gz", only_test / "train_4.nii.gz")
    rows, _ = evaluate(only_test, dataset / "labelsTs")
    assert [(row["case_id"], row["dice"], row["hd95_mm"]) for row in rows] == [("train_4", 1.0, 0.0)]
    with pytest.raises(DataError, match="holds images named <case>_0000 and no labels"):
        evaluate(only_test, dataset / "imagesTs", out=tmp_path / "images")
    assert read_image(dataset / "labelsTs" / "train_4.nii.gz").data.max() == 1


def test_cli_error_is_one_line_and_exit_status_2(synth_root, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "--pred", str(tmp_path / "none"), "--ref", str(synth_root)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith(f"la-seg: error: --pred {tmp_path / 'none'} does not exist")
