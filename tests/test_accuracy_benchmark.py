"""benchmarks/accuracy.py's figures from a test report: per geometry, the issue's bar, the review flags."""

import argparse
import dataclasses
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from la_seg.data import synthetic
from la_seg.data.synthetic import case_la_fraction


@pytest.fixture(scope="module")
def accuracy(load_benchmark):
    return load_benchmark("accuracy")


def _case(case_id, dice, pred, ref=10.0, pairwise=None, review=False):
    case = {"case_id": case_id, "dice": dice, "hd95_mm": 2.0, "volume_pred_ml": pred, "volume_ref_ml": ref}
    if pairwise is not None:
        case["agreement"] = {"mean_pairwise_dice": pairwise, "review": review}
    return case


def test_figures_per_geometry_and_the_bar(accuracy):
    cases = [_case("A_1", 0.95, 10.0), _case("A_2", 0.93, 10.2), _case("B_1", 0.94, 9.9)]
    cases += [_case("C_1", 0.90, 9.0), _case("C_2", 0.94, 10.1)]
    result = accuracy.score({"cases": cases, "header": {"inference": {"threshold": 0.5}}})
    c = result["per_geometry"]["C"]
    assert c["n"] == 2 and c["dice_mean"] == pytest.approx(0.92)
    assert c["volume_error_pct_worst"] == pytest.approx(-10.0) and c["volume_error_worst_case"] == "C_1"
    assert c["beyond_5pct"] == 1 and c["within_5pct_fraction"] == 0.5 and c["beyond_15pct"] == 0
    done = result["done_when"]
    assert done["fraction_within_5pct"] == pytest.approx(0.8)
    assert not done["every_geometry_dice_within_0.01_of_best"]  # C: 0.92 < 0.94 - 0.01
    assert not done["at_least_90pct_within_5pct"] and done["beyond_15pct"] == 0
    assert done["dice_targets_met"] == {"A": False, "B": False, "C": False}  # 0.94 < 0.96, 0.92 < 0.93
    far = accuracy.score({"cases": [*cases, _case("C_3", 0.97, 11.7)], "header": {}})
    assert far["done_when"]["beyond_15pct"] == 1 and far["per_geometry"]["C"]["beyond_15pct"] == 1
    assert far["per_geometry"]["C"]["volume_error_pct_worst"] == pytest.approx(17.0)


def test_review_flags_are_scored_against_the_worst_cases(accuracy):
    plain = accuracy.score(
        {"cases": [_case("A_1", 0.95, 10.0), _case("B_1", 0.70, 7.0), _case("C_1", 0.90, 10.0)], "header": {}}
    )
    flips = {
        "cases": [
            _case("A_1", 0.95, 10.0, pairwise=0.98),
            _case("B_1", 0.70, 7.0, pairwise=0.80, review=True),
            _case("C_1", 0.90, 10.0, pairwise=0.95),
        ],
        "header": {"inference": {"review_below": 0.9}},
    }
    review = accuracy.review_figures(flips, plain, None)
    assert review["flagged"] == ["B_1"] and review["flagged_among_worst_by_dice"] == 1
    assert review["beyond_5pct_volume"] == ["B_1"] and review["beyond_5pct_flagged"] == 1
    assert review["review_below"] == 0.9
    assert review["agreement_by_case"] == {"A_1": 0.98, "B_1": 0.80, "C_1": 0.95}
    assert "nothing to draw" in review["threshold_stability"]["note"]  # no calibration record


def test_threshold_stability_draws_validation_sized_sets_as_calibration_sets_its_level(accuracy):
    """Levels set from 6 of 200 evenly spread agreements at quantile 0.1 (halfway between the lowest two
    drawn) flag on average 3/14 of the others, as order statistics say; a case beyond +-15 % that agrees far
    below every other is flagged whenever it is judged, and one that agrees as well as any is never."""
    agreement = {f"A_{i}": 0.9 + i * 0.0005 for i in range(200)}
    how = {"validation_cases": [f"v{i}" for i in range(6)], "review_quantile": 0.1}
    stability = accuracy.threshold_stability(agreement, [], {"how": how}, 0.9)
    assert stability["flagged_share_mean"] == pytest.approx(3 / 14, abs=0.01)
    assert stability["drawn_below_review_below"] == 0.0  # no drawn level is below the lowest agreement
    assert accuracy.threshold_stability(agreement, [], {"how": how}, 1.0)["drawn_below_review_below"] == 1.0
    assert stability["quantile_from"] == "the calibration record" and stability["validation_cases"] == 6
    low, median, high = stability["review_below_percentiles"].values()
    assert 0.9 <= low < median < high <= 0.9 + 199 * 0.0005
    assert stability["draws_with_one_unflagged"] is None  # no case beyond +-15 %
    far_below = accuracy.threshold_stability({**agreement, "B_1": 0.5}, ["B_1"], {"how": how}, None)
    assert far_below["draws_with_one_unflagged"] == 0.0 and far_below["unflagged_share_mean"] == 0.0
    as_good = accuracy.threshold_stability({**agreement, "B_1": 0.999}, ["B_1"], {"how": how}, None)
    assert as_good["draws_with_one_unflagged"] == 1.0
    older = {"how": {"validation_cases": how["validation_cases"]}}  # a record before review_quantile
    older = accuracy.threshold_stability(agreement, [], older, None)
    assert older["quantile_from"] == "the default" and older["quantile"] == 0.1


def test_partial_volume_figures_split_errors_by_la_share(accuracy, tmp_path):
    """Masks that call LA every voxel at least 0.3 (case 2: 0.4) LA: only voxels of LA share [0.25, 0.5) are
    wrong, so that band's error rate is their share of it, the others' 0, and the Dice is the masks'."""
    dice, rate, band_voxels, band_wrong, excess, cut = {}, {}, {}, {}, {}, {}
    for prefix, (shape, spacing) in accuracy.GEOMETRIES.items():
        scores = []
        for case in (1, 2):  # case 2 over-segmented less: the Dice is per case, the rates over both
            share = case_la_fraction(accuracy.HELDOUT_SEED, case, shape, spacing, accuracy.ANATOMY_FOV_MM)
            called, reference = share >= (0.3 if case == 1 else 0.4), share >= 0.5
            mask = nib.Nifti1Image(called.astype(np.uint8), np.eye(4))
            nib.save(mask, tmp_path / f"{prefix}_{case}.nii.gz")
            scores.append(2 * (called & reference).sum() / (called.sum() + reference.sum()))
            excess.setdefault(prefix, []).append(100 * (called.sum() - reference.sum()) / reference.sum())
            cut.setdefault(prefix, []).append(share[called & (share < 1)].min())
            band = (share >= 0.25) & (share < 0.5)
            band_voxels[prefix] = band_voxels.get(prefix, 0) + band.sum()
            band_wrong[prefix] = band_wrong.get(prefix, 0) + (band & called).sum()
        dice[prefix], rate[prefix] = np.mean(scores), band_wrong[prefix] / band_voxels[prefix]
    figures = accuracy.share_figures(tmp_path, argparse.Namespace(heldout=2, heart_scale=1.0), "classic")
    assert figures["best"] == max("ABC", key=lambda g: dice[g])
    for g, f in figures["per_geometry"].items():
        # no whole voxel is wrong anywhere: judged at the best geometry's rates on every voxel is judged at
        # its partly-LA rates
        assert f["dice_grid_limit"] == pytest.approx(f["dice_at_best_rates"])
        rates = f["error_rate_by_la_share"]
        assert rates["[0.25, 0.5)"] == pytest.approx(rate[g]) and rates["[0.25, 0.5)"] > 0
        assert rates["[0.0, 0.25)"] == rates["[0.5, 0.75)"] == rates["[0.75, 1.0)"] == 0.0
        assert f["errors_pct_of_la"]["whole_voxels"] == 0.0
        assert f["dice"] == pytest.approx(dice[g])
        # no whole voxel is wrong: the partly-LA voxels make the whole volume error, cut where the masks cut
        assert f["partly_la_volume_error_pct"]["mean"] == pytest.approx(np.mean(excess[g]))
        assert np.mean(excess[g]) > 0
        assert f["effective_la_share_cut"]["mean"] == pytest.approx(np.mean(cut[g]))
        assert 0.3 <= f["effective_la_share_cut"]["mean"] < 0.5
    c = figures["per_geometry"]["C"]  # 4 mm slices leave the most voxels partly LA
    assert c["partly_la_voxels_per_la_voxel"] > figures["per_geometry"]["B"]["partly_la_voxels_per_la_voxel"]


def test_grid_limit_judges_whole_voxels_at_the_best_geometrys_rates(accuracy, tmp_path):
    """Masks with the same whole-voxel false positives (a slab of tissue, 10 % of the LA) on every geometry
    and the partly-LA voxels right: each geometry's Dice at the best geometry's rates on every voxel is the
    best's Dice wherever the grid's share is the same, and below 1 (the slab counts)."""
    for prefix, (shape, spacing) in accuracy.GEOMETRIES.items():
        share = case_la_fraction(accuracy.HELDOUT_SEED, 1, shape, spacing, accuracy.ANATOMY_FOV_MM)
        called = share >= 0.5
        outside = np.argwhere(share == 0)
        extra = outside[: int(0.1 * called.sum())]
        called[tuple(extra.T)] = True
        nib.save(nib.Nifti1Image(called.astype(np.uint8), np.eye(4)), tmp_path / f"{prefix}_1.nii.gz")
    figures = accuracy.share_figures(tmp_path, argparse.Namespace(heldout=1, heart_scale=1.0), "classic")
    for f in figures["per_geometry"].values():
        assert f["errors_pct_of_la"]["whole_voxels"] == pytest.approx(10.0, abs=0.1)
        assert f["dice_grid_limit"] == pytest.approx(f["dice"], abs=1e-3) and f["dice"] < 0.96


def test_facing_slice_axis_counts_the_roof_and_floor_a_through_plane_stage_could_recover(accuracy, tmp_path):
    """Masks that get every partly-LA voxel wrong (and the rest right): every facing voxel is an error, the
    Dice if they were all right lies between the masks' and 1, and 4 mm slices leave the most such voxels;
    a perfect mask has none wrong."""
    for prefix, (shape, spacing) in accuracy.GEOMETRIES.items():
        share = case_la_fraction(accuracy.HELDOUT_SEED, 1, shape, spacing, accuracy.ANATOMY_FOV_MM)
        partly = (share > 0) & (share < 1)
        nib.save(
            nib.Nifti1Image(((share >= 0.5) ^ partly).astype(np.uint8), np.eye(4)),
            tmp_path / f"{prefix}_1.nii.gz",
        )
        nib.save(nib.Nifti1Image((share >= 0.5).astype(np.uint8), np.eye(4)), tmp_path / f"{prefix}_2.nii.gz")
    args = argparse.Namespace(heldout=1, heart_scale=1.0)
    figures = accuracy.share_figures(tmp_path, args, "classic")["per_geometry"]
    for f in figures.values():
        facing = f["facing_slice_axis"]
        assert facing["error_rate"] == 1.0 and facing["voxels_per_la_voxel"] > 0
        assert facing["errors_pct_of_la"] == pytest.approx(100 * facing["voxels_per_la_voxel"])
        assert f["dice"] < facing["dice_if_all_right"] < 1.0
    assert figures["C"]["facing_slice_axis"]["voxels_per_la_voxel"] > max(
        figures[g]["facing_slice_axis"]["voxels_per_la_voxel"] for g in "AB"
    )
    for prefix in accuracy.GEOMETRIES:
        (tmp_path / f"{prefix}_2.nii.gz").rename(tmp_path / f"{prefix}_1.nii.gz")
    for f in accuracy.share_figures(tmp_path, args, "classic")["per_geometry"].values():
        assert (
            f["facing_slice_axis"]["error_rate"] == 0.0 and f["facing_slice_axis"]["dice_if_all_right"] == 1.0
        )


def test_shares_are_re_derived_from_a_runs_saved_masks(accuracy, tmp_path, monkeypatch):
    """`--shares`: a result file written before a partly-LA figure existed gets every family's figures again
    from the masks its run saved, the same as a new run's, and keeps the rest; the phantoms' shares it
    regenerated stay in the run's work dir, so that a second rewrite regenerates nothing."""
    families = {}
    for family, (folder, style) in accuracy.FAMILIES.items():
        masks = tmp_path / f"{folder}_masks"
        masks.mkdir()
        for prefix, (shape, spacing) in accuracy.GEOMETRIES.items():
            share = case_la_fraction(accuracy.HELDOUT_SEED, 1, shape, spacing, accuracy.ANATOMY_FOV_MM, style)
            nib.save(
                nib.Nifti1Image((share >= 0.3).astype(np.uint8), np.eye(4)), masks / f"{prefix}_1.nii.gz"
            )
        families[family] = {"style": style, "partial_volume": {"masks": str(masks)}, "overall": "kept"}
    result_file = tmp_path / "result.json"
    reports = tmp_path / "work" / "runs" / "x" / "version_0"
    document = {"families": families, "settings": {"heldout_per_geometry": 1}, "reports": str(reports)}
    result_file.write_text(json.dumps(document))
    accuracy.reshare(result_file)
    first = json.loads(result_file.read_text())
    kept = sorted(p.relative_to(tmp_path / "work") for p in (tmp_path / "work").rglob("*.npz"))
    styles = [style for _, style in accuracy.FAMILIES.values()]
    names = [Path("truth", style, f"share_{g}_1_1.npz") for style in styles for g in accuracy.GEOMETRIES]
    assert kept == sorted(names)
    monkeypatch.setattr(accuracy, "case_la_fraction", None)  # a second rewrite that regenerated would fail
    accuracy.reshare(result_file)
    assert json.loads(result_file.read_text()) == first
    monkeypatch.undo()
    result = json.loads(result_file.read_text())
    args = argparse.Namespace(heldout=1, heart_scale=1.0)
    for family, figures in result["families"].items():
        masks = Path(families[family]["partial_volume"]["masks"])
        assert figures["partial_volume"] == accuracy.share_figures(masks, args, figures["style"])
        assert "facing_slice_axis" in figures["partial_volume"]["per_geometry"]["C"]
        assert figures["overall"] == "kept"
    shutil.rmtree(tmp_path / "test-varied_masks")
    with pytest.raises(SystemExit, match="masks its run saved are gone"):
        accuracy.reshare(result_file)


def test_phantom_truth_is_the_generators_and_is_drawn_again_when_it_changed(accuracy, tmp_path, monkeypatch):
    """A kept share or structures array is the generator's, per style and heart size; it is drawn again when
    the generator (its source, numpy, scipy) is not the one that wrote it, or when its file was cut short."""
    truth = accuracy.PhantomTruth.of(tmp_path)
    for style in ("varied", "heldout"):
        for scale in (1.0, 1.5):
            drawn = (accuracy.HELDOUT_SEED, 2, *accuracy.phantom_grid("C", scale), style)
            share, structures = truth.share("C_2", style, scale), truth.structures("C_2", style, scale)
            assert np.array_equal(share, case_la_fraction(*drawn)) and share.dtype == np.float32
            assert np.array_equal(structures, synthetic.case_structures(*drawn))
    assert len(list(tmp_path.rglob("*.npz"))) == 8
    calls = []

    def counted(*drawn):
        calls.append(drawn)
        return case_la_fraction(*drawn)

    monkeypatch.setattr(accuracy, "case_la_fraction", counted)
    before = truth.share("C_2", "heldout", 1.0)
    assert calls == []
    monkeypatch.setattr(accuracy, "generator_key", lambda drawn: "another generator")
    assert np.array_equal(truth.share("C_2", "heldout", 1.0), before) and len(calls) == 1
    assert truth.share("C_2", "heldout", 1.0) is not None and len(calls) == 1  # the new key was kept
    kept = tmp_path / "truth" / "heldout" / "share_C_2_1.npz"
    kept.write_bytes(kept.read_bytes()[:100])
    assert np.array_equal(truth.share("C_2", "heldout", 1.0), before) and len(calls) == 2
    assert not list(tmp_path.rglob("*la-seg-tmp"))  # written whole or not at all
    assert np.array_equal(accuracy.PhantomTruth().share("C_2", "heldout", 1.0), before)  # none kept
    assert len(list(tmp_path.rglob("*.npz"))) == 8


def _heart_c(accuracy, style, index):
    """A held-out heart on geometry C: its reference LA (at least half LA) and its structures."""
    geometry = (*accuracy.GEOMETRIES["C"], accuracy.ANATOMY_FOV_MM, style)
    share = case_la_fraction(accuracy.HELDOUT_SEED, index, *geometry)
    return share >= 0.5, synthetic.case_structures(accuracy.HELDOUT_SEED, index, *geometry)


def test_cases_beyond_15pct_name_the_neighbour_kept_as_la(accuracy, tmp_path):
    """A mask holding the LA and the right atrium: the case's volume error is beyond +-15 % and its cause
    is the RA called LA; a case within +-15 % is not listed."""
    style, index = "varied", 2
    reference, structures = _heart_c(accuracy, style, index)
    ra = structures == synthetic.POOL_CODE + synthetic.POOL_NAMES.index("RA")
    called = reference | ra
    nib.save(nib.Nifti1Image(called.astype(np.uint8), np.eye(4)), tmp_path / f"C_{index}.nii.gz")
    error = 100 * (called.sum() / reference.sum() - 1)
    assert error > 15
    cases = [
        {"case_id": f"C_{index}", "volume_error_pct": error},
        {"case_id": "C_1", "volume_error_pct": 4.0},
    ]
    found_all = accuracy.causes(tmp_path, cases[:1], style)
    ((found,), (neighbour,)) = found_all["beyond_15pct"], found_all["neighbour_called_la"]
    assert neighbour["neighbours_pct_of_la"] == {"RA": pytest.approx(error, abs=0.1)}
    assert found["case_id"] == f"C_{index}" and found["cause"].startswith("RA called LA")
    assert found["wrong_pct_of_la"]["RA"] == pytest.approx(error, rel=0.01)
    assert found["wrong_pct_of_la"]["LA missed"] == 0.0


def test_a_too_large_volume_is_caused_by_what_was_called_la_even_beside_a_larger_miss(accuracy, tmp_path):
    """22 % of the LA missed, RA and the descending aorta (20 % each) called LA: +18 % in all. The cause is
    the largest structure called LA, not the larger miss, which does not make a volume too large."""
    style, index = "varied", 2
    reference, structures = _heart_c(accuracy, style, index)
    la = int(reference.sum())
    called = reference.copy()
    called[tuple(np.argwhere(reference)[: int(0.22 * la)].T)] = False
    for name in ("RA", "descending aorta"):
        code = synthetic.POOL_CODE + synthetic.POOL_NAMES.index(name)
        called[tuple(np.argwhere((structures == code) & ~reference)[: int(0.20 * la)].T)] = True
    nib.save(nib.Nifti1Image(called.astype(np.uint8), np.eye(4)), tmp_path / f"C_{index}.nii.gz")
    error = 100 * (called.sum() / la - 1)
    cases = [{"case_id": f"C_{index}", "volume_error_pct": error}]
    (found,) = accuracy.causes(tmp_path, cases, style)["beyond_15pct"]
    assert found["wrong_pct_of_la"]["LA missed"] > max(found["wrong_pct_of_la"]["RA"], 19.0)
    assert found["cause"].split(" called LA")[0] in ("RA", "descending aorta"), found["cause"]


def test_a_neighbour_kept_beside_a_missed_la_part_is_named_though_the_volume_is_right(accuracy, tmp_path):
    """A third of the LA missed and as much descending aorta called LA: the volume is right (not beyond
    +-15 %), the mask is not; the case is listed with the aorta. The LA alone, or with a sliver of a
    neighbour under NEIGHBOUR_LIMIT, is not."""
    style, index = "varied", 2
    reference, structures = _heart_c(accuracy, style, index)
    la = int(reference.sum())
    aorta = np.argwhere(structures == synthetic.POOL_CODE + synthetic.POOL_NAMES.index("descending aorta"))
    swapped = reference.copy()
    swapped[tuple(np.argwhere(reference)[: la // 3].T)] = False
    swapped[tuple(aorta[: la // 3].T)] = True
    sliver = reference.copy()
    sliver[tuple(aorta[: int(0.8 * accuracy.NEIGHBOUR_LIMIT / 100 * la)].T)] = True
    listed = {}
    for name, mask in (("swapped", swapped), ("sliver", sliver), ("la", reference)):
        folder = tmp_path / name
        folder.mkdir()
        nib.save(nib.Nifti1Image(mask.astype(np.uint8), np.eye(4)), folder / f"C_{index}.nii.gz")
        volume_error = 100 * (mask.sum() / la - 1)
        found = accuracy.causes(folder, [{"case_id": f"C_{index}", "volume_error_pct": volume_error}], style)
        assert found["beyond_15pct"] == []
        listed[name] = [c["neighbours_pct_of_la"] for c in found["neighbour_called_la"]]
    assert listed["swapped"] == [{"descending aorta": pytest.approx(100 / 3, abs=0.1)}]
    assert listed["sliver"] == [] and listed["la"] == []


def test_causes_are_re_derived_from_a_runs_saved_masks_unless_its_phantoms_changed(accuracy, tmp_path):
    """`--causes`: a result file's families get their causes again from the masks the run saved (the ones
    its figures name, not a later run's beside them); a family whose phantoms on disk the generator no
    longer draws keeps what it had (another heart's structures would name the wrong neighbours)."""
    work = tmp_path / "work"
    ckpt = work / "runs" / "x" / "version_0" / "checkpoints" / "best.ckpt"
    ckpt.parent.mkdir(parents=True)
    ckpt.touch()
    families = {}
    for family, (folder, style) in accuracy.FAMILIES.items():
        accuracy.write_phantoms(work / folder, "C", range(1, 2), accuracy.HELDOUT_SEED, style)
        masks = ckpt.parent.parent / f"{folder}_masks_20261204-000000"
        masks.mkdir()
        label = nib.load(work / folder / "C_1" / "atriumSegImgMO.nii.gz")
        _, structures = _heart_c(accuracy, style, 1)
        called = (np.asarray(label.dataobj) > 0) | (structures == synthetic.POOL_CODE)  # the LV kept too
        nib.save(nib.Nifti1Image(called.astype(np.uint8), label.affine), masks / "C_1.nii.gz")
        later = ckpt.parent.parent / f"{folder}_masks_20261204-010000"  # a later --ckpt run's: the LA alone
        later.mkdir()
        nib.save(label, later / "C_1.nii.gz")
        cases = [{"case_id": "C_1", "dice": 0.5, "volume_error_pct": 80.0}]
        families[family] = {"style": style, "cases": cases, "done_when": {}, "beyond_15pct": ["as written"],
                            "partial_volume": {"masks": str(masks)}}  # fmt: skip
    result = tmp_path / "result.json"
    result.write_text(json.dumps({"checkpoint": str(ckpt), "families": families}))
    changed = work / accuracy.FAMILIES["training_family"][0] / "C_1" / "atriumSegImgMO.nii.gz"
    label = nib.load(changed)
    nib.save(nib.Nifti1Image(np.zeros(label.shape, np.uint8), label.affine), changed)
    accuracy.recause(result)
    rewritten = json.loads(result.read_text())["families"]
    assert rewritten["training_family"]["beyond_15pct"] == ["as written"]
    heldout = rewritten["heldout_setting"]
    (kept,) = heldout["neighbour_called_la"]
    assert set(kept["neighbours_pct_of_la"]) == {"LV"} and heldout["done_when"]["neighbour_called_la"] == 1
    assert heldout["beyond_15pct"][0]["cause"].startswith("LV called LA")
    shutil.rmtree(ckpt.parent.parent / f"{accuracy.FAMILIES['heldout_setting'][0]}_masks_20261204-000000")
    with pytest.raises(SystemExit, match="heldout_setting masks its run saved are gone"):
        accuracy.recause(result)


def test_doubt_figures_count_the_bad_cases_the_model_flagged_itself(accuracy):
    """Of four cases the model doubts two ("model unsure"): the two below Dice 0.8; one of them is beyond
    +-15 %, the other keeps a neighbour. A report written before expected_dice says so."""
    unsure = "model unsure: expected Dice {} below review_expected_dice 0.92"
    rows = [("A_1", 0.95, 0.96, ""), ("A_2", 0.90, 0.94, "LA volume 3.0 mL below 5 mL (min_volume_ml)"),
            ("B_1", 0.70, 0.88, unsure.format(0.88)), ("C_1", 0.40, 0.81, unsure.format(0.81))]  # fmt: skip
    cases = [{"case_id": k, "dice": d, "expected_dice": e, "review_reason": r} for k, d, e, r in rows]
    report = {"header": {"inference": {"review_expected_dice": 0.92}}, "cases": cases}
    figures = {"beyond_15pct": [{"case_id": "C_1"}, {"case_id": "A_2"}]}
    figures["neighbour_called_la"] = [{"case_id": "B_1"}]
    doubt = accuracy.doubt_figures(report, figures)
    assert doubt["flagged"] == ["B_1", "C_1"] and doubt["dice_below_0.8"] == ["B_1", "C_1"]
    assert doubt["dice_below_0.8_flagged"] == 2 and doubt["review_expected_dice"] == 0.92
    assert doubt["beyond_15pct_flagged"] == 1 and doubt["neighbour_called_la_flagged"] == 1
    assert doubt["spearman_expected_vs_dice"]["rho"] == pytest.approx(1.0)
    assert "4 of 4" not in accuracy.doubt_line(doubt, figures) and "2 of 4" in accuracy.doubt_line(
        doubt, figures
    )
    for case in cases:
        del case["expected_dice"]
    assert "note" in accuracy.doubt_figures(report, figures)


@pytest.mark.slow
def test_quick_run_scores_the_reports_its_own_test_commands_wrote(accuracy, tmp_path):
    """The whole benchmark on tiny data: fit on the training family, then per family `test` as configured and
    `test` with flips (two reports per family in one run folder), each scored from the report that command
    wrote, and `predict`'s masks split by LA share."""
    out = tmp_path / "accuracy.json"
    flips = ["--data.augmentation.hflip", "true", "--data.augmentation.vflip", "true"]
    accuracy.main(["--quick", "--work-dir", str(tmp_path / "work"), "--json", str(out), "--", *flips])
    result = json.loads(out.read_text())
    assert list(result["families"]) == ["training_family", "heldout_setting"]
    assert result["settings"]["families"] == {"training_family": "varied", "heldout_setting": "heldout"}
    for family in result["families"].values():
        assert sorted(family["per_geometry"]) == ["A", "B", "C"]
        assert [c["case_id"] for c in family["cases"]] == ["A_1", "B_1", "C_1"]
        assert all(0.0 <= c["dice"] <= 1.0 and c["volume_ref_ml"] > 0 for c in family["cases"])
        assert family["review"]["review_below"] is not None and "flagged" in family["review"]
        assert sorted(family["review"]["agreement_by_case"]) == ["A_1", "B_1", "C_1"]
        assert "threshold_stability" in family["review"]
        shares = family["partial_volume"]["per_geometry"]  # scored on the masks `la-seg predict` wrote
        for g, s in family["per_geometry"].items():  # the same masks as `test` scored
            assert shares[g]["dice"] == pytest.approx(s["dice_mean"], abs=1e-6)
            assert 0.0 <= shares[g]["dice_grid_limit"] <= 1.0
        beyond = {c["case_id"] for c in family["cases"] if abs(c["volume_error_pct"]) > 15}
        assert {c["case_id"] for c in family["beyond_15pct"]} == beyond
        assert all(c["cause"] for c in family["beyond_15pct"])
        assert family["done_when"]["beyond_15pct"] == len(beyond)
        assert family["done_when"]["neighbour_called_la"] == len(family["neighbour_called_la"])
        doubt = family["doubt"]  # the model's own doubt, from the report `test` wrote
        assert doubt["n"] == 3 and 0.0 <= doubt["review_expected_dice"] <= 1.0
    run = Path(result["checkpoint"]).parent.parent
    assert sorted(p.name for p in run.glob("test_*.json")) == [
        "test_test-heldout-2.json",
        "test_test-heldout.json",
        "test_test-varied-2.json",
        "test_test-varied.json",
    ]
    assert "training_family" in accuracy.table([str(out)]) and "heldout_setting" in accuracy.table([str(out)])

    # the same checkpoint with test-time half turns: one `test` per family, whose own voters give the flags
    half_turns = tmp_path / "rot180.json"
    options = ["--", *flips, "--model.tta", "rot180"]
    accuracy.main(["--quick", "--work-dir", str(tmp_path / "work"), "--json", str(half_turns),
                   "--ckpt", result["checkpoint"], *options])  # fmt: skip
    rotated = json.loads(half_turns.read_text())["families"]["heldout_setting"]
    assert rotated["inference"]["tta"] == "rot180" and rotated["review"]["n"] == 3
    assert len(list(run.glob("test_*.json"))) == 6
    report = json.loads((run / "test_test-heldout-3.json").read_text())
    assert all(c["agreement"]["voters"] == ["identity", "flip_xy"] for c in report["cases"])

    # several --ckpt: one ensemble (as of a recipe fitted with several seeds), scored from the reports la-seg
    # wrote into the run's ensemble folder, its members' agreement giving the flags, and each member alone
    voted = tmp_path / "two.json"
    best, last = result["checkpoint"], str(run / "checkpoints" / "last.ckpt")
    accuracy.main(["--quick", "--name", "two", "--work-dir", str(tmp_path / "work"), "--json", str(voted),
                   "--ckpt", best, "--ckpt", last, "--no-flips", "--", *flips])  # fmt: skip
    ensemble = json.loads(voted.read_text())
    assert ensemble["checkpoint"] == f"[{best}, {last}]"
    folder = Path(ensemble["reports"])
    assert folder == tmp_path / "work-quick" / "runs" / "two" / "ensemble"
    family = ensemble["families"]["heldout_setting"]
    assert list(family["members_alone"]) == [best, last]
    assert family["review"]["n"] == 3 and "spearman_agreement_vs_dice" in family["review"]
    report = json.loads((folder / "test_test-heldout.json").read_text())
    assert all(c["agreement"]["voters"] == [best, last] for c in report["cases"])
    assert Path(family["partial_volume"]["masks"]).parent == folder


@pytest.mark.slow
def test_quick_folds_score_the_ensemble_its_agreement_and_each_member(accuracy, tmp_path):
    """`--folds 2`: two fold runs, `test` of their folder (the ensemble, whose members' agreement gives the
    review flags) and of each member alone, per family, each scored from the report that command wrote."""
    out = tmp_path / "ensemble.json"
    accuracy.main(["--quick", "--folds", "2", "--work-dir", str(tmp_path / "work"), "--json", str(out)])
    result = json.loads(out.read_text())
    family = result["families"]["heldout_setting"]
    assert [c["case_id"] for c in family["cases"]] == ["A_1", "B_1", "C_1"]
    members = family["members_alone"]
    assert [Path(m).parts[-4] for m in members] == ["fold_0", "fold_1"]
    assert all(m["overall"]["n"] == 3 for m in members.values())
    assert family["review"]["n"] == 3 and "spearman_agreement_vs_dice" in family["review"]
    folder = Path(result["checkpoint"])
    assert (folder / "accuracy_scores_test-heldout.json").is_file()
    assert (folder / "ensemble" / "test_test-heldout.json").is_file()
    assert len(list(folder.glob("fold_*/version_0/test_test-heldout.json"))) == 2  # each member alone


def test_each_heldout_factor_variant_changes_only_its_group(load_benchmark):
    """heldout_factors.py: each variant is the held-out setting with only its group changed, the groups
    together cover every factor that differs from the training family, and the last is the training family's
    ranges throughout."""
    factors = load_benchmark("heldout_factors")
    heldout, varied = synthetic.HELDOUT, synthetic.VARIED
    differing = {
        f.name for f in dataclasses.fields(heldout) if getattr(heldout, f.name) != getattr(varied, f.name)
    }
    grouped = set()
    for name, changes in factors.GROUPS.items():
        variant = dataclasses.replace(heldout, **changes)
        changed = {
            f.name
            for f in dataclasses.fields(heldout)
            if getattr(variant, f.name) != getattr(heldout, f.name)
        }
        assert changed <= set(changes), name
        if name != "all (the training family)":
            grouped |= changed
    assert grouped == differing
    everything = dataclasses.replace(heldout, **factors.GROUPS["all (the training family)"])
    assert dataclasses.replace(everything, veins=varied.veins) == varied


def test_a_too_small_volume_says_whether_the_la_lost_its_rim_or_a_part(accuracy, tmp_path):
    """The LA without its outermost in-plane voxels (1.3 mm on geometry C) lost its rim: all it misses lies
    within RIM_MM of its boundary. The LA without its core (deeper than 3 mm) lost none of its rim."""
    style, index = "varied", 2
    reference, _ = _heart_c(accuracy, style, index)
    in_plane = np.zeros((3, 3, 3), dtype=bool)
    in_plane[:, :, 1] = ndimage.generate_binary_structure(2, 1)
    depth = ndimage.distance_transform_edt(reference, sampling=accuracy.GEOMETRIES["C"][1])
    found = {}
    for name, mask in (
        ("rim", ndimage.binary_erosion(reference, in_plane)),
        ("core", reference & (depth <= 3)),
    ):
        folder = tmp_path / name
        folder.mkdir()
        nib.save(nib.Nifti1Image(mask.astype(np.uint8), np.eye(4)), folder / f"C_{index}.nii.gz")
        volume_error = 100 * (mask.sum() / reference.sum() - 1)
        assert volume_error < -15
        case = {"case_id": f"C_{index}", "volume_error_pct": volume_error}
        (found[name],) = accuracy.causes(folder, [case], style)["beyond_15pct"]
    rim, core = (found[name]["wrong_pct_of_la"] for name in ("rim", "core"))
    assert rim[accuracy.MISSED_AT_RIM] == pytest.approx(rim["LA missed"]) and rim["LA missed"] > 15
    assert core[accuracy.MISSED_AT_RIM] == 0.0 and core["LA missed"] > 15
    assert found["rim"]["cause"] == (
        f"LA missed ({rim['LA missed']:.1f} % of the LA, {rim['LA missed']:.1f} % at its rim)"
    )
    assert found["core"]["cause"].endswith(", 0.0 % at its rim)")


def test_distinct_hearts_give_every_training_and_validation_case_a_heart_of_its_own(
    accuracy, monkeypatch, tmp_path
):
    """By default case i of every geometry is heart i (phantom i of seed 0); --distinct-hearts keeps the
    cases per geometry and the held-out sets but draws no heart twice, writing each geometry's phantoms of
    the hearts it uses and no others."""
    written = []
    monkeypatch.setattr(accuracy, "write_phantoms", lambda root, *args: written.append((root.name, *args)))
    sizes = ["--train", "3", "--val", "2", "--heldout", "4", "--work-dir", str(tmp_path)]
    shared = accuracy.make_data(tmp_path, accuracy.parse_args(sizes))
    shared_written, written[:] = list(written), []
    distinct = accuracy.make_data(tmp_path, accuracy.parse_args([*sizes, "--distinct-hearts"]))

    def hearts(ids):
        return [int(case_id.split("_")[1]) for case_id in ids]

    assert shared["train"] == [f"{g}_{i}" for g in "ABC" for i in (1, 2, 3)]
    assert shared["val"] == [f"{g}_{i}" for g in "ABC" for i in (4, 5)]
    assert len(set(hearts(shared["train"]))) == 3
    for part in ("train", "val"):  # the same cases per geometry
        assert [c[0] for c in distinct[part]] == [c[0] for c in shared[part]]
    every = hearts(distinct["train"] + distinct["val"])
    assert len(set(every)) == len(every) == 15
    data = {g: [] for g in "ABC"}
    for folder, prefix, cases, seed, *_ in written:
        if folder == "data-varied" and seed == 0:
            data[prefix] += cases
    assert data == {g: hearts(c for c in distinct["train"] + distinct["val"] if c[0] == g) for g in "ABC"}
    assert [w for w in written if w[0] != "data-varied"] == [
        w for w in shared_written if w[0] != "data-varied"
    ]
    assert {tuple(w[2]) for w in shared_written if w[0] == "data-varied"} == {(1, 2, 3), (4, 5)}
    with pytest.raises(SystemExit):
        accuracy.parse_args(["--folds", "2", "--distinct-hearts"])


def test_heart_scale_grows_the_heart_and_every_field_of_view_and_refuses_phantoms_of_another(
    accuracy, monkeypatch, tmp_path
):
    """--heart-scale S: every geometry keeps its spacing and gets S times the voxels per axis, and its
    hearts S times the size (about S^3 times the LA volume); the phantoms are written at that scale, and a
    work-dir holding phantoms of another scale is refused, naming the file, rather than mixed in."""
    small = {g: accuracy.phantom_grid(g, 1.0) for g in "ABC"}
    large = {g: accuracy.phantom_grid(g, 1.5) for g in "ABC"}
    for g in "ABC":
        assert small[g][:2] == accuracy.GEOMETRIES[g]
        assert large[g][1] == small[g][1]
        assert large[g][0] == tuple(round(1.5 * n) for n in small[g][0])
        assert large[g][2] == 1.5 * small[g][2]
    volumes = {}
    for scale in (1.0, 1.5):
        root = tmp_path / f"scale{scale}"
        accuracy.write_phantoms(root, "C", range(1, 2), accuracy.HELDOUT_SEED, "varied", scale)
        label = nib.load(root / "C_1" / "atriumSegImgMO.nii.gz")
        assert label.shape == accuracy.phantom_grid("C", scale)[0]
        volumes[scale] = (np.asarray(label.dataobj) > 0).sum()
    assert 2.5 < volumes[1.5] / volumes[1.0] < 4.5  # 1.5^3 = 3.4, up to the grid's rounding of a 4 mm slab
    with pytest.raises(SystemExit, match="C_1.*another --heart-scale"):
        accuracy.write_phantoms(tmp_path / "scale1.5", "C", range(1, 3), accuracy.HELDOUT_SEED, "varied", 1.0)
    assert not (tmp_path / "scale1.5" / "C_2").exists()
    written = []
    monkeypatch.setattr(accuracy, "write_phantoms", lambda root, *args: written.append(args))
    accuracy.make_data(tmp_path, accuracy.parse_args(["--train", "1", "--val", "1", "--heart-scale", "1.5"]))
    assert {w[-1] for w in written} == {1.5}
    with pytest.raises(SystemExit):
        accuracy.parse_args(["--heart-scale", "0"])
    # adult hearts unless asked (the demo recipe's 1.5 mm per pixel is chosen for them); --quick's small ones
    assert accuracy.parse_args([]).heart_scale == 1.5
    assert accuracy.parse_args(["--quick"]).heart_scale == 1.0
    assert accuracy.parse_args(["--quick", "--heart-scale", "2"]).heart_scale == 2.0


def test_heldout_factors_draws_its_variants_at_the_runs_heart_size(load_benchmark, monkeypatch, tmp_path):
    """heldout_factors.py writes every variant at the heart size of the accuracy.py run whose checkpoint it
    tests (adult by default, as accuracy.py), and refuses a work dir whose phantoms are of another size,
    naming the file, before it writes anything: small hearts would price the factors for another model."""
    factors = load_benchmark("heldout_factors")
    accuracy = factors.accuracy
    (tmp_path / "split.json").write_text("{}")
    for prefix in accuracy.GEOMETRIES:
        accuracy.write_phantoms(tmp_path / "data-varied", prefix, range(1, 2), 0, "varied", 1.0)
    args = factors.parse_args(["--ckpt", str(tmp_path / "best.ckpt"), "--work-dir", str(tmp_path)])
    assert args.heart_scale == accuracy.parse_args([]).heart_scale == 1.5
    with pytest.raises(SystemExit, match="A_1.*another --heart-scale"):
        factors.run(args)
    assert not list(tmp_path.glob("test-heldout-factors-*"))
    written = []
    monkeypatch.setattr(accuracy, "write_phantoms", lambda root, *rest: written.append(rest[-1]))
    monkeypatch.setattr(accuracy, "test", lambda *a: {"cases": []})
    monkeypatch.setattr(
        accuracy, "score", lambda report: {"per_geometry": {}, "overall": {"dice_mean": 0.0,
            "volume_error_pct_mean": 0.0}, "done_when": {"fraction_within_5pct": 0.0, "beyond_15pct": 0}}
    )  # fmt: skip
    args.heart_scale = 1.0
    result = factors.run(args)
    assert set(written) == {1.0} and len(written) == len(factors.GROUPS) * len(accuracy.GEOMETRIES)
    assert result["heart_scale"] == 1.0
    with pytest.raises(SystemExit):
        factors.parse_args(["--ckpt", "x", "--heart-scale", "0"])


def test_the_wide_training_style_is_the_training_familys_hearts_with_three_ranges_widened(accuracy):
    """`--training-style wide` changes neighbours, warp and noise and nothing else: its case k is the training
    family's case k (the same draws) wherever the three do not enter, and the held-out setting's ranges of the
    three lie inside its own, while the held-out setting's veins stay unseen."""
    wide = accuracy.TRAINING_STYLES["wide"]
    widened = {"pull_mm", "warp_mm", "noise"}
    for name in widened:
        low, high = getattr(wide, name)
        held = getattr(synthetic.HELDOUT, name)
        assert low <= held[0] and held[1] <= high and (low, high) != getattr(synthetic.VARIED, name)
    assert synthetic.HELDOUT.veins[0] not in wide.veins
    for k in range(1, 5):
        drawn, varied = synthetic.case_physics(0, k, wide), synthetic.case_physics(0, k, "varied")
        same = {f.name for f in dataclasses.fields(drawn)} - widened
        assert all(getattr(drawn, name) == getattr(varied, name) for name in same)
        assert drawn.pull_mm >= varied.pull_mm and drawn.warp_mm >= varied.warp_mm
    assert accuracy.parse_args(["--training-style", "wide"]).training_style == "wide"
