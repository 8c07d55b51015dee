"""Intensity normalisation, slice resizing to the model input, and its exact inverse.

How a slice becomes an S x S input (`in_plane`): `stretch` (the paper) resizes every slice to S x S,
whatever its millimetres per pixel and aspect ratio; `spacing` resamples it to `target_spacing` mm per pixel
on both axes (aspect kept) and pads the result, centred, to at least S x S, as nnU-Net resamples to a target
spacing. A SliceGrid holds where one volume's slices land: in a plane of at least S x S that holds the whole
resized slice (slice_grid), which evaluation and prediction cover with S x S windows (la_seg.inference), or
in one S x S window of it (SliceGrid.window: a training item). restore_geometry undoes it exactly onto the
input's grid.

The torch functions run on whatever device their tensor lives on (CPU in dataloader workers during training,
the GPU during evaluation and prediction), so training, evaluation and prediction share one code path.
Volumes are slices last (X', Y', Z), as Geometry.to_slices_last lays them out; model inputs are slice stacks
(Z, C, S, S).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from la_seg.data.io import Geometry, Orientation, check_orientation
from la_seg.errors import DataError

# How far above the 99.5th percentile grey values keep their contrast (see normalize_intensity). In LGE MRI
# the enhanced (fibrotic) atrial wall is brighter than the blood pool, which the 99.5th percentile already
# reaches: clipped there, wall and blood got one grey value and the wall was segmented as LA (issue 19).
INTENSITY_HEADROOM = 1.5


def check_intensity_headroom(headroom: float, name: str = "intensity_headroom") -> float:
    """`headroom` as a float, or a DataError naming the field when it is not a finite number >= 1."""
    if isinstance(headroom, bool) or not isinstance(headroom, (int, float, np.integer, np.floating)):
        raise DataError(f"{name} must be a number >= 1, got {headroom!r}")
    if not np.isfinite(headroom) or headroom < 1.0:
        raise DataError(
            f"{name} must be a finite number >= 1 (1: clip at the 99.5th percentile), got {headroom}"
        )
    return float(headroom)


def normalize_intensity(
    data: np.ndarray, lower: float = 0.5, upper: float = 99.5, headroom: float = INTENSITY_HEADROOM
) -> np.ndarray:
    """Scale the finite voxels so that the `lower` percentile is 0 and the `upper` one 1 / `headroom`, then
    clip to [0, 1] (float32).

    Percentiles make it robust to LGE's bright outliers; `headroom` keeps the contrast of grey values up to
    `headroom` times the percentile range above it (the enhanced wall above the blood pool); 1 is a plain
    percentile clip. Non-finite voxels become 0; a volume without contrast (constant, all zero, or all
    non-finite) becomes all zeros instead of NaN.
    """
    if not 0.0 <= lower < upper <= 100.0:
        raise ValueError(
            f"percentiles must satisfy 0 <= lower < upper <= 100, got lower={lower}, upper={upper}"
        )
    headroom = check_intensity_headroom(headroom)
    data = np.asarray(data, dtype=np.float32)
    finite = np.isfinite(data)
    values = data[finite]
    if values.size == 0:
        return np.zeros(data.shape, dtype=np.float32)
    lo, hi = np.percentile(values, [lower, upper]).astype(np.float32)
    if not hi > lo:  # more than (upper - lower) % of the voxels share one value: fall back to the full range
        lo, hi = values.min(), values.max()
    if not hi > lo:
        return np.zeros(data.shape, dtype=np.float32)
    scale = np.float32((hi - lo) * headroom)
    out = np.clip((data - lo) / scale, np.float32(0.0), np.float32(1.0))  # float32: exactly 0 at lo
    out[~finite] = 0.0
    return out


def check_img_size(img_size: int, name: str = "img_size") -> int:
    """`img_size` as an int, or a DataError naming the field when it is not a positive integer.

    Whether it is a whole number of patches is the backbone's rule: only it knows its patch size.
    """
    if isinstance(img_size, bool) or not isinstance(img_size, (int, np.integer)) or img_size <= 0:
        raise DataError(f"{name} must be a positive integer, got {img_size!r}")
    return int(img_size)


InPlane = Literal["stretch", "spacing"]
IN_PLANE_MODES = ("stretch", "spacing")
# Largest side of a slice resampled to target_spacing: 8192 px is 7 m at 0.9 mm, beyond any body scan, and
# a 64-slice chunk of such slices already needs 16 GiB; more means a wrong spacing, not a bigger patient.
MAX_RESAMPLED_SIDE = 8192


@dataclass(frozen=True)
class SliceGrid:
    """Where the (X, Y) slices of one volume land: resized to `size` (pixels), its first pixel at `offset`
    in a `plane` of pixels (negative: that many pixels are cut away). slice_grid's planes hold the whole
    slice, padded to at least S x S: nothing of a field of view wider than S pixels is lost."""

    size: tuple[int, int]
    offset: tuple[int, int]
    plane: tuple[int, int]

    def window(self, origin: Sequence[int], side: int) -> SliceGrid:
        """The `side` x `side` window of this plane whose first pixel is `origin` (a training item's view of a
        slice wider than the model input)."""
        if not all(0 <= o <= p - side for o, p in zip(origin, self.plane, strict=True)):
            raise ValueError(f"a {side}-pixel window at {tuple(origin)} leaves the {self.plane} plane")
        offset = tuple(o - w for o, w in zip(self.offset, origin, strict=True))
        return SliceGrid(self.size, offset, (side, side))  # type: ignore[arg-type]

    @classmethod
    def stretched(cls, side: int) -> SliceGrid:
        """Slices resized to fill the `side` x `side` input (in_plane "stretch", and no grid given)."""
        return cls((side, side), (0, 0), (side, side))


def check_in_plane(in_plane: str, target_spacing: float, name: str = "in_plane") -> None:
    """A DataError naming the field for an unknown mode or a target spacing that is not a positive number."""
    if in_plane not in IN_PLANE_MODES:
        raise DataError(f"{name} must be one of {list(IN_PLANE_MODES)}, got {in_plane!r}")
    if isinstance(target_spacing, bool) or not np.isfinite(target_spacing) or not target_spacing > 0:
        raise DataError(f"target_spacing must be a positive number of mm per pixel, got {target_spacing!r}")


def slice_grid(
    xy: Sequence[int],
    img_size: int,
    in_plane: InPlane = "stretch",
    spacing: Sequence[float] | None = None,
    target_spacing: float = 1.0,
) -> SliceGrid:
    """The SliceGrid of (X, Y) slices of `spacing` mm per pixel (slices last: the first two values count)."""
    size = check_img_size(img_size)
    check_in_plane(in_plane, target_spacing)
    if in_plane == "stretch":
        return SliceGrid.stretched(size)
    if spacing is None:
        raise DataError("in_plane 'spacing' needs the volume's voxel spacing")
    scaled = [int(n) * float(s) / target_spacing for n, s in zip(xy[:2], spacing[:2], strict=True)]
    if not all(side <= MAX_RESAMPLED_SIDE for side in scaled):  # before round(): inf would raise there
        raise DataError(
            f"its {int(xy[0])} x {int(xy[1])} slices of {float(spacing[0]):g} x {float(spacing[1]):g} mm per "
            f"pixel would resample to {scaled[0]:.3g} x {scaled[1]:.3g} pixels at target_spacing "
            f"{target_spacing:g} mm, more than {MAX_RESAMPLED_SIDE} on a side: its voxel spacing is wrong "
            "(fix the header or give --data.spacing) or target_spacing is too small"
        )
    resized = tuple(max(1, round(side)) for side in scaled)
    plane = tuple(max(size, r) for r in resized)
    offset = tuple((p - r) // 2 for p, r in zip(plane, resized, strict=True))
    return SliceGrid(resized, offset, plane)  # type: ignore[arg-type]


@dataclass(frozen=True)
class InputSpec:
    """How a volume becomes the model's input: one record, carried whole by the data module, the module's
    hyper-parameters, checkpoints, ensemble members, the datasets and the calibration, so that training,
    calibration, test and predict cannot drift apart. The defaults are the shipped configs' (demo.yaml's).

    img_size: input side in pixels; slice_context: slices k-1, k, k+1 as channels (2.5D); in_plane and
    target_spacing: how a slice is resized (slice_grid); intensity_headroom: normalize_intensity's headroom;
    orientation: how volumes are laid out (la_seg.data.io.Orientation).
    """

    img_size: int = 448
    slice_context: bool = False
    in_plane: InPlane = "spacing"
    target_spacing: float = 1.5  # demo.yaml's (its 112 px windows); the paper configs say 0.9
    intensity_headroom: float = INTENSITY_HEADROOM
    orientation: Orientation = "RAS"

    def __post_init__(self) -> None:
        check_img_size(self.img_size)
        check_in_plane(self.in_plane, self.target_spacing)
        check_intensity_headroom(self.intensity_headroom)
        check_orientation(self.orientation, "orientation")
        object.__setattr__(self, "img_size", int(self.img_size))
        object.__setattr__(self, "slice_context", bool(self.slice_context))
        object.__setattr__(self, "target_spacing", float(self.target_spacing))
        object.__setattr__(self, "intensity_headroom", float(self.intensity_headroom))

    @classmethod
    def checked(cls, prefix: str, **fields) -> InputSpec:
        """The spec, or a DataError that names the faulty field as the user sets it (`prefix`: "data.")."""
        try:
            return cls(**fields)
        except DataError as error:
            raise DataError(f"{prefix}{error}") from None

    @property
    def kind(self) -> tuple[int, bool, str, float]:
        """(img_size, slice_context, in_plane, target_spacing): what one slice stack looks like; models whose
        kinds agree can share one backbone pass."""
        return (self.img_size, self.slice_context, self.in_plane, self.target_spacing)

    def grid(self, xy: Sequence[int], spacing: Sequence[float] | None) -> SliceGrid:
        """Where (X, Y) slices of `spacing` mm per pixel land in this input."""
        return slice_grid(xy, self.img_size, self.in_plane, spacing, self.target_spacing)

    def volume_grid(self, geometry: Geometry) -> SliceGrid:
        """`grid` of the volume `geometry` describes; a spacing that cannot be resampled is refused naming
        the file (slice_grid alone does not know it)."""
        try:
            return self.grid(geometry.slices_last_shape, geometry.slices_last_spacing)
        except DataError as error:
            raise DataError(f"{geometry.source}: {error}") from None


INPUT_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(InputSpec))
DEFAULT_INPUT = InputSpec()  # the defaults of every option that sets a field (data.*, model.*)


def _window(offset: int, resized: int, side: int) -> tuple[slice, slice]:
    """(source in the resized slice, destination in the plane) along one axis of a placement."""
    src, dst = max(-offset, 0), max(offset, 0)
    length = min(resized - src, side - dst)
    return slice(src, src + length), slice(dst, dst + length)


def _place(resized: torch.Tensor, grid: SliceGrid) -> torch.Tensor:
    """(N, C, h, w) resized slices placed in `grid`'s plane: (N, C, *plane), zeros around them."""
    if grid.offset == (0, 0) and tuple(resized.shape[-2:]) == grid.plane:
        return resized
    out = resized.new_zeros((*resized.shape[:-2], *grid.plane))
    (sx, dx), (sy, dy) = (_window(*axis) for axis in zip(grid.offset, grid.size, grid.plane, strict=True))
    out[..., dx, dy] = resized[..., sx, sy]
    return out


def _unplace(placed: torch.Tensor, grid: SliceGrid) -> torch.Tensor:
    """The inverse of _place: (N, C, *plane) back to (N, C, h, w), zeros where the plane did not reach."""
    if grid.offset == (0, 0) and tuple(grid.size) == grid.plane:
        return placed
    out = placed.new_zeros((*placed.shape[:-2], *grid.size))
    (sx, dx), (sy, dy) = (_window(*axis) for axis in zip(grid.offset, grid.size, grid.plane, strict=True))
    out[..., sx, sy] = placed[..., dx, dy]
    return out


def _check_volume(volume: torch.Tensor, name: str) -> None:
    if volume.ndim != 3:
        raise DataError(f"{name} must be a 3D slices-last (X, Y, Z) tensor, got shape {tuple(volume.shape)}")
    if volume.shape[2] == 0:
        raise DataError(f"{name} has no slices (shape {tuple(volume.shape)})")


def _resize(slices: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of (N, C, H, W) float32, antialiased so that downsampling does not alias."""
    if tuple(slices.shape[-2:]) == tuple(size):
        return slices
    return F.interpolate(slices, size=size, mode="bilinear", align_corners=False, antialias=True)


def slices_to_input(
    volume: torch.Tensor,
    img_size: int,
    slice_context: bool = False,
    index: slice | None = None,
    grid: SliceGrid | None = None,
) -> torch.Tensor:
    """The slices of a slices-last (X, Y, Z) volume in [0, 1] as a (Z', 3, *plane) float32 input in [0, 1]
    (S x S without a grid).

    Channels are the grey value repeated (as in the paper), or with `slice_context` the slices k-1, k, k+1
    (edge-replicated at the first and last slice). `index` selects which slices are produced, so evaluation
    can run in chunks; neighbours still come from the whole volume. Every needed slice is resized once, to
    `grid` (slice_grid, or one window of it; None: stretched to S x S).
    """
    size = check_img_size(img_size)
    _check_volume(volume, "volume")
    grid = grid or SliceGrid.stretched(size)
    depth = volume.shape[2]
    wanted = torch.arange(depth, device=volume.device)[index if index is not None else slice(None)]
    if wanted.numel() == 0:
        return volume.new_zeros((0, 3, *grid.plane), dtype=torch.float32)
    if slice_context:
        channels = torch.stack([(wanted - 1).clamp(min=0), wanted, (wanted + 1).clamp(max=depth - 1)], dim=1)
    else:
        channels = wanted[:, None]
    needed, position = torch.unique(channels, return_inverse=True)
    slices = volume[:, :, needed].permute(2, 0, 1)[:, None].float()
    resized = _place(_resize(slices, grid.size), grid)[:, 0]
    out = resized[position]  # (Z', 1 or 3, *plane)
    if not slice_context:
        out = out.expand(-1, 3, -1, -1)
    # Bilinear weights are a convex combination: only rounding can leave [0, 1].
    return out.clamp(0.0, 1.0).contiguous()


def labels_to_input(
    label: torch.Tensor, img_size: int, index: slice | None = None, grid: SliceGrid | None = None
) -> torch.Tensor:
    """The slices of a slices-last (X, Y, Z) binary label as a (Z', 1, *plane) float32 target in {0, 1}
    (S x S without a grid).

    Resized like the image (bilinear, antialiased, as float) and thresholded at 0.5, so image and target stay
    aligned and restore_geometry is its inverse.
    """
    size = check_img_size(img_size)
    _check_volume(label, "label")
    slices = label[:, :, index if index is not None else slice(None)].permute(2, 0, 1)[:, None].float()
    grid = grid or SliceGrid.stretched(size)
    if slices.shape[0] == 0:
        return slices.new_zeros((0, 1, *grid.plane))
    return (_place(_resize(slices, grid.size), grid) > 0.5).float()


def restore_geometry(
    probs: torch.Tensor, shape: tuple[int, int, int], grid: SliceGrid | None = None
) -> torch.Tensor:
    """Map per-slice model outputs (Z, *plane) (S x S without a grid) back to the slices-last (X, Y, Z) grid
    (float32).

    The exact inverse of the resize in slices_to_input / labels_to_input with the same `grid`: the padding
    dropped, bilinear (antialiased) back to (X, Y), slices moved to the last axis.
    """
    if probs.ndim != 3:
        raise DataError(f"probs must be a (Z, S, S) tensor, got shape {tuple(probs.shape)}")
    x, y, z = (int(s) for s in shape)
    if probs.shape[0] != z:
        raise DataError(f"probs has {probs.shape[0]} slices but the target shape {tuple(shape)} has {z}")
    if grid is not None:
        probs = _unplace(probs[:, None], grid)[:, 0]
    return _resize(probs[:, None].float(), (x, y))[:, 0].permute(1, 2, 0).contiguous()
