"""Intensity normalisation, slice resizing to the model input, and its exact inverse.

The torch functions run on whatever device their tensor lives on (CPU in dataloader workers during training,
the GPU during evaluation and prediction), so training, evaluation and prediction share one code path.
Volumes are slices last (X', Y', Z), as Geometry.to_slices_last lays them out; model inputs are slice stacks
(Z, C, S, S).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from la_seg.errors import DataError


def normalize_intensity(data: np.ndarray, lower: float = 0.5, upper: float = 99.5) -> np.ndarray:
    """Clip to the [lower, upper] percentiles of the finite voxels and scale to [0, 1] (float32).

    Robust to the bright outliers of LGE images. Non-finite voxels become 0; a volume without contrast
    (constant, all zero, or all non-finite) becomes all zeros instead of NaN.
    """
    if not 0.0 <= lower < upper <= 100.0:
        raise ValueError(
            f"percentiles must satisfy 0 <= lower < upper <= 100, got lower={lower}, upper={upper}"
        )
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
    out = (np.clip(data, lo, hi) - lo) / (hi - lo)  # all float32: exactly 0 at lo and 1 at hi
    out[~finite] = 0.0
    return out


def check_img_size(img_size: int, name: str = "img_size") -> int:
    """`img_size` as an int, or a DataError naming the field when it is not a positive integer.

    Whether it is a whole number of patches is the backbone's rule: only it knows its patch size.
    """
    if isinstance(img_size, bool) or not isinstance(img_size, (int, np.integer)) or img_size <= 0:
        raise DataError(f"{name} must be a positive integer, got {img_size!r}")
    return int(img_size)


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
    volume: torch.Tensor, img_size: int, slice_context: bool = False, index: slice | None = None
) -> torch.Tensor:
    """The slices of a slices-last (X, Y, Z) volume in [0, 1] as a (Z', 3, S, S) float32 input in [0, 1].

    Channels are the grey value repeated (as in the paper), or with `slice_context` the slices k-1, k, k+1
    (edge-replicated at the first and last slice). `index` selects which slices are produced, so evaluation
    can run in chunks; neighbours still come from the whole volume. Every needed slice is resized once.
    """
    size = check_img_size(img_size)
    _check_volume(volume, "volume")
    depth = volume.shape[2]
    wanted = torch.arange(depth, device=volume.device)[index if index is not None else slice(None)]
    if wanted.numel() == 0:
        return volume.new_zeros((0, 3, size, size), dtype=torch.float32)
    if slice_context:
        channels = torch.stack([(wanted - 1).clamp(min=0), wanted, (wanted + 1).clamp(max=depth - 1)], dim=1)
    else:
        channels = wanted[:, None]
    needed, position = torch.unique(channels, return_inverse=True)
    resized = _resize(volume[:, :, needed].permute(2, 0, 1)[:, None].float(), (size, size))[:, 0]
    out = resized[position]  # (Z', 1 or 3, S, S)
    if not slice_context:
        out = out.expand(-1, 3, -1, -1)
    # Bilinear weights are a convex combination: only rounding can leave [0, 1].
    return out.clamp(0.0, 1.0).contiguous()


def labels_to_input(label: torch.Tensor, img_size: int, index: slice | None = None) -> torch.Tensor:
    """The slices of a slices-last (X, Y, Z) binary label as a (Z', 1, S, S) float32 target in {0, 1}.

    Resized like the image (bilinear, antialiased, as float) and thresholded at 0.5, so image and target stay
    aligned and restore_geometry is its inverse.
    """
    size = check_img_size(img_size)
    _check_volume(label, "label")
    slices = label[:, :, index if index is not None else slice(None)].permute(2, 0, 1)[:, None].float()
    if slices.shape[0] == 0:
        return slices.new_zeros((0, 1, size, size))
    return (_resize(slices, (size, size)) > 0.5).float()


def restore_geometry(probs: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """Map per-slice model outputs (Z, S, S) back to the slices-last (X, Y, Z) grid (float32).

    The exact inverse of the resize in slices_to_input / labels_to_input: bilinear (antialiased) back to
    (X, Y) and slices moved to the last axis. Works for probabilities or logits (interpolation is linear).
    """
    if probs.ndim != 3:
        raise DataError(f"probs must be a (Z, S, S) tensor, got shape {tuple(probs.shape)}")
    x, y, z = (int(s) for s in shape)
    if probs.shape[0] != z:
        raise DataError(f"probs has {probs.shape[0]} slices but the target shape {tuple(shape)} has {z}")
    return _resize(probs[:, None].float(), (x, y))[:, 0].permute(1, 2, 0).contiguous()
