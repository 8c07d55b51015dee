"""Read and write volumes, keeping the geometry that metrics in mm and written masks depend on.

Arrays keep the file's axis order (X, Y, Z as nibabel returns them); each Volume carries its `Geometry`, which
turns arrays into the model's "slices last" layout and back. That layout is the volume brought to one
canonical orientation (RAS: nibabel's closest canonical axes, by axis permutations and flips only, never a
resampling), with its through-plane axis last: the same patient stored RAS, LPS or with swapped axes looks the
same to the model, and every output goes back to the file's own array order and affine. NRRD files (Utah 2018)
are read with pynrrd and given a NIfTI-style RAS affine, so everything downstream sees one convention. Headers
are checked before any voxel is read, so a bad file fails fast and names itself.
"""

from __future__ import annotations

import gzip
import logging
import math
import warnings
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, TypeVar

import nibabel as nib
import nrrd
import numpy as np
import psutil
from nibabel.filebasedimages import ImageFileError
from nibabel.openers import ImageOpener
from nibabel.orientations import axcodes2ornt, io_orientation

from la_seg.atomic import atomic_path, refuse_writing_into_inputs
from la_seg.errors import DataError

if TYPE_CHECKING:
    from la_seg.data.layouts import Case

ArrayT = TypeVar("ArrayT")
SliceAxis = Literal["auto", 0, 1, 2]
# How arrays are laid out for the model: "RAS", brought to nibabel's closest canonical (RAS) orientation;
# "array", the file's own axis order with only the slice axis moved last (checkpoints from before "RAS").
Orientation = Literal["RAS", "array"]
ORIENTATIONS: tuple[str, ...] = ("RAS", "array")
OBLIQUE_WARNING_DEGREES = 30.0  # an axis further than this from every canonical axis gets a warning
NRRD_EXTENSIONS = (".nrrd", ".nhdr")
AFFINE_TOLERANCE_MM = 1e-3
ISOTROPY_TOLERANCE = 0.01  # spacings within 1 % of the largest count as equally coarse
# Utah 2018 LA challenge files: headers say 1 mm or hold no spacing; the acquisition is 0.625 mm isotropic.
UTAH_FILE_NAMES = ("lgemri.nrrd", "laendo.nrrd")
UTAH_SPACING = (0.625, 0.625, 0.625)
UTAH_SPACING_SOURCE = "utah2018: header says 1 mm or nothing, true 0.625 mm"
SPACING_OPTION = "data.spacing"  # the spacing given for files whose header lacks one (recorded as its source)
LOGGER = logging.getLogger("la_seg")
_READ_ERRORS = (
    OSError,  # includes gzip.BadGzipFile (CRC, length)
    StopIteration,  # pynrrd on an empty file
    EOFError,
    zlib.error,
    ImageFileError,
    nrrd.NRRDError,
    ValueError,
    TypeError,
    KeyError,  # a header without a required field
)
_NUMERIC_KINDS = "biuf"  # bool, signed, unsigned, float: what a grey value or a label can be
_SINGULAR_DETERMINANT = 1e-12
# NRRD space axis names as the letters of nibabel's orientation tools (LPS, the ITK default, flips x and y).
_SPACE_LETTER = dict(left="L", right="R", posterior="P", anterior="A", inferior="I", superior="S")
_FRAMELESS_SPACES = ("scanner-xyz", "3d-right-handed", "3d-left-handed")
_ORTHOGONAL_COSINE = 1e-3  # |cos| between two voxel axes above this (0.06 degrees): sheared
# The NRRD format's voxel type names (its specification's synonyms, "_t" suffix dropped) as numpy type codes;
# pynrrd keeps its own table private, and the header alone must give the size before any voxel is read.
_NRRD_TYPES = {
    **dict.fromkeys(("signed char", "int8"), "i1"),
    **dict.fromkeys(("uchar", "unsigned char", "uint8"), "u1"),
    **dict.fromkeys(("short", "short int", "signed short", "signed short int", "int16"), "i2"),
    **dict.fromkeys(("ushort", "unsigned short", "unsigned short int", "uint16"), "u2"),
    **dict.fromkeys(("int", "signed int", "int32"), "i4"),
    **dict.fromkeys(("uint", "unsigned int", "uint32"), "u4"),
    **dict.fromkeys(("longlong", "long long", "long long int", "signed long long", "int64"), "i8"),
    **dict.fromkeys(("signed long long int",), "i8"),
    **dict.fromkeys(("ulonglong", "unsigned long long", "unsigned long long int", "uint64"), "u8"),
    "float": "f4",
    "double": "f8",
}


# Not frozen: Lightning's batch transfer (apply_to_collection) rebuilds dataclasses and refuses frozen ones.
@dataclass(eq=False)
class Geometry:
    """Where a volume's voxels lie and how it is cut into slices; every stage passes it on unchanged.

    `affine` is the file's own, so a written mask overlays its image in any viewer; `spacing` is the one used
    for mm and mL figures (it can differ from the header's, as for Utah 2018; `spacing_source` says why). The
    model sees volumes with the through-plane `slice_axis` moved last ("slices last"); `to_slices_last` /
    `from_slices_last` convert arrays (numpy or torch) between that layout and the file's.
    """

    shape: tuple[int, int, int]  # the file's array shape
    affine: np.ndarray  # (4, 4) float64, voxel index -> world mm (RAS), as in the file
    spacing: tuple[float, float, float]  # mm per voxel along the file's array axes
    source: Path
    slice_axis: int = 2  # the through-plane axis of the file's array
    spacing_source: str = "header"
    orientation: Orientation = "RAS"

    def slices_last_layout(self) -> tuple[tuple[int, int, int], tuple[bool, bool, bool]]:
        """(file axis of each slices-last axis, whether it is reversed): with "RAS", the canonical axes
        (R, A, S: nibabel's `io_orientation`) with the through-plane one moved last; with "array", the file's
        own axes."""
        if self.orientation == "array":
            axes = tuple(a for a in range(3) if a != self.slice_axis) + (self.slice_axis,)
            return axes, (False, False, False)  # type: ignore[return-value]
        ornt = io_orientation(np.asarray(self.affine, dtype=np.float64))
        file_axis = {int(canonical): axis for axis, canonical in enumerate(ornt[:, 0])}
        through = int(ornt[self.slice_axis, 0])
        canonical = [c for c in range(3) if c != through] + [through]
        axes = tuple(file_axis[c] for c in canonical)
        return axes, tuple(bool(ornt[a, 1] < 0) for a in axes)  # type: ignore[return-value]

    @property
    def voxel_volume_mm3(self) -> float:
        """mm^3 per voxel: |det| of the affine's axes, each scaled to `spacing` (the header's, or an override
        such as Utah's). The product of the spacings only where the axes are orthogonal; for sheared axes it
        would overstate the volume."""
        axes = np.asarray(self.affine, dtype=np.float64)[:3, :3]
        unit = axes / np.linalg.norm(axes, axis=0)
        return float(abs(np.linalg.det(unit)) * np.prod(self.spacing))

    @property
    def slices_last_spacing(self) -> tuple[float, float, float]:
        """`spacing` in the slices-last layout."""
        axes, _ = self.slices_last_layout()
        return tuple(self.spacing[a] for a in axes)  # type: ignore[return-value]

    @property
    def slices_last_shape(self) -> tuple[int, int, int]:
        """`shape` in the slices-last layout."""
        axes, _ = self.slices_last_layout()
        return tuple(self.shape[a] for a in axes)  # type: ignore[return-value]

    def to_slices_last(self, array: ArrayT) -> ArrayT:
        """A (numpy or torch) array in the file's axis order, in the model's layout (a contiguous copy where
        axes move or flip, so torch.from_numpy takes it)."""
        axes, flips = self.slices_last_layout()
        reversed_axes = [i for i, flip in enumerate(flips) if flip]
        if isinstance(array, np.ndarray):
            return np.ascontiguousarray(np.flip(np.transpose(array, axes), reversed_axes))
        return array.permute(*axes).flip(reversed_axes)  # torch.Tensor

    def from_slices_last(self, array: ArrayT) -> ArrayT:
        """The inverse of to_slices_last: back to the file's axis order."""
        axes, flips = self.slices_last_layout()
        reversed_axes = [i for i, flip in enumerate(flips) if flip]
        inverse = tuple(int(i) for i in np.argsort(axes))
        if isinstance(array, np.ndarray):
            return np.ascontiguousarray(np.transpose(np.flip(array, reversed_axes), inverse))
        return array.flip(reversed_axes).permute(*inverse)  # torch.Tensor


@dataclass(eq=False)
class Volume:
    """A 3D array in the file's axis order with the geometry to measure it in mm and write results back."""

    data: np.ndarray
    geometry: Geometry


@dataclass(frozen=True)
class _Header:
    """What a file's header claims, read without touching the voxels."""

    shape: tuple[int, int, int]
    dtype: np.dtype
    affine: np.ndarray
    spacing: tuple[float, float, float] | None  # None: the header holds no voxel size (some NRRD files)


def through_plane_axis(affine: np.ndarray, spacing: Sequence[float]) -> int:
    """The array axis slices are cut across: the coarsest one; among equally coarse axes (isotropic
    data), the one whose world direction is closest to the scanner's superior-inferior axis (RAS z)."""
    spacing = np.asarray(spacing, dtype=np.float64)
    coarse = np.flatnonzero(spacing >= spacing.max() * (1.0 - ISOTROPY_TOLERANCE))
    directions = np.asarray(affine, dtype=np.float64)[:3, :3]
    superior = np.abs(directions[2]) / np.linalg.norm(directions, axis=0)
    return int(coarse[np.argmax(superior[coarse])])


def check_slice_axis(slice_axis: SliceAxis) -> SliceAxis:
    """`slice_axis` itself, or a DataError naming the field when it is not 'auto', 0, 1 or 2."""
    if slice_axis != "auto" and (isinstance(slice_axis, bool) or slice_axis not in (0, 1, 2)):
        raise DataError(f"data.slice_axis must be 'auto', 0, 1 or 2, got {slice_axis!r}")
    return slice_axis


def check_orientation(orientation: str, name: str = "data.orientation") -> Orientation:
    """`orientation` itself, or a DataError naming the field when it is not one of ORIENTATIONS."""
    if orientation not in ORIENTATIONS:
        raise DataError(f"{name} must be one of {list(ORIENTATIONS)}, got {orientation!r}")
    return orientation  # type: ignore[return-value]


def check_header(
    path: str | Path,
    spacing: Sequence[float] | None = None,
    slice_axis: SliceAxis = "auto",
    orientation: Orientation = "RAS",
) -> Geometry:
    """The file's Geometry from its header alone (no voxel is read), refusing what cannot be one usable
    3D volume: unreadable header, non-numeric voxels, zero/negative/missing spacing, a degenerate affine,
    or a size that cannot fit in memory. `spacing` overrides the header's (the affine is kept)."""
    orientation = check_orientation(orientation)
    path = Path(path)
    if not path.is_file():
        raise DataError(f"volume file does not exist or is not a readable file: {path}")
    try:
        header = _nrrd_header(path) if _is_nrrd(path) else _nifti_header(path)
    except DataError:
        raise
    except _READ_ERRORS as error:
        raise DataError(f"cannot read the header of {path}: {type(error).__name__}: {error}") from error
    _check_memory(header, path)
    _warn_sheared(header.affine, path)
    _warn_oblique(header.affine, path)
    source = "header"
    utah_file = path.name.lower() in UTAH_FILE_NAMES
    if spacing is not None:
        spacing, source = _check_override(spacing, path), SPACING_OPTION
    elif utah_file and (header.spacing is None or np.allclose(header.spacing, 1.0, rtol=ISOTROPY_TOLERANCE)):
        spacing, source = UTAH_SPACING, UTAH_SPACING_SOURCE
    elif header.spacing is None:
        raise DataError(
            f"{path} has neither 'space directions' nor 'spacings': its voxel size is unknown; give it with "
            f"--{SPACING_OPTION} '[x, y, z]' (mm, in the file's axis order)"
        )
    else:
        spacing = header.spacing
    axis = check_slice_axis(slice_axis)
    if axis == "auto":
        axis = through_plane_axis(header.affine, spacing)
    return Geometry(header.shape, header.affine, tuple(spacing), path, axis, source, orientation)


def read_image(
    path: str | Path,
    spacing: Sequence[float] | None = None,
    slice_axis: SliceAxis = "auto",
    orientation: Orientation = "RAS",
) -> Volume:
    """Read an image as float32 (NaN kept: normalisation deals with it); `spacing` overrides the header's."""
    geometry = check_header(path, spacing, slice_axis, orientation)
    if geometry.slice_axis != 2:
        LOGGER.info("slicing %s along array axis %d", geometry.source, geometry.slice_axis)
    return Volume(_read_voxels(geometry.source).astype(np.float32, copy=False), geometry)


MAX_LABEL_VALUES = 32  # distinct values a label map may hold (whole-heart atlases: under 10)


def read_label(
    path: str | Path,
    spacing: Sequence[float] | None = None,
    slice_axis: SliceAxis = "auto",
    label_values: Sequence[int] | None = None,
    orientation: Orientation = "RAS",
) -> Volume:
    """Read a label as uint8 {0, 1}: voxels holding one of `label_values` (all non-zero ones when None).

    Other non-zero values (scar, further structures) are left out with a warning; a label that holds none of
    the selected values but others, or non-integer values, is refused.
    """
    geometry = check_header(path, spacing, slice_axis, orientation)
    data = _read_voxels(geometry.source)
    if data.dtype.kind == "f" and not (np.isfinite(data).all() and np.array_equal(data, np.round(data))):
        raise DataError(f"label {geometry.source} holds non-integer values ({data.dtype}); expected integers")
    if (
        label_values is None
    ):  # every non-zero value is LA: a scan here would pass as a mask of its grey values
        if (distinct := np.unique(data).size) > MAX_LABEL_VALUES:
            raise DataError(
                f"label {geometry.source} holds {distinct} distinct values, more than a label map's "
                f"{MAX_LABEL_VALUES}: it looks like an image, not a mask; give the masks (labels) instead"
            )
        return Volume((data != 0).astype(np.uint8), geometry)
    present = np.unique(data)
    selected = np.isin(present, label_values)
    others = present[~selected & (present != 0)]
    if others.size and not selected.any():
        raise DataError(
            f"label {geometry.source} holds none of the LA values {list(label_values)} but holds "
            f"{others.tolist()}; set data.label_values to the LA value(s) of this data set"
        )
    if others.size:
        warnings.warn(
            f"label {geometry.source}: values {others.tolist()} are not LA values {list(label_values)} "
            "and count as background (set data.label_values to include them)",
            stacklevel=2,
        )
    return Volume(np.isin(data, label_values).astype(np.uint8), geometry)


def read_case(
    case: Case, slice_axis: SliceAxis = "auto", orientation: Orientation = "RAS"
) -> tuple[Volume, Volume | None]:
    """Read a case's image and label, refusing pairs whose voxel grids disagree."""
    image = read_image(case.image_path, case.spacing, slice_axis, orientation)
    if case.label_path is None:
        return image, None
    label = read_label(
        case.label_path, case.spacing, image.geometry.slice_axis, case.label_values, orientation
    )
    first, second = image.geometry, label.geometry
    if first.shape != second.shape:
        raise DataError(
            f"image {first.source} has shape {first.shape} but label {second.source} has shape {second.shape}"
        )
    if not np.allclose(first.affine, second.affine, rtol=0.0, atol=AFFINE_TOLERANCE_MM):
        raise DataError(
            f"image {first.source} and label {second.source} have different affines "
            f"(tolerance {AFFINE_TOLERANCE_MM} mm):\n{first.affine}\nvs\n{second.affine}"
        )
    return image, label


def write_nifti(path: str | Path, data: np.ndarray, reference: Geometry) -> None:
    """Write `data` (in the file's axis order) as NIfTI on the reference's grid, atomically and reproducibly.

    A temp file in the target folder is renamed over the target, so readers never see half a file; gzip
    is written with mtime 0 so equal data gives equal bytes.
    """
    path = Path(path)
    if not path.name.lower().endswith((".nii", ".nii.gz")):
        raise DataError(f"write_nifti writes NIfTI; the output name must end with .nii or .nii.gz: {path}")
    refuse_writing_into_inputs(path, [reference.source], "output")
    data = np.asarray(data)
    if data.shape[:3] != tuple(reference.shape):
        raise DataError(
            f"cannot write {path}: data shape {data.shape} does not match the reference grid "
            f"{tuple(reference.shape)} of {reference.source}"
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


def _is_nrrd(path: Path) -> bool:
    return path.name.lower().endswith(NRRD_EXTENSIONS)


def _read_voxels(path: Path) -> np.ndarray:
    """The voxels of a file whose header check_header accepted, as a 3D array in the file's axis order."""
    try:
        data = nrrd.read(str(path))[0] if _is_nrrd(path) else _nifti_voxels(path)
    except _READ_ERRORS as error:
        reason = f"{type(error).__name__}: {error}"
        raise DataError(f"cannot read {path} (corrupt or truncated?): {reason}") from error
    return np.asarray(data).reshape(data.shape[:3])


def _nifti_voxels(path: Path) -> np.ndarray:
    """NIfTI voxels; a .gz is decompressed whole first, so gzip verifies its CRC and length (nibabel alone
    stops at the end of the payload and would accept flipped bytes)."""
    if not path.name.lower().endswith(".gz"):
        return np.asanyarray(nib.load(path).dataobj)
    raw = gzip.decompress(path.read_bytes())
    nifti2 = int.from_bytes(raw[:4], "little") == 540 or int.from_bytes(raw[:4], "big") == 540
    image = (nib.Nifti2Image if nifti2 else nib.Nifti1Image).from_bytes(raw)
    return np.asanyarray(image.dataobj)


def _nifti_header(path: Path) -> _Header:
    image = nib.load(path)  # lazy: reads the header only
    if not isinstance(image, nib.Nifti1Image):  # Nifti2Image subclasses it
        raise DataError(f"{path} is not a NIfTI file (nibabel read it as {type(image).__name__})")
    with ImageOpener(path) as fileobj:  # nib.load silently turns zero or negative voxel sizes into 1 mm
        header = type(image.header).from_fileobj(fileobj, check=False)
    if int(header["qform_code"]) == 0 and int(header["sform_code"]) == 0:
        warnings.warn(
            f"{path} has neither qform nor sform (both codes 0): its orientation is unknown; using nibabel's "
            "fallback affine from the voxel sizes, so written masks may not overlay it in a viewer",
            stacklevel=3,
        )
    shape = _spatial_shape(image.shape, path)
    dtype = _check_dtype(header.get_data_dtype(), path)
    zooms = tuple(float(z) for z in header.get_zooms()[:3])
    affine = np.asarray(image.affine, dtype=np.float64)
    _check_geometry(affine, zooms, path)
    return _Header(shape, dtype, affine, zooms)  # type: ignore[arg-type]


def _nrrd_header(path: Path) -> _Header:
    header = nrrd.read_header(str(path))  # Fortran index order: axes come out (X, Y, Z) like nibabel
    _check_data_file(header, path)
    shape = _spatial_shape(tuple(int(n) for n in header["sizes"]), path)
    dtype = _nrrd_dtype(header, path)
    affine = np.eye(4)
    directions = header.get("space directions")
    if directions is not None:
        rows = [np.asarray(d, dtype=np.float64) for d in directions if d is not None and not _is_none_row(d)]
        if len(rows) != 3:
            raise DataError(f"{path}: 'space directions' has {len(rows)} spatial axes, expected 3")
        affine[:3, :3] = np.stack(rows).T  # each row is the world step of one array axis
        origin = np.asarray(header.get("space origin", np.zeros(3)), dtype=np.float64)
        affine[:3, 3] = np.where(np.isfinite(origin), origin, 0.0)
        affine[:3] *= _ras_sign(header.get("space"), path)[:, None]
    elif "spacings" in header:
        affine[:3, :3] = np.diag(np.asarray(header["spacings"], dtype=np.float64)[:3])
    else:  # no voxel size: check_header takes it from the file name (Utah 2018) or data.spacing, or refuses
        return _Header(shape, dtype, affine, None)
    spacing = tuple(float(s) for s in np.linalg.norm(affine[:3, :3], axis=0))
    _check_geometry(affine, spacing, path)
    return _Header(shape, dtype, affine, spacing)  # type: ignore[arg-type]


def _check_data_file(header: dict, path: Path) -> None:
    """A detached-header NRRD (.nhdr) names its data file; refuse one that is not there, naming both."""
    data_file = header.get("data file", header.get("datafile"))
    if not isinstance(data_file, str) or data_file.startswith("LIST") or " " in data_file.strip():
        return  # attached data, or a list / pattern of files (pynrrd checks those when reading)
    target = Path(data_file) if Path(data_file).is_absolute() else path.parent / data_file
    if not target.is_file():
        raise DataError(f"{path} is a detached NRRD header whose data file {target} does not exist")


def _nrrd_dtype(header: dict, path: Path) -> np.dtype:
    """The voxels' dtype that the header's `type` and `endian` name, or a DataError naming the file."""
    name = str(header.get("type", "")).lower().removesuffix("_t")
    if name not in _NRRD_TYPES:
        raise DataError(f"{path} holds NRRD {name!r} voxels; expected numbers (e.g. short, uchar, float)")
    return np.dtype(_NRRD_TYPES[name]).newbyteorder(">" if header.get("endian") == "big" else "<")


def _is_none_row(direction) -> bool:
    """pynrrd gives a non-spatial axis's 'none' direction as None or a row of NaN."""
    return not np.isfinite(np.asarray(direction, dtype=np.float64)).any()


def _ras_sign(space: str | None, path: Path) -> np.ndarray:
    """Per-axis sign that turns an NRRD world space (e.g. left-posterior-superior, or LPS) into RAS; the
    spaces without an anatomical frame (scanner-xyz, 3D-right-handed, ...) are read as RAS with a warning, as
    a NIfTI without orientation is; any other space is refused."""
    if not space:
        return np.ones(3)
    lowered = space.lower().removesuffix("-time")
    if lowered in _FRAMELESS_SPACES:
        warnings.warn(
            f"{path} has NRRD space {space!r}, which has no anatomical frame: read as RAS, so written masks "
            "overlay it but its orientation is unknown",
            stacklevel=4,
        )
        return np.ones(3)
    names = lowered.split("-")
    codes = [_SPACE_LETTER.get(name, "?") for name in names] if len(names) == 3 else []
    letters = space.upper().removesuffix("T") if len(space) == 4 else space.upper()
    if not codes and len(letters) == 3:  # the short forms: LPS, RAS, LAS and their time variants (LPST)
        codes = list(letters)
    try:
        orientation = axcodes2ornt(codes) if len(codes) == 3 else None
    except ValueError:  # nibabel: an axis named twice
        orientation = None
    # nibabel gives (RAS axis, sign) per world axis; a world space keeps x, y, z in order (no permutation)
    if orientation is None or np.isnan(orientation).any() or list(orientation[:, 0]) != [0, 1, 2]:
        raise DataError(
            f"{path} has an unknown NRRD space {space!r}; expected e.g. left-posterior-superior (LPS), "
            "right-anterior-superior (RAS), left-anterior-superior (LAS) or scanner-xyz"
        )
    return orientation[:, 1]


def _warn_sheared(affine: np.ndarray, path: Path) -> None:
    """Warn, naming the file, when the voxel axes are not orthogonal (a sheared affine): volumes are right
    (from the determinant), but slices are cut along the array axes, not across the through-plane."""
    axes = np.asarray(affine, dtype=np.float64)[:3, :3]
    unit = axes / np.linalg.norm(axes, axis=0)
    cosines = np.abs(unit.T @ unit - np.eye(3))
    if cosines.max() > _ORTHOGONAL_COSINE:
        angle = float(np.degrees(np.arcsin(min(1.0, cosines.max()))))
        warnings.warn(
            f"{path} has non-orthogonal (sheared) voxel axes (off by up to {angle:.2f} degrees): volumes use "
            "the voxel's true size (|det| of the affine), but slices follow the array axes",
            stacklevel=4,
        )


def _warn_oblique(affine: np.ndarray, path: Path) -> None:
    """Warn, naming the file, when a voxel axis is far from every canonical (RAS) axis: the volume is still
    only permuted and flipped to the nearest canonical orientation, so the model sees it tilted."""
    axes = np.asarray(affine, dtype=np.float64)[:3, :3]
    unit = axes / np.linalg.norm(axes, axis=0)
    ornt = io_orientation(affine)
    cosines = [abs(unit[int(canonical), axis]) for axis, canonical in enumerate(ornt[:, 0])]
    angle = float(np.degrees(np.arccos(min(1.0, min(cosines)))))
    if angle > OBLIQUE_WARNING_DEGREES:
        warnings.warn(
            f"{path} is stored oblique: a voxel axis lies {angle:.0f} degrees from the nearest RAS axis "
            f"(more than {OBLIQUE_WARNING_DEGREES:.0f}); it is read in the nearest canonical orientation "
            "without resampling, so the model sees the anatomy tilted: masks may be less accurate",
            stacklevel=4,
        )


def _spatial_shape(shape: tuple[int, ...], path: Path) -> tuple[int, int, int]:
    """Accept (X, Y, Z) and (X, Y, Z, 1, ...); refuse 2D slices, real 4D series and RGB vectors."""
    spatial = list(shape)
    while len(spatial) > 3 and spatial[-1] == 1:
        spatial.pop()
    if len(spatial) != 3:
        kind = f"{len(shape)}D" if len(spatial) < 3 else f"{len(shape)}D with more than one volume"
        raise DataError(f"{path} is {kind} (shape {tuple(shape)}); expected one 3D volume (X, Y, Z)")
    if min(spatial) < 1:
        raise DataError(f"{path} has an empty axis (shape {tuple(shape)})")
    return tuple(int(n) for n in spatial)  # type: ignore[return-value]


def _check_dtype(dtype: np.dtype, path: Path) -> np.dtype:
    dtype = np.dtype(dtype)
    if dtype.kind not in _NUMERIC_KINDS or dtype.fields is not None:
        raise DataError(
            f"{path} has voxel type {dtype} (RGB, complex or structured); expected one grey value per voxel"
        )
    return dtype


def _check_geometry(affine: np.ndarray, spacing: Sequence[float], path: Path) -> None:
    """Refuse zero, negative, non-finite spacing and singular or non-finite affines instead of guessing."""
    values = np.asarray(spacing, dtype=np.float64)
    if values.shape != (3,) or not (np.isfinite(values).all() and (values > 0).all()):
        raise DataError(f"{path} has voxel spacing {values.tolist()} mm; every spacing must be positive")
    if not np.isfinite(affine).all():
        raise DataError(f"{path} has a non-finite affine:\n{affine}")
    axes = np.asarray(affine, dtype=np.float64)[:3, :3]
    norms = np.linalg.norm(axes, axis=0)
    # judged on the axes' directions too: scale alone (1e30 mm beside 1 mm) must not hide two parallel axes
    if (
        abs(np.linalg.det(axes)) < _SINGULAR_DETERMINANT * float(np.prod(values))
        or not (norms > 0).all()
        or abs(np.linalg.det(axes / norms)) < _SINGULAR_DETERMINANT
    ):
        raise DataError(f"{path} has a degenerate (singular) affine, zero or parallel axes:\n{affine}")


def _check_memory(header: _Header, path: Path) -> None:
    """Refuse a volume whose voxels (plus their float32 copy) cannot fit in memory, before allocating it."""
    voxels = math.prod(int(n) for n in header.shape)  # Python ints: a NIfTI-2 header can overflow int64
    needed = voxels * (header.dtype.itemsize + 4)
    memory = psutil.virtual_memory()  # available counts reclaimable cache (Linux: MemAvailable)
    available, total = memory.available, memory.total
    if needed > available:
        raise DataError(
            f"{path} claims shape {header.shape} of {header.dtype} ({needed / 2**30:.1f} GiB to read), "
            f"more than the {available / 2**30:.1f} GiB of memory available "
            f"({total / 2**30:.1f} GiB installed): a corrupt header or not a single volume"
        )


def _check_override(spacing: Sequence[float], path: Path) -> tuple[float, float, float]:
    values = tuple(float(s) for s in spacing)
    if len(values) != 3 or not all(np.isfinite(v) and v > 0 for v in values):
        raise DataError(f"{SPACING_OPTION} for {path} must be three positive numbers (mm), got {spacing!r}")
    return values  # type: ignore[return-value]
