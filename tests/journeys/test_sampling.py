"""`data.sampling: cases` draws every training case equally often, whatever its number of slices: a
thick-slice scan is not outweighed by a thin-slice one (issue 19's scanner geometries)."""

from __future__ import annotations

import collections

import yaml

from la_seg.data.datasets import SliceDataset
from la_seg.data.synthetic import write_dataset
from tests.journeys.conftest import TINY

EPOCHS = ["--trainer.max_epochs", "3", "--trainer.limit_val_batches", "1"]


def test_cases_sampling_draws_thick_and_thin_slice_cases_equally_often(la_seg, tmp_path, monkeypatch):
    data = tmp_path / "mixed"
    for prefix, slices, thickness in (("T_", 20, 1.6), ("K_", 5, 6.4)):  # one anatomy, 4x the slices
        write_dataset(data, 4, 2, (40, 40, slices), (1.6, 1.6, thickness), anatomy_fov_mm=64, prefix=prefix)
    split = ["--data.root", data, "--data.split", "[0.75, 0.25, 0.0]", "--data.empty_slice_fraction", "0"]

    drawn: dict[str, collections.Counter] = {}
    getitem = SliceDataset.__getitem__

    def counting(self, i):
        drawn[mode][self.cases[int(self.index[i][0])].case_id[0]] += 1
        return getitem(self, i)

    monkeypatch.setattr(SliceDataset, "__getitem__", counting)
    for mode in ("slices", "cases"):
        drawn[mode] = collections.Counter()
        la_seg("fit", *TINY, *split, *EPOCHS, "--data.sampling", mode)
    slices, cases = drawn["slices"], drawn["cases"]
    assert sum(slices.values()) == sum(cases.values())  # an epoch keeps its length
    assert slices["T"] > 2.5 * slices["K"]  # each slice once: the 1.6 mm cases hold 4x the LA slices
    assert 0.6 < cases["T"] / cases["K"] < 1.6  # each case equally often (3 epochs of random draws)
    config = yaml.safe_load((tmp_path / "runs" / "demo" / "version_1" / "config.yaml").read_text())
    assert config["data"]["sampling"] == "cases"

    _, err = la_seg("fit", *TINY, *split, "--data.sampling", "volumes", expect=2)
    assert "data.sampling" in err and "volumes" in err and "Traceback" not in err
