"""fit -> killed -> fit --ckpt_path last: training continues after the last completed epoch, not the best."""

from __future__ import annotations

import warnings

import torch

from tests.journeys.conftest import TINY


def _epoch(path) -> int:
    return torch.load(path, map_location="cpu", weights_only=True)["epoch"]


def test_last_holds_the_last_epoch_and_resume_continues_from_it(la_seg, journey_data, tmp_path):
    # lr 0: val/dice never improves after the first epoch, so best.ckpt stays at epoch 0
    common = [*TINY, "--data.root", journey_data, "--model.lr", "0", "--model.scheduler", "none"]
    out, err = la_seg("fit", *common, "--trainer.max_epochs", "3", "--trainer.limit_train_batches", "2")
    assert " at epoch 0: " in out + err  # the fit summary names the best epoch
    checkpoints = tmp_path / "runs" / "demo" / "version_0" / "checkpoints"
    assert _epoch(checkpoints / "best.ckpt") == 0
    assert _epoch(checkpoints / "last.ckpt") == 2

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, err = la_seg("fit", *common, "--trainer.max_epochs", "4", "--trainer.limit_train_batches", "2",
                        "--ckpt_path", "last")  # fmt: skip
    warned = [str(w.message) for w in caught]
    assert not [m for m in warned if "exists and is not empty" in m], "a resume continues its own run folder"
    assert "last.ckpt" in err
    assert _epoch(checkpoints / "last.ckpt") == 3
    assert not (tmp_path / "runs" / "demo" / "version_1").exists(), "a resume logs into the run it resumes"
