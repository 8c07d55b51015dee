"""Lightning's progress bar as la-seg wants it: Lightning's bar on a terminal, plain lines at a modest rate
without one (la_seg.progress owns the rule and the lines), never a second bar beside the writer's."""

from __future__ import annotations

import sys
from typing import TextIO

from lightning.pytorch.callbacks import ProgressBar, TQDMProgressBar

from la_seg.progress import Progress, on_terminal


class EpochLines(ProgressBar):
    """Lightning's progress without a terminal, through `Progress`: the epochs of fit (with the metrics of the
    latest) and the batches of validate / test, as plain lines at a modest rate; predict's cases are counted
    by the writer as they are written (la_seg.callbacks.writer)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        super().__init__()
        self.stream = stream
        self.enabled = True
        self._progress: Progress | None = None

    def disable(self) -> None:
        self.enabled = False

    def enable(self) -> None:
        self.enabled = True

    def _begin(self, what: str, total: float | None, done: int = 0) -> None:
        known = total is not None and total not in (-1, float("inf"))
        self._progress = Progress(what, int(total) if known else None, self.stream, self.enabled, done=done)

    def _end(self) -> None:
        if self._progress is not None:
            self._progress.close()
            self._progress = None

    def on_train_start(self, trainer, pl_module) -> None:
        self._begin("fit: epochs", trainer.max_epochs, done=trainer.current_epoch)  # resumed: from there

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self._progress is not None:
            metrics = self.get_metrics(trainer, pl_module)
            shown = {k: v for k, v in metrics.items() if k != "v_num" and isinstance(v, (int, float))}
            self._progress.advance(note=", ".join(f"{k} {v:.4g}" for k, v in shown.items()))

    def on_train_end(self, trainer, pl_module) -> None:
        self._end()

    def on_validation_start(self, trainer, pl_module) -> None:
        if trainer.state.fn == "validate":  # not the validation inside fit: its epochs are counted
            self._begin("validate: batches", sum(trainer.num_val_batches))

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if trainer.state.fn == "validate" and self._progress is not None:
            self._progress.advance()

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.state.fn == "validate":
            self._end()

    def on_test_start(self, trainer, pl_module) -> None:
        self._begin("test: batches", sum(trainer.num_test_batches))

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self._progress is not None:
            self._progress.advance()

    def on_test_end(self, trainer, pl_module) -> None:
        self._end()


class TerminalBar(TQDMProgressBar):
    """Lightning's bar on a terminal, but for predict, whose cases the writer counts as they are written (one
    bar, not two fighting over the screen)."""

    def on_predict_start(self, trainer, pl_module) -> None:
        pass

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        pass

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        pass

    def on_predict_end(self, trainer, pl_module) -> None:
        pass


def lightning_progress_bar(trainer_settings: dict) -> list[ProgressBar]:
    """The progress bar for a Trainer with these settings (`enable_progress_bar`, `callbacks`): Lightning's
    bar where it draws (on stdout) is a terminal, else plain lines; none where the progress bar is off or the
    settings name one of their own."""
    callbacks = trainer_settings.get("callbacks") or []
    callbacks = callbacks if isinstance(callbacks, (list, tuple)) else [callbacks]
    if trainer_settings.get("enable_progress_bar") is False:
        return []
    if any(isinstance(callback, ProgressBar) for callback in callbacks):
        return []
    return [TerminalBar() if on_terminal(sys.stdout) else EpochLines()]
