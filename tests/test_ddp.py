"""Two DDP ranks (gloo on CPU) against one process: predict and test of 0, 1, 2, 3 and 5 volumes.

Fewer volumes than ranks, shards of unequal size and the output folder's checks must not depend on how many
processes run: the same masks, volumes.csv, per-case report and test/loss as one process, each case once.
Every DDP run starts rank 1's predict late (the race of issue 16.2: a late rank once found rank 0's fresh
masks and refused them as existing outputs) and takes `--ckpt_path best`, which must be resolved once.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tiny_options import TINY_CLI

from la_seg.cli import main
from la_seg.data.preprocess import slice_grid
from la_seg.data.synthetic import write_dataset
from la_seg.inference import plane_windows

TINY = [*TINY_CLI, "--trainer.enable_model_summary", "false"]
DDP = ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"]
# `la-seg` for the DDP runs (Lightning relaunches this script for rank 1): rank 1 enters the writer's
# on_predict_start 5 s after rank 0, and fails if it resolves --ckpt_path itself instead of taking rank 0's.
LATE_RANK = """
import os, time
import la_seg.checkpoint_rule
from la_seg.callbacks.writer import NiftiPredictionWriter
from la_seg.cli import main

start = NiftiPredictionWriter.on_predict_start

if os.environ.get("LOCAL_RANK", "0") != "0":
    def resolving(*args):
        raise AssertionError("rank 1 resolved --ckpt_path itself")

    la_seg.checkpoint_rule.find_checkpoint = resolving

def late(self, trainer, pl_module):
    if trainer.global_rank == 1:
        time.sleep(5)
    start(self, trainer, pl_module)

NiftiPredictionWriter.on_predict_start = late
main()
"""


@pytest.fixture(scope="session")  # built once per test process, whatever the order
def fitted(tmp_path_factory) -> Path:
    """A folder holding data (5 cases) and a tiny run fitted by `la-seg fit` in runs/demo/version_0."""
    work = tmp_path_factory.mktemp("ddp_fit")
    write_dataset(work / "data", cases=5, seed=0, shape=(40, 40, 6), spacing=(1.6, 1.6, 4.0))
    previous = os.getcwd()
    os.chdir(work)
    try:
        main(["fit", *TINY, "--data.root", "data", "--data.batch_size", "8", "--trainer.max_epochs", "1",
              "--trainer.limit_train_batches", "2"])  # fmt: skip
    finally:
        os.chdir(previous)
    return work


def one_process(cwd: Path, argv: list[str], capfd) -> tuple[int, str]:
    """`la-seg ARGV` in this process, in `cwd`: exit status and stderr."""
    previous = os.getcwd()
    os.chdir(cwd)
    capfd.readouterr()
    try:
        main(argv)
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    finally:
        os.chdir(previous)
    return code, capfd.readouterr().err


def two_ranks(cwd: Path, argv: list[str]) -> subprocess.CompletedProcess:
    script = cwd / "late_rank.py"
    script.write_text(LATE_RANK)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    env.pop("LA_SEG_DEBUG", None)
    return subprocess.run([sys.executable, str(script), *argv, *DDP], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("la-seg: error:")]


def masks(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(nib.load(p).dataobj) for p in sorted(folder.glob("*.nii.gz"))}


def logged_test_loss(run: Path) -> float:
    events = EventAccumulator(str(run))
    events.Reload()
    return events.Scalars("test/loss")[-1].value


@pytest.mark.slow
@pytest.mark.parametrize("volumes", [0, 1, 2, 3, 5])
def test_predict_and_test_on_two_ranks_match_one_process(fitted, tmp_path, capfd, volumes):
    cases = tmp_path / "cases"
    cases.mkdir()
    for i in range(1, volumes + 1):
        shutil.copytree(fitted / "data" / f"train_{i}", cases / f"train_{i}")
    single, single_test, ddp = tmp_path / "single", tmp_path / "single_test", tmp_path / "ddp"
    single.mkdir()
    shutil.copytree(fitted / "runs", single_test / "runs")  # each test reports into its own copy of the run
    shutil.copytree(fitted / "runs", ddp / "runs")
    best = str(fitted / "runs" / "demo" / "version_0" / "checkpoints" / "best.ckpt")
    predict = ["predict", *TINY, "--data.predict_root", str(cases), "--writer.output_dir", "masks"]
    test = ["test", *TINY, "--data.test_root", str(cases)]

    code, err = one_process(single, [*predict, "--ckpt_path", best], capfd)
    predicted = two_ranks(ddp, [*predict, "--ckpt_path", "best"])
    if volumes == 0:  # nothing to segment: one clear line, from one process and from two alike
        assert code == 2 and predicted.returncode == 2, predicted.stderr[-3000:]
        assert (
            error_lines(err)
            == error_lines(predicted.stderr)
            == [f"la-seg: error: data root is an empty folder: {cases}"]
        )
        return
    assert code == 0, err[-3000:]
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    assert predicted.stderr.count("--ckpt_path best: using") == 1  # resolved once, on rank 0
    assert len(masks(single / "masks")) == volumes
    assert masks(ddp / "masks").keys() == masks(single / "masks").keys()
    for name, mask in masks(single / "masks").items():
        assert np.array_equal(masks(ddp / "masks")[name], mask), name
    assert (ddp / "masks" / "volumes.csv").read_text() == (single / "masks" / "volumes.csv").read_text()

    code, err = one_process(single_test, [*test, "--ckpt_path", "best"], capfd)
    assert code == 0, err[-3000:]
    tested = two_ranks(ddp, [*test, "--ckpt_path", "best"])
    assert tested.returncode == 0, tested.stderr[-3000:]
    assert tested.stderr.count("--ckpt_path best: using") == 1
    one_run, ddp_run = single_test / "runs" / "demo" / "version_0", ddp / "runs" / "demo" / "version_0"
    one_report = json.loads((one_run / "test_cases.json").read_text())  # named after data.test_root
    ddp_report = json.loads((ddp_run / "test_cases.json").read_text())
    assert [c["case_id"] for c in one_report["cases"]] == [f"train_{i}" for i in range(1, volumes + 1)]
    assert ddp_report["cases"] == one_report["cases"] and ddp_report["summary"] == one_report["summary"]
    # each case counted once (a repeated case once moved the mean by ~4e-4)
    assert logged_test_loss(ddp_run) == pytest.approx(logged_test_loss(one_run), rel=1e-6)


@pytest.mark.slow
def test_windows_of_a_wide_field_of_view_on_two_ranks_match_one_process(fitted, tmp_path, capfd):
    """Slices wider than the input are cut into overlapping windows and joined again: on two ranks, with
    fewer inputs per pass than a slice has windows, the probabilities and masks of one process."""
    write_dataset(tmp_path / "wide", cases=3, seed=2, shape=(48, 40, 5), spacing=(3.0, 3.0, 4.0))
    grid = slice_grid((48, 40), 28, "spacing", (3.0, 3.0), 4.0)  # TINY's input: 28 px of 4 mm
    assert len(plane_windows(grid.plane, 28)) == 4  # 144 x 120 mm on 112 x 112 mm windows: 2 x 2
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    single.mkdir()
    shutil.copytree(fitted / "runs", ddp / "runs")
    predict = ["predict", *TINY, "--data.predict_root", str(tmp_path / "wide"), "--writer.output_dir",
               "masks", "--writer.save_probabilities", "true", "--model.eval_batch_size", "6"]  # fmt: skip
    best = str(fitted / "runs" / "demo" / "version_0" / "checkpoints" / "best.ckpt")
    code, err = one_process(single, [*predict, "--ckpt_path", best], capfd)
    assert code == 0, err[-3000:]
    predicted = two_ranks(ddp, [*predict, "--ckpt_path", "best"])
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    one, two = masks(single / "masks"), masks(ddp / "masks")
    assert one.keys() == two.keys() and len(one) == 6  # a mask and a probability map per case
    for name, values in one.items():
        assert np.allclose(two[name], values, atol=1e-6), name
    probabilities = [values for name, values in one.items() if name.endswith("_prob.nii.gz")]
    assert all(p.shape == (48, 40, 5) and (p > 0).all() for p in probabilities)  # no 0 fill outside a crop


def close(a, b, tolerance: float = 1e-6) -> bool:
    """Whether two JSON-like values are equal, their floats to `tolerance` (numbers in strings too: CSV)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(close(a[k], b[k], tolerance) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(close(x, y, tolerance) for x, y in zip(a, b, strict=True))
    try:
        return a == b or abs(float(a) - float(b)) <= tolerance
    except (TypeError, ValueError):
        return False


@pytest.mark.slow
def test_voters_on_two_ranks_match_one_process(fitted, tmp_path, capfd):
    """With test-time views (model.tta gamma) every case has voters: masks, uncertainty maps, volumes.csv's
    agreement columns and the test report on two ranks are one process's, floats to rounding (each rank runs
    one OpenMP thread, the one process several, so sums differ in their last bits)."""
    single, single_test, ddp = tmp_path / "single", tmp_path / "single_test", tmp_path / "ddp"
    single.mkdir()
    shutil.copytree(fitted / "runs", single_test / "runs")
    shutil.copytree(fitted / "runs", ddp / "runs")
    cases = str(fitted / "data")
    best = str(fitted / "runs" / "demo" / "version_0" / "checkpoints" / "best.ckpt")
    voters = ["--model.tta", "gamma"]
    predict = ["predict", *TINY, *voters, "--data.predict_root", cases, "--writer.output_dir", "masks"]
    code, err = one_process(single, [*predict, "--ckpt_path", best], capfd)
    assert code == 0, err[-3000:]
    predicted = two_ranks(ddp, [*predict, "--ckpt_path", "best"])
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    one, two = masks(single / "masks"), masks(ddp / "masks")
    assert one.keys() == two.keys() and len(one) == 10  # a mask and an uncertainty map per case
    for name, values in one.items():
        if name.endswith("_uncertainty.nii.gz"):
            assert np.allclose(two[name], values, atol=1e-6) and values.max() > 0, name
        else:
            assert np.array_equal(two[name], values), name
    rows = [(folder / "masks" / "volumes.csv").read_text().splitlines() for folder in (single, ddp)]
    assert "mean_pairwise_dice" in rows[0][0]
    assert close([r.split(",") for r in rows[0]], [r.split(",") for r in rows[1]], 1e-4)  # 4 decimals

    test = ["test", *TINY, *voters, "--data.test_root", cases, "--ckpt_path", "best"]
    code, err = one_process(single_test, test, capfd)
    assert code == 0, err[-3000:]
    tested = two_ranks(ddp, test)
    assert tested.returncode == 0, tested.stderr[-3000:]
    one_run, ddp_run = single_test / "runs" / "demo" / "version_0", ddp / "runs" / "demo" / "version_0"
    reports = [json.loads((run / "test_data.json").read_text()) for run in (one_run, ddp_run)]
    assert all("mean_pairwise_dice" in json.dumps(case) for case in reports[0]["cases"])
    assert close(reports[1]["cases"], reports[0]["cases"], 1e-4)
    assert close(reports[1]["summary"], reports[0]["summary"], 1e-4)


# `la-seg` for a 2-rank fit recording, per rank, the cases its SliceDataset holds and every case it decodes.
RECORDING = """
import os
from la_seg.cli import main
from la_seg.data.cache import VolumeCache
from la_seg.data.datasets import SliceDataset

rank = os.environ.get("LOCAL_RANK", "0")
decode, init = VolumeCache._decode, SliceDataset.__init__

def recording_decode(self, case, with_labels):
    with open(f"decoded_{rank}.txt", "a") as out:
        out.write(case.case_id + "\\n")
    return decode(self, case, with_labels)

def recording_init(self, cases, *args, **kwargs):
    with open(f"train_{rank}.txt", "a") as out:
        out.write(" ".join(case.case_id for case in cases) + "\\n")
    init(self, cases, *args, **kwargs)

VolumeCache._decode, SliceDataset.__init__ = recording_decode, recording_init
main()
"""


@pytest.mark.slow
def test_two_rank_fit_decodes_each_training_case_on_one_rank_only(tmp_path):
    """Issue 16.6: each rank decodes and keeps its own training cases, not all of them; training validates.
    Too few training cases for the ranks end with one error line."""
    write_dataset(tmp_path / "data", cases=5, seed=0, shape=(40, 40, 6), spacing=(1.6, 1.6, 4.0))
    script = tmp_path / "recording.py"
    script.write_text(RECORDING)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    env.pop("LA_SEG_DEBUG", None)
    fit = ["fit", *TINY, "--data.root", "data", "--data.batch_size", "4", "--trainer.max_epochs", "2"]
    run = subprocess.run([sys.executable, str(script), *fit, *DDP], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    log = tmp_path / "runs" / "demo" / "version_0"
    train = json.loads((log / "split.json").read_text())["train"]
    assert len(train) == 3
    held = [(tmp_path / f"train_{rank}.txt").read_text().split() for rank in (0, 1)]
    assert sorted(held[0] + held[1]) == sorted(train) and held[0] and held[1]  # disjoint, covering
    for rank in (0, 1):
        decoded = (tmp_path / f"decoded_{rank}.txt").read_text().split()
        assert sorted(c for c in decoded if c in train) == sorted(held[rank])  # its own, each once
    events = EventAccumulator(str(log))
    events.Reload()
    assert len(events.Scalars("val/loss")) == 2  # validated after each epoch
    said = re.search(r"(\d+) slices of 3 cases dealt to 2 processes, each drawing (\d+) slices", run.stderr)
    slices, per_rank = int(said[1]), int(said[2])
    assert per_rank == -(-slices // 2) and run.stderr.count("dealt to 2 processes") == 1
    last = torch.load(log / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 2 * -(-per_rank // 4)  # batches of 4, both epochs, in step on both ranks

    # every case equally often: the cases are dealt one each (3 cases: 2 and 1), the ranks still in step
    cases = subprocess.run([sys.executable, str(script), *fit, "--data.sampling", "cases", *DDP],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert cases.returncode == 0, cases.stderr[-3000:]
    held = [(tmp_path / f"train_{rank}.txt").read_text().splitlines()[-1].split() for rank in (0, 1)]
    assert sorted(held[0] + held[1]) == sorted(train) and sorted(map(len, held)) == [1, 2]
    second = log.parent / "version_1" / "checkpoints" / "last.ckpt"
    last = torch.load(second, map_location="cpu", weights_only=True)
    assert last["global_step"] == 2 * -(-per_rank // 4)  # the same steps as drawing each slice once

    few = subprocess.run([sys.executable, str(script), *fit, "--data.split", "[0.2, 0.4, 0.4]", *DDP],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert few.returncode == 2, few.stderr[-3000:]
    assert error_lines(few.stderr) == [
        "la-seg: error: 1 training case for 2 DDP processes: each process trains on cases of its own, so "
        "training needs at least 2 cases (more training cases in data.split / data.split_file, or fewer "
        "trainer.devices x trainer.num_nodes)"
    ]
