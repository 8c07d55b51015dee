"""Where a backbone's weights come from, decided once before any network is built: a given file or timm's
hub file of the model, found in the local hub cache or (where allowed) downloaded. The models themselves only
ever read a local file.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from la_seg.errors import DataError
from la_seg.models.segmenter import SegmenterConfig

HUB_FILENAME = "model.safetensors"  # what timm's hub loader reads first when the config names no file


def hub_weights_file(name: str, download: bool) -> Path:
    """The local copy of timm's hub weights of model `name` (the hub cache's, or downloaded when `download`),
    or a DataError naming --model.net.weights when there is none. A cached file is used without any request
    to the hub; otherwise huggingface_hub decides (it honours HF_HUB_OFFLINE and fails at once offline)."""
    import huggingface_hub
    import timm

    config = timm.models.get_pretrained_cfg(name)
    repo = config.hf_hub_id if config is not None else None
    if not repo:
        raise DataError(f"{name} has no hub weights in timm: pass --model.net.weights with a weights file")
    repo, _, revision = repo.partition("@")
    filename = config.hf_hub_filename or HUB_FILENAME
    cached = huggingface_hub.try_to_load_from_cache(repo, filename, revision=revision or None)
    if isinstance(cached, str):  # in the cache: no request at all, online or not
        return Path(cached)
    try:
        if not download:
            raise OSError("no download is allowed here")
        found = huggingface_hub.hf_hub_download(repo, filename, revision=revision or None)
    except OSError as error:  # offline (HF_HUB_OFFLINE), unreachable, or not allowed to download
        raise DataError(
            f"the pretrained weights of {name} are not in the local hub cache ({error}): pass "
            f"--model.net.weights with a local copy of the hub file {filename} of {repo} (or Meta's original "
            f".pth), e.g. downloaded once with `hf download {repo} {filename}`"
        ) from None
    return Path(found)


def backbone_weights(config: SegmenterConfig, download: bool) -> Path | None:
    """The local file the backbone of `config` loads: `weights` when given, else the hub's when `pretrained`
    (see hub_weights_file), else None (random initialisation)."""
    if config.weights is not None:
        return Path(config.weights).expanduser()
    return hub_weights_file(config.backbone, download) if config.pretrained else None


def with_weights_file(config: SegmenterConfig, download: bool) -> SegmenterConfig:
    """`config` with `weights` set to the local file its backbone loads (unchanged without pretrained
    weights): for building a network that must not reach the hub itself."""
    path = backbone_weights(config, download)
    return config if path is None else dataclasses.replace(config, weights=str(path))
