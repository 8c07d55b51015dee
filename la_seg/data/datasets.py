"""Datasets: resized axial slices for training, whole normalised volumes for evaluation and prediction.

Decoding a gzipped volume costs far more than a training step on one of its slices, so decoded, normalised
volumes are cached (in memory, or as .npy files on disk) and epochs after the first never decompress again.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

import numpy as np
import torch
from torch.utils.data import Dataset

from la_seg.atomic import atomic_path, atomic_write_text
from la_seg.data.io import Geometry, read_case, read_image
from la_seg.data.layouts import Case
from la_seg.data.preprocess import check_img_size, labels_to_input, normalize_intensity, slices_to_input
from la_seg.errors import DataError

if TYPE_CHECKING:
    import albumentations as A

CACHE_MODES = ("memory", "disk", "none")
# Part of every disk cache key: bump it when normalisation or the stored format changes.
_CACHE_FORMAT = "la-seg-cache-v1"


def default_cache_dir() -> Path:
    """Folder of cache="disk" when no cache_dir is given: $XDG_CACHE_HOME/la-seg or ~/.cache/la-seg."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "la-seg"


@dataclass
class CachedCase:
    """A decoded case. Arrays are slices-first (Z, X, Y) so that reading one slice is one contiguous read."""

    image: np.ndarray  # (Z, X, Y) float16, normalised to [0, 1]
    label: np.ndarray | None  # (Z, X, Y) uint8 {0, 1}
    affine: np.ndarray  # (4, 4) float64
    spacing: tuple[float, float, float]


class VolumeCache:
    """Decoded, normalised volumes, kept so that each file is decompressed once.

    The image is always stored as float16 (half the memory; plenty for [0, 1] intensities), whatever the mode,
    so that every mode yields identical items.

    Modes:
        memory: arrays kept in this object (picklable for DataLoader workers; filled when first read).
        disk: .npy files in `cache_dir`, named by a hash of the source path, mtime and size (a changed file is
            read again, never served stale) and opened memory-mapped.
        none: read and normalise on every access (slow; for debugging or single passes).
    """

    def __init__(self, mode: str = "memory", cache_dir: str | Path | None = None) -> None:
        if mode not in CACHE_MODES:
            raise DataError(f"cache must be one of {', '.join(CACHE_MODES)}, got {mode!r}")
        self.mode = mode
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        self._memory: dict[str, CachedCase] = {}

    def get(self, case: Case, with_labels: bool) -> CachedCase:
        """The case's normalised image (and label if `with_labels`; the label file is not read otherwise)."""
        if with_labels and case.label_path is None:
            raise DataError(f"case {case.case_id} ({case.image_path}) has no label, but labels are required")
        if self.mode == "memory":
            key = str(case.image_path)
            entry = self._memory.get(key)
            if entry is None or (with_labels and entry.label is None):
                entry = self._memory[key] = _decode(case, with_labels)
            return entry
        if self.mode == "disk":
            return self._get_disk(case, with_labels)
        return _decode(case, with_labels)

    def _get_disk(self, case: Case, with_labels: bool) -> CachedCase:
        image_key = _file_key(case.image_path, case.spacing)
        image_file = self.cache_dir / f"{image_key}.image.npy"
        meta_file = self.cache_dir / f"{image_key}.meta.json"
        label_file = (
            self.cache_dir / f"{_file_key(case.label_path, image_key)}.label.npy" if with_labels else None
        )
        if image_file.is_file() and meta_file.is_file() and (label_file is None or label_file.is_file()):
            meta = json.loads(meta_file.read_text())
            return CachedCase(
                image=np.load(image_file, mmap_mode="r"),
                label=np.load(label_file, mmap_mode="r") if label_file is not None else None,
                affine=np.asarray(meta["affine"], dtype=np.float64),
                spacing=tuple(meta["spacing"]),
            )
        entry = _decode(case, with_labels)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        _save_npy(image_file, entry.image)
        if label_file is not None:
            _save_npy(label_file, entry.label)
        meta = {"image_path": str(case.image_path), "affine": entry.affine.tolist(), "spacing": entry.spacing}
        atomic_write_text(meta_file, json.dumps(meta))
        return entry


def _decode(case: Case, with_labels: bool) -> CachedCase:
    if with_labels:
        image, label = read_case(case)
    else:
        image, label = read_image(case.image_path, case.spacing), None
    normalised = normalize_intensity(image.data).astype(np.float16)
    return CachedCase(
        image=np.ascontiguousarray(normalised.transpose(2, 0, 1)),
        label=np.ascontiguousarray(label.data.transpose(2, 0, 1)) if label is not None else None,
        affine=np.asarray(image.affine, dtype=np.float64),
        spacing=tuple(float(s) for s in image.spacing),
    )


def _file_key(path: Path, *extra: Any) -> str:
    """Hash of a file's identity and version (resolved path, mtime, size) plus what the entry depends on."""
    path = Path(path)
    stat = path.stat()
    text = json.dumps([_CACHE_FORMAT, str(path.resolve()), stat.st_mtime_ns, stat.st_size, *extra])
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _save_npy(path: Path, array: np.ndarray) -> None:
    """Concurrent ranks and workers must never read half a cache file: write it atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.save(handle, array, allow_pickle=False)


class SliceDataset(Dataset):
    """Axial slices of the training cases, resized to the model input.

    All slices that contain LA are used; of the slices without LA, a fraction `empty_slice_fraction` is kept,
    drawn once from `seed` (so the choice is identical on every DDP rank and every run). Items go through the
    same slices_to_input / labels_to_input as evaluation, then the optional albumentations `transform` on the
    (S, S, 3) float32 image and (S, S) uint8 mask; the image is clamped back to [0, 1] afterwards.

    Item: {"image": float32 (3, S, S) in [0, 1], "label": float32 (1, S, S) in {0, 1}}.
    Attributes: `index`, an (N, 2) int array of (case position, slice) pairs, and `num_foreground` /
    `num_background`, the kept slices with and without LA.
    """

    def __init__(
        self,
        cases: Sequence[Case],
        img_size: int,
        slice_context: bool = False,
        transform: A.Compose | None = None,
        empty_slice_fraction: float = 1.0,
        seed: int = 0,
        cache: str = "memory",
        cache_dir: str | Path | None = None,
    ) -> None:
        self.cases = list(cases)
        if not self.cases:
            raise DataError("SliceDataset needs at least one case")
        if not 0.0 <= empty_slice_fraction <= 1.0:
            raise DataError(f"empty_slice_fraction must be in [0, 1], got {empty_slice_fraction}")
        self.img_size = check_img_size(img_size)
        self.slice_context = slice_context
        self.transform = transform
        self.cache = VolumeCache(cache, cache_dir)
        self._seeded_pid: int | None = None
        foreground, background = [], []
        for position, case in enumerate(self.cases):
            label = self.cache.get(case, with_labels=True).label
            has_la = np.asarray(label).reshape(label.shape[0], -1).any(axis=1)
            foreground += [(position, z) for z in np.flatnonzero(has_la)]
            background += [(position, z) for z in np.flatnonzero(~has_la)]
        keep = round(empty_slice_fraction * len(background))
        chosen = np.random.default_rng(seed).choice(len(background), size=keep, replace=False)
        pairs = sorted(foreground + [background[j] for j in chosen])
        self.index = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
        self.num_foreground, self.num_background = len(foreground), keep
        if len(self.index) == 0:
            raise DataError("SliceDataset has no slices: no slice contains LA and empty_slice_fraction is 0")

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        position, z = (int(v) for v in self.index[i])
        entry = self.cache.get(self.cases[position], with_labels=True)
        depth = entry.image.shape[0]
        lo, hi = (max(z - 1, 0), min(z + 2, depth)) if self.slice_context else (z, z + 1)
        # Only the needed slices are read; edge replication within them equals that of the full volume.
        image = torch.from_numpy(np.asarray(entry.image[lo:hi], dtype=np.float32)).permute(1, 2, 0)
        label = torch.from_numpy(np.array(entry.label[z : z + 1])).permute(1, 2, 0)
        x = slices_to_input(image, self.img_size, self.slice_context, index=slice(z - lo, z - lo + 1))[0]
        y = labels_to_input(label, self.img_size)[0]
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


class VolumeItem(TypedDict, total=False):
    """One evaluation or prediction case as VolumeDataset yields it; arrays slices last."""

    case_id: str
    image: torch.Tensor  # float32 (X', Y', Z') in [0, 1]
    label: torch.Tensor  # uint8 {0, 1}, same layout (only with labels)
    geometry: Geometry


class VolumeDataset(Dataset):
    """One item per case: the normalised full volume in its original geometry (the module resizes on device).

    Item: {"case_id": str, "image": float32 (X, Y, Z) in [0, 1], "label": uint8 (X, Y, Z) (only with_labels),
    "spacing": (sx, sy, sz) mm, "affine": (4, 4) float64, "image_path": str}. With `with_labels=False`
    (prediction) label files are never read.
    """

    def __init__(
        self,
        cases: Sequence[Case],
        with_labels: bool = True,
        cache: str = "memory",
        cache_dir: str | Path | None = None,
    ) -> None:
        self.cases = list(cases)
        self.with_labels = with_labels
        if with_labels:
            unlabelled = [case.case_id for case in self.cases if case.label_path is None]
            if unlabelled:
                raise DataError(f"labels are required but cases {unlabelled} have none")
        self.cache = VolumeCache(cache, cache_dir)

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, i: int) -> dict[str, Any]:
        case = self.cases[i]
        entry = self.cache.get(case, self.with_labels)
        item: dict[str, Any] = {
            "case_id": case.case_id,
            "image": torch.from_numpy(np.asarray(entry.image, dtype=np.float32))
            .permute(1, 2, 0)
            .contiguous(),
            "spacing": tuple(entry.spacing),
            "affine": np.array(entry.affine, dtype=np.float64),
            "image_path": str(case.image_path),
        }
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
