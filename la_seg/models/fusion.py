"""Learnable softmax weighting of encoder blocks: one softmax over all of them (the paper) or per group."""

from __future__ import annotations

from typing import Literal, get_args

import numpy as np
import torch
from torch import Tensor, nn

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
            raise ValueError(f"groups={groups} exceeds the {num_blocks} tapped blocks")
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
            half = num_blocks // 2
            fix = f"use groups <= {half} (1 is the paper)" if num_blocks >= 2 else "tap at least 2 blocks"
            raise ValueError(
                f"groups={groups} over {num_blocks} tapped blocks leaves a softmax over a single block: its "
                f"weight is a constant 1 and cannot learn; {fix} or mode='last'"
            )
        # Each group as a slice of the blocks: a view of the weights, where indexing with a Python list would
        # copy the index to the device and wait for it in every forward pass.
        self._slices = [slice(idx[0], idx[-1] + 1) for idx in self.group_indices]
        # (group, position in it) of each tapped block
        self._place = [(g, k) for g, idx in enumerate(self.group_indices) for k in range(len(idx))]
        self.logits = nn.Parameter(torch.zeros(num_blocks)) if mode == "softmax" else None
        if mode == "mean":
            equal = torch.cat([torch.full((len(idx),), 1.0 / len(idx)) for idx in self.group_indices])
            self.register_buffer("equal_weights", equal, persistent=False)

    def weights(self) -> list[Tensor]:
        """Per-group block weights (each sums to 1), detached, for logging."""
        with torch.no_grad():
            if self.mode == "last":
                return [torch.ones(1) for _ in range(self.groups)]
            return [w.detach().clone() for w in self._group_weights()]

    def _group_weights(self) -> list[Tensor]:
        """Per-group weights of `softmax` and `mean` (`last` weighs nothing)."""
        if self.logits is not None:
            return [torch.softmax(self.logits[part], dim=0) for part in self._slices]
        return [self.equal_weights[part] for part in self._slices]

    def forward(self, features: list[Tensor]) -> list[Tensor]:
        """``num_blocks`` maps of equal shape -> ``groups`` fused maps, shallow to deep."""
        if len(features) != self.num_blocks:
            raise ValueError(f"BlockFusion expects {self.num_blocks} feature maps, got {len(features)}")
        running = self.running()
        for feature in features:
            running.add(feature)
        return running.result()

    def running(self) -> RunningFusion:
        """A fusion fed one block map at a time, as the backbone computes them (see RunningFusion)."""
        return RunningFusion(self)


class RunningFusion:
    """F = sum_i w_i F_i accumulated block by block, in block order: the same sums as fusing a list of maps,
    holding one running sum per group instead of every block's map (40 giant maps of a 44-slice volume are
    11 GB in fp32). Where the fusion weights need a gradient, autograd still keeps each map it multiplies."""

    def __init__(self, fusion: BlockFusion) -> None:
        self.fusion = fusion
        self.weights = fusion._group_weights() if fusion.mode != "last" else []
        self.sums: list[Tensor | None] = [None] * fusion.groups
        self.block = 0

    def add(self, feature: Tensor) -> None:
        """The next block's (B, C, h, w) map, in the order of the tapped blocks."""
        block, fusion = self.block, self.fusion
        self.block += 1
        if fusion.mode == "last":
            if block == fusion.num_blocks - 1:
                self.sums = [feature] * fusion.groups
            return
        group, position = fusion._place[block]
        weight = self.weights[group][position].to(feature.dtype)
        term = weight * feature
        total = self.sums[group]
        # In place only without autograd (the sum is this object's own tensor); with it, a new node per block.
        in_place = total is not None and not (torch.is_grad_enabled() and term.requires_grad)
        self.sums[group] = term if total is None else (total.add_(term) if in_place else total + term)

    def result(self) -> list[Tensor]:
        """The ``groups`` fused maps, shallow to deep, once every tapped block was added."""
        if self.block != self.fusion.num_blocks:
            raise ValueError(f"BlockFusion expects {self.fusion.num_blocks} feature maps, got {self.block}")
        return list(self.sums)
