"""End to end: the same patients stored in other array orders (NIfTI RAS, LAS, LPS, swapped axes, slices
first, NRRD in LPS space) get the same masks and probabilities in world space from `predict`, written back on
each input's own grid; a checkpoint from before la-seg reoriented volumes keeps its old layout, saying so."""

import nibabel as nib
import nrrd
import numpy as np
import torch
from tiny_options import TINY_CLI

from la_seg.checkpoints import load_checkpoint, save_checkpoint_file
from la_seg.cli import main
from la_seg.data.synthetic import write_dataset
from tests.storage import STORAGES, as_original, write_storage

TINY = [
    *TINY_CLI,
    "--untrained", "true",  # seed_everything gives every run the same weights; only the storage differs
    "--writer.save_probabilities", "true",
]  # fmt: skip


def _read(path):
    return np.asarray(nrrd.read(str(path))[0] if path.suffix == ".nrrd" else nib.load(path).dataobj)


def _reference_grid(root, case_id):
    found = [*root.glob(f"{case_id}/enhanced.nii.gz"), *root.glob(f"{case_id}/lgemri.nrrd")]
    return _read(found[0]).shape


def test_every_storage_of_the_same_patients_gets_the_same_mask_in_world_space(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_dataset(tmp_path / "RAS", cases=2, seed=77, shape=(40, 36, 9), spacing=(0.8, 0.8, 3.0))
    outputs = {}
    for storage in STORAGES:
        root = (
            tmp_path / "RAS"
            if storage == "RAS"
            else write_storage(tmp_path / "RAS", tmp_path / storage, storage)
        )
        out = tmp_path / f"out_{storage}"
        main(["predict", *TINY, "--data.predict_root", str(root), "--writer.output_dir", str(out)])
        outputs[storage] = {}
        for case_id in ("train_1", "train_2"):
            prob = nib.load(out / f"{case_id}_prob.nii.gz")
            mask = nib.load(out / f"{case_id}.nii.gz")
            assert prob.shape == mask.shape == _reference_grid(root, case_id), storage  # the input's own grid
            stored = np.asarray(prob.dataobj)
            outputs[storage][case_id] = (
                as_original(stored, storage),
                as_original(np.asarray(mask.dataobj), storage),
            )
    for storage, cases in outputs.items():
        for case_id, (prob, mask) in cases.items():
            want_prob, want_mask = outputs["RAS"][case_id]
            assert want_prob.std() > 0  # a real probability map, not a constant
            np.testing.assert_allclose(prob, want_prob, atol=1e-5, err_msg=f"{storage} {case_id}")
            np.testing.assert_array_equal(mask, want_mask, err_msg=f"{storage} {case_id}")


def test_a_checkpoint_from_before_reorientation_keeps_the_file_order_and_says_so(
    tmp_path, monkeypatch, capfd
):
    """Its volumes are sliced in array order: the LPS copy's result equals that of the same array stored
    with a RAS affine (the result depends on the array, not the world), and one line says why."""
    monkeypatch.chdir(tmp_path)
    write_dataset(tmp_path / "RAS", cases=1, seed=77, shape=(40, 36, 9), spacing=(0.8, 0.8, 3.0))
    lps = write_storage(tmp_path / "RAS", tmp_path / "LPS", "LPS")
    as_ras = tmp_path / "LPS_array_RAS_affine" / "train_1"
    as_ras.mkdir(parents=True)
    lps_array = np.asarray(nib.load(lps / "train_1" / "enhanced.nii.gz").dataobj)
    ras_affine = nib.load(tmp_path / "RAS" / "train_1" / "enhanced.nii.gz").affine
    nib.save(nib.Nifti1Image(lps_array, ras_affine), as_ras / "enhanced.nii.gz")
    tiny = [*TINY_CLI, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1",
            "--data.split", "[0.5, 0.5, 0.0]", "--calibration.enabled", "false"]  # fmt: skip
    write_dataset(tmp_path / "train", cases=2, seed=1, shape=(40, 36, 9), spacing=(0.8, 0.8, 3.0))
    main(["fit", *tiny, "--data.root", str(tmp_path / "train")])
    ckpt = next(tmp_path.glob("runs/**/last.ckpt"))
    checkpoint = load_checkpoint(ckpt)
    checkpoint.pop("la_seg_loaded_from")
    for key in ("orientation",):
        del checkpoint["hyper_parameters"][key]
    legacy = tmp_path / "legacy.ckpt"
    save_checkpoint_file(checkpoint, legacy)
    probs = {}
    for name, root in (("lps", lps), ("array", as_ras.parent), ("ras", tmp_path / "RAS")):
        capfd.readouterr()
        main(["predict", *TINY_CLI, "--ckpt_path", str(legacy), "--data.predict_root", str(root),
              "--writer.output_dir", str(tmp_path / name),
              "--writer.save_probabilities", "true"])  # fmt: skip
        err = capfd.readouterr().err
        assert err.count("was trained before la-seg read volumes in RAS orientation") == 1, err
        probs[name] = np.asarray(nib.load(tmp_path / name / "train_1_prob.nii.gz").dataobj)
    np.testing.assert_allclose(probs["lps"], probs["array"], atol=1e-6)
    # ... and not the RAS file's result mapped through the affines (what a new checkpoint gives)
    assert not torch.allclose(
        torch.from_numpy(as_original(probs["lps"], "LPS")), torch.from_numpy(probs["ras"])
    )
