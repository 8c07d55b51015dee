"""Datasets: resized slices for training, whole normalised volumes for evaluation and prediction.

Both cut volumes across their through-plane axis (found from the header, or `slice_axis`), read through a
VolumeCache so that each file is decompressed once.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, TypedDict, get_args

import numpy as np
import torch
from torch.utils.data import Dataset

from la_seg.data.cache import CacheMode, VolumeCache
from la_seg.data.io import Geometry, SliceAxis
from la_seg.data.layouts import Case, check_labelled
from la_seg.data.preprocess import DEFAULT_INPUT, InputSpec, SliceGrid, labels_to_input, slices_to_input
from la_seg.errors import DataError

if TYPE_CHECKING:
    import albumentations as A


# How training slices are drawn: every kept slice once per epoch, or every case equally often.
Sampling = Literal["slices", "cases"]
SAMPLINGS: tuple[str, ...] = get_args(Sampling)


class SliceDataset(Dataset):
    """Slices of the training cases across their through-plane axis, resized to the model input.

    All slices that contain LA are used; of the slices without LA, a fraction `empty_slice_fraction` is kept,
    drawn once from `seed` (so the choice is identical on every DDP rank and every run). Items go through the
    same slices_to_input / labels_to_input as evaluation (on a random S x S window of the `spec`'s grid, the
    whole slice when it fits), then the optional
    albumentations `transform` on the (S, S, 3) float32 image and (S, S) uint8 mask; the image is clamped back
    to [0, 1] afterwards. `spec`: the model's input (la_seg.data.preprocess.InputSpec), which also says how
    volumes are normalised and laid out (see VolumeCache).

    Item: {"image": float32 (3, S, S) in [0, 1], "label": float32 (1, S, S) in {0, 1}}.
    `index`, when given, is the kept slices chosen elsewhere (over more cases: DDP, see la_seg.data.shards);
    the cases are then decoded without choosing again.

    Attributes: `index`, an (N, 2) int array of (case position, slice) pairs, and `num_foreground` /
    `num_background`, the kept slices with and without LA.
    """

    def __init__(
        self,
        cases: Sequence[Case],
        spec: InputSpec,
        transform: A.Compose | None = None,
        empty_slice_fraction: float = 1.0,
        seed: int = 0,
        cache: CacheMode = "memory",
        cache_dir: str | Path | None = None,
        slice_axis: SliceAxis = "auto",
        index: SliceIndex | None = None,
    ) -> None:
        self.cases = list(cases)
        if not self.cases:
            raise DataError("SliceDataset needs at least one case")
        self.spec = spec
        check_labelled(self.cases)
        if not 0.0 <= empty_slice_fraction <= 1.0:
            raise DataError(f"empty_slice_fraction must be in [0, 1], got {empty_slice_fraction}")
        self.transform = transform
        self.cache = VolumeCache(cache, cache_dir, slice_axis, spec)
        self._seeded_pid: int | None = None
        if index is None:
            has_la = [slices_with_la(self.cache.get(case, with_labels=True).label) for case in self.cases]
            index = kept_slices(has_la, empty_slice_fraction, seed)
        else:  # chosen over every training case elsewhere (DDP: la_seg.data.shards)
            if len(index.pairs) and not 0 <= index.pairs[:, 0].min() <= index.pairs[:, 0].max() < len(cases):
                raise DataError("the SliceDataset index names a case position outside its cases")
            if self.cache.mode != "none":  # decode (and keep) the cases now, once, as without an index
                for case in self.cases:
                    self.cache.get(case, with_labels=True)
        self.index = index.pairs
        self.num_foreground = int(index.foreground.sum())
        self.num_background = len(index.pairs) - self.num_foreground
        if len(self.index) == 0:
            raise DataError("SliceDataset has no slices: no slice contains LA and empty_slice_fraction is 0")

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        position, z = (int(v) for v in self.index[i])
        entry = self.cache.get(self.cases[position], with_labels=True)
        depth = entry.image.shape[0]
        context = self.spec.slice_context
        lo, hi = (max(z - 1, 0), min(z + 2, depth)) if context else (z, z + 1)
        # Only the needed slices are read; edge replication within them equals that of the full volume.
        image = torch.from_numpy(np.asarray(entry.image[lo:hi], dtype=np.float32)).permute(1, 2, 0)
        label = torch.from_numpy(np.array(entry.label[z : z + 1])).permute(1, 2, 0)
        size = self.spec.img_size
        grid = random_window(self.spec.volume_grid(entry.geometry), size)
        x = slices_to_input(image, size, context, slice(z - lo, z - lo + 1), grid)[0]
        y = labels_to_input(label, size, grid=grid)[0]
        if self.transform is None:
            return {"image": x, "label": y}
        self._seed_transform()
        out = self.transform(
            image=np.ascontiguousarray(x.permute(1, 2, 0).numpy()), mask=y[0].to(torch.uint8).numpy()
        )
        image_out = torch.from_numpy(np.ascontiguousarray(out["image"])).permute(2, 0, 1).clamp(0.0, 1.0)
        label_out = torch.from_numpy(np.ascontiguousarray(out["mask"])).float()[None]
        return {"image": image_out.contiguous(), "label": label_out}

    def _seed_transform(self) -> None:
        """Seed the transform once per process from torch's seed.

        albumentations draws from its own generator, created when the transform was built; forked DataLoader
        workers would all inherit the same state and augment identically. torch's per-worker seed (rank-aware
        under Lightning's seed_everything(workers=True)) makes them differ and runs reproducible.
        """
        if self._seeded_pid != os.getpid():
            self.transform.set_random_seed(torch.initial_seed() % 2**32)
            self._seeded_pid = os.getpid()


def random_window(grid: SliceGrid, side: int) -> SliceGrid:
    """A `side` x `side` window of `grid`'s plane at a place drawn from torch's generator (seeded per
    DataLoader worker): a slice wider than the model input is trained on all of it, a window at a time, as
    inference covers it with windows (la_seg.inference). A slice that fits is its own window: no draw."""
    if grid.plane == (side, side):
        return grid
    origin = [int(torch.randint(0, extent - side + 1, ())) for extent in grid.plane]
    return grid.window(origin, side)


@dataclass(frozen=True)
class SliceIndex:
    """Kept training slices: `pairs` (N, 2) int64 (case position, slice), sorted; `foreground` (N,) bool, LA
    in the slice."""

    pairs: np.ndarray
    foreground: np.ndarray

    def slices_per_case(self, cases: int) -> np.ndarray:
        return np.bincount(self.pairs[:, 0], minlength=cases)

    def case_loads(self, cases: int, sampling: Sampling) -> np.ndarray:
        """Per case, its share of the draws (what DDP ranks are balanced by): its kept slices for "slices",
        1 (0 without kept slices) for "cases"."""
        slices = self.slices_per_case(cases)
        return slices if sampling == "slices" else (slices > 0).astype(np.int64)

    def of_cases(self, positions: Sequence[int]) -> SliceIndex:
        """The slices of the cases at `positions`, renumbered 0, 1, ... in that order."""
        positions = np.asarray(positions, dtype=np.int64)
        new = np.full(max(int(self.pairs[:, 0].max(initial=-1)), int(positions.max(initial=-1))) + 1, -1)
        new[positions] = np.arange(len(positions))
        rows = np.flatnonzero(np.isin(self.pairs[:, 0], positions))
        pairs = np.stack([new[self.pairs[rows, 0]], self.pairs[rows, 1]], axis=1)
        order = np.lexsort((pairs[:, 1], pairs[:, 0]))
        return SliceIndex(pairs[order].reshape(-1, 2), self.foreground[rows][order])


def draw_weights(pairs: np.ndarray, sampling: Sampling) -> np.ndarray | None:
    """Per kept slice ((case position, slice) `pairs`), its share of an epoch's draws: None for "slices" (each
    slice once); for "cases" 1 / its case's slices, so that every case is drawn equally often."""
    if sampling == "slices":
        return None
    counts = np.bincount(pairs[:, 0])
    return 1.0 / counts[pairs[:, 0]]


def slices_with_la(label: np.ndarray) -> np.ndarray:
    """Per slice of a slices-first label, whether it holds LA."""
    return np.asarray(label).reshape(label.shape[0], -1).any(axis=1)


def kept_slices(has_la: Sequence[np.ndarray], empty_slice_fraction: float, seed: int) -> SliceIndex:
    """Every slice with LA, and a fraction of those without drawn once from `seed`, of the cases whose
    per-slice LA flags are `has_la`."""
    foreground, background = [], []
    for position, flags in enumerate(has_la):
        foreground += [(position, z) for z in np.flatnonzero(flags)]
        background += [(position, z) for z in np.flatnonzero(~np.asarray(flags))]
    keep = round(empty_slice_fraction * len(background))
    chosen = np.random.default_rng(seed).choice(len(background), size=keep, replace=False)
    marked = sorted([(*pair, True) for pair in foreground] + [(*background[j], False) for j in chosen])
    table = np.asarray(marked, dtype=np.int64).reshape(-1, 3)
    return SliceIndex(table[:, :2].copy(), table[:, 2].astype(bool))


class VolumeItem(TypedDict, total=False):
    """One evaluation or prediction case as VolumeDataset yields it; arrays slices last."""

    case_id: str
    image: torch.Tensor  # float32 (X', Y', Z') in [0, 1]
    label: torch.Tensor  # uint8 {0, 1}, same layout (only with labels)
    geometry: Geometry


class VolumeDataset(Dataset):
    """One VolumeItem per case: the normalised full volume, slices last, with its Geometry (the module resizes
    on device and `geometry.from_slices_last` puts results back in the file's layout). With
    `with_labels=False` (prediction) label files are never read. `spec`: the input whose normalisation and
    orientation the volumes get (see VolumeCache); resizing happens later, on the device.
    """

    def __init__(
        self,
        cases: Sequence[Case],
        spec: InputSpec = DEFAULT_INPUT,
        with_labels: bool = True,
        cache: CacheMode = "memory",
        cache_dir: str | Path | None = None,
        slice_axis: SliceAxis = "auto",
    ) -> None:
        self.cases = list(cases)
        self.with_labels = with_labels
        if with_labels:
            check_labelled(self.cases)
        self.cache = VolumeCache(cache, cache_dir, slice_axis, spec)

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, i: int) -> VolumeItem:
        case = self.cases[i]
        entry = self.cache.get(case, self.with_labels)
        self.cache.spec.volume_grid(entry.geometry)  # the module resizes, but only here is the file known
        image = torch.from_numpy(np.asarray(entry.image, dtype=np.float32)).permute(1, 2, 0).contiguous()
        item = VolumeItem(case_id=case.case_id, image=image, geometry=entry.geometry)
        if self.with_labels:
            item["label"] = torch.from_numpy(np.array(entry.label)).permute(1, 2, 0).contiguous()
        return item


def first_item(batch: list) -> dict:
    """Collate for evaluation loaders (batch_size=1): the one item, unbatched, as volumes differ in shape."""
    if len(batch) != 1:
        raise ValueError(
            f"first_item collates batches of exactly one item, got {len(batch)}; use batch_size=1"
        )
    return batch[0]
