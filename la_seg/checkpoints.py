"""The one owner of la-seg's checkpoint format: safe loading, the backbone record, finding a run's
checkpoint, and the rule that a run's network settings travel with its checkpoint.

Checkpoints are data: they are always read with `torch.load(weights_only=True)`, so a pickled object in a
checkpoint file can never run code. (Configs name importable classes and are therefore code.)
"""

from __future__ import annotations

import dataclasses
import errno
import os
import pickle
import re
import zipfile
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback

from la_seg import runs
from la_seg.atomic import atomic_path, loader_worker_ends_ignored
from la_seg.data.preprocess import INPUT_FIELDS, InputSpec
from la_seg.distributed import reported_elsewhere
from la_seg.errors import DataError
from la_seg.models.segmenter import SegmenterConfig

BACKBONE_PREFIX = "net.backbone."
# Set on every checkpoint dict load_checkpoint returns (never saved), so later errors can name the file.
SOURCE_KEY = "la_seg_loaded_from"
# What defines the network: taken from the checkpoint at validate / test / predict time.
NETWORK_FIELDS = (
    "backbone",
    "backbone_kwargs",
    "img_size",
    "trainable_blocks",
    "indices",
    "fusion",
    "fusion_groups",
    "decoder_channels",
    "image_guidance",
    "stem_channels",
)
# Choices that may change after training; they are recorded with the results instead.
INFERENCE_FIELDS = (
    "threshold",
    "tta",
    "postprocess",
    "eval_batch_size",
    "review_below",
    "review_expected_dice",
    "plausibility",
)
# The inference settings chosen on the validation cases at the end of fit (la_seg.callbacks.calibration):
# a checkpoint's `CALIBRATION_KEY` holds {"settings": {field: value}, "how": {...}}. At validate / test /
# predict they replace the config's values, unless given on the command line (--model.threshold ...).
CALIBRATION_KEY = "inference_calibration"
CALIBRATED_FIELDS = ("threshold", "postprocess", "review_below", "review_expected_dice")
# How the input is made (la_seg.data.preprocess, la_seg.data.io): module settings linked from data.*, part of
# the network's settings; checkpoints written before these existed stretched, clipped at the 99.5th percentile
# and sliced volumes in their files' array order.
INPUT_DEFAULTS = {
    "in_plane": "stretch",
    "target_spacing": 1.0,
    "intensity_headroom": 1.0,
    "orientation": "array",
}
# Input settings every member of an ensemble must share: the volumes are read and normalised once for all.
SHARED_INPUT_FIELDS = ("intensity_headroom", "orientation")


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint at `path` as plain data (weights_only), or a DataError naming file and fault."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"checkpoint {path} is a directory, not a checkpoint file")
    if not path.is_file():
        raise DataError(f"checkpoint {path} does not exist")
    if path.stat().st_size == 0:
        raise DataError(f"checkpoint {path} is empty (0 bytes): was its writing interrupted?")
    if _is_text(path):
        raise DataError(f"checkpoint {path} is a text file, not a PyTorch checkpoint")
    _check_archive(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except PermissionError:
        raise
    except pickle.UnpicklingError as error:
        if "weights only" in str(error).lower() or "weights_only" in str(error):
            raise DataError(
                f"checkpoint {path} contains pickled Python objects, which la-seg never loads (loading them "
                "could run code): la-seg checkpoints hold plain data only"
            ) from None
        raise DataError(
            f"checkpoint {path} is not a readable PyTorch checkpoint ({_first_line(error)})"
        ) from None
    except Exception as error:  # noqa: BLE001 (a text or noise file makes the unpickler raise anything)
        raise DataError(
            f"checkpoint {path} is corrupt or truncated, or not a PyTorch checkpoint "
            f"({type(error).__name__}: {_first_line(error)})"
        ) from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), Mapping):
        raise DataError(f"checkpoint {path} is not a Lightning checkpoint (it has no state_dict)")
    hyper_parameters = checkpoint.get("hyper_parameters")
    if not isinstance(hyper_parameters, Mapping) or not isinstance(hyper_parameters.get("net"), Mapping):
        raise DataError(
            f"checkpoint {path} was not written by la-seg (its hyper_parameters hold no 'net' mapping)"
        )
    if (name := non_finite_weight(checkpoint["state_dict"])) is not None:
        raise DataError(
            f"checkpoint {path} holds non-finite weights (NaN or inf in {name}): its training diverged; "
            "use an earlier checkpoint or train again with a lower --model.lr"
        )
    checkpoint[SOURCE_KEY] = str(path)
    return checkpoint


def _check_archive(path: Path) -> None:
    """A checkpoint is a zip archive whose every record carries a CRC: one flipped bit in the weights loads
    without a word otherwise (torch.load does not check them) and changes the masks. Costs one read of the
    file at CRC speed. Files torch wrote in its old (pre-zip) format carry no checksum and pass."""
    if not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, EOFError, zlib.error) as error:
        raise DataError(
            f"checkpoint {path} is damaged ({_first_line(error)}): restore it from a copy"
        ) from None
    if damaged is not None:
        raise DataError(
            f"checkpoint {path} is damaged: its record {damaged} fails its checksum (CRC); restore the file "
            "from a copy or train again"
        )


def non_finite_weight(state_dict: Mapping[str, Any]) -> str | None:
    """The name of the first floating-point tensor of `state_dict` holding NaN or inf, else None."""
    for name, value in state_dict.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not torch.isfinite(value).all():
            return name
    return None


def _is_text(path: Path) -> bool:
    """Whether the file starts like text (UTF-8 without NUL bytes); checkpoints are zip or pickle bytes."""
    with open(path, "rb") as handle:
        head = handle.read(4096)
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return b"\x00" not in head and not head.startswith(b"PK")


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _name(checkpoint: dict) -> str:
    return f"checkpoint {checkpoint[SOURCE_KEY]}" if SOURCE_KEY in checkpoint else "the checkpoint"


class DataOnlyCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint loader for fit-resume / validate / test / predict: weights_only, always.

    `preloaded` maps a path to the dict the CLI already read (for the settings check): read once.
    """

    def __init__(self, preloaded: dict[str, dict] | None = None) -> None:
        super().__init__()
        self.preloaded = dict(preloaded or {})

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict[str, Any]:
        return self.preloaded.pop(str(path), None) or load_checkpoint(path)

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        """Write a checkpoint like every la-seg output; see `save_checkpoint_file`."""
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint takes no storage_options")
        save_checkpoint_file(checkpoint, path)


# What torch's zip writer raises when a write into the file fails (a full disk): not an OSError.
_TORCH_WRITE_FAILED = re.compile(r"unexpected pos \d+ vs \d+|PytorchStreamWriter failed writing")


def save_checkpoint_file(checkpoint: dict[str, Any], path: str | Path) -> None:
    """`torch.save` into a temp file beside `path`, flushed to disk, then renamed onto it: a full disk or a
    crash leaves the previous file (or none), never a truncated one under the final name; the error names the
    folder that is full."""
    path = Path(path)
    if (name := non_finite_weight(checkpoint.get("state_dict", {}))) is not None:
        raise DataError(
            f"not writing the checkpoint {path}: its weights are not finite (NaN or inf in {name}), the "
            "training diverged; lower --model.lr and train again"
        )
    try:
        with loader_worker_ends_ignored(), atomic_path(path) as tmp, open(tmp, "wb") as handle:
            torch.save(checkpoint, handle)
            handle.flush()
            os.fsync(handle.fileno())
    except (OSError, RuntimeError) as error:
        if isinstance(error, RuntimeError) and not _TORCH_WRITE_FAILED.search(str(error)):
            raise
        # torch's zip writer turns the OSError of a full disk into RuntimeError("... unexpected pos N vs M")
        if isinstance(error, RuntimeError) or error.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DataError(
                f"no space left on device in {path.parent.absolute()} while writing the checkpoint "
                f"{path.name}: free space there and resume with --ckpt_path last"
            ) from None
        raise DataError(f"could not write the checkpoint {path}: {error.strerror or error}") from None


# ---- the backbone record (lean checkpoints) ----------------------------------------------------------------
def backbone_record(module) -> dict:
    """Name, source and fingerprint of the module's backbone."""
    net = module.net_config
    return {
        "name": net.backbone,
        "pretrained": net.pretrained,
        "weights": net.weights,
        "fingerprint": module.net.backbone.fingerprint(),
    }


def holds_backbone(checkpoint: dict) -> bool:
    """Whether the checkpoint stores the backbone's weights (a lean one stores only its record)."""
    return checkpoint.get("backbone", {}).get("stored", True)


def write_backbone_record(module, checkpoint: dict) -> None:
    """Record the backbone; drop a frozen backbone's weights that have another source (but save_backbone)."""
    checkpoint["backbone"] = backbone_record(module)
    net = module.net_config
    has_source = net.pretrained or net.weights is not None
    lean = module.net.backbone.frozen and has_source and not module.hparams.save_backbone
    if lean:
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith(BACKBONE_PREFIX)]:
            del state[key]
    checkpoint["backbone"]["stored"] = not lean


def read_backbone_record(module, checkpoint: dict) -> None:
    """Put the module's own frozen backbone into a lean checkpoint's state, once shown to be the same one."""
    check_state_shapes(module, checkpoint)
    if holds_backbone(checkpoint):
        return
    record, current = checkpoint["backbone"], backbone_record(module)
    if current["fingerprint"] != record["fingerprint"]:
        raise DataError(
            f"{_name(checkpoint)} does not contain the frozen backbone; it was trained with {record['name']} "
            f"(weights: {_source(record)}, fingerprint {record['fingerprint']}), but the backbone built now "
            f"({current['name']}, weights: {_source(current)}) has fingerprint {current['fingerprint']}. "
            "Point model.net.weights at the same weights file, or train with model.save_backbone: true."
        )
    own = {BACKBONE_PREFIX + k: v for k, v in module.net.backbone.state_dict().items()}
    checkpoint["state_dict"].update(own)


def check_state_shapes(module, checkpoint: dict) -> None:
    """A DataError naming the first tensor whose shape differs (a checkpoint of another model size)."""
    own = module.state_dict()
    for key, tensor in checkpoint["state_dict"].items():
        if key in own and tuple(own[key].shape) != tuple(tensor.shape):
            raise DataError(
                f"{_name(checkpoint)} does not fit the model built now: {key} has shape "
                f"{tuple(tensor.shape)} in the checkpoint but {tuple(own[key].shape)} "
                "in the model (another model size?)"
            )


def _source(record: dict) -> str:
    return record["weights"] or ("hub" if record["pretrained"] else "random")


# ---- the checkpoints that --ckpt_path names ---------------------------------------------------------------
DATAMODULE_KEY = "LADataModule"  # where Lightning stores the data module's state (its split) in a checkpoint


def checkpoint_list(ckpt: str) -> list[str]:
    """The checkpoint files that `--ckpt_path` names: a YAML/JSON list of files, a folder of fold runs (see
    run_folder_checkpoints), or else `ckpt` itself (a file, best or last)."""
    if ckpt.lstrip().startswith("["):
        try:
            listed = yaml.safe_load(ckpt)
        except yaml.YAMLError as error:
            raise DataError(f"--ckpt_path {ckpt}: not a valid list ({error.problem})") from None
        if not listed or not all(isinstance(item, str) for item in listed):
            raise DataError(f"--ckpt_path {ckpt}: expected a non-empty list of checkpoint files")
        for item in listed:
            if not Path(item).is_file():
                raise DataError(f"--ckpt_path: checkpoint {item} in the list does not exist")
        return listed
    if Path(ckpt).is_dir():
        return [str(path) for path in run_folder_checkpoints(Path(ckpt))]
    return [ckpt]


def run_folder_checkpoints(folder: Path) -> list[Path]:
    """The best.ckpt of each run in `folder`: its cross-validation's `fold_N` folders (each fold's latest
    `version_*` with a best.ckpt, by fold), else its `version_*` runs (by number), or the folder's own
    checkpoints/best.ckpt when it is one run's version folder."""
    if (folder / runs.CHECKPOINTS).is_dir():
        found_runs = [folder]
    else:
        if fold_runs := runs.folds(folder):
            found = [runs.find_checkpoint(fold, "best") for fold in fold_runs]
            missing = [fold for fold, path in zip(fold_runs, found, strict=True) if path is None]
            if missing:
                raise DataError(
                    f"--ckpt_path {folder}: {missing[0]} has no version_*/checkpoints/best.ckpt (was that "
                    "fold's training interrupted?); list the checkpoints to use instead: "
                    '--ckpt_path "[a.ckpt, b.ckpt]"'
                )
            return found
        found_runs = [p for p in runs.versions(folder) if (p / runs.CHECKPOINTS).is_dir()]
    if not found_runs:
        raise DataError(
            f"--ckpt_path {folder}: the folder holds no fold runs (no fold_*/version_* or "
            "version_*/checkpoints folders, nor a checkpoints folder of its own); pass a checkpoint file, "
            "a list of files, or a run folder"
        )
    missing = [run for run in found_runs if not runs.checkpoint_in(run, "best").is_file()]
    if missing:
        raise DataError(
            f"--ckpt_path {folder}: {missing[0] / runs.CHECKPOINTS} has no best.ckpt (was that run's "
            'training interrupted?); list the checkpoints to use instead, e.g. --ckpt_path "[a.ckpt, b.ckpt]"'
        )
    return [runs.checkpoint_in(run, "best") for run in found_runs]


def check_one_cross_validation(folder: str, checkpoints: list[dict]) -> None:
    """The runs of a folder ensemble are the distinct folds of one cross-validation (same folds, seed and test
    part) with one network; anything else is refused, naming the runs that differ."""
    if len(checkpoints) < 2:
        return

    def fold_of(checkpoint: dict) -> tuple:
        split = checkpoint.get(DATAMODULE_KEY, {}).get("split") or {}
        return split.get("folds", 1), split.get("seed"), sorted(split.get("test", []))

    first = checkpoints[0]
    for other in checkpoints:
        if fold_of(other)[0] < 2:
            problem = f"{_run_name(other)} is not a cross-validation fold (it was trained with data.folds 1)"
        elif fold_of(other) != fold_of(first):
            problem = f"{_run_name(first)} and {_run_name(other)} are folds of different cross-validations"
        elif network_settings(other) != network_settings(first):
            problem = f"{_run_name(first)} and {_run_name(other)} were trained with different networks"
        else:
            continue
        raise DataError(
            f"--ckpt_path {folder}: {problem}; an ensemble from a folder combines the fold_N runs of one "
            "`fit --data.folds k` loop: move other runs out, or list the checkpoints to combine"
        )
    folds = [checkpoint[DATAMODULE_KEY]["split"].get("fold") for checkpoint in checkpoints]
    if len(set(folds)) != len(folds):
        raise DataError(f"--ckpt_path {folder}: several runs of one fold ({folds}); keep one run per fold")


def training_augmentation(checkpoint: dict) -> dict | None:
    """The data.augmentation a checkpoint was trained with (None where it is not recorded)."""
    return checkpoint.get(DATAMODULE_KEY, {}).get("augmentation")


def trained_data(checkpoint: dict) -> dict[str, str | None]:
    """The folders a checkpoint's split names cases of, {"root": ..., "test_root": ... or None} (absolute), or
    {} for checkpoints written before la-seg recorded them: a run's data travels with its checkpoint. A
    recorded folder that is gone is an error naming the option that says where it is now."""
    split = checkpoint.get(DATAMODULE_KEY, {}).get("split") or {}
    if not isinstance(split.get("root"), str):
        return {}
    trained = {"root": split["root"], "test_root": split.get("test_root")}
    for field, folder in trained.items():
        if folder is not None and not Path(folder).is_dir():
            raise DataError(
                f"{_name(checkpoint)} was trained on data.{field} {folder}, which does not exist here: pass "
                f"--data.{field} with the folder that holds its cases now"
            )
    return trained


def _run_name(checkpoint: dict) -> str:
    path = Path(checkpoint[SOURCE_KEY])
    return str(runs.version_folder_of(path) or path)


# ---- rebuilding a checkpoint's network ---------------------------------------------------------------------
def network_to_rebuild(checkpoint: dict, weights: str | None = None) -> SegmenterConfig:
    """The network a checkpoint was trained with, set up to be rebuilt without a download. The one rule for
    the backbone's weights: a checkpoint that holds them needs no source; for a lean one, `weights`
    (--model.net.weights), when given, is where that file is now, else the recorded file, else the hub cache;
    either way the weights must match the recorded fingerprint (read_backbone_record)."""
    config = SegmenterConfig(**checkpoint["hyper_parameters"]["net"])
    if holds_backbone(checkpoint):
        return dataclasses.replace(config, pretrained=False, weights=None)
    record = checkpoint.get("backbone", {})
    source = weights if weights is not None else record.get("weights")
    if source is not None and not Path(source).is_file():
        raise DataError(
            f"{_name(checkpoint)} does not contain its frozen backbone: it needs the weights file {source}, "
            "which does not exist; pass --model.net.weights with its location"
        )
    return dataclasses.replace(config, pretrained=record.get("pretrained", config.pretrained), weights=source)


# ---- inference settings chosen on validation ---------------------------------------------------------------
def stored_calibration(checkpoint: dict) -> dict | None:
    """The checkpoint's calibration record ({"settings": ..., "how": ...}), or None."""
    record = checkpoint.get(CALIBRATION_KEY)
    return record if isinstance(record, dict) and isinstance(record.get("settings"), dict) else None


def write_calibration(path: str | Path, record: dict) -> None:
    """Store a calibration record in the checkpoint file at `path` (rewritten atomically, as data)."""
    unknown = set(record["settings"]) - set(CALIBRATED_FIELDS)
    if unknown:
        raise ValueError(f"calibrated settings must be among {CALIBRATED_FIELDS}, got {sorted(unknown)}")
    checkpoint = load_checkpoint(path)
    checkpoint.pop(SOURCE_KEY, None)
    checkpoint[CALIBRATION_KEY] = record
    save_checkpoint_file(checkpoint, path)


# The monitors whose best score is the run's validation Dice: val/dice, or it smoothed over epochs
# (la_seg.callbacks.metrics, what the configs monitor since 2026-12-04)
DICE_MONITORS = ("val/dice", "val/dice_ema")


def best_validation_dice(checkpoint: dict) -> float | None:
    """The best validation Dice its run had reached when `checkpoint` was written (its ModelCheckpoint's
    record of a DICE_MONITORS monitor), or None where no checkpoint callback monitored one."""
    states = [s for s in checkpoint.get("callbacks", {}).values() if isinstance(s, dict)]
    scores = [s.get("best_model_score") for s in states if s.get("monitor") in DICE_MONITORS]
    return max((float(score) for score in scores if score is not None), default=None)


# ---- one checkpoint for every rank -------------------------------------------------------------------------
def resolve_on_rank_zero(trainer: L.Trainer, given: str, resolved: str) -> str:
    """The file that rank 0 resolved `--ckpt_path given` to (best, last, a folder of runs), broadcast to every
    rank; one error on every rank if some rank found another file, e.g. a node whose runs/ folder is its own
    disk, or a newer version_N written between two ranks' look-ups: ranks never load different weights."""
    chosen = trainer.strategy.broadcast(resolved, src=0)
    differs = torch.tensor(float(chosen != resolved), device=trainer.strategy.root_device)
    others = int(trainer.strategy.reduce(differs, reduce_op="sum"))
    if others:
        error = DataError(
            f"--ckpt_path {given}: rank 0 resolved it to {chosen}, but {others} other rank(s) found another "
            "file; the logger's save_dir must be storage that every node shares (or pass the checkpoint file)"
        )
        raise error if trainer.is_global_zero else reported_elsewhere(error)
    return chosen


class SameCheckpointOnEveryRank(Callback):
    """Checks, once the ranks can talk (before the checkpoint is loaded), that every rank resolved
    `--ckpt_path` as rank 0 did (resolve_on_rank_zero)."""

    def __init__(self, given: str, resolved: str) -> None:
        self.given, self.resolved = given, resolved

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        resolve_on_rank_zero(trainer, self.given, self.resolved)


# ---- the settings check ------------------------------------------------------------------------------------
def network_settings(checkpoint: dict) -> dict[str, Any]:
    """The network-defining settings a checkpoint was trained with, plus `slice_context` and INPUT_DEFAULTS'
    fields (how its input was made)."""
    hparams = checkpoint["hyper_parameters"]
    net = hparams["net"]
    settings = {field: net[field] for field in NETWORK_FIELDS if field in net}  # older ones may lack some
    settings["slice_context"] = bool(hparams.get("slice_context", False))
    settings |= {field: hparams.get(field, default) for field, default in INPUT_DEFAULTS.items()}
    return settings


def input_spec(checkpoint: dict) -> InputSpec:
    """How the checkpoint's input was made (older checkpoints: INPUT_DEFAULTS)."""
    settings = network_settings(checkpoint)
    return InputSpec(
        img_size=checkpoint["hyper_parameters"]["net"]["img_size"],
        **{field: settings[field] for field in INPUT_FIELDS if field != "img_size"},
    )


def check_member_input(checkpoint: dict, first: InputSpec) -> None:
    """An ensemble member must have been trained on volumes read as the first member's (their
    SHARED_INPUT_FIELDS agree): the data are read, laid out and normalised once for all members."""
    trained = input_spec(checkpoint)
    for field in SHARED_INPUT_FIELDS:
        if getattr(trained, field) != getattr(first, field):
            ours, theirs = getattr(trained, field), getattr(first, field)
            raise DataError(
                f"{_name(checkpoint)} was trained with data.{field} {ours}, the ensemble's first member with "
                f"{theirs}: an ensemble's members share how volumes are read; ensemble models trained with "
                "one setting"
            )


def legacy_orientation_note(checkpoint: dict) -> str | None:
    """The one line for a checkpoint trained before la-seg brought volumes to one orientation, else None."""
    if "orientation" in checkpoint["hyper_parameters"]:
        return None
    return (
        f"la-seg: {_name(checkpoint)} was trained before la-seg read volumes in RAS orientation: volumes are "
        "sliced in their files' own array order, as it was trained, so a patient stored in another order "
        "(LPS, swapped axes) gets another mask; retrain for storage-independent results"
    )


def check_settings(checkpoint: dict, given: dict[str, tuple[str, Any, Any]]) -> dict[str, Any]:
    """The checkpoint's network settings; a DataError for a given value that contradicts one.

    `given` maps a setting to (option name, value, default): a value equal to its default was not given.
    """
    settings = network_settings(checkpoint)
    for field, (option, value, default) in given.items():
        if field not in settings:
            continue
        trained = settings[field]
        if not _same(value, default) and not _same(value, trained):
            raise DataError(
                f"{option} is {value!r} but {_name(checkpoint)} was trained with {trained!r}: the network's "
                f"settings come from the checkpoint; drop {option} or set it to {trained!r}"
            )
    return settings


def _same(a: Any, b: Any) -> bool:
    """Equal as config values (a tuple from the command line equals the list stored in the checkpoint)."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return list(a) == list(b)
    return a == b
