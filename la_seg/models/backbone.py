"""DINOv2 encoder (timm) that returns one normalised feature map per tapped block."""

from __future__ import annotations

import hashlib
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor, nn

PATCH_SIZE = 14
# Elements hashed per tensor by fingerprint(): enough to tell any two trained weight sets apart, while the
# giant model (1.1 B parameters, ~4.4 GB) still hashes in well under a second instead of several seconds.
_FINGERPRINT_SAMPLES = 1 << 14
# Arguments that DINOv2Backbone sets itself; passing them again through model_kwargs would be ambiguous.
_RESERVED_KWARGS = ("pretrained", "img_size", "dynamic_img_size", "num_classes", "pretrained_cfg_overlay")


def dinov2_model_names() -> list[str]:
    """The timm DINOv2 patch-14 architectures (with and without registers) this backbone accepts."""
    return sorted(timm.list_models("vit_*_patch14_dinov2") + timm.list_models("vit_*_patch14_reg4_dinov2"))


class DINOv2Backbone(nn.Module):
    """Wraps a timm DINOv2 ViT so the decoder sees a plain list of (B, C, H/14, W/14) maps.

    The position embeddings are resampled once to ``img_size`` at construction and again on the fly for
    other sizes (``dynamic_img_size``), so any H, W that are multiples of 14 work. ImageNet normalisation is
    applied here so the data pipeline can stay in [0, 1]. With ``trainable_blocks=0`` (the paper's setting)
    the ViT is frozen: it runs under ``no_grad`` (no activations are kept for backward) and stays in eval mode
    whatever the trainer asks.
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
    ) -> None:
        super().__init__()
        valid = dinov2_model_names()
        if name.split(".")[0] not in valid:
            raise ValueError(f"backbone {name!r} is not a timm DINOv2 patch-14 model; valid names: {valid}")
        if img_size <= 0 or img_size % PATCH_SIZE:
            raise ValueError(f"img_size must be a positive multiple of {PATCH_SIZE}, got {img_size}")
        if trainable_blocks < -1:
            raise ValueError(f"trainable_blocks must be -1 (all), 0 (frozen) or k > 0: {trainable_blocks}")
        model_kwargs = dict(model_kwargs or {})
        reserved = sorted(set(model_kwargs) & set(_RESERVED_KWARGS))
        if reserved:
            raise ValueError(f"model_kwargs may not set {reserved}: DINOv2Backbone sets them itself")

        kwargs: dict[str, Any] = dict(img_size=img_size, dynamic_img_size=True, num_classes=0, **model_kwargs)
        if weights is not None:
            path = Path(weights).expanduser()
            if not path.is_file():
                raise FileNotFoundError(f"backbone weights file not found: {path}")
            # The file override goes through timm's checkpoint_filter_fn, which also converts the original
            # facebookresearch DINOv2 .pth layout (checkpoint_path= would skip that conversion).
            try:
                self.vit = timm.create_model(
                    name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs
                )
            except RuntimeError as err:
                raise RuntimeError(f"could not load {name} weights from {path}: {err}") from err
        else:
            self.vit = timm.create_model(name, pretrained=pretrained, **kwargs)

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
        self.patch_size: int = PATCH_SIZE
        self.frozen: bool = n_trainable == 0

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

        # Non-persistent: constants, not weights, so they stay out of checkpoints.
        self.register_buffer("mean", torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1), persistent=False)
        self.train(self.training)

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

    def train(self, mode: bool = True) -> DINOv2Backbone:
        """Keeps a frozen ViT in eval mode (no dropout / drop-path) even when the trainer calls train()."""
        super().train(mode)
        if self.frozen:
            self.vit.eval()
        return self

    def forward(self, x: Tensor) -> list[Tensor]:
        """(B, 3, H, W) in [0, 1] -> one (B, embed_dim, H/14, W/14) map per tapped block, shallow to deep."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected a (B, 3, H, W) image batch, got shape {tuple(x.shape)}")
        if x.shape[-2] % PATCH_SIZE or x.shape[-1] % PATCH_SIZE:
            raise ValueError(f"H and W must be multiples of {PATCH_SIZE}, got {tuple(x.shape[-2:])}")
        x = (x - self.mean) / self.std
        with torch.no_grad() if self.frozen else nullcontext():
            return self._in_autocast_dtype(self._features(x))

    @staticmethod
    def _in_autocast_dtype(features: list[Tensor]) -> list[Tensor]:
        """Under autocast, the maps in its dtype: timm's final LayerNorm autocasts to fp32, which would double
        the memory of the maps the fusion keeps for backward (8 GB at batch 32 for the giant model)."""
        device_type = features[0].device.type
        if not torch.is_autocast_enabled(device_type):
            return features
        dtype = torch.get_autocast_dtype(device_type)
        for i, f in enumerate(features):  # one at a time, so each fp32 map is freed as soon as it is cast
            features[i] = f.to(dtype)
        return features

    def _features(self, x: Tensor) -> list[Tensor]:
        return self.vit.forward_intermediates(
            x, indices=self.indices, norm=True, stop_early=True, output_fmt="NCHW", intermediates_only=True
        )

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
