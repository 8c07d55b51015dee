"""Run folders hold runs: a failed fit leaves nothing, predict adds nothing to the run it uses, and a predict
folder holds only outputs."""

from __future__ import annotations

from tests.journeys.conftest import TINY


def _tree(root) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_failed_fit_leaves_no_run_folder_and_predict_adds_nothing_to_the_run(la_seg, journey_data, tmp_path):
    _, err = la_seg("fit", *TINY, "--data.root", journey_data, "--data.split", "[0.5, 0.0, 0.5]", expect=2)
    assert "no validation cases" in err
    assert not (tmp_path / "runs").exists()

    la_seg("fit", *TINY, "--data.root", journey_data, "--trainer.max_epochs", "1",
           "--trainer.limit_train_batches", "1")  # fmt: skip
    run = tmp_path / "runs" / "demo" / "version_0"
    before = _tree(run)
    la_seg("predict", *TINY, "--ckpt_path", run / "checkpoints" / "last.ckpt", "--data.predict_root",
           journey_data, "--writer.output_dir", "masks")  # fmt: skip
    assert _tree(run) == before
    assert _tree(tmp_path / "masks") == sorted([*(f"train_{i}.nii.gz" for i in range(1, 9)), "volumes.csv"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["masks", "runs"]
