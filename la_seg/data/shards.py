"""Training cases sharded across DDP ranks, so that each rank decodes and keeps its own cases only.

Without this every rank would build its SliceDataset over every training case, and Lightning's
DistributedSampler would draw slices of every case on every rank: N processes, N times the host memory of the
decoded volumes. Instead the kept slices are chosen once over every training case (exactly the slices one
process trains on: rank 0 reads the label files only, and hands the choice to every rank), the cases are dealt
to the ranks balanced by their share of the draws (`assign_cases`: their kept slices, or one each with
data.sampling "cases"), and each rank's `TrainShards` sampler draws its own cases' slices, the same number on
every rank (DDP steps in lockstep).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Dataset
from torch.utils.data.distributed import DistributedSampler

from la_seg.data.cache import slices_first
from la_seg.data.datasets import SliceIndex, kept_slices, slices_with_la
from la_seg.data.io import Orientation, SliceAxis, read_label
from la_seg.data.layouts import Case
from la_seg.errors import DataError


def label_slices_with_la(case: Case, slice_axis: SliceAxis, orientation: Orientation) -> np.ndarray:
    """Per slice of the case (in the model's layout, as the cache holds it), whether it holds LA, from its
    label file alone (the image is not decoded)."""
    label = read_label(case.label_path, case.spacing, slice_axis, case.label_values, orientation)
    return slices_with_la(slices_first(label.data, label.geometry))


def plan_training_slices(
    cases: Sequence[Case],
    world_size: int,
    empty_slice_fraction: float,
    seed: int,
    slice_axis: SliceAxis,
    orientation: Orientation,
) -> SliceIndex:
    """The kept slices of every training case (what one process trains on); refuses fewer cases than ranks."""
    if len(cases) < world_size:
        raise DataError(
            f"{len(cases)} training case{'s' if len(cases) != 1 else ''} for {world_size} DDP processes: "
            f"each process trains on cases of its own, so training needs at least {world_size} cases (more "
            "training cases in data.split / data.split_file, or fewer trainer.devices x trainer.num_nodes)"
        )
    has_la = [label_slices_with_la(case, slice_axis, orientation) for case in cases]
    index = kept_slices(has_la, empty_slice_fraction, seed)
    with_slices = int(np.count_nonzero(index.slices_per_case(len(cases))))
    if with_slices < world_size:
        raise DataError(
            f"{with_slices} of the {len(cases)} training cases have slices to train on (LA, or "
            f"data.empty_slice_fraction > 0) for {world_size} DDP processes: each process trains on cases of "
            f"its own, so at least {world_size} are needed"
        )
    return index


def assign_cases(weights: Sequence[int], world_size: int) -> list[list[int]]:
    """Case positions per rank, balanced by `weights` (SliceIndex.case_loads): largest case first, each to the
    rank with the least load so far (then the fewest cases, then the lowest rank). Deterministic: the same on
    every rank. Each rank's positions are sorted."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    order = sorted(range(len(weights)), key=lambda i: (-weights[i], i))
    shards: list[list[int]] = [[] for _ in range(world_size)]
    loads = [0] * world_size
    for position in order:
        rank = min(range(world_size), key=lambda r: (loads[r], len(shards[r]), r))
        shards[rank].append(position)
        loads[rank] += weights[position]
    return [sorted(shard) for shard in shards]


def samples_per_rank(total: int, world_size: int) -> int:
    """Slices each rank draws per epoch: ceil(total / world_size), as Lightning's DistributedSampler."""
    return math.ceil(total / world_size)


class TrainShards(DistributedSampler):
    """Rank `rank`'s training sampler over its own SliceDataset: `num_samples` indices per epoch, drawn afresh
    every epoch (`set_epoch`, called by Lightning) so that every rank runs the same number of steps. Without
    `weights` each epoch is a permutation, whole permutations repeated when the shard is smaller and cut when
    larger; with `weights` (per item, e.g. datasets.draw_weights) items are drawn with replacement in
    proportion to them. Being a DistributedSampler, it is kept by Lightning; one process uses it with
    num_replicas=1 for weighted draws."""

    def __init__(
        self,
        dataset: Dataset,
        num_samples: int,
        num_replicas: int,
        rank: int,
        seed: int,
        weights: np.ndarray | None = None,
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        if len(dataset) == 0:
            raise DataError(f"DDP rank {rank} holds no training slices")
        if weights is not None and (len(weights) != len(dataset) or not np.all(np.asarray(weights) > 0)):
            raise ValueError(f"weights must be {len(dataset)} positive numbers, one per item")
        self.weights = None if weights is None else np.asarray(weights, dtype=np.float64) / np.sum(weights)
        self.num_samples = num_samples
        self.total_size = num_samples * num_replicas

    def __iter__(self) -> Iterator[int]:
        rng = np.random.default_rng([self.seed, self.epoch, self.rank])
        size = len(self.dataset)
        if self.weights is not None:
            return iter(rng.choice(size, size=self.num_samples, p=self.weights).tolist())
        rounds = -(-self.num_samples // size)
        order = np.concatenate([rng.permutation(size) for _ in range(rounds)])[: self.num_samples]
        return iter(order.tolist())

    def __len__(self) -> int:
        return self.num_samples
