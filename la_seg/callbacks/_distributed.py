"""Gathering per-case results from every process, each case once."""

from __future__ import annotations

import torch.distributed as dist


def gather_cases(rows: list[dict]) -> list[dict]:
    """All ranks' rows, de-duplicated by `case_id` and sorted.

    Lightning's distributed sampler pads validation and test sets by repeating cases, so a plain
    gather would count those twice.
    """
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        gathered: list[list[dict]] = [[] for _ in range(dist.get_world_size())]
        dist.all_gather_object(gathered, rows)
        rows = [row for part in gathered for row in part]
    unique = {row["case_id"]: row for row in rows}
    return [unique[key] for key in sorted(unique)]
