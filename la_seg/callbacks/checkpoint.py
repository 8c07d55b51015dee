"""ModelCheckpoint whose last.ckpt always holds the last completed epoch."""

from __future__ import annotations

import warnings
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn


class RunCheckpoint(ModelCheckpoint):
    """`best.ckpt` by the monitor and, with `save_last`, `last.ckpt` after every validation and epoch,
    whatever the monitor.

    Lightning >= 2.5 rewrites last.ckpt only when a top-k checkpoint was saved at the same step, so a run
    preempted after its best epoch would resume from that best epoch and silently lose every later one. This
    callback therefore writes last.ckpt itself (ModelCheckpoint's top-k saving runs with save_last off),
    through public hooks and `Trainer.save_checkpoint` only.
    """

    def __init__(self, *args, save_last: bool | None = None, **kwargs) -> None:
        super().__init__(*args, save_last=False, **kwargs)
        self.keeps_last = bool(save_last)
        self.best_epoch: int | None = None  # the epoch that wrote best_model_path (for the summary after fit)
        self._last_written_step = -1
        self._stage: str | None = None
        self.continues_run = False  # set by the CLI for `fit --ckpt_path`, before Lightning knows of it

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        with warnings.catch_warnings():
            if self.continues_run:  # a resumed fit writes into its own run's checkpoints folder
                warnings.filterwarnings("ignore", message="Checkpoint directory .* exists and is not empty")
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

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        best = self.best_model_score
        super().on_validation_end(trainer, pl_module)
        self._note_best(best, trainer)
        self._write_last(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        best = self.best_model_score
        super().on_train_epoch_end(trainer, pl_module)
        self._note_best(best, trainer)
        self._write_last(trainer)

    def _note_best(self, before, trainer: L.Trainer) -> None:
        """best_epoch follows best_model_score, which ModelCheckpoint replaces with each new best."""
        if self.best_model_score is not before:
            self.best_epoch = trainer.current_epoch

    def _write_last(self, trainer: L.Trainer) -> None:
        """last.ckpt of this step, once (a validation at the epoch's end and the epoch's end share one)."""
        fitting = trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking
        fresh = self._last_written_step != trainer.global_step and trainer.global_step > 0
        if not (self.keeps_last and fitting and fresh and not trainer.fast_dev_run):
            return
        path = str(Path(self.dirpath) / f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}")
        self._last_written_step = trainer.global_step
        self.last_model_path = path  # before saving: the checkpoint records where its run's last.ckpt is
        trainer.save_checkpoint(path, self.save_weights_only)
