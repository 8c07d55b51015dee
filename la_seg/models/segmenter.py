"""The full network: DINOv2/v3 backbone -> block fusion -> image-guided decoder."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from la_seg.models.backbone import DINOBackbone
from la_seg.models.decoder import ImageGuidedDecoder
from la_seg.models.fusion import BlockFusion, FusionMode


@dataclass
class SegmenterConfig:
    """Every model switch of the paper and its ablations, as one config-file section."""

    backbone: str = "vit_giant_patch14_dinov2"
    pretrained: bool = True
    weights: str | None = None
    img_size: int = 448
    trainable_blocks: int = 0
    indices: list[int] | None = None
    backbone_kwargs: dict | None = None
    fusion: FusionMode = "softmax"
    fusion_groups: int = 1
    decoder_channels: list[int] = field(default_factory=lambda: [256, 128, 64, 32])
    image_guidance: bool = True
    stem_channels: int = 16


class LASegmenter(nn.Module):
    """(B, 3, H, W) slices in [0, 1] -> (B, 1, H, W) LA logits, for any H, W that are multiples of the patch.

    The backbone loads ``config.weights``, a local file: with ``pretrained`` and no file, la_seg.hub finds
    the hub's first (``with_weights_file``); the network never reaches the hub itself.
    ``empty_backbone=True`` builds the backbone without weights or initialisation (see ``DINOBackbone``),
    for when a checkpoint that holds them is loaded right after.
    """

    def __init__(self, config: SegmenterConfig, empty_backbone: bool = False) -> None:
        super().__init__()
        levels = len(config.decoder_channels)
        if config.fusion_groups not in (1, levels):
            raise ValueError(
                f"fusion_groups={config.fusion_groups}: it must be 1 (one fused map, the paper) or {levels} "
                "(one per decoder level, len(decoder_channels))"
            )
        if config.pretrained and config.weights is None and not empty_backbone:
            raise ValueError("pretrained=True needs the local weights file in weights (see la_seg.hub)")
        self.config = config
        self.backbone = DINOBackbone(
            name=config.backbone,
            weights=config.weights,
            img_size=config.img_size,
            trainable_blocks=config.trainable_blocks,
            indices=config.indices,
            model_kwargs=config.backbone_kwargs,
            empty=empty_backbone,
        )
        self.fusion = BlockFusion(self.backbone.num_blocks, groups=config.fusion_groups, mode=config.fusion)
        self.decoder = ImageGuidedDecoder(
            self.backbone.embed_dim,
            channels=tuple(config.decoder_channels),
            image_channels=3,
            image_guidance=config.image_guidance,
            stem_channels=config.stem_channels,
        )

    def forward(self, x: Tensor) -> Tensor:
        if self.needs_block_maps():
            return self.decoder(self.fusion(self.backbone(x)), x)
        return self.decoder(self.backbone.fused(x, [self.fusion])[0], x)

    def needs_block_maps(self) -> bool:
        """Whether backward needs every tapped block's map (to train the fusion weights or the backbone);
        otherwise the blocks are fused while they run, in memory that does not grow with their number."""
        if not torch.is_grad_enabled():
            return False
        fusion_learns = any(p.requires_grad for p in self.fusion.parameters())
        return fusion_learns or not self.backbone.frozen

    def fusion_weights(self) -> list[Tensor]:
        """Per-group block weights (detached), for logging: one tensor with the paper's single group."""
        return self.fusion.weights()
