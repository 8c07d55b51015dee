"""BlockFusion: one softmax over all blocks (the paper), grouping, weights that learn, the refusal of a
softmax over a single block, and the mean / last ablations."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from la_seg.models import BlockFusion


def features(n: int = 10, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 8, 3, 5, generator=generator) for _ in range(n)]


def test_default_is_one_softmax_over_all_blocks():
    fusion = BlockFusion(10)
    assert fusion.groups == 1 and fusion.group_indices == [list(range(10))]
    feats = features()
    (fused,) = fusion(feats)
    torch.testing.assert_close(fused, torch.stack(feats).mean(0))
    (weights,) = fusion.weights()
    torch.testing.assert_close(weights, torch.full((10,), 0.1))


def test_groups_are_contiguous_and_balanced():
    assert BlockFusion(10, groups=4).group_indices == [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9]]
    assert BlockFusion(40, groups=4).group_indices[3] == list(range(30, 40))
    assert BlockFusion(4, groups=4, mode="mean").group_indices == [[0], [1], [2], [3]]


@pytest.mark.parametrize(
    ("args", "message"),
    [((3, 4, "softmax"), "exceeds"), ((4, 1, "max"), "mode"), ((4, 0, "mean"), "groups")],
)
def test_bad_arguments_raise(args, message):
    with pytest.raises(ValueError, match=message):
        BlockFusion(*args)


@pytest.mark.parametrize(
    ("blocks", "groups", "fix"), [(4, 4, "<= 2"), (5, 3, "<= 2"), (9, 5, "<= 4"), (1, 1, "tap at least 2")]
)
def test_a_softmax_over_one_block_is_refused(blocks, groups, fix):
    with pytest.raises(ValueError, match=rf"^groups={groups} over {blocks} tapped blocks.*{fix}"):
        BlockFusion(blocks, groups=groups)


def test_softmax_starts_equal_and_sums_to_one_per_group():
    fusion = BlockFusion(10, groups=4)
    weights = fusion.weights()
    assert [len(w) for w in weights] == [3, 3, 2, 2]
    for w in weights:
        torch.testing.assert_close(w, torch.full_like(w, 1 / len(w)))
        assert not w.requires_grad
    feats = features()
    fused = fusion(feats)
    assert len(fused) == 4 and all(f.shape == (2, 8, 3, 5) for f in fused)
    torch.testing.assert_close(fused[0], torch.stack(feats[0:3]).mean(0))
    torch.testing.assert_close(fused[3], torch.stack(feats[8:10]).mean(0))


@pytest.mark.parametrize("groups", [1, 4])
def test_softmax_weights_learn(groups):
    fusion = BlockFusion(10, groups=groups)
    feats = features()
    optimiser = torch.optim.Adam(fusion.parameters(), lr=0.1)
    for _ in range(5):
        optimiser.zero_grad()
        # Pull every group towards its deepest block.
        pairs = zip(fusion(feats), fusion.group_indices, strict=True)
        loss = sum((f - feats[idx[-1]]).square().mean() for f, idx in pairs)
        loss.backward()
        assert fusion.logits.grad is not None and (fusion.logits.grad != 0).all()
        optimiser.step()
    for w in fusion.weights():
        torch.testing.assert_close(w.sum(), torch.tensor(1.0))
        assert w[-1] > 1 / len(w) + 0.05


def test_mean_is_fixed_equal_weights():
    fusion = BlockFusion(10, groups=4, mode="mean")
    assert list(fusion.parameters()) == []
    feats = features()
    torch.testing.assert_close(fusion(feats)[1], torch.stack(feats[3:6]).mean(0))
    assert all(torch.allclose(w.sum(), torch.tensor(1.0)) for w in fusion.weights())


@pytest.mark.parametrize("groups", [1, 4])
def test_last_feeds_the_deepest_block_to_every_group(groups):
    fusion = BlockFusion(10, groups=groups, mode="last")
    assert list(fusion.parameters()) == []
    feats = features()
    fused = fusion(feats)
    assert len(fused) == groups and all(f is feats[-1] for f in fused)
    assert fusion.group_indices == [[9]] * groups
    assert [w.tolist() for w in fusion.weights()] == [[1.0]] * groups


def test_feature_count_is_checked():
    with pytest.raises(ValueError, match="expects 10"):
        BlockFusion(10)(features(9))


class _OpWatch(TorchDispatchMode):
    """Records every op run and every device its tensor arguments live on."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: set[str] = set()
        self.devices: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(str(func))
        for value in tree_flatten((args, kwargs or {}))[0]:
            if isinstance(value, torch.Tensor):
                self.devices.add(value.device.type)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(("groups", "mode"), [(1, "softmax"), (4, "softmax"), (2, "mean")])
def test_fusion_on_a_device_copies_nothing_from_the_host(groups, mode):
    """Per step, no weight built on the host and no index list (each a blocking host-to-device copy on a GPU):
    on the meta device, every op sees meta tensors only, and the groups are slices, not index gathers."""
    fusion = BlockFusion(8, groups=groups, mode=mode).to("meta")
    feats = [torch.empty(2, 4, 3, 3, device="meta") for _ in range(8)]
    with _OpWatch() as watch:
        fusion(feats)
    assert watch.devices == {"meta"}
    assert "aten.index.Tensor" not in watch.ops


@pytest.mark.parametrize(("groups", "mode"), [(1, "softmax"), (4, "softmax"), (4, "mean"), (2, "last")])
def test_running_fusion_equals_fusing_the_list(groups, mode):
    fusion = BlockFusion(10, groups=groups, mode=mode)
    if fusion.logits is not None:
        torch.nn.init.normal_(fusion.logits)
    feats = features()
    running = fusion.running()
    for feature in feats:
        running.add(feature)
    expected = [sum(w * feats[i] for w, i in zip(ws, idx, strict=True)) for ws, idx in
                zip(fusion.weights(), fusion.group_indices, strict=True)]  # fmt: skip
    for got, want in zip(running.result(), expected, strict=True):
        torch.testing.assert_close(got, want)
