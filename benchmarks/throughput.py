#!/usr/bin/env python
"""Throughput of la-seg, side by side in one run: the frozen backbone alone (the floor), training end to end
and prediction end to end, plus peak memory, FLOPs per slice and (on GPUs Lightning knows) MFU.

    python benchmarks/throughput.py --config base.yaml --device cpu --batch-size 4 --steps 3 --volumes 2 \
        --json benchmarks/results/cpu_base_448.json [-- further la-seg options]

Module, datamodule and trainer are built by `LASegCLI(..., run=False)` from the same config and options as
`la-seg fit`, so the benchmark measures what `la-seg` runs (the CPU precision policy included), with
`pretrained` off unless `--weights FILE` is given (random weights cost the same; nothing is downloaded).
Everything runs on synthetic data written to a temp dir:

* backbone: `DINOv2Backbone.forward` alone on a (B, 3, S, S) batch, under the trainer's precision context,
  measured before and after the other phases (the load on a shared machine drifts).
* train: `trainer.fit` for warmup + steps optimiser steps on the datamodule's own training loader (no
  validation, no checkpoints); a step is the time between two batch ends (data wait included).
* predict: `trainer.predict` over `--volumes` NIfTI files of `--volume-shape` (default 640 x 640 x 44) with
  the CLI's NIfTI writer, until the last mask is written; the rate leaves out the first volume (warm-up).
Progress goes to stderr, one line per phase and per step; the results go to stdout and `--json`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python benchmarks/throughput.py` from a checkout without `pip install`
    sys.path.insert(0, str(REPO))

import la_seg  # noqa: E402, I001  (first: sets the OpenMP wait policy before torch loads)

# isort: split
import torch  # noqa: E402
from lightning.fabric.utilities.throughput import get_available_flops, measure_flops  # noqa: E402
from lightning.pytorch.callbacks import Callback, Checkpoint, EarlyStopping  # noqa: E402

from la_seg.runtime import configure_threads, describe_cpu  # noqa: E402

GB = 1e9
TARGETS = {
    "cpu_predict_vs_backbone": 0.8,  # predict e2e slices/s >= 0.8 x backbone-only (CPU, base, 448)
    "cpu_train_step_time_vs_backbone": 1.5,  # train step time <= 1.5 x backbone-only (CPU, base, 448)
    "gpu_train_vs_backbone": 0.7,  # train slices/s >= 0.7 x backbone-only (GPU)
    "gpu_peak_memory_gb": 24.0,  # peak memory of the training step < 24 GB at batch 32 (GPU)
}


def progress(message: str) -> None:
    print(f"[throughput {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---- arguments --------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="shipped config name (base.yaml, giant, ...) or a path")
    p.add_argument(
        "--device", choices=("cpu", "cuda"), default=None, help="default: the config's accelerator"
    )
    p.add_argument("--batch-size", type=int, default=None, help="override data.batch_size")
    p.add_argument("--img-size", type=int, default=None, help="override data.img_size")
    p.add_argument("--steps", type=int, default=None, help="timed steps per phase (default: 10 cuda, 3 cpu)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 3 cuda, 1 cpu)")
    p.add_argument("--volumes", type=int, default=None, help="volumes to predict (default: 4 cuda, 2 cpu)")
    p.add_argument("--volume-shape", type=int, nargs=3, default=(640, 640, 44), metavar=("X", "Y", "Z"))
    p.add_argument(
        "--train-cases", type=int, default=2, help="synthetic training cases (copies of a phantom)"
    )
    p.add_argument("--precision", default=None, help="override trainer.precision (e.g. 32-true, bf16-mixed)")
    p.add_argument("--eval-batch-size", type=int, default=None, help="override model.eval_batch_size")
    p.add_argument("--num-workers", type=int, default=None, help="override data.num_workers")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: as la-seg chooses)")
    p.add_argument("--weights", type=Path, default=None, help="local backbone weights (model.net.weights)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, default=None, help="parent of the temp dir (default: system tmp)")
    p.add_argument("--phantom-dir", type=Path, default=None, help="keep / reuse the synthetic phantom here")
    p.add_argument("--json", type=Path, default=None, help="write the results here (also printed)")
    p.add_argument("overrides", nargs="*", help="further la-seg options, after `--`")
    args = p.parse_args(argv)
    for name in ("batch_size", "img_size", "steps", "volumes", "train_cases", "eval_batch_size", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.warmup is not None and args.warmup < 0:
        p.error("--warmup must be >= 0")
    if min(args.volume_shape) < 1:
        p.error(f"--volume-shape must be positive, got {args.volume_shape}")
    from la_seg.config_file import CONFIG_DIR, resolve_config_paths

    args.config_path = resolve_config_paths(["--config", args.config])[1]  # before any data is written
    if not Path(args.config_path).is_file():
        p.error(f"--config {args.config!r} is neither a file nor shipped in {CONFIG_DIR}")
    return args


def cli_args(args: argparse.Namespace, workdir: Path, total_steps: int) -> list[str]:
    """The `la-seg fit` options of this run: the config, the benchmark's data, a trainer that only trains."""
    options = {
        "--trainer.accelerator": args.device and ("gpu" if args.device == "cuda" else "cpu"),
        "--data.img_size": args.img_size,
        "--data.batch_size": args.batch_size,
        "--data.num_workers": args.num_workers,
        "--trainer.precision": args.precision,
        "--model.eval_batch_size": args.eval_batch_size,
    }
    weights = (
        ["--model.net.weights", str(args.weights)] if args.weights else ["--model.net.pretrained", "false"]
    )
    fixed = [
        *("--data.root", str(workdir / "train"), "--data.predict_root", str(workdir / "predict")),
        *("--data.split", "[1.0, 0.0, 0.0]", "--data.cache_dir", str(workdir / "cache")),
        *("--data.duplicates", "group"),  # copies of one phantom, on purpose
        *("--writer.output_dir", str(workdir / "masks"), "--trainer.default_root_dir", str(workdir)),
        *("--trainer.devices", "1", "--trainer.max_steps", str(total_steps)),
        *("--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0"),
        *("--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"),
    ]
    chosen = [str(item) for key, value in options.items() if value is not None for item in (key, value)]
    return ["--config", args.config_path, *fixed, *weights, *chosen, *args.overrides]


def build(args: argparse.Namespace, workdir: Path, total_steps: int):
    """(module, datamodule, trainer) exactly as `la-seg fit` builds them, less checkpointing and stopping."""
    from la_seg.data.datamodule import LADataModule
    from la_seg.lightning_cli import LASegCLI
    from la_seg.module import LASegModule

    cli = LASegCLI(LASegModule, LADataModule, run=False, args=cli_args(args, workdir, total_steps))
    trainer = cli.trainer
    trainer.callbacks = [c for c in trainer.callbacks if not isinstance(c, (Checkpoint, EarlyStopping))]
    cli.model.to(trainer.strategy.root_device)
    return cli.model, cli.datamodule, trainer


# ---- measurement helpers ----------------------------------------------------------------------------------
def now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@contextmanager
def memory_phase(device: torch.device, record: dict, key: str):
    """Peak memory of a phase: CUDA max allocated, or the process RSS peak so far on CPU (monotonic)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    yield
    if device.type == "cuda":
        record[key] = torch.cuda.max_memory_allocated(device)
    else:
        record[key] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def rate(slices: int, seconds: float) -> float:
    return slices / seconds if seconds > 0 else float("nan")


def compute_dtype(precision: str) -> torch.dtype:
    if "bf16" in precision:
        return torch.bfloat16
    return torch.float16 if precision.startswith("16") else torch.float32


def count_flops(module, trainer, img_size: int) -> dict[str, int]:
    """FLOPs per slice of the backbone, the segmenter forward and a training step (forward, loss, backward).

    Counted on one slice with attention on PyTorch's math kernel: the counter has formulas for its matrix
    products but none for the CPU flash-attention kernel (the count is the same; only the kernel differs).
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    device = trainer.strategy.root_device
    x = torch.rand(1, 3, img_size, img_size, device=device)
    y = torch.rand(1, 1, img_size, img_size, device=device)
    net = module.net
    with sdpa_kernel(SDPBackend.MATH), trainer.precision_plugin.forward_context():
        net.eval()
        flops = {"backbone": measure_flops(net.backbone, lambda: net.backbone(x))}
        flops["forward"] = measure_flops(net, lambda: net(x))
        net.train()
        flops["train_step"] = measure_flops(net, lambda: net(x), lambda logits: module.loss_fn(logits, y))
    module.zero_grad(set_to_none=True)
    return flops


# ---- phases -----------------------------------------------------------------------------------------------
def write_synthetic(workdir: Path, args: argparse.Namespace, volumes: int) -> float:
    """One phantom (la_seg.data.synthetic), copied into a LAScarQS-style training tree and a predict folder.

    With `--phantom-dir` the phantom is kept and reused by later runs (large volumes take a while).
    """
    from la_seg.data.synthetic import write_dataset

    start = time.perf_counter()
    shape = tuple(args.volume_shape)
    root = workdir / "source"
    if args.phantom_dir is not None:
        root = args.phantom_dir / "x".join(map(str, shape)) / f"seed{args.seed}"
    source = root / "train_1"
    if not (source / "enhanced.nii.gz").is_file() or not (source / "atriumSegImgMO.nii.gz").is_file():
        shutil.rmtree(source, ignore_errors=True)
        source = write_dataset(root, 1, args.seed, shape=shape)[0]
    for i in range(1, args.train_cases + 1):
        shutil.copytree(source, workdir / "train" / f"train_{i}")
    (workdir / "predict").mkdir()
    for i in range(1, volumes + 1):
        shutil.copyfile(source / "enhanced.nii.gz", workdir / "predict" / f"case_{i:03d}.nii.gz")
    return time.perf_counter() - start


def time_backbone(module, trainer, batch: int, img_size: int, steps: int, warmup: int) -> list[float]:
    """Seconds per backbone forward of a (batch, 3, S, S) input in training mode, in the precision context."""
    device = trainer.strategy.root_device
    backbone = module.net.backbone
    module.train()  # as during training: a frozen ViT must stay in eval mode regardless
    x = torch.rand(batch, 3, img_size, img_size, device=device)
    times = []
    for step in range(warmup + steps):
        start = now(device)
        with trainer.precision_plugin.forward_context():
            backbone(x)
        if step >= warmup:
            times.append(now(device) - start)
            progress(f"backbone step {len(times)}/{steps}: {times[-1]:.3f} s")
    return times


def backbone_checks(module, trainer, img_size: int) -> dict[str, Any]:
    """The frozen-backbone fast path: no trainable parameters, no graph, eval mode, the autocast dtype."""
    backbone = module.net.backbone
    module.train()
    x = torch.rand(1, 3, img_size, img_size, device=trainer.strategy.root_device)
    with trainer.precision_plugin.forward_context():
        features = backbone(x)
    return {
        "backbone_frozen": bool(backbone.frozen),
        "backbone_trainable_params": sum(p.numel() for p in backbone.parameters() if p.requires_grad),
        "backbone_output_has_grad_fn": any(f.grad_fn is not None for f in features),
        "backbone_output_dtype": str(features[0].dtype).replace("torch.", ""),
        "backbone_vit_in_train_mode": any(m.training for m in backbone.vit.modules()),
    }


class StepTimer(Callback):
    """Times each training / predict batch from the end of the previous one (data wait included)."""

    def __init__(self, device: torch.device, total: int) -> None:
        self.device, self.total = device, total
        self.times: list[float] = []
        self.slices: list[int] = []

    def _start(self, *_: Any) -> None:
        self.last = now(self.device)

    on_train_start = on_predict_start = _start

    def _end(self, stage: str, slices: int) -> None:
        end = now(self.device)
        self.times.append(end - self.last)
        self.slices.append(slices)
        self.last = end
        progress(f"{stage} step {len(self.times)}/{self.total}: {self.times[-1]:.3f} s, {slices} slices")

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self._end("train", int(batch["image"].shape[0]))

    def on_predict_batch_end(self, trainer, module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._end("predict", int(batch["image"].shape[-1]))


def bench_train(module, datamodule, trainer, warmup: int, steps: int) -> dict[str, Any]:
    timer = StepTimer(trainer.strategy.root_device, warmup + steps)
    trainer.callbacks.append(timer)
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    total = time.perf_counter() - start
    trainer.callbacks.remove(timer)
    if len(timer.times) != warmup + steps:
        raise RuntimeError(f"training ran {len(timer.times)} steps, expected {warmup + steps}")
    loss = trainer.callback_metrics.get("train/loss")
    if loss is not None and not torch.isfinite(loss):
        raise RuntimeError(f"training loss is not finite: {float(loss)}")
    timed, slices = timer.times[warmup:], sum(timer.slices[warmup:])
    return {
        "slices_per_s": rate(slices, sum(timed)),
        "total_s": sum(timed),
        "slices": slices,
        "fit_wall_s": total,
        "step_times_s": [round(t, 6) for t in timed],
        "median_step_s": statistics.median(timed),
        "cache": datamodule.cache,
        "num_workers": datamodule.num_workers,
    }


def bench_predict(module, datamodule, trainer, volumes: int, out_dir: Path) -> dict[str, Any]:
    timer = StepTimer(trainer.strategy.root_device, volumes)
    trainer.callbacks.append(timer)
    start = time.perf_counter()
    trainer.predict(module, datamodule=datamodule, return_predictions=False)
    total = time.perf_counter() - start  # the writer has finished: predict returns after its last file
    trainer.callbacks.remove(timer)
    written = sorted(out_dir.rglob("*.nii.gz"))
    if len(written) < volumes:
        raise RuntimeError(f"predict wrote {len(written)} masks for {volumes} volumes")
    steady = timer.times[1:] or timer.times  # the first volume warms kernels and allocator up
    steady_slices = sum(timer.slices[1:] or timer.slices)
    return {
        "slices_per_s": rate(steady_slices, sum(steady)),
        "end_to_end_slices_per_s": rate(sum(timer.slices), total),
        "total_s": total,
        "volume_times_s": [round(t, 6) for t in timer.times],
        "volumes": volumes,
        "slices": sum(timer.slices),
        "eval_chunk": module.eval_chunk(trainer.strategy.root_device),
        "eval_batch_size": module.hparams.eval_batch_size,
    }


# ---- report -----------------------------------------------------------------------------------------------
def environment(trainer) -> dict[str, Any]:
    """Versions and hardware: the CPU (model, capability, native bf16), threads, the device name."""
    import lightning
    import timm

    device = trainer.strategy.root_device
    cuda = device.type == "cuda"
    return {
        "device": torch.cuda.get_device_name(device) if cuda else f"cpu: {describe_cpu()['cpu_model']}",
        "device_type": device.type,
        **describe_cpu(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "lightning": lightning.__version__,
        "la_seg": la_seg.__file__,
        "python": platform.python_version(),
        "load_average": list(os.getloadavg()),
    }


def targets(result: dict, base_448: bool, cuda: bool) -> dict[str, dict]:
    """Each target: whether it applies here (device, backbone, image size), its value and bound."""
    return {
        "cpu_predict_vs_backbone": {
            "applicable": not cuda and base_448,
            "value": result["predict_ratio"],
            "min": TARGETS["cpu_predict_vs_backbone"],
        },
        "cpu_train_step_time_vs_backbone": {
            "applicable": not cuda and base_448,
            "value": result["train_step_time_ratio"],
            "max": TARGETS["cpu_train_step_time_vs_backbone"],
        },
        "gpu_train_vs_backbone": {
            "applicable": cuda,
            "value": result["train_ratio"],
            "min": TARGETS["gpu_train_vs_backbone"],
        },
        "gpu_peak_memory_gb": {
            "applicable": cuda and result["batch_size"] >= 32,
            "value": result["peak_memory_by_phase_gb"]["train"],
            "max": TARGETS["gpu_peak_memory_gb"],
        },
    }


def summarise(result: dict, details: dict, memory: dict, flops: dict, cuda: bool) -> None:
    """The side-by-side figures: rates, their ratios to the floor, memory, achieved FLOP/s and MFU."""
    backbone = details["backbone"]["slices_per_s"]
    result.update(
        backbone_slices_per_s=backbone,
        train_slices_per_s=details["train"]["slices_per_s"],
        predict_slices_per_s=details["predict"]["slices_per_s"],
        train_ratio=details["train"]["slices_per_s"] / backbone,
        train_step_time_ratio=backbone / details["train"]["slices_per_s"],
        predict_ratio=details["predict"]["slices_per_s"] / backbone,
        peak_memory_kind="cuda_max_allocated" if cuda else "process_rss_peak",
        peak_memory_gb=max(memory.values()) / GB,
        peak_memory_by_phase_gb={k: v / GB for k, v in memory.items()},
        flops_per_slice=flops,
    )
    achieved = {
        "backbone": flops["backbone"] * backbone,
        "train": flops["train_step"] * result["train_slices_per_s"],
    }
    result["achieved_tflops"] = {k: v / 1e12 for k, v in achieved.items()}
    peak = result["peak_flops"]
    result["mfu"] = {k: v / peak for k, v in achieved.items()} if peak else None
    name = result["backbone"].split(".")[0]
    base_448 = name == "vit_base_patch14_dinov2" and result["img_size"] == 448
    result["targets"] = targets(result, base_448, cuda)
    for target in result["targets"].values():
        target["met"] = (
            target["value"] >= target["min"] if "min" in target else target["value"] < target["max"]
        )


# ---- main -------------------------------------------------------------------------------------------------
def run(args: argparse.Namespace, workdir: Path) -> dict:
    cuda_default = args.device == "cuda" or (args.device is None and torch.cuda.is_available())
    steps = args.steps or (10 if cuda_default else 3)
    warmup = args.warmup if args.warmup is not None else (3 if cuda_default else 1)
    volumes = args.volumes or (4 if cuda_default else 2)
    progress(f"synthetic data: {args.train_cases} training cases, {volumes} volumes of {args.volume_shape}")
    synthetic_s = write_synthetic(workdir, args, volumes)
    progress("building module, datamodule and trainer through LASegCLI")
    start = time.perf_counter()
    module, datamodule, trainer = build(args, workdir, warmup + steps)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device, net = trainer.strategy.root_device, module.net_config
    result: dict[str, Any] = {
        "config": args.config,
        **environment(trainer),
        **{"backbone": net.backbone, "img_size": net.img_size, "batch_size": datamodule.batch_size},
        **{"steps": steps, "warmup": warmup, "volume_shape": list(args.volume_shape)},
        "precision": str(trainer.precision),
        "peak_flops": get_available_flops(device, compute_dtype(str(trainer.precision))),
    }
    details: dict[str, Any] = {"synthetic_data_s": synthetic_s, "build_s": time.perf_counter() - start}
    memory: dict[str, int] = {}
    progress("phase backbone (first pass)")
    with memory_phase(device, memory, "backbone"):
        first = time_backbone(module, trainer, datamodule.batch_size, net.img_size, steps, warmup)
        fast_path = backbone_checks(module, trainer, net.img_size)
    progress("phase train (trainer.fit)")
    with memory_phase(device, memory, "train"):
        details["train"] = bench_train(module, datamodule, trainer, warmup, steps)
    progress("phase predict (trainer.predict)")
    with memory_phase(device, memory, "predict"):
        details["predict"] = bench_predict(module, datamodule, trainer, volumes, workdir / "masks")
    progress("phase backbone (second pass)")
    times = first + time_backbone(module, trainer, datamodule.batch_size, net.img_size, steps, 0)
    details["backbone"] = {
        "slices_per_s": rate(datamodule.batch_size * len(times), sum(times)),
        "step_times_s": [round(t, 6) for t in times],
    }
    progress("counting FLOPs")
    summarise(result, details, memory, count_flops(module, trainer, net.img_size), device.type == "cuda")
    result.update(fast_path=fast_path, details=details)
    return result


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    configure_threads()  # what `la-seg` does first
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LightningCLI's args parameter.*")
    cwd = Path.cwd()
    with tempfile.TemporaryDirectory(prefix="la-seg-bench-", dir=args.workdir) as workdir:
        os.chdir(workdir)  # the config's logger writes runs/ relative to here, as `la-seg fit` would
        try:
            result = run(args, Path(workdir))
        finally:
            os.chdir(cwd)
    text = json.dumps(result, indent=2, default=str)
    if args.json is not None:
        from la_seg.atomic import atomic_write_text

        args.json.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.json, text + "\n")
    print(text)
    return json.loads(text)


if __name__ == "__main__":
    main()
