"""LightningDataModule: finds the cases, asks la_seg.data.split for the split, builds datasets and loaders.

The split is a property of the experiment, not of the run: it is written to <log_dir>/split.json and stored in
checkpoints, so a resumed fit or `test --ckpt_path` evaluates exactly the cases that were held out, on every
DDP rank. Lightning restores the datamodule state after setup() and before the dataloaders are built, so the
datasets are built in the *_dataloader methods from `self.split`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from la_seg.atomic import atomic_write_text
from la_seg.data.cache import CacheMode
from la_seg.data.datasets import (
    SAMPLINGS,
    Sampling,
    SliceDataset,
    VolumeDataset,
    draw_weights,
    first_item,
)
from la_seg.data.io import Orientation, SliceAxis
from la_seg.data.layouts import Case, Layout, find_cases
from la_seg.data.preprocess import DEFAULT_INPUT, InPlane, InputSpec
from la_seg.data.shards import TrainShards, assign_cases, plan_training_slices, samples_per_rank
from la_seg.data.split import (
    DataSplit,
    check_folds,
    check_fractions,
    check_known,
    check_patients_kept_together,
    check_same_cases,
    duplicate_images,
    fingerprint,
    group_duplicates,
    parse_split,
    read_groups,
    read_split_file,
    split_cases,
)
from la_seg.data.transforms import AugmentationConfig, build_train_transform
from la_seg.distributed import all_ranks_or_none, decide_on_rank_zero
from la_seg.errors import DataError

TEST_ROOT_TAG = "data.test_root:"  # marks test_root cases among data.root's when looking for duplicates
# Volumes each evaluation worker reads ahead, so the accelerator never waits on gzip.
EVAL_PREFETCH = 2


class LADataModule(L.LightningDataModule):
    """Data for fit / validate / test / predict.

    Args:
        root: data set folder with labelled cases (any layout find_cases knows); split into train/val/test.
        layout: layout of `root` (and `test_root`), or "auto".
        img_size: model input side in pixels, a multiple of 14.
        slice_context: feed slices k-1, k, k+1 as the three channels instead of the grey value repeated.
        batch_size: training slices per batch (evaluation always takes one volume per step).
        num_workers: DataLoader worker processes (evaluation loaders never start more than they have cases).
        split: (train, val, test) fractions of the patients in `root`, summing to 1; validation and test get
            round-half-up(n * fraction) patients (at least one if the fraction is > 0), training the rest.
            With `test_root` the test fraction is ignored and train/val are renormalised over train + val;
            with `folds` > 1 the val fraction is ignored.
        seed: seed of the random split and of the choice of slices without LA.
        groups: which cases belong to one patient, so that a patient's cases (e.g. LAScarQS pre- and
            post-ablation scans) never straddle train/val/test: "regex:PATTERN" searched in each case id (the
            first capture group, or the whole match, is the patient; e.g. "regex:^(P\\d+)_"), or the path of
            a .csv file with the header case_id,patient_id and one row per case of `root`. None: every case is
            its own patient.
        folds: k > 1 for k-fold cross-validation; 1: none. The test part is the same for every fold; the other
            patients are cut into k parts, and fold i validates on the i-th and trains on the rest.
        fold: which fold (0-based, < folds) this run trains; run `la-seg fit` once per fold.
        split_file: JSON {"train": [...], "val": [...], "test": [...]} of case ids, replacing the random split
            (the split.json written by a previous run works). With `test_root`, "test" names cases there (all
            of them if "test" is missing or empty). With `groups`, no patient may straddle its parts.
        test_root: a separate held-out folder of labelled cases used as the test set.
        predict_root: a folder or single file of images to segment (layout "auto"; labels not needed).
        empty_slice_fraction: fraction of the training slices without LA that are kept (1 = all).
        sampling: how an epoch draws the kept training slices: "slices" (each once, in a fresh order, so a
            case weighs by its slice count: a 1.25 mm isotropic scan holds three times the LA slices of a 4 mm
            one) or "cases" (with replacement, every case equally often, as nnU-Net draws its patches; an
            epoch keeps the same number of slices).
        augmentation: training augmentation.
        cache: where decoded, normalised volumes are kept (see VolumeCache). Test and predict volumes are read
            once, so they are cached only with "disk".
        cache_dir: folder for cache="disk" (default $XDG_CACHE_HOME/la-seg or ~/.cache/la-seg).
        slice_axis: the through-plane axis the volumes are sliced along: "auto" (the axis of largest spacing,
            from the affine) or an array axis 0, 1, 2.
        label_values: label values that mean LA (e.g. [420] for LAScarQS); None: any value > 0.
        spacing: voxel size in mm (file axis order) for every volume read, replacing the header's: for files
            whose header holds none (recorded as the spacing's source, "data.spacing"). Utah 2018 files need
            none: their 0.625 mm is applied by file name.
        duplicates: cases whose image files are byte-identical (the same scan in two case folders), found by
            hashing the images when the split is made: "refuse" names them; "group" treats them as one
            patient, so they land in one part. A duplicate between data.root and data.test_root is refused.
        in_plane: how a slice becomes the img_size x img_size input: "stretch" (resized to it, whatever its
            millimetres per pixel and aspect ratio: the paper) or "spacing" (resampled to `target_spacing` mm
            per pixel, aspect kept, padded to img_size; a wider slice is seen through img_size windows).
            Linked to `model.in_plane`.
        target_spacing: mm per pixel of the input with in_plane "spacing" (one window holds img_size x
            target_spacing mm). Linked to `model.target_spacing`.
        intensity_headroom: grey values are scaled so that each volume's 0.5th percentile is 0 and its
            99.5th 1 / intensity_headroom, then clipped to [0, 1]: voxels up to this many times brighter keep
            their contrast (LGE's enhanced wall is brighter than the blood pool, which the 99.5th percentile
            reaches); 1 clips at the 99.5th percentile (checkpoints from before it existed). Linked to
            `model.intensity_headroom`.
        orientation: how volumes are laid out for the model: "RAS" (each volume permuted and flipped to
            nibabel's closest canonical orientation, no resampling, then sliced across its through-plane
            axis: the same patient in any storage order gets the same mask in world space) or "array" (the
            file's own axis order: checkpoints from before "RAS" existed). Outputs always go back to the
            input's own array order and affine. Linked to `model.orientation`.

    Attributes:
        split: {"train": [...], "val": [...], "test": [...]} case ids, None until setup() / load_state_dict().
        data_split: the same with how it was made (patients, fold), a DataSplit.
    """

    def __init__(
        self,
        root: str | None = None,
        layout: Layout = "auto",
        img_size: int = DEFAULT_INPUT.img_size,
        slice_context: bool = DEFAULT_INPUT.slice_context,
        batch_size: int = 32,
        num_workers: int = 4,
        split: tuple[float, float, float] = (0.7, 0.1, 0.2),
        seed: int = 42,
        groups: str | None = None,
        folds: int = 1,
        fold: int = 0,
        split_file: str | None = None,
        test_root: str | None = None,
        predict_root: str | None = None,
        empty_slice_fraction: float = 1.0,
        sampling: Sampling = "slices",
        augmentation: AugmentationConfig = AugmentationConfig(),  # noqa: B008 (frozen, so sharing is safe)
        cache: CacheMode = "memory",
        cache_dir: str | None = None,
        slice_axis: SliceAxis = "auto",
        label_values: list[int] | None = None,
        spacing: tuple[float, float, float] | None = None,
        duplicates: Literal["refuse", "group"] = "refuse",
        in_plane: InPlane = DEFAULT_INPUT.in_plane,
        target_spacing: float = DEFAULT_INPUT.target_spacing,
        intensity_headroom: float = DEFAULT_INPUT.intensity_headroom,
        orientation: Orientation = DEFAULT_INPUT.orientation,
    ) -> None:
        super().__init__()
        # how a volume becomes the model's input: one record (la_seg.data.preprocess.InputSpec)
        self.input_spec = InputSpec.checked(
            "data.",
            img_size=img_size,
            slice_context=slice_context,
            in_plane=in_plane,
            target_spacing=target_spacing,
            intensity_headroom=intensity_headroom,
            orientation=orientation,
        )
        if batch_size < 1:
            raise DataError(f"data.batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise DataError(f"data.num_workers must be >= 0, got {num_workers}")
        check_folds(folds, fold)
        if folds > 1 and split_file is not None:
            raise DataError(
                f"data.split_file fixes the split, so data.folds must be 1, got {folds}: "
                "write one split file per fold, or drop data.split_file"
            )
        # where the cases are and how they are read
        self.root, self.test_root, self.predict_root, self.layout = root, test_root, predict_root, layout
        self.slice_axis, self.label_values, self.spacing = slice_axis, label_values, spacing
        if duplicates not in ("refuse", "group"):
            raise DataError(f"data.duplicates must be 'refuse' or 'group', got {duplicates!r}")
        self.duplicates = duplicates
        # how they are split
        self.split_fractions, self.seed, self.split_file = check_fractions(split), seed, split_file
        self.groups, self.folds, self.fold = groups, folds, fold
        # how they are fed to the model
        self.batch_size, self.num_workers, self.empty_slice_fraction = (
            batch_size,
            num_workers,
            empty_slice_fraction,
        )
        if sampling not in SAMPLINGS:
            raise DataError(f"data.sampling must be one of {', '.join(SAMPLINGS)}, got {sampling!r}")
        self.sampling = sampling
        self.augmentation, self.cache, self.cache_dir = augmentation, cache, cache_dir
        self.data_split: DataSplit | None = None
        self._cases: dict[str, Case] = {}
        self._test_cases: dict[str, Case] | None = None
        self._predict_cases: list[Case] = []

    @property
    def split(self) -> dict[str, list[str]] | None:
        return self.data_split.parts if self.data_split is not None else None

    # ----------------------------------------------------------------------------------------------- setup
    def setup(self, stage: str) -> None:
        """Find the cases and fix the split (a split already held, e.g. restored, is kept)."""
        if stage == TrainerFn.PREDICTING:
            self._predict_cases = self._find(self.predict_root, "data.predict_root", "auto", stage, False)
            return
        if self.test_root is not None:
            self._test_cases = _by_id(self._find(self.test_root, "data.test_root", self.layout, stage, True))
        if stage == TrainerFn.TESTING and self._test_cases is not None:
            self._cases = {}  # testing on a held-out folder needs no training data, wherever data.root points
            if self.data_split is None:
                parts = {"train": [], "val": [], "test": sorted(self._test_cases)}
                self._adopt(DataSplit(parts, separate_test=True), "data.test_root")
            return
        self._cases = _by_id(self._find(self.root, "data.root", self.layout, stage, True))
        if self.data_split is None:
            if self.split_file is not None:
                self._adopt(self._read_split_file(), f"data.split_file {self.split_file}")
            else:
                self._adopt(self._random_split(), "the random split")
        if stage == TrainerFn.FITTING:
            self._require_validation()
            self._write_split()

    def _find(self, path: str | None, field: str, layout: str, stage: str, labelled: bool) -> list[Case]:
        """find_cases with errors that name the option to fix; under DDP rank 0 looks and every rank gets
        its list (or its one error), so that all ranks shard the same cases."""

        def find() -> list[Case]:
            if path is None:
                raise DataError(f"{field} is required for {stage}: set --{field}")
            if not Path(path).expanduser().exists():
                raise DataError(f"{field} does not exist: {path}")
            return find_cases(path, layout, labelled, self.label_values, self.spacing)

        return decide_on_rank_zero(self.trainer, find)

    def _random_split(self) -> DataSplit:
        patients = read_groups(self.groups, self._cases) if self.groups is not None else None
        patients = self._group_duplicates(patients)
        fractions = self.split_fractions
        if self._test_cases is not None:
            train, val, _ = fractions
            fractions = (train / (train + val), val / (train + val), 0.0)
        parts = split_cases(self._cases, fractions, self.seed, patients, self.folds, self.fold)
        if self._test_cases is not None:
            parts["test"] = sorted(self._test_cases)
        separate_test = self._test_cases is not None
        return DataSplit(
            parts, patients, self.folds, self.fold, separate_test, self.seed, self.split_fractions
        )

    def _read_split_file(self) -> DataSplit:
        source = f"data.split_file {self.split_file}"
        split = read_split_file(self.split_file, separate_test=self._test_cases is not None)
        _note_unchecked(split, source)
        if self._test_cases is not None and not split.parts["test"]:
            split.parts["test"] = sorted(self._test_cases)
        patients = read_groups(self.groups, self._cases) if self.groups is not None else None
        patients = self._group_duplicates(patients)
        if patients is not None:
            split.patients = patients
            check_patients_kept_together(split, f"{source} with data.groups={self.groups!r}")
        return split

    def _group_duplicates(self, patients: dict[str, str] | None) -> dict[str, str] | None:
        """Hash the images once: byte-identical cases are refused or (data.duplicates: group) made one
        patient; a case of data.root repeated in data.test_root is always refused (the test would measure
        memory, not generalisation)."""
        images = {case_id: case.image_path for case_id, case in self._cases.items()}
        test = {f"{TEST_ROOT_TAG}{c}": case.image_path for c, case in (self._test_cases or {}).items()}
        groups = duplicate_images(images | test)
        if not groups:
            return patients
        across = [g for g in groups if any(c.startswith(TEST_ROOT_TAG) for c in g)]
        for group in across if self.duplicates == "group" else groups:
            folders = [str((images | test)[case_id].parent) for case_id in group]
            raise DataError(
                f"the same image (byte-identical) is in {len(group)} case folders: {', '.join(folders)}; "
                "in two parts of the split, the test would measure memory, not generalisation: remove the "
                "copies" + ("" if across else ", or set data.duplicates: group to keep them in one part")
            )
        return group_duplicates(patients, groups, self._cases)

    def _adopt(self, split: DataSplit, source: str) -> None:
        """Hold `split` once its cases are found in the loaded folders."""
        self._check_cases(split, source)
        self.data_split = split
        rank_zero_info(split.describe())

    def _check_cases(self, split: DataSplit, source: str) -> None:
        """The one check of a split's cases against the loaded folders: every case exists (check_known) and is
        the image the split was made on (check_same_cases); then `split` records these folders and cases."""
        known = {}
        for part in split.parts:
            lookup, root = self._lookup(part)
            if lookup:  # a folder not loaded for this stage (e.g. data.root when testing on test_root)
                known[part] = (lookup, root)
        check_known(split, known, source)
        found = {
            part: {case_id: fingerprint(lookup[case_id]) for case_id in split.parts[part]}
            for part, (lookup, _) in known.items()
        }
        roots = {part: _absolute(root) for part, (_, root) in known.items()}
        if split.fingerprints is not None:
            check_same_cases(split, found, roots, source)
        split.root = _absolute(self.root) if self._cases else None
        split.test_root = _absolute(self.test_root) if self._test_cases is not None else None
        split.fingerprints = found

    def _lookup(self, part: str) -> tuple[dict[str, Case], str | None]:
        if part == "test" and self._test_cases is not None:
            return self._test_cases, self.test_root
        return self._cases, self.root

    def _require_validation(self) -> None:
        """Refuse to fit without validation cases when callbacks need val/* metrics; otherwise warn."""
        if self.data_split.parts["val"]:
            return
        where = (
            f"data.split_file {self.split_file}" if self.split_file else f"data.split={self.split_fractions}"
        )
        reason = f"{where} leaves no validation cases of the {len(self._cases)} cases under data.root"
        callbacks = self.trainer.callbacks if self.trainer is not None else []
        monitors = [
            f"{type(cb).__name__}(monitor={cb.monitor!r})"
            for cb in callbacks
            if isinstance(cb, (ModelCheckpoint, EarlyStopping)) and str(cb.monitor or "").startswith("val/")
        ]
        if monitors:
            raise DataError(
                f"{reason}, but {', '.join(monitors)} monitor validation metrics: give the validation "
                "part cases (a val fraction > 0 in data.split, or 'val' ids in data.split_file) or drop "
                "those callbacks"
            )
        rank_zero_warn(f"{reason}: validation is off, the model is trained without being validated")

    def _write_split(self) -> None:
        """Write the record to <trainer.log_dir>/split.json (rank zero, atomically); a valid split_file."""
        if self.trainer is None:
            return
        log_dir = self.trainer.log_dir  # a collective under DDP: every rank must ask
        if log_dir is None or not self.trainer.is_global_zero:
            return
        atomic_write_text(
            Path(log_dir) / "split.json", json.dumps(self.data_split.to_record(), indent=2) + "\n"
        )

    # ------------------------------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict:
        """The split record, so that resuming or testing from a checkpoint uses the same cases, and the
        training augmentation, which decides the test-time flips the model may use."""
        state: dict = {"augmentation": dataclasses.asdict(self.augmentation)}
        return state | ({"split": self.data_split.to_record()} if self.data_split is not None else {})

    def load_state_dict(self, state_dict: dict) -> None:
        """Adopt a stored split. With test_root given now, the test part chosen in setup() is kept."""
        stored = state_dict.get("split")
        predicting = self.trainer is not None and self.trainer.state.fn == TrainerFn.PREDICTING
        if not stored or predicting:  # predict reads no split
            return
        source = "the split stored in the checkpoint"
        split = parse_split(stored, source, separate_test=self._test_cases is not None)
        _note_unchecked(split, source)
        if self._test_cases is not None:
            split.parts["test"] = list(self.split["test"]) if self.split else sorted(self._test_cases)
            (split.fingerprints or {}).pop("test", None)  # those of the stored test part, replaced here
        if split == self.data_split:  # the same ids as setup() found: still checked to be the same cases
            self._check_cases(split, source)
            self.data_split = split
            return
        self._adopt(split, f"{source} (of another data set?)")
        if self.trainer is not None and self.trainer.state.fn == TrainerFn.FITTING:
            self._write_split()

    # ----------------------------------------------------------------------------------------- dataloaders
    def cases(self, part: str) -> list[Case]:
        """The cases of one part of the split ("train", "val" or "test"); after setup()."""
        if self.data_split is None:
            raise DataError("LADataModule.setup() must run before the split is used")
        lookup, _ = self._lookup(part)
        return [lookup[case_id] for case_id in self.data_split.parts[part]]

    def train_dataloader(self) -> DataLoader:
        """Slices of the training cases, drawn as `sampling` says. Under DDP each rank holds its own cases
        (la_seg.data.shards): the slices are chosen over every case as by one process, the cases dealt to the
        ranks balanced by their share of the draws, and each rank decodes and keeps its own only, drawing the
        same number of slices per epoch."""
        cases, index, sampler = self.cases("train"), None, None
        trainer = self.trainer
        if trainer is not None and trainer.world_size > 1:
            world, rank = trainer.world_size, trainer.global_rank
            plan = decide_on_rank_zero(
                trainer,
                lambda: plan_training_slices(
                    cases,
                    world,
                    self.empty_slice_fraction,
                    self.seed,
                    self.slice_axis,
                    self.input_spec.orientation,
                ),
            )
            loads = plan.case_loads(len(cases), self.sampling).tolist()
            own = [i for i in assign_cases(loads, world)[rank] if loads[i]]  # a case without: never read
            cases, index = [cases[i] for i in own], plan.of_cases(own)
            rank_zero_info(
                f"training cases per DDP process: {len(plan.pairs)} slices of {len(self.cases('train'))} "
                f"cases dealt to {world} processes, each drawing {samples_per_rank(len(plan.pairs), world)} "
                "slices per epoch"
            )

        def build() -> SliceDataset:
            return SliceDataset(
                cases,
                self.input_spec,
                slice_axis=self.slice_axis,
                transform=build_train_transform(self.augmentation),
                empty_slice_fraction=self.empty_slice_fraction,
                seed=self.seed,
                cache=self.cache,
                cache_dir=self.cache_dir,
                index=index,
            )

        dataset = build() if index is None else all_ranks_or_none(trainer, build)
        weights = draw_weights(dataset.index, self.sampling)
        if index is not None:
            per_rank = samples_per_rank(len(plan.pairs), world)
            sampler = TrainShards(dataset, per_rank, world, rank, self.seed, weights)
        elif weights is not None:  # one process: weighted draws, as one rank of one
            sampler = TrainShards(dataset, len(dataset), 1, 0, self.seed, weights)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=sampler is None,
            sampler=sampler,
            drop_last=False,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        """Volumes of the validation cases; workers persist, as validation runs every epoch."""
        return self._eval_loader(self.cases("val"), with_labels=True, single_pass=False)

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self.cases("test"), with_labels=True, single_pass=True)

    def predict_dataloader(self) -> DataLoader:
        return self._eval_loader(self._predict_cases, with_labels=False, single_pass=True)

    def volume_dataset(self, cases: list[Case], with_labels: bool, cache: CacheMode) -> VolumeDataset:
        """Whole volumes read, laid out and normalised as training reads them (evaluation, calibration)."""
        return VolumeDataset(
            cases,
            self.input_spec,
            with_labels=with_labels,
            cache=cache,
            cache_dir=self.cache_dir,
            slice_axis=self.slice_axis,
        )

    def _eval_loader(self, cases: list[Case], with_labels: bool, single_pass: bool) -> DataLoader:
        """One volume per step, read and normalised in workers that prefetch (never more workers than cases).

        Single-pass loaders (test, predict) cache in memory for nothing and gain from a disk cache only on the
        next run; their workers are not persistent, so the run ends without a slow teardown.
        """
        cache = ("disk" if self.cache == "disk" else "none") if single_pass else self.cache
        dataset = self.volume_dataset(cases, with_labels, cache)
        workers = min(self.num_workers, len(dataset))
        trainer = self.trainer
        distributed = trainer is not None and trainer.world_size > 1
        return DataLoader(
            dataset,
            batch_size=1,
            sampler=CaseShards(dataset, trainer.world_size, trainer.global_rank) if distributed else None,
            shuffle=False,
            collate_fn=first_item,
            num_workers=workers,
            prefetch_factor=EVAL_PREFETCH if workers > 0 else None,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=not single_pass and workers > 0,
        )


class CaseShards(DistributedSampler):
    """Rank r of W evaluates cases r, r + W, ...: each case once, shards differing by at most one case.

    Lightning's own samplers either pad every shard to equal length by repeating cases (validate / test: the
    repeats would count twice in anything averaged over steps) or fail on a rank left without a case (predict:
    one volume on two GPUs). A rank left without a case (fewer cases than ranks) gets one repeat of case
    r mod n instead, so that every rank runs the hooks whose collectives gather the results (Lightning skips
    them on a rank without batches); `owner` tells the repeat apart, and results are de-duplicated by case id.
    Being a DistributedSampler, it is kept by Lightning.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)
        size = len(dataset)
        own = [i for i in range(size) if self.owner(i, num_replicas) == rank]
        self.indices = own or ([rank % size] if size else [])
        self.num_samples = len(self.indices)

    def __iter__(self):
        return iter(self.indices)

    @staticmethod
    def owner(index: int, num_replicas: int) -> int:
        """The rank whose own shard holds case `index` (any other rank holding it holds a repeat)."""
        return index % num_replicas


def _by_id(cases: list[Case]) -> dict[str, Case]:
    return {case.case_id: case for case in cases}


def _note_unchecked(split: DataSplit, source: str) -> None:
    """One line where a recorded split cannot be checked against the cases found (written before la-seg
    recorded fingerprints, or by hand)."""
    if split.fingerprints is None:
        rank_zero_info(f"{source} records no case fingerprints: its cases are taken by id, unchecked")


def _absolute(folder: str | None) -> str | None:
    """A folder as recorded in a split: absolute, so a later command run elsewhere finds it (links kept)."""
    return str(Path(folder).expanduser().absolute()) if folder is not None else None
