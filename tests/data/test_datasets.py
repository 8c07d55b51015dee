import os
import pickle
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage
from tiny_options import stretched
from torch.utils.data import DataLoader

from la_seg.data.datasets import SliceDataset, VolumeDataset, VolumeItem, first_item
from la_seg.data.layouts import find_cases
from la_seg.data.preprocess import InputSpec, normalize_intensity, slices_to_input
from la_seg.data.transforms import AugmentationConfig, build_train_transform
from la_seg.errors import DataError

SHAPE = (30, 28, 6)
AFFINE = np.diag([0.625, 0.625, 2.5, 1.0])


def write_case(root: Path, name: str, seed: int, la_slices: range) -> tuple[np.ndarray, np.ndarray]:
    """A tiny LAScarQS case: noisy image, a bright LA blob (label 420) on `la_slices`."""
    rng = np.random.default_rng(seed)
    image = rng.normal(100, 20, SHAPE).astype(np.float32)
    label = np.zeros(SHAPE, dtype=np.uint16)
    label[8:20, 6:18, la_slices.start : la_slices.stop] = 420
    image[label > 0] += 200
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(image, AFFINE), folder / "enhanced.nii.gz")
    nib.save(nib.Nifti1Image(label, AFFINE), folder / "atriumSegImgMO.nii.gz")
    return image, label


@pytest.fixture
def cases(tmp_path):
    for i in range(3):  # 2, 3 and 4 LA slices of 6
        write_case(tmp_path / "data", f"train_{i + 1}", seed=i, la_slices=range(1, 3 + i))
    return find_cases(tmp_path / "data", "lascarqs", require_labels=True)


def test_slice_dataset_items(cases):
    ds = SliceDataset(cases, stretched(56), cache="none")
    assert len(ds) == 3 * SHAPE[2]
    assert (ds.num_foreground, ds.num_background) == (9, 9)
    item = ds[0]
    assert set(item) == {"image", "label"}
    assert item["image"].shape == (3, 56, 56) and item["image"].dtype == torch.float32
    assert item["label"].shape == (1, 56, 56) and item["label"].dtype == torch.float32
    for item in (ds[i] for i in range(len(ds))):
        assert 0 <= item["image"].min() and item["image"].max() <= 1
        assert set(item["label"].unique().tolist()) <= {0.0, 1.0}
    assert sum(ds[i]["label"].sum() > 0 for i in range(len(ds))) == 9


@pytest.mark.parametrize("fraction,expected", [(0.0, 0), (0.5, 4), (1.0, 9)])
def test_empty_slice_fraction(cases, fraction, expected):
    """9 slices without LA: all, none, or round(4.5) = 4 of them are kept."""
    ds = SliceDataset(cases, stretched(28), empty_slice_fraction=fraction, seed=3)
    assert ds.num_foreground == 9 and ds.num_background == expected and len(ds) == 9 + expected
    with_la = sum(bool(ds[i]["label"].any()) for i in range(len(ds)))
    assert with_la == 9
    again = SliceDataset(cases, stretched(28), empty_slice_fraction=fraction, seed=3)
    assert np.array_equal(ds.index, again.index)


def test_empty_slice_fraction_depends_on_seed(cases):
    picks = {
        SliceDataset(cases, stretched(28), empty_slice_fraction=0.34, seed=s).index.tobytes()
        for s in range(6)
    }
    assert len(picks) > 1
    with pytest.raises(DataError, match="empty_slice_fraction"):
        SliceDataset(cases, stretched(28), empty_slice_fraction=1.5)


def test_slice_context_item_matches_full_volume(cases):
    ds = SliceDataset(cases, stretched(28, slice_context=True))
    volume = torch.from_numpy(normalize_intensity(nib.load(cases[0].image_path).get_fdata()))
    volume = volume.half().float()  # cached images are float16
    full = slices_to_input(volume, 28, slice_context=True)
    for i, (position, z) in enumerate(ds.index):
        if position == 0:
            assert torch.allclose(ds[i]["image"], full[z], atol=1e-6)
    first, second = ds[0]["image"], ds[1]["image"]
    assert torch.equal(first[0], first[1]) and torch.equal(first[2], second[1])  # edge replicated; neighbours


def test_volume_dataset_items(cases):
    ds = VolumeDataset(cases)
    item = ds[1]
    assert set(item) == set(VolumeItem.__annotations__)
    geometry = item["geometry"]
    assert item["case_id"] == "train_2" and geometry.source == cases[1].image_path
    assert item["image"].shape == SHAPE and item["image"].dtype == torch.float32
    assert item["label"].shape == SHAPE and item["label"].dtype == torch.uint8
    assert geometry.slices_last_spacing == pytest.approx((0.625, 0.625, 2.5)) and geometry.slice_axis == 2
    assert geometry.shape == SHAPE and np.allclose(geometry.affine, AFFINE)
    raw = nib.load(cases[1].image_path).get_fdata()
    assert np.allclose(item["image"].numpy(), normalize_intensity(raw), atol=1e-3)
    assert np.array_equal(item["label"].numpy(), nib.load(cases[1].label_path).get_fdata() > 0)


def test_volume_dataset_without_labels_never_reads_them(cases):
    cases[0].label_path.write_bytes(b"not a nifti")
    cache_dir = cases[0].image_path.parent.parent / "cache"
    ds = VolumeDataset(cases, with_labels=False, cache="disk", cache_dir=cache_dir)
    item = ds[0]
    assert "label" not in item and item["image"].shape == SHAPE
    with pytest.raises(DataError):
        VolumeDataset(cases, with_labels=True, cache="none")[0]


def _items(ds):
    return [ds[i] for i in range(len(ds))]


def test_caches_give_identical_items(cases, tmp_path):
    modes = {"memory": None, "disk": tmp_path / "cache", "none": None}
    slices = [_items(SliceDataset(cases, stretched(28), cache=m, cache_dir=d)) for m, d in modes.items()]
    volumes = [_items(VolumeDataset(cases, cache=m, cache_dir=d)) for m, d in modes.items()]
    for other in slices[1:]:
        for a, b in zip(slices[0], other, strict=True):
            assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    for other in volumes[1:]:
        for a, b in zip(volumes[0], other, strict=True):
            assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
            first, second = a["geometry"], b["geometry"]
            assert np.array_equal(first.affine, second.affine) and first.source == second.source
            assert (first.shape, first.spacing, first.slice_axis, first.spacing_source) == (
                second.shape,
                second.spacing,
                second.slice_axis,
                second.spacing_source,
            )
    # disk: a second dataset reads the .npy files memory-mapped instead of decoding again
    again = VolumeDataset(cases, cache="disk", cache_dir=tmp_path / "cache")
    assert isinstance(again.cache.get(cases[0], with_labels=True).image, np.memmap)
    assert torch.equal(again[0]["image"], volumes[0][0]["image"])


def test_the_disk_cache_keeps_one_entry_per_intensity_headroom(cases, tmp_path):
    """A volume cached for one normalisation is never served for another (data.intensity_headroom)."""
    raw = nib.load(cases[0].image_path).get_fdata()
    for headroom in (1.5, 1.0, 1.5):
        ds = VolumeDataset(
            cases[:1], InputSpec(intensity_headroom=headroom), cache="disk", cache_dir=tmp_path / "cache"
        )
        assert np.allclose(ds[0]["image"].numpy(), normalize_intensity(raw, headroom=headroom), atol=1e-3)
    assert len(list((tmp_path / "cache").glob("*.image.npy"))) == 2


def test_memory_cache_is_filled_once_and_picklable(cases, monkeypatch):
    ds = SliceDataset(cases, stretched(28), cache="memory")
    monkeypatch.setattr("la_seg.data.cache.read_case", lambda *args: pytest.fail("decoded twice"))
    first = _items(ds)
    clone = pickle.loads(pickle.dumps(ds))
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(first, _items(clone), strict=True))


def test_disk_cache_invalidates_changed_file(cases, tmp_path):
    ds = VolumeDataset(cases, cache="disk", cache_dir=tmp_path / "cache")
    before = ds[0]["image"]
    path = cases[0].image_path
    image = nib.load(path).get_fdata().astype(np.float32)
    image[:, :, :3] = 0  # a different volume in the same file
    nib.save(nib.Nifti1Image(image, AFFINE), path)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    after = ds[0]["image"]
    assert not torch.equal(before, after)
    assert torch.allclose(after, torch.from_numpy(normalize_intensity(image)), atol=1e-3)


def test_cache_mode_errors(cases):
    with pytest.raises(DataError, match="cache"):
        VolumeDataset(cases, cache="ram")


def test_first_item():
    assert first_item([{"a": 1}]) == {"a": 1}
    with pytest.raises(ValueError, match="batch_size=1"):
        first_item([{}, {}])


def test_volume_loader_with_first_item(cases):
    loader = DataLoader(VolumeDataset(cases, cache="none"), batch_size=1, collate_fn=first_item)
    item = next(iter(loader))
    assert item["case_id"] == "train_1" and item["image"].shape == SHAPE


# ---------------------------------------------------------------------------------------------- transforms
def _square_pair(size=56):
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[10:30, 14:40] = 1
    image = np.repeat(mask[..., None].astype(np.float32), 3, axis=2) * 0.8 + 0.1
    return image, mask


def test_geometric_augmentation_moves_mask_with_image():
    geometric = {"rotate_limit": 30, "scale_limit": 0.2, "shift_limit": 0.1, "elastic": True, "hflip": True}
    cfg = AugmentationConfig(
        **geometric, brightness_contrast=0, gamma=(100, 100), noise=False, blur=False, p=1.0
    )
    transform = build_train_transform(cfg)
    image, mask = _square_pair()
    moved = 0
    for seed in range(5):
        transform.set_random_seed(seed)
        out = transform(image=image, mask=mask)
        assert out["mask"].dtype == np.uint8 and set(np.unique(out["mask"])) <= {0, 1}
        bright = out["image"][..., 0] > 0.5
        iou = (bright & (out["mask"] > 0)).sum() / (bright | (out["mask"] > 0)).sum()
        assert iou > 0.85
        moved += not np.array_equal(out["mask"], mask)
    assert moved == 5


def test_intensity_augmentation_leaves_mask_alone():
    cfg = AugmentationConfig(rotate_limit=0, scale_limit=0, shift_limit=0, elastic=False, p=1.0)
    transform = build_train_transform(cfg)
    image, mask = _square_pair()
    out = transform(image=image, mask=mask)
    assert np.array_equal(out["mask"], mask) and not np.allclose(out["image"], image)
    assert np.isfinite(out["image"]).all()


NO_AUGMENTATION = {
    "rotate_limit": 0, "scale_limit": 0, "shift_limit": 0, "elastic": False, "brightness_contrast": 0,
    "gamma": (100, 100), "surroundings_brightening": 0, "noise": False, "blur": False,
}  # fmt: skip
ONLY_BIAS_FIELD = {**NO_AUGMENTATION, "bias_field": True}
ONLY_SURROUNDINGS = {**NO_AUGMENTATION, "surroundings_brightening": 0.5}
ONLY_HISTOGRAM_SHIFT = {**NO_AUGMENTATION, "histogram_shift": True}


def test_bias_field_shades_the_slice_smoothly_and_leaves_mask_alone():
    transform = build_train_transform(AugmentationConfig(**ONLY_BIAS_FIELD, p=1.0))
    assert [type(t).__name__ for t in transform] == ["BiasField"]
    image, mask = np.full((56, 56, 3), 0.5, dtype=np.float32), _square_pair()[1]
    fields = []
    for seed in range(3):
        transform.set_random_seed(seed)
        out = transform(image=image, mask=mask)
        field = out["image"] / image
        assert np.array_equal(out["mask"], mask) and out["image"].dtype == np.float32
        assert np.allclose(field[..., 0], field[..., 2])  # one field for the repeated grey channels
        assert field.max() / field.min() > 1.1  # it shades the slice ...
        steps = np.abs(np.diff(field[..., 0], axis=0)).max(), np.abs(np.diff(field[..., 0], axis=1)).max()
        assert max(steps) < 0.25 * (field.max() - field.min())  # ... smoothly: no pixel jumps like noise
        fields.append(field)
    transform.set_random_seed(0)
    assert np.allclose(transform(image=image, mask=mask)["image"] / image, fields[0])
    assert not np.allclose(fields[0], fields[1])


def test_histogram_shift_changes_tissue_ratios_and_keeps_their_order():
    """Two tissues (a blood pool at 0.6 on a myocardium at 0.3): the curve changes their ratio, not only both
    together, and never swaps them; the range's ends, the mask and a blank slice stay as they were."""
    transform = build_train_transform(AugmentationConfig(**ONLY_HISTOGRAM_SHIFT, p=1.0))
    assert [type(t).__name__ for t in transform] == ["HistogramShift"]
    image, mask = np.full((56, 56, 3), 0.3, dtype=np.float32), _square_pair()[1]
    image[mask > 0] = 0.6
    image[0, 0], image[-1, -1] = 0.0, 1.0
    ratios = []
    for seed in range(6):
        transform.set_random_seed(seed)
        out = transform(image=image, mask=mask)
        assert np.array_equal(out["mask"], mask) and out["image"].dtype == np.float32
        assert np.allclose(out["image"][..., 0], out["image"][..., 2])  # one curve for the grey channels
        assert out["image"][0, 0, 0] == 0.0 and np.isclose(out["image"][-1, -1, 0], 1.0)
        blood, myocardium = out["image"][mask > 0][0, 0], out["image"][40, 40, 0]
        assert blood > myocardium
        ratios.append(blood / myocardium)
    assert max(ratios) / min(ratios) > 1.2  # the ratio is what varies
    transform.set_random_seed(0)
    again = transform(image=image, mask=mask)["image"]
    assert np.isclose(again[mask > 0][0, 0] / again[40, 40, 0], ratios[0])
    blank = np.zeros_like(image)
    assert np.array_equal(transform(image=blank, mask=mask)["image"], blank)


def test_surroundings_brightened_around_an_atrium_that_keeps_its_grey_values():
    transform = build_train_transform(AugmentationConfig(**ONLY_SURROUNDINGS, p=1.0))
    assert [type(t).__name__ for t in transform] == ["BrightenSurroundings"]
    image, mask = np.full((56, 56, 3), 0.4, dtype=np.float32), _square_pair()[1]
    gains = []
    for seed in range(4):
        transform.set_random_seed(seed)
        out = transform(image=image, mask=mask)
        assert np.array_equal(out["mask"], mask) and out["image"].dtype == np.float32
        gain = out["image"] / image
        assert np.allclose(gain[15:25, 20:34], 1.0, atol=1e-3)  # the atrium's core keeps its grey values
        assert np.allclose(gain[45:, :], gain[50, 5])  # far outside: one gain ...
        assert 1.0 < gain[50, 5, 0] <= 1.5  # ... drawn from [1, 1 + limit]
        steps = np.abs(np.diff(gain[..., 0], axis=1)).max()
        assert steps < 0.6 * (gain[50, 5, 0] - 1.0)  # it rises over pixels at the boundary, not in a step
        gains.append(gain[50, 5, 0])
    assert len(set(np.round(gains, 6))) == 4
    transform.set_random_seed(0)
    assert np.isclose((transform(image=image, mask=mask)["image"] / image)[50, 5, 0], gains[0])
    bright = np.full_like(image, 0.9)
    assert transform(image=bright, mask=mask)["image"].max() <= 1.0  # clipped to the input range
    empty = np.zeros_like(mask)
    assert np.array_equal(transform(image=image, mask=empty)["image"], image)  # no atrium: left alone
    with pytest.raises(ValueError, match="mask"):
        transform(image=image)


def test_surroundings_follow_the_mask_the_geometric_transforms_moved():
    cfg = AugmentationConfig(**{**ONLY_SURROUNDINGS, "rotate_limit": 40, "shift_limit": 0.15}, p=1.0)
    transform = build_train_transform(cfg)
    image, mask = np.full((56, 56, 3), 0.4, dtype=np.float32), _square_pair()[1]
    for seed in range(3):
        transform.set_random_seed(seed)
        out = transform(image=image, mask=mask)
        assert not np.array_equal(out["mask"], mask)  # moved
        core = ndimage.binary_erosion(out["mask"], iterations=4)
        rim = ndimage.binary_dilation(out["mask"], iterations=6) ^ ndimage.binary_dilation(
            out["mask"], iterations=5
        )
        assert core.any() and np.allclose(out["image"][core], 0.4, atol=1e-3)
        filled = out["image"][..., 0] > 0  # the affine's constant fill stays 0
        assert (out["image"][rim & filled] > 0.4 + 1e-4).all()


def test_transform_config():
    assert build_train_transform(AugmentationConfig(enabled=False)) is None
    names = [type(t).__name__ for t in build_train_transform(AugmentationConfig())]
    assert "HorizontalFlip" not in names and "Affine" in names and "ElasticTransform" in names
    assert "BiasField" not in names and "BrightenSurroundings" in names
    assert "BrightenSurroundings" not in [
        type(t).__name__ for t in build_train_transform(AugmentationConfig(surroundings_brightening=0))
    ]
    with_bias = build_train_transform(AugmentationConfig(bias_field=True))
    assert "BiasField" in [type(t).__name__ for t in with_bias]
    assert "HistogramShift" not in names
    with pytest.raises(ValueError, match="augmentation.p"):
        AugmentationConfig(p=2)
    with pytest.raises(ValueError, match="gamma"):
        AugmentationConfig(gamma=(120, 80))
    with pytest.raises(ValueError, match="augmentation.surroundings_brightening"):
        AugmentationConfig(surroundings_brightening=-0.1)


def test_slice_dataset_with_transform_in_workers(cases):
    transform = build_train_transform(AugmentationConfig(p=1.0, bias_field=True))
    ds = SliceDataset(cases, stretched(28), transform=transform, empty_slice_fraction=0.0)
    batches = list(DataLoader(ds, batch_size=3, num_workers=2, shuffle=False))
    images = torch.cat([b["image"] for b in batches])
    labels = torch.cat([b["label"] for b in batches])
    assert images.shape == (9, 3, 28, 28) and labels.shape == (9, 1, 28, 28)
    assert images.min() >= 0 and images.max() <= 1 and set(labels.unique().tolist()) <= {0.0, 1.0}


@pytest.mark.parametrize(
    "fields",
    [{"bias_field": True, "histogram_shift": True}, ONLY_BIAS_FIELD, ONLY_SURROUNDINGS, ONLY_HISTOGRAM_SHIFT],
    ids=["all", "bias_field_only", "surroundings_only", "histogram_shift_only"],
)
def test_workers_draw_different_augmentations(tmp_path, fields):
    """Forked workers inherit the transform's generator; each must reseed, or they augment in lockstep (the
    bias field and the surroundings' gain draw from that generator too)."""
    image = np.tile(np.random.default_rng(0).random((30, 28, 1), dtype=np.float32), (1, 1, 4))
    label = np.zeros((30, 28, 4), dtype=np.uint16)
    label[8:20, 6:18] = 420
    folder = tmp_path / "train_1"
    folder.mkdir()
    nib.save(nib.Nifti1Image(image, AFFINE), folder / "enhanced.nii.gz")
    nib.save(nib.Nifti1Image(label, AFFINE), folder / "atriumSegImgMO.nii.gz")
    transform = build_train_transform(AugmentationConfig(**{"p": 1.0, **fields}))
    ds = SliceDataset(find_cases(tmp_path), stretched(28), transform=transform)
    first, second = list(DataLoader(ds, batch_size=1, num_workers=2, shuffle=False))[:2]  # one per worker
    assert not torch.equal(first["image"], second["image"])


def test_datasets_that_need_labels_refuse_unlabelled_cases(cases):
    unlabelled = [cases[0], replace(cases[1], label_path=None)]
    for make in (
        lambda: SliceDataset(unlabelled, stretched(28)),
        lambda: VolumeDataset(unlabelled, with_labels=True),
    ):
        with pytest.raises(DataError, match=r"labels are required but 1 case\(s\) have none.*train_2"):
            make()
    assert "label" not in VolumeDataset(unlabelled, with_labels=False, cache="none")[1]


def test_a_slice_wider_than_the_input_is_trained_on_windows_that_reach_its_edges(tmp_path):
    """30 x 28 px at 0.625 mm into a 14 px input at 0.625 mm: an LA in the corner, outside a centred crop,
    is in some items, each a 14 x 14 window whose label lies on its bright blob (image and label aligned)."""
    rng = np.random.default_rng(0)
    image = rng.normal(100, 5, SHAPE).astype(np.float32)
    label = np.zeros(SHAPE, dtype=np.uint16)
    label[0:5, 0:5, :] = 420  # a centred 14 px crop keeps rows 8-21 and columns 7-20 only
    image[label > 0] += 300
    folder = tmp_path / "data" / "train_1"
    folder.mkdir(parents=True)
    nib.save(nib.Nifti1Image(image, AFFINE), folder / "enhanced.nii.gz")
    nib.save(nib.Nifti1Image(label, AFFINE), folder / "atriumSegImgMO.nii.gz")
    cases = find_cases(tmp_path / "data", "lascarqs", require_labels=True)
    spec = InputSpec(img_size=14, in_plane="spacing", target_spacing=0.625)
    ds = SliceDataset(cases, spec, cache="none")
    torch.manual_seed(0)
    items = [ds[0] for _ in range(40)]
    assert all(item["image"].shape == (3, 14, 14) and item["label"].shape == (1, 14, 14) for item in items)
    with_la = [item for item in items if item["label"].any()]
    assert 0 < len(with_la) < len(items)
    for item in with_la:
        la = item["label"][0] > 0
        assert item["image"][0][la].min() > item["image"][0][~la].max()
