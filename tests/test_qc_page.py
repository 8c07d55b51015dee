"""The QC page: labelled pictures, and a page from real `predict` and `test` runs that a real browser shows
with every picture loaded, the cases that most need review first."""

import json
import math
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch

from la_seg.cli import main
from la_seg.data.io import read_label, write_nifti
from la_seg.data.layouts import find_cases
from la_seg.data.synthetic import write_dataset
from la_seg.qc import REVIEW_RED, qc_picture, review_order
from tests.tiny_options import TINY_CLI

CHROMIUM = shutil.which("chromium")


class Rows(HTMLParser):
    """The page's table rows (review flag and cell texts) and the body's `data-pictures` mark."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[dict] = []
        self.pictures = ""
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list) -> None:
        attrs = dict(attrs)
        if tag == "body":
            self.pictures = attrs.get("data-pictures", "")
        elif tag == "tr" and "data-review" in attrs:
            self.rows.append({"review": attrs["data-review"] == "1", "cells": []})
        elif tag == "td" and self.rows:
            self._cell = []

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._cell is not None:
            self.rows[-1]["cells"].append("".join(self._cell).strip())
            self._cell = None


def shown_in_browser(page: Path) -> Rows:
    """The page's DOM as headless Chromium has it once loaded (its inline script has run)."""
    dump = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000",
         "--dump-dom", page.resolve().as_uri()],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert dump.returncode == 0, dump.stderr[-2000:]
    rows = Rows()
    rows.feed(dump.stdout)
    return rows


def test_a_flagged_picture_names_case_views_and_volume_under_a_red_banner():
    image = torch.rand(20, 24, 8)
    mask = torch.zeros(20, 24, 8, dtype=torch.bool)
    mask[5:12, 6:14, 2:6] = True
    plain = np.asarray(qc_picture(image, mask, "case_7", 12.34))
    flagged = np.asarray(qc_picture(image, mask, "case_7", 12.34, "LA volume 1.2 mL below 5 mL"))
    assert flagged.shape[0] > plain.shape[0]  # the banner is a line of its own
    assert (flagged[2:10, :, :] == REVIEW_RED).all(axis=2).mean() > 0.5
    assert not (plain[:10] == REVIEW_RED).all(axis=2).any()
    assert (plain[:36] < 100).all(axis=2).any()  # dark text above the views


def test_review_order_puts_flagged_then_lowest_dice_then_odd_volumes_first():
    rows = [
        {"case_id": "a", "volume_ml": 20.0, "dice": 0.9, "review": False},
        {"case_id": "b", "volume_ml": 21.0, "dice": 0.5, "review": False},
        {"case_id": "c", "volume_ml": 22.0, "dice": 0.95, "review": True},
        {"case_id": "d", "volume_ml": 90.0, "dice": math.nan, "review": False},
    ]
    assert [r["case_id"] for r in review_order(rows)] == ["c", "b", "a", "d"]
    no_reference = [r | {"dice": None} for r in rows if r["case_id"] != "c"]
    assert [r["case_id"] for r in review_order(no_reference)] == ["d", "a", "b"]


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (.ci/run installs Debian's chromium)")
def test_predict_and_test_pages_load_every_picture_sorted_for_review(tmp_path, synth_root):
    out = tmp_path / "masks"
    main(["predict", *TINY_CLI, "--untrained", "true", "--data.predict_root", str(synth_root),
          "--writer.output_dir", str(out), "--writer.qc_page", "true"])  # fmt: skip
    shown = shown_in_browser(out / "qc.html")
    assert len(shown.rows) == 6 and shown.pictures == "loaded 6/6"
    flags = [row["review"] for row in shown.rows]
    assert flags == sorted(flags, reverse=True)

    split = ["--data.split", "[0.34, 0.16, 0.5]"]  # three test cases
    main(["test", *TINY_CLI, "--untrained", "true", "--data.root", str(synth_root), *split])
    (page,) = Path(tmp_path, "runs").rglob("test_heldout.html")
    shown = shown_in_browser(page)
    assert len(shown.rows) == 3 and shown.pictures == "loaded 3/3"
    assert all(Path(page.parent, "test_heldout_qc", f"{row['cells'][0]}.png").is_file() for row in shown.rows)
    dice = [float(row["cells"][3]) for row in shown.rows]  # cells: case, views, volume, Dice, review
    dice = [math.inf if math.isnan(d) else d for d in dice]  # an empty mask's Dice: after the scored
    keys = [(not row["review"], d) for row, d in zip(shown.rows, dice, strict=True)]
    assert keys == sorted(keys)


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (.ci/run installs Debian's chromium)")
def test_the_analyse_page_shows_each_cases_surfaces_mask_and_shares_flagged_first(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_dataset(tmp_path / "data", cases=3, seed=77, shape=(40, 36, 9), spacing=(0.8, 0.8, 3.0), scar=0.2)
    main(["predict", *TINY_CLI, "--untrained", "true", "--data.predict_root", "data", "--writer.output_dir",
          "masks", "--writer.save_png", "true"])  # fmt: skip
    volumes = {}
    for case in find_cases(tmp_path / "data"):  # the true masks, analysed beside predict's pictures
        label, mask = read_label(case.label_path), tmp_path / "masks" / f"{case.case_id}.nii.gz"
        mask.unlink()
        write_nifti(mask, label.data.astype(np.uint8), label.geometry)
        volumes[case.case_id] = label.data.astype(bool).sum() * 0.8 * 0.8 * 3.0 / 1000
    largest = max(volumes, key=volumes.get)
    below_largest = sorted(volumes.values())[-2] + 0.01  # flags the largest LA for review
    plausible = ["--plausibility.min_volume_ml", "0", "--plausibility.max_volume_ml", str(below_largest)]
    small_pool = ["--blood_pool.erosion_mm", "1.5", "--blood_pool.min_voxels", "20"]
    main(["analyse", "--images", "data", "--masks", "masks", "--out", "analysis", *small_pool, *plausible])
    shown = shown_in_browser(tmp_path / "analysis" / "analysis.html")
    assert shown.pictures == "loaded 9/9"  # anterior, posterior and predict's mask picture per case
    rows = json.loads((tmp_path / "analysis" / "analysis.json").read_text())["cases"]
    by_case = {row["case_id"]: row for row in rows}
    assert [row["review"] for row in shown.rows] == [True, False, False]
    assert shown.rows[0]["cells"][0] == largest and "LA volume" in shown.rows[0]["cells"][-1]
    for row in shown.rows:  # cells: case, views, volume, fibrosis, dense scar, Utah stage, mean IIR, review
        case = by_case[row["cells"][0]]
        assert row["cells"][2:7] == [f"{case['volume_ml']:.1f}", f"{case['fibrosis_percent']:.1f}",
                                     f"{case['dense_scar_percent']:.1f}", case["utah_stage"],
                                     f"{case['mean_iir']:.2f}"]  # fmt: skip
