"""ImageGuidedDecoder: a pyramid from one fused map or one map per level, output size, image paths, the
no-image ablation."""

from __future__ import annotations

import pytest
import torch

from la_seg.models import ImageGuidedDecoder

CHANNELS = (32, 16, 8, 8)


def inputs(h: int = 56, w: int = 56, batch: int = 2, maps: int = 1, dim: int = 24):
    generator = torch.Generator().manual_seed(0)
    feats = [torch.randn(batch, dim, h // 14, w // 14, generator=generator) for _ in range(maps)]
    return feats, torch.rand(batch, 3, h, w, generator=generator)


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("maps", [1, 4])
@pytest.mark.parametrize(("h", "w"), [(56, 56), (56, 84), (112, 70)])
def test_output_matches_image_size(h, w, maps):
    torch.manual_seed(0)
    decoder = ImageGuidedDecoder(24, channels=CHANNELS)
    feats, image = inputs(h, w, maps=maps)
    assert decoder(feats, image).shape == (2, 1, h, w)


def test_pyramid_from_one_fused_map():
    torch.manual_seed(0)
    decoder = ImageGuidedDecoder(24, channels=CHANNELS).eval()
    (fused,), image = inputs()
    assert [level(fused).shape[-1] for level in decoder.pyramid] == [4, 8, 16, 32]
    with torch.no_grad():  # the one map feeds every level, as if it were given once per level
        torch.testing.assert_close(decoder([fused], image), decoder([fused] * 4, image))


def test_one_map_per_level_is_used_deepest_first():
    torch.manual_seed(0)
    decoder = ImageGuidedDecoder(24, channels=CHANNELS).eval()
    feats, image = inputs(maps=4)
    with torch.no_grad():
        out = decoder(feats, image)
        assert not torch.allclose(out, decoder(feats[::-1], image))
        assert not torch.allclose(out, decoder(feats[-1:], image))


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


def test_raw_image_instead_of_stem_still_guides():
    """stem_channels=0: the image itself, not a learnt stem of it, is concatenated at every stage."""
    torch.manual_seed(0)
    decoder = ImageGuidedDecoder(24, channels=CHANNELS, stem_channels=0).eval()
    feats, image = inputs(56, 84)
    with torch.no_grad():
        assert not torch.allclose(decoder(feats, image), decoder(feats, image.flip(-1)))


def test_three_levels_take_one_map_or_one_per_level():
    torch.manual_seed(0)
    decoder = ImageGuidedDecoder(24, channels=(16, 8, 8)).eval()
    feats, image = inputs(maps=3)
    with torch.no_grad():
        assert not torch.allclose(decoder(feats, image), decoder(feats[::-1], image))
        torch.testing.assert_close(decoder(feats[:1], image), decoder(feats[:1] * 3, image))
    with pytest.raises(ValueError):
        decoder(feats[:2], image)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="widths"):
        ImageGuidedDecoder(24, channels=())
    decoder = ImageGuidedDecoder(24, channels=CHANNELS)
    feats, image = inputs(maps=3)
    with pytest.raises(ValueError, match=r"1 fused map or one per level \(4\), got 3"):
        decoder(feats, image)
