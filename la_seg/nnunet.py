"""`la-seg export-nnunet`: a data set la-seg reads, written as an nnU-Net v2 raw data set with its split.

A fair comparison trains and tests nnU-Net on exactly the cases la-seg used: the train/val cases of a la-seg
run's split.json become imagesTr/labelsTr and splits_final.json, its test cases go to imagesTs/labelsTs, which
nnU-Net never trains on. Images keep their voxels and la-seg's geometry (the spacing la-seg measures with,
e.g. Utah's true 0.625 mm, is written into the header, since nnU-Net plans from the header); labels are
binarised as la-seg reads them.

Case ids become nnU-Net identifiers: characters other than letters, digits, `_` and `-` turn into `_`, and a
trailing `_NNNN` (which reads as an nnU-Net channel suffix) becomes `-NNNN`. `case_ids.json` maps every
exported id back to la-seg's; two ids that would collide are refused.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from la_seg.atomic import LOCK_NAME, FolderLock, atomic_write_text, refuse_writing_into_inputs
from la_seg.data.io import Geometry, read_case, write_nifti
from la_seg.data.layouts import Case, Layout, find_cases
from la_seg.data.split import (
    PARTS,
    check_same_cases,
    cross_validation,
    fingerprint,
    listing,
    read_split_file,
)
from la_seg.errors import DataError
from la_seg.progress import tracked

FILE_ENDING = ".nii.gz"
CASE_IDS_FILE = (
    "case_ids.json"  # also marks a folder as written by export-nnunet (so --overwrite may replace it)
)
SPLITS_FILE = "splits_final.json"
DATASET_JSON = {
    "channel_names": {"0": "LGE-MRI"},  # any name but "CT" gives nnU-Net's per-case z-score normalisation
    "labels": {"background": 0, "left_atrium": 1},
    "file_ending": FILE_ENDING,
}
_DATASET_NAME = re.compile(r"^Dataset\d{3}_[A-Za-z0-9_-]+$")
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")
_CHANNEL_SUFFIX = re.compile(r"_(\d{4})$")


@dataclass(frozen=True)
class ExportData:
    """The data set to export, as `la-seg fit` takes it.

    Args:
        root: data set folder (any layout la-seg reads); every case needs a label.
        layout: the folder convention; `auto` detects it.
    """

    root: Path
    layout: Layout = "auto"


@dataclass(frozen=True)
class NnunetSplit:
    """la-seg's split in nnU-Net's terms: one {"train", "val"} per fold, and the held-out test cases."""

    folds: list[dict[str, list[str]]]
    test: list[str]

    @property
    def training(self) -> list[str]:
        """Every case nnU-Net may see (train or val of some fold): imagesTr."""
        return sorted({case for fold in self.folds for part in fold.values() for case in part})


def nnunet_case_ids(case_ids: list[str]) -> dict[str, str]:
    """la-seg id -> nnU-Net identifier (see the module docstring); refuses ids that collide."""
    mapping = {}
    for case_id in case_ids:
        safe = _CHANNEL_SUFFIX.sub(r"-\1", _UNSAFE.sub("_", case_id))
        if not safe.strip("_-"):
            raise DataError(
                f"case id {case_id!r} has no letters or digits to build an nnU-Net identifier from"
            )
        mapping[case_id] = safe
    seen: dict[str, str] = {}
    for case_id, safe in mapping.items():
        if safe in seen:
            raise DataError(
                f"case ids {seen[safe]!r} and {case_id!r} both become the nnU-Net identifier {safe!r}; "
                "rename one of them"
            )
        seen[safe] = case_id
    return mapping


def read_split(path: Path, cases: dict[str, Case], root: Path) -> NnunetSplit:
    """The split.json of a la-seg run (la_seg.data.split reads it): its train/val, or with cross-validation
    every fold of it, become nnU-Net's folds; its test cases stay out of training. Its cases must be those of
    `cases` (found under `root`), not others of the same ids."""
    source = f"split file {path}"
    recorded = read_split_file(path)
    folds = cross_validation(recorded, source)
    split = NnunetSplit(
        folds=[{part: fold.parts[part] for part in ("train", "val")} for fold in folds],
        test=folds[0].parts["test"],
    )
    for index, fold in enumerate(split.folds):
        if not fold["val"]:
            raise DataError(f"{source}: fold {index} has no validation cases, which nnU-Net needs")
    unknown = sorted((set(split.training) | set(split.test)) - set(cases))
    if unknown:
        raise DataError(f"{source} names {len(unknown)} case(s) not found in the data: {listing(unknown)}")
    found = {part: {c: fingerprint(cases[c]) for c in recorded.parts[part]} for part in PARTS}
    check_same_cases(recorded, found, dict.fromkeys(PARTS, str(root.absolute())), source)
    return split


def export_nnunet(
    data: ExportData,
    out: Path,
    split: Path | None = None,
    dataset_name: str = "Dataset501_LA",
    overwrite: bool = False,
) -> Path:
    """Write the labelled cases of a data set as the nnU-Net v2 raw data set OUT/DATASET_NAME.

    Args:
        data: the data set to export (--data.root, --data.layout).
        out: nnU-Net's raw folder ($nnUNet_raw); the data set goes into out/dataset_name.
        split: a la-seg run's split.json: its train/val cases become imagesTr and splits_final.json, its test
            cases imagesTs + labelsTs; other cases are left out. Without it every case goes to imagesTr.
        dataset_name: DatasetXXX_Name, as nnU-Net requires (XXX is the id given to nnUNetv2_* -d).
        overwrite: replace an earlier export of the same name.
    """
    if not _DATASET_NAME.match(dataset_name):
        raise DataError(
            f"--dataset_name must look like Dataset501_LA (DatasetXXX_Name), got {dataset_name!r}"
        )
    cases = {case.case_id: case for case in find_cases(data.root, data.layout, require_labels=True)}
    ids = nnunet_case_ids(list(cases))
    root = Path(data.root).expanduser()
    plan = read_split(split, cases, root) if split is not None else NnunetSplit([], [])
    training = plan.training if split is not None else sorted(cases)
    target = Path(out).expanduser() / dataset_name
    refuse_writing_into_inputs(target, [root], "--out (export folder)", replaces=True)
    if split is not None and target.resolve() in Path(split).expanduser().resolve().parents:
        raise DataError(
            f"--split {split} lies inside the export {target}, which --overwrite would replace with the file "
            "it reads: copy the split elsewhere first"
        )
    # the lock lies beside the export (which is replaced whole), so exports of other names may run alongside
    with FolderLock(target, "--out", lock_file=target.parent / f".{dataset_name}{LOCK_NAME}"):
        _check_target(target, overwrite)
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{dataset_name}."))
        try:
            parts = [(case_id, "Tr") for case_id in training] + [(case_id, "Ts") for case_id in plan.test]
            for case_id, part in tracked(parts, "export-nnunet: cases written"):
                write_case(cases[case_id], staging / f"images{part}", staging / f"labels{part}", ids[case_id])
            exported = {ids[case_id]: case_id for case_id in (*training, *plan.test)}
            _write_metadata(staging, exported, plan, ids, len(training), data)
            _replace(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    left_out = len(cases) - len(training) - len(plan.test)
    print(
        f"Wrote {len(training)} training and {len(plan.test)} test cases to {target}"
        + (f"; {left_out} case(s) not in {split} left out" if left_out else "")
        + ("" if split else "; no split given: nnU-Net will make its own 5 folds")
    )
    return target


def write_case(case: Case, images: Path, labels: Path, nnunet_id: str) -> None:
    """Image as `<id>_0000`, label as uint8 0/1 `<id>`, both on the image's grid with la-seg's spacing."""
    image, label = read_case(case)
    grid = dataclasses.replace(image.geometry, affine=_affine_with_spacing(image.geometry))
    write_nifti(images / f"{nnunet_id}_0000{FILE_ENDING}", _lossless_int16(image.data), grid)
    write_nifti(labels / f"{nnunet_id}{FILE_ENDING}", label.data.astype(np.uint8), grid)


def _affine_with_spacing(geometry: Geometry) -> np.ndarray:
    """The affine with its columns scaled to the spacing la-seg measures with (a no-op unless overridden)."""
    affine = np.array(geometry.affine, dtype=np.float64)
    norms = np.linalg.norm(affine[:3, :3], axis=0)
    affine[:3, :3] *= np.asarray(geometry.spacing) / np.where(norms > 0, norms, 1.0)
    return affine


def _lossless_int16(data: np.ndarray) -> np.ndarray:
    """int16 where that keeps every value (scanner data: half the size of float32), else float32."""
    as_int = data.astype(np.int16)
    return as_int if np.array_equal(as_int, data) else data.astype(np.float32)


def _write_metadata(
    folder: Path, exported: dict[str, str], plan: NnunetSplit, ids: dict[str, str], n_training: int, data
) -> None:
    """dataset.json (what nnU-Net requires), case_ids.json (nnU-Net id -> la-seg id), splits_final.json."""
    dataset = {**DATASET_JSON, "numTraining": n_training, "description": f"la-seg export of {data.root}"}
    atomic_write_text(folder / "dataset.json", json.dumps(dataset, indent=2) + "\n")
    mapping = {"source": str(data.root), "layout": data.layout, "cases": dict(sorted(exported.items()))}
    atomic_write_text(folder / CASE_IDS_FILE, json.dumps(mapping, indent=2) + "\n")
    if plan.folds:
        folds = [{part: [ids[c] for c in fold[part]] for part in ("train", "val")} for fold in plan.folds]
        atomic_write_text(folder / SPLITS_FILE, json.dumps(folds, indent=2) + "\n")


def _check_target(target: Path, overwrite: bool) -> None:
    """Never write over anything but an earlier export (and that only with overwrite)."""
    if not target.exists() or (target.is_dir() and not any(target.iterdir())):
        return
    if not overwrite:
        raise DataError(f"{target} exists and is not empty; pass --overwrite true or choose another --out")
    if not (target / CASE_IDS_FILE).is_file():
        raise DataError(f"refusing to replace {target}: it was not written by la-seg export-nnunet")


def _replace(staging: Path, target: Path) -> None:
    """Move the finished export into place; an earlier export is removed only once the new one is complete."""
    staging.chmod(0o755)  # mkdtemp creates 0700
    if not target.exists():
        staging.rename(target)
        return
    retired = target.with_name(f".{target.name}.replaced")
    shutil.rmtree(retired, ignore_errors=True)
    target.rename(retired)
    staging.rename(target)
    shutil.rmtree(retired)
