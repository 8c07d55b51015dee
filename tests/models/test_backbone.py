"""DINOBackbone: DINOv2 and DINOv3 shapes, freezing, partial training, local weight files (timm and Meta's
original layouts) loaded without a thrown-away random initialisation, and the empty build."""

from __future__ import annotations

import re

import pytest
import timm
import timm.layers.config
import torch

from la_seg.models import BlockFusion, DINOBackbone, dino_model_names

TINY = dict(depth=4, embed_dim=32, num_heads=2)
SMALL_KWARGS = dict(depth=2, embed_dim=32, num_heads=2)
V2, V3 = "vit_small_patch14_dinov2", "vit_large_patch16_dinov3"
# A size each family's patch divides: 56 = 4 x 14, 64 = 4 x 16.
SIDE = {V2: 56, V3: 64}
PATCH = {V2: 14, V3: 16}


def tiny(name: str = V2, img_size: int | None = None, kwargs: dict | None = None, **options):
    if img_size is None:
        img_size = 64 if "patch16" in name else 56
    return DINOBackbone(name, img_size=img_size, model_kwargs=kwargs or TINY, **options)


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


def loaded_the_old_way(name: str, path, img_size: int, kwargs: dict):
    """The previous loading path: a randomly initialised timm model that the file then overwrites."""
    overlay = dict(file=str(path))
    return timm.create_model(
        name, pretrained=True, pretrained_cfg_overlay=overlay, img_size=img_size, num_classes=0,
        dynamic_img_size=True, **kwargs,
    )  # fmt: skip


def assert_same_outputs(backbone: DINOBackbone, model, x: torch.Tensor, exact: bool = True) -> None:
    for got, want in zip(backbone.eval()(x), timm_reference(model, x), strict=True):
        if exact:
            assert torch.equal(got, want)
        else:
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_names_are_validated():
    names = set(dino_model_names())
    assert {"vit_giant_patch14_dinov2", "vit_small_patch14_reg4_dinov2"} <= names
    assert {"vit_large_patch16_dinov3", "vit_huge_plus_patch16_dinov3", "vit_small_patch16_dinov3"} <= names
    with pytest.raises(ValueError, match="vit_giant_patch14_dinov2"):
        DINOBackbone("vit_base_patch16_224")


@pytest.mark.parametrize(
    ("options", "message"),
    [
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


@pytest.mark.parametrize(
    ("name", "size", "message"),
    [
        (V2, 50, r"^img_size=50 is not a multiple of the patch size 14 .*use e.g. 56"),
        (V3, 56, r"^img_size=56 is not a multiple of the patch size 16 of vit_large_patch16_dinov3"),
        (V3, 0, r"^img_size must be a positive"),
    ],
)
def test_img_size_must_fit_the_models_patch(name, size, message):
    with pytest.raises(ValueError, match=message):
        tiny(name, img_size=size)


def test_reserved_model_kwargs_raise():
    with pytest.raises(ValueError, match="img_size"):
        tiny(kwargs=dict(TINY, img_size=28))


@pytest.mark.parametrize(
    ("name", "size", "depth"),
    [
        (V2, (56, 56), 4),
        (V2, (56, 84), 4),
        (V2, (448, 448), 2),
        (V3, (64, 96), 4),
        (V3, (448, 448), 2),
    ],
)
def test_output_shapes(name, size, depth):
    backbone = tiny(name, kwargs=dict(TINY, depth=depth)).eval()
    feats = backbone(torch.rand(1, 3, *size))
    patch = PATCH[name]
    assert backbone.num_blocks == depth == len(feats)
    assert backbone.embed_dim == 32 and backbone.patch_size == patch
    for f in feats:
        assert f.shape == (1, 32, size[0] // patch, size[1] // patch)


@pytest.mark.parametrize("name", [V2, V3])
def test_input_is_checked(name):
    backbone = tiny(name)
    with pytest.raises(ValueError, match=f"multiples of {PATCH[name]}"):
        backbone(torch.rand(1, 3, SIDE[name], 60))
    with pytest.raises(ValueError, match="B, 3, H, W"):
        backbone(torch.rand(1, 1, SIDE[name], SIDE[name]))


@pytest.mark.parametrize("name", [V2, V3])
def test_indices_select_blocks_and_normalisation_happens_inside(name):
    backbone = tiny(name, indices=[-1, 1])
    assert backbone.indices == [1, 3] and backbone.num_blocks == 2
    x = torch.rand(2, 3, SIDE[name], SIDE[name] + PATCH[name])
    reference = timm_reference(backbone.vit, x)
    for got, want in zip(backbone(x), [reference[1], reference[3]], strict=True):
        torch.testing.assert_close(got, want)
    assert "mean" not in backbone.state_dict() and "std" not in backbone.state_dict()


@pytest.mark.parametrize("name", [V2, V3])
def test_frozen_backbone_records_no_graph_and_stays_in_eval(name):
    backbone = tiny(name)
    assert backbone.frozen
    assert not any(p.requires_grad for p in backbone.parameters())
    backbone.train()
    assert backbone.training and not backbone.vit.training
    assert not any(m.training for m in backbone.vit.modules())
    x = torch.rand(1, 3, SIDE[name], SIDE[name], requires_grad=True)
    with torch.enable_grad():
        feats = backbone(x)
    assert all(not f.requires_grad and f.grad_fn is None for f in feats)


@pytest.mark.parametrize("name", [V2, V3])
def test_last_block_trainable_gets_gradients(name):
    backbone = tiny(name, trainable_blocks=1)
    assert not backbone.frozen and backbone.vit.grad_checkpointing
    trainable = {n for n, p in backbone.vit.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("blocks.3.", "norm.")) for n in trainable)
    assert any(n.startswith("norm.") for n in trainable)
    backbone.train()
    assert backbone.vit.training
    sum(f.square().mean() for f in backbone(torch.rand(2, 3, SIDE[name], SIDE[name]))).backward()
    for n, p in backbone.vit.named_parameters():
        assert (p.grad is not None) == (n in trainable), n


def test_all_blocks_trainable():
    backbone = tiny(trainable_blocks=-1, grad_checkpointing=False)
    assert all(p.requires_grad for p in backbone.parameters())
    assert not backbone.vit.grad_checkpointing


@pytest.mark.parametrize("name", [V2, V3])
def test_fused_attention_is_forced_on(monkeypatch, name):
    monkeypatch.setattr(timm.layers.config, "_USE_FUSED_ATTN", 0)
    backbone = tiny(name)
    flags = [m.fused_attn for m in backbone.vit.modules() if hasattr(m, "fused_attn")]
    assert len(flags) == 4 and all(flags)


def test_missing_weights_file_is_named(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        tiny(weights=missing)


@pytest.mark.parametrize("name", [V2, "vit_small_patch14_reg4_dinov2", V3, "vit_small_patch16_dinov3_qkvb"])
def test_weights_in_timm_format_load_bit_identically_without_random_init(tmp_path, name):
    side = 64 if "patch16" in name else 56
    source = source_model(name, seed=0, img_size=side, **SMALL_KWARGS)
    path = tmp_path / "timm.pth"
    torch.save(source.state_dict(), path)
    rng = torch.random.get_rng_state()
    backbone = tiny(name, img_size=side, kwargs=SMALL_KWARGS, weights=str(path))
    assert torch.equal(rng, torch.random.get_rng_state())  # nothing was randomly initialised
    old = loaded_the_old_way(name, path, side, SMALL_KWARGS)
    x = torch.rand(2, 3, side, side + 2 * backbone.patch_size)
    assert_same_outputs(backbone, old, x)
    assert_same_outputs(backbone, source, x)
    # Non-persistent buffers (RoPE periods, zero key biases) are computed, not left on the meta device.
    tensors = dict(backbone.vit.named_parameters()) | dict(backbone.vit.named_buffers())
    assert not any(t.is_meta for t in tensors.values())
    reference = dict(old.named_parameters()) | dict(old.named_buffers())
    assert tensors.keys() == reference.keys()
    assert all(torch.equal(t, reference[k]) for k, t in tensors.items())


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


def to_original_dinov3(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Renames a timm DINOv3 (Eva) state dict the way Meta's release stores it (inverse of timm's eva
    checkpoint filter): registers are storage_tokens, layer scales ls1/ls2.gamma, SwiGLU w1/w2/w3, one qkv
    bias with a zero key part and its bias_mask, plus the pretraining-only mask_token and RoPE periods."""
    renames = [
        (r"^reg_token$", "storage_tokens"),
        (r"\.gamma_1$", ".ls1.gamma"),
        (r"\.gamma_2$", ".ls2.gamma"),
        (r"\.mlp\.fc1_g\.", ".mlp.w1."),
        (r"\.mlp\.fc1_x\.", ".mlp.w2."),
        (r"(\.mlp\.fc2\.)", r".mlp.w3." if any(".fc1_g." in k for k in state) else r"\1"),
    ]
    out = {}
    for key, value in state.items():
        if key.endswith((".q_bias", ".v_bias")):
            continue
        for pattern, replacement in renames:
            key = re.sub(pattern, replacement, key)
        out[key] = value.clone()
    for key in [k for k in state if k.endswith(".q_bias")]:
        q, v = state[key], state[key.replace("q_bias", "v_bias")]
        out[key.replace("q_bias", "qkv.bias")] = torch.cat([q, torch.zeros_like(q), v])
        out[key.replace("q_bias", "qkv.bias_mask")] = torch.ones(3 * q.numel())
    dim = state["cls_token"].shape[-1]
    out["mask_token"] = torch.zeros(1, dim)
    out["rope_embed.periods"] = torch.ones(4)
    return out


@pytest.mark.parametrize(
    ("name", "side"),
    [
        ("vit_giant_patch14_dinov2", 56),
        ("vit_small_patch14_reg4_dinov2", 56),
        ("vit_large_patch16_dinov3", 64),
        ("vit_huge_plus_patch16_dinov3", 64),
        ("vit_small_patch16_dinov3_qkvb", 64),
    ],
)
def test_weights_in_original_meta_format(tmp_path, name, side):
    is_v3 = "dinov3" in name
    # DINOv2's release resolution (518 px: 37x37 position embeddings) is resampled to img_size on load.
    source = source_model(name, seed=1, img_size=side if is_v3 else 518, **SMALL_KWARGS)
    original = (to_original_dinov3 if is_v3 else to_original_dinov2)(source.state_dict())
    assert "mask_token" in original
    if is_v3:
        assert "storage_tokens" in original and "blocks.0.ls1.gamma" in original
        assert ("blocks.1.mlp.w3.weight" in original) == ("huge" in name)
        assert ("blocks.0.attn.qkv.bias" in original) == name.endswith("qkvb")
    elif "giant" in name:
        assert "blocks.0.mlp.w12.weight" in original and "blocks.1.mlp.w3.bias" in original
    else:
        assert "register_tokens" in original and original["pos_embed"].shape[1] == 37 * 37 + 1
    path = tmp_path / "meta_pretrain.pth"
    torch.save(original, path)

    backbone = DINOBackbone(name, weights=path, img_size=side, model_kwargs=SMALL_KWARGS)
    x = torch.rand(1, 3, side, side)
    assert_same_outputs(backbone, loaded_the_old_way(name, path, side, SMALL_KWARGS), x)
    assert_same_outputs(backbone, source, x, exact=False)


@pytest.mark.parametrize("name", [V2, "vit_small_patch16_dinov3_qkvb"])
def test_empty_build_takes_its_weights_from_a_state_dict(name):
    trained = tiny(name, kwargs=SMALL_KWARGS)
    rng = torch.random.get_rng_state()
    empty = tiny(name, kwargs=SMALL_KWARGS, empty=True, weights="/not/read.pth")
    assert torch.equal(rng, torch.random.get_rng_state())
    tensors = [*empty.parameters(), *empty.buffers()]
    assert tensors and not any(t.is_meta for t in tensors)
    assert not any(p.requires_grad for p in empty.parameters())
    empty.load_state_dict(trained.state_dict())  # a plain copying load, as Lightning's
    side = 64 if "patch16" in name else 56
    x = torch.rand(1, 3, side, side)
    for got, want in zip(empty.eval()(x), trained.eval()(x), strict=True):
        assert torch.equal(got, want)
    assert empty.fingerprint() == trained.fingerprint()


def test_wrong_architecture_file_names_the_file(tmp_path):
    source = source_model(V2, seed=0, img_size=56, **SMALL_KWARGS)
    path = tmp_path / "small.pth"
    torch.save(source.state_dict(), path)
    with pytest.raises(RuntimeError, match="small.pth"):
        tiny(kwargs=dict(depth=2, embed_dim=48, num_heads=2), weights=path)


@pytest.mark.parametrize("name", [V2, V3])
def test_fingerprint_tracks_weights(tmp_path, name):
    source = source_model(name, seed=0, img_size=SIDE[name], **SMALL_KWARGS)
    path = tmp_path / "timm.pth"
    torch.save(source.state_dict(), path)
    first, second = (tiny(name, kwargs=SMALL_KWARGS, weights=path) for _ in range(2))
    assert re.fullmatch(r"[0-9a-f]{16}", first.fingerprint())
    assert first.fingerprint() == second.fingerprint() == first.fingerprint()
    torch.manual_seed(123)
    assert tiny(name, kwargs=SMALL_KWARGS).fingerprint() != first.fingerprint()
    with torch.no_grad():
        second.vit.norm.weight[0] += 1.0
    assert second.fingerprint() != first.fingerprint()


def _fusions(num_blocks: int) -> list[BlockFusion]:
    torch.manual_seed(3)
    fusions = [
        BlockFusion(num_blocks),
        BlockFusion(num_blocks, groups=2),
        BlockFusion(num_blocks, mode="mean"),
    ]
    for fusion in fusions[:2]:
        torch.nn.init.normal_(fusion.logits)
    return fusions


@pytest.mark.parametrize("name", [V2, V3])
def test_fusing_while_the_blocks_run_equals_fusing_their_maps(name):
    """Inference fuses each block's map into a running sum (memory independent of the number of blocks)."""
    backbone = tiny(name).eval()
    x = torch.rand(2, 3, SIDE[name], SIDE[name])
    fusions = _fusions(backbone.num_blocks)
    with torch.no_grad():
        running = backbone.fused(x, fusions)
        maps = backbone(x)
        for got, fusion in zip(running, fusions, strict=True):
            for a, b in zip(got, fusion(maps), strict=True):
                assert torch.equal(a, b)


@pytest.mark.parametrize("autocast", [False, True])
def test_training_keeps_maps_in_the_compute_dtype_and_the_fusion_gradient_exact(autocast):
    """Today's path (timm's list of fp32 maps, each cast to the autocast dtype, then fused) and the new one
    (each map cast as its block finishes) give the fusion weights the same gradient, bit for bit."""
    backbone = tiny().eval()
    x = torch.rand(2, 3, 56, 56)
    (fusion,) = _fusions(backbone.num_blocks)[:1]
    target = torch.randn(2, backbone.embed_dim, 4, 4)

    def fusion_grad(maps_of) -> torch.Tensor:
        fusion.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            maps = maps_of(x)
            (fused,) = fusion(maps)
            (fused.float() * target).sum().backward()
        assert {m.dtype for m in maps} == {torch.bfloat16 if autocast else torch.float32}
        return fusion.logits.grad.clone()

    def todays(x: torch.Tensor) -> list[torch.Tensor]:
        dtype = torch.bfloat16 if autocast else torch.float32
        return [m.to(dtype) for m in timm_reference(backbone.vit, x)]

    assert torch.equal(fusion_grad(backbone), fusion_grad(todays))
