"""The checkpoint rule, applied to a parsed `la-seg` config: what `--ckpt_path` names (a file, best / last of
the configured run, a list or a folder of fold runs), and the settings that come from that checkpoint (the
network, how its input was made, the inference settings chosen on validation, the data it was trained on).

The checkpoint format itself is la_seg/checkpoints.py's; the run folders are la_seg/runs.py's.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from la_seg.checkpoints import (
    CALIBRATED_FIELDS,
    INPUT_DEFAULTS,
    NETWORK_FIELDS,
    best_validation_dice,
    check_member_input,
    check_one_cross_validation,
    check_settings,
    checkpoint_list,
    legacy_orientation_note,
    load_checkpoint,
    network_settings,
    network_to_rebuild,
    stored_calibration,
    trained_data,
    training_augmentation,
)
from la_seg.data.datamodule import LADataModule
from la_seg.distributed import say
from la_seg.errors import DataError
from la_seg.inference import check_tta_trained
from la_seg.models.segmenter import SegmenterConfig
from la_seg.module import load_member
from la_seg.plausibility import low_dice_warning
from la_seg.runs import RunLayout, find_checkpoint
from la_seg.runtime import on_command_line

EVALUATING = ("validate", "test", "predict")  # the subcommands that need trained weights


@dataclass
class ResolvedCheckpoints:
    """What `--ckpt_path` named: every member's checkpoint file (Lightning loads the first; the others join
    the model as ensemble members) and the checkpoints already read, by path (each is read once)."""

    given: str
    paths: list[str]
    preloaded: dict[str, dict] = dataclasses.field(default_factory=dict)

    @property
    def resolved(self) -> str:
        """What `--ckpt_path given` stands for, as an option's value: the file, or a JSON list of them."""
        return self.paths[0] if len(self.paths) == 1 else json.dumps(self.paths)

    def first_preloaded(self) -> dict[str, dict]:
        """{path: checkpoint} of the first member, for the loader Lightning reads it with."""
        return {path: self.preloaded[path] for path in self.paths[:1] if path in self.preloaded}

    def add_members_to(self, model, weights: str | None) -> None:
        """The ensemble's other members, each checked against the first (TTA it was trained for, how its input
        is read) and loaded into `model`."""
        model.member_name = self.paths[0]
        for path in self.paths[1:]:
            checkpoint = self.preloaded.pop(path, None) or load_checkpoint(path)
            check_tta_trained(model.hparams.tta, training_augmentation(checkpoint), f"checkpoint {path}")
            check_member_input(checkpoint, model.input_spec)
            warn_if_low_dice(checkpoint, path, model.plausibility.min_val_dice)
            model.add_member(load_member(path, weights, checkpoint), best_validation_dice(checkpoint))


def apply_checkpoint_rule(
    config, subcommand: str | None, given_options: list[str]
) -> ResolvedCheckpoints | None:
    """Resolve --ckpt_path of `config` (one subcommand's parsed config) and take the network's settings from
    the checkpoint; the run's folder follows the checkpoint's. None when no checkpoint is used."""
    ckpt = config.get("ckpt_path")
    members = checkpoint_list(str(ckpt)) if ckpt else []
    layout = RunLayout.of(config.trainer)  # best / last are found through the configured logger's folder
    if len(members) < 2 and layout is not None and config.data.folds > 1:  # an ensemble of folds is no fold
        layout.name_fold(config.data.fold)
    if not ckpt:
        if subcommand == "fit":
            check_tta_trained(config.model.tta, config.data.augmentation.as_dict(), "the model to train")
        if subcommand in EVALUATING and not config.untrained:
            raise DataError(
                f"{subcommand} needs --ckpt_path (a checkpoint file, or best / last of the configured run): "
                "without one the model's weights are untrained; pass --untrained true to do it anyway"
            )
        return None
    given, preloaded = str(ckpt), {}
    if len(members) > 1 or members[0] != str(ckpt):
        if subcommand in ("fit", "validate"):
            raise DataError(
                f"--ckpt_path {ckpt}: {subcommand} takes a single checkpoint file (or best / last); several "
                "checkpoints (a list or a folder of runs) are an ensemble, for test and predict"
            )
        chosen = f"ensemble of {', '.join(members)}" if len(members) > 1 else f"using {members[0]}"
        if Path(ckpt).is_dir():  # a folder's runs must be the folds of one cross-validation
            preloaded = {member: load_checkpoint(member) for member in members}
            check_one_cross_validation(str(ckpt), list(preloaded.values()))
        say(f"la-seg: --ckpt_path {ckpt}: {chosen}")
        config.ckpt_path = ckpt = members[0]
        if len(members) > 1 and layout is not None:
            layout.name_ensemble()
    if ckpt in ("last", "best"):
        found = find_checkpoint(layout.runs, ckpt) if layout is not None else None
        if found is None and subcommand == "fit":
            return None  # nothing to resume yet: Lightning starts afresh
        if found is None:
            where = f"{layout.runs}/version_*/checkpoints" if layout else "(no logger save_dir configured)"
            raise DataError(f"--ckpt_path {ckpt}: no {ckpt}.ckpt under {where}")
        say(f"la-seg: --ckpt_path {ckpt}: using {found}")
        config.ckpt_path = ckpt = str(found)
    resolved = ResolvedCheckpoints(given, [str(ckpt), *members[1:]], preloaded)
    checkpoint = preloaded.get(str(ckpt)) or load_checkpoint(ckpt)
    preloaded[str(ckpt)] = checkpoint
    if len(resolved.paths) < 2 and layout is not None:
        layout.continue_run_of(Path(ckpt))
    apply_checkpoint_settings(config, checkpoint, given_options)
    if subcommand in ("validate", "test"):
        apply_checkpoint_data(config, checkpoint, given_options)
    if subcommand != "fit":
        warn_if_low_dice(checkpoint, str(ckpt), config.model.plausibility.min_val_dice)
        if stored_calibration(checkpoint) is None:
            say(
                f"la-seg: {ckpt} carries no inference settings chosen on validation (a last.ckpt, or a fit "
                "whose calibration chose none): the config's threshold and post-processing apply, and a case "
                f"is flagged 'model unsure' only below model.review_expected_dice "
                f"({config.model.review_expected_dice:g})"
            )
    check_tta_trained(config.model.tta, training_augmentation(checkpoint), f"checkpoint {ckpt}")
    return resolved


def warn_if_low_dice(checkpoint: dict, path: str, floor: float) -> None:
    """validate / test / predict from a checkpoint of a run that did not train repeat fit's warning, once."""
    warning = low_dice_warning(best_validation_dice(checkpoint), floor, f"the run of checkpoint {path}")
    if warning:
        say(warning)


def apply_checkpoint_settings(config, checkpoint: dict, given_options: list[str]) -> None:
    """Build the network the checkpoint was trained with; a given setting that contradicts it is an error.

    A setting counts as given when it differs from its default or its option is on the command line.
    """
    net = config.model.net
    options = {field: f"model.net.{field}" for field in NETWORK_FIELDS}
    options |= {"img_size": "data.img_size", "slice_context": "data.slice_context"}
    options |= {field: f"data.{field}" for field in INPUT_DEFAULTS}
    values = {field: net.get(field) for field in NETWORK_FIELDS}
    values |= {"img_size": config.data.img_size, "slice_context": config.data.slice_context}
    values |= {field: config.data[field] for field in INPUT_DEFAULTS}
    defaults = {f.name: _default(f) for f in dataclasses.fields(SegmenterConfig)}
    defaults |= {name: p.default for name, p in inspect.signature(LADataModule).parameters.items()}
    given = {}
    for field, option in options.items():
        typed = on_command_line(option, given_options)
        given[field] = (option, values[field], _NOT_A_DEFAULT if typed else defaults[field])
    if network_settings(checkpoint)["in_plane"] == "stretch":  # a stretching checkpoint has no target spacing
        del given["target_spacing"]
    settings = check_settings(checkpoint, given)
    for field in NETWORK_FIELDS:
        net[field] = settings.get(field, net.get(field))
    config.data.img_size = net.img_size = settings.get("img_size", config.data.img_size)
    config.data.slice_context = settings["slice_context"]
    config.model.slice_context = settings["slice_context"]
    for field in INPUT_DEFAULTS:
        config.data[field] = config.model[field] = settings[field]
    if (note := legacy_orientation_note(checkpoint)) is not None:
        say(note)
    apply_calibration(config, checkpoint, given_options)
    rebuilt = network_to_rebuild(checkpoint, net.weights)  # the one rule for the backbone's weights
    net.pretrained, net.weights = rebuilt.pretrained, rebuilt.weights


def apply_checkpoint_data(config, checkpoint: dict, given_options: list[str]) -> None:
    """validate / test read the split's cases from the folders the run was trained on, not the config's
    data.root (another data set may share its case ids), unless --data.root or --data.test_root is typed."""
    if any(on_command_line(f"data.{field}", given_options) for field in ("root", "test_root")):
        return
    trained = trained_data(checkpoint)
    for field, folder in trained.items():
        config.data[field] = folder
    if trained:
        where = ", ".join(f"data.{field} {folder}" for field, folder in trained.items() if folder)
        say(f"la-seg: the split's cases are read from {where}, where the run was trained")


def apply_calibration(config, checkpoint: dict, given_options: list[str]) -> None:
    """The inference settings the checkpoint's fit chose on its validation cases replace the config's, except
    those given on the command line (--model.threshold, --model.postprocess, --model.review_below); the review
    threshold is the one calibrated for the run's model.tta where there is one."""
    calibration = stored_calibration(checkpoint)
    if calibration is None:
        return
    applied = {}
    for field, value in calibration["settings"].items():
        if field in CALIBRATED_FIELDS and not on_command_line(f"model.{field}", given_options):
            config.model[field] = applied[field] = value
    how = calibration.get("how", {})
    by_tta = how.get("review_below_by_tta") or {}
    voters_calibrated = config.model.tta in by_tta and "review_below" in applied  # the voters this run uses
    if voters_calibrated:
        config.model.review_below = applied["review_below"] = by_tta[config.model.tta]
    if applied:
        chosen = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in applied.items())
        say(f"la-seg: inference settings chosen on validation at the end of fit: {chosen}")
    if voters_calibrated and "agreement_postprocess" not in how:
        say(
            "la-seg: note: this checkpoint's review_below was calibrated on the voters' raw masks; agreement "
            "now compares them post-processed, as delivered, where they agree more, so fewer cases may be "
            "flagged than its calibration meant (a new fit calibrates it anew; --model.review_below sets it)"
        )


_NOT_A_DEFAULT = object()


def _default(field: dataclasses.Field) -> Any:
    return field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
