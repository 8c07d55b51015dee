"""Ensembles sharing a backbone pass, test-time flips and uncertainty (la_seg/inference.py), tiny ViTs."""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import json
import re
from pathlib import Path

import pytest
import torch
from tiny_options import member, stretched
from torch.utils.flop_counter import FlopCounterMode

from la_seg.data.preprocess import restore_geometry, slices_to_input
from la_seg.data.transforms import AugmentationConfig
from la_seg.errors import DataError
from la_seg.inference import (
    POSTPROCESSING,
    TTA_VIEWS,
    VIEWS,
    Ensemble,
    case_agreement,
    check_tta_trained,
    cut_windows,
    join_windows,
    plane_windows,
    postprocess_mask,
    voter_agreements,
)
from la_seg.metrics import overlap_3d, volume_ml
from la_seg.models.segmenter import LASegmenter
from la_seg.module import LASegModule

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "ensemble.py"
CHUNK = 4
DEPTH = 6  # two chunks


@pytest.fixture
def image() -> torch.Tensor:
    return torch.rand(40, 36, DEPTH, generator=torch.Generator().manual_seed(0))


def make_net(config, seed: int, weights_from: LASegmenter | None = None) -> LASegmenter:
    """A tiny segmenter with its own random heads; `weights_from` copies another's backbone weights."""
    torch.manual_seed(seed)
    net = LASegmenter(config)
    if weights_from is not None:
        net.backbone.load_state_dict(weights_from.backbone.state_dict())
    return net.eval()


def reference_prob(
    net: LASegmenter, image: torch.Tensor, slice_context: bool = False, gamma: float = 1.0
) -> torch.Tensor:
    """One model on the whole volume (its input's grey values raised to `gamma`), written out independently
    of la_seg.inference."""
    with torch.no_grad():
        probs = [
            torch.sigmoid(
                net(
                    slices_to_input(image, net.config.img_size, slice_context, index=slice(s, s + CHUNK))
                    ** gamma
                )
            )
            for s in range(0, image.shape[-1], CHUNK)
        ]
    return restore_geometry(torch.cat(probs)[:, 0], tuple(image.shape))


def count_calls(backbone: torch.nn.Module) -> list[int]:
    """Backbone passes: calls of its patch embedding (however the backbone is entered: forward or fused)."""
    calls = [0]
    backbone.vit.patch_embed.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def flops(fn, *args) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn(*args)
    return counter.get_total_flops()


def test_shared_frozen_backbone_runs_once_per_chunk(tiny_net, image):
    first = make_net(tiny_net, 0)
    nets = [first] + [make_net(tiny_net, seed, weights_from=first) for seed in (1, 2)]
    ensemble = Ensemble([member(f"fold{i}", net) for i, net in enumerate(nets)]).eval()
    assert list(ensemble.backbones.values()) == [first.backbone]  # held once
    assert len(ensemble.passes) == 1
    calls = count_calls(first.backbone)
    result = ensemble.segment_volume(image, chunk=CHUNK)
    assert calls[0] == 2  # one pass per chunk, not one per member
    expected = torch.stack([reference_prob(net, image) for net in nets]).mean(0)
    assert result.prob.shape == image.shape and result.prob.dtype == torch.float32
    torch.testing.assert_close(result.prob, expected, atol=1e-6, rtol=0)
    assert torch.equal(result.mask, result.prob > 0.5)
    assert result.voter_names == ["fold0", "fold1", "fold2"] and len(result.voter_masks) == 3


def test_members_with_different_backbones_or_inputs_run_separately(tiny_net, image):
    first = make_net(tiny_net, 0)
    other = make_net(tiny_net, 1)  # other backbone weights
    context = make_net(tiny_net, 2, weights_from=first)  # same weights, 2.5D input
    members = [member("a", first), member("b", other), member("c", context, slice_context=True)]
    ensemble = Ensemble(members).eval()
    assert list(ensemble.backbones.values()) == [first.backbone, other.backbone]
    assert [p["members"] for p in ensemble.describe()["passes"]] == [["a"], ["b"], ["c"]]
    first_calls, other_calls = count_calls(first.backbone), count_calls(other.backbone)
    result = ensemble.segment_volume(image, chunk=CHUNK)
    assert (first_calls[0], other_calls[0]) == (4, 2)  # the 2.5D member needs its own pass of the same ViT
    expected = (
        reference_prob(first, image) + reference_prob(other, image) + reference_prob(context, image, True)
    ) / 3
    torch.testing.assert_close(result.prob, expected, atol=1e-6, rtol=0)


def test_trained_backbones_are_never_shared(tiny_net):
    first = make_net(tiny_net, 0)
    trained = make_net(dataclasses.replace(tiny_net, trainable_blocks=-1), 1, weights_from=first)
    assert trained.backbone.fingerprint() == first.backbone.fingerprint()
    ensemble = Ensemble([member("frozen", first), member("trained", trained)])
    assert len(ensemble.backbones) == 2 and len(ensemble.passes) == 2


def test_module_segments_a_volume_as_its_net_does_slice_by_slice(tiny_net, image):
    """The module's whole-volume path (a one-member ensemble) against the net written out slice by slice."""
    module = LASegModule(net=tiny_net, in_plane="stretch", eval_batch_size=CHUNK, threshold=0.4).eval()
    result = module.infer(image)
    torch.testing.assert_close(result.prob, reference_prob(module.net, image), atol=1e-5, rtol=1e-4)
    assert torch.equal(result.mask, result.prob > 0.4)
    assert result.uncertainty is None and result.voter_masks == []
    assert result.voter_agreement((1.0, 1.0, 1.0), "none") is None


def flipped_runs(net: LASegmenter, image: torch.Tensor) -> list[torch.Tensor]:
    """The model on the volume flipped in X, Y, both (original geometry), each flipped back."""
    runs = []
    for dims in ((), (0,), (1,), (0, 1)):
        flipped = image.flip(dims) if dims else image
        prob = reference_prob(net, flipped)
        runs.append(prob.flip(dims) if dims else prob)
    return runs


def viewed_runs(net: LASegmenter, image: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every test-time view's run, by the view's name: the flipped runs, and the input's gammas."""
    flips = dict(zip(("identity", "flip_x", "flip_y", "flip_xy"), flipped_runs(net, image), strict=True))
    return {
        **flips,
        "gamma_0.8": reference_prob(net, image, gamma=0.8),
        "gamma_1.2": reference_prob(net, image, gamma=1.2),
    }


@pytest.mark.parametrize(
    "tta, views",
    [
        ("flips", ["identity", "flip_x", "flip_y", "flip_xy"]),
        ("rot180", ["identity", "flip_xy"]),
        ("gamma", ["identity", "gamma_0.8", "gamma_1.2"]),
    ],
)
def test_tta_averages_its_viewed_runs(tiny_net, image, tta, views):
    net = make_net(tiny_net, 0)
    ensemble = Ensemble([member("model", net)]).eval()
    calls = count_calls(net.backbone)
    result = ensemble.segment_volume(image, chunk=CHUNK, tta=tta)
    assert calls[0] == len(views) * 2  # a backbone pass per view and chunk
    every = viewed_runs(net, image)
    assert set(every) == set(VIEWS)  # every view is checked against a run written out here
    runs = torch.stack([every[view] for view in views])
    torch.testing.assert_close(result.prob, runs.mean(0), atol=1e-5, rtol=0)
    # One model: its views are the voters.
    assert result.voter_names == views and len(result.voter_masks) == len(views)
    torch.testing.assert_close(result.uncertainty, runs.var(0, unbiased=False), atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "tta, training, refused",
    [
        ("gamma", {}, None),  # the default gamma range, 80 to 120 %, reaches both views
        ("gamma", {"gamma": [70, 130]}, None),  # as a checkpoint stores it: a list
        ("gamma", {"gamma": [90, 110]}, "trained with gamma 0.9 to 1.1, which does not reach gamma 0.8, 1.2"),
        ("gamma", {"gamma": [80, 110]}, "does not reach gamma 1.2 "),
        ("gamma", {"gamma": [100, 100]}, "data.augmentation.gamma [80, 120]"),
        ("gamma", {"enabled": False}, "trained with no augmentation"),
        ("gamma", {"p": 0.0}, "trained with no augmentation"),
        ("gamma", None, "does not record its training augmentation"),
        ("flips", {"hflip": True, "vflip": True}, None),
        ("flips", {"hflip": True}, "data.augmentation.vflip true"),
        ("rot180", {"hflip": True, "vflip": True, "p": 0.0}, "without hflip, vflip"),
        ("none", {"enabled": False}, None),
    ],
)
def test_a_test_time_view_needs_the_training_that_makes_a_model_invariant_to_it(tta, training, refused):
    augmentation = None
    if training is not None:
        augmentation = {**dataclasses.asdict(AugmentationConfig()), **training}
    if refused is None:
        check_tta_trained(tta, augmentation, "checkpoint x.ckpt")
        return
    with pytest.raises(DataError, match=re.escape(refused)) as error:
        check_tta_trained(tta, augmentation, "checkpoint x.ckpt")
    assert str(error.value).startswith(f"model.tta {tta}: checkpoint x.ckpt ")


def test_tta_with_shared_ensemble_shares_each_flipped_pass(tiny_net, image):
    first = make_net(tiny_net, 0)
    second = make_net(tiny_net, 1, weights_from=first)
    ensemble = Ensemble([member("a", first), member("b", second)]).eval()
    calls, unused = count_calls(first.backbone), count_calls(second.backbone)
    result = ensemble.segment_volume(image, chunk=CHUNK, tta="flips")
    assert (calls[0], unused[0]) == (4 * 2, 0)  # members share every flipped pass
    per_member = [torch.stack(flipped_runs(net, image)).mean(0) for net in (first, second)]
    torch.testing.assert_close(result.prob, (per_member[0] + per_member[1]) / 2, atol=1e-5, rtol=0)
    # Several members: the members (each averaged over its flips) are the voters.
    assert result.voter_names == ["a", "b"]
    torch.testing.assert_close(
        result.uncertainty, ((per_member[0] - per_member[1]) / 2) ** 2, atol=1e-6, rtol=0
    )


def test_uncertainty_is_zero_where_members_agree(tiny_net, image):
    net = make_net(tiny_net, 0)
    single = Ensemble([member("one", net)]).eval().segment_volume(image, chunk=CHUNK)
    copies = Ensemble([member(name, net) for name in "abc"]).eval()
    assert len(copies.backbones) == 1
    result = copies.segment_volume(image, chunk=CHUNK)
    assert torch.count_nonzero(result.uncertainty) == 0
    assert torch.equal(result.prob, single.prob)
    agreement = result.voter_agreement((1.0, 1.0, 2.0), "none")
    assert agreement["mean_pairwise_dice"] == 1.0 and agreement["volume_spread_ml"] == 0.0
    assert not agreement["review"]


def test_uncertainty_is_positive_where_members_differ(tiny_net, image):
    nets = [make_net(tiny_net, 0), make_net(tiny_net, 1)]
    probs = [reference_prob(net, image) for net in nets]
    threshold = float(probs[0].median())  # masks that are neither empty nor full
    ensemble = Ensemble([member("a", nets[0]), member("b", nets[1])]).eval()
    result = ensemble.segment_volume(image, threshold=threshold, chunk=CHUNK)
    differ = (probs[0] - probs[1]).abs() > 1e-5
    assert differ.any() and (result.uncertainty[differ] > 0).all()
    assert result.uncertainty.dtype == torch.float32 and result.uncertainty.shape == image.shape
    spacing = (1.0, 1.5, 2.0)
    agreement = result.voter_agreement(spacing, "none")
    expected = [volume_ml(p > threshold, spacing) for p in probs]
    assert agreement["volumes_ml"] == pytest.approx(expected, abs=1e-3)
    assert agreement["voters"] == ["a", "b"]


def test_case_agreement_on_hand_made_masks():
    shape, spacing = (4, 5, 2), (1.0, 2.0, 0.5)  # 1 mm^3 voxels
    a, b, empty = (torch.zeros(40, dtype=torch.bool) for _ in range(3))
    a[:10] = True
    b[5:15] = True  # 10 voxels, 5 shared with a
    masks = [m.reshape(shape) for m in (a, b, empty)]
    agreement = case_agreement(masks, ["a", "b", "empty"], spacing, "none")
    dice_ab = 2 * 5 / (10 + 10)
    assert agreement["mean_pairwise_dice"] == round((dice_ab + 0.0 + 0.0) / 3, 4)  # as printed in reports
    assert agreement["volumes_ml"] == pytest.approx([10 / 1000, 10 / 1000, 0.0])
    assert agreement["volume_spread_ml"] == pytest.approx(10 / 1000)
    assert agreement["review"] is True
    assert case_agreement(masks, ["a", "b", "empty"], spacing, "none", review_below=0.1)["review"] is False
    both_empty = case_agreement([masks[2], masks[2]], ["x", "y"], spacing, "none")
    assert both_empty["mean_pairwise_dice"] == 1.0 and not both_empty["review"]


@pytest.mark.parametrize("postprocess", POSTPROCESSING)
@pytest.mark.parametrize("offset", [(0, 0, 0), (3, -2, 1)])
def test_agreement_judges_each_voters_mask_as_delivered(postprocess, offset):
    """A stray island in one voter's raw mask, which post-processing removes from the delivered mask, is no
    disagreement about the LA; a neighbour joined to one voter's LA, which it keeps, is. Wherever the LA
    lies."""
    spacing = (1.5, 1.5, 2.5)

    def boxes(*corners: tuple[slice, slice, slice]) -> torch.Tensor:
        mask = torch.zeros(32, 32, 14, dtype=torch.bool)
        for corner in corners:
            mask[corner] = True
        return mask.roll(offset, dims=(0, 1, 2))

    la_box = (slice(6, 14), slice(6, 14), slice(3, 9))
    la = boxes(la_box)
    stray = boxes(la_box, (slice(26, 28), slice(26, 27), slice(11, 12)))  # two voxels far away
    joined = boxes(la_box, (slice(6, 14), slice(14, 20), slice(3, 9)))  # a neighbour sharing a whole face
    for voter, removed in ((stray, postprocess != "none"), (joined, False)):
        agreement = case_agreement([la, voter], ["identity", "other"], spacing, postprocess)
        assert agreement["postprocess"] == postprocess
        delivered = [postprocess_mask(m, postprocess) for m in (la, voter)]
        assert agreement["mean_pairwise_dice"] == round(overlap_3d(*delivered)[0], 4)
        assert (agreement["mean_pairwise_dice"] == 1.0) == removed
        assert agreement["volumes_ml"] == pytest.approx([volume_ml(m, spacing) for m in delivered])


def test_voter_sets_share_each_delivered_mask(monkeypatch):
    """Several sets of voters over the same views (calibration's trained model.tta) post-process each view
    once, and each set's agreement is that set's alone; a set that is not >= 2 distinct known names is
    refused."""
    spacing = (1.5, 1.5, 2.5)
    generator = torch.Generator().manual_seed(0)
    masks = {name: torch.rand(12, 12, 6, generator=generator) > 0.4 for name in ("identity", "a", "b", "c")}
    sets = [("identity", "a", "b", "c"), ("identity", "c"), ("identity", "a", "b")]
    alone = [case_agreement([masks[n] for n in names], names, spacing, "largest_part") for names in sets]
    calls = []
    original = postprocess_mask

    def counted(mask: torch.Tensor, postprocess: str) -> torch.Tensor:
        calls.append(postprocess)
        return original(mask, postprocess)

    monkeypatch.setattr("la_seg.inference.postprocess_mask", counted)
    assert voter_agreements(masks, sets, spacing, "largest_part") == alone
    assert calls == ["largest_part"] * len(masks)
    assert len({a["mean_pairwise_dice"] for a in alone}) == len(sets)  # the sets do differ
    for bad in (("identity",), ("identity", "identity"), ("identity", "gamma_0.8")):
        with pytest.raises(ValueError, match="distinct names"):
            voter_agreements(masks, [bad], spacing, "none")


def test_named_views_vote_as_their_model_tta(tiny_net, image):
    """Views asked for by name (as calibration asks for every view of several model.tta at once) are the
    same runs as each model.tta's, whose voters are the views by name; unknown or repeated names are
    refused."""
    net = make_net(tiny_net, 0)
    ensemble = Ensemble([member("a", net)]).eval()
    union = ("identity", "flip_x", "flip_y", "flip_xy", "gamma_0.8", "gamma_1.2")
    named = ensemble.segment_volume(image, 0.5, CHUNK, union)
    assert named.voter_names == list(union)
    masks = dict(zip(named.voter_names, named.voter_masks, strict=True))
    for tta in ("flips", "rot180", "gamma"):
        alone = ensemble.segment_volume(image, 0.5, CHUNK, tta)
        assert alone.voter_names == list(TTA_VIEWS[tta])
        for name, mask in zip(alone.voter_names, alone.voter_masks, strict=True):
            assert torch.equal(mask, masks[name]), (tta, name)
    for bad in (("identity", "rot90"), ("identity", "identity"), ()):
        with pytest.raises(DataError, match="test-time views"):
            ensemble.segment_volume(image, tta=bad)


def test_flops_of_shared_ensemble(tiny_net):
    """k members cost one backbone and k heads: 1 + (k-1) * head / (backbone + head) of one model."""
    first = make_net(tiny_net, 0)
    nets = [first] + [make_net(tiny_net, seed, weights_from=first) for seed in (1, 2, 3)]
    x = torch.rand(2, 3, tiny_net.img_size, tiny_net.img_size)
    inputs = {stretched(tiny_net.img_size).kind: x}
    one = flops(Ensemble([member("a", first)]), inputs)
    four = flops(Ensemble([member(str(i), net) for i, net in enumerate(nets)]), inputs)
    backbone = flops(first.backbone, x)
    head = flops(lambda: first.decoder(first.fusion(first.backbone(x)), x)) - backbone
    assert one == backbone + head and four == backbone + 4 * head
    assert four / one == pytest.approx(1 + 3 * head / (backbone + head))


def test_bad_input_is_a_clear_error(tiny_net, image):
    net = make_net(tiny_net, 0)
    ensemble = Ensemble([member("a", net)])
    with pytest.raises(DataError, match="tta"):
        ensemble.segment_volume(image, tta="rot90")
    with pytest.raises(DataError, match="chunk"):
        ensemble.segment_volume(image, chunk=0)
    with pytest.raises(DataError, match="used twice"):
        ensemble.add(member("a", net))
    with pytest.raises(DataError, match="no members"):
        Ensemble().segment_volume(image)


@pytest.mark.slow
def test_ensemble_benchmark_quick(tmp_path):
    spec = importlib.util.spec_from_file_location("la_seg_benchmark_ensemble", BENCHMARK)
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    out = tmp_path / "ensemble.json"
    report = benchmark.main(["--quick", "--threads", "1", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    flops, timing = report["flops"], report["timing"]
    assert flops["members"] == timing["members"] == 5
    one, head = flops["one_model_flops_per_slice"], flops["head_flops_per_slice"]
    assert flops["ensemble_flops_per_slice"] == flops["backbone_flops_per_slice"] + 5 * head
    assert flops["ratio"] == pytest.approx(1 + 4 * head / one) == timing["flops_ratio"]
    assert not flops["target"]["applicable"]  # the target is about giant at 448 px
    assert timing["one_model_s_per_volume"] > 0 and timing["ensemble_s_per_volume"] > 0
    assert timing["volume_shape"] == [64, 64, 8] and timing["chunk"] == 4


def test_postprocess_mask_keeps_the_largest_component_and_names_a_bad_choice():
    mask = torch.zeros(8, 8, 4, dtype=torch.bool)
    mask[1:4, 1:4, :2] = True  # 18 voxels
    mask[6:8, 6:8, 3] = True  # an island of 4
    assert torch.equal(postprocess_mask(mask, "none"), mask)
    kept = postprocess_mask(mask, "largest_component")
    assert kept.sum() == 18 and not kept[6:8, 6:8, 3].any()
    empty = torch.zeros_like(mask)
    assert torch.equal(postprocess_mask(empty, "largest_component"), empty)
    with pytest.raises(DataError, match="postprocess must be one of"):
        postprocess_mask(mask, "opening")


@pytest.mark.parametrize("seed", range(6))
def test_largest_component_is_monais(seed):
    """la-seg keeps the component MONAI's KeepLargestConnectedComponent keeps (26-connected, the first of
    equal ones), on random masks of many components, diagonal contacts and ties included."""
    from monai.transforms import KeepLargestConnectedComponent

    generator = torch.Generator().manual_seed(seed)
    mask = torch.rand(12, 10, 6, generator=generator) < 0.05 + 0.02 * seed  # 7 to 24 components
    expected = KeepLargestConnectedComponent()(mask[None]).squeeze(0).bool()
    assert torch.equal(postprocess_mask(mask, "largest_component"), expected)


def test_largest_part_drops_a_neighbour_joined_by_a_thin_bridge():
    """A neighbouring pool joined to the LA through a two-pixel bridge (a thin wall's partial-volume voxels):
    largest_component keeps both, largest_part only the LA, with its one-pixel vein tip and its small end
    slice (no core of their own)."""
    mask = torch.zeros(40, 40, 7, dtype=torch.bool)
    mask[5:20, 5:20, 1:5] = True  # the LA, 900 voxels
    mask[12, 20:24, 1:5] = True  # a vein tip one pixel wide
    mask[10:12, 10:12, 5] = True  # a small section in an end slice
    mask[22:36, 5:20, 1:5] = True  # a neighbour of 840 voxels
    mask[20:22, 11:13, 2:4] = True  # the bridge
    whole = postprocess_mask(mask, "largest_component")
    assert torch.equal(whole, mask)
    kept = postprocess_mask(mask, "largest_part")
    assert kept[5:20, 5:20, 1:5].all() and kept[12, 20:24, 1:5].all() and kept[10:12, 10:12, 5].all()
    assert not kept[22:36].any()
    assert kept.sum() <= 900 + 16 + 4 + 8
    lone = torch.zeros(6, 6, 3, dtype=torch.bool)
    lone[2, 1:5, 1] = True  # no core at all: kept as it is
    assert torch.equal(postprocess_mask(lone, "largest_part"), lone)


@pytest.mark.parametrize(
    ("plane", "side"), [((28, 28), 28), ((40, 36), 28), ((146, 125), 112), ((30, 200), 28)]
)
def test_windows_cover_the_plane_and_join_back(plane, side):
    """Every pixel of a plane wider than the input lies in a window; cut then joined, a plane comes back."""
    windows = plane_windows(plane, side)
    covered = torch.zeros(plane)
    for x, y in windows:
        assert (x.stop - x.start, y.stop - y.start) == (side, side)
        covered[x, y] += 1
    assert covered.min() >= 1
    planes = torch.rand(3, 2, *plane)
    cut = cut_windows(planes, windows)
    assert cut.shape == (3 * len(windows), 2, side, side)
    torch.testing.assert_close(join_windows(cut[:, 0], windows, plane), planes[:, 0])


def test_where_windows_overlap_the_one_that_holds_a_pixel_nearer_its_centre_counts_more():
    """A window's edge, where it sees a structure cut off, must not halve what the other window sees whole."""
    windows = plane_windows((40, 28), 28)  # X: 0-28 and 12-40
    assert [(x.start, y.start) for x, y in windows] == [(0, 0), (12, 0)]
    joined = join_windows(torch.stack([torch.ones(28, 28), torch.zeros(28, 28)]), windows, (40, 28))[0]
    assert joined[:12].eq(1).all() and joined[28:].eq(0).all()  # one window only: its value
    assert joined[13].min() > 0.99 and joined[26].max() < 0.01  # near a centre (13.5, 25.5): that window's
    torch.testing.assert_close(joined[19] + joined[20], torch.ones(28))  # halfway: even


def test_a_field_of_view_wider_than_the_input_is_segmented_window_by_window(tiny_net):
    """40 x 36 mm at 1 mm per pixel into a 28 px input: the module's probabilities are the mean of its net on
    the four 28 x 28 windows that cover the slice, each weighted by a Gaussian of sigma 28 / 8 px around its
    centre (each axis' factor at least 1e-3), written out here independently; nothing is cut away."""
    net_config = dataclasses.replace(tiny_net, img_size=28)
    module = LASegModule(net=net_config, in_plane="spacing", target_spacing=1.0, eval_batch_size=8).eval()
    image = torch.rand(40, 36, 3, generator=torch.Generator().manual_seed(1))
    from_centre = torch.arange(28) - 13.5
    gaussian = torch.exp(-(from_centre**2) / (2 * 3.5**2)).clamp(min=1e-3)
    weight = gaussian[:, None] * gaussian[None, :]
    total, weights = torch.zeros(3, 40, 36), torch.zeros(40, 36)
    # windows 21 px apart (a quarter overlap), the last one flush with the slice's edge
    for ox, oy in itertools.product((0, 12), (0, 8)):
        with torch.no_grad():
            window = image[ox : ox + 28, oy : oy + 28]
            prob = torch.sigmoid(module.net(slices_to_input(window, 28)))[:, 0]
        total[:, ox : ox + 28, oy : oy + 28] += prob * weight
        weights[ox : ox + 28, oy : oy + 28] += weight
    expected = (total / weights).permute(1, 2, 0)
    result = module.infer(image, spacing=(1.0, 1.0, 1.0))
    torch.testing.assert_close(result.prob, expected, atol=1e-5, rtol=1e-4)
    assert result.prob[0, 0].min() > 0 and result.prob[-1, -1].min() > 0  # corners: the model's, not a 0 fill
