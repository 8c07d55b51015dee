"""Training data under DDP: each rank holds (decodes, keeps) its own training cases, balanced by slices."""

from types import SimpleNamespace

import numpy as np
import pytest
from tiny_options import stretched
from torch.utils.data import RandomSampler

from la_seg.data.cache import VolumeCache
from la_seg.data.datamodule import LADataModule
from la_seg.data.datasets import SliceDataset, draw_weights, kept_slices
from la_seg.data.layouts import find_cases
from la_seg.data.shards import TrainShards, assign_cases, plan_training_slices, samples_per_rank
from la_seg.data.synthetic import write_dataset
from la_seg.distributed import all_ranks_or_none, is_reported_elsewhere
from la_seg.errors import DataError

WEIGHTS = [9, 3, 7, 7, 2, 11, 5, 4, 6]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_assign_cases_is_disjoint_covering_balanced_and_deterministic(world):
    shards = assign_cases(WEIGHTS, world)
    assert len(shards) == world and all(shards)
    assert sorted(i for shard in shards for i in shard) == list(range(len(WEIGHTS)))  # each case once
    loads = [sum(WEIGHTS[i] for i in shard) for shard in shards]
    assert max(loads) - min(loads) <= max(WEIGHTS)  # greedy largest-first: within one case
    assert {1: [54], 2: [28, 26], 3: [18, 18, 18]}[world] == loads  # largest first: 11 | 9 | 7 7 ...
    assert assign_cases(list(WEIGHTS), world) == shards


class Sized:
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n


@pytest.mark.parametrize("world", [1, 2, 3])
def test_train_shards_draw_equal_counts_of_own_slices_reshuffled_every_epoch(world):
    shards = assign_cases(WEIGHTS, world)
    sizes = [sum(WEIGHTS[i] for i in shard) for shard in shards]
    sizes[0] += 2  # unequal shards: one rank draws fewer than it holds, the others repeat some
    per_rank = samples_per_rank(sum(sizes), world)
    for rank, size in enumerate(sizes):
        sampler = TrainShards(Sized(size), per_rank, world, rank, seed=7)
        first = list(sampler)
        assert len(first) == len(sampler) == per_rank and all(0 <= i < size for i in first)
        if size <= per_rank:
            assert set(first) == set(range(size))  # every own slice, a few twice
        assert list(TrainShards(Sized(size), per_rank, world, rank, seed=7)) == first  # deterministic
        sampler.set_epoch(1)
        second = list(sampler)
        assert second != first and len(second) == per_rank
        sampler.set_epoch(0)
        assert list(sampler) == first


def test_plan_refuses_fewer_training_cases_than_ranks(tmp_path):
    write_dataset(tmp_path, cases=2, seed=0, shape=(24, 20, 4))
    cases = find_cases(tmp_path)
    with pytest.raises(DataError) as error:
        plan_training_slices(cases, 3, 1.0, 0, "auto", "RAS")
    assert str(error.value).startswith("2 training cases for 3 DDP processes: ")
    assert "at least 3 cases" in str(error.value)


@pytest.fixture(scope="session")  # built once per test process, whatever the order
def root(tmp_path_factory):
    base = tmp_path_factory.mktemp("shards")
    write_dataset(base, cases=8, seed=3, shape=(32, 28, 7))
    return base


def fake_trainer(world: int, rank: int) -> SimpleNamespace:
    """What train_dataloader asks of a trainer, as rank `rank` of `world` sees it; what rank 0 decides and
    broadcasts is decided here by each rank (is_global_zero), as one process plays every rank in turn."""
    decide = lambda failed, all=True: failed  # noqa: E731 (no rank fails)
    strategy = SimpleNamespace(broadcast=lambda obj, src=0: obj, reduce_boolean_decision=decide)
    return SimpleNamespace(world_size=world, global_rank=rank, is_global_zero=True, strategy=strategy)


def decoded_cases(monkeypatch) -> list[str]:
    seen: list[str] = []
    decode = VolumeCache._decode

    def counting(self, case, with_labels):
        seen.append(case.case_id)
        return decode(self, case, with_labels)

    monkeypatch.setattr(VolumeCache, "_decode", counting)
    return seen


@pytest.mark.parametrize("fraction", [1.0, 0.5])
@pytest.mark.parametrize("world", [2, 3])
def test_each_rank_decodes_and_keeps_its_own_cases_only(root, monkeypatch, world, fraction):
    """The ranks' slices are exactly one process's, dealt out by case; each rank decodes its cases once."""
    kwargs = {"img_size": 28, "batch_size": 4, "num_workers": 0, "empty_slice_fraction": fraction}
    single = LADataModule(root=str(root), **kwargs)
    single.setup("fit")
    one = single.train_dataloader()
    assert isinstance(one.sampler, RandomSampler)
    train = single.split["train"]
    expected = {(train[p], z) for p, z in one.dataset.index}
    per_rank = -(-len(expected) // world)
    held, steps = [], set()
    for rank in range(world):
        dm = LADataModule(root=str(root), **kwargs)
        dm.setup("fit")
        dm.trainer = fake_trainer(world, rank)
        decoded = decoded_cases(monkeypatch)
        loader = dm.train_dataloader()
        dataset = loader.dataset
        own = [case.case_id for case in dataset.cases]
        assert sorted(decoded) == sorted(own)  # its own cases, each decoded once, none other
        assert sorted(dataset.cache._memory) == sorted(str(case.image_path) for case in dataset.cases)
        assert isinstance(loader.sampler, TrainShards) and len(loader.sampler) == per_rank
        held.append(own)
        steps.add(len(loader))
        assert {(own[p], z) for p, z in dataset.index} <= expected
        expected -= {(own[p], z) for p, z in dataset.index}
        batch = next(iter(loader))
        assert batch["image"].shape == (4, 3, 28, 28)
        monkeypatch.undo()
    assert not expected  # together the ranks hold exactly one process's slices
    assert sorted(sum(held, [])) == sorted(train) and all(held)  # disjoint, covering
    assert len(steps) == 1  # every rank runs the same number of steps


def test_slice_index_of_cases_matches_the_dataset_index():
    rng = np.random.default_rng(0)
    has_la = [rng.random(6) < 0.5 for _ in range(5)]
    index = kept_slices(has_la, 0.5, 1)
    part = index.of_cases([1, 3, 4])
    back = {(pos, z) for pos, z in index.pairs if pos in (1, 3, 4)}
    assert {((1, 3, 4)[p], z) for p, z in part.pairs} == back
    assert part.foreground.tolist() == [bool(has_la[(1, 3, 4)[p]][z]) for p, z in part.pairs]
    no_slices = kept_slices([np.ones(3, bool), np.zeros(3, bool)], 0.0, 0)  # the last case keeps none
    assert no_slices.of_cases([1]).pairs.shape == (0, 2)
    assert no_slices.of_cases([0, 1]).pairs.tolist() == [[0, 0], [0, 1], [0, 2]]


def test_single_process_index_is_unchanged(root):
    """kept_slices is the choice SliceDataset always made (the same seed gives the same slices)."""
    cases = find_cases(root)
    dataset = SliceDataset(cases, stretched(28), empty_slice_fraction=0.5, seed=5, cache="none")
    has_la = []
    for case in cases:
        label = VolumeCache("none").get(case, True).label
        has_la.append(label.reshape(label.shape[0], -1).any(axis=1))
    foreground, background = [], []
    for position, flags in enumerate(has_la):
        foreground += [(position, z) for z in np.flatnonzero(flags)]
        background += [(position, z) for z in np.flatnonzero(~flags)]
    keep = round(0.5 * len(background))
    chosen = np.random.default_rng(5).choice(len(background), size=keep, replace=False)
    assert dataset.index.tolist() == [list(p) for p in sorted(foreground + [background[j] for j in chosen])]


def test_a_rank_that_cannot_read_its_cases_stops_every_rank():
    """A rank reads only its own cases, so a broken file fails one rank: all stop, the failing one prints."""

    def trainer(elsewhere: bool) -> SimpleNamespace:
        decide = lambda failed, all=True: failed or elsewhere  # noqa: E731 (what the all-reduce answers)
        return SimpleNamespace(strategy=SimpleNamespace(reduce_boolean_decision=decide))

    def broken():
        raise DataError("cannot read train_3")

    assert all_ranks_or_none(trainer(False), lambda: 5) == 5
    with pytest.raises(DataError, match="cannot read train_3") as own:
        all_ranks_or_none(trainer(False), broken)
    assert not is_reported_elsewhere(own.value)
    with pytest.raises(DataError, match="another DDP process failed") as other:
        all_ranks_or_none(trainer(True), lambda: 5)
    assert is_reported_elsewhere(other.value)


def test_cases_sampling_draws_every_case_equally_often_whatever_its_slices():
    """data.sampling "cases": a case of 2 slices is drawn as often as one of 12 (nnU-Net draws cases)."""
    pairs = np.array([(case, z) for case, slices in enumerate([2, 6, 12]) for z in range(slices)])
    assert draw_weights(pairs, "slices") is None
    weights = draw_weights(pairs, "cases")
    sampler = TrainShards(Sized(len(pairs)), 30000, 1, 0, seed=4, weights=weights)
    first = list(sampler)
    per_case = np.bincount(pairs[first, 0], minlength=3)
    assert np.all(np.abs(per_case - 10000) < 400), per_case  # 2 slices: 5000 draws each; 12: 833 each
    assert len(set(first)) == len(pairs)  # every slice drawn
    assert list(TrainShards(Sized(len(pairs)), 30000, 1, 0, seed=4, weights=weights)) == first
    sampler.set_epoch(1)
    assert list(sampler) != first
    index = kept_slices([np.ones(n, bool) for n in (2, 6, 12)] + [np.zeros(3, bool)], 0.0, 0)
    assert index.case_loads(4, "slices").tolist() == [2, 6, 12, 0]
    assert index.case_loads(4, "cases").tolist() == [1, 1, 1, 0]  # a case without kept slices: no load
    with pytest.raises(ValueError, match="one per item"):
        TrainShards(Sized(3), 3, 1, 0, seed=0, weights=np.ones(2))


@pytest.mark.parametrize("world", [1, 2, 3])
def test_cases_sampling_deals_cases_evenly_and_draws_them_evenly_on_every_rank(root, monkeypatch, world):
    kwargs = {"img_size": 28, "batch_size": 4, "num_workers": 0, "empty_slice_fraction": 0.5}
    single = LADataModule(root=str(root), sampling="cases", **kwargs)
    single.setup("fit")
    slices = len(single.train_dataloader().dataset)
    for rank in range(world):
        dm = LADataModule(root=str(root), sampling="cases", **kwargs)
        dm.setup("fit")
        dm.trainer = fake_trainer(world, rank) if world > 1 else None
        loader = dm.train_dataloader()
        assert isinstance(loader.sampler, TrainShards) and len(loader.sampler) == -(-slices // world)
        own = [case.case_id for case in loader.dataset.cases]
        assert len(own) in (len(single.split["train"]) // world, -(-len(single.split["train"]) // world))
        draws = np.zeros(len(own))
        for epoch in range(300):
            loader.sampler.set_epoch(epoch)
            draws += np.bincount(loader.dataset.index[list(loader.sampler), 0], minlength=len(own))
        share = draws / draws.sum()
        assert np.all(np.abs(share - 1 / len(own)) < 0.1 / len(own)), share  # each own case equally often
    with pytest.raises(DataError, match="data.sampling must be one of slices, cases, got 'volumes'"):
        LADataModule(root=str(root), sampling="volumes", **kwargs)
