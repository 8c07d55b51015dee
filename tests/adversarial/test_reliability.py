"""Reliability, round 2 (issue 18): signals, full disks, loops in the data tree, and the last silent results.

Each test drives `la-seg` in this process where the subject is not the process itself; those that need a
process of their own (a real SIGTERM, file modes that root ignores) run one and carry the `slow` marker.
"""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np
import pytest
from conftest import TINY, assert_no_partial_outputs, assert_refused, la_seg_subprocess, snapshot
from hostile import phantom, valid_image

NO_DAC = [
    "setpriv",
    "--bounding-set",
    "-dac_override,-dac_read_search",
]  # root without its file-mode override


def predict(checkpoint: Path, source: Path, output_dir: Path, *extra: str) -> list[str]:
    return ["predict", *TINY, "--ckpt_path", str(checkpoint), "--data.predict_root", str(source),
            "--writer.output_dir", str(output_dir), *extra]  # fmt: skip


def utah_nrrd(path: Path, seed: int = 0, **header) -> Path:
    """An NRRD as 3D Slicer writes it: LPS space, space directions and origin, gzip encoding."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = {
        "space": "left-posterior-superior",
        "space directions": np.diag([1.6, 1.6, 4.0]),
        "space origin": np.array([-38.4, -35.2, -20.0]),
        "kinds": ["domain", "domain", "domain"],
        "encoding": "gzip",
    } | header
    nrrd.write(str(path), phantom(seed)[0], fields)
    return path


# ---- 8 and 11: never write into the input, one rule --------------------------------------------------------
def test_output_inside_a_single_input_files_folder_is_refused(la_seg, trained_checkpoint, tmp_path):
    """The folder rule holds for a single input file too (README): in/n.nrrd -> in/masks is refused."""
    source = utah_nrrd(tmp_path / "in" / "n.nrrd")
    before = snapshot(tmp_path / "in")
    result = la_seg(*predict(trained_checkpoint, source, tmp_path / "in" / "masks"))
    assert_refused(result, "--writer.output_dir", before, tmp_path / "in")
    assert not (tmp_path / "in" / "masks").exists()


def test_output_into_the_labelled_training_data_is_refused(la_seg, trained_checkpoint, tmp_path, synth_root):
    root = tmp_path / "train_data"
    shutil.copytree(synth_root, root)
    image = valid_image(tmp_path / "new")
    before = snapshot(root)
    result = la_seg(*predict(trained_checkpoint, image, root, "--data.root", str(root)))
    assert_refused(result, str(root), before, root)
    assert not list(root.glob("*.nii.gz")) and not (root / "volumes.csv").exists()


# ---- 1: a full disk while a checkpoint is written ----------------------------------------------------------
class FullDisk:
    """The disk holding `disk` (the run folder) with `budget` bytes left; other folders (/tmp) are on another
    disk. The writes that put checkpoints there (torch.save into a file; a move from another disk, which
    copies) write up to the budget, then raise ENOSPC as a full disk does. In-memory targets are not disks."""

    def __init__(self, monkeypatch, disk: Path, budget: int) -> None:
        import shutil as shutil_module

        import torch

        self.disk, self.left = disk.resolve(), budget
        real_save, real_move = torch.save, shutil_module.move

        def save(obj, f, *args, **kwargs):
            target = f if isinstance(f, (str, os.PathLike)) else getattr(f, "name", None)
            if not isinstance(target, (str, os.PathLike)) or not self.holds(target):
                return real_save(obj, f, *args, **kwargs)
            buffer = io.BytesIO()
            real_save(obj, buffer, *args, **kwargs)
            if isinstance(f, (str, os.PathLike)):
                with open(f, "wb") as handle:
                    return self.write(handle, buffer.getvalue())
            return self.write(f, buffer.getvalue())

        def move(src, dst, *args, **kwargs):
            if self.holds(src) or not self.holds(dst):
                return real_move(src, dst, *args, **kwargs)  # a rename, or not onto the full disk
            with open(dst, "wb") as handle:  # across disks a move copies
                self.write(handle, Path(src).read_bytes())
            os.remove(src)
            return dst

        monkeypatch.setattr(torch, "save", save)
        monkeypatch.setattr(shutil_module, "move", move)

    def holds(self, path) -> bool:
        return Path(path).absolute().resolve().is_relative_to(self.disk)

    def write(self, handle, data: bytes) -> None:
        handle.write(data[: max(self.left, 0)])
        self.left -= len(data)
        if self.left < 0:
            handle.flush()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_full_disk_while_a_checkpoint_is_written(la_seg, tmp_path, synth_root, monkeypatch):
    """No truncated checkpoint under a final name (where --ckpt_path best/last would pick it up), and the
    error names the run's folder that is full, not a temporary file elsewhere."""
    import torch

    FullDisk(monkeypatch, tmp_path, budget=20_000)
    result = la_seg("fit", *TINY, "--data.root", str(synth_root), "--trainer.max_epochs", "1",
                    "--trainer.limit_train_batches", "2")  # fmt: skip
    folder = tmp_path / "runs" / "demo" / "version_0" / "checkpoints"
    assert_refused(result, str(folder), snapshot(synth_root), synth_root)
    assert "no space left" in result.error_lines[0]
    for checkpoint in tmp_path.rglob("*.ckpt"):
        torch.load(checkpoint, map_location="cpu", weights_only=True)  # complete, or not there at all
    assert not [p for p in folder.iterdir() if p.name.startswith(".")] if folder.exists() else True


# ---- 2: loops in the data tree -----------------------------------------------------------------------------
@contextmanager
def deadline(seconds: int):
    """Fail instead of hanging (a search that follows a link loop runs for minutes while its memory grows)."""

    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("command", ["test", "predict"])
def test_link_loops_in_the_data_tree_are_followed_once_and_named(
    command, la_seg, trained_checkpoint, tmp_path, synth_root
):
    root = tmp_path / "data"
    shutil.copytree(synth_root, root)
    (root / "loop").symlink_to(".")
    (root / "train_1" / "up").symlink_to("..")
    (root / "again").symlink_to(root / "train_2")  # a second way to a case folder: searched once too
    before = snapshot(*[p for p in root.iterdir() if not p.is_symlink()])
    if command == "test":
        argv = ["test", *TINY, "--ckpt_path", str(trained_checkpoint), "--data.test_root", str(root)]
    else:
        argv = predict(trained_checkpoint, root, tmp_path / "out")
    with deadline(60), pytest.warns(UserWarning, match="link loop") as warned:
        result = la_seg(*argv)
    assert result.code == 0, result.err[-3000:]
    named = " ".join(str(w.message) for w in warned)
    assert str(root / "loop") in named and str(root / "train_1" / "up") in named
    if command == "predict":  # every real case folder once, under its own name
        assert sorted(p.name for p in (tmp_path / "out").glob("*.nii.gz")) == [f"train_{i}.nii.gz" for i in
                                                                                range(1, 7)]  # fmt: skip
    assert snapshot(*[p for p in root.iterdir() if not p.is_symlink()]) == before


# ---- 4: sheared affines ------------------------------------------------------------------------------------
def test_sheared_affine_volume_from_the_determinant_and_a_warning(la_seg, trained_checkpoint, tmp_path):
    affine = np.diag([1.6, 1.6, 4.0, 1.0])
    affine[0, 2] = 2.0  # the slice axis leans: column norms overstate the voxel volume by 1/cos
    image = tmp_path / "in" / "sheared.nii.gz"
    image.parent.mkdir()
    nib.save(nib.Nifti1Image(phantom()[0], affine), image)
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match="sheared.nii.gz has non-orthogonal"):
        result = la_seg(*predict(trained_checkpoint, image, out, "--model.threshold", "0.01"))
    assert result.code == 0, result.err[-3000:]
    voxels = int(np.asanyarray(nib.load(out / "sheared.nii.gz").dataobj).sum())
    assert voxels > 0
    reported = float((out / "volumes.csv").read_text().splitlines()[1].split(",")[1])
    expected = voxels * abs(np.linalg.det(affine[:3, :3])) / 1000
    assert reported == pytest.approx(expected, rel=1e-3, abs=1e-3), (reported, expected)


# ---- 5: files la-seg does not read, beside files it does ---------------------------------------------------
def metaimage(path: Path, data: np.ndarray) -> Path:
    """A MetaImage (.mha) as ITK writes it: a text header, then the voxels."""
    header = (
        "ObjectType = Image\nNDims = 3\nBinaryData = True\nBinaryDataByteOrderMSB = False\n"
        "CompressedData = False\nTransformMatrix = 1 0 0 0 1 0 0 0 1\nOffset = 0 0 0\n"
        "AnatomicalOrientation = RAI\nElementSpacing = 1.6 1.6 4\n"
        f"DimSize = {' '.join(map(str, data.shape))}\nElementType = MET_SHORT\nElementDataFile = LOCAL\n"
    )
    path.write_bytes(header.encode() + data.astype("<i2").tobytes(order="F"))
    return path


def test_detached_nrrd_is_read_and_other_images_are_named(la_seg, trained_checkpoint, tmp_path):
    inputs = tmp_path / "in"
    valid_image(inputs, "c.nii.gz")
    utah_nrrd(inputs / "b.nhdr", seed=1, encoding="raw")  # pynrrd writes b.nhdr + its data file b.raw
    assert (inputs / "b.raw").is_file()
    metaimage(inputs / "m.mha", phantom(2)[0])
    (inputs / "notes.txt").write_text("not an image\n")
    before = snapshot(inputs)
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match="look like images") as warned:
        result = la_seg(*predict(trained_checkpoint, inputs, out))
    assert result.code == 0, result.err[-3000:]
    assert sorted(p.name for p in out.glob("*.nii.gz")) == ["b.nii.gz", "c.nii.gz"]
    named = " ".join(str(w.message) for w in warned if "look like images" in str(w.message))
    assert str(inputs / "m.mha") in named and "b.raw" not in named and "notes.txt" not in named
    assert snapshot(inputs) == before


def test_detached_nrrd_without_its_data_file_is_named(la_seg, trained_checkpoint, tmp_path):
    inputs = tmp_path / "in"
    utah_nrrd(inputs / "b.nhdr", encoding="raw")
    (inputs / "b.raw").unlink()
    before = snapshot(inputs)
    result = la_seg(*predict(trained_checkpoint, inputs, tmp_path / "out"))
    assert_refused(result, "b.nhdr", before, inputs, output_dir=tmp_path / "out")


# ---- 6: an unknown NRRD space ------------------------------------------------------------------------------
@pytest.mark.parametrize("space", ["upside-down-sideways", "left-left-superior", "XYZ"])
def test_unknown_nrrd_space_is_refused(space, la_seg, trained_checkpoint, tmp_path):
    source = utah_nrrd(tmp_path / "in" / "scan.nrrd", space=space)
    before = snapshot(tmp_path / "in")
    result = la_seg(*predict(trained_checkpoint, source, tmp_path / "out"))
    assert_refused(result, "scan.nrrd", before, tmp_path / "in", output_dir=tmp_path / "out")
    assert "space" in result.error_lines[0]


# ---- 7: case ids from the resolved path --------------------------------------------------------------------
@pytest.mark.parametrize("given", [".", "..", "./", "../."])
def test_predict_root_dot_or_dotdot_names_the_case_after_the_folder(
    given, la_seg, trained_checkpoint, tmp_path, monkeypatch
):
    case = tmp_path / "P007"
    valid_image(case, "enhanced.nii.gz")
    (case / "sub").mkdir()
    monkeypatch.chdir(case if given in (".", "./") else case / "sub")
    out = tmp_path / "out"
    result = la_seg(*predict(trained_checkpoint, Path(given), out))
    assert result.code == 0, result.err[-3000:]
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".la-seg")) == [
        "P007.nii.gz", "volumes.csv"]  # fmt: skip


# ---- 9: evaluate --label that no mask holds ----------------------------------------------------------------
def test_evaluate_label_in_no_mask_is_refused(la_seg, trained_checkpoint, tmp_path, synth_root):
    """la-seg predict's 0/1 masks scored with --label 5: every case would fail; refused naming the value."""
    masks = tmp_path / "masks"
    result = la_seg(*predict(trained_checkpoint, synth_root, masks, "--model.threshold", "0.01"))
    assert result.code == 0, result.err[-3000:]
    before = snapshot(masks, synth_root)
    result = la_seg("evaluate", "--pred", masks, "--ref", synth_root, "--label", "5")
    assert_refused(result, "--label 5", before, masks, synth_root)
    assert not (tmp_path / "masks_evaluation").exists()
    result = la_seg("evaluate", "--pred", masks, "--ref", synth_root, "--label", "1")
    assert result.code == 0, result.err[-3000:]


# ---- 12: unclear errors ------------------------------------------------------------------------------------
@pytest.mark.parametrize("text", ["epoch: 3\n", '{"state_dict": {}}\n', "K\n", "#!/bin/sh\nexit 0\n"])
def test_text_file_as_checkpoint_is_named(text, la_seg, tmp_path):
    checkpoint = tmp_path / "notes.ckpt"
    checkpoint.write_text(text)
    image = valid_image(tmp_path / "in")
    before = snapshot(tmp_path / "in", checkpoint)
    result = la_seg(*predict(checkpoint, image, tmp_path / "out"))
    assert_refused(result, "notes.ckpt", before, tmp_path / "in", checkpoint, output_dir=tmp_path / "out")
    assert "unexpected" not in result.error_lines[0]


BAD_TRAINER = {
    "max_epochs": (["--trainer.max_epochs", "-5"], "--trainer.max_epochs"),
    "max_steps": (["--trainer.max_steps", "-7"], "--trainer.max_steps"),
    "limit_train_batches": (["--trainer.limit_train_batches", "-1"], "--trainer.limit_train_batches"),
    "devices": (["--trainer.devices", "0"], "--trainer.devices"),
}


@pytest.mark.parametrize("kind", sorted(BAD_TRAINER))
def test_bad_trainer_setting_names_its_option(kind, la_seg, tmp_path, synth_root):
    extra, culprit = BAD_TRAINER[kind]
    result = la_seg("fit", *TINY, "--data.root", str(synth_root), *extra)
    assert_refused(result, culprit, snapshot(synth_root), synth_root)
    assert "unexpected" not in result.error_lines[0]
    assert not list(tmp_path.rglob("*.ckpt"))


@pytest.mark.parametrize(
    "content", ["", "# only a comment\n", "- model\n- data\n", "just a string\n", "42\n"]
)
def test_empty_or_non_mapping_config_is_named(content, la_seg, tmp_path, synth_root):
    config = tmp_path / "mine.yaml"
    config.write_text(content)
    result = la_seg("fit", *TINY, "--config", str(config), "--data.root", str(synth_root))
    assert_refused(result, "mine.yaml", snapshot(synth_root), synth_root)
    assert "unexpected" not in result.error_lines[0].lower()


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs util-linux setpriv")
def test_read_only_run_folder_during_test_is_named(trained_checkpoint, tmp_path, synth_root):
    """`test` logs into the checkpoint's run; read-only, it is named in one line (not by TensorBoard's
    writer thread, with a bytes repr and a traceback)."""
    run = tmp_path / "runs" / "demo" / "version_0"
    shutil.copytree(trained_checkpoint.parent.parent, run)
    for path in [run, *run.rglob("*")]:
        path.chmod(0o555 if path.is_dir() else 0o444)
    argv = ["test", *TINY, "--ckpt_path", run / "checkpoints" / "last.ckpt", "--data.root", synth_root]
    try:
        result = la_seg_subprocess(argv, tmp_path, NO_DAC)
    finally:
        for path in [run, *run.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
    assert_refused(result, str(run), {})
    assert "b'" not in result.err


# ---- 10: the same case twice -------------------------------------------------------------------------------
def _with_a_copied_case(synth_root: Path, root: Path) -> None:
    shutil.copytree(synth_root, root)
    shutil.copytree(root / "train_2", root / "scan_b")  # byte-identical image in a second case folder


def test_a_case_twice_is_refused_naming_both_folders(la_seg, tmp_path, synth_root):
    root = tmp_path / "data"
    _with_a_copied_case(synth_root, root)
    result = la_seg("fit", *TINY, "--data.root", str(root), "--trainer.max_epochs", "1")
    assert_refused(result, str(root / "train_2"), snapshot(root), root)
    assert str(root / "scan_b") in result.error_lines[0] and "data.duplicates" in result.error_lines[0]
    assert not list(tmp_path.rglob("*.ckpt"))


def test_a_case_twice_with_group_stays_in_one_part(la_seg, tmp_path, synth_root):
    root = tmp_path / "data"
    _with_a_copied_case(synth_root, root)
    result = la_seg("fit", *TINY, "--data.root", str(root), "--data.duplicates", "group",
                    "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1")  # fmt: skip
    assert result.code == 0, result.err[-3000:]
    split = json.loads((tmp_path / "runs" / "demo" / "version_0" / "split.json").read_text())
    parts = {case: part for part in ("train", "val", "test") for case in split[part]}
    assert parts["train_2"] == parts["scan_b"]
    assert split["patients"]["train_2"] == split["patients"]["scan_b"]


def test_a_test_root_case_repeated_from_the_training_data_is_refused(la_seg, tmp_path, synth_root):
    held_out = tmp_path / "held_out"
    shutil.copytree(synth_root / "train_3", held_out / "other_name")
    result = la_seg("fit", *TINY, "--data.root", str(synth_root), "--data.test_root", str(held_out),
                    "--data.duplicates", "group", "--trainer.max_epochs", "1")  # fmt: skip
    assert_refused(result, str(held_out / "other_name"), snapshot(synth_root), synth_root)


# ---- 3: SIGTERM --------------------------------------------------------------------------------------------
@pytest.fixture
def sigterm_during(monkeypatch):
    """`sigterm_during(step, at)`: the module's `step` sends this process SIGTERM on its call `at`, as a
    scheduler would mid-run. A no-op handler stands behind Lightning's: a stray signal never ends pytest."""
    from la_seg.module import LASegModule

    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)

    def arm(step: str, at: int, signum: int = signal.SIGTERM) -> list:
        original, calls = getattr(LASegModule, step), []

        def step_then_signal(self, *args, **kwargs):
            calls.append(1)
            if len(calls) == at:
                os.kill(os.getpid(), signum)
            return original(self, *args, **kwargs)

        monkeypatch.setattr(LASegModule, step, step_then_signal)
        return calls  # one entry per call of the step

    yield arm
    signal.signal(signal.SIGTERM, previous)


def _stopped(result, name: str = "SIGTERM", status: int = 143) -> str:
    printed = result.out + result.err
    assert "Traceback" not in printed, printed[-3000:]
    assert result.code == status, printed[-3000:]
    last = result.err.strip().splitlines()[-1]
    assert last.startswith(f"la-seg: stopped by {name}"), last
    return last


def test_ctrl_c_during_fit_stops_after_the_step_saves_a_resumable_checkpoint_and_exits_130(
    la_seg, tmp_path, synth_root, sigterm_during
):
    """A first Ctrl-C is a SIGTERM stop with its own name and status: the step ends, last.ckpt resumes it
    exactly, and pytest's own Ctrl-C handler is back afterwards."""
    import torch

    handler = signal.getsignal(signal.SIGINT)
    fit = ["fit", *TINY, "--data.root", str(synth_root), "--trainer.max_epochs", "2",
           "--trainer.limit_train_batches", "3"]  # fmt: skip
    steps = sigterm_during("training_step", at=2, signum=signal.SIGINT)
    result = la_seg(*fit)
    last = _stopped(result, "SIGINT", 130)
    assert "Ctrl-C: stopping after the current step" in result.err
    assert signal.getsignal(signal.SIGINT) is handler
    checkpoint = tmp_path / "runs" / "demo" / "version_0" / "checkpoints" / "last.ckpt"
    assert "--ckpt_path runs/demo/version_0/checkpoints/last.ckpt" in last
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert state["global_step"] == 2 and state["epoch"] == 0
    assert la_seg(*fit, "--ckpt_path", str(checkpoint)).code == 0
    assert len(steps) == 6, "resumed mid-epoch: epoch 0's last batch and epoch 1's three, none twice"


def test_ctrl_c_during_predict_keeps_the_finished_cases_and_exits_130(la_seg, trained_checkpoint, tmp_path,
                                                                     sigterm_during):  # fmt: skip
    inputs = tmp_path / "in"
    for seed in range(4):
        valid_image(inputs, f"case{seed}.nii.gz", seed)
    out = tmp_path / "out"
    sigterm_during("predict_step", at=2, signum=signal.SIGINT)
    last = _stopped(la_seg(*predict(trained_checkpoint, inputs, out)), "SIGINT", 130)
    assert str(out) in last and "--writer.overwrite true" in last
    assert sorted(p.name for p in out.glob("*.nii.gz")) == ["case0.nii.gz", "case1.nii.gz"]
    assert_no_partial_outputs(out)


def test_sigterm_during_fit_saves_a_resumable_checkpoint_and_exits_143(
    la_seg, tmp_path, synth_root, sigterm_during, recwarn
):
    import torch

    fit = ["fit", *TINY, "--data.root", str(synth_root), "--trainer.max_epochs", "2",
           "--trainer.limit_train_batches", "3"]  # fmt: skip
    steps = sigterm_during("training_step", at=2)
    stop = la_seg(*fit)
    last = _stopped(stop)
    assert "`weights_only` was not set" not in stop.err  # the stop's save says it keeps the full state
    checkpoint = tmp_path / "runs" / "demo" / "version_0" / "checkpoints" / "last.ckpt"
    assert "--ckpt_path runs/demo/version_0/checkpoints/last.ckpt" in last
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert state["global_step"] == 2 and state["epoch"] == 0
    result = la_seg(*fit, "--ckpt_path", str(checkpoint))  # the step counter is past its signal now
    assert result.code == 0, result.err[-3000:]
    assert not _warned(recwarn, "The dirpath has changed"), "an absolute --ckpt_path keeps the run's record"
    assert len(steps) == 6, "resumed mid-epoch: epoch 0's last batch and epoch 1's three, none twice"


@pytest.mark.skipif(not hasattr(signal, "SIGCHLD"), reason="no SIGCHLD on this platform")
@pytest.mark.parametrize("sigterm", [True, False], ids=["stop_save", "epoch_saves"])
def test_a_loader_worker_ending_during_a_checkpoint_save_does_not_interrupt_it(
    la_seg, tmp_path, synth_root, sigterm_during, monkeypatch, sigterm
):
    """A SIGTERM to the process group also ends the DataLoader workers; torch's SIGCHLD handler raises on
    each. One raised inside torch.save's write callback left the zip writer unfinished and aborted the
    process (SIGABRT, no checkpoint), in the stop's save or in an epoch's. Here a worker's end arrives inside
    every checkpoint write."""
    import torch

    def torch_like_handler(signum, frame):
        raise RuntimeError("DataLoader worker (pid 1) is killed by signal: Terminated.")

    real_save = torch.save

    def save_with_a_worker_ending(obj, handle, *args, **kwargs):
        class Handle:  # the checkpoint's file, whose first write is interrupted by SIGCHLD
            def write(self, data):
                if not interrupted:
                    interrupted.append(os.kill(os.getpid(), signal.SIGCHLD))
                return handle.write(data)

            def flush(self):
                return handle.flush()

        interrupted = []
        saves.append(interrupted)
        return real_save(obj, Handle(), *args, **kwargs)

    saves = []
    previous = signal.signal(signal.SIGCHLD, torch_like_handler)
    monkeypatch.setattr(torch, "save", save_with_a_worker_ending)
    if sigterm:
        sigterm_during("training_step", at=2)
    try:
        result = la_seg("fit", *TINY, "--data.root", str(synth_root), "--trainer.max_epochs", "2",
                        "--trainer.limit_train_batches", "3")  # fmt: skip
    finally:
        signal.signal(signal.SIGCHLD, previous)
    assert saves and all(saves)  # every save was interrupted
    checkpoint = tmp_path / "runs" / "demo" / "version_0" / "checkpoints" / "last.ckpt"
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    if sigterm:
        assert "--ckpt_path" in _stopped(result) and state["global_step"] == 2
    else:
        assert result.code == 0, result.err[-3000:]
        assert state["epoch"] == 1 and state["global_step"] == 6


def test_sigterm_during_predict_finishes_the_case_and_exits_143(la_seg, trained_checkpoint, tmp_path,
                                                               sigterm_during):  # fmt: skip
    inputs = tmp_path / "in"
    for seed in range(4):
        valid_image(inputs, f"case{seed}.nii.gz", seed)
    before = snapshot(inputs)
    out = tmp_path / "out"
    sigterm_during("predict_step", at=2)
    last = _stopped(la_seg(*predict(trained_checkpoint, inputs, out)))
    assert str(out) in last and "--writer.overwrite true" in last
    masks = sorted(p.name for p in out.glob("*.nii.gz"))
    assert masks == ["case0.nii.gz", "case1.nii.gz"], masks  # the current case finished, then stopped
    assert not (out / "volumes.csv").exists()
    assert_no_partial_outputs(out)
    assert snapshot(inputs) == before


def test_sigterm_during_test_exits_143_without_a_report(la_seg, trained_checkpoint, tmp_path, synth_root,
                                                       sigterm_during):  # fmt: skip
    run = tmp_path / "runs" / "demo" / "version_0"
    shutil.copytree(trained_checkpoint.parent.parent, run)
    sigterm_during("test_step", at=1)
    result = la_seg("test", *TINY, "--ckpt_path", run / "checkpoints" / "last.ckpt",
                    "--data.test_root", synth_root)  # fmt: skip
    _stopped(result)
    assert not (run / "test_metrics.csv").exists()


@pytest.mark.slow
def test_sigterm_to_a_real_fit_process(tmp_path, synth_root):
    """What `timeout`, SLURM and Kubernetes do: SIGTERM to the process; it stops with 143 and a resumable
    checkpoint, and says how to resume in its last line."""
    import torch

    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    fit = ["fit", *TINY, "--data.root", str(synth_root), "--trainer.max_epochs", "1000"]
    process = subprocess.Popen([sys.executable, "-m", "la_seg.cli", *fit], cwd=tmp_path, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    run = tmp_path / "runs" / "demo" / "version_0"
    try:
        for _ in range(600):  # training has started once the split is written and a checkpoint saved
            if (run / "checkpoints" / "last.ckpt").exists() or process.poll() is not None:
                break
            time.sleep(0.5)
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=300)
    finally:
        process.kill()
    assert process.returncode == 143, err[-3000:]
    assert "Traceback" not in out + err
    last = err.strip().splitlines()[-1]
    assert last.startswith("la-seg: stopped by SIGTERM") and "--ckpt_path" in last, last
    torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


@pytest.mark.slow
def test_sigterm_to_the_process_group_with_loader_workers(tmp_path, synth_root):
    """SLURM signals every process of the job: the DataLoader workers die too; still status 143, one line
    and a resumable checkpoint, not a worker error."""
    import torch

    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    fit = [
        "fit",
        *TINY,
        "--data.root",
        str(synth_root),
        "--trainer.max_epochs",
        "1000",
        "--data.num_workers",
        "2",
    ]
    process = subprocess.Popen([sys.executable, "-m", "la_seg.cli", *fit], cwd=tmp_path, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)  # fmt: skip
    run = tmp_path / "runs" / "demo" / "version_0"
    try:
        for _ in range(600):
            if (run / "checkpoints" / "last.ckpt").exists() or process.poll() is not None:
                break
            time.sleep(0.5)
        time.sleep(1.0)  # into the next epoch, workers running
        os.killpg(process.pid, signal.SIGTERM)
        out, err = process.communicate(timeout=300)
    finally:
        process.kill()
    assert process.returncode == 143, err[-3000:]
    assert "Traceback" not in out + err, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("la-seg: stopped by SIGTERM") and "--ckpt_path" in last, last
    torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


# ---- Lightning's warnings that contradicted the manual -----------------------------------------------------
def _warned(recwarn, text: str) -> list[str]:
    return [str(w.message) for w in recwarn if text in str(w.message)]


def test_predict_and_test_from_a_checkpoint_leave_its_run_record_alone(
    la_seg, trained_checkpoint, tmp_path, synth_root, recwarn
):
    """Only a resumed fit reloads the run's checkpoint record: predict (no logger) and a test given the
    checkpoint's absolute path resolve another checkpoint folder, where Lightning warned on every run."""
    inputs = tmp_path / "in"
    valid_image(inputs, "case0.nii.gz", 0)
    assert la_seg(*predict(trained_checkpoint, inputs, tmp_path / "out")).code == 0
    test = ["test", *TINY, "--data.root", str(synth_root), "--ckpt_path", str(trained_checkpoint.absolute())]
    assert la_seg(*test).code == 0
    assert not _warned(recwarn, "The dirpath has changed")


def test_the_demo_config_logs_within_an_epoch_of_the_readmes_smallest_data(la_seg, tmp_path, recwarn):
    """README's other-scanner data (8 coarse cases) gives the demo config its shortest epochs."""
    from la_seg.data.synthetic import write_dataset

    write_dataset(tmp_path / "coarse_data", 8, 0, shape=(112, 96, 24), spacing=(1.3, 1.3, 4.0))
    fit = ["fit", *TINY, "--data.root", "coarse_data", "--trainer.max_epochs", "1"]
    assert la_seg(*fit).code == 0
    assert not _warned(recwarn, "log_every_n_steps")
