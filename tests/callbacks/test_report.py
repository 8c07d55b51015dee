"""The test report: failures counted, every mean with its n, and a header saying what it was computed with."""

import csv
import json
import math
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from jsonargparse import ArgumentParser

import la_seg
from la_seg.callbacks.metrics import SegmentationMetrics
from la_seg.data.io import Geometry
from la_seg.metrics import summarise
from la_seg.report import format_table, report_stem

FILE_SHAPE, FILE_SPACING, SLICE_AXIS = (6, 20, 16), (2.5, 0.625, 0.625), 0  # through-plane axis first


def geometry(case_id: str) -> Geometry:
    return Geometry(
        FILE_SHAPE, np.diag([*FILE_SPACING, 1.0]), FILE_SPACING, Path(f"{case_id}.nii.gz"), SLICE_AXIS
    )


def slices_last_box(lo: int, hi: int) -> torch.Tensor:
    mask = torch.zeros(FILE_SHAPE, dtype=torch.bool)
    mask[lo:hi, 4:14, 4:12] = True  # box along the file's slice axis
    return geometry("any").to_slices_last(mask)


REFERENCE = slices_last_box(1, 4)
CASES = {
    "good": REFERENCE,
    "shifted": slices_last_box(2, 5),  # one slice further: HD95 = one slice spacing
    "missed": torch.zeros_like(REFERENCE),
}


class HandBuiltOutputs(L.LightningModule):
    """Its test_step returns EvalOutput dicts built by hand; fit only makes a checkpoint to test from."""

    def __init__(self) -> None:
        super().__init__()
        self.save_hyperparameters({"net": {"backbone": "tiny"}, "threshold": 0.5, "postprocess": "none"})
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def inference_settings(self) -> dict:
        return {"threshold": 0.5, "postprocess": "none", "eval_batch_size": 8, "tta": False}

    def training_step(self, batch, batch_idx):
        return (self.weight**2).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return [0]

    def test_dataloader(self):
        return list(CASES)

    def test_step(self, case_id, batch_idx):
        return {"case_id": case_id, "pred": CASES[case_id], "label": REFERENCE, "geometry": geometry(case_id)}


def read_table(path: Path) -> dict[str, dict[str, float]]:
    """The CSV as any reader reads it: a plain table, one row per case."""
    with path.open() as handle:
        rows = csv.DictReader(handle)
        return {row.pop("case_id"): {k: float(v) if v else math.nan for k, v in row.items()} for row in rows}


def run_test(tmp_path: Path, empty_distance: str) -> tuple[dict, dict, Path, Path]:
    trainer = L.Trainer(
        default_root_dir=tmp_path,
        max_epochs=1,
        # its batches are case ids, with no image to picture: no QC page (tests/test_qc_page.py)
        callbacks=[SegmentationMetrics(empty_distance=empty_distance, qc_page=False)],
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    module = HandBuiltOutputs()
    trainer.fit(module)
    trainer.test(module, ckpt_path="best", verbose=False)
    log_dir = Path(trainer.log_dir)
    document = json.loads((log_dir / "test_heldout.json").read_text())
    table = read_table(log_dir / "test_heldout.csv")
    return document, table, log_dir, Path(trainer.ckpt_path)


def test_report_counts_failures_and_records_its_settings(tmp_path):
    document, table, log_dir, ckpt = run_test(tmp_path, "nan")
    header, summary = document["header"], document["summary"]
    assert header["checkpoint"] == str(ckpt) and ckpt.is_file()
    assert header["la_seg_version"] == la_seg.__version__
    assert header["inference"] == {
        "threshold": 0.5,
        "postprocess": "none",
        "eval_batch_size": 8,
        "tta": False,
    }
    assert header["network"] == {"backbone": "tiny"}
    source = getattr(
        geometry("any"), "spacing_source", "unrecorded"
    )  # a Geometry field once the data stage has it
    assert header["data"] == {  # a module without la-seg's input settings, no data module: not known
        "img_size": None,
        "slice_context": None,
        "in_plane": None,
        "target_spacing": None,
        "intensity_headroom": None,
        "orientation": None,
        "slice_axes": [SLICE_AXIS],
        "spacing_sources": [str(source)],
    }
    assert (header["n"], header["failed"], header["empty_distance"]) == (3, 1, "nan")
    assert summary["cases"] == {"n": 3, "failed": 1}
    assert summary["dice"]["n"] == 3 and summary["hd95_mm"]["n"] == 2  # the failure has no HD95
    cases = {c["case_id"]: c for c in document["cases"]}
    assert cases["missed"]["failed"] and cases["missed"]["hd95_mm"] is None
    assert math.isclose(
        cases["shifted"]["hd95_mm"], FILE_SPACING[SLICE_AXIS], rel_tol=1e-3
    )  # geometry's spacing
    # the CSV: a plain table of the cases (provenance and summary are in the JSON)
    assert (log_dir / "test_heldout.csv").read_text().startswith("case_id,dice,iou,")
    assert sorted(table) == sorted(cases)
    assert math.isclose(summary["hd95_mm"]["mean"], FILE_SPACING[SLICE_AXIS] / 2, rel_tol=1e-3)
    assert table["missed"]["failed"] == 1 and math.isnan(table["missed"]["hd95_mm"])
    assert header["scored"]["what"].startswith("the split's test part")


def test_max_rule_puts_the_diagonal_into_the_mean(tmp_path):
    document, table, _, _ = run_test(tmp_path, "max")
    diagonal = math.sqrt(sum((n * s) ** 2 for n, s in zip(FILE_SHAPE, FILE_SPACING, strict=True)))
    assert document["header"]["empty_distance"] == "max"
    assert math.isclose(table["missed"]["hd95_mm"], diagonal, rel_tol=1e-3)
    assert document["summary"]["hd95_mm"]["n"] == 3
    mean = (0.0 + FILE_SPACING[SLICE_AXIS] + diagonal) / 3
    assert math.isclose(document["summary"]["hd95_mm"]["mean"], mean, rel_tol=1e-3)


def test_a_second_report_of_the_same_data_gets_its_own_name(tmp_path):
    first = tmp_path / "test_heldout.json"
    first.write_text("{}")  # an earlier report
    assert report_stem(tmp_path, "heldout") == "test_heldout-2"
    assert report_stem(tmp_path, "other centre/") == "test_other_centre"
    assert first.read_text() == "{}"


def test_printed_table_states_n_failed_review_and_checkpoint():
    rows = [
        {
            "case_id": "a",
            "dice": 1.0,
            "iou": 1.0,
            "hd95_mm": 0.0,
            "assd_mm": 0.0,
            "volume_pred_ml": 1.0,
            "volume_ref_ml": 1.0,
            "failed": False,
            "review": False,
            "review_reason": "",
        },
        {
            "case_id": "b",
            "dice": 0.0,
            "iou": 0.0,
            "hd95_mm": math.nan,
            "assd_mm": math.nan,
            "volume_pred_ml": 0.0,
            "volume_ref_ml": 1.0,
            "failed": True,
            "review": True,
            "review_reason": "empty mask",
            "source": "b.nii.gz",
        },
    ]
    summary = summarise(rows, ("dice", "iou", "hd95_mm", "assd_mm", "volume_pred_ml", "volume_ref_ml"))
    text = format_table(rows, summary, {"checkpoint": "runs/best.ckpt", "empty_distance": "nan"})
    lines = text.splitlines()
    n_row = next(line for line in lines if line.startswith("n "))
    assert n_row.split()[1:] == ["2", "2", "1", "1", "2", "2"]
    assert "failed (empty prediction or reference): 1" in text
    assert lines[-3:] == [
        "checkpoint: runs/best.ckpt",
        "la-seg: review b (b.nii.gz): empty mask",  # a flagged case: one line naming it and its file
        "n = 2 cases, failed = 1, review = 1",
    ]


def test_empty_distance_choices_are_validated_by_the_cli_parser():
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(SegmentationMetrics, "metrics")
    assert parser.parse_args(["--metrics.empty_distance", "max"]).metrics.empty_distance == "max"
    with pytest.raises(Exception, match="empty_distance"):
        parser.parse_args(["--metrics.empty_distance", "median"])
