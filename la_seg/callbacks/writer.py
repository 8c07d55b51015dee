"""Writes predicted masks as NIfTI in the input's exact geometry, plus a CSV of LA volumes."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info

from la_seg.atomic import PREDICT_ROOTS, FolderLock, check_output_dir, write_csv
from la_seg.data.datamodule import CaseShards
from la_seg.data.io import Geometry, write_nifti
from la_seg.distributed import decide_on_rank_zero, reported_elsewhere
from la_seg.errors import DataError
from la_seg.inference import AGREEMENT_DIGITS
from la_seg.metrics import gather_cases, volume_ml
from la_seg.plausibility import REVIEW_COLUMNS, disagreement_reasons, review_fields, review_line
from la_seg.progress import Progress
from la_seg.qc import qc_picture, save_png, write_page
from la_seg.report import COMPANION_SUFFIXES, EXPECTED_DICE

VOLUMES_CSV = "volumes.csv"
QC_PAGE = "qc.html"
VOLUME_COLUMNS = ("case_id", "volume_ml", "image_path", "spacing_mm")
AGREEMENT_COLUMNS = ("volume_spread_ml", "mean_pairwise_dice")  # only with several voters


class NiftiPredictionWriter(BasePredictionWriter):
    """For each case writes `<output_dir>/<case_id>.nii.gz` (uint8 mask, the input's shape and affine)
    and, at the end, `<output_dir>/volumes.csv` (case id, LA volume in mL, source image, spacing used, the
    mask's `expected_dice` under the model's own probabilities, and `review` with its `review_reason`: a mask
    that cannot be right or that the model doubts, la_seg.plausibility; each flagged case also gets a console
    line).

    Writing runs in a background thread so the next case is segmented meanwhile. Before any case is
    segmented, the writer refuses an output folder that holds or lies inside an input, reserves every
    output name of every case (refusing two inputs that would write the same file, letter case ignored)
    and takes a lock on the folder for the whole run, so that a second run into it fails at once.
    Existing outputs are kept unless `overwrite` is set. Outputs appear only complete (atomic writes);
    a failed write stops the run with the file's name, and no volumes.csv is written for a failed run.

    With several voters (an ensemble of checkpoints, or `model.tta: flips`) it also writes
    `<case_id>_uncertainty.nii.gz` (float32 variance of the voters' probabilities, in [0, 0.25]) and adds
    to volumes.csv the LA volume's spread across voters (mL) and their mean pairwise Dice, and flags the case
    for review when they disagree; a single model without flips writes neither.

    Args:
        output_dir: folder for the masks (required for `la-seg predict`).
        overwrite: replace existing outputs.
        save_probabilities: also write `<case_id>_prob.nii.gz` (float32 LA probability).
        save_png: also write `<case_id>.png` (la_seg.qc): three labelled slices through the mask, the mask in
            red, the case id and LA volume above, a red banner with the reason on a case flagged for review.
        qc_page: also write `qc.html`, a page of every case's picture (implies save_png), flagged cases first
            (la_seg.qc). Off by default: the output folder then holds masks and volumes.csv only.
        review_below: with several voters, flag a case for review when their mean pairwise Dice is below this;
            None: the model's `review_below` (calibrated on validation at the end of fit, or its default).
    """

    def __init__(
        self,
        output_dir: str | None = None,
        overwrite: bool = False,
        save_probabilities: bool = False,
        save_png: bool = False,
        qc_page: bool = False,
        review_below: float | None = None,
    ) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir) if output_dir else None
        self.overwrite = overwrite
        self.save_probabilities = save_probabilities
        self.qc_page = qc_page
        self.save_png = save_png or qc_page
        self.review_below = review_below
        self.save_uncertainty = False  # set at predict start: whether the model has several voters
        self._pool: ThreadPoolExecutor | None = None
        self._pending: list[tuple[dict, Future]] = []
        self._lock: FolderLock | None = None
        self._progress: Progress | None = None

    def output_names(self, case_id: str) -> list[str]:
        """Every file name this writer gives one case: the one list that reservations and writes share."""
        names = [f"{case_id}.nii.gz"]
        if self.save_probabilities:
            names.append(f"{case_id}{COMPANION_SUFFIXES[0]}.nii.gz")
        if self.save_png:
            names.append(f"{case_id}.png")
        if self.save_uncertainty:
            names.append(f"{case_id}{COMPANION_SUFFIXES[1]}.nii.gz")
        return names

    def on_predict_start(self, trainer, pl_module) -> None:
        self.save_uncertainty = bool(getattr(pl_module, "has_voters", False))
        cases = getattr(trainer.predict_dataloaders.dataset, "cases", [])
        # Rank 0 checks the folder, locks it and clears it once; the broadcast is also the barrier that keeps
        # every rank from writing before then (a rank checking for itself would see rank 0's fresh masks).
        data = trainer.datamodule  # the labelled data (root, test_root) is input too, never written into
        roots = [getattr(data, name, None) for name in PREDICT_ROOTS]
        decide_on_rank_zero(trainer, lambda: self.prepare(cases, roots))
        own = sum(CaseShards.owner(i, trainer.world_size) == trainer.global_rank for i in range(len(cases)))
        where = f" by rank 0 (of {trainer.world_size})" if trainer.world_size > 1 else ""
        self.start(Progress(f"predict: cases written{where}", own, enabled=trainer.is_global_zero))

    def prepare(self, cases: list, roots: list[str | None]) -> None:
        """Before anything is written: refuse writing into the inputs, colliding names and (unless overwrite)
        existing outputs; lock the output folder and remove a killed run's temp files. Once per run."""
        check_output_dir(
            self.output_dir, [*roots, *(c.image_path for c in cases), *(c.label_path for c in cases)]
        )
        self.reserve_outputs((c.case_id, Path(c.image_path)) for c in cases)
        self.lock()
        if not self.overwrite:
            self._refuse_existing([c.case_id for c in cases])
        else:  # an old table or page would claim cases this run may fail to write
            for name in self.run_files():
                (self.output_dir / name).unlink(missing_ok=True)

    def reserve_outputs(self, cases: Iterable[tuple[str, Path]]) -> None:
        """Refuse inputs whose outputs would share a name (case-insensitively, as on macOS and Windows)."""
        owners: dict[str, tuple[str, Path | None]] = {n.casefold(): (n, None) for n in self.run_files()}
        for case_id, source in cases:
            for name in self.output_names(case_id):
                taken = owners.setdefault(name.casefold(), (name, source))
                if taken[1] == source and taken[0] == name:
                    continue
                other = f"input {taken[1]}'s {taken[0]}" if taken[1] else f"the run's {taken[0]}"
                raise DataError(
                    f"input {source} would write {self.output_dir / name}, which collides with {other} "
                    "(names are compared ignoring letter case); rename one of the inputs"
                )

    def run_files(self) -> list[str]:
        """The files written once per run, after every case."""
        return [VOLUMES_CSV, QC_PAGE] if self.qc_page else [VOLUMES_CSV]

    def _refuse_existing(self, case_ids: list[str]) -> None:
        candidates = [self.output_dir / n for c in case_ids for n in self.output_names(c)]
        existing = [p for p in [*candidates, *(self.output_dir / n for n in self.run_files())] if p.exists()]
        if existing:
            self.release()
            shown = ", ".join(str(p) for p in existing[:5]) + (" ..." if len(existing) > 5 else "")
            raise FileExistsError(
                f"{len(existing)} output file(s) exist already ({shown}); "
                "pass --writer.overwrite true to replace them, or choose another --writer.output_dir"
            )

    def open(self) -> None:
        """Lock the output folder, remove a killed run's temp files and start the background writer (the
        callback hooks call prepare / start / submit / close / release; other code may call these)."""
        self.lock()
        self.start()

    def lock(self) -> None:
        """Take the output folder's lock (a second run into it fails at once) and remove the temp files that
        killed runs of this host left there."""
        lock = FolderLock(self.output_dir, "--writer.output_dir")
        lock.acquire()
        self._lock = lock

    def start(self, progress: Progress | None = None) -> None:
        """Start the background writer; `progress` counts the cases as their files are written."""
        self._pool = ThreadPoolExecutor(max_workers=2)
        self._pending = []
        self._progress = progress

    def write_on_batch_end(
        self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx
    ):
        if all(CaseShards.owner(i, trainer.world_size) == trainer.global_rank for i in batch_indices):
            self.submit(prediction, batch)  # not a repeat standing in for an empty shard: its owner writes it

    def submit(self, prediction: dict, batch: dict) -> None:
        """Queue one case's outputs (a PredictOutput, slices last) for writing; returns at once, after
        re-raising the error of any write that has failed meanwhile (so a full disk stops the run early)."""
        for _, done in self._pending:
            if done.done() and done.exception() is not None:
                raise done.exception()
        geometry: Geometry = prediction["geometry"]
        mask = prediction["mask"].detach().cpu()
        row = {
            "case_id": prediction["case_id"],
            "volume_ml": volume_ml(mask, geometry.slices_last_spacing, geometry.voxel_volume_mm3),
            "image_path": str(geometry.source),
            "spacing_mm": "x".join(f"{s:g}" for s in geometry.spacing),
        }
        row[EXPECTED_DICE] = prediction.get("expected_dice")
        reasons = list(prediction.get("review_reasons", []))
        agreement = prediction.get("agreement")
        if agreement is not None:
            row["volume_spread_ml"] = agreement["volume_spread_ml"]
            row["mean_pairwise_dice"] = agreement["mean_pairwise_dice"]
            own = self.review_below
            below = agreement["review_below"] if own is None else own
            reasons += disagreement_reasons(agreement["mean_pairwise_dice"], below)
        row |= review_fields(reasons)
        outputs = {"mask": mask}
        if self.save_probabilities:
            outputs["prob"] = prediction["prob"].detach().float().cpu()
        if prediction.get("uncertainty") is not None:
            outputs["uncertainty"] = prediction["uncertainty"].detach().float().cpu()
        image = batch["image"].detach().float().cpu() if self.save_png else None
        future = self._pool.submit(self._write_case, row, geometry, outputs, image)
        if self._progress is not None:
            future.add_done_callback(lambda _: self._progress.advance())
        self._pending.append((row, future))

    def _write_case(
        self, row: dict, geometry: Geometry, outputs: dict[str, torch.Tensor], image: torch.Tensor | None
    ) -> None:
        """`row`: the case's volumes.csv row; `outputs`: the mask, and the float32 maps to write (`prob`,
        `uncertainty`), slices last."""
        case_id, mask = row["case_id"], outputs["mask"]
        for kind, suffix in zip(("mask", "prob", "uncertainty"), ("", *COMPANION_SUFFIXES), strict=True):
            if kind in outputs:
                array = outputs[kind].numpy()
                in_file = geometry.from_slices_last(array.astype(np.uint8) if kind == "mask" else array)
                _write(
                    self.output_dir / f"{case_id}{suffix}.nii.gz",
                    lambda p, data=in_file: write_nifti(p, data, geometry),
                )
        if image is not None:
            picture = qc_picture(image, mask, case_id, row["volume_ml"], row["review_reason"])
            _write(self.output_dir / f"{case_id}.png", lambda p: save_png(p, picture))

    def close(self) -> list[dict]:
        """Wait for every queued write and return the rows of the cases written; re-raises the first
        write error once all writes have ended."""
        errors, rows = [], []
        for row, future in self._pending:
            error = future.exception()
            if error is None:
                rows.append(row)
            else:
                errors.append(error)
        self._pool.shutdown()
        self._pending = []
        if self._progress is not None:
            self._progress.close(completed=not errors)
        if errors:
            raise errors[0]
        return rows

    def release(self) -> None:
        """Give up the output folder's lock (if held) and remove its file: the folder keeps only outputs."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def on_predict_end(self, trainer, pl_module) -> None:
        try:
            rows, error = [], None
            try:
                rows = self.close()
            except Exception as raised:  # told to every rank below, so no rank waits or writes the table
                error = raised
            rows = gather_cases(rows)
            flag = torch.tensor(float(error is not None), device=trainer.strategy.root_device)
            failed = trainer.strategy.reduce(flag, reduce_op="sum")  # on the device: NCCL needs it there
            if error is not None:
                raise error
            if failed:  # the failing rank prints its own error
                raise reported_elsewhere(DataError(f"{int(failed)} other rank(s) failed to write masks"))
            if trainer.is_global_zero:
                voters = AGREEMENT_COLUMNS if self.save_uncertainty else ()
                columns = (*VOLUME_COLUMNS, *voters, EXPECTED_DICE, *REVIEW_COLUMNS)
                write_csv(self.output_dir / VOLUMES_CSV, columns, _volume_table(rows, columns))
                flagged = [row for row in rows if row["review"]]
                for row in flagged:
                    rank_zero_info(review_line(row["case_id"], row["image_path"], row["review_reason"]))
                rank_zero_info(
                    f"Wrote {len(rows)} mask(s) and {VOLUMES_CSV} to {self.output_dir}; "
                    f"{len(flagged)} flagged for review"
                )
                if self.qc_page:
                    page = self.output_dir / QC_PAGE
                    pictures = [row | {"picture": f"{row['case_id']}.png"} for row in rows]
                    _write(page, lambda p: write_page(p, f"la-seg predict: {self.output_dir}", pictures))
                    rank_zero_info(f"QC page: {page}")
        finally:
            self.release()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        self.release()


def _volume_table(rows: list[dict], columns: tuple[str, ...]) -> list[list]:
    """Volumes in mL with 3 decimals, Dice with 4; an unknown figure (None) is an empty cell."""
    digits = {"volume_ml": 3, "volume_spread_ml": 3, "mean_pairwise_dice": AGREEMENT_DIGITS, EXPECTED_DICE: 4}

    def cell(value, column: str):
        return "" if value is None else f"{value:.{digits[column]}f}" if column in digits else value

    return [[cell(r[c], c) for c in columns] for r in rows]


def _write(path: Path, write: Callable[[Path], None]) -> None:
    """Run one output's (atomic) `write`, turning a failure (disk full, permissions) into a DataError
    naming the file."""
    try:
        write(path)
    except OSError as error:
        raise DataError(f"could not write {path}: {error.strerror or error}") from error
