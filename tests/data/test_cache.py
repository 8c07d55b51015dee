"""VolumeCache: decoded volumes and their Geometry, the same whether kept in memory, on disk or not at all."""

from pathlib import Path
from typing import get_args

import nibabel as nib
import nrrd
import numpy as np
import pytest

from la_seg.data import find_cases
from la_seg.data.cache import CACHE_MODES, CacheMode, VolumeCache
from la_seg.data.preprocess import InputSpec
from la_seg.errors import DataError

SHAPE = (12, 10, 4)


def _utah_case(root: Path) -> Path:
    """A Utah 2018 case: 1 mm in the header, 0.625 mm in truth; label 255 plus a stray value 7."""
    folder = root / "Training Set" / "CASE1"
    folder.mkdir(parents=True)
    header = {"space": "left-posterior-superior", "space directions": np.eye(3), "space origin": [1.0, 2, 3]}
    rng = np.random.default_rng(0)
    nrrd.write(str(folder / "lgemri.nrrd"), rng.integers(0, 500, SHAPE).astype(np.int16), header)
    label = np.zeros(SHAPE, np.uint8)
    label[3:8, 2:6, 1:3], label[0, 0, 0] = 255, 7
    nrrd.write(str(folder / "laendo.nrrd"), label, header)
    return root


def test_cache_modes_are_a_literal():
    assert CACHE_MODES == get_args(CacheMode) == ("memory", "disk", "none")
    with pytest.raises(DataError, match="cache must be one of memory, disk, none"):
        VolumeCache("ram")
    with pytest.raises(DataError, match="slice_axis"):
        VolumeCache("none", slice_axis=3)


@pytest.mark.filterwarnings("ignore:label")
def test_disk_cache_restores_the_geometry(tmp_path):
    (case,) = find_cases(_utah_case(tmp_path / "data"))
    fresh = VolumeCache("none").get(case, with_labels=True)
    VolumeCache("disk", tmp_path / "cache").get(case, with_labels=True)  # fills the cache
    stored = VolumeCache("disk", tmp_path / "cache").get(case, with_labels=True)
    assert isinstance(stored.image, np.memmap)
    for entry in (fresh, stored):
        geometry = entry.geometry
        assert geometry.spacing == (0.625, 0.625, 0.625) and geometry.spacing_source.startswith("utah2018")
        ras = [[-1, 0, 0, -1], [0, -1, 0, -2], [0, 0, 1, 3], [0, 0, 0, 1]]  # the header's LPS, not rescaled
        np.testing.assert_allclose(geometry.affine, ras)
        assert geometry.source == case.image_path and geometry.shape == SHAPE and geometry.slice_axis == 2
    np.testing.assert_array_equal(stored.image, fresh.image)
    np.testing.assert_array_equal(stored.label, fresh.label)
    assert stored.label.sum() == 5 * 4 * 2  # 255 only: the stray 7 is not LA


@pytest.mark.filterwarnings("ignore:label")
def test_arrays_are_slices_first_along_the_slice_axis_in_ras(tmp_path):
    """The Utah file is stored LPS: the cache holds it in RAS (x and y reversed), slices first."""
    (case,) = find_cases(_utah_case(tmp_path / "data"))
    label = (np.asanyarray(nrrd.read(str(case.label_path))[0]) == 255).astype(np.uint8)
    ras = label[::-1, ::-1, :]
    for axis in (0, 1, 2):
        entry = VolumeCache("disk", tmp_path / "cache", slice_axis=axis).get(case, with_labels=True)
        assert entry.geometry.slice_axis == axis
        np.testing.assert_array_equal(entry.label, np.moveaxis(ras, axis, 0))
    as_stored = VolumeCache("none", slice_axis=2, spec=InputSpec(orientation="array")).get(
        case, with_labels=True
    )
    np.testing.assert_array_equal(as_stored.label, np.moveaxis(label, 2, 0))  # older checkpoints' layout
    assert len(list((tmp_path / "cache").glob("*.image.npy"))) == 3  # one entry per slice axis


def test_disk_cache_key_depends_on_label_values(tmp_path):
    folder = tmp_path / "data" / "imagesTr"
    folder.mkdir(parents=True)
    (tmp_path / "data" / "labelsTr").mkdir()
    label = np.zeros(SHAPE, np.uint8)
    label[2:5, 2:5, 1], label[6:8, 6:8, 2] = 1, 2
    nib.save(nib.Nifti1Image(np.ones(SHAPE, np.float32), np.eye(4)), folder / "la_001.nii.gz")
    nib.save(nib.Nifti1Image(label, np.eye(4)), tmp_path / "data" / "labelsTr" / "la_001.nii.gz")
    cache = VolumeCache("disk", tmp_path / "cache")
    (one,) = find_cases(tmp_path / "data", label_values=[1])
    (both,) = find_cases(tmp_path / "data", label_values=[1, 2])
    with pytest.warns(UserWarning, match=r"values \[2\]"):
        assert cache.get(one, with_labels=True).label.sum() == 9
    assert cache.get(both, with_labels=True).label.sum() == 9 + 4
