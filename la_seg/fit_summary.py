"""What `la-seg fit` says when it ends: the best score and its epoch, the checkpoints, the run folder, the
command to test it, and a warning when the run did not train (la_seg/plausibility.py's floor)."""

from __future__ import annotations

import shlex

from la_seg.checkpoints import DICE_MONITORS
from la_seg.distributed import say
from la_seg.plausibility import low_dice_warning


def fit_summary(trainer, log_dir: str | None, given_options: list[str]) -> str:
    """The lines printed after `fit`: best val/dice and its epoch, checkpoints, run folder, next command."""
    lines = [f"la-seg: fit finished after {trainer.current_epoch} epoch(s); run folder {log_dir}"]
    for callback in trainer.checkpoint_callbacks:
        best, score = getattr(callback, "best_model_path", ""), getattr(callback, "best_model_score", None)
        if best and score is not None:
            epoch = getattr(callback, "best_epoch", None)
            at = f" at epoch {epoch}" if epoch is not None else ""
            lines.append(f"  best {callback.monitor} {float(score):.4f}{at}: {best}")
        if getattr(callback, "last_model_path", ""):
            lines.append(f"  last epoch: {callback.last_model_path}")
        if best:
            command = ["la-seg", "test", *replayed_options(given_options), "--ckpt_path", best]
            lines.append("  next: " + shlex.join(command))
    return "\n".join(lines)


REPLAYED = ("--config", "--data", "--model.net")  # what `test` needs of fit's options to run as fit did


def replayed_options(given_options: list[str]) -> list[str]:
    """fit's options that the printed test command repeats, as typed: the configs by the names given, the
    data options, and the network's (equal to the checkpoint's, they are needed where a config's differ)."""
    replayed = []
    for i, arg in enumerate(given_options):
        name = arg.split("=", 1)[0]
        if any(name == option or name.startswith(f"{option}.") for option in REPLAYED):
            replayed += [arg] if "=" in arg else given_options[i : i + 2]
    return replayed


def warn_if_fit_failed(trainer, log_dir: str | None) -> None:
    """One warning line after fit's summary when the best val/dice is below a working model's floor
    (model.plausibility.min_val_dice)."""
    scores = [
        float(callback.best_model_score)
        for callback in trainer.checkpoint_callbacks
        if getattr(callback, "monitor", None) in DICE_MONITORS and callback.best_model_score is not None
    ]
    floor = trainer.lightning_module.plausibility.min_val_dice
    warning = low_dice_warning(max(scores, default=None), floor, f"run {log_dir}")
    if warning:
        say(warning)
