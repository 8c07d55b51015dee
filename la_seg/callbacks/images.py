"""TensorBoard pictures: validation slices with reference and prediction, and the fusion weights."""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from matplotlib.figure import Figure

from la_seg.qc import overlay

PANEL = 192  # pixels per panel side in the grid


class TensorBoardImages(L.Callback):
    """Every `every_n_epochs`, logs a grid of fixed validation slices and the block-fusion weights.

    For each of the first `num_cases` validation cases, the slice with the largest reference area is
    shown twice: the image alone, and the image with the reference in green and the prediction in
    red (overlap looks yellow). Fusion weights go in as scalars (`fusion/group{g}/block{i}`) and as a
    bar chart (`fusion/weights`, one panel per fusion group). Does nothing without a TensorBoard logger.
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
            writer.add_figure(
                "fusion/weights", fusion_figure(weights, trainer.current_epoch), step, close=True
            )


def overlay_row(image: torch.Tensor, label: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    """(3, PANEL, 2*PANEL): the slice with the largest reference area alone, then with the overlay."""
    areas = label.reshape(-1, label.shape[-1]).sum(0)
    k = int(areas.argmax()) if areas.any() else label.shape[-1] // 2
    grey = image[..., k].float().cpu().clamp(0, 1)
    plain = F.interpolate(grey[None, None], size=(PANEL, PANEL), mode="nearest")[0].expand(3, -1, -1)
    return torch.cat([plain, overlay(grey, label[..., k], pred[..., k], size=PANEL)], dim=2)


def fusion_figure(weights: list[torch.Tensor], epoch: int) -> Figure:
    """The paper's figure: a bar chart of the learned block weights, one panel per fusion group."""
    figure = Figure(figsize=(max(4.0, 0.35 * max(len(w) for w in weights) + 1.5), 2.6 * len(weights)))
    axes = figure.subplots(len(weights), 1, squeeze=False)[:, 0]
    offset = 0
    for g, (ax, group) in enumerate(zip(axes, weights, strict=True)):
        blocks = list(range(offset, offset + len(group)))
        offset += len(group)
        ax.bar(blocks, group.detach().float().cpu().tolist(), color="tab:blue")
        ax.set_xticks(blocks)
        ax.set_xlabel("encoder block")
        ax.set_ylabel("weight")
        if len(weights) > 1:
            ax.set_title(f"fusion group {g}", fontsize="medium")
    figure.suptitle(f"Block fusion weights, epoch {epoch}")
    figure.tight_layout()
    return figure
