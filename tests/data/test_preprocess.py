import numpy as np
import pytest
import torch

from la_seg.data.preprocess import (
    SliceGrid,
    check_img_size,
    check_intensity_headroom,
    labels_to_input,
    normalize_intensity,
    restore_geometry,
    slice_grid,
    slices_to_input,
)
from la_seg.errors import DataError


def _blob(shape=(30, 28, 6)) -> torch.Tensor:
    """A smooth ellipsoid label, the kind of shape resizing should preserve."""
    x, y, z = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    inside = ((x - 14) / 9) ** 2 + ((y - 13) / 7) ** 2 + ((z - 2.5) / 2.6) ** 2 <= 1
    return torch.from_numpy(inside.astype(np.uint8))


def test_normalize_range_and_robust_clip():
    rng = np.random.default_rng(0)
    data = rng.normal(100, 10, (20, 20, 5)).astype(np.float32)
    data[0, 0, 0] = 1e6  # one hot outlier must not squash the rest
    out = normalize_intensity(data)
    assert out.dtype == np.float32 and out.shape == data.shape
    assert out.min() == 0.0 and out.max() == 1.0
    assert 0.3 < np.median(out) < 0.7


@pytest.mark.parametrize("value", [0.0, 7.5, -3.0])
def test_normalize_constant_volume_is_zero(value):
    out = normalize_intensity(np.full((4, 5, 3), value, dtype=np.float32))
    assert np.array_equal(out, np.zeros((4, 5, 3), dtype=np.float32))


def test_normalize_non_finite_voxels():
    data = np.arange(60, dtype=np.float32).reshape(3, 4, 5)
    data[0, 0, 0], data[1, 1, 1], data[2, 2, 2] = np.nan, np.inf, -np.inf
    out = normalize_intensity(data)
    assert np.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
    assert out[0, 0, 0] == out[1, 1, 1] == out[2, 2, 2] == 0
    assert normalize_intensity(np.full((2, 2, 2), np.nan)).tolist() == np.zeros((2, 2, 2)).tolist()


def test_normalize_mostly_zero_volume_keeps_contrast():
    data = np.zeros((10, 10, 10), dtype=np.float32)
    data[0, 0, :3] = [1, 2, 3]  # 99.7 % zeros: percentiles coincide, the full range is used instead
    out = normalize_intensity(data, headroom=1.0)
    assert out.max() == 1.0 and out[0, 0, 1] == pytest.approx(2 / 3)
    assert normalize_intensity(data, headroom=2.0)[0, 0, 2] == pytest.approx(0.5)  # one scale, headroom too


def test_headroom_keeps_what_is_brighter_than_the_bright_percentile():
    """LGE: the enhanced wall (1.4) is brighter than the blood pool (1.0), which fills more than 0.5 % of the
    volume. A 99.5th-percentile clip gives both one grey value; the headroom keeps them apart, and the rest of
    the scale is the clip's, divided by the headroom."""
    rng = np.random.default_rng(0)
    data = rng.uniform(0.0, 0.4, (40, 40, 20)).astype(np.float32)  # tissue
    data[:, :, :2] = 1.0  # blood pool: 10 % of the voxels
    data[0, :5, 5] = 1.4  # enhanced wall: 5 voxels
    clipped = normalize_intensity(data, headroom=1.0)
    assert clipped[0, 0, 5] == clipped[0, 0, 0] == 1.0  # wall and blood: one grey value
    kept = normalize_intensity(data)
    assert kept[0, 0, 5] > kept[0, 0, 0] and kept[0, 0, 5] <= 1.0
    below = clipped < 1.0
    assert np.allclose(kept[below], clipped[below] / 1.5, atol=1e-6)
    lo, hi = np.percentile(data, [0.5, 99.5])
    assert kept[0, 0, 5] == pytest.approx((1.4 - lo) / (hi - lo) / 1.5, rel=1e-5)


@pytest.mark.parametrize("headroom", [0.5, float("nan"), float("inf"), True, "1.5"])
def test_bad_headroom_is_refused_naming_the_field(headroom):
    with pytest.raises(DataError, match="data.intensity_headroom"):
        check_intensity_headroom(headroom, "data.intensity_headroom")


@pytest.mark.parametrize("shape", [(30, 28, 6), (28, 28, 4), (17, 40, 3)])
@pytest.mark.parametrize("context", [False, True])
def test_slices_to_input_shapes_and_range(shape, context):
    volume = torch.rand(shape)
    out = slices_to_input(volume, 56, slice_context=context)
    assert out.shape == (shape[2], 3, 56, 56) and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1
    if not context:
        assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 0], out[:, 2])


def test_slice_context_channels_are_neighbours():
    volume = torch.rand(28, 28, 5)
    grey = slices_to_input(volume, 28)[:, 0]  # same size: slices unchanged
    assert torch.allclose(grey, volume.permute(2, 0, 1))
    ctx = slices_to_input(volume, 28, slice_context=True)
    for k in range(5):
        assert torch.equal(ctx[k, 1], grey[k])
        assert torch.equal(ctx[k, 0], grey[max(k - 1, 0)])
        assert torch.equal(ctx[k, 2], grey[min(k + 1, 4)])


@pytest.mark.parametrize("context", [False, True])
def test_chunked_index_equals_full(context):
    volume = torch.rand(30, 28, 7)
    full = slices_to_input(volume, 28, slice_context=context)
    starts = range(0, 7, 3)
    chunks = [slices_to_input(volume, 28, slice_context=context, index=slice(a, a + 3)) for a in starts]
    assert torch.equal(torch.cat(chunks), full)
    label = _blob((30, 28, 7))
    label_chunks = [labels_to_input(label, 28, index=slice(a, a + 3)) for a in starts]
    assert torch.equal(torch.cat(label_chunks), labels_to_input(label, 28))


def test_labels_to_input_binary():
    out = labels_to_input(_blob(), 56)
    assert out.shape == (6, 1, 56, 56) and out.dtype == torch.float32
    assert set(out.unique().tolist()) == {0.0, 1.0}


ROUND_TRIPS = [((30, 28, 6), 28), ((30, 28, 6), 56), ((40, 25, 6), 28), ((28, 28, 6), 56)]


@pytest.mark.parametrize("shape,size", ROUND_TRIPS)
def test_restore_geometry_round_trip(shape, size):
    label = _blob(shape)
    restored = restore_geometry(labels_to_input(label, size)[:, 0], label.shape)
    assert restored.shape == label.shape
    pred = restored > 0.5
    truth = label.bool()
    dice = 2 * (pred & truth).sum() / (pred.sum() + truth.sum())
    assert dice > 0.97


def test_restore_geometry_of_smooth_input_is_near_identity():
    x, y, z = torch.meshgrid(torch.arange(30.0), torch.arange(22.0), torch.arange(4.0), indexing="ij")
    volume = 0.5 + 0.4 * torch.sin(x / 5) * torch.cos(y / 4 + z)
    for size in (28, 56):
        restored = restore_geometry(slices_to_input(volume, size)[:, 0], volume.shape)
        assert restored.shape == (30, 22, 4)
        assert (restored - volume).abs().max() < 0.05  # aligned: no shift, no transposition


@pytest.mark.parametrize("size", [0, -14, 2.5, True, "56"])
def test_img_size_must_be_a_positive_integer(size):
    with pytest.raises(DataError, match="img_size must be a positive integer"):
        slices_to_input(torch.rand(8, 8, 2), size)
    with pytest.raises(DataError, match="img_size"):
        labels_to_input(torch.zeros(8, 8, 2), size)


def test_patch_multiple_is_the_backbones_rule():
    """preprocess knows no patch size (DINOv2 has 14, DINOv3 16): any positive size resizes."""
    assert slices_to_input(torch.rand(8, 8, 2), 30).shape == (2, 3, 30, 30)
    assert check_img_size(np.int64(32), name="model.img_size") == 32
    with pytest.raises(DataError, match="model.img_size must be"):
        check_img_size(0, name="model.img_size")


def test_restore_geometry_checks_depth():
    with pytest.raises(DataError, match="slices"):
        restore_geometry(torch.rand(5, 28, 28), (30, 28, 6))


# ---- in_plane "spacing": resample to a common mm per pixel, aspect kept, padded to at least img_size ------
def test_stretch_grid_is_the_plain_resize():
    volume = torch.rand(30, 20, 3)
    grid = slice_grid((30, 20), 28, "stretch", (1.3, 1.3, 4.0))
    assert grid == SliceGrid((28, 28), (0, 0), (28, 28))
    assert torch.equal(slices_to_input(volume, 28, grid=grid), slices_to_input(volume, 28))


@pytest.mark.parametrize(
    ("xy", "spacing", "target", "size", "offset", "plane"),
    [
        ((112, 96), (1.3, 1.3), 1.3, (112, 96), (0, 8), (112, 112)),  # non-square: aspect kept, padded in Y
        ((160, 160), (0.625, 0.625), 1.25, (80, 80), (16, 16), (112, 112)),  # fine slices halved, padded
        ((112, 96), (1.3, 1.3), 1.0, (146, 125), (0, 0), (146, 125)),  # a larger field of view is kept whole
        ((40, 40), (1.0, 2.0), 1.0, (40, 80), (36, 16), (112, 112)),  # anisotropic pixels become square
        ((100, 40), (1.0, 1.0), 1.0, (100, 40), (6, 36), (112, 112)),
        ((40, 300), (1.0, 1.0), 1.0, (40, 300), (36, 0), (112, 300)),  # wider on one axis only
    ],
)
def test_spacing_grid_keeps_millimetres_per_pixel(xy, spacing, target, size, offset, plane):
    grid = slice_grid(xy, 112, "spacing", spacing, target)
    assert grid == SliceGrid(size, offset, plane)


def _disc(shape, spacing, radius_mm):
    x, y = (torch.arange(n) - (n - 1) / 2 for n in shape[:2])
    r2 = (x[:, None] * spacing[0]) ** 2 + (y[None, :] * spacing[1]) ** 2
    return (r2 <= radius_mm**2)[:, :, None].expand(-1, -1, shape[2]).to(torch.uint8)


@pytest.mark.parametrize(
    ("shape", "spacing", "target"), [((56, 48, 3), (1.3, 1.3), 1.1), ((60, 60, 2), (0.625, 0.625), 1.4)]
)
def test_spacing_round_trip_gives_the_input_grid_back(shape, spacing, target):
    """A label through labels_to_input and restore_geometry with the same grid: the input's exact shape, the
    mask within a voxel of itself, and a disc stays round in mm (one in-plane scale on both axes)."""
    label = _disc(shape, spacing, 18.0)
    grid = slice_grid(shape[:2], 56, "spacing", spacing, target)
    model = labels_to_input(label, 56, grid=grid)[:, 0]
    rows, cols = model[0].any(dim=1).sum(), model[0].any(dim=0).sum()
    assert abs(int(rows) - int(cols)) <= 1  # round in the model input too, though the slice is not square
    restored = restore_geometry(model, tuple(label.shape), grid) > 0.5
    assert restored.shape == label.shape
    changed = (restored != label.bool()).sum() / label.sum()
    assert changed < 0.06


def test_a_wide_field_of_view_is_kept_whole_and_a_window_is_one_part_of_it():
    """40 px at 1 mm with a 28 px input: the plane holds all 40 px (nothing is cut away); a window of it is
    the input at that place, and only its own part comes back from restore_geometry."""
    label = torch.zeros(40, 40, 2, dtype=torch.uint8)
    label[1:4, 30:35] = 1  # beyond a centred 28 px crop (6 px a side)
    grid = slice_grid((40, 40), 28, "spacing", (1.0, 1.0), 1.0)
    assert grid.plane == (40, 40)
    whole = labels_to_input(label, 28, grid=grid)[:, 0]
    assert torch.equal(restore_geometry(whole, (40, 40, 2), grid), label.float())
    window = grid.window((0, 12), 28)
    assert window == SliceGrid((40, 40), (0, -12), (28, 28))
    assert torch.equal(labels_to_input(label, 28, grid=window)[:, 0], whole[:, :28, 12:])
    assert torch.equal(
        slices_to_input(label.float(), 28, grid=window),
        slices_to_input(label.float(), 28, grid=grid)[..., :28, 12:],
    )
    with pytest.raises(ValueError, match="leaves the"):
        grid.window((13, 0), 28)


@pytest.mark.parametrize(("mode", "target"), [("square", 1.0), ("spacing", 0.0), ("spacing", float("nan"))])
def test_bad_in_plane_settings_are_refused(mode, target):
    with pytest.raises(DataError):
        slice_grid((8, 8), 28, mode, (1.0, 1.0), target)


def test_spacing_mode_needs_the_spacing():
    with pytest.raises(DataError, match="spacing"):
        slice_grid((8, 8), 28, "spacing", None, 1.0)
