import csv
import json
import math
import os
import subprocess
import sys

import pytest

from la_seg.atomic import (
    TEMP_SUFFIX,
    atomic_path,
    atomic_write_text,
    host_tag,
    refuse_writing_into_inputs,
    remove_stale_temp_files,
    write_csv,
    write_json,
)
from la_seg.errors import DataError


def test_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash while writing")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_write_replaces_and_creates_folders(tmp_path):
    target = tmp_path / "a" / "b.txt"
    atomic_write_text(target, "new")
    assert target.read_text() == "new"
    assert target.stat().st_mode & 0o777 == 0o644


def test_temp_name_is_recognisable_and_carries_host_and_pid(tmp_path):
    with atomic_path(tmp_path / "mask.nii.gz") as tmp:
        assert tmp.name.startswith(f".mask.nii.gz.{host_tag()}.{os.getpid()}.")
        assert tmp.name.endswith(TEMP_SUFFIX)
        tmp.write_text("x")


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_stale_temp_files_of_dead_processes_are_removed_live_ones_kept(tmp_path):
    dead, host = dead_pid(), host_tag()
    stale = tmp_path / f".case.nii.gz.{host}.{dead}.k2j4_x{TEMP_SUFFIX}"
    live = tmp_path / f".other.nii.gz.{host}.{os.getpid()}.ab12cd{TEMP_SUFFIX}"
    # another node on shared storage: its pid says nothing about this host's processes, never touched here
    other_host = tmp_path / f".case.nii.gz.node-{host}-2.{dead}.q9w8e7{TEMP_SUFFIX}"
    foreign = tmp_path / ".case.nii.gz.abc123"  # not ours (e.g. another tool's temp): never touched
    for path in (stale, live, other_host, foreign):
        path.write_bytes(b"")
    assert remove_stale_temp_files(tmp_path) == [stale]
    kept = [live.name, other_host.name, foreign.name]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)
    assert remove_stale_temp_files(tmp_path / "missing") == []


def test_json_writes_nan_as_null(tmp_path):
    write_json(tmp_path / "r.json", {"a": [1.0, math.nan], "b": {"c": math.nan}, "p": tmp_path})
    expected = {"a": [1.0, None], "b": {"c": None}, "p": str(tmp_path)}
    assert json.loads((tmp_path / "r.json").read_text()) == expected


def test_csv_comments_lead_and_rows_follow(tmp_path):
    write_csv(tmp_path / "t.csv", ["k", "v"], [["a", 1], ["b", 2]], comments={"checkpoint": "x.ckpt"})
    lines = (tmp_path / "t.csv").read_text().splitlines()
    assert lines[0] == "# checkpoint: x.ckpt"
    body = [line for line in lines if not line.startswith("#")]
    assert list(csv.reader(body)) == [["k", "v"], ["a", "1"], ["b", "2"]]


# ---- the one "never write into the input" rule -------------------------------------------------------------
def _inputs(tmp_path):
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    single = folder / "n.nrrd"
    single.write_bytes(b"NRRD0004\n")
    return folder, single


@pytest.mark.parametrize("output", ["in", "in/masks", "in/sub/deeper", "in/n.nrrd"])
@pytest.mark.parametrize("given", ["folder", "single file"])
def test_an_output_in_or_at_an_input_is_refused(tmp_path, output, given):
    """A single input file protects its folder exactly as a folder input does."""
    folder, single = _inputs(tmp_path)
    source = folder if given == "folder" else single
    with pytest.raises(DataError, match="--writer.output_dir .*never writes into its input"):
        refuse_writing_into_inputs(tmp_path / output, [source], "--writer.output_dir")


def test_outputs_beside_or_above_the_input_are_allowed_unless_replaced(tmp_path):
    folder, single = _inputs(tmp_path)
    for source in (folder, single):
        refuse_writing_into_inputs(tmp_path / "out", [source], "--out")
        refuse_writing_into_inputs(tmp_path, [source], "--out")  # holds it, but writes beside it
        with pytest.raises(DataError, match="holds the input"):
            refuse_writing_into_inputs(tmp_path, [source], "--out", replaces=True)


def test_links_are_followed_and_absent_inputs_ignored(tmp_path):
    folder, _ = _inputs(tmp_path)
    (tmp_path / "alias").symlink_to(folder)
    with pytest.raises(DataError, match="never writes into its input"):
        refuse_writing_into_inputs(tmp_path / "alias" / "masks", [folder], "--out")
    refuse_writing_into_inputs(tmp_path / "x" / "masks", [None, tmp_path / "x" / "gone.nii.gz"], "--out")


def test_a_linked_input_file_protects_both_folders(tmp_path):
    real = tmp_path / "store" / "scan.nii.gz"
    real.parent.mkdir()
    real.write_bytes(b"")
    link = tmp_path / "in" / "scan.nii.gz"
    link.parent.mkdir()
    link.symlink_to(real)
    for output in ("in/masks", "store/masks"):
        with pytest.raises(DataError, match="never writes into its input"):
            refuse_writing_into_inputs(tmp_path / output, [link], "--writer.output_dir")
    refuse_writing_into_inputs(tmp_path / "out", [link], "--writer.output_dir")
