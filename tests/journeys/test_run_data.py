"""A run's data travels with its checkpoint: fit on one data set, then `test` with a config whose data.root is
another with the same case ids (demo.yaml's `demo_data`) reads the run's own; the printed next command runs
as printed; lone LAScarQS and Utah files are predicted under their folders' names."""

from __future__ import annotations

import json
import shlex
import shutil

import nrrd
import numpy as np
import pytest

from la_seg.data.synthetic import write_dataset
from tests.journeys.conftest import TINY

pytestmark = pytest.mark.slow
SHORT_FIT = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2"]


def test_test_reads_the_data_set_the_run_was_trained_on(la_seg, tmp_path):
    # coarse_data and demo.yaml's default data.root demo_data: the same case ids, other images
    write_dataset(tmp_path / "coarse_data", cases=8, seed=1, shape=(40, 36, 8), spacing=(1.3, 1.3, 4.0))
    write_dataset(tmp_path / "demo_data", cases=8, seed=2, shape=(40, 36, 8), spacing=(1.3, 1.3, 4.0))
    shutil.copytree(tmp_path / "coarse_data", tmp_path / "copy_of_coarse")
    out, _ = la_seg("fit", *TINY, *SHORT_FIT, "--data.root", "coarse_data")
    next_line = next(line for line in out.splitlines() if line.strip().startswith("next:"))
    command = shlex.split(next_line.split("next:", 1)[1])
    assert command[:4] == ["la-seg", "test", "--config", "demo.yaml"]  # the config by the name typed
    assert "--data.root" in command and "coarse_data" in command
    run = tmp_path / "runs" / "demo" / "version_0"
    best = str(run / "checkpoints" / "best.ckpt")
    split = json.loads((run / "split.json").read_text())
    cases = split["train"] + split["val"] + split["test"]

    def scored() -> str:
        reports = sorted(run.glob("test_heldout*.json"), key=lambda path: path.stat().st_mtime)
        return json.loads(reports[-1].read_text())["header"]["scored"]["folder"]

    la_seg(*command[1:])  # the next command, run as printed
    assert scored() == str(tmp_path / "coarse_data")

    # the config names demo_data; the checkpoint's data.root wins, and says so
    _, err = la_seg("test", *TINY, "--ckpt_path", best)
    assert scored() == str(tmp_path / "coarse_data")
    assert f"read from data.root {tmp_path / 'coarse_data'}" in err
    _, err = la_seg("validate", *TINY, "--ckpt_path", best)
    assert f"read from data.root {tmp_path / 'coarse_data'}" in err

    # typed: another data set whose cases of the same ids differ is refused, naming both roots and a case
    _, err = la_seg("test", *TINY, "--ckpt_path", best, "--data.root", "demo_data", expect=2)
    line = err.strip().splitlines()[-1]
    assert str(tmp_path / "coarse_data") in line and str(tmp_path / "demo_data") in line
    assert any(f"case {case!r}" in line for case in cases), line
    # a copy of the same cases is the same data set
    la_seg("test", *TINY, "--ckpt_path", best, "--data.root", "copy_of_coarse")
    assert scored() == str(tmp_path / "copy_of_coarse")

    # moved away: the error says where the run was trained and which option says where its cases are now
    shutil.move(tmp_path / "coarse_data", tmp_path / "moved")
    _, err = la_seg("test", *TINY, "--ckpt_path", best, expect=2)
    assert f"data.root {tmp_path / 'coarse_data'}, which does not exist" in err and "--data.root" in err

    # a split.json applied as data.split_file to another data set of the same ids is refused too
    split_file = ["--data.split_file", run / "split.json"]
    _, err = la_seg("fit", *TINY, *SHORT_FIT, "--data.root", "demo_data", *split_file, expect=2)
    assert str(tmp_path / "demo_data") in err and str(tmp_path / "coarse_data") in err

    # lone files of a layout with a fixed file name are named after their folders
    utah = tmp_path / "utah" / "ID0RZDK210BSMWAA6467LU" / "lgemri.nrrd"
    utah.parent.mkdir(parents=True)
    nrrd.write(str(utah), np.zeros((40, 36, 8), np.uint8), {"encoding": "gzip"})
    for image in (tmp_path / "moved" / "train_7" / "enhanced.nii.gz", utah):
        la_seg("predict", *TINY, "--ckpt_path", best, "--data.predict_root", image,
               "--writer.output_dir", "masks", "--writer.overwrite", "true")  # fmt: skip
    assert sorted(path.name for path in (tmp_path / "masks").glob("*.nii.gz")) == [
        "ID0RZDK210BSMWAA6467LU.nii.gz",
        "train_7.nii.gz",
    ]
