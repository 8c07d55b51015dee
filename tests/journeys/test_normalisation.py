"""A model is tested and used on volumes normalised as it was trained: `fit` records data.intensity_headroom,
`test` and `predict` take it from the checkpoint; a contradicting value and an ensemble of two settings are
refused."""

from __future__ import annotations

import json

import pytest

import la_seg.data.cache as cache
from tests.journeys.conftest import TINY

SHORT = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1"]


def test_test_and_predict_normalise_as_the_checkpoint_was_trained(
    la_seg, journey_data, tmp_path, monkeypatch
):
    data = ["--data.root", journey_data]
    la_seg("fit", *TINY, *data, *SHORT, "--data.intensity_headroom", "1.0")  # the old percentile clip
    la_seg("fit", *TINY, *data, *SHORT)  # the default
    runs = tmp_path / "runs" / "demo"
    clipped, default = (runs / f"version_{i}" / "checkpoints" / "best.ckpt" for i in (0, 1))

    used = []  # every volume la-seg normalises goes through normalize_intensity, in this process (0 workers)
    normalize = cache.normalize_intensity
    monkeypatch.setattr(
        cache, "normalize_intensity", lambda d, **k: used.append(k["headroom"]) or normalize(d, **k)
    )
    for ckpt, headroom in ((clipped, 1.0), (default, 1.5)):
        used.clear()
        la_seg("test", *TINY, *data, "--ckpt_path", ckpt)
        report = json.loads((ckpt.parent.parent / "test_heldout.json").read_text())
        assert report["header"]["data"]["intensity_headroom"] == headroom and set(used) == {headroom}
        used.clear()
        la_seg("predict", *TINY, "--ckpt_path", ckpt, "--data.predict_root", journey_data,
               "--writer.output_dir", tmp_path / f"masks_{headroom}")  # fmt: skip
        assert len(used) == 8 and set(used) == {headroom}

    _, err = la_seg("test", *TINY, *data, "--ckpt_path", clipped, "--data.intensity_headroom", "2", expect=2)
    assert "data.intensity_headroom" in err and str(clipped) in err and "1.0" in err
    both = f"[{clipped}, {default}]"
    out = ["--data.predict_root", journey_data, "--writer.output_dir", tmp_path / "mixed"]
    _, err = la_seg("predict", *TINY, "--ckpt_path", both, *out, expect=2)
    assert "intensity_headroom" in err and str(default) in err and not (tmp_path / "mixed").exists()


@pytest.mark.parametrize("value", ["0.5", "nan"])
def test_a_bad_headroom_is_one_line_naming_the_option(la_seg, journey_data, value):
    _, err = la_seg("fit", *TINY, "--data.root", journey_data, "--data.intensity_headroom", value, expect=2)
    assert err.count("la-seg: error:") == 1 and "data.intensity_headroom" in err and "Traceback" not in err
