"""Plausibility rules (la_seg/plausibility.py), each on its own, and their use: a phantom's true label is
never flagged, calibration never chooses an implausible setting, a checkpoint's best val/dice is read back."""

import math

import numpy as np
import pytest
import torch

from la_seg.callbacks.calibration import choose
from la_seg.checkpoints import best_validation_dice
from la_seg.data.synthetic import synthesize_case
from la_seg.errors import DataError
from la_seg.inference import case_agreement
from la_seg.plausibility import (
    Plausibility,
    border_fraction,
    case_reasons,
    disagreement_reasons,
    doubt_reasons,
    expected_dice,
    failed_run_reasons,
    large_components,
    low_dice_warning,
    review_fields,
)

SPACING = (1.0, 1.0, 2.0)  # 2 mm^3 per voxel: 500 voxels = 1 mL


def box(shape=(60, 60, 30), low=(20, 20, 10), size=(20, 20, 10)) -> torch.Tensor:
    """A block of size[0] * size[1] * size[2] voxels inside a `shape` volume."""
    mask = torch.zeros(shape, dtype=torch.bool)
    mask[tuple(slice(lo, lo + n) for lo, n in zip(low, size, strict=True))] = True
    return mask


def test_a_plausible_mask_has_no_reason():
    assert case_reasons(box(), SPACING) == []  # 4000 voxels = 8 mL, inside the volume, one component
    assert review_fields([]) == {"review": False, "review_reason": ""}


def test_an_empty_mask_is_flagged():
    assert case_reasons(torch.zeros(8, 8, 8, dtype=torch.bool), SPACING) == ["empty mask"]


def test_a_volume_outside_the_range_is_flagged_with_the_setting_named():
    (small,) = case_reasons(box(size=(10, 10, 10)), SPACING)  # 2 mL
    assert small == "LA volume 2.0 mL below 5 mL (min_volume_ml)"
    (large,) = case_reasons(box(size=(20, 20, 10)), SPACING, settings=Plausibility(max_volume_ml=6.0))
    assert large == "LA volume 8.0 mL above 6 mL (max_volume_ml)"
    # the voxel's true volume (sheared axes) wins over the spacings' product
    assert "0.8 mL below" in case_reasons(box(), SPACING, voxel_mm3=0.2)[0]


def test_a_mask_along_the_border_is_flagged():
    everything = torch.ones(20, 20, 10, dtype=torch.bool)
    assert border_fraction(everything) == 1.0 and border_fraction(box()) == 0.0
    reasons = case_reasons(everything, SPACING, settings=Plausibility(max_volume_ml=1e6))
    assert reasons == ["mask covers 100 % of the volume's border (above 10 %, max_border_fraction)"]
    one_face = box(shape=(20, 20, 10), low=(0, 0, 3), size=(1, 20, 4))  # 80 of 20*20*10 - 18*18*8 border
    assert border_fraction(one_face) == pytest.approx(80 / 1408)


def test_many_large_components_before_post_processing_are_flagged():
    pieces = torch.zeros(80, 80, 20, dtype=torch.bool)
    for i in range(4):  # four 1.6 mL blocks, apart
        pieces |= box((80, 80, 20), (2 + 20 * i, 30, 5), (10, 10, 8))
    assert large_components(pieces, 500) == 4 and large_components(pieces, 801) == 0
    (reason,) = case_reasons(pieces, SPACING)
    assert reason == "4 components of >= 1 mL before post-processing (more than 3, max_components)"
    # judged on the mask before post-processing: one kept component does not hide the others
    kept = pieces & box((80, 80, 20), (2, 30, 5), (10, 10, 8))
    assert "components" in case_reasons(kept, SPACING, raw=pieces, settings=Plausibility(min_volume_ml=1))[0]
    # touching diagonally is one component, as the largest_component post-processing sees it
    diagonal = box((10, 10, 10), (0, 0, 0), (2, 2, 2)) | box((10, 10, 10), (2, 2, 2), (2, 2, 2))
    assert large_components(diagonal, 1) == 1


def test_reasons_combine_into_one_flag_and_text():
    fields = review_fields(["empty mask", *disagreement_reasons(0.8, 0.9)])
    assert fields == {
        "review": True,
        "review_reason": "empty mask; voters disagree: mean pairwise Dice 0.8000 below review_below 0.9",
    }
    assert disagreement_reasons(0.9, 0.9) == []  # 0.9000 is not below 0.9
    agreement = case_agreement([box(), box()], ["a", "b"], SPACING, "none", review_below=0.95)
    assert agreement["review_below"] == 0.95 and not agreement["review"]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"min_volume_ml": 10.0, "max_volume_ml": 5.0},
        {"max_border_fraction": 0.0},
        {"max_components": 0},
        {"min_val_dice": 1.5},
    ],
)
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(DataError, match="plausibility"):
        Plausibility(**kwargs)


def test_the_low_dice_warning_names_the_run_and_the_floor():
    warning = low_dice_warning(0.0, 0.5, "run runs/demo/version_0")
    assert warning.startswith("la-seg: warning: run runs/demo/version_0 reached a best val/dice of only 0.0")
    assert "model.plausibility.min_val_dice" in warning and "\n" not in warning
    assert low_dice_warning(0.93, 0.5, "run") is None
    assert low_dice_warning(None, 0.5, "run") is None and low_dice_warning(math.nan, 0.5, "run") is None


def test_every_voting_checkpoint_of_a_failed_run_is_a_review_reason():
    runs = [0.12, 0.91, None, math.nan, 0.3]  # unknown (None, NaN): no verdict
    assert failed_run_reasons(runs, 0.5) == [
        "failed run: 2 of 5 ensemble members' runs reached a best val/dice of only 0.1200, 0.3000, below "
        "min_val_dice 0.5"
    ]
    assert failed_run_reasons([0.12], 0.5) == [
        "failed run: its run reached a best val/dice of only 0.1200, below min_val_dice 0.5"
    ]
    assert failed_run_reasons(runs, 0.0) == [] and failed_run_reasons([None], 0.5) == []


def test_the_best_validation_dice_is_read_from_the_checkpoint_callback_state():
    checkpoint = {
        "callbacks": {
            "RunCheckpoint{'monitor': 'val/dice', 'mode': 'max'}": {
                "monitor": "val/dice",
                "best_model_score": torch.tensor(0.125),
            },
            "RunCheckpoint{'monitor': 'val/loss', 'mode': 'min'}": {
                "monitor": "val/loss",
                "best_model_score": torch.tensor(0.9),
            },
        }
    }
    assert best_validation_dice(checkpoint) == 0.125
    assert best_validation_dice({"callbacks": {}}) is None and best_validation_dice({}) is None


@pytest.mark.parametrize("shape", [(160, 160, 40), (240, 240, 60)])  # 100 mm hearts; `synth`'s adult ones
@pytest.mark.parametrize("case", range(6))
def test_a_phantoms_true_label_is_not_flagged(case, shape):
    """LAScarQS's spacing, small and adult-size hearts, held-out seed 77: a right answer is never flagged."""
    spacing = (0.625, 0.625, 2.5)
    _, label = synthesize_case(np.random.default_rng([77, case]), shape, spacing)
    mask = torch.from_numpy(label > 0)
    assert case_reasons(mask, spacing) == []


def _table(entries):
    """A calibration score table: (key, Dice, implausible cases) per setting; every volume right."""
    return {
        key: {
            "dice": dice,
            "dice_per_case": [dice],
            "hd95_mm": 2.0,
            "volume_error_pct": [0.0],
            "implausible": implausible,
        }
        for key, dice, implausible in entries
    }


def test_calibration_never_chooses_an_implausible_setting():
    huge = {"train_3": "LA volume 1186.0 mL above 300 mL (max_volume_ml)"}
    table = _table(
        [
            ("0.3/none", 0.95, huge),  # the best Dice, but one validation case's LA is absurd
            ("0.3/largest_component", 0.95, huge),
            ("0.5/none", 0.90, {}),
            ("0.5/largest_component", 0.91, {}),
        ]
    )
    # configured 0.3 implausible
    assert choose(table, 0.3, 0.001, 0.01, 5.0, 0.05) == (0.5, "largest_component")
    assert choose(table, 0.5, 0.001, 0.1, 5.0, 0.05) == (0.5, "largest_component")
    every = _table([(key, entry["dice"], huge) for key, entry in table.items()])
    assert choose(every, 0.5, 0.001, 0.01, 5.0, 0.05) is None  # nothing plausible: nothing chosen


def test_expected_dice_is_the_masks_dice_if_the_probabilities_were_right():
    """Sure of every voxel: 1. Unsure (0.6 inside the mask, 0.4 in as many voxels around it): 2 * 0.6 n /
    (0.6 n + 0.4 n + n) = 0.6. Nothing marked while the model gave LA a chance: 0; nothing anywhere: 1."""
    mask = box()
    assert expected_dice(mask.float(), mask) == 1.0
    around = box(low=(10, 20, 10), size=(40, 20, 10)) & ~mask  # as many voxels as the mask
    assert int(around.sum()) == int(mask.sum())
    unsure = 0.6 * mask.float() + 0.4 * around.float()
    assert expected_dice(unsure, mask) == pytest.approx(0.6)
    assert expected_dice(unsure, torch.zeros_like(mask)) == 0.0
    assert expected_dice(torch.zeros(mask.shape), torch.zeros_like(mask)) == 1.0


def test_doubt_is_a_reason_only_below_the_level():
    assert doubt_reasons(0.95, 0.0) == [] and doubt_reasons(0.93, 0.93) == []
    (reason,) = doubt_reasons(0.8412, 0.93)
    assert reason == "model unsure: expected Dice 0.8412 below review_expected_dice 0.93"
