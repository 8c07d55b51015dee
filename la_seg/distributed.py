"""Decisions taken once, on global rank 0, and shared with every rank (DDP, one node or several).

Checks that look at the file system (which cases exist, whether outputs exist already, which checkpoint is
`best`) give different answers on different ranks when files appear meanwhile or a node sees other disks;
and a check that fails on one rank only leaves the others waiting in the next collective. So rank 0 decides,
and Lightning's `strategy.broadcast` hands its answer (or its error) to every rank, which also makes it a
barrier: no rank goes on before the decision is taken.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from la_seg.errors import DataError

if TYPE_CHECKING:  # `la-seg` imports this module before it knows whether a run needs Lightning
    import lightning as L

T = TypeVar("T")
E = TypeVar("E", bound=BaseException)

# Set on an error that another rank prints (e.g. the copy of rank 0's error that the other ranks raise), so
# that a run of several processes ends with one error line, not one per process.
_REPORTED_ELSEWHERE = "la_seg_reported_elsewhere"


def decide_on_rank_zero(trainer: L.Trainer | None, decide: Callable[[], T]) -> T:
    """`decide()` run on global rank 0 only; its result returned, or its exception raised, on every rank.

    Without a trainer (a plain call) or in a single process, this is just `decide()`.
    """
    if trainer is None or trainer.world_size == 1:
        return decide()
    result, error = None, None
    if trainer.is_global_zero:
        try:
            result = decide()
        except Exception as raised:  # every rank must take part in the broadcast, then raise it
            error = raised
    result, error = trainer.strategy.broadcast((result, error), src=0)
    if error is not None:
        raise error if trainer.is_global_zero else reported_elsewhere(error)
    return result


def all_ranks_or_none(trainer: L.Trainer, build: Callable[[], T]) -> T:
    """`build()` run on every rank, where it may fail on some ranks only (e.g. each reads its own files): then
    every rank raises (the others would wait for it in the next collective), a failing one its own error, the
    others one that it prints. A collective: every rank must call it."""
    result, error = None, None
    try:
        result = build()
    except Exception as raised:  # noqa: BLE001 (re-raised below, after every rank has been told)
        error = raised
    if trainer.strategy.reduce_boolean_decision(error is not None, all=False):
        if error is not None:
            raise error
        raise reported_elsewhere(DataError("another DDP process failed (its error is printed)"))
    return result


def reported_elsewhere(error: E) -> E:
    """`error`, marked as printed by another rank: `la-seg` exits with status 2 without printing it again."""
    setattr(error, _REPORTED_ELSEWHERE, True)
    return error


def is_reported_elsewhere(error: BaseException) -> bool:
    """Whether another rank prints `error` (see reported_elsewhere)."""
    return bool(getattr(error, _REPORTED_ELSEWHERE, False))


def end_process_group() -> None:
    """Destroy the process group (if any) while the interpreter is whole: Lightning does so at exit for NCCL
    only, and a gloo group left to interpreter finalization can abort the process (`terminate called without
    an active exception`, SIGABRT instead of la-seg's exit status; seen after an error on two CPU ranks)."""
    dist = sys.modules.get("torch.distributed")  # never imported: no process group to end
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ---- the command line of the ranks Lightning starts -------------------------------------------------------
# Lightning's DDP launcher starts a node's other ranks by running this process's sys.argv again: what rank 0
# decided while parsing (a config's path, a checkpoint it resolved) travels to them there.


def relaunch_with(argv: list[str]) -> None:
    """The other ranks of this node run `la-seg argv` (e.g. with the shipped configs' paths resolved)."""
    sys.argv[1:] = argv


def relaunch_with_option(option: str, value: str) -> None:
    """The other ranks of this node get `option value` appended: the last one given wins, so they take rank
    0's answer (e.g. `--ckpt_path best` resolved to its file) instead of finding their own."""
    sys.argv += [option, value]


def say(message: str) -> None:
    """A line for the user (stderr), printed once however many ranks parse the command."""
    from lightning.pytorch.utilities import rank_zero_only

    rank_zero_only(print)(message, file=sys.stderr)
