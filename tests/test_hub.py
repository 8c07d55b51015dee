"""la_seg.hub: where a backbone's weights come from, decided before any network is built, never by it."""

from __future__ import annotations

import huggingface_hub
import pytest
import safetensors.torch
import timm
import torch

from la_seg.errors import DataError
from la_seg.hub import backbone_weights, with_weights_file
from la_seg.models import DINOBackbone, LASegmenter, SegmenterConfig

V3 = "vit_large_patch16_dinov3"
SMALL_KWARGS = dict(depth=2, embed_dim=32, num_heads=2)


def no_hub_cache(monkeypatch) -> list[tuple]:
    """No file in the hub cache; every download is recorded and fails as huggingface_hub's does offline."""
    downloads = []

    def unreachable(repo, filename, **kwargs):
        downloads.append((repo, filename))
        raise huggingface_hub.errors.LocalEntryNotFoundError("cannot reach the hub and no cached file")

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *args, **kwargs: None)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", unreachable)
    return downloads


def test_cached_hub_weights_load_without_any_download(monkeypatch, tmp_path):
    """pretrained=True without a file: the hub cache's file of the model's hub id, and no request at all."""
    torch.manual_seed(2)
    source = timm.create_model(V3, num_classes=0, img_size=64, dynamic_img_size=True, **SMALL_KWARGS)
    cached = tmp_path / "model.safetensors"
    safetensors.torch.save_file(source.state_dict(), cached)
    looked_up = []

    def cache(repo, filename, **kwargs):
        looked_up.append((repo, filename))
        return str(cached)

    downloads = no_hub_cache(monkeypatch)
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", cache)
    config = SegmenterConfig(backbone=V3, img_size=64, backbone_kwargs=SMALL_KWARGS, decoder_channels=[8])
    resolved = with_weights_file(config, download=True)
    assert looked_up == [("timm/vit_large_patch16_dinov3.lvd1689m", "model.safetensors")] and not downloads
    assert resolved.weights == str(cached) and config.weights is None  # the record stays "hub"

    backbone = DINOBackbone(V3, weights=resolved.weights, img_size=64, model_kwargs=SMALL_KWARGS).eval()
    x = torch.rand(1, 3, 64, 80)
    with torch.no_grad():
        want = source.eval().forward_intermediates(
            (x - backbone.mean) / backbone.std, norm=True, output_fmt="NCHW", intermediates_only=True
        )
        for got, expected in zip(backbone(x), want, strict=True):
            assert torch.equal(got, expected)


@pytest.mark.parametrize("download", [True, False])
def test_hub_weights_neither_cached_nor_reachable_fail_in_one_line_naming_the_option(monkeypatch, download):
    downloads = no_hub_cache(monkeypatch)
    config = SegmenterConfig(backbone="vit_small_patch14_dinov2")
    with pytest.raises(
        DataError, match=r"--model.net.weights .*model.safetensors of timm/vit_small_patch14_dinov2"
    ):
        backbone_weights(config, download=download)
    assert downloads == ([("timm/vit_small_patch14_dinov2.lvd142m", "model.safetensors")] if download else [])


def test_a_given_file_or_no_weights_need_no_hub(monkeypatch, tmp_path):
    no_hub_cache(monkeypatch)
    assert (
        backbone_weights(SegmenterConfig(weights=str(tmp_path / "w.pth")), download=False)
        == tmp_path / "w.pth"
    )
    assert backbone_weights(SegmenterConfig(pretrained=False), download=True) is None


def test_the_network_refuses_to_find_hub_weights_itself():
    config = SegmenterConfig(backbone="vit_small_patch14_dinov2", img_size=28, decoder_channels=[8])
    with pytest.raises(ValueError, match="pretrained=True needs the local weights file"):
        LASegmenter(config)
