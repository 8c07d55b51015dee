"""Slicing along the through-plane axis found from the header, whatever the array's axis order."""

import logging
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from tiny_options import stretched

from la_seg.data import Geometry, find_cases, read_image, through_plane_axis
from la_seg.data.datasets import SliceDataset, VolumeDataset
from la_seg.data.synthetic import synthesize_case

SHAPE, SPACING = (40, 36, 8), (0.625, 0.625, 2.5)
# An oblique axial acquisition: rotated in-plane, tilted a little, origin off the centre.
_ANGLE = np.deg2rad(20.0)
DIRECTIONS = np.array(
    [[np.cos(_ANGLE), -np.sin(_ANGLE), 0.05], [np.sin(_ANGLE), np.cos(_ANGLE), 0.1], [-0.05, -0.1, 1.0]]
)
AFFINE = np.eye(4)
AFFINE[:3, :3] = DIRECTIONS / np.linalg.norm(DIRECTIONS, axis=0) * SPACING
AFFINE[:3, 3] = [-12.0, 30.5, 7.25]


def _write(root: Path, name: str, image: np.ndarray, label: np.ndarray, affine: np.ndarray) -> None:
    folder = root / name
    folder.mkdir(parents=True)
    nib.save(nib.Nifti1Image(image, affine), folder / "enhanced.nii.gz")
    nib.save(nib.Nifti1Image(label, affine), folder / "atriumSegImgMO.nii.gz")


def _permuted(order: tuple[int, int, int], image: np.ndarray, label: np.ndarray, affine: np.ndarray):
    """The same physical image stored with its array axes in `order`: array axis k of the copy is axis
    order[k] of the original, so the copy's affine column k is the original's column order[k]."""
    columns = [*order, 3]
    return np.transpose(image, order), np.transpose(label, order), affine[:, columns]


@pytest.fixture
def phantom(tmp_path):
    image, label = synthesize_case(np.random.default_rng(7), SHAPE, SPACING)
    _write(tmp_path / "original", "train_1", image, label, AFFINE)
    return tmp_path, image, label


@pytest.mark.parametrize("order", [(2, 0, 1), (0, 2, 1)], ids=["slices-first", "slices-middle"])
def test_transposed_copy_gives_the_same_items(phantom, order):
    root, image, label = phantom
    _write(root / "transposed", "train_1", *_permuted(order, image, label, AFFINE))
    original = find_cases(root / "original", require_labels=True)
    transposed = find_cases(root / "transposed", require_labels=True)
    a, b = VolumeDataset(original, cache="none")[0], VolumeDataset(transposed, cache="none")[0]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    assert a["label"].sum() > 0
    assert b["geometry"].slice_axis == order.index(2)
    assert b["geometry"].slices_last_spacing == pytest.approx(a["geometry"].slices_last_spacing)
    assert a["geometry"].slices_last_spacing == pytest.approx(SPACING)
    # back to the file's own layout, as a written mask must be
    file_label = np.asanyarray(nib.load(transposed[0].label_path).dataobj) > 0
    np.testing.assert_array_equal(b["geometry"].from_slices_last(b["label"]).numpy(), file_label)
    np.testing.assert_array_equal(b["geometry"].from_slices_last(b["label"].numpy()), file_label)
    slices_a, slices_b = (
        SliceDataset(original, stretched(28), cache="none"),
        SliceDataset(transposed, stretched(28), cache="none"),
    )
    assert len(slices_a) == len(slices_b) == SHAPE[2]
    for i in range(len(slices_a)):
        assert torch.equal(slices_a[i]["image"], slices_b[i]["image"])
        assert torch.equal(slices_a[i]["label"], slices_b[i]["label"])


def test_sagittal_file_is_sliced_along_axis_0(tmp_path, caplog):
    """Through-plane first: 2.5 mm between sagittal slices along array axis 0 (world x)."""
    image, label = synthesize_case(np.random.default_rng(3), (8, 40, 36), (2.5, 0.625, 0.625))
    _write(tmp_path, "train_1", image, label, np.diag([2.5, 0.625, 0.625, 1.0]))
    cases = find_cases(tmp_path, require_labels=True)
    with caplog.at_level(logging.INFO, logger="la_seg"):
        item = VolumeDataset(cases, cache="none")[0]
    assert item["geometry"].slice_axis == 0
    assert item["image"].shape == (40, 36, 8) and item["geometry"].slices_last_spacing == (0.625, 0.625, 2.5)
    assert f"slicing {cases[0].image_path} along array axis 0" in caplog.text
    assert len(SliceDataset(cases, stretched(28), cache="none")) == 8


def test_slice_axis_overrides_auto(phantom):
    root, image, _ = phantom
    cases = find_cases(root / "original", require_labels=True)
    item = VolumeDataset(cases, cache="none", slice_axis=0)[0]
    assert item["geometry"].slice_axis == 0 and item["image"].shape == (36, 8, 40)
    assert len(SliceDataset(cases, stretched(28), cache="none", slice_axis=1)) == SHAPE[1]


def test_last_axis_is_not_logged(phantom, caplog):
    root, _, _ = phantom
    with caplog.at_level(logging.INFO, logger="la_seg"):
        read_image(root / "original" / "train_1" / "enhanced.nii.gz")
    assert "slicing" not in caplog.text


@pytest.mark.parametrize(
    ("spacing", "expected"),
    [((0.625, 0.625, 2.5), 2), ((2.5, 0.625, 0.625), 0), ((1.3, 4.0, 1.3), 1), ((1.3, 4.0, 4.0), 2)],
)
def test_through_plane_axis_is_the_coarsest(spacing, expected):
    """With two equally coarse axes the one nearest superior-inferior wins (here axis 2 of a diagonal)."""
    assert through_plane_axis(np.diag([*spacing, 1.0]), spacing) == expected


@pytest.mark.parametrize("si_axis", [0, 1, 2])
def test_isotropic_volume_is_sliced_across_superior_inferior(si_axis):
    """Utah 2018 is 0.625 mm isotropic: the axial axis is the one pointing (most) along RAS z."""
    directions = np.roll(np.eye(3), si_axis - 2, axis=1)  # array axis si_axis -> world z
    directions[:, si_axis] += [0.2, -0.1, 0.0]  # an oblique acquisition
    affine = np.eye(4)
    affine[:3, :3] = directions / np.linalg.norm(directions, axis=0) * 0.625
    assert through_plane_axis(affine, (0.625, 0.625, 0.625)) == si_axis
    assert through_plane_axis(affine, (0.625, 0.627, 0.624)) == si_axis  # within 1 % counts as isotropic


def test_geometry_round_trips_numpy_and_torch():
    geometry = Geometry((4, 5, 6), np.eye(4), (1.0, 2.0, 3.0), Path("x.nii.gz"), slice_axis=1)
    array = np.arange(120).reshape(4, 5, 6)
    assert geometry.to_slices_last(array).shape == (4, 6, 5)
    np.testing.assert_array_equal(geometry.from_slices_last(geometry.to_slices_last(array)), array)
    tensor = torch.from_numpy(array)
    assert torch.equal(geometry.from_slices_last(geometry.to_slices_last(tensor)), tensor)
    assert geometry.slices_last_spacing == (1.0, 3.0, 2.0) and geometry.spacing_source == "header"


@pytest.mark.parametrize("order", [(0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0)])
@pytest.mark.parametrize("flips", [(), (0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2)])
def test_every_storage_of_a_volume_gives_the_model_the_same_array(order, flips):
    """All 48 axis orders and flips of one oblique volume (same world positions): the model's slices-last
    array and spacing are the same, and from_slices_last puts results back on each storage's own grid."""
    rng = np.random.default_rng(0)
    array = rng.random(SHAPE, dtype=np.float32)
    reference = Geometry(SHAPE, AFFINE, SPACING, Path("ras.nii.gz"))
    stored, affine = array.transpose(order), AFFINE[:, [*order, 3]].copy()
    for axis in flips:
        stored = np.flip(stored, axis)
        affine[:3, 3] += affine[:3, axis] * (stored.shape[axis] - 1)
        affine[:3, axis] *= -1
    spacing = tuple(SPACING[a] for a in order)
    geometry = Geometry(stored.shape, affine, spacing, Path("x.nii.gz"), through_plane_axis(affine, spacing))
    np.testing.assert_array_equal(geometry.to_slices_last(stored), reference.to_slices_last(array))
    assert geometry.slices_last_spacing == reference.slices_last_spacing == (0.625, 0.625, 2.5)
    np.testing.assert_array_equal(geometry.from_slices_last(reference.to_slices_last(array)), stored)
    tensor = torch.from_numpy(np.ascontiguousarray(stored))
    assert torch.equal(geometry.from_slices_last(geometry.to_slices_last(tensor)), tensor)
    legacy = Geometry(
        stored.shape, affine, spacing, Path("x.nii.gz"), geometry.slice_axis, orientation="array"
    )
    np.testing.assert_array_equal(legacy.to_slices_last(stored), np.moveaxis(stored, geometry.slice_axis, 2))


def test_oblique_volume_is_read_with_one_warning(tmp_path):
    angle = np.deg2rad(40.0)
    affine = np.eye(4)
    affine[:2, :2] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), affine), tmp_path / "tilted.nii.gz")
    with pytest.warns(UserWarning, match=r"tilted.nii.gz is stored oblique: a voxel axis lies 40 degrees"):
        read_image(tmp_path / "tilted.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), AFFINE), tmp_path / "slightly.nii.gz")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*is stored oblique")
        read_image(tmp_path / "slightly.nii.gz")  # 20 degrees in-plane: no warning


def test_the_same_patients_in_any_storage_read_the_same(tmp_path):
    """NIfTI in five array orders and NRRD with LPS space directions: the same normalised volume and label,
    slices last, for every storage (the model's input does not depend on how a converter stored it)."""
    from la_seg.data.synthetic import write_dataset
    from tests.storage import STORAGES, write_storage

    write_dataset(tmp_path / "ras", cases=2, seed=3, shape=(24, 20, 6), spacing=(1.5, 1.5, 4.0))
    expected = VolumeDataset(find_cases(tmp_path / "ras", require_labels=True), cache="none")
    for storage in STORAGES:
        root = write_storage(tmp_path / "ras", tmp_path / storage, storage)
        items = VolumeDataset(find_cases(root, require_labels=True), cache="none")
        for want, got in zip(expected, items, strict=True):
            assert got["case_id"] == want["case_id"], storage
            torch.testing.assert_close(got["image"], want["image"], msg=storage)
            assert torch.equal(got["label"], want["label"]), storage
            assert got["geometry"].slices_last_spacing == want["geometry"].slices_last_spacing
