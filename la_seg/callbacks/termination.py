"""Stopping a run early and cleanly: SIGTERM, Ctrl-C (SIGINT), and training whose loss is no longer finite.

SIGTERM (what SLURM, Kubernetes and `timeout` send before they kill) and, in a single-process run, a first
Ctrl-C: stop after the current unit of work, leave nothing half-written, save what can be resumed, and say how
to go on. A second Ctrl-C stops at once (Lightning's own interrupt). Under DDP Ctrl-C stays Lightning's: every
rank receives it at a different step.

Lightning's signal connector notes the signal (`trainer.received_sigterm`); its training and evaluation loops
then raise `SIGTERMException` after the current batch. This callback adds the prediction loop (after the
current case, whose files the writer completes) and, for `fit`, saves a resumable `last.ckpt`. `la-seg`
prints `message` as one line and exits 143 (128 + SIGTERM) or 130 (128 + SIGINT), so a job script sees that
the work is not done.
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from la_seg import runs
from la_seg.atomic import loader_worker_ends_ignored
from la_seg.errors import DataError
from la_seg.stops import record_stop, say_more


class StopOnSigterm(Callback):
    """Added to every run by the CLI (not a config option). In a single-process run it also takes the first
    Ctrl-C, so that an interrupted fit resumes exactly and a prediction keeps its finished cases."""

    def __init__(self) -> None:
        self.interrupted = False
        self._previous_sigint = None

    def _take_sigint(self, trainer) -> None:
        """After the trainer took its snapshot of the signal handlers (which it restores at the end)."""
        single = trainer.world_size == 1 and threading.current_thread() is threading.main_thread()
        if single and self._previous_sigint is None:  # once, however many stages start
            self.interrupted = False
            self._previous_sigint = signal.signal(signal.SIGINT, self._on_sigint)

    def on_train_start(self, trainer, pl_module) -> None:
        self._take_sigint(trainer)

    def on_validation_start(self, trainer, pl_module) -> None:
        self._take_sigint(trainer)

    def on_test_start(self, trainer, pl_module) -> None:
        self._take_sigint(trainer)

    def on_predict_start(self, trainer, pl_module) -> None:
        self._take_sigint(trainer)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._restore_sigint()

    def _restore_sigint(self) -> None:
        if self._previous_sigint is not None:
            signal.signal(signal.SIGINT, self._previous_sigint)
            self._previous_sigint = None

    def _on_sigint(self, signum, frame) -> None:
        """The first Ctrl-C: stop after the current step (a second one, the usual handler, stops at once)."""
        self.interrupted = True
        self._restore_sigint()
        print(
            "la-seg: Ctrl-C: stopping after the current step (press it again to stop at once)",
            file=sys.stderr,
        )

    def _stop_if_interrupted(self) -> None:
        if self.interrupted:
            raise SIGTERMException()  # Lightning's own stop, as after SIGTERM

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._stop_if_interrupted()

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        self._stop_if_interrupted()

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._stop_if_interrupted()

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if trainer.received_sigterm:  # the case just segmented is queued for writing: the writer finishes it
            raise SIGTERMException()
        self._stop_if_interrupted()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        # A SIGTERM sent to the whole process group (SLURM) also ends the DataLoader workers: the loop then
        # fails fetching the next batch (after the last one completed), and each worker's end may interrupt
        # this hook with torch's "worker killed" error. That is the same stop.
        if not isinstance(exception, SIGTERMException) and not trainer.received_sigterm:
            return
        self._restore_sigint()
        name = "SIGINT" if self.interrupted and not trainer.received_sigterm else "SIGTERM"
        stage = getattr(trainer.state.fn, "value", trainer.state.fn)
        record_stop(name, f"stopped by {name} during {stage}")  # said even if what follows fails
        with loader_worker_ends_ignored():  # the stop is handled whole, the save included
            say_more(self._stop_message(trainer, stage, name))

    def _stop_message(self, trainer, stage: str, name: str) -> str:
        """Saves what `fit` can resume from; the line that says what was kept and how to go on."""
        if trainer.state.fn == TrainerFn.FITTING:
            path = self._checkpoint_path(trainer)
            trainer.save_checkpoint(
                path, weights_only=False
            )  # the full state, to resume; atomic (DataOnlyCheckpointIO)
            return (
                f"stopped by {name} at epoch {trainer.current_epoch}, step {trainer.global_step}; saved "
                f"{path}: resume with the same command and --ckpt_path {path}"
            )
        elif trainer.state.fn == TrainerFn.PREDICTING:
            out = next((cb.output_dir for cb in trainer.callbacks if hasattr(cb, "output_dir")), None)
            return (
                f"stopped by {name}: the masks in {out} are complete but not all cases were segmented (no "
                "volumes.csv); run the same command with --writer.overwrite true to segment them all"
            )
        return f"stopped by {name} during {stage}: no report written; run the command again"

    @staticmethod
    def _checkpoint_path(trainer) -> Path:
        """`last.ckpt` beside the run's checkpoints, where `--ckpt_path last` finds it; recorded as the
        ModelCheckpoint's last one, so the resumed run replaces it rather than writing last-v1.ckpt."""
        callback = trainer.checkpoint_callback
        if isinstance(callback, ModelCheckpoint) and callback.dirpath is not None:
            path = callback.format_checkpoint_name({}, callback.CHECKPOINT_NAME_LAST)
            callback.last_model_path = path
            return Path(path)
        return runs.checkpoint_in(trainer.log_dir or trainer.default_root_dir, "last")


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


class DiscardRunWithoutCheckpoint(Callback):
    """A fit that fails before its first checkpoint leaves no run folder behind (no empty version_N): `run` is
    the outermost folder this fit creates. Added by the CLI; the SIGTERM save (StopOnSigterm, before this
    callback) counts as a checkpoint."""

    def __init__(self, run: Path) -> None:
        self.run = run

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if trainer.is_global_zero:
            runs.remove_unless_checkpointed(self.run)
