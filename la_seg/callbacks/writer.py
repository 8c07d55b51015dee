"""Writes predicted masks as NIfTI in the input's exact geometry, plus a CSV of LA volumes."""

from __future__ import annotations

import csv
import io
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info
from PIL import Image

from la_seg.atomic import atomic_path, atomic_write_text
from la_seg.callbacks._distributed import gather_cases
from la_seg.data.io import Volume, write_nifti
from la_seg.errors import DataError
from la_seg.metrics import volume_ml


class NiftiPredictionWriter(BasePredictionWriter):
    """For each case writes `<output_dir>/<case_id>.nii.gz` (uint8 mask, the input's shape and affine)
    and, at the end, `<output_dir>/volumes.csv` (case id, LA volume in mL, source image).

    Writing runs in a background thread so the next case is segmented meanwhile. Refuses to write
    into the input folder, and refuses to replace existing outputs unless `overwrite` is set; the
    check runs before any case is segmented.

    Args:
        output_dir: folder for the masks (required for `la-seg predict`).
        overwrite: replace existing outputs.
        save_probabilities: also write `<case_id>_prob.nii.gz` (float32 LA probability).
        save_png: also write `<case_id>.png`: axial, coronal and sagittal mid-LA slices with the mask in red.
    """

    def __init__(
        self,
        output_dir: str | None = None,
        overwrite: bool = False,
        save_probabilities: bool = False,
        save_png: bool = False,
    ) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir) if output_dir else None
        self.overwrite = overwrite
        self.save_probabilities = save_probabilities
        self.save_png = save_png
        self._pool: ThreadPoolExecutor | None = None
        self._pending: list[Future] = []
        self._rows: list[dict] = []

    def _outputs_of(self, case_id: str) -> list[Path]:
        names = [f"{case_id}.nii.gz"]
        if self.save_probabilities:
            names.append(f"{case_id}_prob.nii.gz")
        if self.save_png:
            names.append(f"{case_id}.png")
        return [self.output_dir / n for n in names]

    def on_predict_start(self, trainer, pl_module) -> None:
        if self.output_dir is None:
            raise DataError(
                "--writer.output_dir is required for `la-seg predict`: the folder to write masks into"
            )
        cases = getattr(trainer.predict_dataloaders.dataset, "cases", [])
        out = self.output_dir.resolve()
        inputs = {Path(c.image_path).resolve() for c in cases}
        input_root = getattr(trainer.datamodule, "predict_root", None)
        if input_root is not None and Path(input_root).is_dir():
            inputs.add(Path(input_root).resolve())
        for source in inputs:
            if out == source or source in out.parents:
                raise DataError(
                    f"--writer.output_dir {self.output_dir} lies inside the input {source}; "
                    "la-seg never writes into its input: choose another folder"
                )
        if not self.overwrite:
            existing = [p for c in cases for p in self._outputs_of(c.case_id) if p.exists()]
            if (self.output_dir / "volumes.csv").exists():
                existing.append(self.output_dir / "volumes.csv")
            if existing:
                shown = ", ".join(str(p) for p in existing[:5]) + (" ..." if len(existing) > 5 else "")
                raise FileExistsError(
                    f"{len(existing)} output file(s) exist already ({shown}); "
                    "pass --writer.overwrite true to replace them, or choose another --writer.output_dir"
                )
        self.open()

    def open(self) -> None:
        """Start the background writer (the callback hooks call open / submit / close; so can other code)."""
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._pool = ThreadPoolExecutor(max_workers=2)
        self._pending, self._rows = [], []

    def write_on_batch_end(
        self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx
    ):
        self.submit(prediction, batch)

    def submit(self, prediction: dict, batch: dict) -> None:
        """Queue one case's outputs for writing; returns at once."""
        # MERGE(ckpt): predict_step returns tensors (PredictOutput); the report helper's writer replaces this.
        prediction = {
            **prediction,
            "mask": prediction["mask"].cpu().numpy(),
            "prob": prediction["prob"].cpu().numpy(),
        }
        reference = Volume(
            data=prediction["mask"],
            affine=prediction["affine"],
            spacing=prediction["spacing"],
            path=Path(prediction["image_path"]),
        )
        self._rows.append(
            {
                "case_id": prediction["case_id"],
                "volume_ml": volume_ml(prediction["mask"], prediction["spacing"]),
                "image_path": prediction["image_path"],
            }
        )
        image = batch["image"].float().cpu().numpy() if self.save_png else None
        self._pending.append(self._pool.submit(self._write_case, prediction, reference, image))

    def _write_case(self, prediction: dict, reference: Volume, image: np.ndarray | None) -> None:
        case_id = prediction["case_id"]
        write_nifti(self.output_dir / f"{case_id}.nii.gz", prediction["mask"].astype(np.uint8), reference)
        if self.save_probabilities:
            write_nifti(
                self.output_dir / f"{case_id}_prob.nii.gz", prediction["prob"].astype(np.float32), reference
            )
        if self.save_png:
            with atomic_path(self.output_dir / f"{case_id}.png", suffix=".png") as tmp:
                mid_slices_picture(image, prediction["mask"]).save(tmp)

    def close(self) -> list[dict]:
        """Wait for every queued write (re-raising any write error) and return this process's volume rows."""
        for future in self._pending:
            future.result()
        self._pool.shutdown()
        return self._rows

    def on_predict_end(self, trainer, pl_module) -> None:
        rows = gather_cases(self.close())
        if trainer.is_global_zero:
            buffer = io.StringIO()
            writer = csv.writer(buffer)
            writer.writerow(["case_id", "volume_ml", "image_path"])
            for row in rows:
                writer.writerow([row["case_id"], f"{row['volume_ml']:.3f}", row["image_path"]])
            atomic_write_text(self.output_dir / "volumes.csv", buffer.getvalue())
            rank_zero_info(f"Wrote {len(rows)} mask(s) and volumes.csv to {self.output_dir}")


def mid_slices_picture(image: np.ndarray, mask: np.ndarray) -> Image.Image:
    """Axial, coronal and sagittal slices through the mask's centre: the image in grey, the mask in red."""
    centre = np.argwhere(mask).mean(0).round().astype(int) if mask.any() else np.array(mask.shape) // 2
    views = [
        (image[:, :, centre[2]], mask[:, :, centre[2]]),
        (image[:, centre[1], :], mask[:, centre[1], :]),
        (image[centre[0], :, :], mask[centre[0], :, :]),
    ]
    tiles = []
    for p, m in views:
        grey = (np.clip(p, 0, 1) * 200).astype(np.uint8)
        rgb = np.stack([np.where(m > 0, 255, grey), grey, grey], axis=-1).astype(np.uint8)
        tiles.append(Image.fromarray(rgb).resize((192, 192), Image.NEAREST))
    canvas = Image.new("RGB", (192 * len(tiles), 192))
    for i, tile in enumerate(tiles):
        canvas.paste(tile, (192 * i, 0))
    return canvas
