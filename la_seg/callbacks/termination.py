"""Stopping a run early and cleanly: SIGTERM, and training whose loss is no longer finite.

SIGTERM (what SLURM, Kubernetes and `timeout` send before they kill): stop after the current unit of work,
leave nothing half-written, save what can be resumed, and say how to go on.

Lightning's signal connector notes the signal (`trainer.received_sigterm`); its training and evaluation loops
then raise `SIGTERMException` after the current batch. This callback adds the prediction loop (after the
current case, whose files the writer completes) and, for `fit`, saves a resumable `last.ckpt`. `la-seg`
prints `message` as one line and exits 143 (128 + SIGTERM), so a job script sees that the work is not done.
"""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from la_seg.atomic import loader_worker_ends_ignored
from la_seg.errors import DataError

EXIT_STATUS = 143  # 128 + SIGTERM, as a shell reports a process that SIGTERM ended
_STOPS: list[str] = []  # the line of a SIGTERM stop in this run (la-seg's main reads and clears it)


def sigterm_stop(clear: bool = False) -> str | None:
    """The line to print when this run was stopped by SIGTERM, else None; `clear` starts a new run."""
    message = _STOPS[-1] if _STOPS else None
    if clear:
        _STOPS.clear()
    return message


class StopOnSigterm(Callback):
    """Added to every run by the CLI (not a config option)."""

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if trainer.received_sigterm:  # the case just segmented is queued for writing: the writer finishes it
            raise SIGTERMException()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        # A SIGTERM sent to the whole process group (SLURM) also ends the DataLoader workers: the loop then
        # fails fetching the next batch (after the last one completed), and each worker's end may interrupt
        # this hook with torch's "worker killed" error. That is the same stop.
        if not isinstance(exception, SIGTERMException) and not trainer.received_sigterm:
            return
        stage = getattr(trainer.state.fn, "value", trainer.state.fn)
        _STOPS.append(f"stopped by SIGTERM during {stage}")  # said even if what follows fails
        with loader_worker_ends_ignored():  # the stop is handled whole, the save included
            _STOPS.append(self._stop_message(trainer, stage))

    def _stop_message(self, trainer, stage: str) -> str:
        """Saves what `fit` can resume from; the line that says what was kept and how to go on."""
        if trainer.state.fn == TrainerFn.FITTING:
            path = self._checkpoint_path(trainer)
            trainer.save_checkpoint(path)  # atomic (DataOnlyCheckpointIO); the loops' state resumes mid-epoch
            return (
                f"stopped by SIGTERM at epoch {trainer.current_epoch}, step {trainer.global_step}; saved "
                f"{path}: resume with the same command and --ckpt_path {path}"
            )
        elif trainer.state.fn == TrainerFn.PREDICTING:
            out = next((cb.output_dir for cb in trainer.callbacks if hasattr(cb, "output_dir")), None)
            return (
                f"stopped by SIGTERM: the masks in {out} are complete but not all cases were segmented (no "
                "volumes.csv); run the same command with --writer.overwrite true to segment them all"
            )
        return f"stopped by SIGTERM during {stage}: no report written; run the command again"

    @staticmethod
    def _checkpoint_path(trainer) -> Path:
        """`last.ckpt` beside the run's checkpoints, where `--ckpt_path last` finds it; recorded as the
        ModelCheckpoint's last one, so the resumed run replaces it rather than writing last-v1.ckpt."""
        callback = trainer.checkpoint_callback
        if isinstance(callback, ModelCheckpoint) and callback.dirpath is not None:
            path = callback.format_checkpoint_name({}, callback.CHECKPOINT_NAME_LAST)
            callback.last_model_path = path
            return Path(path)
        return Path(trainer.log_dir or trainer.default_root_dir) / "checkpoints" / "last.ckpt"


class StopOnNonFiniteLoss(Callback):
    """A NaN or infinite training loss stops `fit` at once with one line (what, when, what to try): the steps
    after it only spread NaN through the weights, while the progress bar was its only trace. Added to every
    run by the CLI; every rank decides together, so none waits for another at the next step."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        bad = loss is not None and not bool(torch.isfinite(loss.detach()).all())
        if trainer.strategy.reduce_boolean_decision(bad, all=False):
            lr = pl_module.hparams.get("lr") if hasattr(pl_module, "hparams") else None
            raise DataError(
                f"training diverged: train/loss is not finite at epoch {trainer.current_epoch}, step "
                f"{trainer.global_step} (--model.lr {lr}); no checkpoint is written from here: lower "
                "--model.lr, or add warm-up (--model.warmup_epochs), and train again"
            )
