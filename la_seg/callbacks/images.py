"""TensorBoard pictures: validation slices with reference and prediction, and the fusion weights."""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger

PANEL = 192  # pixels per panel side in the grid


class TensorBoardImages(L.Callback):
    """Every `every_n_epochs`, logs a grid of fixed validation slices and the block-fusion weights.

    For each of the first `num_cases` validation cases, the slice with the largest reference area is
    shown twice: the image alone, and the image with the reference in green and the prediction in
    red (overlap looks yellow). Fusion weights go in as scalars (`fusion/group{g}/block{i}`) and as a
    bar-chart image, one row of bars per decoder level. Does nothing without a TensorBoard logger.
    """

    def __init__(self, every_n_epochs: int = 1, num_cases: int = 4) -> None:
        self.every_n_epochs = every_n_epochs
        self.num_cases = num_cases
        self._panels: list[torch.Tensor] = []

    def _active(self, trainer: L.Trainer) -> bool:
        return (
            isinstance(trainer.logger, TensorBoardLogger)
            and not trainer.sanity_checking
            and trainer.is_global_zero
            and trainer.current_epoch % self.every_n_epochs == 0
        )

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._panels = []

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        if batch_idx < self.num_cases and self._active(trainer):
            self._panels.append(overlay_row(batch["image"], outputs["label"], outputs["pred"]))

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not self._active(trainer):
            return
        writer = trainer.logger.experiment
        step = trainer.global_step
        if self._panels:
            writer.add_image("val/slices", torch.cat(self._panels, dim=1), step, dataformats="CHW")
        weights = pl_module.net.fusion_weights()
        for g, group in enumerate(weights):
            for i, w in enumerate(group.tolist()):
                writer.add_scalar(f"fusion/group{g}/block{i}", w, step)
        if weights:
            writer.add_image("fusion/weights", bar_chart(weights), step, dataformats="CHW")


def overlay_row(image: torch.Tensor, label: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    """(3, PANEL, 2*PANEL) float image: the slice alone, then with reference (green) and prediction (red)."""
    areas = label.reshape(-1, label.shape[-1]).sum(0)
    k = int(areas.argmax()) if areas.any() else label.shape[-1] // 2
    planes = torch.stack([image[..., k].float(), label[..., k].float(), pred[..., k].float()])
    planes = F.interpolate(planes[None], size=(PANEL, PANEL), mode="nearest")[0].cpu()
    grey, ref, prd = planes
    plain = grey.expand(3, -1, -1)
    overlay = torch.stack([grey * 0.6 + 0.4 * prd, grey * 0.6 + 0.4 * ref, grey * 0.6])
    return torch.cat([plain, overlay], dim=2).clamp(0, 1)


def bar_chart(weights: list[torch.Tensor], height: int = 64, bar: int = 12, gap: int = 4) -> torch.Tensor:
    """(3, H, W) picture of the fusion weights: a row of bars per group, heights relative to the largest."""
    scale = max(float(w.max()) for w in weights) or 1.0
    width = max(len(w) for w in weights) * (bar + gap) + gap
    canvas = torch.ones(3, len(weights) * (height + gap) + gap, width)
    for g, group in enumerate(weights):
        top = gap + g * (height + gap)
        canvas[:, top + height - 1, :] = 0.0  # baseline
        for i, w in enumerate(group.tolist()):
            h = max(1, round(w / scale * (height - 2)))
            left = gap + i * (bar + gap)
            canvas[:, top + height - 1 - h : top + height - 1, left : left + bar] = torch.tensor(
                [0.2, 0.4, 0.8]
            )[:, None, None]
    return canvas
