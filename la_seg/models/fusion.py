"""Learnable softmax weighting of encoder blocks: one softmax over all of them (the paper) or per group."""

from __future__ import annotations

from typing import Literal, get_args

import numpy as np
import torch
from torch import Tensor, nn

from la_seg.errors import DataError

FusionMode = Literal["softmax", "mean", "last"]
FUSION_MODES: tuple[str, ...] = get_args(FusionMode)


class BlockFusion(nn.Module):
    """Fuses the tapped blocks into ``groups`` maps (shallow to deep).

    ``groups=1`` is the paper: F = sum_i softmax(a)_i F_i over all N tapped blocks, one map that the decoder
    turns into its whole pyramid. ``groups=S > 1`` (an extension) splits the blocks into S contiguous groups,
    each with its own softmax, one fused map per decoder level.

    ``softmax``: learnable weights; the logits start at zero, i.e. equal weights. A group of one block is
    refused: its weight is a constant 1 and gets no gradient. ``mean``: fixed equal weights (ablation, no
    parameters). ``last``: every group gets the last tapped block (the paper's no-fusion ablation).
    """

    def __init__(self, num_blocks: int, groups: int = 1, mode: FusionMode = "softmax") -> None:
        super().__init__()
        if mode not in FUSION_MODES:
            raise ValueError(f"fusion mode {mode!r} is not one of {FUSION_MODES}")
        if groups < 1 or num_blocks < 1:
            raise ValueError(f"need num_blocks >= 1 and groups >= 1, got {num_blocks} and {groups}")
        if groups > num_blocks:
            raise DataError(f"net.fusion_groups={groups} exceeds the {num_blocks} tapped blocks ")
        self.num_blocks = num_blocks
        self.groups = groups
        self.mode = mode
        # Contiguous, as equal as possible, shallow to deep (np.array_split puts the extra blocks first).
        # group_indices[g] lists the tapped blocks that weights()[g] refers to.
        if mode == "last":
            self.group_indices = [[num_blocks - 1] for _ in range(groups)]
        else:
            self.group_indices = [part.tolist() for part in np.array_split(np.arange(num_blocks), groups)]
        if mode == "softmax" and min(len(idx) for idx in self.group_indices) < 2:
            fix = (
                f"use net.fusion_groups <= {num_blocks // 2} (1 is the paper)"
                if num_blocks >= 2
                else "tap at least 2 blocks (net.indices)"
            )
            raise DataError(
                f"net.fusion_groups={groups} over {num_blocks} tapped blocks leaves a softmax over a single "
                f"block: its weight is a constant 1 and cannot learn; {fix} or net.fusion: last"
            )
        self.logits = nn.Parameter(torch.zeros(num_blocks)) if mode == "softmax" else None

    def weights(self) -> list[Tensor]:
        """Per-group block weights (each sums to 1), detached, for logging."""
        with torch.no_grad():
            return [w.detach().clone() for w in self._group_weights()]

    def _group_weights(self) -> list[Tensor]:
        if self.logits is not None:
            return [torch.softmax(self.logits[idx], dim=0) for idx in self.group_indices]
        return [torch.full((len(idx),), 1.0 / len(idx)) for idx in self.group_indices]

    def forward(self, features: list[Tensor]) -> list[Tensor]:
        """``num_blocks`` maps of equal shape -> ``groups`` fused maps, shallow to deep."""
        if len(features) != self.num_blocks:
            raise ValueError(f"BlockFusion expects {self.num_blocks} feature maps, got {len(features)}")
        if self.mode == "last":
            return [features[-1]] * self.groups
        fused = []
        for idx, weights in zip(self.group_indices, self._group_weights(), strict=True):
            weights = weights.to(device=features[idx[0]].device, dtype=features[idx[0]].dtype)
            # Accumulate instead of stacking: a stack would copy the group's maps (GBs for the giant model).
            out = weights[0] * features[idx[0]]
            for w, i in zip(weights[1:], idx[1:], strict=True):
                out = out + w * features[i]
            fused.append(out)
        return fused
