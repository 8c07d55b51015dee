"""Volumetric and slice-wise metrics of a binary LA mask against its reference.

Everything is computed on the 3D volume in its original geometry, with the voxel spacing from the
header, so that numbers compare with nnU-Net's and the challenge's. Overlap scores come from
torchmetrics, surface distances from MONAI.

Stated rules for empty masks:
- 3D Dice/IoU: both masks empty counts as 1 (perfect agreement), one empty as 0.
- A case whose prediction or reference is empty is `failed`; summaries count the failures.
- HD95/ASSD of a failed case: with `empty_distance="nan"` (default) undefined, left out of the mean (each
  mean states its n); with `"max"` the image diagonal in mm (0 when both masks are empty), as challenges
  penalise a missed structure.
- Slice-wise Dice/IoU: slices where both reference and prediction are empty are left out (they
  would inflate the mean with trivial 1s); a slice where only one is empty scores 0.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Literal

import torch
import torch.distributed as dist

Spacing = Sequence[float]
EmptyDistance = Literal["nan", "max"]


def overlap_3d(pred: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """Dice and IoU of two binary volumes of the same shape."""
    if not pred.any() and not ref.any():
        return 1.0, 1.0
    from torchmetrics.functional.classification import binary_f1_score, binary_jaccard_index  # see below

    p, r = pred.reshape(-1).int(), ref.reshape(-1).int()
    return float(binary_f1_score(p, r)), float(binary_jaccard_index(p, r))


def overlap_per_slice(pred: torch.Tensor, ref: torch.Tensor) -> tuple[list[float], list[float]]:
    """Dice and IoU of every axial slice (last axis) that is non-empty in the prediction or the reference."""
    p = pred.movedim(-1, 0).reshape(pred.shape[-1], -1).int()
    r = ref.movedim(-1, 0).reshape(ref.shape[-1], -1).int()
    keep = (p.sum(1) + r.sum(1)) > 0
    if not keep.any():
        return [], []
    from torchmetrics.functional.classification import binary_f1_score  # see below

    p, r = p[keep], r[keep]
    dice = binary_f1_score(p, r, multidim_average="samplewise")
    inter = (p & r).sum(1).float()
    iou = inter / ((p | r).sum(1).float())
    return dice.reshape(-1).tolist(), iou.reshape(-1).tolist()


def surface_distances(
    pred: torch.Tensor, ref: torch.Tensor, spacing: Spacing, empty_distance: EmptyDistance = "nan"
) -> tuple[float, float]:
    """HD95 and symmetric ASSD in mm; where a mask is empty, NaN or (`"max"`) the image diagonal."""
    if not pred.any() or not ref.any():
        if empty_distance == "nan":
            return math.nan, math.nan
        penalty = 0.0 if not pred.any() and not ref.any() else image_diagonal_mm(pred.shape, spacing)
        return penalty, penalty
    # MONAI and torchmetrics are imported where they count: each loads torchvision's models with it (seconds),
    # which neither `la-seg evaluate --help` nor a bad option needs
    from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance

    p, r = pred[None, None].float(), ref[None, None].float()
    spacing = [float(s) for s in spacing]
    with warnings.catch_warnings():  # MONAI 1.5+ warns about its own internal use of a deprecated argument
        warnings.simplefilter("ignore", FutureWarning)
        hd95 = compute_hausdorff_distance(p, r, include_background=True, percentile=95, spacing=spacing)
        assd = compute_average_surface_distance(
            p, r, include_background=True, symmetric=True, spacing=spacing
        )
    return float(hd95), float(assd)


def image_diagonal_mm(shape: Sequence[int], spacing: Spacing) -> float:
    """Length of the volume's diagonal in mm: the largest distance two of its voxels can have."""
    return math.hypot(*(n * float(s) for n, s in zip(shape, spacing, strict=True)))


def volume_ml(mask: torch.Tensor, spacing: Spacing, voxel_mm3: float | None = None) -> float:
    """Volume of a binary mask in millilitres (1 mL = 1000 mm^3); `voxel_mm3` (Geometry.voxel_volume_mm3,
    right for sheared axes too) or else the product of the spacings."""
    per_voxel = voxel_mm3 if voxel_mm3 is not None else math.prod(float(s) for s in spacing)
    return float(mask.sum()) * per_voxel / 1000.0


def case_metrics(
    pred: torch.Tensor,
    ref: torch.Tensor,
    spacing: Spacing,
    surface: bool = True,
    empty_distance: EmptyDistance = "nan",
    voxel_mm3: float | None = None,
) -> dict:
    """All per-case figures of the test report (surface distances optional: they cost the most).
    Volumes use `voxel_mm3` (see volume_ml).

    `failed` marks an empty prediction or reference; `empty_distance` is the rule for its HD95/ASSD.
    """
    pred, ref = pred.bool(), ref.bool()
    if pred.shape != ref.shape:
        raise ValueError(
            f"prediction shape {tuple(pred.shape)} differs from reference shape {tuple(ref.shape)}"
        )
    dice, iou = overlap_3d(pred, ref)
    slice_dice, slice_iou = overlap_per_slice(pred, ref)
    failed = not pred.any() or not ref.any()
    row = {"dice": dice, "iou": iou, "failed": failed, "slice_dice": slice_dice, "slice_iou": slice_iou}
    if surface:
        row["hd95_mm"], row["assd_mm"] = surface_distances(pred, ref, spacing, empty_distance)
        row["volume_pred_ml"] = volume_ml(pred, spacing, voxel_mm3)
        row["volume_ref_ml"] = volume_ml(ref, spacing, voxel_mm3)
    return row


def summarise(rows: list[dict], keys: Sequence[str]) -> dict:
    """Mean, sample sd (NaN below two cases) and count n of each key over cases (NaN cases left out),
    pooled slice-wise Dice/IoU, and `cases`: how many cases there were and how many `failed`."""
    summary: dict[str, dict] = {"cases": {"n": len(rows), "failed": sum(bool(r.get("failed")) for r in rows)}}
    for key in keys:
        values = [r[key] for r in rows if key in r and not math.isnan(r[key])]
        t = torch.tensor(values, dtype=torch.float64)
        summary[key] = {
            "mean": float(t.mean()) if values else math.nan,
            "sd": float(t.std(unbiased=True)) if len(values) > 1 else math.nan,
            "n": len(values),
        }
    for key in ("slice_dice", "slice_iou"):
        pooled = [v for r in rows for v in r.get(key, [])]
        summary[key] = {
            "mean": sum(pooled) / len(pooled) if pooled else math.nan,
            "n": len(pooled),
        }
    return summary


class CumulativeCaseMetrics:
    """`case_metrics` accumulated over cases, in the style of MONAI's cumulative metrics: `update` per case,
    `aggregate` over every process's cases (each once, under DDP too), `reset` between epochs."""

    def __init__(self, surface: bool = True, empty_distance: EmptyDistance = "nan") -> None:
        self.surface = surface
        self.empty_distance = empty_distance
        self._rows: list[dict] = []

    def update(
        self,
        case_id: str,
        pred: torch.Tensor,
        ref: torch.Tensor,
        spacing: Spacing,
        voxel_mm3: float | None = None,
        **extra,
    ) -> dict:
        """Score one case; `extra` fields (e.g. its slice axis) are kept in its row."""
        row = {
            "case_id": case_id,
            **case_metrics(pred, ref, spacing, self.surface, self.empty_distance, voxel_mm3),
            **extra,
        }
        self._rows.append(row)
        return row

    def aggregate(self, keys: Sequence[str]) -> tuple[list[dict], dict]:
        """Every process's rows (sorted by case id) and their `summarise`; a collective call under DDP."""
        rows = gather_cases(self._rows)
        return rows, summarise(rows, keys)

    def reset(self) -> None:
        self._rows = []


def gather_cases(rows: list[dict]) -> list[dict]:
    """All ranks' rows, de-duplicated by `case_id` and sorted.

    Lightning's distributed sampler pads validation and test sets by repeating cases, so a plain
    gather would count those twice.
    """
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        gathered: list[list[dict]] = [[] for _ in range(dist.get_world_size())]
        dist.all_gather_object(gathered, rows)
        rows = [row for part in gathered for row in part]
    unique = {row["case_id"]: row for row in rows}
    return [unique[key] for key in sorted(unique)]
