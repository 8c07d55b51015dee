"""The one owner of plausibility: which results cannot be right, so are flagged for review rather than passed
as confident, whatever the model's own confidence (an ensemble of broken folds agrees on nonsense).

A case is flagged when its mask is empty, its LA volume lies outside a plausible range, it covers a large part
of the volume's border (a threshold that marks nearly everything), or, before post-processing, it falls apart
into many large components; the reasons combine with the voters' disagreement (Agreement.review) and the
model's own doubt (`expected_dice` below `model.review_expected_dice`) into one `review` flag and a
`review_reason` text, in volumes.csv, the test report and on the console. A run whose best
validation Dice is below a floor gets one warning line after fit and again at test / predict, and every mask
its checkpoint (or an ensemble it votes in) writes is flagged: a model that learnt the wrong structure makes
masks of plausible size.

Defaults, and why. Adult LA volumes are tens of mL (CMR, appendage and vein ostia included: about 30-150 mL,
dilated atria in AF 100-250 mL, rarely above); no adult LA is below 5 mL. The synthetic phantoms hold 9-30
mL on a 100 mm field of view (`benchmarks/accuracy.py --heart-scale 1`; its models predicted 8.7-32 mL on
held-out phantoms) and about 35-95 mL on `la-seg synth`'s default 150 mm: inside the range, so a working model
is not flagged. Phantoms on much smaller grids (the tests' 48 x 44 x 12) hold 1-3 mL and are flagged unless
`min_volume_ml` is lowered.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from la_seg.errors import DataError
from la_seg.metrics import volume_ml

# The columns of every table that flags cases (volumes.csv, test reports): the flag and why.
REVIEW_COLUMNS = ("review", "review_reason")


@dataclass(frozen=True)
class Plausibility:
    """What a plausible LA mask looks like (`model.plausibility.*`; `--plausibility.*` of `la-seg evaluate`).

    Args:
        min_volume_ml: a smaller LA volume (mL) is flagged; no adult LA is below 5 mL.
        max_volume_ml: a larger LA volume (mL) is flagged; adult atria rarely exceed 250 mL.
        max_border_fraction: a mask holding more than this share of the volume's border voxels (its six
            faces) is flagged: the LA lies inside the field of view, a mask of nearly everything does not.
        max_components: a mask with more than this many large 3D connected components before post-processing
            is flagged (post-processing would hide that the model found LA in several places).
        component_ml: a component counts as large from this many mL.
        min_val_dice: a run whose best validation Dice is below this is far below a working model (the demo
            reaches 0.9): fit's summary warns, and so do test and predict from its checkpoints.
    """

    min_volume_ml: float = 5.0
    max_volume_ml: float = 300.0
    max_border_fraction: float = 0.1
    max_components: int = 3
    component_ml: float = 1.0
    min_val_dice: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_volume_ml < self.max_volume_ml:
            raise DataError(
                f"plausibility: need 0 <= min_volume_ml < max_volume_ml, got {self.min_volume_ml} and "
                f"{self.max_volume_ml}"
            )
        if not 0.0 < self.max_border_fraction <= 1.0:
            raise DataError(
                f"plausibility.max_border_fraction must be in (0, 1], got {self.max_border_fraction}"
            )
        if self.max_components < 1 or self.component_ml < 0.0:
            raise DataError(
                "plausibility: max_components must be >= 1 and component_ml >= 0, got "
                f"{self.max_components} and {self.component_ml}"
            )
        if not 0.0 <= self.min_val_dice <= 1.0:
            raise DataError(f"plausibility.min_val_dice must be in [0, 1], got {self.min_val_dice}")


def case_reasons(
    mask: torch.Tensor,
    spacing: Sequence[float],
    voxel_mm3: float | None = None,
    raw: torch.Tensor | None = None,
    settings: Plausibility = Plausibility(),  # noqa: B008 (frozen)
) -> list[str]:
    """Why one case's binary (X, Y, Z) mask cannot be right (empty: plausible). `raw`: the mask before
    post-processing, which the component rule judges (default `mask`); `voxel_mm3` as in metrics.volume_ml."""
    if not mask.any():
        return ["empty mask"]
    reasons = []
    volume = volume_ml(mask, spacing, voxel_mm3)
    if volume < settings.min_volume_ml:
        reasons.append(f"LA volume {volume:.1f} mL below {settings.min_volume_ml:g} mL (min_volume_ml)")
    elif volume > settings.max_volume_ml:
        reasons.append(f"LA volume {volume:.1f} mL above {settings.max_volume_ml:g} mL (max_volume_ml)")
    border = border_fraction(mask)
    if border > settings.max_border_fraction:
        reasons.append(
            f"mask covers {100 * border:.0f} % of the volume's border (above "
            f"{100 * settings.max_border_fraction:g} %, max_border_fraction)"
        )
    per_voxel_ml = volume / float(mask.sum())
    large = large_components(mask if raw is None else raw, settings.component_ml / per_voxel_ml)
    if large > settings.max_components:
        reasons.append(
            f"{large} components of >= {settings.component_ml:g} mL before post-processing (more than "
            f"{settings.max_components}, max_components)"
        )
    return reasons


def border_fraction(mask: torch.Tensor) -> float:
    """Share of the volume's border voxels (its six faces, each voxel once) that are in `mask`."""
    inner = mask[1:-1, 1:-1, 1:-1]
    border_voxels = mask.numel() - inner.numel()
    return (float(mask.sum()) - float(inner.sum())) / border_voxels if border_voxels else 0.0


def large_components(mask: torch.Tensor, min_voxels: float) -> int:
    """How many 3D connected components (26-connected, as the largest_component post-processing sees them)
    hold at least `min_voxels` voxels."""
    labels, count = ndimage.label(mask.cpu().numpy(), structure=np.ones((3, 3, 3), dtype=bool))
    if count == 0:
        return 0
    sizes = np.bincount(labels.ravel())[1:]
    return int((sizes >= math.ceil(min_voxels)).sum())


def disagreement_reasons(mean_pairwise_dice: float, review_below: float) -> list[str]:
    """The voters' disagreement (la_seg.inference.Agreement) as a review reason."""
    if not mean_pairwise_dice < review_below:
        return []
    agreement = f"mean pairwise Dice {mean_pairwise_dice:.4f}"
    return [f"voters disagree: {agreement} below review_below {review_below:.4g}"]


def expected_dice(prob: torch.Tensor, mask: torch.Tensor) -> float:
    """The Dice `mask` would have if the model's probabilities were right (each voxel LA with probability
    `prob`): 2 sum(p m) / (sum(p) + sum(m)), 1 when both are empty; 4 decimals. It is low where much of what
    the model marked, or left out, it was unsure of: on phantoms unlike its training it ranked the cases by
    their true Dice (Spearman 0.83, benchmarks/README.md, round 12), which no volume rule sees."""
    prob, mask = prob.float(), mask.float()
    denominator = float(prob.sum() + mask.sum())
    return 1.0 if denominator == 0 else round(2.0 * float((prob * mask).sum()) / denominator, 4)


def doubt_reasons(expected: float, review_expected_dice: float) -> list[str]:
    """The model's own doubt (`expected_dice`) as a review reason."""
    if not expected < review_expected_dice:
        return []
    doubt = f"expected Dice {expected:.4f}"
    return [f"model unsure: {doubt} below review_expected_dice {review_expected_dice:.4g}"]


def failed_run_reasons(best_dice: Sequence[float | None], floor: float) -> list[str]:
    """The review reason when a voting checkpoint's run (the best val/dice each run reached, None: unknown)
    is below the floor: its masks may look plausible and still be wrong. The console's warning names the
    checkpoints; the reason does not, so that a table is the same whichever way its path was typed."""
    failed = [f"{dice:.4f}" for dice in best_dice if failed_run(dice, floor)]
    if not failed:
        return []
    which = "its run" if len(best_dice) == 1 else f"{len(failed)} of {len(best_dice)} ensemble members' runs"
    scores = ", ".join(failed)
    return [f"failed run: {which} reached a best val/dice of only {scores}, below min_val_dice {floor:g}"]


def failed_run(best_dice: float | None, floor: float) -> bool:
    """Whether a run's best val/dice (None or NaN: unknown, no verdict) is below the floor."""
    return best_dice is not None and not math.isnan(best_dice) and best_dice < floor


def review_fields(reasons: Sequence[str]) -> dict:
    """The REVIEW_COLUMNS of a table row: the flag and its reasons as one text (empty: nothing to review)."""
    return dict(zip(REVIEW_COLUMNS, (bool(reasons), "; ".join(reasons)), strict=True))


def review_line(case_id: str, where: str, reason: str) -> str:
    """The one console line of a flagged case, naming it and its file."""
    return f"la-seg: review {case_id} ({where}): {reason}"


def low_dice_warning(best_dice: float | None, floor: float, what: str) -> str | None:
    """One warning line when `what`'s best validation Dice is below the floor (None: nothing to say)."""
    if not failed_run(best_dice, floor):
        return None
    return (
        f"la-seg: warning: {what} reached a best val/dice of only {best_dice:.4f}, below "
        f"{floor:g} (model.plausibility.min_val_dice): training did not work, do not trust its masks"
    )
