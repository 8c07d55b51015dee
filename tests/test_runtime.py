"""The CPU runtime policy: passive OpenMP waiting, threads per available core, precision by the CPU's bf16."""

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from jsonargparse import Namespace

from la_seg import runtime
from la_seg.runtime import Bf16Support, choose_cpu_precision

NATIVE = Bf16Support(True, "native bf16 (AMX)")
EMULATED = Bf16Support(False, "no native bf16 (no AVX512-BF16 or AMX; CPU capability AVX2)")


def test_passive_wait_policy_only_where_unset():
    environ = {}
    runtime.prefer_passive_openmp(environ)
    assert environ == {"OMP_WAIT_POLICY": "PASSIVE"}
    environ = {"OMP_WAIT_POLICY": "ACTIVE"}
    runtime.prefer_passive_openmp(environ)
    assert environ == {"OMP_WAIT_POLICY": "ACTIVE"}


def test_importing_la_seg_sets_the_policy_before_torch_loads():
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    code = "import sys, os, la_seg; print(os.environ['OMP_WAIT_POLICY'], 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["PASSIVE", "False"]


def test_threads_follow_the_affinity_mask(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 3, 5})
    before = torch.get_num_threads()
    try:
        assert runtime.configure_threads({}) == 3
        assert torch.get_num_threads() == 3
        torch.set_num_threads(1)
        assert runtime.configure_threads({"OMP_NUM_THREADS": "1"}) is None
        assert runtime.configure_threads({"MKL_NUM_THREADS": "2"}) is None
        assert torch.get_num_threads() == 1  # the user's setting was left alone
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("configured", ["bf16-mixed", "bf16-true", "bf16"])
def test_config_bf16_needs_native_bf16(configured):
    assert choose_cpu_precision(configured, False, NATIVE)[0] == configured
    precision, why = choose_cpu_precision(configured, False, EMULATED)
    assert precision == "32-true"
    assert configured in why and "AVX2" in why and "--trainer.precision" in why


def test_command_line_precision_is_kept():
    assert choose_cpu_precision("bf16-mixed", True, EMULATED) == (
        "bf16-mixed",
        "bf16-mixed (set on the command line)",
    )


@pytest.mark.parametrize("support", [NATIVE, EMULATED])
def test_other_config_precisions_are_kept(support):
    assert choose_cpu_precision("32-true", False, support)[0] == "32-true"
    assert choose_cpu_precision("16-mixed", False, support)[0] == "16-mixed"


def test_on_command_line():
    assert runtime.on_command_line("trainer.precision", ["fit", "--trainer.precision", "bf16-mixed"])
    assert runtime.on_command_line("trainer.precision", ["fit", "--trainer.precision=32-true"])
    assert not runtime.on_command_line("trainer.precision", ["fit", "--config", "giant.yaml"])
    assert not runtime.on_command_line("model.threshold", ["--model.threshold_grid", "0.5"])


def _cpu_with(monkeypatch, tmp_path, amx: bool, avx512_bf16: bool) -> None:
    """A /proc/cpuinfo whose first CPU has (or lacks) the two bf16 features."""
    flags = ["fpu", "avx2", "avx512f"] + ["amx_bf16"] * amx + ["avx512_bf16"] * avx512_bf16
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"model name\t: Intel Xeon\nflags\t\t: {' '.join(flags)}\n")
    monkeypatch.setattr(runtime, "CPUINFO", cpuinfo)
    monkeypatch.setattr(runtime.cpu_flags, "__defaults__", (cpuinfo,))


@pytest.mark.parametrize(
    ("amx", "avx512_bf16", "native", "named"),
    [
        (True, True, True, "native bf16 (AMX and AVX512-BF16)"),
        (False, True, True, "native bf16 (AVX512-BF16)"),
        (False, False, False, "no native bf16"),
    ],
)
def test_native_bf16_from_the_cpu_flags(monkeypatch, tmp_path, amx, avx512_bf16, native, named):
    _cpu_with(monkeypatch, tmp_path, amx, avx512_bf16)
    support = runtime.native_bf16_support()
    assert support.native is native and support.reason.startswith(named)
    assert runtime.cpu_model(runtime.CPUINFO) == "Intel Xeon"


def test_apply_cpu_precision_rewrites_only_cpu_runs(monkeypatch, tmp_path, capsys):
    _cpu_with(monkeypatch, tmp_path, False, False)
    trainer = Namespace(accelerator="cpu", precision="bf16-mixed")
    runtime.apply_cpu_precision(trainer, ["fit", "--config", "giant.yaml"])
    assert trainer.precision == "32-true"
    said = capsys.readouterr().err
    assert said.startswith("la-seg: CPU precision 32-true instead of the config's bf16-mixed")
    trainer = Namespace(accelerator="cpu", precision="bf16-mixed")
    runtime.apply_cpu_precision(trainer, ["fit", "--trainer.precision", "bf16-mixed"])
    assert trainer.precision == "bf16-mixed"
    trainer = Namespace(accelerator="gpu", precision="bf16-mixed")
    runtime.apply_cpu_precision(trainer, [])
    assert trainer.precision == "bf16-mixed" and capsys.readouterr().err.count("\n") == 1


def test_auto_accelerator_resolves_by_the_hardware(monkeypatch):
    from lightning.pytorch.accelerators import CUDAAccelerator, MPSAccelerator

    monkeypatch.setattr(MPSAccelerator, "is_available", staticmethod(lambda: False))
    monkeypatch.setattr(CUDAAccelerator, "is_available", staticmethod(lambda: False))
    assert runtime.runs_on_cpu("auto") and runtime.runs_on_cpu("cpu")
    monkeypatch.setattr(CUDAAccelerator, "is_available", staticmethod(lambda: True))
    assert not runtime.runs_on_cpu("auto") and not runtime.runs_on_cpu("gpu")
    assert not runtime.runs_on_cpu(SimpleNamespace())


def test_cli_applies_the_cpu_precision(monkeypatch, tmp_path, capsys):
    """A config's bf16-mixed becomes 32-true on an emulated-bf16 CPU; `--trainer.precision` is honoured."""
    from la_seg.config_file import resolve_config_paths
    from la_seg.data.datamodule import LADataModule
    from la_seg.lightning_cli import LASegCLI
    from la_seg.module import LASegModule

    _cpu_with(monkeypatch, tmp_path, False, False)
    monkeypatch.chdir(tmp_path)
    paper = tmp_path / "paper_precision.yaml"
    paper.write_text("trainer: {precision: bf16-mixed}\n")
    tiny = ["--data.img_size", "56", "--model.net.backbone_kwargs", "{depth: 4, embed_dim: 32, num_heads: 2}"]
    args = resolve_config_paths(["--config", "demo.yaml", "--config", str(paper), *tiny])

    def precision(*extra: str) -> str:
        return LASegCLI(LASegModule, LADataModule, run=False, args=[*args, *extra]).trainer.precision

    assert precision() == "32-true"
    assert "32-true instead of the config's bf16-mixed" in capsys.readouterr().err
    assert precision("--trainer.precision", "bf16-mixed") == "bf16-mixed"
    assert "bf16-mixed (set on the command line)" in capsys.readouterr().err
    _cpu_with(monkeypatch, tmp_path, True, True)
    assert precision() == "bf16-mixed"
