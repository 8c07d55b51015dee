"""CPU runtime policy: OpenMP threads that degrade gracefully under load, and a precision the CPU runs fast.

Why: with PyTorch's default OpenMP threads spinning while they wait, two threads on a machine where another
process keeps one core busy slow every op many-fold. Passive waiting gives the core back instead. And bf16 on
a CPU without native bf16 (AVX2 only) is emulated, several times slower than fp32, so the paper's `bf16-mixed`
only pays where the CPU has AVX512-BF16 or AMX (measured: benchmarks/README.md, "Figures once quoted in
code"). This module must not import torch at module level: `prefer_passive_openmp` runs before torch loads.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Mapping, MutableMapping, Sequence
from pathlib import Path
from typing import NamedTuple

THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
BF16_PRECISIONS = ("bf16", "bf16-mixed", "bf16-true")
FP32_PRECISION = "32-true"
CPUINFO = Path("/proc/cpuinfo")


def prefer_passive_openmp(environ: MutableMapping[str, str] = os.environ) -> None:
    """OMP_WAIT_POLICY=PASSIVE unless the user chose one; OpenMP reads it once, when torch loads."""
    environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask: taskset, cgroup cpusets), not the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def configure_threads(environ: Mapping[str, str] = os.environ) -> int | None:
    """One torch thread per available core, unless OMP_NUM_THREADS / MKL_NUM_THREADS says otherwise.

    Returns the thread count set, or None where the user's setting was left alone.
    """
    if any(name in environ for name in THREAD_VARIABLES):
        return None
    import torch

    threads = available_cores()
    torch.set_num_threads(threads)
    return threads


class Bf16Support(NamedTuple):
    native: bool
    reason: str  # which feature provides it, or what is missing


def native_bf16_support() -> Bf16Support:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX-BF16), from the CPU's feature flags
    (torch's own probes are private: torch.cpu._is_amx_tile_supported)."""
    flags = cpu_flags()
    cpuinfo_flags = (("AMX", "amx_bf16"), ("AVX512-BF16", "avx512_bf16"))
    found = [name for name, flag in cpuinfo_flags if flag in flags]
    if found:
        return Bf16Support(True, f"native bf16 ({' and '.join(found)})")
    return Bf16Support(False, f"no native bf16 (no AVX512-BF16 or AMX; CPU capability {cpu_capability()})")


def cpu_flags(cpuinfo: Path = CPUINFO) -> set[str]:
    """The feature flags of the first CPU in /proc/cpuinfo (empty where there is none)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return set()
    line = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def cpu_capability() -> str:
    import torch

    return torch.backends.cpu.get_cpu_capability()


def cpu_model(cpuinfo: Path = CPUINFO) -> str:
    """The CPU's model name from /proc/cpuinfo, or platform's guess."""
    import platform

    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_cpu() -> dict:
    """What a benchmark should record about the CPU it ran on."""
    import torch

    bf16 = native_bf16_support()
    return {
        "cpu_model": cpu_model(),
        "cpu_capability": cpu_capability(),
        "native_bf16": bf16.native,
        "native_bf16_reason": bf16.reason,
        "cpu_cores_available": available_cores(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
    }


# ---- precision on CPU -------------------------------------------------------------------------------------
def choose_cpu_precision(configured: str, explicit: bool, support: Bf16Support) -> tuple[str, str]:
    """(precision, why) for a run on CPU.

    The rule: a precision given on the command line is kept as given. A bf16 precision from a config file
    (the paper configs say bf16-mixed, a GPU setting) is kept only where the CPU has native bf16, otherwise
    it becomes 32-true. Any other configured precision (demo.yaml's 32-true) is kept.
    """
    configured = str(configured)
    if explicit:
        return configured, f"{configured} (set on the command line)"
    if configured not in BF16_PRECISIONS:
        return configured, f"{configured} (from the config)"
    if support.native:
        return configured, f"{configured} (from the config; this CPU has {support.reason})"
    return FP32_PRECISION, (
        f"{FP32_PRECISION} instead of the config's {configured}: this CPU has {support.reason}, where bf16 "
        f"is emulated and several times slower than fp32 (--trainer.precision {configured} forces it)"
    )


def on_command_line(option: str, argv: Sequence[str]) -> bool:
    """Whether `--option` (e.g. "model.threshold") was typed, as `--option value` or `--option=value`; config
    files do not count. A typed value wins over a config file's and a checkpoint's record."""
    return any(arg == f"--{option}" or arg.startswith(f"--{option}=") for arg in argv)


def typed_value(option: str, argv: Sequence[str]) -> str | None:
    """The value typed last for `--option` (as `--option value` or `--option=value`); None if not typed."""
    value = None
    for i, arg in enumerate(argv):
        if arg == f"--{option}" and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(f"--{option}="):
            value = arg.split("=", 1)[1]
    return value


def runs_on_cpu(accelerator) -> bool:
    """Whether Lightning's `accelerator` setting resolves to the CPU on this machine."""
    if not isinstance(accelerator, str):
        return False  # an Accelerator instance or a class_path config: the user chose it
    if accelerator == "cpu":
        return True
    if accelerator != "auto":
        return False
    from lightning.pytorch.accelerators import CUDAAccelerator, MPSAccelerator

    return not (CUDAAccelerator.is_available() or MPSAccelerator.is_available())


def apply_cpu_precision(trainer_config, argv: Sequence[str]) -> None:
    """Set `trainer.precision` for a CPU run by `choose_cpu_precision` and say which and why (stderr)."""
    if not runs_on_cpu(trainer_config.get("accelerator", "auto")):
        return
    configured = trainer_config.get("precision") or FP32_PRECISION
    typed = on_command_line("trainer.precision", argv)
    precision, why = choose_cpu_precision(configured, typed, native_bf16_support())
    trainer_config.precision = precision
    print(f"la-seg: CPU precision {why}", file=sys.stderr, flush=True)


# Lines Lightning prints on every run that say nothing about this run (advertising, library internals).
_NOISE = ("💡 Tip:",)
_NOISY_WARNINGS = (r"`isinstance\(treespec, LeafSpec\)` is deprecated",)


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(_NOISE)


def quiet_lightning() -> None:
    """Keep Lightning's output to what concerns the run: no tips, no deprecation notes of its internals."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNoise) for f in logger.filters):
            logger.addFilter(_DropNoise())
    for pattern in _NOISY_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
