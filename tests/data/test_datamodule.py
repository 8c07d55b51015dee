import json

import lightning as L
import pytest
import torch
from jsonargparse import ArgumentError, ArgumentParser
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import RandomSampler

from la_seg.data.datamodule import EVAL_PREFETCH, CaseShards, LADataModule
from la_seg.data.datasets import first_item
from la_seg.data.split import PARTS
from la_seg.data.synthetic import write_dataset
from la_seg.errors import DataError


@pytest.mark.parametrize("bad", [(0.5, 0.1, 0.1), (0.7, 0.3), (1.2, -0.1, -0.1), (0.0, 0.5, 0.5)])
def test_split_fraction_errors(bad):
    with pytest.raises(DataError, match="split"):
        LADataModule(root="x", split=bad)


# ---------------------------------------------------------------------------------------------- datamodule
@pytest.fixture(scope="session")  # built once per test process, whatever the order
def roots(tmp_path_factory):
    base = tmp_path_factory.mktemp("dm")
    write_dataset(base / "train", cases=6, seed=0, shape=(40, 36, 6))
    write_dataset(base / "heldout", cases=2, seed=1, shape=(36, 40, 5))
    return base / "train", base / "heldout"


def _dm(root, **kwargs) -> LADataModule:
    kwargs = {"img_size": 28, "batch_size": 4, "num_workers": 0, "cache": "none", **kwargs}
    return LADataModule(root=str(root), **kwargs)


def test_setup_fit_and_loaders(roots):
    dm = _dm(roots[0])
    dm.setup("fit")
    assert [len(dm.split[p]) for p in ("train", "val", "test")] == [4, 1, 1]
    assert set(sum(dm.split.values(), [])) == {f"train_{i}" for i in range(1, 7)}
    train = dm.train_dataloader()
    assert isinstance(train.sampler, RandomSampler) and not train.drop_last and train.batch_size == 4
    batch = next(iter(train))
    assert batch["image"].shape == (4, 3, 28, 28) and batch["label"].shape == (4, 1, 28, 28)
    val = dm.val_dataloader()
    assert val.batch_size == 1 and val.collate_fn is first_item
    item = next(iter(val))
    assert item["case_id"] == dm.split["val"][0] and item["image"].shape == (40, 36, 6)
    assert item["label"].dtype == torch.uint8
    dm.setup("test")
    assert [c.case_id for c in dm.cases("test")] == dm.split["test"]


def test_loader_worker_options(roots):
    dm = _dm(roots[0], num_workers=2)
    dm.setup("fit")
    assert dm.train_dataloader().persistent_workers
    val = dm.val_dataloader()
    assert val.num_workers == 1 and val.persistent_workers  # one val case: no idle worker


def test_split_identical_across_instances(roots):
    a, b = _dm(roots[0], seed=5), _dm(roots[0], seed=5)
    a.setup("fit")
    b.setup("fit")
    assert a.split == b.split


def test_missing_root_errors(roots, tmp_path):
    with pytest.raises(DataError, match="data.root"):
        LADataModule(img_size=28).setup("fit")
    with pytest.raises(DataError, match="data.root"):
        _dm(tmp_path / "nowhere").setup("fit")
    with pytest.raises(DataError, match="data.predict_root"):
        _dm(roots[0]).setup("predict")
    with pytest.raises(DataError, match="img_size"):
        _dm(roots[0], img_size=-28)


def test_split_file(roots, tmp_path):
    path = tmp_path / "split.json"
    wanted = {"train": ["train_1", "train_2", "train_3"], "val": ["train_4"], "test": ["train_5", "train_6"]}
    path.write_text(json.dumps(wanted))
    dm = _dm(roots[0], split_file=str(path))
    dm.setup("fit")
    assert dm.split == wanted


@pytest.mark.parametrize(
    "content,match",
    [
        ({"train": ["train_1", "nope_7", "nope_8"], "val": ["train_2"]}, r"split\.json.*nope_7.*nope_8"),
        ({"train": ["train_1", "train_2"], "val": ["train_2"]}, "train_2"),
        ({"train": ["train_1"], "valid": ["train_2"]}, "keys"),
        ({"train": [], "val": ["train_2"]}, "no training"),
        ("not json {", "cannot read"),
    ],
)
def test_split_file_errors(roots, tmp_path, content, match):
    path = tmp_path / "split.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(DataError, match=match):
        _dm(roots[0], split_file=str(path)).setup("fit")


def test_test_root(roots):
    dm = _dm(roots[0], test_root=str(roots[1]))
    dm.setup("fit")
    assert dm.split["test"] == ["train_1", "train_2"]  # the held-out folder's cases
    assert [len(dm.split["train"]), len(dm.split["val"])] == [5, 1]  # 0.7/0.1 renormalised over 6 cases
    dm.setup("test")
    item = next(iter(dm.test_dataloader()))
    assert item["image"].shape == (36, 40, 5)  # from the held-out folder
    alone = LADataModule(test_root=str(roots[1]), img_size=28, num_workers=0)
    alone.setup("test")
    assert alone.split["test"] == ["train_1", "train_2"] and len(alone.test_dataloader()) == 2


def test_predict_root_file_or_folder(roots):
    dm = _dm(roots[0], predict_root=str(roots[1]))
    dm.setup("predict")
    loader = dm.predict_dataloader()
    assert len(loader) == 2
    item = next(iter(loader))
    assert "label" not in item and item["image"].shape == (36, 40, 5)
    single = LADataModule(predict_root=str(roots[1] / "train_2" / "enhanced.nii.gz"), num_workers=0)
    single.setup("predict")
    assert len(single.predict_dataloader()) == 1


def test_state_dict_round_trip(roots):
    dm = _dm(roots[0], seed=1)
    dm.setup("fit")
    other = _dm(roots[0], seed=2)
    other.setup("fit")
    assert other.split != dm.split
    other.load_state_dict(dm.state_dict())
    assert other.split == dm.split
    assert [c.case_id for c in other.cases("val")] == dm.split["val"]
    assert set(LADataModule().state_dict()) == {"augmentation"}  # no split before setup


def test_stored_split_of_other_cases_with_the_same_ids_is_refused(roots, tmp_path):
    write_dataset(tmp_path / "other", cases=6, seed=5, shape=(40, 36, 6))  # roots[0]'s ids, other images
    trained = _dm(roots[0])
    trained.setup("fit")
    state = trained.state_dict()
    assert state["split"]["root"] == str(roots[0].absolute())
    assert set(state["split"]["fingerprints"]["test"]) == set(trained.split["test"])
    other = _dm(tmp_path / "other")
    other.setup("test")  # the same ids, so the same random split: the cases are checked all the same
    with pytest.raises(DataError, match=rf"checkpoint.*{roots[0]}.*case 'train_\d'.*{tmp_path / 'other'}"):
        other.load_state_dict(state)
    old = {"augmentation": state["augmentation"], "split": {p: trained.split[p] for p in PARTS}}
    other.load_state_dict(old)  # written before fingerprints: taken by id
    assert other.split == trained.split


def test_stored_split_unknown_cases(roots):
    dm = _dm(roots[0])
    dm.setup("fit")
    with pytest.raises(DataError, match=r"checkpoint.*'train'.*ghost"):  # found when adopted, not when used
        dm.load_state_dict({"split": {"train": ["ghost"], "val": [], "test": []}})


# ---------------------------------------------------------------------------------- with a Lightning trainer
class _Stub(L.LightningModule):
    """The smallest module that trains on slice batches and records which cases it evaluated."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[str] = []

    def training_step(self, batch, batch_idx):
        return ((batch["image"].mean() * self.weight - batch["label"].mean()) ** 2).sum()

    def validation_step(self, batch, batch_idx):
        self.seen.append(batch["case_id"])

    def test_step(self, batch, batch_idx):
        self.seen.append(batch["case_id"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _parts(split_json) -> dict:
    """The train/val/test lists of a written split.json (which also holds its summary)."""
    record = json.loads(split_json.read_text())
    return {part: record[part] for part in PARTS}


def _trainer(tmp_path, name, **kwargs):
    options = {"enable_checkpointing": "callbacks" in kwargs, **kwargs}
    return L.Trainer(
        default_root_dir=tmp_path,
        logger=TensorBoardLogger(tmp_path, name=name),
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        **options,
    )


def test_split_json_written_in_log_dir(roots, tmp_path):
    trainer = _trainer(tmp_path, "manual")
    dm = _dm(roots[0])
    dm.trainer = trainer
    dm.setup("fit")
    written = _parts(tmp_path / "manual" / "version_0" / "split.json")
    assert written == dm.split
    again = _dm(roots[0], seed=99, split_file=str(tmp_path / "manual" / "version_0" / "split.json"))
    again.setup("fit")
    assert again.split == dm.split  # the written file is a valid split_file


def test_fit_checkpoint_then_test_and_resume_use_stored_split(roots, tmp_path):
    dm = _dm(roots[0], seed=1)
    trainer = _trainer(tmp_path, "fit", max_steps=1, limit_val_batches=1, num_sanity_val_steps=0)
    trainer.fit(_Stub(), datamodule=dm)
    assert _parts(tmp_path / "fit" / "version_0" / "split.json") == dm.split
    ckpt = tmp_path / "last.ckpt"
    trainer.save_checkpoint(ckpt)

    tester = _dm(roots[0], seed=2)  # would split differently on its own
    module = _Stub()
    _trainer(tmp_path, "test").test(module, datamodule=tester, ckpt_path=str(ckpt))
    assert tester.split == dm.split and module.seen == dm.split["test"]

    resumed = _dm(roots[0], seed=3)
    trainer = _trainer(tmp_path, "resume", max_steps=2, limit_val_batches=1, num_sanity_val_steps=0)
    trainer.fit(_Stub(), datamodule=resumed, ckpt_path=str(ckpt))
    assert resumed.split == dm.split
    assert _parts(tmp_path / "resume" / "version_0" / "split.json") == dm.split


# ------------------------------------------------------------------------------- patients, folds, validation
def _pairs_csv(tmp_path):
    """train_1..6 as three patients of two scans each (train_1 + train_2, ...)."""
    path = tmp_path / "patients.csv"
    path.write_text("case_id,patient_id\n" + "".join(f"train_{i},P{(i + 1) // 2}\n" for i in range(1, 7)))
    return path


def test_groups_keep_patients_together_and_are_reported(roots, tmp_path, caplog):
    groups = str(_pairs_csv(tmp_path))
    for seed in range(5):
        dm = _dm(roots[0], groups=groups, seed=seed, split=(0.34, 0.33, 0.33))
        dm.setup("fit")
        patients = [{(int(c.split("_")[1]) + 1) // 2 for c in dm.split[p]} for p in PARTS]
        assert [len(p) for p in patients] == [1, 1, 1]  # three patients, one each
        assert [len(dm.split[p]) for p in PARTS] == [2, 2, 2]  # with both their scans
    trainer = _trainer(tmp_path, "groups")
    dm = _dm(roots[0], groups=groups, split=(0.34, 0.33, 0.33))
    dm.trainer = trainer
    with caplog.at_level("INFO"):
        dm.setup("fit")
    assert "train 1 patients / 2 cases, val 1 patients / 2 cases, test 1 patients / 2 cases" in caplog.text
    record = json.loads((tmp_path / "groups" / "version_0" / "split.json").read_text())
    assert record["summary"]["val"] == {"patients": 1, "cases": 2}
    assert record["patients"]["train_3"] == record["patients"]["train_4"] == "P2"
    again = _dm(roots[0], split_file=str(tmp_path / "groups" / "version_0" / "split.json"))
    again.setup("fit")  # the richer split.json still works as data.split_file
    assert again.split == dm.split and again.data_split.summary() == dm.data_split.summary()


def test_groups_errors_name_the_option(roots, tmp_path):
    with pytest.raises(DataError, match=r"data\.groups regex.*'train_1'"):
        _dm(roots[0], groups=r"regex:^case(\d+)").setup("fit")
    split_file = tmp_path / "split.json"
    split_file.write_text(json.dumps({"train": ["train_1", "train_3", "train_5"], "val": ["train_2"]}))
    with pytest.raises(DataError, match=r"split\.json with data\.groups.*'P1'"):
        _dm(roots[0], groups=str(_pairs_csv(tmp_path)), split_file=str(split_file)).setup("fit")


def test_folds(roots, tmp_path):
    splits = []
    for fold in range(3):
        dm = _dm(roots[0], folds=3, fold=fold, split=(0.8, 0.0, 0.2))
        dm.trainer = _trainer(tmp_path, f"fold{fold}")
        dm.setup("fit")
        record = json.loads((tmp_path / f"fold{fold}" / "version_0" / "split.json").read_text())
        assert (record["folds"], record["fold"]) == (3, fold)
        splits.append(dm.split)
    assert all(split["test"] == splits[0]["test"] for split in splits)
    non_test = sorted({f"train_{i}" for i in range(1, 7)} - set(splits[0]["test"]))
    assert sorted(c for split in splits for c in split["val"]) == non_test
    with pytest.raises(DataError, match=r"data\.fold must be in 0\.\.2"):
        _dm(roots[0], folds=3, fold=3)
    with pytest.raises(DataError, match=r"data\.split_file fixes the split"):
        _dm(roots[0], folds=3, split_file="split.json")
    with pytest.raises(DataError, match=r"data\.folds=6 needs at least 6"):
        _dm(roots[0], folds=6).setup("fit")


@pytest.mark.parametrize(
    "callback",
    [ModelCheckpoint(monitor="val/dice", mode="max"), EarlyStopping(monitor="val/dice", mode="max")],
    ids=["checkpoint", "early_stopping"],
)
def test_no_validation_cases_refused_when_callbacks_monitor_val(roots, tmp_path, callback):
    dm = _dm(roots[0], split=(0.8, 0.0, 0.2))
    trainer = _trainer(tmp_path, "noval", max_steps=1, callbacks=[callback])
    with pytest.raises(DataError, match=rf"data\.split=.*no validation cases.*{type(callback).__name__}"):
        trainer.fit(_Stub(), datamodule=dm)


def test_no_validation_cases_warn_without_val_monitors(roots, tmp_path):
    dm = _dm(roots[0], split=(0.8, 0.0, 0.2))
    module = _Stub()
    trainer = _trainer(tmp_path, "noval", max_steps=1, callbacks=[ModelCheckpoint(tmp_path / "ck")])
    with pytest.warns(UserWarning, match="validation is off"):
        trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 1 and module.seen == []


# ----------------------------------------------------------------------------------------------- loaders
def test_eval_loaders_read_in_prefetching_workers(roots):
    dm = _dm(roots[0], num_workers=3, predict_root=str(roots[1]))
    dm.setup("fit")
    dm.setup("test")
    dm.setup("predict")
    val, test, predict = dm.val_dataloader(), dm.test_dataloader(), dm.predict_dataloader()
    assert (val.num_workers, test.num_workers, predict.num_workers) == (1, 1, 2)  # never more than cases
    assert val.persistent_workers and not test.persistent_workers and not predict.persistent_workers
    assert all(loader.prefetch_factor == EVAL_PREFETCH for loader in (val, test, predict))
    assert all(loader.pin_memory == torch.cuda.is_available() for loader in (val, test, predict))
    assert next(iter(predict))["case_id"] == "train_1"  # read in a worker process
    inline = _dm(roots[0], num_workers=0)
    inline.setup("test")
    loader = inline.test_dataloader()
    assert loader.num_workers == 0 and loader.prefetch_factor is None
    assert next(iter(loader))["case_id"] == inline.split["test"][0]


# ------------------------------------------------------------------------------------------ config fields
def test_choices_are_literals_that_jsonargparse_validates():
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(LADataModule, "data")
    config = parser.parse_args(
        ["--data.layout", "msd", "--data.slice_axis", "1", "--data.label_values", "[420]"]
    )
    assert (config.data.layout, config.data.slice_axis, config.data.label_values) == ("msd", 1, [420])
    for field, value in (("layout", "lascarq"), ("cache", "ram"), ("slice_axis", "3")):
        with pytest.raises(ArgumentError, match=field):
            parser.parse_args([f"--data.{field}", value])
    dm = parser.instantiate_classes(config).data
    assert (dm.slice_axis, dm.label_values) == (1, [420])


@pytest.mark.parametrize("ranks", [2, 3])
@pytest.mark.parametrize("cases", [0, 1, 2, 3, 5])
def test_evaluation_shards_hold_each_case_once_and_no_rank_empty(cases, ranks):
    """Fewer cases than ranks included: every rank gets a case (Lightning skips the hooks of a rank without
    one, whose collectives the others would wait for), and the cases a rank owns cover each case once."""
    shards = [list(CaseShards(range(cases), ranks, rank)) for rank in range(ranks)]
    owned = sorted(i for r, shard in enumerate(shards) for i in shard if CaseShards.owner(i, ranks) == r)
    assert owned == list(range(cases))
    assert all(shards) if cases else not any(shards)
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    assert [len(CaseShards(range(cases), ranks, rank)) for rank in range(ranks)] == list(map(len, shards))
