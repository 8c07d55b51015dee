"""`la-seg evaluate`: score any folder of masks (nnU-Net's, la-seg's) with the report of `la-seg test`.

Predictions are `<case>.nii.gz` (or .nii/.nrrd) files; references are found under --ref by la-seg's layouts
and matched by case id. `--ref` is a labelled data set (its labels are the references) or a folder of masks
such as an export's labelsTs. Spacing comes from the reference as `la-seg test` takes it (Utah's override
included); every prediction must lie on its reference's voxel grid.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

import la_seg
from la_seg.atomic import claim_output_folder
from la_seg.data.io import AFFINE_TOLERANCE_MM, Volume, read_image, read_label
from la_seg.data.layouts import Layout, find_cases
from la_seg.errors import DataError
from la_seg.metrics import case_metrics, summarise
from la_seg.plausibility import Plausibility, case_reasons, review_fields
from la_seg.progress import tracked
from la_seg.report import COMPANION_SUFFIXES, REPORT_COLUMNS, SUFFIXES, format_table, write_report

REPORT_STEM = "test_metrics"  # in a folder of its own (--out), replaced only with --overwrite


@dataclass(frozen=True)
class EvaluationMetrics:
    """How undefined figures are reported.

    Args:
        empty_distance: HD95/ASSD when a mask is empty: `nan` (left out of the mean, counted as failed) or
            `max` (the diagonal of the reference's field of view in mm, the worst distance possible).
    """

    empty_distance: Literal["nan", "max"] = "nan"


@dataclass(frozen=True)
class Reference:
    """A reference mask file, with the spacing and LA values la-seg reads it with (None: header / > 0)."""

    path: Path
    spacing: tuple[float, float, float] | None = None
    label_values: tuple[int, ...] | None = None


def evaluate(
    pred: Path,
    ref: Path,
    ref_layout: Layout = "auto",
    out: Path | None = None,
    metrics: EvaluationMetrics = EvaluationMetrics(),  # noqa: B008 (frozen, so sharing is safe)
    label: int | None = None,
    missing: Literal["error", "fail"] = "error",
    overwrite: bool = False,
    plausibility: Plausibility = Plausibility(),  # noqa: B008 (frozen)
) -> tuple[list[dict], dict]:
    """Score a folder of masks against references, writing test_metrics.{csv,json} and printing the table.

    Args:
        pred: folder of predicted masks named `<case>.nii.gz` (e.g. nnUNetv2_predict's or la-seg predict's).
        ref: labelled data set (any layout) or folder of reference masks (e.g. an export's labelsTs).
        ref_layout: layout of --ref; `auto` detects it.
        out: report folder; default `<pred>_evaluation` beside the predictions.
        metrics: --metrics.empty_distance (nan or max).
        label: the prediction value that marks the LA in multi-label masks; default: every value > 0.
        missing: a reference without a prediction: `error` refuses, `fail` scores it as an empty mask.
        overwrite: replace an earlier report in --out.
        plausibility: --plausibility.* (la_seg.plausibility): a mask outside it is flagged for review.
    """
    pred, ref = Path(pred).expanduser(), Path(ref).expanduser()
    for option, path in (("--pred", pred), ("--ref", ref)):
        if not path.exists():
            raise DataError(f"{option} {path} does not exist")
    if label is not None and label < 1:
        raise DataError(f"--label must be a mask value >= 1, got {label}")
    predictions = find_predictions(pred)
    references = find_references(ref, ref_layout)
    pairs = match_cases(predictions, references, missing, pred, ref)
    out_dir = Path(out).expanduser() if out is not None else _beside(pred)
    reports = [out_dir / f"{REPORT_STEM}{suffix}" for suffix in SUFFIXES]
    with claim_output_folder(out_dir, (pred, ref), reports, overwrite, "report"):
        return _score_and_report(pred, ref, out_dir, pairs, references, metrics, label, missing, plausibility)


def _score_and_report(
    pred: Path,
    ref: Path,
    out_dir: Path,
    pairs: dict[str, Path | None],
    references: dict[str, Reference],
    metrics: EvaluationMetrics,
    label: int | None,
    missing: str,
    plausibility: Plausibility,
) -> tuple[list[dict], dict]:
    """Score every pair, write the report into `out_dir` (held by this run) and print the table."""
    values: set[float] = set()  # every value found in the predictions
    rows = [
        score_case(case_id, path, references[case_id], label, metrics.empty_distance, values, plausibility)
        for case_id, path in tracked(pairs.items(), "evaluate: cases scored", len(pairs))
    ]
    if label is not None and label not in values:
        check_label_present(label, values, references, pred, ref)
    summary = summarise(rows, REPORT_COLUMNS[1:])
    header = {
        "checkpoint": None,
        "la_seg_version": la_seg.__version__,
        "predictions": str(pred),
        "references": str(ref),
        "label": label if label is not None else "> 0",
        "missing": missing,
        "empty_distance": metrics.empty_distance,
        "n": summary["cases"]["n"],
        "failed": summary["cases"]["failed"],
    }
    paths = write_report(rows, summary, out_dir, REPORT_STEM, header)
    unmatched = [case_id for case_id, path in pairs.items() if path is None]
    print(format_table(rows, summary, header))
    if unmatched:
        print(f"{len(unmatched)} reference(s) without a prediction scored as empty masks: {unmatched}")
    print(f"Report: {paths[0]} and {paths[1].name}")
    return rows, summary


def find_predictions(pred: Path) -> dict[str, Path]:
    """Case id -> mask file; the probability and uncertainty maps that `la-seg predict` writes beside a
    `<case>` mask (`<case>_prob`, `<case>_uncertainty`) are skipped."""
    found = {case.case_id: case.image_path for case in find_cases(pred, "files")}
    return {
        case_id: path
        for case_id, path in found.items()
        if not any(case_id.removesuffix(s) in found for s in COMPANION_SUFFIXES if case_id.endswith(s))
    }


def find_references(ref: Path, layout: str) -> dict[str, Reference]:
    """Case id -> reference: the labels of a labelled data set, or the files of a folder of masks."""
    cases = find_cases(ref, layout)
    if any(case.label_path is not None for case in cases):
        cases = find_cases(ref, layout, require_labels=True)
        return {case.case_id: Reference(case.label_path, case.spacing, case.label_values) for case in cases}
    images = [str(c.image_path) for c in cases if not c.image_path.name.startswith(f"{c.case_id}.")]
    if images:
        raise DataError(
            f"--ref {ref} holds images named <case>_0000 and no labels ({images[:3]}); point --ref at the "
            "labels (e.g. the export's labelsTs) or at a labelled data set"
        )
    return {case.case_id: Reference(case.image_path, case.spacing) for case in cases}


def match_cases(
    predictions: dict[str, Path], references: dict[str, Reference], missing: str, pred: Path, ref: Path
) -> dict[str, Path | None]:
    """Pair predictions with references by case id (None: no prediction, scored as an empty mask)."""
    orphans = sorted(set(predictions) - set(references))
    if orphans:
        files = [str(predictions[case_id]) for case_id in orphans]
        raise DataError(f"{len(orphans)} prediction(s) in {pred} have no reference under {ref}: {files[:10]}")
    absent = sorted(set(references) - set(predictions))
    if absent and missing == "error":
        files = [str(references[case_id].path) for case_id in absent]
        raise DataError(
            f"{len(absent)} reference(s) under {ref} have no prediction in {pred}: {files[:10]}; "
            "pass --missing fail to score them as empty masks"
        )
    return {case_id: predictions.get(case_id) for case_id in sorted(references)}


def score_case(
    case_id: str,
    pred_path: Path | None,
    reference: Reference,
    label: int | None,
    empty_distance: str,
    values: set[float] | None = None,
    plausibility: Plausibility = Plausibility(),  # noqa: B008 (frozen)
) -> dict:
    """One report row: the prediction against its reference on the reference's grid and spacing, flagged for
    review where `plausibility` says it cannot be right; the values found in the prediction are added to
    `values`."""
    # the file's own grid (predictions are written on it), la-seg's spacing and slice axis
    truth = read_label(reference.path, reference.spacing, label_values=reference.label_values)
    geometry = truth.geometry
    if pred_path is None:
        mask = np.zeros(truth.data.shape, dtype=bool)
    else:
        prediction = read_image(pred_path)
        check_same_grid(prediction, truth)
        mask = binarise_prediction(prediction, label)
        if values is not None:
            values.update(np.unique(prediction.data).tolist())
    pred = torch.from_numpy(geometry.to_slices_last(mask))
    spacing, voxel_mm3 = geometry.slices_last_spacing, geometry.voxel_volume_mm3
    row = case_metrics(
        pred,
        torch.from_numpy(geometry.to_slices_last(truth.data.astype(bool))),
        spacing,
        empty_distance=empty_distance,
        voxel_mm3=voxel_mm3,
    )
    reasons = case_reasons(pred, spacing, voxel_mm3, settings=plausibility)
    source = pred_path if pred_path is not None else "no prediction"
    return {"case_id": case_id, **row, "source": str(source), **review_fields(reasons)}


def check_label_present(
    label: int, values: set[float], references: dict[str, Reference], pred: Path, ref: Path
) -> None:
    """`--label N` that no prediction holds scores every case as failed: an error unless a reference holds N
    (then the predictions really missed it)."""
    for reference in references.values():
        if (read_image(reference.path).data == label).any():
            return
    found = sorted(int(v) if float(v).is_integer() else v for v in values)
    raise DataError(
        f"--label {label} appears in no prediction under {pred} (they hold the values {found[:10]}) and in "
        f"no reference under {ref}: every case would score as failed; pass the value that marks the LA, or "
        "drop --label to count every value > 0"
    )


def check_same_grid(prediction: Volume, reference: Volume) -> None:
    """A mask on another grid cannot be scored voxel by voxel: refuse it rather than resample silently."""
    pred, ref = prediction.geometry, reference.geometry
    if pred.shape != ref.shape:
        raise DataError(
            f"prediction {pred.source} has shape {pred.shape} but its reference "
            f"{ref.source} has shape {ref.shape}; predictions must be on the reference's grid"
        )
    if not np.allclose(pred.affine, ref.affine, rtol=0.0, atol=AFFINE_TOLERANCE_MM):
        raise DataError(
            f"prediction {pred.source} and its reference {ref.source} have different affines "
            f"(tolerance {AFFINE_TOLERANCE_MM} mm):\n{pred.affine}\nvs\n{ref.affine}"
        )


def binarise_prediction(prediction: Volume, label: int | None) -> np.ndarray:
    """The LA mask of a label map: value `label`, or every value > 0; probability maps are refused."""
    data = prediction.data
    if not np.isfinite(data).all() or (data < 0).any() or (data != np.round(data)).any():
        raise DataError(
            f"prediction {prediction.geometry.source} is not a label mask: it holds negative, fractional or "
            "non-finite values (a probability map? threshold it first)"
        )
    return data > 0 if label is None else data == label


def _beside(pred: Path) -> Path:
    """`<pred>_evaluation` next to the predictions folder (also for `--pred .`)."""
    folder = pred.resolve()
    return folder.with_name(f"{folder.name}_evaluation")
