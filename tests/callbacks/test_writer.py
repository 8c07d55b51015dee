"""The prediction writer: masks overlay their input; names reserved, folder locked, errors surfaced."""

import csv
import errno
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

import la_seg.callbacks.writer as writer_module
from la_seg.atomic import LOCK_NAME, TEMP_SUFFIX, host_tag, refuse_writing_into_inputs
from la_seg.callbacks.writer import NiftiPredictionWriter
from la_seg.data.io import Geometry
from la_seg.data.layouts import Case
from la_seg.errors import DataError

SHAPE, SPACING = (5, 12, 10), (3.0, 0.8, 0.8)  # the through-plane axis is the file's first


def input_image(folder: Path, case_id: str) -> Geometry:
    affine = np.array([[0, 0, 0.8, 10], [0, 0.8, 0, -4], [3.0, 0, 0, 7], [0, 0, 0, 1]], dtype=float)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{case_id}.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random(SHAPE).astype(np.float32), affine), path)
    return Geometry(SHAPE, affine, SPACING, path, slice_axis=0)


def prediction(geometry: Geometry, case_id: str, file_mask: np.ndarray) -> tuple[dict, dict]:
    mask = torch.from_numpy(geometry.to_slices_last(file_mask).copy())
    image = torch.from_numpy(geometry.to_slices_last(np.asarray(nib.load(geometry.source).dataobj)).copy())
    output = {"case_id": case_id, "mask": mask, "prob": mask.float() * 0.9, "geometry": geometry}
    return output, {"case_id": case_id, "image": image, "geometry": geometry}


def file_mask() -> np.ndarray:
    mask = np.zeros(SHAPE, dtype=bool)
    mask[1:4, 2:9, 3:6] = True
    return mask


def trainer_for(cases: list[Case], predict_root: Path | None = None) -> SimpleNamespace:
    return SimpleNamespace(
        predict_dataloaders=SimpleNamespace(dataset=SimpleNamespace(cases=cases)),
        datamodule=SimpleNamespace(predict_root=str(predict_root) if predict_root else None),
        is_global_zero=True,
        world_size=1,
        global_rank=0,
        strategy=SimpleNamespace(reduce=lambda value, reduce_op: value, root_device=torch.device("cpu")),
    )


def test_masks_overlay_the_input_with_a_permuted_slice_axis(tmp_path):
    geometry = input_image(tmp_path / "in", "c1")
    writer = NiftiPredictionWriter(str(tmp_path / "out"), save_probabilities=True, save_png=True)
    trainer = trainer_for([Case("c1", geometry.source)], tmp_path / "in")
    writer.on_predict_start(trainer, None)
    output, batch = prediction(geometry, "c1", file_mask())
    writer.write_on_batch_end(trainer, None, output, [0], batch, 0, 0)
    writer.on_predict_end(trainer, None)
    written = nib.load(tmp_path / "out" / "c1.nii.gz")
    assert np.array_equal(np.asarray(written.dataobj), file_mask().astype(np.uint8))
    assert np.allclose(written.affine, geometry.affine)
    prob = nib.load(tmp_path / "out" / "c1_prob.nii.gz")
    assert np.allclose(np.asarray(prob.dataobj), file_mask() * 0.9)
    with (tmp_path / "out" / "volumes.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert rows[0]["case_id"] == "c1" and rows[0]["spacing_mm"] == "3x0.8x0.8"
    assert float(rows[0]["volume_ml"]) == pytest.approx(file_mask().sum() * 3.0 * 0.8 * 0.8 / 1000, abs=1e-3)
    picture = np.asarray(Image.open(tmp_path / "out" / "c1.png"))
    assert picture.shape[2] == 3 and (picture[..., 0] > picture[..., 1] + 50).any()  # the mask in red
    NiftiPredictionWriter(str(tmp_path / "out"), overwrite=True).open()  # the lock was given back


def test_several_voters_add_an_uncertainty_map_and_agreement_columns(tmp_path):
    geometry = input_image(tmp_path / "in", "c1")
    writer = NiftiPredictionWriter(str(tmp_path / "out"), review_below=0.95)
    trainer = trainer_for([Case("c1", geometry.source)], tmp_path / "in")
    writer.on_predict_start(trainer, SimpleNamespace(has_voters=True))
    output, batch = prediction(geometry, "c1", file_mask())
    uncertainty_file = np.random.default_rng(1).random(SHAPE).astype(np.float32) / 4
    agreement = {"voters": ["a", "b"], "volumes_ml": [1.0, 1.5], "volume_spread_ml": 0.5,
                 "mean_pairwise_dice": 0.93, "review": False}  # fmt: skip
    output |= {"uncertainty": torch.from_numpy(geometry.to_slices_last(uncertainty_file).copy()),
               "agreement": agreement}  # fmt: skip
    writer.write_on_batch_end(trainer, None, output, [0], batch, 0, 0)
    writer.on_predict_end(trainer, None)
    written = nib.load(tmp_path / "out" / "c1_uncertainty.nii.gz")  # the input's own layout and affine
    assert written.get_data_dtype() == np.float32 and np.allclose(written.affine, geometry.affine)
    assert np.array_equal(np.asarray(written.dataobj), uncertainty_file)
    with (tmp_path / "out" / "volumes.csv").open() as handle:
        row = next(csv.DictReader(handle))
    assert (row["volume_spread_ml"], row["mean_pairwise_dice"]) == ("0.500", "0.9300")
    assert row["review"] == "True"  # 0.93 < the writer's own review_below


def test_uncertainty_names_are_reserved_with_several_voters_only(tmp_path):
    cases = [Case(case_id, tmp_path / "in" / f"{case_id}.nii.gz") for case_id in ("c", "c_uncertainty")]
    NiftiPredictionWriter(str(tmp_path / "single")).on_predict_start(trainer_for(cases), None)
    with pytest.raises(DataError, match="collides") as error:
        NiftiPredictionWriter(str(tmp_path / "out")).on_predict_start(
            trainer_for(cases), SimpleNamespace(has_voters=True)
        )
    assert "c_uncertainty.nii.gz" in str(error.value)


@pytest.mark.parametrize(
    ("ids", "save_probabilities", "clash"),
    [
        (["c", "c_prob"], True, "c_prob.nii.gz"),
        (["Case1", "case1"], False, "case1.nii.gz"),
    ],
)
def test_colliding_outputs_are_refused_before_anything_is_written(tmp_path, ids, save_probabilities, clash):
    cases = [Case(case_id, tmp_path / "in" / f"{case_id}.nii.gz") for case_id in ids]
    writer = NiftiPredictionWriter(str(tmp_path / "out"), save_probabilities=save_probabilities)
    with pytest.raises(DataError, match="collides") as error:
        writer.on_predict_start(trainer_for(cases), None)
    assert all(str(case.image_path) in str(error.value) for case in cases)
    assert clash in str(error.value).lower()
    assert not (tmp_path / "out").exists()


def test_names_clash_only_with_the_outputs_the_run_writes(tmp_path):
    cases = [("c", tmp_path / "c.nii.gz"), ("c_prob", tmp_path / "c_prob.nii.gz")]
    NiftiPredictionWriter(str(tmp_path / "out")).reserve_outputs(cases)  # no probabilities: no c_prob.nii.gz
    with pytest.raises(DataError, match="collides"):
        NiftiPredictionWriter(str(tmp_path / "out"), save_probabilities=True).reserve_outputs(cases)


def test_a_second_run_into_a_locked_folder_fails_at_once(tmp_path):
    first = NiftiPredictionWriter(str(tmp_path / "out"))
    first.open()
    second = NiftiPredictionWriter(str(tmp_path / "out"))
    with pytest.raises(DataError, match="in use by another la-seg run") as error:
        second.open()
    assert str(tmp_path / "out" / LOCK_NAME) in str(error.value)
    first.close()
    first.release()
    second.open()  # free again once the first run ends
    second.close()
    second.release()


def test_a_lock_held_by_another_process_is_refused(tmp_path):
    (tmp_path / "out").mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(tmp_path / "out" / LOCK_NAME)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(DataError, match="in use by another la-seg run"):
            NiftiPredictionWriter(str(tmp_path / "out")).open()
    finally:
        holder.kill()
        holder.wait()


HOLD_LOCK = """
import sys, time
from filelock import FileLock
lock = FileLock(sys.argv[1])
lock.acquire()
print("locked", flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("output", ["in", "in/sub"])
def test_output_may_not_be_an_input_folder(tmp_path, output):
    (tmp_path / "in").mkdir()
    with pytest.raises(DataError, match="never writes into its input"):
        refuse_writing_into_inputs(tmp_path / output, [tmp_path / "in"], "--writer.output_dir")


def test_output_may_not_be_the_folder_of_a_single_input_file(tmp_path):
    single = tmp_path / "in" / "u.nii"
    single.parent.mkdir()
    single.write_bytes(b"")
    with pytest.raises(DataError, match=f"the folder of the input {single}"):
        refuse_writing_into_inputs(tmp_path / "in", [single], "--writer.output_dir")
    refuse_writing_into_inputs(tmp_path / "elsewhere", [single], "--writer.output_dir")


def test_write_errors_surface_naming_the_file_and_leave_no_volume_table(tmp_path, monkeypatch):
    geometry = input_image(tmp_path / "in", "c1")
    writer = NiftiPredictionWriter(str(tmp_path / "out"))
    trainer = trainer_for([Case("c1", geometry.source)])

    def disk_full(path, data, reference):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(writer_module, "write_nifti", disk_full)
    writer.on_predict_start(trainer, None)
    output, batch = prediction(geometry, "c1", file_mask())
    writer.write_on_batch_end(trainer, None, output, [0], batch, 0, 0)
    with pytest.raises(DataError, match=f"could not write {tmp_path / 'out' / 'c1.nii.gz'}: No space left"):
        writer.on_predict_end(trainer, None)
    assert not (tmp_path / "out" / "volumes.csv").exists()
    NiftiPredictionWriter(str(tmp_path / "out")).open()  # the failed run gave its lock back


def test_a_killed_runs_temp_files_are_removed_at_the_next_run(tmp_path):
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    leftover = tmp_path / "out" / f".c1.nii.gz.{host_tag()}.{process.pid}.x7y_q2{TEMP_SUFFIX}"
    leftover.parent.mkdir()
    leftover.write_bytes(b"")
    writer = NiftiPredictionWriter(str(tmp_path / "out"))
    writer.open()
    assert not leftover.exists()
    writer.close()
    writer.release()


def test_a_failed_write_stops_the_run_at_the_next_case(tmp_path, monkeypatch):
    geometry = input_image(tmp_path / "in", "c1")
    writer = NiftiPredictionWriter(str(tmp_path / "out"))
    trainer = trainer_for([Case("c1", geometry.source)])

    def no_permission(path, data, reference):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(writer_module, "write_nifti", no_permission)
    writer.on_predict_start(trainer, None)
    output, batch = prediction(geometry, "c1", file_mask())
    writer.write_on_batch_end(trainer, None, output, [0], batch, 0, 0)
    writer._pending[0][1].exception()  # wait for the first case's write to fail
    with pytest.raises(DataError, match="could not write .*c1.nii.gz: Permission denied"):
        writer.write_on_batch_end(trainer, None, output, [1], batch, 1, 0)
    writer.on_exception(trainer, None, RuntimeError())
