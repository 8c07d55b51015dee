"""The QC page: labelled pictures, and a page from real `predict` and `test` runs that a real browser shows
with every picture loaded, the cases that most need review first."""

import math
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch

from la_seg.cli import main
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
