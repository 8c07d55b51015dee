"""fit on RAS volumes -> test, predict and evaluate the same held-out patients stored LPS (NIfTI) and in an
LPS NRRD space: the same scores and, mapped back through the affines, the same masks as their RAS copies,
with slices that fit one input window and slices that take several."""

from __future__ import annotations

import json

import nibabel as nib
import nrrd
import numpy as np
import pytest

from la_seg.data.synthetic import write_dataset
from tests.journeys.conftest import TINY
from tests.storage import as_original, write_storage

pytestmark = pytest.mark.slow


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2 * np.logical_and(a, b).sum() / total)


@pytest.mark.parametrize("mm_per_pixel", ["4.0", "1.0"])  # 77 mm slices: one 28 px window, or 3 x 3 of them
def test_fit_on_ras_then_test_predict_and_evaluate_lps_copies(la_seg, journey_data, tmp_path, mm_per_pixel):
    tiny = [*TINY, "--data.target_spacing", mm_per_pixel]
    la_seg("fit", *tiny, "--data.root", journey_data, "--trainer.max_epochs", "2")
    best = tmp_path / "runs" / "demo" / "version_0" / "checkpoints" / "best.ckpt"
    held = tmp_path / "RAS"
    write_dataset(held, cases=3, seed=77, shape=(48, 44, 12), spacing=(1.6, 1.6, 4.0))
    storages = {"RAS": held}
    for storage in ("LPS", "NRRD_LPS"):
        storages[storage] = write_storage(held, tmp_path / storage, storage)
    # two epochs of a tiny model give probabilities in a narrow band: thresholded at their median, masks that
    # follow the image (any threshold must give the same mask in every storage)
    la_seg("predict", *tiny, "--ckpt_path", best, "--data.predict_root", held, "--writer.output_dir",
           tmp_path / "maps", "--writer.save_probabilities", "true")  # fmt: skip
    probs = np.concatenate(
        [nib.load(p).get_fdata().ravel() for p in (tmp_path / "maps").glob("*_prob.nii.gz")]
    )
    threshold = ["--model.threshold", f"{np.median(probs):.6f}"]
    scores, masks = {}, {}
    for storage, root in storages.items():
        la_seg("test", *tiny, *threshold, "--ckpt_path", best, "--data.test_root", root)
        report = json.loads((best.parent.parent / f"test_{storage}.json").read_text())
        scores[storage] = {case["case_id"]: case["dice"] for case in report["cases"]}
        la_seg("predict", *tiny, *threshold, "--ckpt_path", best, "--data.predict_root", root,
               "--writer.output_dir", tmp_path / f"masks_{storage}")  # fmt: skip
        la_seg("evaluate", "--pred", tmp_path / f"masks_{storage}", "--ref", root)
        evaluation = json.loads((tmp_path / f"masks_{storage}_evaluation" / "test_metrics.json").read_text())
        assert {c["case_id"]: c["dice"] for c in evaluation["cases"]} == pytest.approx(
            scores[storage], abs=1e-6
        )
        masks[storage] = {
            case_id: as_original(
                np.asarray(nib.load(tmp_path / f"masks_{storage}" / f"{case_id}.nii.gz").dataobj), storage
            )  # fmt: skip
            for case_id in scores[storage]
        }
    assert sorted(scores["RAS"]) == ["train_1", "train_2", "train_3"]
    assert all(0 < masks["RAS"][case].sum() < masks["RAS"][case].size for case in masks["RAS"])
    for storage in ("LPS", "NRRD_LPS"):
        assert scores[storage] == pytest.approx(scores["RAS"], abs=0.01), storage
        for case_id, mask in masks[storage].items():
            assert _dice(mask > 0, masks["RAS"][case_id] > 0) >= 0.99, (storage, case_id)
    lps_header = nrrd.read_header(str(storages["NRRD_LPS"] / "train_1" / "lgemri.nrrd"))
    assert lps_header["space"] == "left-posterior-superior"  # the copy really is stored LPS
