"""ModelCheckpoint whose last.ckpt always holds the last completed epoch."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn


class RunCheckpoint(ModelCheckpoint):
    """`best.ckpt` by the monitor and, with `save_last`, `last.ckpt` after every epoch, whatever the monitor.

    Lightning >= 2.5 rewrites last.ckpt only when a top-k checkpoint was saved at the same step, so a run
    preempted after its best epoch would resume from that best epoch and silently lose every later one.
    """

    _last_written_step = -1
    best_epoch: int | None = None  # the epoch that wrote best_model_path (for the summary after fit)
    _stage: str | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._stage = stage

    def load_state_dict(self, state_dict: dict) -> None:
        """Only a resumed fit continues the run's record (best score, last.ckpt): validate / test / predict
        save nothing, and their folder may differ from the one recorded (predict logs nowhere, a path given
        absolute), where Lightning would warn that the record is not reloaded. A resumed fit whose folder is
        the recorded one spelt otherwise (relative, absolute) keeps it: else its best score is lost."""
        if self._stage != TrainerFn.FITTING:
            return
        recorded = state_dict.get("dirpath")
        if (
            recorded is not None
            and self.dirpath is not None
            and Path(recorded).resolve() == Path(self.dirpath).resolve()
        ):
            state_dict = {**state_dict, "dirpath": self.dirpath}
        super().load_state_dict(state_dict)

    def _save_last_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict) -> None:
        super()._save_last_checkpoint(trainer, monitor_candidates)
        if self.save_last:
            self._last_written_step = trainer.global_step

    def _update_best_and_save(self, current, trainer: L.Trainer, monitor_candidates: dict) -> None:
        super()._update_best_and_save(current, trainer, monitor_candidates)
        self.best_epoch = trainer.current_epoch

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):  # else the epoch's end saves (after validation)
            self._refresh_last(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        self._refresh_last(trainer)

    def _refresh_last(self, trainer: L.Trainer) -> None:
        stale = self._last_written_step != trainer.global_step
        training = trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking
        if self.save_last and stale and training and not trainer.fast_dev_run and trainer.global_step > 0:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
