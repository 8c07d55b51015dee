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
from torch import Tensor, nn

from la_seg.data.preprocess import check_img_size
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


def _load_weights_assigning(vit: nn.Module, path: Path, device: torch.device) -> None:
    """Loads the weights file `path` into a model built on the meta device: timm's reader, then its checkpoint
    filter of the model's family, then the tensors assigned (on `device`, in the model's dtype) instead of
    copied into randomly initialised ones, a giant ViT's random initialisation being CPU time thrown away
    (measured: benchmarks/README.md, "Figures once quoted in code")."""
    state = _checkpoint_filter(vit)(timm.models.load_state_dict(str(path)), vit)
    reference = vit.state_dict()  # meta tensors: the target dtypes
    state = {
        key: value.to(device=device, dtype=reference[key].dtype) if key in reference else value
        for key, value in state.items()
    }
    vit.load_state_dict(state, strict=True, assign=True)


def _materialise(vit: nn.Module, device: torch.device) -> None:
    """Gives every tensor still on the meta device real, uninitialised storage on ``device``, then recomputes
    the non-persistent buffers (RoPE periods, zero key biases) that no weights file holds."""
    for module in vit.modules():
        for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            if tensor.is_meta:
                empty = torch.empty_like(tensor, device=device)
                is_param = isinstance(tensor, nn.Parameter)
                setattr(module, name, nn.Parameter(empty, tensor.requires_grad) if is_param else empty)
    for module in vit.modules():  # the public per-module hook of timm's layers that own such buffers
        if hasattr(module, "init_non_persistent_buffers"):
            module.init_non_persistent_buffers()


class DINOBackbone(nn.Module):
    """Wraps a timm DINOv2 or DINOv3 ViT so the decoder sees a plain list of (B, C, H/p, W/p) maps.

    The patch size p comes from the model (14 for DINOv2, 16 for DINOv3); ``img_size`` and every input side
    must be a multiple of it. Position embeddings are resampled once to ``img_size`` at construction and on
    the fly for other sizes (``dynamic_img_size``; DINOv3's RoPE needs no resampling). ImageNet normalisation
    is applied here so the data pipeline can stay in [0, 1]. With ``trainable_blocks=0`` (the paper's
    setting) the ViT is frozen: it runs under ``no_grad`` (no activations are kept for backward) and stays in
    eval mode whatever the trainer asks.

    ``weights``, a local file (timm's hub file of the model, found by la_seg.hub, or Meta's original .pth), is
    loaded into a model built on the meta device, with no random initialisation that it would overwrite;
    without it the ViT is randomly initialised. ``empty=True`` builds the ViT on the meta device and loads
    nothing: its parameters are uninitialised memory, for when a checkpoint that holds the backbone is loaded
    right after. ``device`` is where the ViT's tensors are created (default: torch's default device, the CPU
    unless set). The backbone never reaches the network.
    """

    def __init__(
        self,
        name: str = "vit_giant_patch14_dinov2",
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
        img_size = check_img_size(img_size)
        model_kwargs = dict(model_kwargs or {})
        reserved = sorted(set(model_kwargs) & set(_RESERVED_KWARGS))
        if reserved:
            raise ValueError(f"model_kwargs may not set {reserved}: DINOBackbone sets them itself")
        device = torch.device(device) if device is not None else torch.get_default_device()
        kwargs: dict[str, Any] = dict(img_size=img_size, dynamic_img_size=True, num_classes=0, **model_kwargs)
        self.vit, self.patch_size = self._build(name, weights, kwargs, empty, device)

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
        self, name: str, weights: str | Path | None, kwargs: dict, empty: bool, device: torch.device
    ) -> tuple[nn.Module, int]:
        """The timm ViT and its patch size: built on the meta device (so the patch size is checked before
        anything is computed), then loaded, left uninitialised (``empty``) or, without weights, random."""
        path = None if weights is None or empty else Path(weights).expanduser()
        if path is not None and not path.is_file():
            raise FileNotFoundError(f"backbone weights file not found: {path}")
        with torch.device("meta"):
            vit = timm.create_model(name, pretrained=False, **kwargs)
        patch_size = self._check_img_size(kwargs["img_size"], vit, name)
        if not (empty or path is not None):
            with torch.device(device):
                return timm.create_model(name, pretrained=False, **kwargs), patch_size
        if path is not None:
            try:
                _load_weights_assigning(vit, path, device)
            except RuntimeError as err:
                raise RuntimeError(f"could not load {name} weights from {path}: {err}") from err
        _materialise(vit, device)
        return vit, patch_size

    @staticmethod
    def _check_img_size(img_size: int, vit: nn.Module, name: str) -> int:
        """The model's patch size, once ``img_size`` is known to be a whole number of patches."""
        patch = int(vit.patch_embed.patch_size[0])
        if img_size % patch:
            nearest = max(patch, round(img_size / patch) * patch)
            raise ValueError(
                f"img_size={img_size} is not a multiple of the patch size {patch} of {name}; "
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
        as soon as the block has run (a forward hook): no list of every block's map is built here, where
        timm's forward_intermediates would hold them all until the last block has run.

        With gradient checkpointing (a trainable ViT) the blocks run again in backward, where a hook would
        hand its map on a second time: timm's own list of patch tokens is taken then, each mapped as it is
        handed on. Both paths share one per-block transform (_patch_map).
        """
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected a (B, 3, H, W) image batch, got shape {tuple(x.shape)}")
        if x.shape[-2] % self.patch_size or x.shape[-1] % self.patch_size:
            raise ValueError(f"H and W must be multiples of {self.patch_size}, got {tuple(x.shape[-2:])}")
        size = self.vit.patch_embed.dynamic_feat_size(tuple(x.shape[-2:]))
        x = (x - self.mean) / self.std
        checkpointed = bool(getattr(self.vit, "grad_checkpointing", False))
        prefix = self.vit.num_prefix_tokens
        hooks = []
        if not checkpointed:

            def tap(_block: nn.Module, _inputs: Any, tokens: Tensor) -> None:
                sink(self._patch_map(tokens[:, prefix:], size))

            hooks = [self.vit.blocks[i].register_forward_hook(tap) for i in self.indices]
        try:
            with torch.no_grad() if self.frozen else nullcontext():
                # Without hooks timm returns every tapped block's patch tokens; with them only the deepest
                # block's are asked for (stop_early: no later block runs), and dropped.
                tokens = self.vit.forward_intermediates(
                    x,
                    indices=list(self.indices) if checkpointed else [self.indices[-1]],
                    norm=False,
                    stop_early=True,
                    output_fmt="NLC",
                    intermediates_only=True,
                )
                for i in range(len(tokens) if checkpointed else 0):
                    sink(self._patch_map(tokens[i], size))
                    tokens[i] = None  # each block's tokens freed once mapped
        finally:
            for hook in hooks:
                hook.remove()

    def _patch_map(self, patch_tokens: Tensor, size: tuple[int, int]) -> Tensor:
        """A block's (B, h*w, C) patch tokens -> its (B, C, h, w) map as timm's forward_intermediates makes it
        with ``norm=True`` (the final norm), in the autocast dtype (_in_autocast_dtype)."""
        normed = _in_autocast_dtype(self.vit.norm(patch_tokens))
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
