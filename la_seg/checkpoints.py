"""The one owner of la-seg's checkpoint format: safe loading, the backbone record, finding a run's
checkpoint, and the rule that a run's network settings travel with its checkpoint.

Checkpoints are data: they are always read with `torch.load(weights_only=True)`, so a pickled object in a
checkpoint file can never run code. (Configs name importable classes and are therefore code.)
"""

from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from la_seg.atomic import atomic_path
from la_seg.errors import DataError

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
INFERENCE_FIELDS = ("threshold", "tta", "postprocess", "eval_batch_size", "review_below")
# The inference settings chosen on the validation cases at the end of fit (la_seg.callbacks.calibration):
# a checkpoint's `CALIBRATION_KEY` holds {"settings": {field: value}, "how": {...}}. At validate / test /
# predict they replace the config's values, unless given on the command line (--model.threshold ...).
CALIBRATION_KEY = "inference_calibration"
CALIBRATED_FIELDS = ("threshold", "postprocess", "review_below")
# How the input is resized (la_seg.data.preprocess): module settings linked from data.*, part of the network's
# settings; checkpoints written before these existed stretched.
INPUT_DEFAULTS = {"in_plane": "stretch", "target_spacing": 1.0}
_LOAD_ERRORS = (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint at `path` as plain data (weights_only), or a DataError naming file and fault."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"checkpoint {path} is a directory, not a checkpoint file")
    if not path.is_file():
        raise DataError(f"checkpoint {path} does not exist")
    if path.stat().st_size == 0:
        raise DataError(f"checkpoint {path} is empty (0 bytes): was its writing interrupted?")
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
    except _LOAD_ERRORS as error:
        raise DataError(
            f"checkpoint {path} is corrupt or truncated, or not a PyTorch checkpoint ({_first_line(error)})"
        ) from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise DataError(f"checkpoint {path} is not a Lightning checkpoint (it has no state_dict)")
    if "net" not in checkpoint.get("hyper_parameters", {}):
        raise DataError(f"checkpoint {path} was not written by la-seg (its hyper_parameters have no 'net')")
    checkpoint[SOURCE_KEY] = str(path)
    return checkpoint


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
    with atomic_path(path) as tmp:
        torch.save(checkpoint, tmp)


# ---- finding a run's checkpoint ----------------------------------------------------------------------------
def find_run_checkpoint(run_dir: Path, which: str) -> Path | None:
    """`<run_dir>/version_N/checkpoints/<which>.ckpt` of the highest N that has one, or None."""
    candidates = []
    for path in Path(run_dir).glob(f"version_*/checkpoints/{which}.ckpt"):
        match = re.fullmatch(r"version_(\d+)", path.parent.parent.name)
        if match:
            candidates.append((int(match.group(1)), path))
    return max(candidates)[1] if candidates else None


# ---- the settings check ------------------------------------------------------------------------------------
def network_settings(checkpoint: dict) -> dict[str, Any]:
    """The network-defining settings a checkpoint was trained with, plus `slice_context`, `in_plane` and
    `target_spacing` (how its input was made)."""
    hparams = checkpoint["hyper_parameters"]
    net = hparams["net"]
    settings = {field: net[field] for field in NETWORK_FIELDS if field in net}  # older ones may lack some
    settings["slice_context"] = bool(hparams.get("slice_context", False))
    settings |= {field: hparams.get(field, default) for field, default in INPUT_DEFAULTS.items()}
    return settings


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
