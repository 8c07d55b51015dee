import dataclasses
import gc
import math
import weakref

import lightning as L
import pytest
import timm
import torch
from monai.transforms import KeepLargestConnectedComponent
from tiny_options import member, stretched

from la_seg.data.datasets import SliceDataset
from la_seg.data.io import Geometry
from la_seg.data.layouts import find_cases
from la_seg.data.preprocess import labels_to_input, restore_geometry, slices_to_input
from la_seg.errors import DataError
from la_seg.inference import postprocess_mask
from la_seg.metrics import overlap_3d
from la_seg.module import LASegModule, warmup_cosine_schedule
from la_seg.plausibility import Plausibility


def slice_batch(root, img_size, n=8):
    """The n slices with the most LA from the synthetic cases, as one training batch."""
    dataset = SliceDataset(find_cases(root), stretched(img_size))
    items = sorted((dataset[i] for i in range(len(dataset))), key=lambda it: -float(it["label"].sum()))[:n]
    return {k: torch.stack([it[k] for it in items]) for k in ("image", "label")}


def test_overfits_one_batch(tiny_net, synth_root):
    torch.manual_seed(0)
    module = LASegModule(net=tiny_net, in_plane="stretch", loss="dice_bce")
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


def test_inference_returns_the_volume_geometry_and_post_processes_the_mask(tiny_net):
    module = LASegModule(
        net=tiny_net, in_plane="stretch", eval_batch_size=3, postprocess="largest_component", threshold=0.3
    ).eval()
    image = torch.rand(50, 37, 7)
    result = module.infer(image)
    assert result.prob.shape == result.mask.shape == image.shape
    assert result.mask.dtype == torch.bool and 0 <= float(result.prob.min()) <= float(result.prob.max()) <= 1
    assert torch.equal(result.mask, postprocess_mask(result.prob > 0.3, "largest_component"))


def test_only_trainable_parameters_reach_the_optimiser(tiny_net):
    module = LASegModule(net=tiny_net, in_plane="stretch")
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
    module = LASegModule(net=net, in_plane="stretch").eval()
    lean = save(module, tmp_path / "lean.ckpt")
    full = save(LASegModule(net=net, in_plane="stretch", save_backbone=True).eval(), tmp_path / "full.ckpt")
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
    lean = save(LASegModule(net=net, in_plane="stretch"), tmp_path / "lean.ckpt")
    weights_file(path, 2, tiny_net.backbone_kwargs)  # the weights file changed since training
    with pytest.raises(DataError, match=f"{lean}.*fingerprint"):
        LASegModule.load_from_checkpoint(lean)


def test_random_or_trained_backbone_is_always_stored(tiny_net, tmp_path):
    for net in (tiny_net, dataclasses.replace(tiny_net, trainable_blocks=1)):
        torch.manual_seed(0)
        module = LASegModule(net=net, in_plane="stretch").eval()
        ckpt = save(module, tmp_path / "m.ckpt")
        torch.manual_seed(123)  # a rebuilt random backbone would differ: the checkpoint must carry it
        reloaded = LASegModule.load_from_checkpoint(ckpt).eval()
        x = torch.rand(1, 3, 56, 56)
        with torch.no_grad():
            assert torch.equal(module(x), reloaded(x))


@pytest.mark.slow
def test_compile_gives_the_same_outputs(tiny_net):
    torch.manual_seed(0)
    eager = LASegModule(net=tiny_net, in_plane="stretch").eval()
    compiled = LASegModule(net=tiny_net, in_plane="stretch", compile=True).eval()
    compiled.load_state_dict(eager.state_dict())  # compiling in place keeps the checkpoint keys
    x = torch.rand(2, 3, 56, 56)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), eager(x), rtol=1e-4, atol=1e-5)


def old_lambda_factor(step, warmup, total, cosine):
    """The hand-written LambdaLR factor that warmup_cosine_schedule replaces."""
    if step < warmup:
        return (step + 1) / warmup
    if not cosine:
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


@pytest.mark.parametrize(
    ("warmup", "total", "cosine"), [(5, 40, True), (5, 40, False), (0, 30, True), (1, 9, True)]
)
def test_schedule_matches_the_old_formula(warmup, total, cosine):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler = warmup_cosine_schedule(optimizer, warmup, total, cosine)
    for step in range(total):
        lr = optimizer.param_groups[0]["lr"]
        assert lr == pytest.approx(0.1 * old_lambda_factor(step, warmup, total, cosine), abs=1e-9), step
        optimizer.step()
        scheduler.step()


def volume_batch(synth_root, with_label=True):
    from la_seg.data.datasets import VolumeDataset

    item = VolumeDataset(find_cases(synth_root)[:1], with_labels=with_label, cache="none")[0]
    return {
        **item,
        "image": item["image"][:, :, :5],
        **({"label": item["label"][:, :, :5]} if with_label else {}),
    }


def reference_logits(module: LASegModule, image: torch.Tensor, chunk: int) -> torch.Tensor:
    """(Z, S, S) float32 slice logits of the module's net, chunk by chunk, as before the ensemble engine."""
    with torch.no_grad():
        return torch.cat(
            [
                module.net(
                    slices_to_input(image, module.net_config.img_size, False, index=slice(s, s + chunk))
                ).float()[:, 0]
                for s in range(0, image.shape[-1], chunk)
            ]
        )


def reference_mask(module: LASegModule, logits: torch.Tensor, shape: tuple) -> torch.Tensor:
    """The pre-ensemble mask: sigmoid, restored geometry, threshold, largest component."""
    mask = restore_geometry(torch.sigmoid(logits), shape) > module.hparams.threshold
    return KeepLargestConnectedComponent()(mask[None]).squeeze(0).bool() if mask.any() else mask


@pytest.mark.parametrize("loss", ["bce", "dice_bce", "batch_dice_bce"])
def test_eval_loss_is_the_training_loss_on_the_model_slices(tiny_net, synth_root, loss):
    module = LASegModule(
        net=tiny_net, in_plane="stretch", loss=loss, eval_batch_size=2
    ).eval()  # 5 slices: chunks 2, 2, 1
    batch = volume_batch(synth_root)
    logits = reference_logits(module, batch["image"], chunk=2)
    target = labels_to_input(batch["label"], tiny_net.img_size)
    expected = module.loss_fn(logits[:, None], target)
    torch.testing.assert_close(module.eval_loss(logits, batch["label"]), expected)


def test_batch_dice_counts_the_batch_as_one_region(tiny_net):
    """batch_dice_bce: one Dice over all the batch's voxels (nnU-Net's batch Dice), plus BCE; dice_bce
    averages one Dice per slice, so a small section weighs as much as a large one."""
    torch.manual_seed(0)
    logits = torch.randn(2, 1, 8, 8)
    target = torch.zeros(2, 1, 8, 8)
    target[0, :, :6, :6] = 1  # a large section
    target[1, :, 3:4, 3:5] = 1  # a small one
    prob = torch.sigmoid(logits)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, target)

    def dice(p, t):
        return 1 - (2 * (p * t).sum() + 1e-5) / (p.sum() + t.sum() + 1e-5)

    batch = LASegModule(net=tiny_net, in_plane="stretch", loss="batch_dice_bce").loss_fn(logits, target)
    per_slice = LASegModule(net=tiny_net, in_plane="stretch", loss="dice_bce").loss_fn(logits, target)
    torch.testing.assert_close(batch, dice(prob, target) + bce)
    torch.testing.assert_close(per_slice, (dice(prob[0], target[0]) + dice(prob[1], target[1])) / 2 + bce)
    assert not torch.isclose(batch, per_slice)


def test_unknown_loss_is_one_line_naming_the_choices(tiny_net):
    with pytest.raises(
        ValueError, match=r"model.loss must be one of \['bce', 'dice_bce', 'batch_dice_bce'\], got 'dice'"
    ):
        LASegModule(net=tiny_net, in_plane="stretch", loss="dice")


@pytest.mark.parametrize("tta", ["none", "flips"])
def test_evaluation_through_the_engine_keeps_the_single_model_loss_and_mask(tiny_net, synth_root, tta):
    """One member without flips: loss and mask bit for bit as the pre-ensemble path; with flips the loss is
    still the model's own unflipped one, and the case gets the flips' agreement."""
    module = LASegModule(
        net=tiny_net, in_plane="stretch", eval_batch_size=2, postprocess="largest_component", tta=tta
    ).eval()
    batch = volume_batch(synth_root)
    logged = {}
    module.log = lambda name, value, **kwargs: logged.update({name: value})
    module.on_test_epoch_start()
    output = module.test_step(batch, 0)
    module.on_test_epoch_end()
    logits = reference_logits(module, batch["image"], chunk=2)
    assert logged["test/loss"] == float(module.eval_loss(logits, batch["label"]))
    if tta == "none":
        assert torch.equal(output["pred"], reference_mask(module, logits, tuple(batch["image"].shape)))
        assert output["agreement"] is None
    else:
        assert output["agreement"]["voters"] == ["identity", "flip_x", "flip_y", "flip_xy"]


def test_evaluation_loss_is_a_mean_over_cases_each_counted_once(tiny_net):
    """A case that the distributed sampler repeats (or a rank evaluates twice) counts once in `val/loss`."""
    module = LASegModule(net=tiny_net, in_plane="stretch")
    logged = {}
    module.log = lambda name, value, **kwargs: logged.update({name: (value, kwargs)})
    module._case_losses = [{"case_id": c, "loss": v} for c, v in (("a", 1.0), ("b", 4.0), ("a", 1.0))]
    module.on_validation_epoch_end()
    assert logged["val/loss"] == (2.5, {"batch_size": 2, "sync_dist": False})
    assert module._case_losses == []


def test_extra_members_vote_but_stay_out_of_the_state_dict(tiny_net, synth_root, tmp_path):
    module = LASegModule(net=tiny_net, in_plane="stretch", eval_batch_size=2).eval()
    keys = set(module.state_dict())
    torch.manual_seed(1)
    other = LASegModule(net=tiny_net, in_plane="stretch").eval()
    module.add_member(member("other", other.net))
    assert set(module.state_dict()) == keys and module.has_voters
    batch = volume_batch(synth_root, with_label=False)
    output = module.predict_step(batch, 0)
    expected = module.ensemble().segment_volume(batch["image"], chunk=2).prob
    assert torch.equal(output["prob"], expected)
    assert output["uncertainty"].shape == batch["image"].shape
    assert output["agreement"]["voters"] == ["model", "other"]
    assert module.describe_ensemble()["members"] == ["model", "other"]


def test_validation_runs_under_mixed_precision(tiny_net, synth_root):
    """CUDA autocast refuses binary_cross_entropy; the conftest fixture makes any autocast refuse it too."""
    module = LASegModule(net=tiny_net, in_plane="stretch").eval()
    batch = volume_batch(synth_root)
    logged = {}
    module.log = lambda name, value, **kwargs: logged.update({name: value})
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = module.validation_step(batch, 0)
        module.on_validation_epoch_end()
    assert isinstance(logged["val/loss"], float) and math.isfinite(logged["val/loss"])
    assert output["pred"].dtype == torch.bool and output["pred"].shape == batch["image"].shape
    assert output["label"].dtype == torch.bool and isinstance(output["geometry"], Geometry)


def test_predict_step_returns_tensors_and_passes_the_geometry_through(tiny_net, synth_root):
    module = LASegModule(net=tiny_net, in_plane="stretch").eval()
    batch = volume_batch(synth_root, with_label=False)
    geometry = Geometry(shape=(1, 2, 3), affine=torch.eye(4).numpy(), spacing=(1.0, 1.0, 2.0), source="x.nii")
    output = module.predict_step({**batch, "geometry": geometry}, 0)
    assert output["geometry"] is geometry and output["case_id"] == batch["case_id"]
    assert output["mask"].dtype == torch.bool and output["prob"].dtype == torch.float32
    assert output["mask"].shape == output["prob"].shape == batch["image"].shape


def test_inference_settings_are_exposed(tiny_net):
    module = LASegModule(net=tiny_net, in_plane="stretch", threshold=0.7, postprocess="largest_component")
    assert module.inference_settings() == {
        "threshold": 0.7,
        "tta": "none",
        "postprocess": "largest_component",
        "eval_batch_size": 32,
        "review_below": 0.9,
        "review_expected_dice": 0.0,
        "plausibility": dataclasses.asdict(Plausibility()),
        "weights": None,
        "calibration": None,
    }


def test_a_batch_with_geometry_moves_to_the_device(tiny_net, synth_root):
    module = LASegModule(net=tiny_net, in_plane="stretch")
    batch = volume_batch(synth_root)
    geometry = Geometry(shape=(1, 2, 3), affine=torch.eye(4).numpy(), spacing=(1.0, 1.0, 2.0), source="x.nii")
    moved = module.transfer_batch_to_device({**batch, "geometry": geometry}, torch.device("cpu"), 0)
    assert torch.equal(moved["image"], batch["image"])
    assert (moved["geometry"].shape, moved["geometry"].source) == (geometry.shape, geometry.source)


def test_a_member_with_the_same_frozen_backbone_shares_the_module_s_copy(tiny_net):
    module = LASegModule(net=tiny_net, in_plane="stretch").eval()
    torch.manual_seed(1)
    other = LASegModule(net=tiny_net, in_plane="stretch").eval()
    other.net.backbone.load_state_dict(module.net.backbone.state_dict())
    module.add_member(member("other", other.net))
    ensemble = module.ensemble()
    assert len(ensemble.passes) == 1 and len(ensemble.backbones) == 1
    assert list(ensemble.backbones.values())[0] is module.net.backbone
    assert module.describe_ensemble()["passes"][0]["members"] == ["model", "other"]
    copy = weakref.ref(other.net.backbone)
    del other
    gc.collect()
    assert copy() is None, "the member's own copy of the backbone is freed once the caller drops it"
