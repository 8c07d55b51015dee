import dataclasses

import lightning as L
import pytest
import timm
import torch

from la_seg.data.datasets import SliceDataset
from la_seg.data.layouts import find_cases
from la_seg.metrics import overlap_3d
from la_seg.module import LASegModule


def slice_batch(root, img_size, n=8):
    """The n slices with the most LA from the synthetic cases, as one training batch."""
    dataset = SliceDataset(find_cases(root), img_size=img_size)
    items = sorted((dataset[i] for i in range(len(dataset))), key=lambda it: -float(it["label"].sum()))[:n]
    return {k: torch.stack([it[k] for it in items]) for k in ("image", "label")}


def test_overfits_one_batch(tiny_net, synth_root):
    torch.manual_seed(0)
    module = LASegModule(net=tiny_net, loss="dice_bce")
    batch = slice_batch(synth_root, tiny_net.img_size)
    optimizer = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=3e-3)
    module.train()
    for _ in range(40):
        optimizer.zero_grad()
        module.training_step(batch, 0).backward()
        optimizer.step()
    module.eval()
    with torch.no_grad():
        pred = torch.sigmoid(module(batch["image"])) > 0.5
    dice, _ = overlap_3d(pred, batch["label"].bool())
    assert dice > 0.9


def test_segment_volume_returns_original_geometry(tiny_net):
    module = LASegModule(net=tiny_net, eval_batch_size=3, postprocess="largest_component").eval()
    image = torch.rand(50, 37, 7)
    prob, mask = module.segment_volume(image)
    assert prob.shape == mask.shape == image.shape
    assert mask.dtype == torch.bool and 0 <= float(prob.min()) <= float(prob.max()) <= 1


def test_only_trainable_parameters_reach_the_optimiser(tiny_net):
    module = LASegModule(net=tiny_net)
    params = module.configure_optimizers().param_groups[0]["params"]
    assert params and all(p.requires_grad for p in params)
    backbone = {id(p) for p in module.net.backbone.parameters()}
    assert not backbone & {id(p) for p in params}


def weights_file(path, seed, kwargs):
    torch.manual_seed(seed)
    model = timm.create_model(
        "vit_small_patch14_dinov2", pretrained=False, img_size=56, num_classes=0, **kwargs
    )
    torch.save(model.state_dict(), path)
    return str(path)


def save(module, path):
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(path)
    return path


def test_lean_checkpoint_reloads_identically_and_is_small(tiny_net, tmp_path):
    net = dataclasses.replace(
        tiny_net, weights=weights_file(tmp_path / "vit.pth", 1, tiny_net.backbone_kwargs)
    )
    module = LASegModule(net=net).eval()
    lean = save(module, tmp_path / "lean.ckpt")
    full = save(LASegModule(net=net, save_backbone=True).eval(), tmp_path / "full.ckpt")
    assert lean.stat().st_size < full.stat().st_size * 0.8
    state = torch.load(lean, weights_only=False)["state_dict"]
    assert not any(k.startswith("net.backbone.") for k in state)

    reloaded = LASegModule.load_from_checkpoint(lean).eval()
    x = torch.rand(2, 3, 56, 56)
    with torch.no_grad():
        assert torch.equal(module(x), reloaded(x))


def test_lean_checkpoint_refuses_a_different_backbone(tiny_net, tmp_path):
    path = tmp_path / "vit.pth"
    net = dataclasses.replace(tiny_net, weights=weights_file(path, 1, tiny_net.backbone_kwargs))
    lean = save(LASegModule(net=net), tmp_path / "lean.ckpt")
    weights_file(path, 2, tiny_net.backbone_kwargs)  # the weights file changed since training
    with pytest.raises(RuntimeError, match="fingerprint"):
        LASegModule.load_from_checkpoint(lean)


def test_random_or_trained_backbone_is_always_stored(tiny_net, tmp_path):
    for net in (tiny_net, dataclasses.replace(tiny_net, trainable_blocks=1)):
        torch.manual_seed(0)
        module = LASegModule(net=net).eval()
        ckpt = save(module, tmp_path / "m.ckpt")
        torch.manual_seed(123)  # a rebuilt random backbone would differ: the checkpoint must carry it
        reloaded = LASegModule.load_from_checkpoint(ckpt).eval()
        x = torch.rand(1, 3, 56, 56)
        with torch.no_grad():
            assert torch.equal(module(x), reloaded(x))


def test_compile_gives_the_same_outputs(tiny_net):
    torch.manual_seed(0)
    eager = LASegModule(net=tiny_net).eval()
    compiled = LASegModule(net=tiny_net, compile=True).eval()
    compiled.load_state_dict(eager.state_dict())  # compiling in place keeps the checkpoint keys
    x = torch.rand(2, 3, 56, 56)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), eager(x), rtol=1e-4, atol=1e-5)
