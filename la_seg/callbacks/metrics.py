"""Per-case Dice/IoU on the 3D volume (and slice-wise), and the volumetric test report."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info

import la_seg
from la_seg.checkpoints import INFERENCE_FIELDS
from la_seg.data.preprocess import INPUT_FIELDS
from la_seg.errors import DataError
from la_seg.metrics import CumulativeCaseMetrics, EmptyDistance, gather_cases
from la_seg.plausibility import disagreement_reasons, review_fields
from la_seg.qc import png_bytes, qc_picture, save_png, write_page
from la_seg.report import METRIC_KEYS, format_table, report_stem, write_report


class SegmentationMetrics(L.Callback):
    """Logs `{val,test}/dice`, `/iou` (means over cases, 3D), `/dice_slice`, `/iou_slice` (pooled slices)
    and `/failed` (cases with an empty prediction or reference); during fit also `val/dice_ema`, val/dice
    smoothed over epochs, which the configs' checkpoint monitors.

    Each case is counted once under DDP. After `test`, writes the report (la_seg/report.py) into the run's
    log folder, named after what it scored (`test_heldout.{csv,json}` for the split's test part,
    `test_<folder>.{csv,json}` for data.test_root; never over an earlier one), and prints the table. With an
    ensemble or test-time flips, each JSON case also carries its voters' `agreement`
    (la_seg.inference.Agreement), and the header the ensemble's members and passes. Every case has `review`
    and `review_reason`: a mask that cannot be right (la_seg.plausibility) or voters that disagree. With
    `qc_page`, `test` also writes `<report stem>.html` beside the report, a row per case with its picture
    (`<report stem>_qc/<case>.png`, la_seg.qc), flagged cases and the lowest Dice first.

    Args:
        surface_metrics_in_validation: also compute HD95/ASSD during validation (slower).
        empty_distance: HD95/ASSD of a case with an empty prediction or reference: `nan` (left out of the
            means, whose n says how many cases they cover) or `max` (the image diagonal in mm, as
            challenges penalise a missed LA).
        qc_page: after `test`, write the QC page and its pictures (a small PNG per case, kept in memory as
            such until the end of the run).
        dice_smoothing: val/dice_ema = s * previous + (1 - s) * val/dice, from the first validation's
            val/dice (nnU-Net picks its best checkpoint by such an average, s 0.9): on a few validation cases
            one lucky early epoch otherwise wins best.ckpt (on the accuracy benchmark, epoch 3 of 40 with 3
            validation hearts, 0.10 Dice below the last epoch on held-out hearts). 0: val/dice itself.
    """

    def __init__(
        self,
        surface_metrics_in_validation: bool = False,
        empty_distance: EmptyDistance = "nan",
        qc_page: bool = True,
        dice_smoothing: float = 0.9,
    ) -> None:
        if not 0.0 <= dice_smoothing < 1.0:
            raise DataError(f"metrics.dice_smoothing must be in [0, 1), got {dice_smoothing}")
        self.surface_metrics_in_validation = surface_metrics_in_validation
        self.dice_smoothing = float(dice_smoothing)
        self.dice_ema: float | None = None  # val/dice_ema so far (kept in checkpoints: a resumed fit goes on)
        self.empty_distance = empty_distance
        self.qc_page = qc_page
        self._cases = CumulativeCaseMetrics(surface_metrics_in_validation, empty_distance)
        self._agreements: list[dict] = []
        self._pictures: list[dict] = []

    def _start(self, surface: bool) -> None:
        self._cases = CumulativeCaseMetrics(surface, self.empty_distance)
        self._agreements = []
        self._pictures = []

    def _collect(self, outputs: dict) -> dict:
        """Score one case; returns its report row."""
        geometry, agreement = outputs["geometry"], outputs.get("agreement")
        reasons = list(outputs.get("review_reasons", []))
        if agreement is not None:
            self._agreements.append({"case_id": outputs["case_id"], "agreement": agreement})
            reasons += disagreement_reasons(agreement["mean_pairwise_dice"], agreement["review_below"])
        return self._cases.update(
            outputs["case_id"],
            outputs["pred"],
            outputs["label"],
            geometry.slices_last_spacing,
            voxel_mm3=getattr(geometry, "voxel_volume_mm3", None),
            slice_axis=geometry.slice_axis,
            spacing_source=getattr(geometry, "spacing_source", "unrecorded"),
            source=str(geometry.source),
            expected_dice=outputs.get("expected_dice"),
            **review_fields(reasons),
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
        _, summary = self._publish(
            pl_module, "val", METRIC_KEYS if self.surface_metrics_in_validation else ("dice", "iou")
        )
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            pl_module.log("val/dice_ema", self.smooth(float(summary["dice"]["mean"])), sync_dist=False)

    def smooth(self, dice: float) -> float:
        """val/dice_ema after a validation whose val/dice is `dice`."""
        ema = dice if self.dice_ema is None else self.dice_ema
        self.dice_ema = ema + (1.0 - self.dice_smoothing) * (dice - ema)  # exactly ema when dice is ema
        return self.dice_ema

    def state_dict(self) -> dict:
        return {"dice_ema": self.dice_ema}

    def load_state_dict(self, state_dict: dict) -> None:
        self.dice_ema = state_dict.get("dice_ema")

    # test
    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self._start(surface=True)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        row = self._collect(outputs)
        if self.qc_page:
            picture = qc_picture(
                batch["image"].detach().float(),
                outputs["pred"],
                row["case_id"],
                row["volume_pred_ml"],
                row["review_reason"],
                reference=outputs["label"],
            )
            self._pictures.append({"case_id": row["case_id"], "png": png_bytes(picture)})

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        rows, summary = self._publish(pl_module, "test", METRIC_KEYS)
        for key in ("hd95_mm", "assd_mm"):
            if summary[key]["n"]:
                pl_module.log(f"test/{key}", summary[key]["mean"], sync_dist=False)
        out_dir = Path(trainer.log_dir or trainer.default_root_dir)  # a collective call under DDP: every rank
        agreements = {row["case_id"]: row["agreement"] for row in gather_cases(self._agreements)}
        pictures = {row["case_id"]: row["png"] for row in gather_cases(self._pictures)}
        self._pictures = []
        if trainer.is_global_zero:
            header = report_header(trainer, pl_module, rows, summary, self.empty_distance)
            name, scored = _scored_data(trainer)
            header["scored"] = scored
            paths = write_report(rows, summary, out_dir, report_stem(out_dir, name), header, agreements)
            table = format_table(rows, summary, header)
            rank_zero_info(f"\n{table}\nReport: {paths[0]} and {paths[1].name} (scored {scored['what']})")
            if self.qc_page:
                page = write_qc_page(rows, pictures, paths[0].with_suffix(".html"), scored["what"])
                rank_zero_info(f"QC page: {page}")


def write_qc_page(rows: list[dict], pictures: dict[str, bytes], page: Path, scored: str) -> Path:
    """The test's QC page at `page`, its pictures in the folder `<page stem>_qc` beside it."""
    folder = page.with_name(f"{page.stem}_qc")
    entries = []
    for row in rows:
        picture = folder / f"{row['case_id']}.png"
        save_png(picture, pictures[row["case_id"]])
        entries.append(
            {key: row[key] for key in ("case_id", "dice", "review", "review_reason")}
            | {"volume_ml": row["volume_pred_ml"], "picture": f"{folder.name}/{picture.name}"}
        )
    return write_page(page, f"la-seg test: {scored}", entries)


def inference_settings(pl_module: L.LightningModule) -> dict[str, Any]:
    """The module's own account of its inference choices, or those of its hparams that are known to be."""
    settings = getattr(pl_module, "inference_settings", None)
    if callable(settings):
        return dict(settings())
    hparams = getattr(pl_module, "hparams", {})
    return {key: hparams[key] for key in INFERENCE_FIELDS if key in hparams}


def report_header(
    trainer: L.Trainer, pl_module: L.LightningModule, rows: list[dict], summary: dict, empty_distance: str
) -> dict[str, Any]:
    """What the report's numbers were computed with: checkpoint, version, inference, network and data."""
    ckpt_path = getattr(trainer, "ckpt_path", None)
    hparams = getattr(pl_module, "hparams", {})
    describe_ensemble = getattr(pl_module, "describe_ensemble", None)
    spec = getattr(getattr(trainer, "datamodule", None), "input_spec", None)
    return {
        "checkpoint": str(ckpt_path) if ckpt_path else None,
        "la_seg_version": la_seg.__version__,
        "inference": inference_settings(pl_module),
        "ensemble": describe_ensemble() if callable(describe_ensemble) else None,
        "network": hparams.get("net"),
        "data": {
            # how the volumes became the model's input: the data module's, set from the checkpoint
            **(dataclasses.asdict(spec) if spec is not None else dict.fromkeys(INPUT_FIELDS)),
            "slice_axes": sorted({row["slice_axis"] for row in rows}),
            "spacing_sources": sorted({str(row["spacing_source"]) for row in rows}),
        },
        "empty_distance": empty_distance,
        "n": summary["cases"]["n"],
        "failed": summary["cases"]["failed"],
    }


def _scored_data(trainer: L.Trainer) -> tuple[str, dict[str, Any]]:
    """A name for the report and what it scored: the run's held-out part of data.root, or data.test_root."""
    data = getattr(trainer, "datamodule", None)
    test_root = getattr(data, "test_root", None)
    if test_root is not None:
        folder = Path(test_root).expanduser().resolve()
        return folder.name, {"what": f"every case of data.test_root {folder}", "folder": str(folder)}
    root = getattr(data, "root", None)
    folder = str(Path(root).expanduser().resolve()) if root is not None else None
    split = getattr(data, "data_split", None)
    fold = f", fold {split.fold} of {split.folds}" if split is not None and split.folds > 1 else ""
    return "heldout", {"what": f"the split's test part of data.root {folder}{fold}", "folder": folder}
