"""DINOv2Backbone: shapes, freezing, partial training, local weight files (timm and original layout)."""

from __future__ import annotations

import re

import pytest
import timm
import timm.layers.config
import torch

from la_seg.models import DINOv2Backbone, dinov2_model_names

TINY = dict(depth=4, embed_dim=32, num_heads=2)


def tiny(name: str = "vit_small_patch14_dinov2", img_size: int = 56, kwargs: dict | None = None, **options):
    return DINOv2Backbone(name, pretrained=False, img_size=img_size, model_kwargs=kwargs or TINY, **options)


def timm_reference(model, x: torch.Tensor) -> list[torch.Tensor]:
    """What the backbone must equal: timm's own intermediates of the ImageNet-normalised input."""
    mean = torch.tensor(timm.data.IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(timm.data.IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        return model.eval().forward_intermediates(
            (x - mean) / std, norm=True, output_fmt="NCHW", intermediates_only=True
        )


def source_model(name: str, seed: int, **kwargs):
    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False, num_classes=0, dynamic_img_size=True, **kwargs)


def test_names_are_validated():
    assert "vit_giant_patch14_dinov2" in dinov2_model_names()
    assert "vit_small_patch14_reg4_dinov2" in dinov2_model_names()
    with pytest.raises(ValueError, match="vit_giant_patch14_dinov2"):
        DINOv2Backbone("vit_base_patch16_224", pretrained=False)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(img_size=50), "multiple of 14"),
        (dict(trainable_blocks=-2), "trainable_blocks"),
        (dict(trainable_blocks=5), "exceeds"),
        (dict(indices=[0, 4]), "out of range"),
        (dict(indices=[1, -3]), "twice"),
        (dict(indices=[0, 1], trainable_blocks=1), "never receive a gradient"),
    ],
)
def test_bad_options_raise(options, message):
    with pytest.raises(ValueError, match=message):
        tiny(**options)


def test_reserved_model_kwargs_raise():
    with pytest.raises(ValueError, match="img_size"):
        tiny(kwargs=dict(TINY, img_size=28))


@pytest.mark.parametrize(("size", "depth"), [((56, 56), 4), ((56, 84), 4), ((224, 224), 4), ((448, 448), 2)])
def test_output_shapes(size, depth):
    backbone = tiny(kwargs=dict(TINY, depth=depth)).eval()
    feats = backbone(torch.rand(1, 3, *size))
    assert backbone.num_blocks == depth == len(feats)
    assert backbone.embed_dim == 32 and backbone.patch_size == 14
    for f in feats:
        assert f.shape == (1, 32, size[0] // 14, size[1] // 14)


def test_input_is_checked():
    backbone = tiny()
    with pytest.raises(ValueError, match="multiples of 14"):
        backbone(torch.rand(1, 3, 56, 60))
    with pytest.raises(ValueError, match="B, 3, H, W"):
        backbone(torch.rand(1, 1, 56, 56))


def test_indices_select_blocks_and_normalisation_happens_inside():
    backbone = tiny(indices=[-1, 1])
    assert backbone.indices == [1, 3] and backbone.num_blocks == 2
    x = torch.rand(2, 3, 56, 70)
    reference = timm_reference(backbone.vit, x)
    for got, want in zip(backbone(x), [reference[1], reference[3]], strict=True):
        torch.testing.assert_close(got, want)
    assert "mean" not in backbone.state_dict() and "std" not in backbone.state_dict()


def test_frozen_backbone_records_no_graph_and_stays_in_eval():
    backbone = tiny()
    assert backbone.frozen
    assert not any(p.requires_grad for p in backbone.parameters())
    backbone.train()
    assert backbone.training and not backbone.vit.training
    assert not any(m.training for m in backbone.vit.modules())
    x = torch.rand(1, 3, 56, 56, requires_grad=True)
    with torch.enable_grad():
        feats = backbone(x)
    assert all(not f.requires_grad and f.grad_fn is None for f in feats)


def test_last_block_trainable_gets_gradients():
    backbone = tiny(trainable_blocks=1)
    assert not backbone.frozen and backbone.vit.grad_checkpointing
    trainable = {n for n, p in backbone.vit.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("blocks.3.", "norm.")) for n in trainable)
    assert any(n.startswith("norm.") for n in trainable)
    backbone.train()
    assert backbone.vit.training
    sum(f.square().mean() for f in backbone(torch.rand(2, 3, 56, 56))).backward()
    for name, p in backbone.vit.named_parameters():
        assert (p.grad is not None) == (name in trainable), name


def test_all_blocks_trainable():
    backbone = tiny(trainable_blocks=-1, grad_checkpointing=False)
    assert all(p.requires_grad for p in backbone.parameters())
    assert not backbone.vit.grad_checkpointing


def test_fused_attention_is_forced_on(monkeypatch):
    monkeypatch.setattr(timm.layers.config, "_USE_FUSED_ATTN", 0)
    backbone = tiny()
    flags = [m.fused_attn for m in backbone.vit.modules() if hasattr(m, "fused_attn")]
    assert len(flags) == 4 and all(flags)


def test_missing_weights_file_is_named(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        tiny(weights=missing)


def test_weights_in_timm_format(tmp_path):
    kwargs = dict(depth=2, embed_dim=32, num_heads=2)
    source = source_model("vit_small_patch14_dinov2", seed=0, img_size=56, **kwargs)
    path = tmp_path / "timm.pth"
    torch.save(source.state_dict(), path)
    backbone = tiny(kwargs=kwargs, weights=str(path)).eval()
    x = torch.rand(2, 3, 56, 84)
    for got, want in zip(backbone(x), timm_reference(source, x), strict=True):
        torch.testing.assert_close(got, want)


def to_original_dinov2(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Renames a timm DINOv2 state dict the way the facebookresearch release stores it (inverse of
    timm's _convert_dinov2): SwiGLU fc1/fc2 are w12/w3, a mask_token is present, and with registers the
    class token's position sits in pos_embed[:, 0] and the registers are called register_tokens."""
    out = {}
    for key, value in state.items():
        key = re.sub(r"^(blocks\.\d+\.mlp\.)fc1\.", r"\1w12.", key)
        key = re.sub(r"^(blocks\.\d+\.mlp\.)fc2\.", r"\1w3.", key)
        out[key] = value.clone()
    dim = state["cls_token"].shape[-1]
    out["mask_token"] = torch.zeros(1, dim)
    if "reg_token" in out:
        cls_pos = torch.randn(1, 1, dim) * 0.02
        out["register_tokens"] = out.pop("reg_token")
        out["cls_token"] = state["cls_token"] - cls_pos
        out["pos_embed"] = torch.cat([cls_pos, state["pos_embed"]], dim=1)
    return out


@pytest.mark.parametrize("name", ["vit_giant_patch14_dinov2", "vit_small_patch14_reg4_dinov2"])
def test_weights_in_original_dinov2_format(tmp_path, name):
    kwargs = dict(depth=2, embed_dim=32, num_heads=2)
    # The release's resolution (518 px: 37x37 position embeddings), resampled to img_size on load.
    source = source_model(name, seed=1, img_size=518, **kwargs)
    original = to_original_dinov2(source.state_dict())
    assert "mask_token" in original
    if "giant" in name:
        assert "blocks.0.mlp.w12.weight" in original and "blocks.1.mlp.w3.bias" in original
    else:
        assert "register_tokens" in original and original["pos_embed"].shape[1] == 37 * 37 + 1
    path = tmp_path / "dinov2_pretrain.pth"
    torch.save(original, path)

    backbone = DINOv2Backbone(name, pretrained=False, weights=path, img_size=56, model_kwargs=kwargs).eval()
    x = torch.rand(1, 3, 56, 56)
    for got, want in zip(backbone(x), timm_reference(source, x), strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_wrong_architecture_file_names_the_file(tmp_path):
    source = source_model("vit_small_patch14_dinov2", seed=0, img_size=56, depth=2, embed_dim=32, num_heads=2)
    path = tmp_path / "small.pth"
    torch.save(source.state_dict(), path)
    with pytest.raises(RuntimeError, match="small.pth"):
        tiny(kwargs=dict(depth=2, embed_dim=48, num_heads=2), weights=path)


def test_fingerprint_tracks_weights(tmp_path):
    kwargs = dict(depth=2, embed_dim=32, num_heads=2)
    source = source_model("vit_small_patch14_dinov2", seed=0, img_size=56, **kwargs)
    path = tmp_path / "timm.pth"
    torch.save(source.state_dict(), path)
    first, second = (tiny(kwargs=kwargs, weights=path) for _ in range(2))
    assert re.fullmatch(r"[0-9a-f]{16}", first.fingerprint())
    assert first.fingerprint() == second.fingerprint() == first.fingerprint()
    torch.manual_seed(123)
    assert tiny(kwargs=kwargs).fingerprint() != first.fingerprint()
    with torch.no_grad():
        second.vit.norm.weight[0] += 1.0
    assert second.fingerprint() != first.fingerprint()
