"""Synthetic LGE phantoms: a readable LAScarQS tree, reproducible to the byte, not solvable by intensity."""

import dataclasses
import time

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage
from scipy.stats import spearmanr

from la_seg.data import DataError, find_cases, read_case, synthetic, write_dataset
from la_seg.data.synthetic import case_la_fraction, synthesize_case

SMALL = (64, 64, 16)


def _files(folders):
    return {f"{f.name}/{p.name}": p.read_bytes() for f in folders for p in sorted(f.iterdir())}


def test_default_case_looks_like_lge():
    start = time.perf_counter()
    image, label = synthesize_case(np.random.default_rng(0))
    assert time.perf_counter() - start < 5.0  # well under a second unloaded; generous for shared CI
    assert image.shape == label.shape == (240, 240, 60)
    assert image.dtype == np.int16 and label.dtype == np.uint16
    assert set(np.unique(label)) == {0, 420}
    la = label > 0
    assert 0.005 < la.mean() < 0.06
    assert image.min() >= 0  # magnitude image
    # Other chambers are as bright as the LA blood pool ...
    blood = np.median(image[la])
    bright_elsewhere = (image > 0.7 * blood) & ~la
    assert bright_elsewhere.sum() > 2 * la.sum()
    assert 0.8 < np.median(image[bright_elsewhere]) / blood < 1.25
    # ... so no intensity threshold segments the LA well.
    best = max(
        2 * (la & (image > t)).sum() / (la.sum() + (image > t).sum())
        for t in np.percentile(image, np.arange(50, 100, 0.5))
    )
    assert best < 0.5
    # The LA only occupies some slices, as in a real scan.
    assert 0 < la.any(axis=(0, 1)).sum() < label.shape[2]


def test_write_dataset_is_a_readable_lascarqs_tree(tmp_path):
    folders = write_dataset(tmp_path / "demo", cases=3, seed=1, shape=SMALL)
    assert folders == [tmp_path / "demo" / f"train_{i}" for i in (1, 2, 3)]
    cases = find_cases(tmp_path / "demo", require_labels=True)
    assert [c.case_id for c in cases] == ["train_1", "train_2", "train_3"]
    for case in cases:
        raw = nib.load(case.label_path)
        assert raw.get_data_dtype() == np.uint16
        assert set(np.unique(np.asanyarray(raw.dataobj))) == {0, 420}
        assert nib.load(case.image_path).get_data_dtype() == np.int16
        image, label = read_case(case)
        assert image.data.shape == image.geometry.shape == SMALL
        assert image.geometry.spacing == pytest.approx((0.625, 0.625, 2.5))
        np.testing.assert_allclose(np.diag(image.geometry.affine), [0.625, 0.625, 2.5, 1.0])
        origin = -(np.array(SMALL) - 1) / 2 * [0.625, 0.625, 2.5]
        np.testing.assert_allclose(image.geometry.affine[:3, 3], origin)
        assert 0.002 < label.data.mean() < 0.1


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    first = _files(write_dataset(tmp_path / "a", cases=2, seed=7, shape=SMALL))
    again = _files(write_dataset(tmp_path / "b", cases=2, seed=7, shape=SMALL))
    other = _files(write_dataset(tmp_path / "c", cases=2, seed=8, shape=SMALL))
    assert first == again
    assert first.keys() == other.keys()
    assert all(first[name] != other[name] for name in first)


def test_case_depends_on_seed_and_index_only(tmp_path):
    two = _files(write_dataset(tmp_path / "a", cases=2, seed=3, shape=SMALL))
    three = _files(write_dataset(tmp_path / "b", cases=3, seed=3, shape=SMALL))
    assert {k: v for k, v in three.items() if not k.startswith("train_3/")} == two
    later = _files(write_dataset(tmp_path / "c", cases=2, seed=3, shape=SMALL, first=2))  # without case 1
    assert later == {k: v for k, v in three.items() if not k.startswith("train_1/")}
    with pytest.raises(DataError, match="first synthetic case's number must be at least 1, got 0"):
        write_dataset(tmp_path / "d", cases=1, seed=3, shape=SMALL, first=0)
    assert not (tmp_path / "d").exists()


def test_la_pose_and_size_vary():
    centres, sizes = [], []
    for i in range(6):
        _, label = synthesize_case(np.random.default_rng([5, i]), shape=SMALL)
        la = np.argwhere(label > 0)
        centres.append(la.mean(axis=0))
        sizes.append(len(la))
    centres = np.array(centres)
    assert centres[:, :2].std(axis=0).max() > 2.0  # voxels in-plane: the LA is not always in the same place
    assert np.ptp(sizes) / np.mean(sizes) > 0.15


def test_write_dataset_refuses_to_overwrite(tmp_path):
    (tmp_path / "train_1").mkdir()  # an empty case folder is fine
    write_dataset(tmp_path, cases=1, seed=0, shape=SMALL)
    before = (tmp_path / "train_1" / "enhanced.nii.gz").read_bytes()
    with pytest.raises(DataError, match="train_1"):
        write_dataset(tmp_path, cases=2, seed=1, shape=SMALL)
    assert (tmp_path / "train_1" / "enhanced.nii.gz").read_bytes() == before
    assert not (tmp_path / "train_2").exists()  # nothing written when refused


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"cases": 0}, "at least 1"), ({"shape": (8, 8)}, "shape"), ({"spacing": (1.0, 0.0, 1.0)}, "spacing")],
)
def test_write_dataset_bad_arguments(tmp_path, kwargs, message):
    args = {"cases": 1, "seed": 0, "shape": SMALL} | kwargs
    with pytest.raises(DataError, match=message):
        write_dataset(tmp_path, **args)


@pytest.mark.parametrize("seed", range(3))
def test_shapes_evaluated_in_boxes_equal_the_whole_grid(monkeypatch, seed):
    """Shapes are evaluated only in a box around them (for speed); the phantom is the one the whole grid
    gives, so the margin covers every wall and septum the distances are compared with."""
    shape, spacing = (48, 44, 12), (2.2, 2.2, 8.0)  # a tight field of view: the boxes cut the most
    image, label = synthesize_case(np.random.default_rng(seed), shape, spacing)
    monkeypatch.setattr(synthetic, "_MARGIN_MM", 1e4)  # every box is the whole grid
    image_full, label_full = synthesize_case(np.random.default_rng(seed), shape, spacing)
    np.testing.assert_array_equal(label, label_full)
    np.testing.assert_array_equal(image, image_full)


def test_partial_volume_labels_follow_the_half_voxel_rule():
    """A voxel is LA when at least half of it is: the label is the centre-sampled one, up to the boundary, and
    the image averages blood and wall across thick slices (values between the two)."""
    grid = dict(shape=(40, 36, 10), spacing=(2.5, 2.5, 8.0))
    image, label = synthesize_case(np.random.default_rng(3), **grid, partial_volume=True)
    sampled_image, sampled = synthesize_case(np.random.default_rng(3), **grid)
    assert image.shape == label.shape == grid["shape"] and set(np.unique(label)) == {0, 420}
    la, la_centre = label > 0, sampled > 0
    assert (
        abs(int(la.sum()) - int(la_centre.sum())) < 0.15 * la_centre.sum()
    )  # same LA, boundary voxels differ
    assert (la != la_centre).sum() < 0.4 * la_centre.sum()
    assert not np.array_equal(image, sampled_image)


def test_la_fraction_is_the_share_behind_the_written_label(tmp_path):
    """case_la_fraction gives, for the case write_dataset wrote, each voxel's LA share: the label on disk is
    where it is at least half, and a thick-slice grid leaves voxels partly LA."""
    grid = dict(shape=(40, 36, 10), spacing=(2.5, 2.5, 8.0))
    (folder,) = write_dataset(tmp_path, cases=2, seed=4, **grid, partial_volume=True)[1:]
    share = case_la_fraction(4, 2, **grid)
    label = np.asanyarray(nib.load(folder / "atriumSegImgMO.nii.gz").dataobj)
    np.testing.assert_array_equal(share >= 0.5, label > 0)
    assert share.dtype == np.float32 and 0.0 <= share.min() and share.max() == 1.0
    assert ((share > 0) & (share < 1)).sum() > 0.2 * (label > 0).sum()


def test_anatomy_in_mm_keeps_the_heart_size_across_geometries():
    """With anatomy_fov_mm the LA has the same size in mL on every grid; without, it grows with the FOV."""

    def volume(shape, spacing, **kwargs):
        _, label = synthesize_case(np.random.default_rng(5), shape, spacing, **kwargs)
        return (label > 0).sum() * np.prod(spacing) / 1000

    fine, coarse = ((64, 64, 16), (1.6, 1.6, 6.25)), ((56, 48, 16), (2.6, 2.6, 8.0))
    same = [volume(*g, anatomy_fov_mm=100.0) for g in (fine, coarse)]
    assert same[1] == pytest.approx(same[0], rel=0.15)
    grown = [volume(*g) for g in (fine, coarse)]
    assert grown[1] > 1.5 * grown[0]


def test_prefix_names_the_case_folders(tmp_path):
    folders = write_dataset(tmp_path, cases=1, seed=0, shape=SMALL, prefix="C_")
    assert [f.name for f in folders] == ["C_1"]


def test_scar_patches_replace_the_wall_enhancement_and_keep_the_label():
    """`scar` changes the wall only: same LA label; 0 leaves no enhanced wall; each case has its own share."""
    plain_image, plain_label = synthesize_case(np.random.default_rng([4, 1]), shape=SMALL)
    clean_image, clean_label = synthesize_case(np.random.default_rng([4, 1]), shape=SMALL, scar=0.0)
    np.testing.assert_array_equal(plain_label, clean_label)
    assert clean_image.max() < plain_image.max()  # no wall brighter than blood
    shares = [synthetic.case_scar_fraction(4, i, SMALL, (0.625, 0.625, 2.5), scar=0.2) for i in (1, 2, 3)]
    assert all(0.1 <= share <= 0.3 for share in shares) and len(set(shares)) == 3
    assert synthetic.case_scar_fraction(4, 1, SMALL, (0.625, 0.625, 2.5), scar=0.0) == 0.0
    with pytest.raises(DataError, match="scar"):
        synthesize_case(np.random.default_rng(0), shape=SMALL, scar=1.5)


# The per-case factors of the training family and the held-out setting (synthetic.VARIED, synthetic.HELDOUT)
FACTORS = ("enhanced", "tissue", "fat", "fat_mm", "pools", "la_wall_mm", "septum_mm", "pull_mm", "warp_mm")
C_GRID = dict(shape=(112, 96, 24), spacing=(1.3, 1.3, 4.0), anatomy_fov_mm=100.0)


def test_varied_draws_every_factor_per_case_within_its_range():
    physics = [synthetic.case_physics(0, i, "varied") for i in range(1, 13)]
    family = synthetic.VARIED

    def check(values, low, high):
        assert all(low <= v <= high for v in values)
        assert np.ptp(values) > 0.4 * (high - low)  # drawn, not fixed: 12 draws spread over the range

    for name in FACTORS:
        check([getattr(p, name) for p in physics], *getattr(family, name))
    check([p.blood_to_myocardium for p in physics], *family.blood_to_myocardium)
    check([p.grid_angle_deg for p in physics], *family.grid_angle_deg)
    check([p.pool_walls_mm[0] for p in physics], *family.lv_wall_mm)
    for k in range(1, 5):
        check([p.pool_walls_mm[k] for p in physics], *family.pool_wall_mm)
    assert all(p.enhanced > 1.0 for p in physics)  # the wall brighter than blood
    assert {p.veins for p in physics} == set(family.veins)  # each arrangement among 12 cases


def test_the_image_follows_each_case_physics():
    """Blood over myocardium, measured on the image (LA median over the median of the walls' inner voxels),
    follows the drawn contrast case by case, down to the low-contrast end (Rician noise and blur lift dark
    walls, so high contrasts read somewhat lower); the other pools are as bright as the LA."""
    drawn, measured, pools = [], [], []
    for i in range(1, 7):
        image, _ = synthesize_case(synthetic._case_rng(2, i), style="varied", **C_GRID)
        structures = synthetic.case_structures(2, i, style="varied", **C_GRID)
        blood = np.median(image[structures == synthetic.LA_CODE])
        drawn.append(synthetic.case_physics(2, i, "varied").blood_to_myocardium)
        inner = ndimage.binary_erosion(structures == synthetic.OTHER_WALL_CODE)
        measured.append(blood / np.median(image[inner]))
        pools.append(np.median(image[structures >= synthetic.POOL_CODE]) / blood)
    assert all(0.6 * d < m < 1.2 * d for d, m in zip(drawn, measured, strict=True))
    assert spearmanr(drawn, measured)[0] > 0.7
    assert min(measured) < 2.5 and max(measured) > 4.0
    assert all(0.8 < p < 1.25 for p in pools)


def test_heldout_setting_lies_outside_the_training_family():
    """The held-out setting has a vein arrangement no training case has, and neighbours, warp and noise
    beyond every training case's; contrast at the training family's low end."""
    varied, heldout = synthetic.VARIED, synthetic.HELDOUT
    assert heldout.pull_mm[0] >= varied.pull_mm[1] and heldout.warp_mm[0] >= varied.warp_mm[1]
    assert heldout.noise[0] >= varied.noise[1]
    physics = [synthetic.case_physics(1, i, "heldout") for i in range(1, 9)]
    assert all(p.veins == "left_trunk_right_middle" for p in physics)
    assert "left_trunk_right_middle" not in varied.veins
    assert set(varied.veins) < set(synthetic.VEIN_ARRANGEMENTS)
    assert all(p.pull_mm > varied.pull_mm[1] and p.warp_mm > varied.warp_mm[1] for p in physics)
    assert all(1.2 <= p.blood_to_myocardium <= 1.6 for p in physics)
    # the same case's anatomy with the other vein arrangement: another LA
    _, four = synthesize_case(synthetic._case_rng(1, 1), style="varied", **C_GRID)
    _, other = synthesize_case(synthetic._case_rng(1, 1), style="heldout", **C_GRID)
    assert (four != other).sum() > 0.1 * (four > 0).sum()


def test_a_family_with_one_factor_swapped_changes_only_that_factor():
    """A Family is a style (benchmarks/heldout_factors.py): the held-out setting with the training family's
    pull drawn instead keeps every other factor of each case, and a style's own Family draws as its name."""
    swapped = dataclasses.replace(synthetic.HELDOUT, pull_mm=synthetic.VARIED.pull_mm)
    for i in range(1, 5):
        heldout, variant = synthetic.case_physics(1, i, "heldout"), synthetic.case_physics(1, i, swapped)
        assert variant.pull_mm <= synthetic.VARIED.pull_mm[1] < heldout.pull_mm
        assert dataclasses.replace(variant, pull_mm=heldout.pull_mm) == heldout
        assert synthetic.case_physics(1, i, synthetic.VARIED) == synthetic.case_physics(1, i, "varied")


def test_classic_draws_nothing_and_an_unknown_style_is_named():
    assert synthetic.case_physics(0, 1, "classic") is synthetic.CLASSIC
    with pytest.raises(DataError, match="style must be one of.*'modern'"):
        write_dataset("/nonexistent", cases=1, seed=0, shape=SMALL, style="modern")


def test_varied_same_seed_same_bytes_and_rotated_grid_in_the_affine(tmp_path):
    first = write_dataset(tmp_path / "a", cases=2, seed=3, shape=SMALL, style="varied")
    again = write_dataset(tmp_path / "b", cases=2, seed=3, shape=SMALL, style="varied")
    assert _files(first) == _files(again)
    for i, case in enumerate(find_cases(tmp_path / "a", require_labels=True), start=1):
        image, label = read_case(case)
        angle = synthetic.case_physics(3, i, "varied").grid_angle_deg
        affine = image.geometry.affine
        np.testing.assert_allclose(np.degrees(np.arctan2(affine[1, 0], affine[0, 0])), angle, atol=1e-6)
        assert image.geometry.spacing == pytest.approx((0.625, 0.625, 2.5))
        np.testing.assert_allclose(label.geometry.affine, affine)


def test_labels_stay_whole_and_world_consistent(monkeypatch):
    """The LA label is one piece off the grid's border in every style, and a case's LA lies at the same place
    in world mm whatever the grid's in-plane rotation (the affine carries it)."""
    for style in ("varied", "heldout"):
        for i in (1, 2):
            _, label = synthesize_case(synthetic._case_rng(4, i), style=style, partial_volume=True, **C_GRID)
            pieces, count = ndimage.label(label > 0, structure=np.ones((3, 3, 3)))
            assert count >= 1 and np.bincount(pieces.ravel())[1:].max() >= 0.99 * (label > 0).sum()
            assert not label[[0, -1]].any() and not label[:, [0, -1]].any()

    def world(angle: float) -> tuple[np.ndarray, np.ndarray]:
        """Case 1's LA label and centroid in world mm, its grid rotated by `angle` degrees."""
        draw = synthetic.draw_physics
        monkeypatch.setattr(
            synthetic,
            "draw_physics",
            lambda rng, style: dataclasses.replace(draw(rng, style), grid_angle_deg=angle),
        )
        _, label = synthesize_case(synthetic._case_rng(4, 1), style="varied", **C_GRID)
        monkeypatch.setattr(synthetic, "draw_physics", draw)
        voxels = np.argwhere(label > 0)
        affine = synthetic.grid_affine(C_GRID["shape"], C_GRID["spacing"], angle)
        return label > 0, nib.affines.apply_affine(affine, voxels).mean(axis=0)

    (rotated, rotated_centre), (straight, straight_centre) = world(12.0), world(0.0)
    assert (rotated != straight).sum() > 0.2 * straight.sum()  # the grid turned under the anatomy ...
    np.testing.assert_allclose(rotated_centre, straight_centre, atol=1.3)  # ... which stays put in world mm
    assert rotated.sum() == pytest.approx(straight.sum(), rel=0.05)


def test_synth_command_takes_the_style(tmp_path, capsys):
    from la_seg.cli import main

    main(
        [
            "synth",
            "--out",
            str(tmp_path / "d"),
            "--cases",
            "1",
            "--shape",
            "[48, 48, 8]",
            "--style",
            "heldout",
        ]
    )
    written = nib.load(tmp_path / "d" / "train_1" / "enhanced.nii.gz").affine
    angle = synthetic.case_physics(0, 1, "heldout").grid_angle_deg
    np.testing.assert_allclose(np.degrees(np.arctan2(written[1, 0], written[0, 0])), angle, atol=1e-6)
    with pytest.raises(SystemExit) as exit_info:
        main(["synth", "--out", str(tmp_path / "e"), "--style", "modern"])
    assert exit_info.value.code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("la-seg: error: ") and "style" in line and "heldout" in line
