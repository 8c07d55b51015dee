"""Per-case Dice/IoU on the 3D volume (and slice-wise), and the volumetric test report."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from la_seg.atomic import atomic_write_text
from la_seg.callbacks._distributed import gather_cases
from la_seg.metrics import case_metrics, summarise

REPORT_COLUMNS = ("case_id", "dice", "iou", "hd95_mm", "assd_mm", "volume_pred_ml", "volume_ref_ml")


class SegmentationMetrics(L.Callback):
    """Logs `{val,test}/dice`, `/iou` (means over cases, 3D) and `/dice_slice`, `/iou_slice` (pooled slices).

    Each case is counted once under DDP. After `test`, writes `test_metrics.csv` and
    `test_metrics.json` (per-case rows, mean and sd) into the run's log folder and prints the table.

    Args:
        surface_metrics_in_validation: also compute HD95/ASSD during validation (slower).
    """

    def __init__(self, surface_metrics_in_validation: bool = False) -> None:
        self.surface_metrics_in_validation = surface_metrics_in_validation
        self._rows: list[dict] = []

    def _collect(self, outputs: dict, surface: bool) -> None:
        row = case_metrics(outputs["pred"], outputs["label"], outputs["spacing"], surface=surface)
        self._rows.append({"case_id": outputs["case_id"], **row})

    def _publish(self, pl_module: L.LightningModule, stage: str, keys: tuple[str, ...]) -> tuple[list, dict]:
        rows = gather_cases(self._rows)
        self._rows = []
        summary = summarise(rows, keys)
        pl_module.log(f"{stage}/dice", summary["dice"]["mean"], sync_dist=False, prog_bar=True)
        pl_module.log(f"{stage}/iou", summary["iou"]["mean"], sync_dist=False)
        pl_module.log(f"{stage}/dice_slice", summary["slice_dice"]["mean"], sync_dist=False)
        pl_module.log(f"{stage}/iou_slice", summary["slice_iou"]["mean"], sync_dist=False)
        return rows, summary

    # validation
    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._rows = []

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        self._collect(outputs, surface=self.surface_metrics_in_validation)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        keys = REPORT_COLUMNS[1:] if self.surface_metrics_in_validation else ("dice", "iou")
        self._publish(pl_module, "val", keys)

    # test
    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self._rows = []

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._collect(outputs, surface=True)

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        rows, summary = self._publish(pl_module, "test", REPORT_COLUMNS[1:])
        for key in ("hd95_mm", "assd_mm"):
            if summary[key]["n"]:
                pl_module.log(f"test/{key}", summary[key]["mean"], sync_dist=False)
        out_dir = Path(trainer.log_dir or trainer.default_root_dir)  # a collective call under DDP: every rank
        if trainer.is_global_zero:
            write_report(rows, summary, out_dir)
            rank_zero_info(
                "\n"
                + format_table(rows, summary)
                + f"\nReport written to {out_dir}/test_metrics.{{csv,json}}"
            )


def write_report(rows: list[dict], summary: dict, out_dir: Path) -> None:
    """Per-case CSV (plus mean and sd rows) and a JSON with cases and summary, both written atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(REPORT_COLUMNS)
    for row in rows:
        writer.writerow([row["case_id"], *(_fmt(row[k]) for k in REPORT_COLUMNS[1:])])
    for stat in ("mean", "sd"):
        writer.writerow([stat, *(_fmt(summary[k][stat]) for k in REPORT_COLUMNS[1:])])
    atomic_write_text(out_dir / "test_metrics.csv", buffer.getvalue())
    cases = [{k: row[k] for k in (*REPORT_COLUMNS, "slice_dice", "slice_iou")} for row in rows]
    document = {"cases": cases, "summary": summary}
    atomic_write_text(out_dir / "test_metrics.json", json.dumps(_json_safe(document), indent=2))


def format_table(rows: list[dict], summary: dict) -> str:
    """The per-case table printed after `la-seg test`; the case column fits the longest id."""
    width = max([len("case"), *(len(str(r["case_id"])) for r in rows)]) + 2
    titles, widths = ("Dice", "IoU", "HD95mm", "ASSDmm", "V_pred mL", "V_ref mL"), (8, 8, 9, 9, 11, 10)

    def line(name: str, cells) -> str:
        return f"{name:<{width}}" + "".join(f"{c:>{w}}" for c, w in zip(cells, widths, strict=True))

    header = line("case", titles)
    lines = [header, "-" * len(header)]

    for row in rows:
        lines.append(line(str(row["case_id"]), [_fmt(row[k]) for k in REPORT_COLUMNS[1:]]))
    lines.append("-" * len(header))
    for stat in ("mean", "sd"):
        lines.append(line(stat, [_fmt(summary[k][stat]) for k in REPORT_COLUMNS[1:]]))
    lines.append(
        f"slice-wise Dice {_fmt(summary['slice_dice']['mean'])}, IoU {_fmt(summary['slice_iou']['mean'])} "
        f"over {summary['slice_dice']['n']} slices; {len(rows)} cases"
    )
    return "\n".join(lines)


def _fmt(value: float) -> str:
    return "nan" if value is None or math.isnan(value) else f"{value:.4f}"


def _json_safe(value):
    """NaN is not JSON: write it as null."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value
