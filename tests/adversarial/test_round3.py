"""Reliability, round 3 (issue 30): two runs into one folder, options that would delete an input, damaged
checkpoints, training that diverges, references that are images, configs with a key twice, Ctrl-C, the
unclear one-liners (absurd spacing, a NIfTI-2 size beyond 64 bits, a damaged disk cache, a full disk inside
torch's writer, a FIFO as a root) and the report's empty HD95 cell.

Races run real `la-seg` processes, the second started while the first holds its output folder.
"""

from __future__ import annotations

import csv
import errno
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import TINY, Result, assert_refused, la_seg_subprocess, snapshot
from hostile import phantom, save_nifti, valid_image

from la_seg.data.split import DataSplit
from la_seg.data.synthetic import write_dataset

RACE_CASES = 30  # each run works for seconds after its ~7 s start: long enough to interrupt


# `la-seg` whose first FolderLock, once taken, is held until the test lets go, when LA_SEG_TEST_HELD names a
# file (it appears when the lock is taken; the same name with ".release" lets go): the second run meets a
# held folder on any machine, however loaded (two runs merely started together once did not overlap).
HOLDING = """
import os, time
from pathlib import Path
from la_seg.atomic import FolderLock
from la_seg.cli import main

acquire = FolderLock.acquire
held = Path(os.environ.get("LA_SEG_TEST_HELD", ""))

def holding(self):
    acquire(self)
    if held.name and not held.exists():
        held.write_text(str(os.getpid()))
        deadline = time.monotonic() + 300
        while not held.with_suffix(".release").exists() and time.monotonic() < deadline:
            time.sleep(0.05)

FolderLock.acquire = holding
main()
"""


def wait_for_file(path: Path, process: subprocess.Popen) -> None:
    """Wait (up to 300 s) until the hooked la-seg PROCESS writes PATH, or ends without it."""
    deadline = time.monotonic() + 300
    while not path.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)


def second_while_first_holds(argv_a: list[str], argv_b: list[str], cwd: Path) -> list[tuple[int, Result]]:
    """Run `la-seg ARGV_A` and, while it holds its output folder, `la-seg ARGV_B`; (pid, result) of each."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    env.pop("LA_SEG_DEBUG", None)
    script, held = cwd / "holding.py", cwd / "held"
    script.write_text(HOLDING)

    def start(argv: list[str], **extra: str) -> subprocess.Popen:
        command = [sys.executable, str(script), *map(str, argv)]
        return subprocess.Popen(command, cwd=cwd, env={**env, **extra}, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)  # fmt: skip

    first = start(argv_a, LA_SEG_TEST_HELD=str(held))
    wait_for_file(held, first)
    second = start(argv_b)
    out, err = second.communicate(timeout=600)
    held.with_suffix(".release").touch()
    results = [(second.pid, Result(second.returncode, out, err))]
    out, err = first.communicate(timeout=600)
    return [(first.pid, Result(first.returncode, out, err)), *results]


def one_wins(results: list[tuple[int, Result]], folder: Path) -> int:
    """Exactly one run worked; the other was refused in one line naming the folder and the winner's pid."""
    codes = sorted(result.code for _, result in results)
    printed = [result.err[-2000:] for _, result in results]
    assert codes == [0, 2], printed
    (winner,) = [pid for pid, result in results if result.code == 0]
    (loser,) = [result for _, result in results if result.code == 2]
    assert "Traceback" not in loser.out + loser.err
    assert len(loser.error_lines) == 1 and loser.err.strip().splitlines()[-1] == loser.error_lines[0]
    line = loser.error_lines[0]
    assert str(folder) in line and "in use by another la-seg run" in line and f"pid {winner}" in line, line
    return winner


def relative_snapshot(root: Path) -> dict[Path, str]:
    """`snapshot(root)` keyed by the path inside `root`."""
    return {Path(k).relative_to(root): v for k, v in snapshot(root).items()}


@pytest.fixture(scope="module")
def race_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("race")
    write_dataset(root, cases=RACE_CASES, seed=0)
    return root


# ---- lost outputs: every command that writes a folder holds it -------------------------------------------
@pytest.mark.slow
def test_two_synth_runs_into_one_folder(tmp_path):
    out = tmp_path / "out"
    results = second_while_first_holds(
        ["synth", "--out", out, "--cases", RACE_CASES, "--seed", "1"],
        ["synth", "--out", out, "--cases", RACE_CASES, "--seed", "2"],
        tmp_path,
    )
    one_wins(results, out)
    (seed,) = [i + 1 for i, (_, result) in enumerate(results) if result.code == 0]
    write_dataset(tmp_path / "expected", cases=RACE_CASES, seed=seed)
    assert relative_snapshot(out) == relative_snapshot(tmp_path / "expected")


@pytest.mark.slow
def test_two_exports_into_one_folder(tmp_path, race_root):
    out = tmp_path / "raw"
    export = ["export-nnunet", "--data.root", race_root, "--out", out]
    one_wins(second_while_first_holds(export, export, tmp_path), out / "Dataset501_LA")
    assert len(list((out / "Dataset501_LA" / "imagesTr").iterdir())) == RACE_CASES
    assert sorted(p.name for p in out.iterdir()) == ["Dataset501_LA"], "no lock or staging folder left"


@pytest.mark.slow
def test_two_evaluations_into_one_folder(tmp_path, race_root):
    pred = tmp_path / "pred"
    pred.mkdir()
    for case in race_root.iterdir():
        os.symlink(case / "atriumSegImgMO.nii.gz", pred / f"{case.name}.nii.gz")
    out = tmp_path / "report"
    evaluate = ["evaluate", "--pred", pred, "--ref", race_root, "--out", out]
    one_wins(second_while_first_holds(evaluate, evaluate, tmp_path), out)
    assert sorted(p.name for p in out.iterdir()) == ["test_metrics.csv", "test_metrics.json"]


def test_a_refused_evaluation_leaves_no_folder(la_seg, tmp_path, synth_root):
    """The lock is taken before the report's folder exists: a refusal must not leave an empty one behind."""
    pred = tmp_path / "pred"
    pred.mkdir()
    result = la_seg("evaluate", "--pred", pred, "--ref", synth_root, "--out", tmp_path / "report")
    assert result.code == 2
    assert not (tmp_path / "report").exists()


# ---- lost outputs: --overwrite never deletes an input ------------------------------------------------------
def test_export_overwrite_never_deletes_its_split_file(la_seg, tmp_path, synth_root):
    out = tmp_path / "raw"
    assert la_seg("export-nnunet", "--data.root", synth_root, "--out", out).code == 0
    split = out / "Dataset501_LA" / "la_seg_split.json"
    ids = sorted(p.name for p in synth_root.iterdir())
    split.write_text(json.dumps(DataSplit({"train": ids[:4], "val": ids[4:5], "test": ids[5:]}).to_record()))
    before = snapshot(out, synth_root)
    result = la_seg("export-nnunet", "--data.root", synth_root, "--out", out, "--split", split,
                    "--overwrite", "true")  # fmt: skip
    assert_refused(result, str(split), before, out, synth_root)


# ---- silent results: damaged and diverged checkpoints, training that diverges ---------------------------
def flip_a_bit_in_the_weights(checkpoint: Path, copy: Path) -> Path:
    """`copy`: `checkpoint` with one bit flipped in the middle of its largest tensor record (stored, not
    compressed: the zip's CRC of that record no longer matches)."""
    data = bytearray(checkpoint.read_bytes())
    with zipfile.ZipFile(checkpoint) as archive:
        record = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    name_length, extra_length = struct.unpack(
        "<HH", data[record.header_offset + 26 : record.header_offset + 30]
    )
    start = record.header_offset + 30 + name_length + extra_length
    data[start + record.file_size // 2] ^= 0x10
    copy.write_bytes(bytes(data))
    return copy


def test_a_checkpoint_with_a_flipped_bit_is_refused(la_seg, trained_checkpoint, tmp_path):
    damaged = flip_a_bit_in_the_weights(trained_checkpoint, tmp_path / "damaged.ckpt")
    image = valid_image(tmp_path / "in")
    result = la_seg("predict", *TINY, "--ckpt_path", damaged, "--data.predict_root", image,
                    "--writer.output_dir", tmp_path / "out")  # fmt: skip
    assert_refused(result, str(damaged), snapshot(tmp_path / "in"), tmp_path / "in")
    assert "checksum" in result.error_lines[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("fault", ["nan_weights", "net_not_a_mapping", "hyper_parameters_a_list"])
def test_a_checkpoint_la_seg_cannot_use_is_refused(fault, la_seg, trained_checkpoint, tmp_path):
    import torch

    state = torch.load(trained_checkpoint, map_location="cpu", weights_only=True)
    if fault == "nan_weights":  # what a diverged fit saved before la-seg refused to write it
        name = next(k for k, v in state["state_dict"].items() if v.is_floating_point())
        state["state_dict"][name].fill_(float("nan"))
    elif fault == "net_not_a_mapping":
        state["hyper_parameters"]["net"] = "vit"
    else:
        state["hyper_parameters"] = [1, 2]
    torch.save(state, tmp_path / "bad.ckpt")
    image = valid_image(tmp_path / "in")
    result = la_seg("predict", *TINY, "--ckpt_path", tmp_path / "bad.ckpt", "--data.predict_root", image,
                    "--writer.output_dir", tmp_path / "out")  # fmt: skip
    assert_refused(result, str(tmp_path / "bad.ckpt"), snapshot(tmp_path / "in"), tmp_path / "in")


def test_training_that_diverges_stops_without_a_checkpoint(la_seg, tmp_path, synth_root):
    result = la_seg("fit", *TINY, "--data.root", synth_root, "--trainer.max_epochs", "2",
                    "--trainer.limit_train_batches", "3", "--model.lr", "1e8")  # fmt: skip
    assert_refused(result, "--model.lr", snapshot(synth_root), synth_root)
    assert "training diverged" in result.error_lines[0] and "epoch 0" in result.error_lines[0]
    assert not list(tmp_path.rglob("*.ckpt")), "a checkpoint of a diverged fit was written"


def test_evaluate_refuses_references_that_are_images(la_seg, tmp_path, synth_root):
    """int16 scans as --ref: every non-zero grey value would count as LA and the Dice pass as a score."""
    pred, ref = tmp_path / "pred", tmp_path / "ref"
    pred.mkdir()
    ref.mkdir()
    for case in sorted(synth_root.iterdir()):
        shutil.copy(case / "atriumSegImgMO.nii.gz", pred / f"{case.name}.nii.gz")
        shutil.copy(case / "enhanced.nii.gz", ref / f"{case.name}.nii.gz")
    result = la_seg("evaluate", "--pred", pred, "--ref", ref, "--out", tmp_path / "report")
    assert_refused(result, str(ref), snapshot(pred, ref), pred, ref)
    assert "distinct values" in result.error_lines[0]
    assert not (tmp_path / "report").exists()


# ---- configs: a key twice, aliases without bound ----------------------------------------------------------
@pytest.mark.parametrize(
    ("content", "named"),
    [
        ("data:\n  batch_size: 4\ntrainer:\n  max_epochs: 1\ndata:\n  num_workers: 0\n", "'data'"),
        ("model:\n  lr: 0.1\n  lr: 0.01\n", "'lr'"),
    ],
    ids=["section", "field"],
)
def test_a_config_with_a_key_twice_is_refused(content, named, la_seg, tmp_path, synth_root):
    config = tmp_path / "twice.yaml"
    config.write_text(content)
    result = la_seg("fit", *TINY, "--config", config, "--data.root", synth_root)
    assert_refused(result, str(config), snapshot(synth_root), synth_root)
    assert named in result.error_lines[0] and "twice" in result.error_lines[0]


def alias_bomb(levels: int) -> str:
    """A "billion laughs": each level a list of ten aliases of the one before (10**levels values)."""
    lines = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]")
    return "\n".join([*lines, f"model:\n  net:\n    indices: *a{levels - 1}\n"])


@pytest.mark.parametrize("levels", [9, 5])
def test_a_config_alias_bomb_is_bounded(levels, la_seg, tmp_path, synth_root):
    config = tmp_path / "bomb.yaml"
    config.write_text(alias_bomb(levels))
    start = time.monotonic()
    result = la_seg("fit", *TINY, "--config", config, "--data.root", synth_root)
    assert time.monotonic() - start < 60
    assert_refused(result, str(config), snapshot(synth_root), synth_root)
    assert len(result.error_lines[0]) < 2500


# ---- interrupts: Ctrl-C like SIGTERM ---------------------------------------------------------------------
# `la-seg` that pauses once `module.function` has returned AFTER times (LA_SEG_TEST_PAUSE holds "module
# function AFTER marker"): it writes the marker file and waits there, so Ctrl-C lands mid-run on any machine,
# however loaded (polling its output for progress once raced a run that finished first on two busy cores).
PAUSING = """
import importlib, os, time
from pathlib import Path
from la_seg.cli import main

module_name, function, after, marker = os.environ["LA_SEG_TEST_PAUSE"].split()
module = importlib.import_module(module_name)
real, calls = getattr(module, function), []

def pausing(*args, **kwargs):
    result = real(*args, **kwargs)
    calls.append(1)
    if len(calls) == int(after):
        Path(marker).write_text(str(os.getpid()))
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            time.sleep(0.05)
    return result

setattr(module, function, pausing)
main()
"""


def interrupted(argv: list[str], cwd: Path, pause_after: tuple[str, str, int]) -> Result:
    """Run `la-seg ARGV` as a process and send it SIGINT (Ctrl-C) where it pauses: once the function named by
    PAUSE_AFTER (module, function, calls) has returned that many times."""
    marker, script = cwd / "paused", cwd / "pausing.py"
    script.write_text(PAUSING)
    module, function, after = pause_after
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
           "LA_SEG_TEST_PAUSE": f"{module} {function} {after} {marker}"}  # fmt: skip
    env.pop("LA_SEG_DEBUG", None)
    # Ctrl-C as at a terminal, whose foreground command has SIGINT's default action even where this test
    # runs from a background job (which ignores SIGINT, and so would its children)
    default_sigint = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)  # noqa: E731
    process = subprocess.Popen([sys.executable, str(script), *map(str, argv)], cwd=cwd, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=default_sigint)  # fmt: skip
    try:
        wait_for_file(marker, process)
        assert marker.exists(), f"la-seg {argv[0]} never paused after {after} call(s) of {module}.{function}"
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=300)
    finally:
        process.kill()
    return Result(process.returncode, out, err)


def stopped_by_sigint(result: Result) -> None:
    printed = result.out + result.err
    assert "Traceback" not in printed, printed[-3000:]
    assert result.code == 130, printed[-3000:]
    assert result.err.strip().splitlines()[-1].startswith("la-seg: stopped by SIGINT"), printed[-3000:]


@pytest.mark.slow
def test_ctrl_c_during_synth_then_a_rerun_completes(tmp_path):
    out = tmp_path / "out"
    synth = ["synth", "--out", out, "--cases", RACE_CASES]
    # after case 1 and case 2's image: Ctrl-C lands with a half-written case in its staging folder
    stopped_by_sigint(interrupted(synth, tmp_path, ("la_seg.data.synthetic", "write_nifti", 3)))
    assert (out / "train_1").is_dir() and not (out / "train_2").exists()
    assert not list(out.glob(".*partial")) and not (out / ".la-seg.lock").exists()
    rerun = la_seg_subprocess(synth, tmp_path)
    assert rerun.code == 0, rerun.err[-3000:]
    write_dataset(tmp_path / "expected", cases=RACE_CASES, seed=0)
    assert relative_snapshot(out) == relative_snapshot(tmp_path / "expected")


@pytest.mark.slow
def test_ctrl_c_during_export_then_a_rerun_completes(tmp_path, race_root):
    out = tmp_path / "raw"
    export = ["export-nnunet", "--data.root", race_root, "--out", out]
    stopped_by_sigint(interrupted(export, tmp_path, ("la_seg.nnunet", "write_case", 1)))
    assert not out.exists() or not list(out.iterdir()), "no staging folder, lock or partial export left"
    rerun = la_seg_subprocess(export, tmp_path)
    assert rerun.code == 0, rerun.err[-3000:]
    assert len(list((out / "Dataset501_LA" / "imagesTr").iterdir())) == RACE_CASES


# ---- unclear one-liners: each names the file or option and says what is wrong ----------------------------
def predicting(checkpoint: Path, source: Path, out: Path, *extra: str) -> list:
    return ["predict", *TINY, "--ckpt_path", checkpoint, "--data.predict_root", source, "--writer.output_dir",
            out, *extra]  # fmt: skip


def test_an_absurd_spacing_is_refused_before_resampling(la_seg, trained_checkpoint, tmp_path):
    """1e6 mm voxels resampled to target_spacing would allocate petabytes: refused naming file and spacing."""
    image = save_nifti(tmp_path / "in" / "case.nii.gz", phantom()[0], np.diag([1e6, 1e6, 1e6, 1.0]))
    result = la_seg(*predicting(trained_checkpoint, image, tmp_path / "out"))
    assert_refused(result, str(image), snapshot(tmp_path / "in"), tmp_path / "in")
    assert "1e+06 x 1e+06 mm" in result.error_lines[0] and "target_spacing" in result.error_lines[0]


def test_a_nifti2_header_beyond_64_bits_is_refused(la_seg, trained_checkpoint, tmp_path):
    """2**62 x 2**62 x 4 voxels: an int64 product wraps to 0 and passed the memory check."""
    header = nib.Nifti2Header()
    header.set_data_dtype(np.int16)
    header.set_data_shape((2**62, 2**62, 4))
    header.set_zooms((1.0, 1.0, 1.0))
    header.set_sform(np.eye(4), code=1)
    image = tmp_path / "in" / "case.nii"
    image.parent.mkdir()
    image.write_bytes(header.binaryblock + b"\x00" * 4 + b"\x00" * 1024)
    result = la_seg(*predicting(trained_checkpoint, image, tmp_path / "out"))
    assert_refused(result, str(image), snapshot(tmp_path / "in"), tmp_path / "in")
    assert "memory" in result.error_lines[0]


@pytest.mark.parametrize("damage", ["truncated", "object_array"])
def test_a_damaged_disk_cache_entry_is_named_and_rebuilt(damage, la_seg, trained_checkpoint, tmp_path):
    image, cache = valid_image(tmp_path / "in"), tmp_path / "cache"
    cached = ["--data.cache", "disk", "--data.cache_dir", cache]
    assert la_seg(*predicting(trained_checkpoint, image, tmp_path / "first", *cached)).code == 0
    (entry,) = cache.glob("*.image.npy")
    if damage == "truncated":
        entry.write_bytes(entry.read_bytes()[:-100])
    else:
        np.save(entry, np.array([1, 2, 3], dtype=object), allow_pickle=True)
    with pytest.warns(UserWarning, match="damaged entry") as warned:
        result = la_seg(*predicting(trained_checkpoint, image, tmp_path / "second", *cached))
    assert result.code == 0 and "Traceback" not in result.err, result.err[-3000:]
    (damaged,) = [str(w.message) for w in warned if "damaged entry" in str(w.message)]  # not Lightning's
    assert str(cache) in damaged
    masks = [nib.load(tmp_path / run / "case.nii.gz").get_fdata() for run in ("first", "second")]
    assert np.array_equal(*masks)
    assert np.load(entry, mmap_mode="r").dtype == np.float16  # rebuilt


def test_a_full_disk_inside_torchs_zip_writer_names_the_folder(la_seg, tmp_path, synth_root, monkeypatch):
    """torch's writer turns the OSError of a full disk into RuntimeError('... unexpected pos N vs M')."""
    import torch

    real_save = torch.save

    class FullDisk:
        """A file on a disk with 20 kB left: a write beyond fails as a full disk does."""

        def __init__(self, handle) -> None:
            self.handle, self.left = handle, 20_000

        def write(self, data) -> int:
            if len(data) > self.left:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self.left -= len(data)
            return self.handle.write(data)

        def flush(self) -> None:
            self.handle.flush()

    monkeypatch.setattr(torch, "save", lambda obj, f, *args, **kw: real_save(obj, FullDisk(f), *args, **kw))
    result = la_seg("fit", *TINY, "--data.root", synth_root, "--trainer.max_epochs", "1",
                    "--trainer.limit_train_batches", "2")  # fmt: skip
    folder = tmp_path / "runs" / "demo" / "version_0" / "checkpoints"
    assert_refused(result, str(folder), snapshot(synth_root), synth_root)
    assert "no space left" in result.error_lines[0]
    assert not list(tmp_path.rglob("*.ckpt")), "a checkpoint that could not be written is under a final name"


@pytest.mark.parametrize("option", ["--data.root", "--data.predict_root", "--ref", "--pred"])
def test_a_fifo_as_a_root_is_refused(option, la_seg, trained_checkpoint, tmp_path, synth_root):
    fifo, masks = tmp_path / "case.nii.gz", tmp_path / "masks"
    os.mkfifo(fifo)
    masks.mkdir()
    shutil.copy(synth_root / "train_1" / "atriumSegImgMO.nii.gz", masks / "train_1.nii.gz")
    argv = {
        "--data.root": ["fit", *TINY, "--data.root", fifo],
        "--data.predict_root": predicting(trained_checkpoint, fifo, tmp_path / "out"),
        "--ref": ["evaluate", "--pred", masks, "--ref", fifo, "--out", tmp_path / "report"],
        "--pred": ["evaluate", "--pred", fifo, "--ref", synth_root, "--out", tmp_path / "report"],
    }[option]
    start = time.monotonic()
    result = la_seg(*argv)
    assert time.monotonic() - start < 60
    assert_refused(result, str(fifo), snapshot(synth_root), synth_root)
    assert "FIFO" in result.error_lines[0]


# ---- also: a failed case's HD95 is an empty CSV cell, null in the JSON (README "The test report") --------
def test_an_undefined_hd95_is_an_empty_csv_cell_and_null_in_json(la_seg, tmp_path, synth_root):
    pred = tmp_path / "pred"
    pred.mkdir()
    for case in sorted(synth_root.iterdir()):
        shutil.copy(case / "atriumSegImgMO.nii.gz", pred / f"{case.name}.nii.gz")
    label = nib.load(pred / "train_1.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros(label.shape, np.uint8), label.affine), pred / "train_1.nii.gz")
    assert la_seg("evaluate", "--pred", pred, "--ref", synth_root, "--out", tmp_path / "report").code == 0
    with open(tmp_path / "report" / "test_metrics.csv", newline="") as handle:
        rows = {row["case_id"]: row for row in csv.DictReader(handle)}
    failed = rows["train_1"]
    assert (failed["failed"], failed["hd95_mm"], failed["assd_mm"]) == ("1", "", "")
    assert float(rows["train_2"]["hd95_mm"]) == 0.0
    cases = json.loads((tmp_path / "report" / "test_metrics.json").read_text())["cases"]
    assert [case["hd95_mm"] for case in cases if case["case_id"] == "train_1"] == [None]
