"""Decisions taken once, on global rank 0, and shared with every rank (DDP, one node or several).

Checks that look at the file system (which cases exist, whether outputs exist already, which checkpoint is
`best`) give different answers on different ranks when files appear meanwhile or a node sees other disks;
and a check that fails on one rank only leaves the others waiting in the next collective. So rank 0 decides,
and Lightning's `strategy.broadcast` hands its answer (or its error) to every rank, which also makes it a
barrier: no rank goes on before the decision is taken.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import lightning as L

T = TypeVar("T")

# Set on the copy of rank 0's error that other ranks raise: rank 0 prints it, they exit without a second line.
REPORTED_BY_RANK_ZERO = "la_seg_reported_by_rank_zero"


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
        if not trainer.is_global_zero:
            setattr(error, REPORTED_BY_RANK_ZERO, True)
        raise error
    return result


def reported_by_rank_zero(error: BaseException) -> bool:
    """Whether `error` is rank 0's, re-raised on another rank (print it once: on rank 0)."""
    return bool(getattr(error, REPORTED_BY_RANK_ZERO, False))
