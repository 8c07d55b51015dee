"""Read and write volumes, keeping the geometry that metrics in mm and written masks depend on.

Arrays are (X, Y, Z) as nibabel returns them, axial slices on the last axis. NRRD files (Utah 2018) are read
with pynrrd and given a NIfTI-style RAS affine, so everything downstream sees one convention.
"""

from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import nibabel as nib
import nrrd
import numpy as np
from nibabel.filebasedimages import ImageFileError

from la_seg.atomic import atomic_path
from la_seg.errors import DataError

if TYPE_CHECKING:
    from la_seg.data.layouts import Case

ArrayT = TypeVar("ArrayT")
NRRD_EXTENSIONS = (".nrrd", ".nhdr")
AFFINE_TOLERANCE_MM = 1e-3
_READ_ERRORS = (OSError, EOFError, zlib.error, ImageFileError, nrrd.NRRDError, ValueError, TypeError)
# NRRD space axis names and their sign in RAS; LPS data (the ITK default) flips x and y.
_RAS_SIGN = {"left": -1, "right": 1, "posterior": -1, "anterior": 1, "inferior": -1, "superior": 1}
_RAS_LETTER = {"L": "left", "R": "right", "P": "posterior", "A": "anterior", "I": "inferior", "S": "superior"}


@dataclass(frozen=True, eq=False)
class Geometry:
    """Where a volume's voxels lie and how it is cut into slices; every stage passes it on unchanged.

    `affine` is the file's own, so a written mask overlays its image in any viewer; `spacing` is the one used
    for mm and mL figures (it can differ from the header's, as for Utah 2018). The model sees volumes with
    the through-plane `slice_axis` moved last ("slices last"); `to_slices_last` / `from_slices_last` convert
    arrays (numpy or torch) between that layout and the file's.
    """

    shape: tuple[int, int, int]  # the file's array shape
    affine: np.ndarray  # (4, 4) float64, voxel index -> world mm (RAS), as in the file
    spacing: tuple[float, float, float]  # mm per voxel along the file's array axes
    source: Path
    slice_axis: int = 2  # the through-plane axis of the file's array

    @property
    def slices_last_spacing(self) -> tuple[float, float, float]:
        """`spacing` in the slices-last layout."""
        order = [a for a in range(3) if a != self.slice_axis] + [self.slice_axis]
        return tuple(self.spacing[a] for a in order)  # type: ignore[return-value]

    def to_slices_last(self, array: ArrayT) -> ArrayT:
        return _moveaxis(array, self.slice_axis, 2)

    def from_slices_last(self, array: ArrayT) -> ArrayT:
        return _moveaxis(array, 2, self.slice_axis)


def _moveaxis(array, source: int, target: int):
    if source == target:
        return array
    if isinstance(array, np.ndarray):
        return np.moveaxis(array, source, target)
    return array.movedim(source, target)  # torch.Tensor


@dataclass(eq=False)
class Volume:
    """A 3D array with the geometry needed to measure in mm and to write results back in place."""

    data: np.ndarray  # (X, Y, Z)
    affine: np.ndarray  # (4, 4) float64, voxel index -> world mm (RAS)
    spacing: tuple[float, float, float]  # mm per voxel along X, Y, Z
    path: Path


def read_image(path: str | Path, spacing: tuple[float, float, float] | None = None) -> Volume:
    """Read an image as float32 (NaN kept: normalisation deals with it); `spacing` overrides the header."""
    volume = _read(Path(path), spacing)
    volume.data = np.asarray(volume.data, dtype=np.float32)
    return volume


def read_label(path: str | Path, spacing: tuple[float, float, float] | None = None) -> Volume:
    """Read a label binarised to uint8 {0, 1}: LAScarQS marks the LA with 420, Utah with 255, MSD with 1."""
    volume = _read(Path(path), spacing)
    volume.data = (volume.data > 0).astype(np.uint8)
    return volume


def read_case(case: Case) -> tuple[Volume, Volume | None]:
    """Read a case's image and label, refusing pairs whose voxel grids disagree."""
    image = read_image(case.image_path, case.spacing)
    if case.label_path is None:
        return image, None
    label = read_label(case.label_path, case.spacing)
    if image.data.shape != label.data.shape:
        raise DataError(
            f"image {image.path} has shape {image.data.shape} "
            f"but label {label.path} has shape {label.data.shape}"
        )
    if not np.allclose(image.affine, label.affine, rtol=0.0, atol=AFFINE_TOLERANCE_MM):
        raise DataError(
            f"image {image.path} and label {label.path} have different affines "
            f"(tolerance {AFFINE_TOLERANCE_MM} mm):\n{image.affine}\nvs\n{label.affine}"
        )
    return image, label


def write_nifti(path: str | Path, data: np.ndarray, reference: Volume | Geometry) -> None:
    """Write `data` as NIfTI on the reference's voxel grid (a Volume's or a Geometry's), atomically and
    byte-reproducibly.

    A temp file in the target folder is renamed over the target, so readers never see half a file; gzip
    is written with mtime 0 so equal data gives equal bytes.
    """
    path = Path(path)
    if not path.name.lower().endswith((".nii", ".nii.gz")):
        raise DataError(f"write_nifti writes NIfTI; the output name must end with .nii or .nii.gz: {path}")
    source, grid = (
        (reference.source, tuple(reference.shape))
        if isinstance(reference, Geometry)
        else (reference.path, reference.data.shape)
    )
    if path.exists() and path.resolve() == Path(source).resolve():
        raise DataError(f"refusing to overwrite the input volume {path}")
    data = np.asarray(data)
    if data.shape[:3] != grid:
        raise DataError(
            f"cannot write {path}: data shape {data.shape} does not match the reference grid {grid} "
            f"of {source}"
        )
    if data.dtype == bool:
        data = data.astype(np.uint8)  # NIfTI has no boolean type
    affine = np.asarray(reference.affine, dtype=np.float64)
    image = nib.Nifti1Image(data, affine, dtype=data.dtype)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    payload = image.to_bytes()
    compress = path.name.lower().endswith(".gz")
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        if compress:
            with gzip.GzipFile(filename="", mode="wb", fileobj=handle, compresslevel=6, mtime=0) as gz:
                gz.write(payload)
        else:
            handle.write(payload)


def _read(path: Path, spacing: tuple[float, float, float] | None) -> Volume:
    """Load a 3D volume with its affine and spacing, turning every library failure into a DataError."""
    if not path.is_file():
        raise DataError(f"volume file does not exist: {path}")
    is_nrrd = path.name.lower().endswith(NRRD_EXTENSIONS)
    try:
        data, affine, header_spacing = _load_nrrd(path) if is_nrrd else _load_nibabel(path)
    except DataError:
        raise
    except _READ_ERRORS as error:
        reason = f"{type(error).__name__}: {error}"
        raise DataError(f"cannot read {path} (corrupt or truncated?): {reason}") from error
    data = _as_3d(data, path)
    if spacing is None:
        return Volume(data, affine, header_spacing, path)
    spacing = _check_spacing(spacing, path)
    return Volume(data, _rescale_affine(affine, spacing), spacing, path)


def _load_nibabel(path: Path) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    image = nib.load(path)
    _check_shape(image.shape, path)  # before the read: a 4D series can be large
    data = np.asanyarray(image.dataobj)  # forces the read here, so truncation surfaces inside the try
    zooms = tuple(float(z) for z in image.header.get_zooms()[:3])
    return data, np.asarray(image.affine, dtype=np.float64), zooms


def _load_nrrd(path: Path) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    data, header = nrrd.read(str(path))  # Fortran index order: axes come out (X, Y, Z) like nibabel
    _check_shape(data.shape, path)
    affine = np.eye(4)
    directions = header.get("space directions")
    spatial = None
    if directions is not None:
        rows = np.asarray([np.full(3, np.nan) if d is None else d for d in directions], dtype=np.float64)
        if rows.ndim == 2 and rows.shape[1] == 3:
            rows = rows[np.isfinite(rows).all(axis=1)]  # drop 'none' rows of non-spatial axes
            spatial = rows if len(rows) == 3 else None
    if spatial is not None:
        affine[:3, :3] = spatial.T  # each row is the world step of one array axis
        origin = header.get("space origin")
        if origin is not None and np.isfinite(np.asarray(origin, dtype=np.float64)).all():
            affine[:3, 3] = np.asarray(origin, dtype=np.float64)
        sign = _ras_sign(header.get("space"))
        affine[:3] *= sign[:, None]
    else:
        spacings = np.asarray(header.get("spacings", [1.0, 1.0, 1.0]), dtype=np.float64)[:3]
        spacings = np.where(np.isfinite(spacings) & (spacings > 0), spacings, 1.0)
        affine[:3, :3] = np.diag(spacings)
    zooms = tuple(float(z) for z in np.linalg.norm(affine[:3, :3], axis=0))
    return data, affine, zooms


def _ras_sign(space: str | None) -> np.ndarray:
    """Per-axis sign that turns an NRRD world space (e.g. left-posterior-superior) into RAS."""
    if not space:
        return np.ones(3)
    names = space.lower().split("-")
    if len(names) != 3 and len(space) == 3:
        names = [_RAS_LETTER.get(letter, "") for letter in space.upper()]
    if len(names) != 3 or not all(name in _RAS_SIGN for name in names):
        return np.ones(3)  # scanner-xyz and friends: no anatomical frame to convert
    return np.array([_RAS_SIGN[name] for name in names])


def _check_shape(shape: tuple[int, ...], path: Path) -> None:
    """Accept (X, Y, Z) and (X, Y, Z, 1, ...); refuse 2D slices and real 4D series."""
    spatial = list(shape)
    while len(spatial) > 3 and spatial[-1] == 1:
        spatial.pop()
    if len(spatial) != 3:
        kind = f"{len(shape)}D" if len(spatial) < 3 else f"{len(shape)}D with more than one volume"
        raise DataError(f"{path} is {kind} (shape {tuple(shape)}); expected one 3D volume (X, Y, Z)")


def _as_3d(data: np.ndarray, path: Path) -> np.ndarray:
    _check_shape(data.shape, path)
    return np.asarray(data).reshape(data.shape[:3])


def _check_spacing(spacing, path: Path) -> tuple[float, float, float]:
    values = tuple(float(s) for s in spacing)
    if len(values) != 3 or not all(np.isfinite(v) and v > 0 for v in values):
        raise DataError(f"spacing override for {path} must be three positive numbers, got {spacing!r}")
    return values


def _rescale_affine(affine: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
    """Scale the affine's columns to the override spacing, keeping direction and origin, as metrics use it."""
    affine = affine.copy()
    for axis, step in enumerate(spacing):
        norm = np.linalg.norm(affine[:3, axis])
        if norm > 0:
            affine[:3, axis] *= step / norm
        else:
            affine[:3, axis] = 0.0
            affine[axis, axis] = step
    return affine
