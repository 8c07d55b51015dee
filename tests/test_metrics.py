import math

import torch

from la_seg.metrics import (
    CumulativeCaseMetrics,
    case_metrics,
    overlap_3d,
    overlap_per_slice,
    summarise,
    surface_distances,
    volume_ml,
)


def box(shape, lo, hi):
    m = torch.zeros(shape, dtype=torch.bool)
    m[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = True
    return m


def test_overlap_matches_set_formulas():
    a = box((20, 20, 10), (2, 2, 2), (12, 12, 6))  # 400 voxels
    b = box((20, 20, 10), (7, 2, 2), (17, 12, 6))  # 400 voxels, 200 shared
    dice, iou = overlap_3d(a, b)
    assert math.isclose(dice, 2 * 200 / 800, rel_tol=1e-6)
    assert math.isclose(iou, 200 / 600, rel_tol=1e-6)


def test_empty_rules():
    empty = torch.zeros(8, 8, 4, dtype=torch.bool)
    full = box((8, 8, 4), (0, 0, 1), (4, 4, 2))
    assert overlap_3d(empty, empty) == (1.0, 1.0)
    assert overlap_3d(full, empty) == (0.0, 0.0)
    assert all(math.isnan(v) for v in surface_distances(full, empty, (1, 1, 1)))
    dice, iou = overlap_per_slice(full, empty)  # only slice 1 is non-empty in either
    assert dice == [0.0] and iou == [0.0]
    assert overlap_per_slice(empty, empty) == ([], [])


def test_surface_distance_uses_spacing():
    a = box((30, 30, 30), (5, 5, 5), (15, 15, 15))
    b = box((30, 30, 30), (5, 5, 8), (15, 15, 18))  # shifted 3 voxels along the last axis
    hd_iso, _ = surface_distances(a, b, (1.0, 1.0, 1.0))
    hd_aniso, assd_aniso = surface_distances(a, b, (1.0, 1.0, 2.5))
    assert math.isclose(hd_iso, 3.0, rel_tol=1e-3)
    assert math.isclose(hd_aniso, 7.5, rel_tol=1e-3)
    assert 0 < assd_aniso < hd_aniso


def test_volume_in_millilitres():
    m = box((40, 40, 10), (0, 0, 0), (20, 20, 8))  # 3200 voxels
    assert math.isclose(volume_ml(m, (0.625, 0.625, 2.5)), 3200 * 0.625 * 0.625 * 2.5 / 1000)


def test_case_metrics_and_summary():
    ref = box((20, 20, 6), (4, 4, 1), (14, 14, 5))
    rows = [
        {"case_id": "a", **case_metrics(ref, ref, (1, 1, 1))},
        {"case_id": "b", **case_metrics(box((20, 20, 6), (6, 4, 1), (16, 14, 5)), ref, (1, 1, 1))},
    ]
    assert rows[0]["dice"] == 1.0 and rows[0]["hd95_mm"] == 0.0
    assert rows[0]["volume_pred_ml"] == rows[0]["volume_ref_ml"]
    summary = summarise(rows, ("dice", "iou", "hd95_mm"))
    assert math.isclose(summary["dice"]["mean"], (1.0 + rows[1]["dice"]) / 2)
    assert summary["dice"]["n"] == 2 and summary["dice"]["sd"] > 0
    assert summary["slice_dice"]["n"] == 8  # 4 LA slices per case, pooled


def test_empty_prediction_is_a_counted_failure_left_out_of_distance_means():
    ref = box((20, 20, 6), (4, 4, 1), (14, 14, 5))
    empty = torch.zeros_like(ref)
    rows = [case_metrics(ref, ref, (1, 1, 1)), case_metrics(empty, ref, (1, 1, 1))]
    assert [r["failed"] for r in rows] == [False, True]
    summary = summarise(rows, ("dice", "hd95_mm"))
    assert summary["cases"] == {"n": 2, "failed": 1}
    assert summary["dice"]["n"] == 2 and summary["hd95_mm"]["n"] == 1
    assert summary["hd95_mm"]["mean"] == 0.0  # only the good case


def test_max_rule_penalises_a_failure_with_the_image_diagonal():
    shape, spacing = (20, 16, 6), (0.625, 0.625, 2.5)
    ref = box(shape, (4, 4, 1), (14, 14, 5))
    empty = torch.zeros_like(ref)
    diagonal = math.sqrt(sum((n * s) ** 2 for n, s in zip(shape, spacing, strict=True)))
    row = case_metrics(empty, ref, spacing, empty_distance="max")
    assert row["failed"]
    assert math.isclose(row["hd95_mm"], diagonal) and math.isclose(row["assd_mm"], diagonal)
    both_empty = case_metrics(empty, empty, spacing, empty_distance="max")
    assert both_empty["hd95_mm"] == 0.0 and both_empty["dice"] == 1.0
    summary = summarise([case_metrics(ref, ref, spacing), row], ("hd95_mm",))
    assert summary["hd95_mm"]["n"] == 2 and math.isclose(summary["hd95_mm"]["mean"], diagonal / 2)


def test_cumulative_metrics_count_each_case_once_and_keep_extra_fields():
    ref = box((20, 20, 6), (4, 4, 1), (14, 14, 5))
    cases = CumulativeCaseMetrics(surface=False)
    for case_id in ("b", "a", "b"):  # the distributed sampler pads with a repeated case
        cases.update(case_id, ref if case_id == "a" else torch.zeros_like(ref), ref, (1, 1, 1), slice_axis=2)
    rows, summary = cases.aggregate(("dice",))
    assert [r["case_id"] for r in rows] == ["a", "b"] and rows[0]["slice_axis"] == 2
    assert summary["cases"] == {"n": 2, "failed": 1} and summary["dice"]["mean"] == 0.5
    assert "hd95_mm" not in rows[0]
    cases.reset()
    assert cases.aggregate(("dice",))[0] == []
