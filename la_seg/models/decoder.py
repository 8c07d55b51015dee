"""UNet-style decoder over the fused ViT map(s), with the input image fed back in at every stage."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    """(Conv3x3-BN-ReLU) x 2. BatchNorm works at batch size 1: it normalises over B*H*W; eval uses stats."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
        nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def _pyramid_level(in_channels: int, out_channels: int, doublings: int) -> nn.Sequential:
    """1x1 projection of a 1/p map, then ``doublings`` learned 2x upsamplings (one pyramid level)."""
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, out_channels, 1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    ]
    for _ in range(doublings):
        layers += [
            nn.ConvTranspose2d(out_channels, out_channels, 2, stride=2, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        ]
    return nn.Sequential(*layers)


def _image_stem(image_channels: int, stem_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(image_channels, stem_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(stem_channels),
        nn.ReLU(inplace=True),
    )


class DecoderBlock(nn.Module):
    """One UNet stage: the deeper stage upsampled 2x (the deepest stage has none), its pyramid level and the
    image guide, concatenated, through a conv block."""

    def __init__(self, in_channels: int, out_channels: int, guide_channels: int, upsample: bool) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, out_channels, 2, stride=2) if upsample else None
        self.conv = conv_block((2 if upsample else 1) * out_channels + guide_channels, out_channels)

    def forward(self, level: Tensor, deeper: Tensor | None, guide: Tensor | None) -> Tensor:
        parts = [level] if self.up is None else [self.up(deeper), level]
        if guide is not None:
            parts.append(guide.to(level.dtype))
        return self.conv(torch.cat(parts, dim=1))


class SegmentationHead(nn.Module):
    """Full resolution: the last stage resized to the image, the image guide concatenated, a conv block and a
    1x1 convolution to one logit channel."""

    def __init__(self, in_channels: int, guide_channels: int) -> None:
        super().__init__()
        self.refine = conv_block(in_channels + guide_channels, in_channels)
        self.logits = nn.Conv2d(in_channels, 1, 1)

    def forward(self, x: Tensor, size: torch.Size, guide: Tensor | None) -> Tensor:
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        if guide is not None:
            x = torch.cat([x, guide.to(x.dtype)], dim=1)
        return self.logits(self.refine(x))


class ImageGuidedDecoder(nn.Module):
    """Decodes fused maps (all at 1/p) into one logit channel at input size, with ``len(channels)`` levels.

    It takes one fused map (the paper), from which every pyramid level is projected, or one map per level
    (grouped fusion, shallow to deep). The pyramid's deepest level stays at 1/p, the next is upsampled 2x,
    then 4x, 8x. ``DecoderBlock``s start at the deepest level; each upsamples the previous stage 2x (after
    the first) and concatenates its level and the image at that resolution. The ``SegmentationHead`` brings
    the last stage to the image's exact H, W, concatenates the image once more and gives the logits.
    The image enters through a small conv stem per resolution (``stem_channels``) or, with
    ``stem_channels=0``, as the resized raw image; ``image_guidance=False`` removes every image path.
    """

    def __init__(
        self,
        in_channels: int,
        channels: Sequence[int] = (256, 128, 64, 32),
        image_channels: int = 3,
        image_guidance: bool = True,
        stem_channels: int = 16,
    ) -> None:
        super().__init__()
        channels = list(channels)
        if not channels or min(channels) < 1 or stem_channels < 0:
            raise ValueError(f"need widths > 0 (one or more), stem_channels >= 0: {channels} {stem_channels}")
        self.num_levels = len(channels)
        self.image_guidance = image_guidance
        guide = (stem_channels or image_channels) if image_guidance else 0

        self.pyramid = nn.ModuleList(_pyramid_level(in_channels, c, j) for j, c in enumerate(channels))
        self.blocks = nn.ModuleList(
            DecoderBlock(channels[max(j - 1, 0)], c, guide, upsample=j > 0) for j, c in enumerate(channels)
        )
        self.head = SegmentationHead(channels[-1], guide)
        # One stem per resolution (num_levels stages + full size): resolution-specific low-level cues.
        self.stems = (
            nn.ModuleList(_image_stem(image_channels, stem_channels) for _ in range(self.num_levels + 1))
            if image_guidance and stem_channels
            else None
        )

    def _guide(self, image: Tensor, level: int, size: torch.Size) -> Tensor | None:
        """The image at ``size`` (antialiased, so the 1/p copy is not aliased), through its stem if any."""
        if not self.image_guidance:
            return None
        if image.shape[-2:] != size:
            image = F.interpolate(image, size=size, mode="bilinear", align_corners=False, antialias=True)
        return self.stems[level](image) if self.stems is not None else image

    def forward(self, features: list[Tensor], image: Tensor) -> Tensor:
        """One map, or one per level shallow to deep, (B, C, h, w) + image (B, 3, H, W) -> (B, 1, H, W)."""
        if len(features) not in (1, self.num_levels):
            raise ValueError(
                f"decoder expects 1 fused map or one per level ({self.num_levels}), got {len(features)}"
            )
        maps = features * self.num_levels if len(features) == 1 else features
        pyramid = [level(f) for level, f in zip(self.pyramid, reversed(maps), strict=True)]  # deep first
        x = None
        for j, (block, level) in enumerate(zip(self.blocks, pyramid, strict=True)):
            x = block(level, x, self._guide(image, j, level.shape[-2:]))
        return self.head(x, image.shape[-2:], self._guide(image, self.num_levels, image.shape[-2:]))
