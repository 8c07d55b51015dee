"""benchmarks/throughput.py at CI size: a tiny ViT on CPU; checks the report's shape, never its timings."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "throughput.py"
TINY = [
    "--config", "demo.yaml",
    "--device", "cpu",
    "--img-size", "56",
    "--batch-size", "4",
    "--steps", "2",
    "--volumes", "2",
    "--volume-shape", "64", "64", "8",
    "--num-workers", "0",
    "--threads", "1",
]  # fmt: skip
TINY_NET = [
    "--model.net.backbone_kwargs", "{depth: 4, embed_dim: 32, num_heads: 2}",
    "--model.net.decoder_channels", "[16, 16, 8, 8]",
]  # fmt: skip
TARGETS = (
    "cpu_predict_vs_backbone",
    "cpu_train_step_time_vs_backbone",
    "gpu_train_vs_backbone",
    "gpu_peak_memory_gb",
)


@pytest.fixture(scope="module")
def throughput(load_benchmark):
    return load_benchmark("throughput")


def _positive(value) -> bool:
    return (
        isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    )


@pytest.fixture(scope="module")
def report(throughput, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "tiny.json"
    returned = throughput.main([*TINY, "--json", str(out), "--workdir", str(out.parent), "--", *TINY_NET])
    written = json.loads(out.read_text())
    assert written == returned
    return written


def test_options_become_la_seg_options(throughput, tmp_path):
    """The benchmark's options are `la-seg fit` options, the user's extras last (they win)."""
    args = throughput.parse_args([*TINY, "--precision", "bf16-mixed", "--", "--data.img_size", "112"])
    cli = throughput.cli_args(args, tmp_path, total_steps=3)
    pairs = dict(zip(cli[::2], cli[1::2], strict=True))
    assert pairs["--trainer.accelerator"] == "cpu" and pairs["--trainer.precision"] == "bf16-mixed"
    assert pairs["--data.batch_size"] == "4" and pairs["--trainer.max_steps"] == "3"
    assert pairs["--data.root"] == str(tmp_path / "train") and pairs["--model.net.pretrained"] == "false"
    assert cli[-2:] == ["--data.img_size", "112"] and cli.index("56") < cli.index("112")
    weights = throughput.cli_args(throughput.parse_args([*TINY, "--weights", "w.safetensors"]), tmp_path, 3)
    assert "--model.net.pretrained" not in weights and "w.safetensors" in weights


def test_rejects_unknown_config_before_writing_anything(throughput, tmp_path, capsys):
    with pytest.raises(SystemExit):
        throughput.main(["--config", "no-such-config.yaml", "--device", "cpu", "--workdir", str(tmp_path)])
    assert "'no-such-config.yaml' is neither a file nor shipped" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_report_records_the_machine_and_setting(report):
    assert report["device_type"] == "cpu" and report["device"].startswith("cpu: ")
    assert report["cpu_model"] and report["cpu_capability"] in ("DEFAULT", "AVX2", "AVX512", "ZVECTOR")
    assert isinstance(report["native_bf16"], bool) and report["native_bf16_reason"]
    assert report["torch_threads"] == 1 and report["torch"] and report["lightning"]
    assert report["img_size"] == 56 and report["batch_size"] == 4 and report["volume_shape"] == [64, 64, 8]
    assert report["precision"] == "32-true"  # demo.yaml's, kept on any CPU
    assert report["peak_flops"] is None and report["mfu"] is None  # no GPU: no peak, no MFU


@pytest.mark.slow
def test_figures_are_finite_and_positive(report):
    for key in ("backbone_slices_per_s", "train_slices_per_s", "predict_slices_per_s", "peak_memory_gb"):
        assert _positive(report[key]), (key, report[key])
    assert all(_positive(v) for v in report["flops_per_slice"].values())
    flops = report["flops_per_slice"]
    assert flops["backbone"] < flops["forward"] < flops["train_step"]
    details = report["details"]
    train_steps = details["train"]["step_times_s"]
    assert len(train_steps) == 2 and all(map(_positive, train_steps))
    assert details["predict"]["slices"] == 16 and len(details["predict"]["volume_times_s"]) == 2
    assert len(details["backbone"]["step_times_s"]) == 4  # two passes of two steps


@pytest.mark.slow
def test_ratios_agree_with_figures(report):
    backbone = report["backbone_slices_per_s"]
    assert report["train_ratio"] == pytest.approx(report["train_slices_per_s"] / backbone)
    assert report["predict_ratio"] == pytest.approx(report["predict_slices_per_s"] / backbone)
    assert report["train_step_time_ratio"] == pytest.approx(1.0 / report["train_ratio"])
    assert report["peak_memory_gb"] == max(report["peak_memory_by_phase_gb"].values())
    train = report["details"]["train"]
    assert 2 <= train["slices"] <= 2 * 4  # two timed steps of at most a batch each
    expected = train["slices"] / sum(train["step_times_s"])
    assert report["train_slices_per_s"] == pytest.approx(expected, rel=1e-4)


@pytest.mark.slow
def test_targets_block(report):
    targets = report["targets"]
    assert set(targets) == set(TARGETS)
    for name, target in targets.items():
        assert isinstance(target["met"], bool) and isinstance(target["applicable"], bool), name
        assert _positive(target["value"]), name
        expected = target["value"] >= target["min"] if "min" in target else target["value"] < target["max"]
        assert target["met"] == expected, name
    assert not any(t["applicable"] for t in targets.values())  # a tiny ViT at 56 px is no target's setting
    assert targets["cpu_predict_vs_backbone"]["value"] == pytest.approx(report["predict_ratio"])


@pytest.mark.slow
def test_frozen_backbone_keeps_no_graph(throughput, tmp_path):
    """With a frozen ViT (trainable_blocks 0) the backbone runs without autograd, in eval mode."""
    report = throughput.main(
        [*TINY, "--steps", "1", "--volumes", "1", "--workdir", str(tmp_path), "--", *TINY_NET]
        + ["--model.net.trainable_blocks", "0"]
    )
    checks = report["fast_path"]
    assert checks["backbone_frozen"] is True and checks["backbone_trainable_params"] == 0
    assert checks["backbone_output_has_grad_fn"] is False and checks["backbone_vit_in_train_mode"] is False
    assert _positive(report["train_slices_per_s"])


@pytest.mark.slow
def test_gpu_check_smoke_runs_every_user_step(tmp_path):
    """SMOKE=1 rehearses the GPU check on CPU, with the wheels its preparation script builds for this Python:
    every step a user runs passes, in order, and is summarised; the results folder gets at most 8 small logs,
    the working files stay elsewhere."""
    out, work, wheels = tmp_path / "out", tmp_path / "work", tmp_path / "wheels"
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    prepare = SCRIPT.parent / "gpu_check_prepare.sh"
    env = {**os.environ, "PY": sys.executable, "WHEELS": str(wheels), "PYVER": python}
    built = subprocess.run(["bash", str(prepare)], env=env, capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-3000:]
    env = {**env, "SMOKE": "1", "OUT": str(out), "WORK": str(work), "BUDGET_S": "900"}
    script = SCRIPT.parent / "gpu_check.sh"
    done = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-4000:]
    assert f"installing {len(list(wheels.glob('*.whl')))} carried wheels" in done.stdout
    summary = done.stdout.split("==== gpu_check summary")[1]
    steps = re.findall(r"^(\w+) +ok +rc=0 +\d+s$", summary, re.M)
    assert steps == ["weights", "synth", "fit", "kill", "resume", "test", "predict", "throughput"]
    results = sorted(p.name for p in out.iterdir())
    assert results == ["gpu_check.log", "steps.log", "test_metrics.json", "throughput.json"]
    assert all(p.stat().st_size <= 16 * 2**20 for p in out.iterdir())
    steps_log = (out / "steps.log").read_text()
    assert "killed mid-epoch: exit status 137" in steps_log and "report content: ok" in steps_log
    before, after = re.search(r"resumed from step (\d+), now at step (\d+)", steps_log).groups()
    assert int(after) == int(before) + 3 > 3
    assert len(list((work / "masks").glob("*.nii.gz"))) == 2
    assert json.loads((out / "throughput.json").read_text())["device_type"] == "cpu"
    assert "throughput: cpu" in summary and "missed: none" in summary


def test_gpu_check_throughput_verdict_fails_on_a_missed_target(tmp_path):
    """The throughput step's verdict can fail: a missed applicable target exits 1 and is listed."""
    targets = SCRIPT.parent / "gpu_check_targets.py"
    report = {
        "device": "NVIDIA H200", "backbone": "vit_giant_patch14_dinov2", "img_size": 448, "batch_size": 32,
        "precision": "bf16-mixed", "backbone_slices_per_s": 100.0, "train_slices_per_s": 50.0,
        "train_ratio": 0.5, "predict_slices_per_s": 60.0, "predict_ratio": 0.6, "peak_memory_gb": 20.0,
        "mfu": None, "targets": {
            "gpu_train_vs_backbone": {"applicable": True, "value": 0.5, "min": 0.7, "met": False},
            "gpu_peak_memory_gb": {"applicable": True, "value": 20.0, "max": 24.0, "met": True},
            "cpu_predict_vs_backbone": {"applicable": False, "value": 0.6, "min": 0.8, "met": False},
        },
    }  # fmt: skip
    path = tmp_path / "throughput.json"
    path.write_text(json.dumps(report))
    done = subprocess.run([sys.executable, str(targets), str(path)], capture_output=True, text=True)
    assert done.returncode == 1
    assert "missed: ['gpu_train_vs_backbone 0.5 (>= 0.7)']" in done.stdout
    assert "met: ['gpu_peak_memory_gb 20 (< 24.0)']" in done.stdout
    report["targets"]["gpu_train_vs_backbone"].update(value=0.8, met=True)
    path.write_text(json.dumps(report))
    done = subprocess.run([sys.executable, str(targets), str(path)], capture_output=True, text=True)
    assert done.returncode == 0 and "missed: none" in done.stdout


@pytest.mark.slow
def test_fusion_memory_benchmark_reports_every_case_and_equal_gradients(tmp_path):
    """benchmarks/fusion_memory.py at toy size (its memory figures are noise there): every case measured in
    its own process, and the fusion weights' gradient of a training step unchanged by issue 16.5."""
    out = tmp_path / "fusion.json"
    argv = ["--depth", "4", "--taps", "2", "4", "--img-size", "28", "--slices", "2", "--json", str(out)]
    done = subprocess.run([sys.executable, str(SCRIPT.parent / "fusion_memory.py"), *argv],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report["peak_above_start_mb"]) == {
        "predict_before",
        "predict_after",
        "train_before",
        "train_after",
    }
    assert all(set(by_taps) == {"2", "4"} for by_taps in report["peak_above_start_mb"].values())
    assert report["train_fusion_grad_identical"] == {"2": True, "4": True}


@pytest.mark.slow
def test_field_of_view_pads_in_world_space_and_scores_every_copy(load_benchmark, tmp_path):
    """field_of_view.py's copies keep every voxel's world position (the pad on the high sides only) and are
    scored against the padded reference, case by case, for each copy and checkout."""
    import nibabel as nib
    import numpy as np
    from tiny_options import TINY_CLI

    from la_seg.cli import main as la_seg
    from la_seg.data.synthetic import write_dataset

    field_of_view = load_benchmark("field_of_view")
    write_dataset(tmp_path / "data", cases=3, seed=0, shape=(40, 36, 6), spacing=(1.6, 1.6, 4.0))
    la_seg(["fit", *TINY_CLI, "--data.root", "data", "--trainer.max_epochs", "1",
            "--trainer.limit_train_batches", "1", "--trainer.enable_model_summary", "false"])  # fmt: skip
    ckpt = tmp_path / "runs" / "demo" / "version_0" / "checkpoints" / "best.ckpt"
    out = tmp_path / "fov.json"
    record = field_of_view.main(["--ckpt", str(ckpt), "--cases", str(tmp_path / "data"), "--pad-mm", "16",
                                 "--work-dir", str(tmp_path / "work"), "--json", str(out)])  # fmt: skip
    assert json.loads(out.read_text()) == record
    assert [r["copy"] for r in record["results"]] == ["as_stored", "dark", "drawn"]
    for result in record["results"]:
        assert result["scores"]["train"]["cases"] == 3 and 0 <= result["scores"]["train"]["dice_mean"] <= 1
    for fill in ("dark", "drawn"):
        stored = tmp_path / "data" / "train_1"
        padded = tmp_path / "work" / f"data_{fill}_16mm" / "train_1"
        for name in ("enhanced.nii.gz", "atriumSegImgMO.nii.gz"):
            before, after = nib.load(stored / name), nib.load(padded / name)
            assert np.array_equal(after.affine, before.affine) and after.shape == (50, 46, 6)  # 16 mm: 10 px
            assert np.array_equal(np.asarray(after.dataobj)[:40, :36], np.asarray(before.dataobj))
        label = np.asarray(nib.load(padded / "atriumSegImgMO.nii.gz").dataobj)
        assert not label[40:].any() and not label[:, 36:].any()
        image = np.asarray(nib.load(stored / "enhanced.nii.gz").dataobj)
        pad = np.asarray(nib.load(padded / "enhanced.nii.gz").dataobj)[40:]
        if fill == "dark":
            assert np.all(pad == pad.flat[0])
        else:
            assert np.isin(pad, image).all() and len(np.unique(pad)) > 1
