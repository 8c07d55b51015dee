"""benchmarks/throughput.py at CI size: a tiny ViT on CPU; checks the report's shape, never its timings."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "throughput.py"
TINY = [
    "--config",
    "demo.yaml",
    "--device",
    "cpu",
    "--img-size",
    "56",
    "--batch-size",
    "4",
    "--steps",
    "2",
    "--volumes",
    "1",
    "--volume-shape",
    "64",
    "64",
    "8",
    "--num-workers",
    "0",
    "--threads",
    "1",
]
RATES = ("backbone_slices_per_s", "train_slices_per_s", "predict_slices_per_s")
FLOPS = ("backbone_flops_per_slice", "train_flops_per_slice", "flops_per_slice")
TARGETS = (
    "cpu_predict_vs_backbone",
    "cpu_train_step_time_vs_backbone",
    "gpu_train_vs_backbone",
    "gpu_peak_memory_gb",
)


@pytest.fixture(scope="module")
def throughput():
    spec = importlib.util.spec_from_file_location("la_seg_benchmark_throughput", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _positive(value) -> bool:
    return (
        isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    )


@pytest.fixture(scope="module")
def report(throughput, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "tiny.json"
    returned = throughput.main([*TINY, "--json", str(out), "--workdir", str(out.parent)])
    written = json.loads(out.read_text())
    assert written == json.loads(json.dumps(returned))
    return written


def test_report_has_every_figure(report):
    for key in (
        "config",
        "device",
        "torch",
        "timm",
        "img_size",
        "batch_size",
        "precision",
        "peak_memory_bytes",
        "train_ratio",
        "predict_ratio",
        "train_step_time_ratio",
        "targets",
        "fast_path",
        "details",
    ):
        assert key in report, key
    assert report["img_size"] == 56 and report["batch_size"] == 4
    assert report["device_type"] == "cpu" and report["device"].startswith("cpu")
    assert report["volume_shape"] == [64, 64, 8]


def test_figures_are_finite_and_positive(report):
    for key in (*RATES, *FLOPS, "peak_memory_bytes", "peak_memory_gb", "achieved_backbone_tflops"):
        assert _positive(report[key]), (key, report[key])
    for phase in ("backbone", "train", "predict"):
        assert _positive(report["details"][phase]["total_s"])
        assert _positive(report["peak_memory_by_phase_gb"][phase])
    assert all(_positive(t) for t in report["details"]["train"]["step_times_s"])
    assert len(report["details"]["train"]["step_times_s"]) == 2
    assert report["details"]["predict"]["slices"] == 8
    # No GPU, no peak table: no MFU.
    assert report["peak_bf16_tflops"] is None and report["mfu_train"] is None


def test_ratios_agree_with_figures(report):
    backbone = report["backbone_slices_per_s"]
    assert report["train_ratio"] == pytest.approx(report["train_slices_per_s"] / backbone)
    assert report["predict_ratio"] == pytest.approx(report["predict_slices_per_s"] / backbone)
    assert report["train_step_time_ratio"] == pytest.approx(1.0 / report["train_ratio"])
    assert report["peak_memory_bytes"] == max(
        round(v * 1e9) for v in report["peak_memory_by_phase_gb"].values()
    )


def test_targets_block(report):
    targets = report["targets"]
    assert set(targets) == set(TARGETS)
    for name, target in targets.items():
        assert isinstance(target["met"], bool), name
        assert isinstance(target["applicable"], bool), name
        assert _positive(target["value"]), name
        if "min" in target:
            assert target["met"] == (target["value"] >= target["min"]), name
        elif name == "gpu_peak_memory_gb":
            assert target["met"] == (target["value"] < target["max"]), name
        else:
            assert target["met"] == (target["value"] <= target["max"]), name
    # A tiny ViT at 56 px on CPU is not the setting any target is about.
    assert not any(t["applicable"] for t in targets.values())
    assert targets["cpu_predict_vs_backbone"]["value"] == pytest.approx(report["predict_ratio"])
    assert targets["gpu_train_vs_backbone"]["value"] == pytest.approx(report["train_ratio"])


def test_fast_path_checks(report):
    checks = report["fast_path"]
    assert checks["train_cache"] == "memory" and checks["train_volumes_cached"] == checks["train_cases"]
    assert checks["predict_resize_on_device"] is True
    assert checks["predict_eval_chunk"] <= checks["predict_eval_batch_size"] == 64
    assert checks["predict_forwards_per_case"] == math.ceil(8 / checks["predict_eval_chunk"])
    assert checks["sdpa_ops"], "the backbone should run PyTorch SDPA"
    assert checks["unfused_softmax_in_backbone"] is False


def test_frozen_backbone_keeps_no_graph(throughput, tmp_path):
    """With a frozen ViT (trainable_blocks 0) the backbone runs without autograd, in eval mode."""
    config = tmp_path / "frozen.yaml"
    text = (Path(throughput.REPO) / "la_seg" / "configs" / "demo.yaml").read_text()
    config.write_text(text.replace("trainable_blocks: -1", "trainable_blocks: 0"))
    report = throughput.main(
        ["--config", str(config), *TINY[2:], "--steps", "1", "--warmup", "1", "--workdir", str(tmp_path)]
    )
    checks = report["fast_path"]
    assert checks["backbone_frozen"] is True
    assert checks["backbone_trainable_params"] == 0
    assert checks["backbone_output_requires_grad"] is False
    assert checks["backbone_output_has_grad_fn"] is False
    assert checks["backbone_vit_in_train_mode"] is False
    assert checks["train_backbone_vit_in_train_mode"] is False
    assert _positive(report["train_slices_per_s"])


def test_rejects_unknown_config(throughput):
    with pytest.raises(SystemExit):
        throughput.main(["--config", "no-such-config.yaml", "--device", "cpu"])
