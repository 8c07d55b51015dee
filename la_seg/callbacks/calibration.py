"""Inference settings chosen on the validation cases at the end of fit, as nnU-Net chooses post-processing.

When training ends, the best checkpoint's weights segment every validation case. First the post-processing
(POSTPROCESSING) at the configured threshold: the higher mean 3D Dice, near-ties (within `tie_dice`) going
to `largest_component` (it only removes islands, which barely move Dice but ruin HD95, and
validation cases may have none: on the accuracy benchmark a tie went to `none` by 0.0006 Dice and held-out
islands raised mean HD95 from ~3 to ~10 mm). Then the threshold, on a small grid with that post-processing:
among those whose mean validation Dice is within `dice_margin` of the best, the one that puts the most
validation cases' LA volume within +-`volume_tolerance` % of the reference (the volume is what a clinician
reads; Dice hardly moves between neighbouring thresholds), on a tie the higher Dice. (A handful of validation
cases is a noisy judge of Dice: on the accuracy benchmark the best-Dice threshold, 0.3, gained 0.007 on
validation and over-segmented held-out cases by 7-12 % of their LA volume; batch-Dice models under-segmented
every validation case by 3-7 % at 0.5, and 0.4 put 6 of 6 within +-5 % and 82 % of the held-out cases
against 63-67 %.) The configured threshold stands, though, unless the validation cases, taken as distinct
patients, show it wrong beyond their own spread (`evidence_p`): their LA-volume errors at it differ from
zero on average (a one-sample t-test), or another threshold's Dice beats it case by case (a paired t-test).
Patients differ more than thresholds do: on the accuracy benchmark the rule alone chose 0.6 or 0.3 on one,
three or six validation hearts where the configured 0.5 scored as well or better in every comparison on
held-out hearts (benchmarks/README.md rounds 18-20), while six validation cases all 3-7 % short carry the
move to 0.4.

The review threshold is set to the `review_quantile` quantile of the validation cases' agreement (mean
pairwise Dice of the test-time views' masks, each after the chosen post-processing, as test and predict judge
it: la_seg.inference.voter_agreements), once per test-time augmentation with several voters that the model
was trained for (`flips` and `rot180` with data.augmentation.hflip and vflip, `gamma` with a training gamma
range that reaches 0.8 and 1.2: their agreements differ in level, so each has its own threshold,
`how.review_below_by_tta`, which test / predict take for the `model.tta` they run): a held-out case is
flagged when its voters agree less than all but that fraction of the validation cases did. `review_below`
itself is that of the configured model.tta (of `flips` for `none`, which an ensemble's members use), or the
configured one where the model was not trained for those views (`how.review_below_voters` says which); views
the model was not trained for get none (they show it slices it never saw, and test / predict refuse them).
Likewise, with or without voters, `review_expected_dice` is the `review_quantile` quantile of the validation
cases' expected Dice (la_seg.plausibility.expected_dice) at the chosen setting: a case is flagged when the
model is less sure of its mask than of all but that fraction of the validation cases; and it is raised above
the expected Dice of every validation case whose mask's Dice is below `review_dice`, so that a mask as
doubtful as a validation failure is never passed. (A quantile says how unsure the model is relative to itself:
on the accuracy benchmark a 5-heart model's 3 validation cases all scored about 0.7, their 0.1 quantile was
their minimum, and it flagged 1 of 16 training-family cases below Dice 0.8.) All of it, with the scores it was
chosen on, goes into the best checkpoint (`la_seg.checkpoints.write_calibration`); validate / test / predict
then use those settings unless they are given on the command line, and reports record them
(`inference.calibration`).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from scipy import stats

from la_seg.checkpoints import load_checkpoint, write_calibration
from la_seg.errors import DataError
from la_seg.inference import (
    POSTPROCESSING,
    TTA_VIEWS,
    check_tta_trained,
    postprocess_mask,
    voter_agreements,
)
from la_seg.metrics import overlap_3d, surface_distances
from la_seg.plausibility import case_reasons, expected_dice
from la_seg.progress import tracked

# The test-time augmentations with several voters, each calibrated a review threshold of its own.
REVIEW_TTA = ("flips", "rot180", "gamma")


class InferenceCalibration(L.Callback):
    """Chooses threshold, post-processing and review threshold on the validation cases when fit ends.

    Args:
        enabled: calibrate at the end of every fit that has validation cases and a best checkpoint.
        thresholds: the probability thresholds compared (with each post-processing).
        review_quantile: the review thresholds are this quantile of the validation cases' agreement (per
            test-time augmentation with several voters) and of their expected Dice.
        review_dice: a validation case whose mask's Dice is below this is a failure review must catch:
            review_expected_dice is raised above its expected Dice (0: never raised).
        tie_dice: mean Dice differences up to this between post-processings count as a tie, which goes to
            `largest_component`.
        dice_margin: thresholds whose mean validation Dice is more than this below the best are never chosen.
        volume_tolerance: a validation case's LA volume counts as right within this many % of the reference.
        evidence_p: the configured threshold is kept unless a t-test over the validation cases rejects it at
            this level (their volume errors at it differ from zero, or another threshold's Dice is higher);
            1.0: the thresholds always compete.
    """

    def __init__(
        self,
        enabled: bool = True,
        thresholds: Sequence[float] = (0.3, 0.4, 0.5, 0.6),
        review_quantile: float = 0.1,
        review_dice: float = 0.8,
        tie_dice: float = 0.001,
        dice_margin: float = 0.01,
        volume_tolerance: float = 5.0,
        evidence_p: float = 0.05,
    ) -> None:
        if not thresholds or not all(0.0 < t < 1.0 for t in thresholds):
            raise DataError(
                f"calibration.thresholds must lie strictly between 0 and 1, got {list(thresholds)}"
            )
        if not 0.0 <= review_quantile <= 1.0:
            raise DataError(f"calibration.review_quantile must be in [0, 1], got {review_quantile}")
        if not 0.0 <= review_dice <= 1.0:
            raise DataError(f"calibration.review_dice must be in [0, 1], got {review_dice}")
        if not volume_tolerance > 0.0:
            raise DataError(
                f"calibration.volume_tolerance must be a positive percentage, got {volume_tolerance}"
            )
        if not 0.0 < evidence_p <= 1.0:
            raise DataError(f"calibration.evidence_p must be in (0, 1], got {evidence_p}")
        self.enabled = enabled
        self.thresholds = tuple(float(t) for t in thresholds)
        self.review_quantile = float(review_quantile)
        self.review_dice = float(review_dice)
        self.tie_dice = float(tie_dice)
        self.dice_margin = float(dice_margin)
        self.volume_tolerance = float(volume_tolerance)
        self.evidence_p = float(evidence_p)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """After the last validation (best checkpoint written), on the training device; rank zero only."""
        if not self.enabled or trainer.sanity_checking:
            return
        callback = trainer.checkpoint_callback
        path = getattr(callback, "best_model_path", "") if callback is not None else ""
        cases = trainer.datamodule.cases("val") if trainer.datamodule is not None else []
        if not path or not Path(path).is_file() or not cases:
            rank_zero_warn(
                "calibration: no best checkpoint or no validation cases; inference settings not chosen"
            )
            return
        if trainer.is_global_zero:
            with trainer.precision_plugin.forward_context():
                record = self.calibrate(pl_module, trainer.datamodule, path)
            if record["settings"] is None:
                rank_zero_warn(f"calibration: {record['how']['refused']}; the configured settings apply")
            else:
                write_calibration(path, record)
                chosen, failures = record["settings"], record["how"]["review_expected_dice_raised_by"]
                raised = (
                    f" (above that of the {len(failures)} with Dice below review_dice {self.review_dice:g}: "
                    f"{', '.join(failures)})"
                    if failures
                    else ""
                )
                how = record["how"]
                evidence = how["evidence_against_configured"]
                why = (
                    f"chosen on validation, which rejects the configured {how['configured_threshold']:g}: "
                    f"{evidence}"
                    if evidence
                    else f"as configured: validation shows no evidence against it at p < {self.evidence_p:g}"
                )
                review_below = describe_review_below(chosen["review_below"], how)
                rank_zero_info(
                    f"calibration on {len(cases)} validation cases: threshold {chosen['threshold']} ({why}), "
                    f"postprocess {chosen['postprocess']}, review_below {review_below}, "
                    f"review_expected_dice {chosen['review_expected_dice']:.4f}{raised}; stored in {path}"
                )
                if failures:
                    rank_zero_warn(
                        f"calibration: {len(failures)} of {len(cases)} validation cases have Dice below "
                        f"{self.review_dice:g} (calibration.review_dice): masks the model is as unsure of "
                        "will be flagged for review"
                    )
        trainer.strategy.barrier("la_seg_calibration")

    @torch.no_grad()
    def calibrate(self, pl_module, datamodule, path: str) -> dict:
        """The record for `path`'s weights (loaded into `pl_module`) on the data module's validation cases;
        its settings are None when no setting gives plausible masks on every case (`how.refused` says why).
        Reports its progress (la_seg.progress): on large validation sets this takes minutes."""
        checkpoint = load_checkpoint(path)
        pl_module.on_load_checkpoint(checkpoint)
        pl_module.load_state_dict(checkpoint["state_dict"])
        pl_module.eval()
        dataset = datamodule.volume_dataset(datamodule.cases("val"), with_labels=True, cache="none")
        configured = float(pl_module.hparams.threshold)
        thresholds = sorted({*self.thresholds, configured})
        combos = list(itertools.product(thresholds, POSTPROCESSING))
        scores: dict[tuple[float, str], list[tuple[float, float, float | None]]] = {c: [] for c in combos}
        implausible: dict[tuple[float, str], dict[str, str]] = {c: {} for c in combos}  # case id -> why
        expected: dict[tuple[float, str], list[float]] = {c: [] for c in combos}  # per case, the model's own
        volumes = []  # per case, on the CPU: what the test-time views need again
        ensemble, device = pl_module.ensemble(), pl_module.device
        chunk, tta = pl_module.eval_chunk(device), pl_module.hparams.tta
        for item in tracked(dataset, "calibration: validation cases segmented", len(dataset)):
            image, label = item["image"].to(device), item["label"].to(device).bool()
            geometry = item["geometry"]
            spacing, voxel_mm3 = geometry.slices_last_spacing, getattr(geometry, "voxel_volume_mm3", None)
            prob = ensemble.segment_volume(image, 0.5, chunk, tta, spacing).prob
            reference = float(label.sum())  # LA voxels: the volume error is a ratio of counts
            for threshold, post in combos:
                mask = postprocess_mask(prob > threshold, post)
                dice = overlap_3d(mask, label)[0]
                hd95 = surface_distances(mask, label, spacing)[0]  # NaN for an empty mask: left out
                volume_error = 100.0 * (float(mask.sum()) / reference - 1.0) if reference else None
                scores[(threshold, post)].append((dice, hd95, volume_error))
                expected[(threshold, post)].append(expected_dice(prob, mask))
                # the mask this setting delivers: stray pieces its post-processing removes do not make it
                # wrong (they still flag the case at test and predict, where the raw mask is judged)
                reasons = case_reasons(mask, spacing, voxel_mm3, settings=pl_module.plausibility)
                if reasons:
                    implausible[(threshold, post)][item["case_id"]] = "; ".join(reasons)
            volumes.append((item["image"], spacing))
        table = {
            f"{t}/{p}": {
                "dice": float(np.mean([d for d, _, _ in s])),
                "dice_per_case": [round(d, 4) for d, _, _ in s],  # what the paired t-test compares
                "hd95_mm": float(np.nanmean([h for _, h, _ in s]))
                if any(not math.isnan(h) for _, h, _ in s)
                else None,
                # signed LA-volume error in % of the reference per validation case (None: no LA), what a
                # clinician reads from the mask
                "volume_error_pct": [None if v is None else round(v, 2) for _, _, v in s],
                # validation cases whose mask cannot be right (la_seg.plausibility): never chosen
                "implausible": implausible[(t, p)],
            }
            for (t, p), s in scores.items()
        }
        chosen = choose(
            table, configured, self.tie_dice, self.dice_margin, self.volume_tolerance, self.evidence_p
        )
        if chosen is None:
            (key, cases), *_ = sorted(table.items(), key=lambda kv: len(kv[1]["implausible"]))
            case_id, why = next(iter(cases["implausible"].items()))
            refused = (
                f"no threshold and post-processing gives plausible masks on every validation case (the "
                f"fewest implausible, {key}: {len(cases['implausible'])} case(s), e.g. {case_id}: {why})"
            )
            return {"settings": None, "how": {"checkpoint": str(path), "refused": refused, "scores": table}}
        threshold, post = chosen
        evidence = evidence_against(table, configured, post, self.evidence_p)
        # views the model was not trained for show it slices it never saw: their agreement measures no doubt
        trained = [voters for voters in REVIEW_TTA if trained_for(voters, datamodule)]
        agreements: dict[str, list[float]] = {voters: [] for voters in trained}
        if trained:
            # every view once per case (the identity and flip XY vote in several model.tta): the module's own
            # net, whose views are then the voters, by name
            views = tuple(dict.fromkeys(view for voters in trained for view in TTA_VIEWS[voters]))
            what = f"calibration: agreement under tta {' and '.join(trained)}, cases"
            for image, spacing in tracked(volumes, what, len(volumes)):
                result = ensemble.segment_volume(image.to(device), threshold, chunk, views, spacing)
                masks = dict(zip(result.voter_names, result.voter_masks, strict=True))
                by_voters = voter_agreements(masks, [TTA_VIEWS[v] for v in trained], spacing, post)
                for voters, agreement in zip(trained, by_voters, strict=True):
                    agreements[voters].append(agreement["mean_pairwise_dice"])
        by_tta = {v: validation_quantile(a, self.review_quantile) for v, a in agreements.items()}
        voters = review_voters(tta, by_tta)
        review_below = by_tta[voters] if voters is not None else pl_module.review_below()
        doubt = expected[(threshold, post)]
        case_ids = [c.case_id for c in dataset.cases]
        dice = [round(d, 4) for d, _, _ in scores[(threshold, post)]]
        level, failures = doubt_level(doubt, dice, case_ids, self.review_quantile, self.review_dice)
        return {
            "settings": {
                "threshold": threshold,
                "postprocess": post,
                "review_below": review_below,
                "review_expected_dice": level,
            },
            "how": {
                "checkpoint": str(path),
                "validation_cases": case_ids,
                "tta": tta,
                "rule": "only settings whose masks, after their post-processing, are plausible "
                "(la_seg.plausibility) on every validation case; post-processing: higher mean Dice at the "
                "configured threshold, within tie_dice largest_component; threshold: the configured one "
                "unless a t-test over the validation cases rejects it at evidence_p (volume errors at it "
                "differ from zero, or another threshold's Dice is higher case by case), else of those within "
                "dice_margin of the best mean Dice, the most validation cases with LA volume within "
                "+-volume_tolerance %, on a tie the higher Dice",
                "plausibility": dataclasses.asdict(pl_module.plausibility),
                "configured_threshold": configured,
                "evidence_p": self.evidence_p,
                # why validation rejects the configured threshold (None: it does not, and it was kept)
                "evidence_against_configured": evidence,
                "tie_dice": self.tie_dice,
                "dice_margin": self.dice_margin,
                "volume_tolerance": self.volume_tolerance,
                "scores": table,
                "review_rule": f"quantile {self.review_quantile} of the validation cases' agreement (mean "
                "pairwise Dice of the voters' masks after the chosen post-processing) of the voters of each "
                "model.tta the model was trained for: flips (identity, "
                "flip X, flip Y, flip XY), rot180 (identity, flip XY), gamma (identity, gamma 0.8, gamma "
                "1.2); review_below is that of the configured model.tta (flips for none)"
                if voters is not None
                else "kept as configured: the model was not trained for the test-time views of the "
                "configured model.tta (flips for none), so their agreement says nothing",
                "review_below_by_tta": by_tta,
                # whose level review_below is (None: the configured one, the model not trained for them)
                "review_below_voters": voters,
                "review_quantile": self.review_quantile,
                # between which shares of cases like the validation cases a level set so flags, on average
                "review_flag_share": list(flag_share(len(case_ids), self.review_quantile)),
                # what the voters' masks went through before they were compared (la-seg 0.1.0 until
                # 2026-12-06 compared them raw: such records lack this field)
                "agreement_postprocess": post,
                "review_expected_dice_rule": f"quantile {self.review_quantile} of the validation cases' "
                "expected Dice (la_seg.plausibility.expected_dice) at the chosen threshold and "
                f"post-processing, raised above the expected Dice of every validation case whose Dice is "
                f"below review_dice {self.review_dice}",
                "review_dice": self.review_dice,
                "review_expected_dice_raised_by": failures,
                "validation_expected_dice": doubt,
                "validation_dice": dice,
                "validation_agreement": agreements.get("flips", []),
                "validation_agreement_by_tta": agreements,
            },
        }


def choose(
    table: dict[str, dict],
    configured: float,
    tie_dice: float,
    dice_margin: float,
    volume_tolerance: float,
    evidence_p: float,
) -> tuple[float, str] | None:
    """(threshold, post-processing) from a score table {"<threshold>/<post>": {"dice", "dice_per_case",
    "volume_error_pct", "implausible"}}, among the settings without implausible validation cases (None:
    there is none): the post-processing at the configured threshold (Dice, near-ties to largest_component;
    where the configured threshold is implausible, each at its best plausible threshold), then the threshold:
    the configured one unless the validation cases reject it (`evidence_against`), else within dice_margin
    of the best Dice the most cases within +-volume_tolerance % of their LA volume, on a tie the higher
    Dice."""

    def entry(threshold: float, post: str) -> dict:
        return table[f"{threshold}/{post}"]

    keys = [key.split("/") for key, scores in table.items() if not scores.get("implausible")]
    plausible = [(float(t), p) for t, p in keys]
    if not plausible:
        return None
    at_configured = {p: entry(t, p)["dice"] for t, p in plausible if t == configured}
    if not at_configured:
        at_configured = {p: max(entry(u, q)["dice"] for u, q in plausible if q == p) for _, p in plausible}
    best = max(at_configured.values())
    near = [p for p, dice in at_configured.items() if dice >= best - tie_dice]
    post = "largest_component" if "largest_component" in near else near[0]
    thresholds = sorted(t for t, p in plausible if p == post)
    if evidence_against(table, configured, post, evidence_p) is None:
        return configured, post
    best_dice = max(entry(t, post)["dice"] for t in thresholds)
    eligible = [t for t in thresholds if entry(t, post)["dice"] >= best_dice - dice_margin]

    def within(threshold: float) -> int:
        errors = entry(threshold, post)["volume_error_pct"]
        return sum(e is not None and abs(e) <= volume_tolerance for e in errors)

    return max(eligible, key=lambda t: (within(t), entry(t, post)["dice"])), post


def evidence_against(table: dict[str, dict], configured: float, post: str, evidence_p: float) -> str | None:
    """Why the validation cases reject the configured threshold with post-processing `post`, or None: its
    masks are implausible on some case, or, at p < evidence_p, their signed LA-volume errors at it differ from
    zero (two-sided one-sample t-test) or another threshold's per-case Dice is higher (one-sided paired
    t-test, Bonferroni-corrected for the thresholds compared). Each case counts as a patient of its own;
    fewer than two cases carry no such evidence. evidence_p 1 rejects it always."""
    if evidence_p >= 1.0:
        return "calibration.evidence_p is 1: every threshold competes"
    at_configured = table[f"{configured}/{post}"]
    if at_configured.get("implausible"):
        return (
            f"implausible masks at {configured:g} on {len(at_configured['implausible'])} validation case(s)"
        )
    errors = [e for e in at_configured["volume_error_pct"] if e is not None]
    p = t_test_p(errors, "two-sided")
    if p < evidence_p:
        return f"LA volumes at {configured:g} off by {np.mean(errors):+.1f} % on average (p {p:.3g})"
    others = {}  # the other plausible thresholds with this post-processing
    for key, scores in table.items():
        threshold, other_post = key.split("/")
        if other_post == post and float(threshold) != configured and not scores.get("implausible"):
            others[threshold] = scores
    for threshold, scores in others.items():
        gains = np.subtract(scores["dice_per_case"], at_configured["dice_per_case"])
        p = min(1.0, t_test_p(gains, "greater") * len(others))  # Bonferroni: one test per threshold compared
        if p < evidence_p:
            return f"Dice at {threshold} higher by {np.mean(gains):+.4f} case by case (p {p:.3g})"
    return None


def t_test_p(values: Sequence[float], alternative: str) -> float:
    """p of a one-sample t-test of `values` against a mean of zero (1.0 for fewer than two values; values that
    all agree are certain evidence when they are not zero and in the direction tested)."""
    if len(values) < 2:
        return 1.0
    if np.ptp(values) == 0:
        return 0.0 if values[0] > 0 or (values[0] < 0 and alternative == "two-sided") else 1.0
    return float(stats.ttest_1samp(values, 0.0, alternative=alternative).pvalue)


def validation_quantile(values: Sequence[float], quantile: float) -> float:
    """A review level from the validation cases' values (agreement, expected Dice): their `quantile` quantile,
    linear between order statistics (with 6 cases and 0.1: halfway between the lowest two; flag_share says
    what share of cases like them falls below it)."""
    return float(np.quantile(values, quantile))


def judging_voters(tta: str) -> str:
    """The test-time views whose level the stored review_below is: the configured model.tta's, flips' for
    none (an ensemble's members use that level)."""
    return "flips" if tta == "none" else tta


def review_voters(tta: str, calibrated: dict[str, float]) -> str | None:
    """judging_voters(tta) where their level was calibrated; None where the model was not trained for those
    views, so that review_below stays as configured."""
    voters = judging_voters(tta)
    return voters if voters in calibrated else None


def describe_review_below(review_below: float, how: dict) -> str:
    """review_below as fit's calibration line states it: whose quantile it is and what share of cases like
    the validation cases it flags, or that it is the configured level and which model.tta have their own."""
    text = f"{review_below:.4f}"
    voters, calibrated = how.get("review_below_voters"), how.get("review_below_by_tta") or {}
    if voters is not None:
        low, high = (round(100 * share) for share in how["review_flag_share"])
        share = f"{low} %" if low == high else f"{low}-{high} %"
        cases = len(how["validation_cases"])
        return (
            f"{text} (a {how['review_quantile']:g} quantile of {cases} cases' agreement under tta {voters}: "
            f"it flags {share} of cases like them on average)"
        )
    if calibrated:
        others = ", ".join(f"{tta} {level:.4f}" for tta, level in calibrated.items())
        return (
            f"{text} (as configured: the model was not trained for tta {judging_voters(how['tta'])}; "
            f"test / predict with a model.tta it was trained for take that one's level: {others})"
        )
    return text


def flag_share(cases: int, quantile: float) -> tuple[float, float]:
    """Between which shares of new cases like the validation cases (exchangeable, no ties) fall below
    validation_quantile of `cases` of them, on average: below the k-th lowest of n, k / (n + 1) whatever
    their distribution, and the quantile lies between two neighbouring order statistics (where exactly
    depends on the distribution). With 6 cases at 0.1: between 1/7 and 2/7, not 0.1."""
    position = (cases - 1) * quantile  # 0-based, between order statistics k and k + 1 (1-based k + 1, k + 2)
    lower = math.floor(position)
    upper = lower if position == lower else lower + 1
    return (lower + 1) / (cases + 1), (upper + 1) / (cases + 1)


def doubt_level(
    expected: Sequence[float],
    dice: Sequence[float],
    case_ids: Sequence[str],
    quantile: float,
    review_dice: float,
) -> tuple[float, list[str]]:
    """review_expected_dice from the validation cases' expected and true Dice: their `quantile` quantile of
    expected Dice, raised just above (by 1e-4, expected Dice has 4 decimals) the expected Dice of every case
    whose true Dice is below `review_dice`; and the ids of those cases, least sure first."""
    level = validation_quantile(expected, quantile)
    failures = sorted((e, c) for e, d, c in zip(expected, dice, case_ids, strict=True) if d < review_dice)
    if failures:
        level = max(level, min(1.0, round(failures[-1][0] + 1e-4, 4)))
    return level, [c for _, c in failures]


def trained_for(tta: str, datamodule) -> bool:
    """Whether the training augmentation makes the model invariant to the test-time views of `tta`
    (inference's rule)."""
    try:
        check_tta_trained(tta, dataclasses.asdict(datamodule.augmentation), "the model")
    except DataError:
        return False
    return True
