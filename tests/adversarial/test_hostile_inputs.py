"""Hostile and careless input, by class: every case either works or ends with one `la-seg: error:` line.

The contract (README, "Bad input"): exit status 2, exactly one error line that names the file or option to
fix, no Python traceback, every input byte-identical afterwards, and no output under a final name that is
not complete.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import TINY, assert_no_partial_outputs, assert_refused, la_seg_subprocess, snapshot
from filelock import FileLock
from hostile import (
    BAD_GEOMETRY,
    BAD_IMAGE_TYPES,
    BAD_LABELS,
    COLLIDING_NAMES,
    CORRUPT_CONTAINERS,
    HOSTILE_CHECKPOINTS,
    VALID_ODD_NAMES,
    valid_image,
)

from la_seg.atomic import LOCK_NAME, TEMP_SUFFIX, host_tag


def predict(checkpoint: Path, source: Path, output_dir: Path, *extra: str) -> list[str]:
    return ["predict", *TINY, "--ckpt_path", str(checkpoint), "--data.predict_root", str(source),
            "--writer.output_dir", str(output_dir), *extra]  # fmt: skip


def _refused_as_prediction_input(maker, la_seg, checkpoint, tmp_path, *extra):
    source, culprit = maker(tmp_path / "in")
    before = snapshot(tmp_path / "in")
    out = tmp_path / "out"
    result = la_seg(*predict(checkpoint, source, out, *extra))
    assert_refused(result, culprit, before, tmp_path / "in", output_dir=out)


@pytest.mark.parametrize("kind", sorted(CORRUPT_CONTAINERS))
def test_corrupt_container(kind, la_seg, trained_checkpoint, tmp_path):
    _refused_as_prediction_input(CORRUPT_CONTAINERS[kind], la_seg, trained_checkpoint, tmp_path)


@pytest.mark.parametrize("kind", ["flipped_bytes", "truncated_gzip"])
def test_error_in_a_loader_worker_is_one_line(kind, la_seg, trained_checkpoint, tmp_path):
    """Payload damage surfaces while a DataLoader worker reads the voxels: unwrapped, not its traceback."""
    _refused_as_prediction_input(
        CORRUPT_CONTAINERS[kind], la_seg, trained_checkpoint, tmp_path, "--data.num_workers", "1"
    )


@pytest.mark.parametrize("kind", sorted(BAD_GEOMETRY))
def test_bad_header_or_geometry(kind, la_seg, trained_checkpoint, tmp_path):
    _refused_as_prediction_input(BAD_GEOMETRY[kind], la_seg, trained_checkpoint, tmp_path)


@pytest.mark.parametrize("kind", sorted(BAD_IMAGE_TYPES))
def test_wrong_image_type(kind, la_seg, trained_checkpoint, tmp_path):
    _refused_as_prediction_input(BAD_IMAGE_TYPES[kind], la_seg, trained_checkpoint, tmp_path)


def test_bad_case_among_good_ones_stops_the_run_before_any_mask(la_seg, trained_checkpoint, tmp_path):
    """Geometry is checked for every input up front, not after segmenting the good ones."""
    inputs = tmp_path / "in"
    for seed in range(3):
        valid_image(inputs, f"good{seed}.nii.gz", seed)
    BAD_GEOMETRY["zero_spacing_in_sform"](inputs)  # writes in/case.nii.gz
    before = snapshot(inputs)
    out = tmp_path / "out"
    result = la_seg(*predict(trained_checkpoint, inputs, out))
    assert_refused(result, "case.nii.gz", before, inputs, output_dir=out)
    assert not list(out.glob("*.nii.gz")) if out.exists() else True


@pytest.mark.parametrize("kind", sorted(BAD_LABELS))
def test_wrong_label(kind, la_seg, trained_checkpoint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root, culprit = BAD_LABELS[kind](tmp_path / "held_out")
    before = snapshot(root)
    result = la_seg("test", *TINY, "--ckpt_path", str(trained_checkpoint), "--data.test_root", str(root))
    assert_refused(result, culprit, before, root)


@pytest.mark.parametrize("kind", sorted(COLLIDING_NAMES))
def test_colliding_output_names_are_refused_before_any_write(kind, la_seg, trained_checkpoint, tmp_path):
    make, extra = COLLIDING_NAMES[kind]
    inputs = make(tmp_path / "in")
    before = snapshot(inputs)
    out = tmp_path / "out"
    result = la_seg(*predict(trained_checkpoint, inputs, out, *extra))
    culprit = {"mask_vs_probability": "c_prob", "case_insensitive": "Case"}[kind]
    assert_refused(result, culprit, before, inputs, output_dir=out)
    assert not out.exists() or not list(out.glob("*.nii.gz"))


def test_odd_but_valid_names_work(la_seg, trained_checkpoint, tmp_path):
    inputs = tmp_path / "in"
    for seed, name in enumerate(VALID_ODD_NAMES):
        valid_image(inputs, name, seed)
    out = tmp_path / "out"
    result = la_seg(*predict(trained_checkpoint, inputs, out))
    assert result.code == 0, result.err[-3000:]
    assert sorted(p.name for p in out.glob("*.nii.gz")) == sorted(VALID_ODD_NAMES)
    assert_no_partial_outputs(out)


@pytest.mark.parametrize("kind", sorted(HOSTILE_CHECKPOINTS))
def test_hostile_checkpoint(kind, la_seg, trained_checkpoint, tmp_path):
    folder = tmp_path / "ckpts"
    folder.mkdir()
    checkpoint, culprit = HOSTILE_CHECKPOINTS[kind](trained_checkpoint, folder)
    image = valid_image(tmp_path / "in")
    before = snapshot(folder, tmp_path / "in")
    out = tmp_path / "out"
    result = la_seg(*predict(checkpoint, image, out))
    assert_refused(result, culprit, before, folder, tmp_path / "in", output_dir=out)
    assert not (folder / "code_ran").exists(), "unpickling the checkpoint ran code"


def test_pickled_code_found_as_best_never_runs(la_seg, trained_checkpoint, tmp_path, monkeypatch, synth_root):
    """`--ckpt_path best` searches runs/: a planted checkpoint there must not run code either."""
    monkeypatch.chdir(tmp_path)
    planted = tmp_path / "runs" / "demo" / "version_0" / "checkpoints"
    planted.mkdir(parents=True)
    checkpoint, _ = HOSTILE_CHECKPOINTS["pickled_code"](trained_checkpoint, planted)
    result = la_seg("test", *TINY, "--ckpt_path", "best", "--data.root", str(synth_root))
    assert not (planted / "code_ran").exists(), "unpickling the checkpoint ran code"
    assert result.code == 2 and len(result.error_lines) == 1, result.err[-3000:]
    assert "best.ckpt" in result.error_lines[0]


@pytest.mark.parametrize("command", ["test", "predict", "validate"])
def test_no_checkpoint_no_results(command, la_seg, tmp_path, monkeypatch, synth_root):
    """Random weights give convincing masks: evaluating without --ckpt_path is refused."""
    monkeypatch.chdir(tmp_path)
    data = ["--data.root", str(synth_root)]
    if command == "predict":
        data = ["--data.predict_root", str(valid_image(tmp_path / "in")), "--writer.output_dir", "out"]
    result = la_seg(command, *TINY, *data)
    assert result.code == 2 and len(result.error_lines) == 1, result.err[-3000:]
    assert "ckpt_path" in result.error_lines[0]
    assert not (tmp_path / "out").exists()


BAD_SETTINGS = {
    "img_size_not_a_patch_multiple": (["--data.img_size", "50"], "img_size"),
    "img_size_negative": (["--data.img_size", "-14"], "img_size"),
    "split_not_summing_to_one": (["--data.split", "[0.5, 0.5, 0.5]"], "split"),
    "no_validation_cases": (["--data.split", "[0.8, 0.0, 0.2]"], "split"),
    "threshold_above_one": (["--model.threshold", "1.5"], "threshold"),
    "eval_batch_size_zero": (["--model.eval_batch_size", "0"], "eval_batch_size"),
    "batch_size_zero": (["--data.batch_size", "0"], "batch_size"),
    "unknown_layout": (["--data.layout", "bogus"], "layout"),
    "missing_root": (["--data.root", "/nonexistent/la"], "/nonexistent/la"),
    "unknown_backbone": (["--model.net.backbone", "vit_nonsense_patch14"], "backbone"),
    "unknown_option": (["--model.colour", "red"], "colour"),
    "missing_config_file": (["--config", "no_such_config.yaml"], "no_such_config.yaml"),
}


@pytest.mark.parametrize("kind", sorted(BAD_SETTINGS))
def test_bad_settings_fail_before_training(kind, la_seg, tmp_path, monkeypatch, synth_root):
    monkeypatch.chdir(tmp_path)
    extra, culprit = BAD_SETTINGS[kind]
    before = snapshot(synth_root)
    result = la_seg("fit", *TINY, "--data.root", str(synth_root), "--trainer.max_epochs", "1", *extra)
    assert_refused(result, culprit, before, synth_root)
    assert not list(tmp_path.rglob("*.ckpt"))


def test_broken_config_file(la_seg, tmp_path, monkeypatch, synth_root):
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "mine.yaml"
    config.write_text("model:\n  lr: [unclosed\n")
    result = la_seg("fit", *TINY, "--config", str(config), "--data.root", str(synth_root))
    assert_refused(
        result,
        "mine.yaml",
        {},
    )


# ---- permissions: root ignores file modes, so these run without the capabilities that let it -----------
NO_DAC = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs util-linux setpriv")
def test_unreadable_and_unwritable_paths(trained_checkpoint, tmp_path):
    image = valid_image(tmp_path / "in", "locked.nii.gz")
    image.chmod(0o000)
    result = la_seg_subprocess(predict(trained_checkpoint, image, tmp_path / "out"), tmp_path, NO_DAC)
    assert_refused(result, "locked.nii.gz", {}, output_dir=tmp_path / "out")

    image.chmod(0o644)
    sealed = tmp_path / "sealed"
    sealed.mkdir(mode=0o555)
    result = la_seg_subprocess(predict(trained_checkpoint, image, sealed / "out"), tmp_path, NO_DAC)
    assert_refused(result, str(sealed), {})

    locked = tmp_path / "locked.ckpt"
    shutil.copy(trained_checkpoint, locked)
    locked.chmod(0o000)
    result = la_seg_subprocess(predict(locked, image, tmp_path / "out2"), tmp_path, NO_DAC)
    assert_refused(result, "locked.ckpt", {})


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs util-linux setpriv")
def test_unreadable_case_folder_is_named_not_skipped(tmp_path, synth_root):
    root = tmp_path / "data"
    shutil.copytree(synth_root, root)
    (root / "train_3").chmod(0o000)
    fit = ["fit", *TINY, "--data.root", str(root), "--trainer.max_epochs", "1"]
    result = la_seg_subprocess(fit, tmp_path, NO_DAC)
    assert_refused(result, "train_3", {})


# ---- disk full: a tiny tmpfs as the output folder, in a private mount namespace -------------------------
@pytest.mark.slow
def test_disk_full_while_writing_masks(trained_checkpoint, tmp_path):
    inputs = tmp_path / "in"
    for seed in range(4):
        valid_image(inputs, f"case{seed}.nii.gz", seed)
    before = snapshot(inputs)
    out, copy = tmp_path / "out", tmp_path / "copy"
    out.mkdir()
    copy.mkdir()
    argv = predict(trained_checkpoint, inputs, out, "--writer.save_probabilities", "true")
    # 32 KiB: the four cases need about 46 KiB (each probability map ~11 KiB gzipped)
    script = (
        f'mount -t tmpfs -o size=32k tmpfs {out} || exit 99; "$@"; rc=$?; cp -a {out}/. {copy}/; exit $rc'
    )
    result = la_seg_subprocess(argv, tmp_path, ["unshare", "-m", "sh", "-c", script, "sh"])
    if result.code == 99:
        pytest.fail("could not mount a tmpfs (needs root and mount namespaces, as on CI)")
    assert_refused(result, str(out), before, inputs)
    assert_no_partial_outputs(copy)


# ---- concurrent writers and a killed run's leftovers ----------------------------------------------------
def test_second_run_into_a_busy_output_folder_is_refused(la_seg, trained_checkpoint, tmp_path):
    """Another run holds the folder (its lock): this one must not mix its masks and volumes.csv in."""
    image = valid_image(tmp_path / "in")
    out = tmp_path / "out"
    out.mkdir()
    with FileLock(out / LOCK_NAME):  # what a running `la-seg predict` into `out` holds
        result = la_seg(*predict(trained_checkpoint, image, out))
    assert_refused(result, str(out), snapshot(tmp_path / "in"), tmp_path / "in", output_dir=out)
    assert not list(out.glob("*.nii.gz")) and not (out / "volumes.csv").exists()


def test_a_killed_runs_temp_files_are_removed_by_the_next_run(la_seg, trained_checkpoint, tmp_path):
    image = valid_image(tmp_path / "in")
    out = tmp_path / "out"
    out.mkdir()
    finished = subprocess.Popen(["true"])  # a process id that no longer runs
    finished.wait()
    dead_pid = finished.pid
    stale = out / f".case.nii.gz.{host_tag()}.{dead_pid}.x1y2z3{TEMP_SUFFIX}"
    live = out / f".volumes.csv.{host_tag()}.{os.getpid()}.a1b2c3{TEMP_SUFFIX}"
    stale.write_bytes(b"")
    live.write_bytes(b"")
    result = la_seg(*predict(trained_checkpoint, image, out))
    assert result.code == 0, result.err[-3000:]
    assert not stale.exists(), "a dead run's temp file was left behind"
    assert live.exists(), "a running process's temp file was removed"
    assert_no_partial_outputs(out)
