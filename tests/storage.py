"""The same patients stored as scanners and converters store them: other array orders and flips, NIfTI or
NRRD, every voxel at the same world position. Tests of the rule "the same patient in any storage gets the
same mask in world space" feed these copies to real commands."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np

from la_seg.data import find_cases
from la_seg.data.io import read_image, read_label

# name: (array order, reversed axes of the stored array); NRRD_LPS is stored as LPS arrays in an LPS space
STORAGES: dict[str, tuple[tuple[int, int, int], tuple[int, ...]]] = {
    "RAS": ((0, 1, 2), ()),
    "LAS": ((0, 1, 2), (0,)),
    "LPS": ((0, 1, 2), (0, 1)),
    "xy_swapped": ((1, 0, 2), ()),
    "slices_first": ((2, 0, 1), ()),
    "IPL_slices_first": ((2, 1, 0), (0, 1, 2)),
    "NRRD_LPS": ((0, 1, 2), (0, 1)),
}
_LPS = np.diag([-1.0, -1.0, 1.0])  # RAS world -> LPS world


def stored(array: np.ndarray, affine: np.ndarray, storage: str) -> tuple[np.ndarray, np.ndarray]:
    """`array` on `affine` stored the `storage` way: the stored array and its affine (same world mm)."""
    order, flips = STORAGES[storage]
    out, moved = np.transpose(array, order), affine[:, [*order, 3]].copy()
    for axis in flips:
        out = np.flip(out, axis)
        moved[:3, 3] += moved[:3, axis] * (out.shape[axis] - 1)
        moved[:3, axis] *= -1
    return np.ascontiguousarray(out), moved


def as_original(array: np.ndarray, storage: str) -> np.ndarray:
    """The inverse of `stored` for an array on a stored grid (a mask or probability map written there)."""
    order, flips = STORAGES[storage]
    return np.ascontiguousarray(np.transpose(np.flip(array, flips), np.argsort(order)))


def write_storage(source: Path, target: Path, storage: str) -> Path:
    """Every labelled case under `source` written again under `target/<case>/` the `storage` way: LAScarQS
    file names for NIfTI, Utah 2018 names (label 255) for NRRD."""
    for case in find_cases(source, require_labels=True):
        image = read_image(case.image_path)
        label = read_label(case.label_path, label_values=case.label_values).data
        folder = target / case.case_id
        folder.mkdir(parents=True)
        data, affine = stored(image.data, image.geometry.affine, storage)
        mask, _ = stored(label, image.geometry.affine, storage)
        if storage.startswith("NRRD"):
            header = {
                "space": "left-posterior-superior",
                "space directions": (_LPS @ affine[:3, :3]).T,  # row k: array axis k's step in LPS mm
                "space origin": _LPS @ affine[:3, 3],
            }
            nrrd.write(str(folder / "lgemri.nrrd"), data, header)
            nrrd.write(str(folder / "laendo.nrrd"), mask.astype(np.uint8) * 255, header)
        else:
            nib.save(nib.Nifti1Image(data, affine), folder / "enhanced.nii.gz")
            nib.save(nib.Nifti1Image(mask.astype(np.int16) * 420, affine), folder / "atriumSegImgMO.nii.gz")
    return target
