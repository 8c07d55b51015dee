"""UNet-style decoder over the fused DINOv2 maps, with the input image fed back in at every stage."""

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


def _project(in_channels: int, out_channels: int, doublings: int) -> nn.Sequential:
    """1x1 projection of a 1/14 map, then ``doublings`` learned 2x upsamplings (pyramid level)."""
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


class ImageGuidedDecoder(nn.Module):
    """Decodes ``num_levels`` fused maps (shallow to deep, all at 1/14) into one logit channel at input size.

    The maps become a pyramid: the deepest stays at 1/14, the next shallower is upsampled 2x, then 4x, 8x.
    Stages start at the deepest level; each upsamples 2x (after the first), concatenates the next pyramid
    level and the image at that resolution, and applies a conv block. The last stage is interpolated to the
    image's exact H, W, the image is concatenated once more, and a conv block and a 1x1 head give the logits.
    The image enters through a small conv stem per resolution (``stem_channels``) or, with
    ``stem_channels=0``, as the resized raw image; ``image_guidance=False`` removes every image path.
    """

    def __init__(
        self,
        in_channels: int,
        num_levels: int = 4,
        channels: Sequence[int] = (256, 128, 64, 32),
        image_channels: int = 3,
        image_guidance: bool = True,
        stem_channels: int = 16,
    ) -> None:
        super().__init__()
        channels = list(channels)
        if num_levels < 1 or len(channels) != num_levels:
            raise ValueError(f"need one width per level: num_levels={num_levels}, channels={channels}")
        if min(channels) < 1 or stem_channels < 0:
            raise ValueError(f"need widths > 0 and stem_channels >= 0, got {channels} and {stem_channels}")
        self.num_levels = num_levels
        self.image_guidance = image_guidance
        guide = (stem_channels or image_channels) if image_guidance else 0

        self.pyramid = nn.ModuleList(_project(in_channels, channels[j], j) for j in range(num_levels))
        self.up = nn.ModuleList(
            nn.ConvTranspose2d(channels[j - 1], channels[j], 2, stride=2) for j in range(1, num_levels)
        )
        self.stages = nn.ModuleList(
            conv_block((1 if j == 0 else 2) * channels[j] + guide, channels[j]) for j in range(num_levels)
        )
        self.refine = conv_block(channels[-1] + guide, channels[-1])
        self.head = nn.Conv2d(channels[-1], 1, 1)
        # One stem per resolution (num_levels stages + full size): resolution-specific low-level cues.
        self.stems = (
            nn.ModuleList(
                nn.Sequential(
                    nn.Conv2d(image_channels, stem_channels, 3, padding=1, bias=False),
                    nn.BatchNorm2d(stem_channels),
                    nn.ReLU(inplace=True),
                )
                for _ in range(num_levels + 1)
            )
            if image_guidance and stem_channels
            else None
        )

    def _guide(self, image: Tensor, level: int, size: torch.Size) -> Tensor:
        """The image at ``size`` (antialiased, so the 1/14 copy is not aliased), through its stem if any."""
        if image.shape[-2:] != size:
            image = F.interpolate(image, size=size, mode="bilinear", align_corners=False, antialias=True)
        return self.stems[level](image) if self.stems is not None else image

    def forward(self, features: list[Tensor], image: Tensor) -> Tensor:
        """``num_levels`` maps (B, C, h, w), shallow to deep, + image (B, 3, H, W) -> (B, 1, H, W) logits."""
        if len(features) != self.num_levels:
            raise ValueError(f"decoder expects {self.num_levels} feature maps, got {len(features)}")
        pyramid = [proj(f) for proj, f in zip(self.pyramid, reversed(features), strict=True)]  # deep first
        x = pyramid[0]
        for j, stage in enumerate(self.stages):
            parts = [x] if j == 0 else [self.up[j - 1](x), pyramid[j]]
            if j > 0 and parts[0].shape[-2:] != parts[1].shape[-2:]:
                raise ValueError(f"feature maps disagree in size: {[tuple(f.shape) for f in features]}")
            if self.image_guidance:
                parts.append(self._guide(image, j, parts[0].shape[-2:]).to(parts[0].dtype))
            x = stage(torch.cat(parts, dim=1))
        x = F.interpolate(x, size=image.shape[-2:], mode="bilinear", align_corners=False)
        if self.image_guidance:
            x = torch.cat([x, self._guide(image, self.num_levels, image.shape[-2:]).to(x.dtype)], dim=1)
        return self.head(self.refine(x))
