"""ImageGuidedDecoder: output size, image paths and the no-image ablation."""

from __future__ import annotations

import pytest
import torch

from la_seg.models import ImageGuidedDecoder

CHANNELS = (32, 16, 8, 8)


def inputs(h: int = 56, w: int = 56, batch: int = 2, levels: int = 4, dim: int = 24):
    generator = torch.Generator().manual_seed(0)
    feats = [torch.randn(batch, dim, h // 14, w // 14, generator=generator) for _ in range(levels)]
    return feats, torch.rand(batch, 3, h, w, generator=generator)


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize(("h", "w"), [(56, 56), (56, 84), (112, 70)])
def test_output_matches_image_size(h, w):
    torch.manual_seed(0)
    decoder = ImageGuidedDecoder(24, channels=CHANNELS)
    feats, image = inputs(h, w)
    assert decoder(feats, image).shape == (2, 1, h, w)


def test_pyramid_resolutions():
    decoder = ImageGuidedDecoder(24, channels=CHANNELS)
    feats, _ = inputs()
    sizes = [proj(f).shape[-1] for proj, f in zip(decoder.pyramid, reversed(feats), strict=True)]
    assert sizes == [4, 8, 16, 32]


def test_batch_of_one_trains_and_evaluates():
    decoder = ImageGuidedDecoder(24, channels=CHANNELS)
    feats, image = inputs(batch=1)
    decoder.train()(feats, image).mean().backward()
    with torch.no_grad():
        assert decoder.eval()(feats, image).shape == (1, 1, 56, 56)


def test_image_guidance_uses_the_image():
    torch.manual_seed(0)
    decoder = ImageGuidedDecoder(24, channels=CHANNELS).eval()
    feats, image = inputs()
    with torch.no_grad():
        assert not torch.allclose(decoder(feats, image), decoder(feats, image.flip(-1)))


def test_without_image_guidance_the_image_only_sets_the_size():
    torch.manual_seed(0)
    guided = ImageGuidedDecoder(24, channels=CHANNELS)
    plain = ImageGuidedDecoder(24, channels=CHANNELS, image_guidance=False).eval()
    assert plain.stems is None and n_params(plain) < n_params(guided)
    feats, image = inputs()
    with torch.no_grad():
        torch.testing.assert_close(plain(feats, image), plain(feats, torch.zeros_like(image)))


def test_raw_image_instead_of_stem():
    decoder = ImageGuidedDecoder(24, channels=CHANNELS, stem_channels=0)
    assert decoder.stems is None
    assert n_params(decoder) < n_params(ImageGuidedDecoder(24, channels=CHANNELS))
    feats, image = inputs(56, 84)
    assert decoder(feats, image).shape == (2, 1, 56, 84)


def test_other_level_counts():
    decoder = ImageGuidedDecoder(24, num_levels=3, channels=(16, 8, 8))
    feats, image = inputs(levels=3)
    assert decoder(feats, image).shape == (2, 1, 56, 56)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="one width per level"):
        ImageGuidedDecoder(24, num_levels=4, channels=(16, 8))
    decoder = ImageGuidedDecoder(24, channels=CHANNELS)
    feats, image = inputs()
    with pytest.raises(ValueError, match="expects 4"):
        decoder(feats[:3], image)
