"""LightningDataModule: patient-level split, slice loaders for training, one-volume loaders for evaluation.

The split is a property of the experiment, not of the run: it is written to <log_dir>/split.json and stored in
checkpoints, so a resumed fit or `test --ckpt_path` evaluates exactly the cases that were held out, on every
DDP rank. Lightning restores the datamodule state after setup() and before the dataloaders are built, so the
datasets are built in the *_dataloader methods from `self.split`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.trainer.states import TrainerFn
from torch.utils.data import DataLoader

from la_seg.atomic import atomic_write_text
from la_seg.data.cache import CACHE_MODES
from la_seg.data.datasets import SliceDataset, VolumeDataset, first_item
from la_seg.data.layouts import LAYOUTS, Case, find_cases
from la_seg.data.preprocess import check_img_size
from la_seg.data.transforms import AugmentationConfig, build_train_transform
from la_seg.errors import DataError

PARTS = ("train", "val", "test")
_SUM_TOLERANCE = 1e-6


def check_fractions(split: Sequence[float]) -> tuple[float, float, float]:
    """(train, val, test) fractions: three numbers >= 0 summing to 1, train > 0."""
    values = tuple(float(f) for f in split)
    if len(values) != 3 or any(not np.isfinite(f) or f < 0 for f in values):
        raise DataError(f"data.split must be three fractions (train, val, test) >= 0, got {tuple(split)}")
    if abs(sum(values) - 1.0) > _SUM_TOLERANCE:
        raise DataError(f"data.split fractions must sum to 1, got {values} (sum {sum(values):.6g})")
    if values[0] <= 0:
        raise DataError(f"data.split needs a training fraction > 0, got {values}")
    return values


def split_cases(case_ids: Sequence[str], split: Sequence[float] = (0.7, 0.1, 0.2), seed: int = 42) -> dict:
    """Random patient-level split of `case_ids` into {"train", "val", "test"} (each part sorted).

    Deterministic: depends only on the set of ids, the fractions and `seed` (sorted ids permuted by
    numpy's Generator), so every DDP rank and every rerun gets the same split. A part with a fraction > 0
    gets at least one case; val and test get round(n * fraction) cases and train the rest.
    """
    fractions = check_fractions(split)
    ids = sorted(case_ids)
    if len(set(ids)) != len(ids):
        raise DataError(f"case ids are not unique: {sorted({i for i in ids if ids.count(i) > 1})}")
    n = len(ids)
    n_val, n_test = (max(1, int(np.floor(n * f + 0.5))) if f > 0 else 0 for f in fractions[1:])
    n_train = n - n_val - n_test
    if n_train < 1:
        needed = 1 + sum(f > 0 for f in fractions[1:])
        raise DataError(
            f"{n} case(s) are too few for data.split={fractions}: every part with a fraction > 0 needs "
            f"at least one case, so at least {needed} cases are needed"
        )
    shuffled = [ids[i] for i in np.random.default_rng(seed).permutation(n)]
    return {
        "train": sorted(shuffled[:n_train]),
        "val": sorted(shuffled[n_train : n_train + n_val]),
        "test": sorted(shuffled[n_train + n_val :]),
    }


class LADataModule(L.LightningDataModule):
    """Data for fit / validate / test / predict.

    Args:
        root: data set folder with labelled cases (any layout find_cases knows); split into train/val/test.
        layout: layout of `root` (and `test_root`), or "auto".
        img_size: model input side in pixels, a multiple of 14.
        slice_context: feed slices k-1, k, k+1 as the three channels instead of the grey value repeated.
        batch_size: training slices per batch (evaluation always takes one volume per step).
        num_workers: DataLoader worker processes.
        split: (train, val, test) fractions of the cases in `root`, summing to 1. With `test_root` the test
            fraction is ignored and train/val are renormalised over train + val.
        seed: seed of the random split and of the choice of slices without LA.
        split_file: JSON {"train": [...], "val": [...], "test": [...]} of case ids, replacing the random split
            (the split.json written by a previous run works). With `test_root`, "test" names cases there (all
            of them if "test" is missing or empty).
        test_root: a separate held-out folder of labelled cases used as the test set.
        predict_root: a folder or single file of images to segment (layout "auto"; labels not needed).
        empty_slice_fraction: fraction of the training slices without LA that are kept (1 = all).
        augmentation: training augmentation.
        cache: "memory", "disk" or "none": where decoded, normalised volumes are kept (see VolumeCache).
            Test and predict volumes are read once, so they are cached only with "disk".
        cache_dir: folder for cache="disk" (default $XDG_CACHE_HOME/la-seg or ~/.cache/la-seg).

    Attributes:
        split: {"train": [...], "val": [...], "test": [...]} case ids, None until setup() / load_state_dict().
    """

    def __init__(
        self,
        root: str | None = None,
        layout: str = "auto",
        img_size: int = 448,
        slice_context: bool = False,
        batch_size: int = 32,
        num_workers: int = 4,
        split: tuple[float, float, float] = (0.7, 0.1, 0.2),
        seed: int = 42,
        split_file: str | None = None,
        test_root: str | None = None,
        predict_root: str | None = None,
        empty_slice_fraction: float = 1.0,
        augmentation: AugmentationConfig = AugmentationConfig(),  # noqa: B008 (frozen, so sharing is safe)
        cache: str = "memory",
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        if layout not in LAYOUTS:
            raise DataError(f"data.layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
        if cache not in CACHE_MODES:
            raise DataError(f"data.cache must be one of {', '.join(CACHE_MODES)}, got {cache!r}")
        if batch_size < 1:
            raise DataError(f"data.batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise DataError(f"data.num_workers must be >= 0, got {num_workers}")
        if not 0.0 <= empty_slice_fraction <= 1.0:
            raise DataError(f"data.empty_slice_fraction must be in [0, 1], got {empty_slice_fraction}")
        self.root = root
        self.layout = layout
        self.img_size = check_img_size(img_size)
        self.slice_context = slice_context
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.split_fractions = check_fractions(split)
        self.seed = seed
        self.split_file = split_file
        self.test_root = test_root
        self.predict_root = predict_root
        self.empty_slice_fraction = empty_slice_fraction
        self.augmentation = augmentation
        self.cache = cache
        self.cache_dir = cache_dir
        self.split: dict[str, list[str]] | None = None
        self._cases: dict[str, Case] = {}
        self._test_cases: dict[str, Case] | None = None
        self._predict_cases: list[Case] = []

    # ----------------------------------------------------------------------------------------------- setup
    def setup(self, stage: str) -> None:
        """Find the cases and fix the split (a split already held, e.g. restored, is kept)."""
        if stage == TrainerFn.PREDICTING:
            self._predict_cases = _find(
                self.predict_root, "data.predict_root", "auto", stage, require_labels=False
            )
            return
        if self.test_root is not None:
            self._test_cases = _by_id(_find(self.test_root, "data.test_root", self.layout, stage, True))
        if stage == TrainerFn.TESTING and self._test_cases is not None:
            self._cases = {}  # testing on a held-out folder needs no training data, wherever data.root points
            if self.split is None:
                self.split = {"train": [], "val": [], "test": sorted(self._test_cases)}
            return
        self._cases = _by_id(_find(self.root, "data.root", self.layout, stage, True))
        if self.split is None:
            self.split = self._read_split_file() if self.split_file is not None else self._random_split()
        if stage == TrainerFn.FITTING:
            self._write_split()

    def _random_split(self) -> dict[str, list[str]]:
        if self._test_cases is None:
            return split_cases(list(self._cases), self.split_fractions, self.seed)
        train, val, _ = self.split_fractions
        parts = split_cases(list(self._cases), (train / (train + val), val / (train + val), 0.0), self.seed)
        parts["test"] = sorted(self._test_cases)
        return parts

    def _read_split_file(self) -> dict[str, list[str]]:
        path = Path(self.split_file).expanduser()
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise DataError(f"cannot read data.split_file {path}: {error}") from error
        if not isinstance(data, dict) or set(data) - set(PARTS):
            keys = sorted(data) if isinstance(data, dict) else type(data).__name__
            raise DataError(f"data.split_file {path} must be a JSON object with keys {PARTS}, got {keys}")
        split: dict[str, list[str]] = {}
        for part in PARTS:
            ids = data.get(part, [])
            if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
                raise DataError(f"data.split_file {path}: {part!r} must be a list of case id strings")
            repeated = sorted({i for i in ids if ids.count(i) > 1})
            if repeated:
                raise DataError(f"data.split_file {path}: {part!r} lists cases more than once: {repeated}")
            split[part] = sorted(ids)
        if self._test_cases is not None and not split["test"]:
            split["test"] = sorted(self._test_cases)
        # Ids name cases of one folder; with test_root the test ids live in another folder (own namespace).
        same_root = PARTS if self._test_cases is None else ("train", "val")
        for a, b in ((a, b) for i, a in enumerate(same_root) for b in same_root[i + 1 :]):
            overlap = sorted(set(split[a]) & set(split[b]))
            if overlap:
                raise DataError(f"data.split_file {path}: cases in both {a!r} and {b!r}: {overlap}")
        for part in PARTS:
            lookup, root = self._lookup(part)
            unknown = [i for i in split[part] if i not in lookup]
            if unknown:
                raise DataError(
                    f"data.split_file {path}: {part!r} names cases not found under {root}: {unknown}"
                )
        if not split["train"]:
            raise DataError(f"data.split_file {path} has no training cases")
        return split

    def _lookup(self, part: str) -> tuple[dict[str, Case], str | None]:
        if part == "test" and self._test_cases is not None:
            return self._test_cases, self.test_root
        return self._cases, self.root

    def _write_split(self) -> None:
        """Write the split to <trainer.log_dir>/split.json (rank zero, atomically); usable as a split_file."""
        if self.trainer is None:
            return
        log_dir = self.trainer.log_dir  # a collective under DDP: every rank must ask
        if log_dir is None or not self.trainer.is_global_zero:
            return
        atomic_write_text(Path(log_dir) / "split.json", json.dumps(self.split, indent=2) + "\n")

    # ------------------------------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict:
        """The split, so that resuming or testing from a checkpoint uses the same cases."""
        return {"split": {part: list(ids) for part, ids in self.split.items()}} if self.split else {}

    def load_state_dict(self, state_dict: dict) -> None:
        """Adopt a stored split. With test_root given now, the test part chosen in setup() is kept."""
        stored = state_dict.get("split")
        if not stored:
            return
        split = {part: sorted(stored.get(part, [])) for part in PARTS}
        if self._test_cases is not None:
            split["test"] = list(self.split["test"]) if self.split else sorted(self._test_cases)
        changed = split != self.split
        self.split = split
        if changed and self.trainer is not None and self.trainer.state.fn == TrainerFn.FITTING:
            self._write_split()

    # ----------------------------------------------------------------------------------------- dataloaders
    def cases(self, part: str) -> list[Case]:
        """The cases of one part of the split ("train", "val" or "test"); after setup()."""
        if self.split is None:
            raise DataError("LADataModule.setup() must run before the split is used")
        lookup, root = self._lookup(part)
        unknown = [i for i in self.split[part] if i not in lookup]
        if unknown:
            raise DataError(
                f"the {part} split names cases not found under {root}: {unknown} "
                "(a split restored from a checkpoint or split_file of another data set?)"
            )
        return [lookup[i] for i in self.split[part]]

    def train_dataloader(self) -> DataLoader:
        cases = self.cases("train")
        if not cases:
            raise DataError("the split has no training cases")
        dataset = SliceDataset(
            cases,
            self.img_size,
            slice_context=self.slice_context,
            transform=build_train_transform(self.augmentation),
            empty_slice_fraction=self.empty_slice_fraction,
            seed=self.seed,
            cache=self.cache,
            cache_dir=self.cache_dir,
        )
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=True,
            drop_last=False,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        dataset = VolumeDataset(
            self.cases("val"), with_labels=True, cache=self.cache, cache_dir=self.cache_dir
        )
        return self._eval_loader(dataset, persistent=True)

    def test_dataloader(self) -> DataLoader:
        dataset = VolumeDataset(
            self.cases("test"), with_labels=True, cache=self._single_pass_cache, cache_dir=self.cache_dir
        )
        return self._eval_loader(dataset, persistent=False)

    def predict_dataloader(self) -> DataLoader:
        dataset = VolumeDataset(
            self._predict_cases, with_labels=False, cache=self._single_pass_cache, cache_dir=self.cache_dir
        )
        return self._eval_loader(dataset, persistent=False)

    @property
    def _single_pass_cache(self) -> str:
        """Volumes read once per run gain nothing from a memory cache; a disk cache helps the next run."""
        return "disk" if self.cache == "disk" else "none"

    def _eval_loader(self, dataset: VolumeDataset, persistent: bool) -> DataLoader:
        workers = min(self.num_workers, len(dataset))
        return DataLoader(
            dataset,
            batch_size=1,
            shuffle=False,
            collate_fn=first_item,
            num_workers=workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=persistent and workers > 0,
        )


def _find(path: str | None, field: str, layout: str, stage: str, require_labels: bool) -> list[Case]:
    """find_cases with errors that name the option to fix."""
    if path is None:
        raise DataError(f"{field} is required for {stage}: set --{field}")
    if not Path(path).expanduser().exists():
        raise DataError(f"{field} does not exist: {path}")
    return find_cases(path, layout, require_labels=require_labels)


def _by_id(cases: list[Case]) -> dict[str, Case]:
    return {case.case_id: case for case in cases}
