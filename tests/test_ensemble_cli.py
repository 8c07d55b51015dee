"""`la-seg test` / `predict` with several checkpoints (a list or a folder of fold runs) and test-time flips:
uncertainty maps, agreement columns, a report naming every member, and one-line errors for bad inputs."""

import csv
import gzip
import importlib.util
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from test_cli import TINY

from la_seg.cli import main

AGREEMENT_BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "agreement.py"


@pytest.fixture(scope="session")  # built once per test process, whatever the order
def folds(tmp_path_factory, synth_root):
    """Two fold runs of the tiny demo model (runs/demo/fold_{0,1}/version_0), trained once per module."""
    root = tmp_path_factory.mktemp("folds")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        for fold in (0, 1):
            main(["fit", *TINY, "--data.root", str(synth_root), "--data.folds", "2", "--data.fold", str(fold),
                  "--data.augmentation.hflip", "true", "--data.augmentation.vflip", "true",
                  "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2"])  # fmt: skip
    return root


@pytest.fixture
def in_folds(folds, monkeypatch):
    monkeypatch.chdir(folds)
    return folds


def reports(run: Path) -> set[Path]:
    """The test reports in a run folder (the fold runs are shared by this module's tests, in any order)."""
    return set(run.glob("test_*.json"))


def best(fold: int) -> str:
    return f"runs/demo/fold_{fold}/version_0/checkpoints/best.ckpt"


def predict(synth_root, out: Path, ckpt: str, *extra: str) -> list[str]:
    return ["predict", *TINY, "--ckpt_path", ckpt, "--data.predict_root", str(synth_root),
            "--writer.output_dir", str(out), *extra]  # fmt: skip


def read_volumes(out: Path) -> list[dict]:
    with open(out / "volumes.csv") as handle:
        return list(csv.DictReader(handle))


def fails(argv: list[str], capsys) -> str:
    """The one error line of a run that must fail."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("la-seg: error:")]
    assert len(lines) == 1
    return lines[0]


@pytest.mark.slow
def test_predict_with_a_folder_of_fold_runs_writes_uncertainty_and_agreement(in_folds, synth_root, capsys):
    out = in_folds / "ensemble_masks"
    main(predict(synth_root, out, "runs/demo"))
    assert f"ensemble of {best(0)}, {best(1)}" in capsys.readouterr().err
    cases = sorted(p.name for p in synth_root.iterdir())
    for case in cases:
        source = nib.load(synth_root / case / "enhanced.nii.gz")
        uncertainty = nib.load(out / f"{case}_uncertainty.nii.gz")
        assert uncertainty.shape == source.shape and np.array_equal(uncertainty.affine, source.affine)
        values = np.asarray(uncertainty.dataobj)
        assert uncertainty.get_data_dtype() == np.float32 and 0 <= values.min() and values.max() <= 0.25
    rows = read_volumes(out)
    assert [r["case_id"] for r in rows] == cases
    for row in rows:
        assert 0 <= float(row["mean_pairwise_dice"]) <= 1 and float(row["volume_spread_ml"]) >= 0
        assert row["review"] == str(bool(row["review_reason"]))  # implausible masks or voters that disagree
        disagree = f"voters disagree: mean pairwise Dice {row['mean_pairwise_dice']} below review_below"
        assert disagree in row["review_reason"] or "voters disagree" not in row["review_reason"]


@pytest.mark.slow
def test_test_with_a_list_of_checkpoints_names_every_member(in_folds, synth_root):
    fold_run = in_folds / "runs" / "demo" / "fold_0" / "version_0"
    report_dir = in_folds / "runs" / "demo" / "ensemble"  # neither fold's run, nor a new version_*
    before, before_ensemble = reports(fold_run), reports(report_dir)  # other tests may have tested fold 0
    main(["test", *TINY, "--data.root", str(synth_root), "--data.folds", "2",
          "--ckpt_path", f"[{best(0)}, {best(1)}]"])  # fmt: skip
    (written,) = reports(report_dir) - before_ensemble
    report = json.loads(written.read_text())
    ensemble = report["header"]["ensemble"]
    assert ensemble["members"] == [best(0), best(1)] and ensemble["tta"] == "none"
    assert len(ensemble["passes"]) == 2  # trained backbones (demo: trainable_blocks -1) are not shared
    assert report["header"]["checkpoint"] == best(0)
    for case in report["cases"]:
        assert case["agreement"]["voters"] == [best(0), best(1)]
        assert 0 <= case["agreement"]["mean_pairwise_dice"] <= 1
    assert written.with_suffix(".csv").read_text().startswith("case_id,")
    assert reports(fold_run) == before  # nothing written into a member's run


@pytest.mark.slow
def test_flips_on_one_checkpoint_for_test_and_predict(in_folds, synth_root):
    fold_run = in_folds / "runs" / "demo" / "fold_0" / "version_0"
    before = reports(fold_run)
    main(["test", *TINY, "--data.root", str(synth_root), "--data.folds", "2", "--ckpt_path", best(0),
          "--model.tta", "flips"])  # fmt: skip
    (written,) = reports(fold_run) - before  # test_heldout.json, or -2, ... after other tests of fold 0
    report = json.loads(written.read_text())
    assert report["header"]["inference"]["tta"] == "flips"
    assert report["header"]["ensemble"]["members"] == [best(0)]
    assert all(
        c["agreement"]["voters"] == ["identity", "flip_x", "flip_y", "flip_xy"] for c in report["cases"]
    )
    out = in_folds / "flipped"
    main(predict(synth_root, out, best(0), "--model.tta", "flips"))
    assert len(list(out.glob("*_uncertainty.nii.gz"))) == 6
    assert all(row["mean_pairwise_dice"] for row in read_volumes(out))


@pytest.mark.slow
def test_one_member_without_flips_writes_the_same_files_as_a_single_checkpoint(in_folds, synth_root):
    single, listed = in_folds / "single", in_folds / "listed"
    main(predict(synth_root, single, best(1), "--writer.save_probabilities", "true"))
    main(predict(synth_root, listed, f"[{best(1)}]", "--writer.save_probabilities", "true"))
    names = sorted(p.name for p in single.iterdir() if not p.name.startswith("."))
    assert names == sorted(p.name for p in listed.iterdir() if not p.name.startswith("."))
    assert not any("uncertainty" in name for name in names)
    for name in names:
        if name.endswith(".nii.gz"):
            assert gzip.decompress((single / name).read_bytes()) == gzip.decompress(
                (listed / name).read_bytes()
            )
    columns = ["case_id", "volume_ml", "image_path", "spacing_mm", "expected_dice", "review", "review_reason"]
    assert list(read_volumes(single)[0]) == columns  # no agreement columns: one voter
    assert read_volumes(single) == read_volumes(listed)


@pytest.mark.slow
def test_a_member_whose_backbone_weights_are_missing_is_refused(in_folds, synth_root, capsys):
    lean = torch.load(best(1), map_location="cpu", weights_only=True)
    lean["state_dict"] = {k: v for k, v in lean["state_dict"].items() if not k.startswith("net.backbone.")}
    lean["backbone"] |= {"stored": False, "weights": str(in_folds / "moved" / "dinov2.pth")}
    torch.save(lean, in_folds / "lean.ckpt")
    error = fails(predict(synth_root, in_folds / "never", f"[{best(0)}, lean.ckpt]"), capsys)
    assert "lean.ckpt" in error and str(in_folds / "moved" / "dinov2.pth") in error
    assert not (in_folds / "never").exists()


def test_bad_checkpoint_lists_and_folders_end_with_one_line(tmp_path, monkeypatch, synth_root, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.ckpt").write_bytes(b"x")
    (tmp_path / "b.ckpt").write_bytes(b"x")
    out = str(tmp_path / "out")
    error = fails(predict(synth_root, tmp_path / "out", "[a.ckpt, gone.ckpt]"), capsys)
    assert "gone.ckpt" in error and "does not exist" in error
    (tmp_path / "empty").mkdir()
    error = fails(predict(synth_root, tmp_path / "out", "empty"), capsys)
    assert "empty" in error and "no fold runs" in error
    (tmp_path / "runs" / "version_0" / "checkpoints").mkdir(parents=True)
    (tmp_path / "runs" / "version_0" / "checkpoints" / "last.ckpt").write_bytes(b"x")
    error = fails(predict(synth_root, tmp_path / "out", "runs"), capsys)
    assert str(Path("runs/version_0/checkpoints")) in error and "no best.ckpt" in error
    error = fails(["fit", *TINY, "--data.root", str(synth_root), "--ckpt_path", "[a.ckpt, b.ckpt]"], capsys)
    assert "fit takes a single checkpoint" in error and "[a.ckpt, b.ckpt]" in error
    assert not Path(out).exists()


@pytest.mark.slow
def test_agreement_benchmark_quick_run_reports_spearman_with_n(tmp_path):
    spec = importlib.util.spec_from_file_location("agreement", AGREEMENT_BENCHMARK)
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    result_file = tmp_path / "agreement.json"
    benchmark.main(["--quick", "--work-dir", str(tmp_path / "work"), "--json", str(result_file)])
    result = json.loads(result_file.read_text())
    heldout = [c for c in result["cases"] if c["set"] == "heldout"]
    assert len(heldout) == 3 and result["per_set"]["heldout"]["n"] == 3
    assert result["overall"]["n"] == len(result["cases"]) > 3
    assert all(0 <= c["agreement"] <= 1 and 0 <= c["dice"] <= 1 for c in result["cases"])
    ranked = [{"agreement": a, "dice": d} for a, d in [(0.2, 0.1), (0.5, 0.4), (0.9, 0.8), (0.7, 0.9)]]
    assert benchmark.correlation(ranked)["spearman_rho"] == pytest.approx(0.8)
