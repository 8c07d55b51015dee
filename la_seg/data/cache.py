"""Decoded, normalised volumes with their Geometry, kept so that each file is decompressed once.

Decoding a gzipped volume costs far more than a training step on one of its slices, so decoded volumes are
cached (in memory, or as .npy files on disk) and epochs after the first never decompress again.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np

from la_seg.atomic import atomic_path, atomic_write_text
from la_seg.data.io import Geometry, SliceAxis, check_slice_axis, read_case, read_image
from la_seg.data.layouts import Case
from la_seg.data.preprocess import DEFAULT_INPUT, InputSpec, normalize_intensity
from la_seg.errors import DataError

CacheMode = Literal["memory", "disk", "none"]
CACHE_MODES: tuple[str, ...] = get_args(CacheMode)
# Part of every disk cache key: bump it when normalisation or the stored format changes.
_CACHE_FORMAT = "la-seg-cache-v3"  # v3: arrays in the canonical orientation


def default_cache_dir() -> Path:
    """Folder of cache="disk" when no cache_dir is given: $XDG_CACHE_HOME/la-seg or ~/.cache/la-seg."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "la-seg"


@dataclass
class CachedCase:
    """A decoded case, slices first (Z, X', Y') along its through-plane axis in the model's orientation
    (Geometry.to_slices_last), so one slice is one contiguous read; `geometry` turns results back into the
    file's layout."""

    image: np.ndarray  # (Z, X', Y') float16, normalised to [0, 1] (normalize_intensity)
    label: np.ndarray | None  # (Z, X', Y') uint8 {0, 1}
    geometry: Geometry


class VolumeCache:
    """Decoded, normalised volumes, kept so that each file is decompressed once.

    The image is always stored as float16 (half the memory; plenty for [0, 1] intensities), whatever the mode,
    so that every mode yields identical items. `slice_axis` ("auto": from the header) picks the axis slices
    are cut across; the InputSpec's `intensity_headroom` is normalize_intensity's `headroom`, its
    `orientation` how arrays are laid out for the model (la_seg.data.io.Orientation).

    Modes:
        memory: arrays kept in this object (picklable for DataLoader workers; filled when first read).
        disk: .npy files in `cache_dir`, named by a hash of the source path, mtime and size and of the
            reading settings (a changed file is read again, never served stale), opened memory-mapped.
        none: read and normalise on every access (slow; for debugging or single passes).
    """

    def __init__(
        self,
        mode: CacheMode = "memory",
        cache_dir: str | Path | None = None,
        slice_axis: SliceAxis = "auto",
        spec: InputSpec = DEFAULT_INPUT,
    ) -> None:
        if mode not in CACHE_MODES:
            raise DataError(f"cache must be one of {', '.join(CACHE_MODES)}, got {mode!r}")
        self.mode = mode
        self.slice_axis = check_slice_axis(slice_axis)
        self.spec = spec
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        self._memory: dict[str, CachedCase] = {}

    def get(self, case: Case, with_labels: bool) -> CachedCase:
        """The case's normalised image (and label if `with_labels`; the label file is not read otherwise)."""
        if self.mode == "memory":
            key = str(case.image_path)
            entry = self._memory.get(key)
            if entry is None or (with_labels and entry.label is None):
                entry = self._memory[key] = self._decode(case, with_labels)
            return entry
        if self.mode == "disk":
            return self._get_disk(case, with_labels)
        return self._decode(case, with_labels)

    def _decode(self, case: Case, with_labels: bool) -> CachedCase:
        if with_labels:
            image, label = read_case(case, self.slice_axis, self.spec.orientation)
        else:
            image = read_image(case.image_path, case.spacing, self.slice_axis, self.spec.orientation)
            label = None
        geometry = image.geometry
        normalised = normalize_intensity(image.data, headroom=self.spec.intensity_headroom).astype(np.float16)
        return CachedCase(
            image=slices_first(normalised, geometry),
            label=slices_first(label.data, geometry) if label is not None else None,
            geometry=geometry,
        )

    def _get_disk(self, case: Case, with_labels: bool) -> CachedCase:
        image_key = _file_key(
            case.image_path,
            case.spacing,
            self.slice_axis,
            self.spec.intensity_headroom,
            self.spec.orientation,
        )
        image_file = self.cache_dir / f"{image_key}.image.npy"
        meta_file = self.cache_dir / f"{image_key}.meta.json"
        label_file = None
        if with_labels:
            label_key = _file_key(case.label_path, image_key, case.label_values)
            label_file = self.cache_dir / f"{label_key}.label.npy"
        if image_file.is_file() and meta_file.is_file() and (label_file is None or label_file.is_file()):
            try:
                return _stored_entry(image_file, label_file, meta_file)
            except (OSError, EOFError, ValueError, KeyError, TypeError) as error:  # truncated or replaced
                warnings.warn(
                    f"the disk cache {self.cache_dir} holds a damaged entry of {case.image_path} "
                    f"({type(error).__name__}: {error}); reading the file again and rebuilding it",
                    stacklevel=2,
                )
        entry = self._decode(case, with_labels)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        _save_npy(image_file, entry.image)
        if label_file is not None:
            _save_npy(label_file, entry.label)
        atomic_write_text(meta_file, json.dumps(_geometry_to_json(entry.geometry)))
        return entry


def _stored_entry(image_file: Path, label_file: Path | None, meta_file: Path) -> CachedCase:
    """A disk entry, memory-mapped, checked against its geometry: a truncated file, an object array or one of
    another shape or type (a damaged or replaced entry) raises instead of feeding wrong voxels."""
    geometry = _geometry_from_json(json.loads(meta_file.read_text()))
    x, y, z = geometry.slices_last_shape
    shape = (z, x, y)  # slices first
    arrays = []
    for path, dtype in ((image_file, np.float16), (label_file, np.uint8)):
        array = np.load(path, mmap_mode="r", allow_pickle=False) if path is not None else None
        if array is not None and (array.shape != shape or array.dtype != dtype):
            raise ValueError(f"{path.name} holds {array.dtype} {array.shape}, not {np.dtype(dtype)} {shape}")
        arrays.append(array)
    return CachedCase(image=arrays[0], label=arrays[1], geometry=geometry)


def slices_first(array: np.ndarray, geometry: Geometry) -> np.ndarray:
    """A volume in the file's axis order as contiguous slices (Z, X', Y') in the model's layout."""
    return np.ascontiguousarray(np.moveaxis(geometry.to_slices_last(array), 2, 0))


def _geometry_to_json(geometry: Geometry) -> dict[str, Any]:
    return {
        "shape": list(geometry.shape),
        "affine": geometry.affine.tolist(),
        "spacing": list(geometry.spacing),
        "source": str(geometry.source),
        "slice_axis": geometry.slice_axis,
        "spacing_source": geometry.spacing_source,
        "orientation": geometry.orientation,
    }


def _geometry_from_json(meta: dict[str, Any]) -> Geometry:
    return Geometry(
        shape=tuple(meta["shape"]),
        affine=np.asarray(meta["affine"], dtype=np.float64),
        spacing=tuple(meta["spacing"]),
        source=Path(meta["source"]),
        slice_axis=int(meta["slice_axis"]),
        spacing_source=meta["spacing_source"],
        orientation=meta["orientation"],
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
