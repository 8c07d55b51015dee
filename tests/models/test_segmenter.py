"""LASegmenter end to end: shapes, where gradients go, learning fusion weights, and the ablations."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import yaml

from la_seg.config_file import CONFIG_DIR
from la_seg.errors import naming_options
from la_seg.models import ImageGuidedDecoder, LASegmenter, SegmenterConfig

# 2 blocks per group with 4 fusion groups; layer scale 1 (not timm's 1e-5 init) so random blocks differ
TINY = dict(depth=8, embed_dim=32, num_heads=2, init_values=1.0)


def config(**overrides) -> SegmenterConfig:
    base = dict(
        backbone="vit_small_patch14_dinov2",
        pretrained=False,
        img_size=56,
        backbone_kwargs=TINY,
        decoder_channels=[32, 16, 8, 8],
    )
    return SegmenterConfig(**{**base, **overrides})


def build(seed: int = 0, **overrides) -> LASegmenter:
    torch.manual_seed(seed)
    return LASegmenter(config(**overrides))


def batch(h: int = 56, w: int = 56, n: int = 2, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    image = torch.rand(n, 3, h, w, generator=generator)
    return image, (image[:, :1] > 0.5).float()


def trainable(model: LASegmenter) -> list[torch.nn.Parameter]:
    """What LASegModule.build_optimizer hands the optimiser."""
    return [p for p in model.parameters() if p.requires_grad]


def train_steps(model: LASegmenter, steps: int = 4) -> None:
    optimiser = torch.optim.Adam(trainable(model), lr=0.05)
    image, target = batch()
    model.train()
    for _ in range(steps):
        optimiser.zero_grad()
        torch.nn.functional.binary_cross_entropy_with_logits(model(image), target).backward()
        optimiser.step()


@pytest.mark.parametrize(("size", "depth"), [((64, 64), 4), ((64, 96), 2)])
def test_dinov3_backbone_end_to_end(size, depth):
    kwargs = dict(TINY, depth=depth)
    model = build(backbone="vit_small_patch16_dinov3", img_size=64, backbone_kwargs=kwargs).eval()
    assert model.backbone.patch_size == 16
    with torch.no_grad():
        assert model(torch.rand(1, 3, *size)).shape == (1, 1, *size)


@pytest.mark.parametrize(("size", "depth"), [((56, 56), 4), ((56, 84), 4), ((224, 224), 4), ((448, 448), 2)])
def test_output_shapes(size, depth):
    model = build(backbone_kwargs=dict(TINY, depth=depth), decoder_channels=[16, 8]).eval()
    with torch.no_grad():
        assert model(torch.rand(1, 3, *size)).shape == (1, 1, *size)


def test_frozen_backbone_gets_no_gradient():
    model = build()
    model.train()
    assert model.training and not model.backbone.vit.training
    image, target = batch()
    torch.nn.functional.binary_cross_entropy_with_logits(model(image), target).backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert model.fusion.logits.grad is not None
    assert all(p.grad is not None for p in model.decoder.parameters())
    learning = {id(p) for p in trainable(model)}
    assert not learning & {id(p) for p in model.backbone.parameters()}
    assert learning == {id(p) for p in (*model.fusion.parameters(), *model.decoder.parameters())}


def test_last_block_trainable():
    model = build(trainable_blocks=1)
    image, target = batch()
    torch.nn.functional.binary_cross_entropy_with_logits(model(image), target).backward()
    with_grad = {n for n, p in model.backbone.vit.named_parameters() if p.grad is not None}
    names = [n for n, _ in model.backbone.vit.named_parameters()]
    assert with_grad == {n for n in names if n.startswith(("blocks.7.", "norm."))}


@pytest.mark.parametrize("groups", [1, 4])
def test_fusion_weights_sum_to_one_and_move(groups):
    model = build(fusion_groups=groups)
    before = model.fusion_weights()
    assert len(before) == groups and sum(len(w) for w in before) == 8
    train_steps(model)
    after = model.fusion_weights()
    for b, a in zip(before, after, strict=True):
        torch.testing.assert_close(a.sum(), torch.tensor(1.0))
        assert not torch.allclose(a, b)


def outputs_with_weights_of(model: LASegmenter, **overrides) -> tuple[torch.Tensor, torch.Tensor]:
    """Output of ``model`` and of an ablated copy that shares every weight it has.

    In train mode, so BatchNorm uses batch statistics: with the untrained running statistics of eval mode the
    random decoder shrinks its input signal to ~1e-6 and every variant would look alike.
    """
    other = LASegmenter(dataclasses.replace(model.config, **overrides))
    other.load_state_dict({k: v for k, v in model.state_dict().items() if k in other.state_dict()})
    image, _ = batch(seed=1)
    with torch.no_grad():
        return model.train()(image), other.train()(image)


def test_fusion_ablations_change_the_output():
    model = build()
    same, mean = outputs_with_weights_of(model, fusion="mean")
    torch.testing.assert_close(same, mean)  # softmax starts at equal weights
    _, last = outputs_with_weights_of(model, fusion="last")
    assert not torch.allclose(same, last, atol=1e-4)
    train_steps(model)
    trained, mean = outputs_with_weights_of(model, fusion="mean")
    assert not torch.allclose(trained, mean, atol=1e-4)
    assert list(LASegmenter(config(fusion="mean")).fusion.parameters()) == []


def test_image_guidance_ablation():
    guided, plain = build(), build(image_guidance=False)
    n_guided = sum(p.numel() for p in guided.parameters())
    assert sum(p.numel() for p in plain.parameters()) < n_guided
    image, _ = batch()
    with torch.no_grad():
        assert not torch.allclose(guided(image), plain(image), atol=1e-4)


def test_fusion_groups_must_be_one_or_one_per_decoder_level():
    with pytest.raises(ValueError, match=r"^fusion_groups=3: it must be 1 .* or 4 "):
        build(fusion_groups=3)
    for groups in (1, 3):
        model = build(fusion_groups=groups, decoder_channels=[16, 8, 8])
        assert model(batch()[0]).shape == (2, 1, 56, 56)


def demo_net() -> SegmenterConfig:
    """The `net` section of the shipped demo config, at its data.img_size (as the CLI links them)."""
    config = yaml.safe_load((CONFIG_DIR / "demo.yaml").read_text())
    return SegmenterConfig(**config["model"]["net"], img_size=config["data"]["img_size"])


def test_demo_fusion_learns():
    net = demo_net()
    torch.manual_seed(0)
    model = LASegmenter(net)
    image = torch.rand(2, 3, net.img_size, net.img_size)
    target = (image[:, :1] > 0.5).float()
    torch.nn.functional.binary_cross_entropy_with_logits(model.train()(image), target).backward()
    assert model.fusion.logits.grad is not None and (model.fusion.logits.grad != 0).all()
    # Four groups over the demo's four blocks would be four softmaxes over one block each: refused.
    with pytest.raises(ValueError, match="^groups=4 over 4 tapped blocks") as refused:
        LASegmenter(dataclasses.replace(net, fusion_groups=4))
    # The command line names the options that set the network's arguments.
    assert str(naming_options(refused.value)) == (
        "model.net.fusion_groups=4 over 4 tapped blocks leaves a softmax over a single block: its weight is "
        "a constant 1 and cannot learn; use model.net.fusion_groups <= 2 (1 is the paper) or "
        "model.net.fusion='last'"
    )


def test_empty_backbone_is_filled_by_a_checkpoint_state_dict():
    trained = build(seed=3)
    train_steps(trained, steps=1)
    rng = torch.random.get_rng_state()
    empty = LASegmenter(trained.config, empty_backbone=True)
    # Only the decoder drew random numbers (it equals one built alone from the same state): the ViT drew none.
    torch.random.set_rng_state(rng)
    alone = ImageGuidedDecoder(32, channels=trained.config.decoder_channels)
    assert all(torch.equal(a, b) for a, b in zip(empty.decoder.parameters(), alone.parameters(), strict=True))
    empty.load_state_dict(trained.state_dict())
    image, _ = batch(seed=2)
    with torch.no_grad():
        torch.testing.assert_close(empty.eval()(image), trained.eval()(image), rtol=0, atol=0)


def test_inference_fuses_while_the_blocks_run_training_keeps_the_maps(monkeypatch):
    """Without a gradient (validation, test, predict) no list of block maps is built; in training the fusion
    weights need them (and get the same output)."""
    net = build().eval()
    x, _ = batch()
    built = []
    forward = type(net.backbone).forward
    monkeypatch.setattr(type(net.backbone), "forward", lambda self, x: built.append(1) or forward(self, x))
    with torch.no_grad():
        streamed = net(x)
    assert not built
    trained = net(x)
    assert built and trained.requires_grad
    torch.testing.assert_close(streamed, trained.detach(), rtol=0, atol=0)
