"""Per-case Dice/IoU on the 3D volume (and slice-wise), and the volumetric test report."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

import la_seg
from la_seg.atomic import remove_stale_temp_files, write_csv, write_json
from la_seg.metrics import CumulativeCaseMetrics, EmptyDistance, gather_cases

REPORT_COLUMNS = ("case_id", "dice", "iou", "hd95_mm", "assd_mm", "volume_pred_ml", "volume_ref_ml")
METRIC_KEYS = REPORT_COLUMNS[1:]
INFERENCE_HPARAMS = ("threshold", "tta", "postprocess", "eval_batch_size")


class SegmentationMetrics(L.Callback):
    """Logs `{val,test}/dice`, `/iou` (means over cases, 3D), `/dice_slice`, `/iou_slice` (pooled slices)
    and `/failed` (cases with an empty prediction or reference).

    Each case is counted once under DDP. After `test`, writes `test_metrics.csv` and `test_metrics.json`
    (a header saying what the numbers were computed with, per-case rows, mean, sd and n) into the run's
    log folder and prints the table. With an ensemble or test-time flips, each JSON case also carries its
    voters' `agreement` (la_seg.inference.Agreement), and the header the ensemble's members and passes.

    Args:
        surface_metrics_in_validation: also compute HD95/ASSD during validation (slower).
        empty_distance: HD95/ASSD of a case with an empty prediction or reference: `nan` (left out of the
            means, whose n says how many cases they cover) or `max` (the image diagonal in mm, as
            challenges penalise a missed LA).
    """

    def __init__(
        self, surface_metrics_in_validation: bool = False, empty_distance: EmptyDistance = "nan"
    ) -> None:
        self.surface_metrics_in_validation = surface_metrics_in_validation
        self.empty_distance = empty_distance
        self._cases = CumulativeCaseMetrics(surface_metrics_in_validation, empty_distance)
        self._agreements: list[dict] = []

    def _start(self, surface: bool) -> None:
        self._cases = CumulativeCaseMetrics(surface, self.empty_distance)
        self._agreements = []

    def _collect(self, outputs: dict) -> None:
        geometry = outputs["geometry"]
        if outputs.get("agreement") is not None:
            self._agreements.append({"case_id": outputs["case_id"], "agreement": outputs["agreement"]})
        self._cases.update(
            outputs["case_id"],
            outputs["pred"],
            outputs["label"],
            geometry.slices_last_spacing,
            voxel_mm3=getattr(geometry, "voxel_volume_mm3", None),
            slice_axis=geometry.slice_axis,
            spacing_source=getattr(geometry, "spacing_source", "unrecorded"),
        )

    def _publish(self, pl_module: L.LightningModule, stage: str, keys: tuple[str, ...]) -> tuple[list, dict]:
        rows, summary = self._cases.aggregate(keys)
        self._cases.reset()
        pl_module.log(f"{stage}/dice", summary["dice"]["mean"], sync_dist=False, prog_bar=True)
        pl_module.log(f"{stage}/iou", summary["iou"]["mean"], sync_dist=False)
        pl_module.log(f"{stage}/dice_slice", summary["slice_dice"]["mean"], sync_dist=False)
        pl_module.log(f"{stage}/iou_slice", summary["slice_iou"]["mean"], sync_dist=False)
        pl_module.log(f"{stage}/failed", float(summary["cases"]["failed"]), sync_dist=False)
        return rows, summary

    # validation
    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._start(surface=self.surface_metrics_in_validation)

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        self._collect(outputs)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        self._publish(
            pl_module, "val", METRIC_KEYS if self.surface_metrics_in_validation else ("dice", "iou")
        )

    # test
    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self._start(surface=True)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._collect(outputs)

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        rows, summary = self._publish(pl_module, "test", METRIC_KEYS)
        for key in ("hd95_mm", "assd_mm"):
            if summary[key]["n"]:
                pl_module.log(f"test/{key}", summary[key]["mean"], sync_dist=False)
        out_dir = Path(trainer.log_dir or trainer.default_root_dir)  # a collective call under DDP: every rank
        agreements = {row["case_id"]: row["agreement"] for row in gather_cases(self._agreements)}
        if trainer.is_global_zero:
            header = report_header(trainer, pl_module, rows, summary, self.empty_distance)
            write_report(rows, summary, out_dir, header, agreements)
            rank_zero_info(
                "\n"
                + format_table(rows, summary, header)
                + f"\nReport written to {out_dir}/test_metrics.{{csv,json}}"
            )


def inference_settings(pl_module: L.LightningModule) -> dict[str, Any]:
    """The module's own account of its inference choices, or those of its hparams that are known to be."""
    settings = getattr(pl_module, "inference_settings", None)
    if callable(settings):
        return dict(settings())
    hparams = getattr(pl_module, "hparams", {})
    return {key: hparams[key] for key in INFERENCE_HPARAMS if key in hparams}


def report_header(
    trainer: L.Trainer, pl_module: L.LightningModule, rows: list[dict], summary: dict, empty_distance: str
) -> dict[str, Any]:
    """What the report's numbers were computed with: checkpoint, version, inference, network and data."""
    ckpt_path = getattr(trainer, "ckpt_path", None)
    hparams = getattr(pl_module, "hparams", {})
    describe_ensemble = getattr(pl_module, "describe_ensemble", None)
    return {
        "checkpoint": str(ckpt_path) if ckpt_path else None,
        "la_seg_version": la_seg.__version__,
        "inference": inference_settings(pl_module),
        "ensemble": describe_ensemble() if callable(describe_ensemble) else None,
        "network": hparams.get("net"),
        "data": {
            "slice_context": hparams.get("slice_context"),
            "slice_axes": sorted({row["slice_axis"] for row in rows}),
            "spacing_sources": sorted({str(row["spacing_source"]) for row in rows}),
        },
        "empty_distance": empty_distance,
        "n": summary["cases"]["n"],
        "failed": summary["cases"]["failed"],
    }


def write_report(
    rows: list[dict],
    summary: dict,
    out_dir: Path,
    header: dict[str, Any],
    agreements: dict[str, dict] | None = None,
) -> None:
    """`test_metrics.csv` (header as `# key: value` lines, per-case rows, mean, sd and n rows) and
    `test_metrics.json` (header, cases, summary), both written atomically; `la-seg evaluate` reuses it.
    `agreements` (case id -> the voters' Agreement) go into the JSON cases that have one."""
    out_dir = Path(out_dir)
    remove_stale_temp_files(out_dir)
    comments = {k: v if isinstance(v, str) else json.dumps(v, default=str) for k, v in header.items()}
    body = [[row["case_id"], *(_fmt(row[k]) for k in METRIC_KEYS), int(row["failed"])] for row in rows]
    stats = [[stat, *(_fmt(summary[k][stat]) for k in METRIC_KEYS), ""] for stat in ("mean", "sd")]
    counts = [["n", *(summary[k]["n"] for k in METRIC_KEYS), summary["cases"]["failed"]]]
    write_csv(out_dir / "test_metrics.csv", [*REPORT_COLUMNS, "failed"], body + stats + counts, comments)
    cases = [{k: row[k] for k in (*REPORT_COLUMNS, "failed", "slice_dice", "slice_iou")} for row in rows]
    for case in cases:
        if case["case_id"] in (agreements or {}):
            case["agreement"] = agreements[case["case_id"]]
    write_json(out_dir / "test_metrics.json", {"header": header, "cases": cases, "summary": summary})


def format_table(rows: list[dict], summary: dict, header: dict[str, Any]) -> str:
    """The per-case table printed after `la-seg test`; ends with the checkpoint and the n/failed counts."""
    width = max([len("case"), *(len(str(r["case_id"])) for r in rows)]) + 2
    titles, widths = ("Dice", "IoU", "HD95mm", "ASSDmm", "V_pred mL", "V_ref mL"), (8, 8, 9, 9, 11, 10)

    def line(name: str, cells) -> str:
        return f"{name:<{width}}" + "".join(f"{c:>{w}}" for c, w in zip(cells, widths, strict=True))

    title = line("case", titles)
    lines = [title, "-" * len(title)]
    lines += [line(str(row["case_id"]), [_fmt(row[k]) for k in METRIC_KEYS]) for row in rows]
    lines.append("-" * len(title))
    lines += [line(stat, [_fmt(summary[k][stat]) for k in METRIC_KEYS]) for stat in ("mean", "sd")]
    lines.append(line("n", [summary[k]["n"] for k in METRIC_KEYS]))
    rule = header.get("empty_distance", "nan")
    failed_rule = "left out of their means" if rule == "nan" else "the image diagonal"
    cases = summary["cases"]
    lines += [
        f"slice-wise Dice {_fmt(summary['slice_dice']['mean'])}, IoU {_fmt(summary['slice_iou']['mean'])} "
        f"over {summary['slice_dice']['n']} slices",
        f"failed (empty prediction or reference): {cases['failed']}; their HD95/ASSD: {failed_rule}",
        f"checkpoint: {header.get('checkpoint')}",
        f"n = {cases['n']} cases, failed = {cases['failed']}",
    ]
    return "\n".join(lines)


def _fmt(value: float) -> str:
    return "nan" if value is None or math.isnan(value) else f"{value:.4f}"
