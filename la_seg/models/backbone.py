"""DINOv2 / DINOv3 encoder (timm) that returns one normalised feature map per tapped block."""

from __future__ import annotations

import hashlib
import importlib
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models._manipulate import reinit_non_persistent_buffers
from torch import Tensor, nn

from la_seg.data.preprocess import check_img_size
from la_seg.errors import DataError
from la_seg.models.fusion import BlockFusion

# timm architectures this backbone accepts: DINOv2 (VisionTransformer, patch 14, with and without registers)
# and DINOv3 (Eva, patch 16, RoPE, 4 registers; `_qkvb` variants keep the zero key bias of Meta's release).
DINO_PATTERNS = (
    "vit_*_patch14_dinov2",
    "vit_*_patch14_reg4_dinov2",
    "vit_*_patch16_dinov3",
    "vit_*_patch16_dinov3_qkvb",
)
# Elements hashed per tensor by fingerprint(): enough to tell any two trained weight sets apart, while the
# giant model (1.1 B parameters, ~4.4 GB) still hashes in well under a second instead of several seconds.
_FINGERPRINT_SAMPLES = 1 << 14
# Arguments that DINOBackbone sets itself; passing them again through model_kwargs would be ambiguous.
_RESERVED_KWARGS = ("pretrained", "img_size", "dynamic_img_size", "num_classes", "pretrained_cfg_overlay")


def dino_model_names() -> list[str]:
    """The timm DINOv2 and DINOv3 architectures this backbone accepts."""
    return sorted(name for pattern in DINO_PATTERNS for name in timm.list_models(pattern))


def _checkpoint_filter(vit: nn.Module) -> Callable:
    """timm's checkpoint filter of the model's family (vision_transformer or eva): it resamples position
    embeddings and converts Meta's original DINOv2 / DINOv3 .pth layouts."""
    return importlib.import_module(type(vit).__module__).checkpoint_filter_fn


def _load_pretrained_assigning(vit: nn.Module, device: torch.device) -> None:
    """Loads the weights named by ``vit.pretrained_cfg`` (a local file or the hub) into a model built on the
    meta device.

    timm's own ``load_pretrained`` does the work (source, checkpoint filter, checks); only its final
    ``load_state_dict`` is made to assign the loaded tensors (on ``device``, in the model's dtype) instead of
    copying them into randomly initialised ones, which for the giant ViT took ~15 s of CPU time for nothing.
    """

    def assign(state_dict: dict[str, Tensor], strict: bool = True):
        reference = vit.state_dict()  # meta tensors: the target dtypes
        state = {
            key: value.to(device=device, dtype=reference[key].dtype) if key in reference else value
            for key, value in state_dict.items()
        }
        return nn.Module.load_state_dict(vit, state, strict=strict, assign=True)

    vit.load_state_dict = assign
    try:
        timm.models.load_pretrained(vit, num_classes=0, filter_fn=_checkpoint_filter(vit))
    finally:
        del vit.load_state_dict


HUB_PROBE_SECONDS = 5.0


def check_hub_reachable(pretrained_cfg: dict, name: str) -> None:
    """Fail within seconds, naming --model.net.weights, where hub weights are neither cached nor reachable
    (offline clusters): huggingface_hub would otherwise retry for minutes and then print its own error."""
    import os
    import socket
    from urllib.parse import urlparse

    import huggingface_hub

    repo = pretrained_cfg.get("hf_hub_id")
    if not repo:
        return
    filename = pretrained_cfg.get("hf_hub_filename") or "model.safetensors"
    if isinstance(huggingface_hub.try_to_load_from_cache(repo, filename), str):
        return
    proxied = any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"))
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    reason = "HF_HUB_OFFLINE is set" if offline else None
    if not offline and not proxied:
        host = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname
        try:
            socket.create_connection((host, 443), timeout=HUB_PROBE_SECONDS).close()
        except OSError as error:
            reason = f"{host} cannot be reached ({error})"
    if reason:
        raise DataError(
            f"the pretrained weights of {name} are not in the local hub cache and {reason}: pass "
            f"--model.net.weights with a local copy of the hub file {filename} of {repo} (or Meta's original "
            ".pth), e.g. downloaded once with `hf download " + f"{repo} {filename}`"
        )


def _materialise(vit: nn.Module, device: torch.device) -> None:
    """Gives every tensor still on the meta device real, uninitialised storage on ``device``, then recomputes
    the non-persistent buffers (RoPE periods, zero key biases) that no weights file holds."""
    for module in vit.modules():
        for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            if tensor.is_meta:
                empty = torch.empty_like(tensor, device=device)
                is_param = isinstance(tensor, nn.Parameter)
                setattr(module, name, nn.Parameter(empty, tensor.requires_grad) if is_param else empty)
    reinit_non_persistent_buffers(vit)


class DINOBackbone(nn.Module):
    """Wraps a timm DINOv2 or DINOv3 ViT so the decoder sees a plain list of (B, C, H/p, W/p) maps.

    The patch size p comes from the model (14 for DINOv2, 16 for DINOv3); ``img_size`` and every input side
    must be a multiple of it. Position embeddings are resampled once to ``img_size`` at construction and on
    the fly for other sizes (``dynamic_img_size``; DINOv3's RoPE needs no resampling). ImageNet normalisation
    is applied here so the data pipeline can stay in [0, 1]. With ``trainable_blocks=0`` (the paper's
    setting) the ViT is frozen: it runs under ``no_grad`` (no activations are kept for backward) and stays in
    eval mode whatever the trainer asks.

    Weights (``weights`` file or ``pretrained`` hub weights) are loaded into a model built on the meta device,
    with no random initialisation that they would overwrite. ``empty=True`` builds the ViT the same way but
    loads nothing: its parameters are uninitialised memory, for when a checkpoint that holds the backbone is
    loaded right after (``pretrained`` and ``weights`` are then only a record). ``device`` is where the ViT's
    tensors are created (default: torch's default device, the CPU unless set).
    """

    def __init__(
        self,
        name: str = "vit_giant_patch14_dinov2",
        pretrained: bool = True,
        weights: str | Path | None = None,
        img_size: int = 448,
        trainable_blocks: int = 0,
        indices: list[int] | None = None,
        model_kwargs: dict[str, Any] | None = None,
        grad_checkpointing: bool = True,
        empty: bool = False,
        device: str | torch.device | None = None,
    ) -> None:
        super().__init__()
        valid = dino_model_names()
        if name.split(".")[0] not in valid:
            raise ValueError(f"backbone {name!r} is not a timm DINOv2 / DINOv3 model; valid names: {valid}")
        if trainable_blocks < -1:
            raise ValueError(f"trainable_blocks must be -1 (all), 0 (frozen) or k > 0: {trainable_blocks}")
        img_size = check_img_size(img_size, "data.img_size")
        model_kwargs = dict(model_kwargs or {})
        reserved = sorted(set(model_kwargs) & set(_RESERVED_KWARGS))
        if reserved:
            raise ValueError(f"model_kwargs may not set {reserved}: DINOBackbone sets them itself")
        device = torch.device(device) if device is not None else torch.get_default_device()
        kwargs: dict[str, Any] = dict(img_size=img_size, dynamic_img_size=True, num_classes=0, **model_kwargs)
        self.vit, self.patch_size = self._build(name, pretrained, weights, kwargs, empty, device)

        depth = len(self.vit.blocks)
        self.indices = self._check_indices(indices, depth)
        if trainable_blocks > depth:
            raise ValueError(f"trainable_blocks={trainable_blocks} exceeds the {depth} blocks of {name}")
        n_trainable = depth if trainable_blocks == -1 else trainable_blocks
        if n_trainable and depth - n_trainable > self.indices[-1]:
            raise ValueError(
                f"trainable_blocks={trainable_blocks} trains only blocks after the deepest tapped block "
                f"{self.indices[-1]}: they would never receive a gradient"
            )

        self.embed_dim: int = self.vit.embed_dim
        self.num_blocks: int = len(self.indices)
        self.frozen: bool = n_trainable == 0
        self._set_trainable(trainable_blocks, n_trainable, grad_checkpointing)
        # Non-persistent: constants, not weights, so they stay out of checkpoints.
        mean = torch.tensor(IMAGENET_DEFAULT_MEAN, device=device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_DEFAULT_STD, device=device).view(1, 3, 1, 1)
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)
        self.train(self.training)

    def _build(
        self,
        name: str,
        pretrained: bool,
        weights: str | Path | None,
        kwargs: dict,
        empty: bool,
        device: torch.device,
    ) -> tuple[nn.Module, int]:
        """The timm ViT and its patch size: built on the meta device (so the patch size is checked before
        anything is computed), then loaded, left uninitialised (``empty``) or, without weights, random."""
        path = None if weights is None or empty else Path(weights).expanduser()
        if path is not None:
            if not path.is_file():
                raise FileNotFoundError(f"backbone weights file not found: {path}")
            # A file override of the pretrained config: timm's checkpoint filter then also converts the
            # original Meta .pth layouts (checkpoint_path= would skip that conversion).
            kwargs = dict(kwargs, pretrained_cfg_overlay=dict(file=str(path)))
        with torch.device("meta"):
            vit = timm.create_model(name, pretrained=False, **kwargs)
        patch_size = self._check_img_size(kwargs["img_size"], vit, name)
        if not (empty or path is not None or pretrained):
            with torch.device(device):
                return timm.create_model(name, pretrained=False, **kwargs), patch_size
        if not empty:
            if path is None:
                check_hub_reachable(vit.pretrained_cfg, name)
            try:
                _load_pretrained_assigning(vit, device)
            except RuntimeError as err:
                raise RuntimeError(f"could not load {name} weights from {path or 'the hub'}: {err}") from err
        _materialise(vit, device)
        return vit, patch_size

    @staticmethod
    def _check_img_size(img_size: int, vit: nn.Module, name: str) -> int:
        """The model's patch size, once ``img_size`` is known to be a whole number of patches."""
        patch = int(vit.patch_embed.patch_size[0])
        if img_size % patch:
            nearest = max(patch, round(img_size / patch) * patch)
            raise DataError(
                f"data.img_size={img_size} is not a multiple of the patch size {patch} of {name}; "
                f"use e.g. {nearest}"
            )
        return patch

    def _set_trainable(self, trainable_blocks: int, n_trainable: int, grad_checkpointing: bool) -> None:
        depth = len(self.vit.blocks)
        self.vit.requires_grad_(trainable_blocks == -1)
        if 0 < n_trainable < depth:
            for block in self.vit.blocks[depth - n_trainable :]:
                block.requires_grad_(True)
            self.vit.norm.requires_grad_(True)
        if not self.frozen and grad_checkpointing:
            self.vit.set_grad_checkpointing(True)
        # timm picks fused attention from an environment variable; force PyTorch's SDPA kernels.
        for module in self.vit.modules():
            if hasattr(module, "fused_attn"):
                module.fused_attn = True

    @staticmethod
    def _check_indices(indices: list[int] | None, depth: int) -> list[int]:
        if indices is None:
            return list(range(depth))
        if not indices:
            raise ValueError("indices must name at least one block")
        bad = [i for i in indices if not -depth <= i < depth]
        if bad:
            raise ValueError(f"indices {bad} out of range for a {depth}-block backbone")
        normalised = sorted(i % depth for i in indices)
        if len(set(normalised)) != len(normalised):
            raise ValueError(f"indices {list(indices)} name a block twice")
        return normalised

    def train(self, mode: bool = True) -> DINOBackbone:
        """Keeps a frozen ViT in eval mode (no dropout / drop-path) even when the trainer calls train()."""
        super().train(mode)
        if self.frozen:
            self.vit.eval()
        return self

    def forward(self, x: Tensor) -> list[Tensor]:
        """(B, 3, H, W) in [0, 1] -> one (B, embed_dim, H/p, W/p) map per tapped block, shallow to deep, each
        in the compute dtype (the autocast dtype under autocast)."""
        maps: list[Tensor] = []
        self._run(x, maps.append)
        return maps

    def fused(self, x: Tensor, fusions: Sequence[BlockFusion]) -> list[list[Tensor]]:
        """Each fusion's fused maps of `x` (as ``fusion(self(x))``), summed while the blocks run: memory holds
        one running sum per fusion group instead of every tapped block's map, whatever their number. For
        inference, and wherever the fusion weights need no gradient."""
        running = [fusion.running() for fusion in fusions]

        def add(feature: Tensor) -> None:
            for fusion in running:
                fusion.add(feature)

        self._run(x, add)
        return [fusion.result() for fusion in running]

    def _run(self, x: Tensor, sink: Callable[[Tensor], None]) -> None:
        """Runs the ViT up to its deepest tapped block and hands each tapped block's normalised map to `sink`
        as soon as the block has run (a forward hook): no list of every block's map is built here.

        With gradient checkpointing (a trainable ViT) the blocks run again in backward, where a hook's
        LayerNorm would be missing: timm's own list of maps is taken then, each cast as it is handed on.
        """
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected a (B, 3, H, W) image batch, got shape {tuple(x.shape)}")
        if x.shape[-2] % self.patch_size or x.shape[-1] % self.patch_size:
            raise ValueError(f"H and W must be multiples of {self.patch_size}, got {tuple(x.shape[-2:])}")
        size = self.vit.patch_embed.dynamic_feat_size(tuple(x.shape[-2:]))
        x = (x - self.mean) / self.std
        checkpointed = bool(getattr(self.vit, "grad_checkpointing", False))
        hooks = []
        if not checkpointed:

            def tap(_block: nn.Module, _inputs: Any, tokens: Tensor) -> None:
                sink(self._block_map(tokens, size))

            hooks = [self.vit.blocks[i].register_forward_hook(tap) for i in self.indices]
        try:
            with torch.no_grad() if self.frozen else nullcontext():
                # Without hooks timm returns every tapped block's map; with them only the deepest block's
                # raw tokens are asked for (stop_early: no later block runs), and dropped.
                maps = self.vit.forward_intermediates(
                    x,
                    indices=list(self.indices) if checkpointed else [self.indices[-1]],
                    norm=checkpointed,
                    stop_early=True,
                    output_fmt="NCHW" if checkpointed else "NLC",
                    intermediates_only=True,
                )
                for i in range(len(maps) if checkpointed else 0):
                    sink(_in_autocast_dtype(maps[i]))
                    maps[i] = None  # each fp32 map freed once cast
        finally:
            for hook in hooks:
                hook.remove()

    def _block_map(self, tokens: Tensor, size: tuple[int, int]) -> Tensor:
        """A block's (B, N, C) tokens -> its normalised (B, C, h, w) map as timm's forward_intermediates makes
        it (final norm, prefix tokens dropped), in the autocast dtype (_in_autocast_dtype)."""
        normed = _in_autocast_dtype(self.vit.norm(tokens)[:, self.vit.num_prefix_tokens :])
        return normed.reshape(normed.shape[0], *size, -1).permute(0, 3, 1, 2).contiguous()

    @torch.no_grad()
    def fingerprint(self) -> str:
        """Short, stable hash of the ViT weights, so a checkpoint can tell it was made with another backbone.

        Hashes every tensor's name, shape and an odd-strided sample of at most ~16k of its values (as
        float32, so the same weights hash alike on CPU and GPU): hashing all 1.1 B giant weights would take
        seconds, and two different trainings or releases differ throughout every tensor, not in one value.
        """
        digest = hashlib.sha256()
        for name, tensor in self.vit.state_dict().items():
            flat = tensor.detach().reshape(-1)
            step = max(1, flat.numel() // _FINGERPRINT_SAMPLES) | 1
            sample = flat[::step].float().cpu().contiguous()
            digest.update(name.encode())
            digest.update(str(tuple(tensor.shape)).encode())
            digest.update(sample.numpy().tobytes())
        return digest.hexdigest()[:16]


def _in_autocast_dtype(feature: Tensor) -> Tensor:
    """Under autocast, `feature` in its dtype: timm's final LayerNorm autocasts to fp32, which would double
    the memory of the maps the fusion keeps for backward (8 GB at batch 32 for the giant model)."""
    device_type = feature.device.type
    if not torch.is_autocast_enabled(device_type):
        return feature
    return feature.to(torch.get_autocast_dtype(device_type))
