#!/usr/bin/env python
"""Throughput of la-seg, side by side in one run: the frozen backbone alone (the floor), a training step end
to end, and prediction end to end, plus peak memory, FLOPs per slice and (on known GPUs) MFU.

    python benchmarks/throughput.py --config base.yaml --device cpu --batch-size 4 --steps 3 --volumes 1 \
        --json benchmarks/results/cpu_base_448.json

The config is resolved like the CLI does (a shipped name such as ``giant.yaml`` or a path); its ``model`` and
``data`` sections and ``trainer.precision`` are used, with ``pretrained`` forced off (random weights cost the
same and nothing is downloaded). Everything runs on synthetic data written to a temp dir:

* backbone: ``DINOv2Backbone.forward`` alone on a (B, 3, S, S) batch, under the trainer's autocast.
* train: ``SliceDataset`` (the real training dataset, with the config's augmentation and cache) through a
  ``DataLoader`` -> ``LASegModule.training_step`` loss -> backward -> optimiser step.
* predict: NIfTI files of ``--volume-shape`` (default 640 x 640 x 44) -> ``VolumeDataset`` (read, normalise)
  in DataLoader workers -> ``predict_step`` / ``segment_volume`` (resize on the device, chunks of
  ``eval_batch_size``, inverse resize) -> ``write_nifti`` of the mask in writer threads, until the last file
  is written.

Precision: the autocast the trainer would use for the config's ``trainer.precision`` on that device (Lightning
honours ``bf16-mixed`` on CPU too); ``--precision 32-true`` measures plain fp32.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from contextlib import ExitStack, contextmanager, nullcontext
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python benchmarks/throughput.py` from a checkout without `pip install`
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils.data import DataLoader, RandomSampler  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count  # noqa: E402

GB = 1e9
# Dense bf16 tensor-core peak (TFLOP/s, no sparsity) by device-name substring, first match wins.
PEAK_BF16_TFLOPS = (
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),
    ("A100", 312.0),
)
TARGETS = {
    "cpu_predict_vs_backbone": 0.8,  # predict e2e slices/s >= 0.8 x backbone-only (CPU, base, 448)
    "cpu_train_step_time_vs_backbone": 1.5,  # train step time <= 1.5 x backbone-only (CPU, base, 448)
    "gpu_train_vs_backbone": 0.7,  # train slices/s >= 0.7 x backbone-only (GPU)
    "gpu_peak_memory_gb": 24.0,  # peak memory of the training step < 24 GB at batch 32 (GPU)
}


# ---- arguments and config -------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--config", required=True, help="shipped config name (base.yaml, giant, ...) or a path")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available")
    p.add_argument(
        "--batch-size", type=int, default=None, help="training / backbone batch (default: data.batch_size)"
    )
    p.add_argument("--img-size", type=int, default=None, help="slice side S (default: data.img_size)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per phase (default: 10 cuda, 3 cpu)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 3 cuda, 1 cpu)")
    p.add_argument("--volumes", type=int, default=None, help="volumes to predict (default: 4 cuda, 2 cpu)")
    p.add_argument("--volume-shape", type=int, nargs=3, default=(640, 640, 44), metavar=("X", "Y", "Z"))
    p.add_argument(
        "--train-cases", type=int, default=2, help="synthetic training cases (copies of one phantom)"
    )
    p.add_argument("--precision", default=None, help="override trainer.precision (e.g. 32-true, bf16-mixed)")
    p.add_argument("--eval-batch-size", type=int, default=None, help="override model.eval_batch_size")
    p.add_argument(
        "--num-workers",
        type=int,
        default=None,
        help="DataLoader workers (default: data.num_workers, at most the CPU count)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--channels-last", action="store_true", help="decoder in channels_last memory format")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--workdir", type=Path, default=None, help="parent of the temp data dir (default: system tmp)"
    )
    p.add_argument("--phantom-dir", type=Path, default=None, help="keep / reuse the synthetic phantom here")
    p.add_argument("--json", type=Path, default=None, help="write the results here (also printed)")
    args = p.parse_args(argv)
    for name in ("batch_size", "img_size", "steps", "volumes", "train_cases", "eval_batch_size", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.warmup is not None and args.warmup < 0:
        p.error("--warmup must be >= 0")
    if min(args.volume_shape) < 1:
        p.error(f"--volume-shape must be positive, got {args.volume_shape}")
    return args


def load_config(name: str) -> tuple[Path, dict]:
    """The YAML behind `--config NAME`, found the way `la-seg --config NAME` finds it."""
    from la_seg.cli import CONFIG_DIR, resolve_config_paths

    path = Path(resolve_config_paths(["--config", name])[1])
    if not path.is_file():
        raise SystemExit(
            f"throughput.py: config {name!r} is neither a file nor a shipped config in {CONFIG_DIR}"
        )
    config = yaml.safe_load(path.read_text()) or {}
    return path, config


def autocast_dtype(precision: str, device: str) -> torch.dtype | None:
    """The dtype Lightning's precision plugin autocasts to for `precision` (None: no autocast)."""
    p = str(precision)
    if p in ("bf16-mixed", "bf16"):
        return torch.bfloat16
    if p in ("16-mixed", "16"):
        if device == "cpu":
            raise SystemExit("throughput.py: 16-mixed is a CUDA precision; use bf16-mixed or 32-true on CPU")
        return torch.float16
    if p in ("32-true", "32", "64-true", "64"):
        return None
    raise SystemExit(f"throughput.py: precision {p!r} is not supported here (bf16-mixed, 16-mixed, 32-true)")


def peak_bf16_tflops(device_name: str) -> float | None:
    for key, tflops in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops
    return None


# ---- measurement helpers ----------------------------------------------------------------------------------
class Timer:
    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def now(self) -> float:
        self.sync()
        return time.perf_counter()


class OpRecorder(TorchDispatchMode):
    """Records (op name, device of its first tensor argument) of every aten op run under it."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[str, str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        device = next((str(a.device) for a in args if isinstance(a, torch.Tensor)), "")
        self.ops.append((str(func.overloadpacket.__name__), device))
        return func(*args, **(kwargs or {}))

    def names(self) -> set[str]:
        return {name for name, _ in self.ops}


def flop_counter() -> FlopCounterMode:
    """FlopCounterMode that also counts CPU SDPA (torch registers only the CUDA attention kernels)."""
    mapping = {}
    cpu_sdpa = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_sdpa is not None:
        mapping[cpu_sdpa] = lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop_count(q, k, v)
    return FlopCounterMode(display=False, custom_mapping=mapping)


def rss_peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


@contextmanager
def memory_phase(device: torch.device, record: dict, key: str):
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    yield
    if device.type == "cuda":
        torch.cuda.synchronize()
        record[key] = torch.cuda.max_memory_allocated()
    else:
        record[key] = rss_peak_bytes()  # process-wide and monotonic: the peak so far


def rate(slices: int, seconds: float) -> float:
    return slices / seconds if seconds > 0 else float("nan")


def summary(times: list[float]) -> dict:
    return {
        "step_times_s": [round(t, 6) for t in times],
        "median_step_s": statistics.median(times) if times else None,
    }


# ---- synthetic data ---------------------------------------------------------------------------------------
def write_synthetic(
    workdir: Path,
    shape: tuple[int, int, int],
    train_cases: int,
    volumes: int,
    seed: int,
    phantom_dir: Path | None = None,
):
    """One phantom (la_seg.data.synthetic), copied into a LAScarQS-style training tree and a predict folder.

    With `phantom_dir` the phantom is kept there and reused by later runs (it takes ~30 s at 640 x 640 x 44).
    """
    from la_seg.data.layouts import find_cases
    from la_seg.data.synthetic import write_dataset

    start = time.perf_counter()
    root = (
        workdir / "source" if phantom_dir is None else phantom_dir / "x".join(map(str, shape)) / f"seed{seed}"
    )
    source = root / "train_1"
    if not (source / "enhanced.nii.gz").is_file() or not (source / "atriumSegImgMO.nii.gz").is_file():
        shutil.rmtree(source, ignore_errors=True)
        source = write_dataset(root, 1, seed, shape=tuple(shape))[0]
    for i in range(1, train_cases + 1):
        shutil.copytree(source, workdir / "train" / f"train_{i}")
    (workdir / "predict").mkdir()
    for i in range(1, volumes + 1):
        shutil.copyfile(source / "enhanced.nii.gz", workdir / "predict" / f"case_{i:03d}.nii.gz")
    train = find_cases(workdir / "train", "lascarqs", require_labels=True)
    predict = find_cases(workdir / "predict", "auto")
    return train, predict, time.perf_counter() - start


# ---- phases -----------------------------------------------------------------------------------------------
def build_module(config: dict, args: argparse.Namespace, img_size: int, device: torch.device):
    from la_seg.models.segmenter import SegmenterConfig
    from la_seg.module import LASegModule

    model = dict(config.get("model") or {})
    data = config.get("data") or {}
    net = dict(model.pop("net", None) or {})
    net.update(pretrained=False, weights=None, img_size=img_size)
    known = {f.name for f in dataclasses.fields(SegmenterConfig)}
    unknown = sorted(set(net) - known)
    if unknown:
        raise SystemExit(f"throughput.py: model.net has keys SegmenterConfig does not know: {unknown}")
    kwargs = {
        k: model[k]
        for k in (
            "loss",
            "optimizer",
            "lr",
            "weight_decay",
            "eval_batch_size",
            "threshold",
            "postprocess",
            "compile",
        )
        if k in model
    }
    if args.eval_batch_size is not None:
        kwargs["eval_batch_size"] = args.eval_batch_size
    kwargs["slice_context"] = bool(data.get("slice_context", False))
    torch.manual_seed(args.seed)
    with torch.device(device):  # initialise the weights where they will live (seconds for the giant ViT)
        module = LASegModule(net=SegmenterConfig(**net), **kwargs)
    module.to(device)
    if args.channels_last:
        module.net.decoder.to(memory_format=torch.channels_last)
    return module


def bench_backbone(module, batch: int, img_size: int, steps: int, warmup: int, autocast, device, timer, out):
    backbone = module.net.backbone
    module.train()  # as during training: a frozen ViT must stay in eval mode regardless
    x = torch.rand(batch, 3, img_size, img_size, device=device)
    checks: dict[str, Any] = {}
    retained = None
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
    recorder, counter = OpRecorder(), flop_counter()
    with counter, recorder, autocast():
        feats = backbone(x)
    if device.type == "cuda":
        torch.cuda.synchronize()
        out_bytes = sum(f.numel() * f.element_size() for f in feats)
        retained = torch.cuda.memory_allocated() - before - out_bytes
    names = recorder.names()
    attention = [m for m in backbone.vit.modules() if hasattr(m, "fused_attn")]
    checks.update(
        backbone_frozen=bool(backbone.frozen),
        backbone_trainable_params=sum(p.numel() for p in backbone.parameters() if p.requires_grad),
        backbone_output_requires_grad=any(f.requires_grad for f in feats),
        backbone_output_has_grad_fn=any(f.grad_fn is not None for f in feats),
        backbone_retained_bytes_beyond_outputs=retained,
        backbone_output_dtype=str(feats[0].dtype),
        backbone_vit_in_train_mode=any(m.training for m in backbone.vit.modules()),
        backbone_grad_checkpointing=bool(getattr(backbone.vit, "grad_checkpointing", False)),
        sdpa_fused_attn_modules=f"{sum(bool(m.fused_attn) for m in attention)}/{len(attention)}",
        sdpa_ops=sorted(n for n in names if "scaled_dot_product" in n or "attention" in n),
        unfused_softmax_in_backbone=any(n in ("_softmax", "softmax") for n in names),
    )
    del feats
    flops_per_slice = counter.get_total_flops() / batch
    for _ in range(max(0, warmup - 1)):
        with autocast():
            backbone(x)
    out["backbone_flops_per_slice"] = flops_per_slice
    return checks, time_backbone(backbone, x, steps, autocast, timer)


def time_backbone(backbone, x: torch.Tensor, steps: int, autocast, timer: Timer) -> list[float]:
    times = []
    for _ in range(steps):
        t0 = timer.now()
        with autocast():
            backbone(x)
        times.append(timer.now() - t0)
    return times


def bench_train(
    module,
    cases,
    config,
    batch,
    img_size,
    steps,
    warmup,
    workers,
    autocast,
    device,
    timer,
    out,
    cache_dir: Path,
):
    from la_seg.data.datasets import SliceDataset
    from la_seg.data.transforms import AugmentationConfig, build_train_transform

    data = config.get("data") or {}
    augmentation = AugmentationConfig(**(data.get("augmentation") or {}))
    t0 = time.perf_counter()
    dataset = SliceDataset(
        cases,
        img_size,
        slice_context=bool(data.get("slice_context", False)),
        transform=build_train_transform(augmentation),
        empty_slice_fraction=float(data.get("empty_slice_fraction", 1.0)),
        seed=int(data.get("seed", 42)),
        cache=data.get("cache", "memory"),
        cache_dir=cache_dir,
    )
    dataset_build_s = time.perf_counter() - t0
    total_steps = warmup + steps
    sampler = RandomSampler(
        dataset, replacement=True, num_samples=batch * total_steps, generator=torch.Generator().manual_seed(0)
    )
    loader = DataLoader(
        dataset,
        batch_size=batch,
        sampler=sampler,
        drop_last=True,
        num_workers=workers,
        pin_memory=device.type == "cuda",
    )
    optimizer = module.build_optimizer()
    module.train()
    checks = {
        "train_cache": dataset.cache.mode,
        "train_volumes_cached": len(dataset.cache._memory) if dataset.cache.mode == "memory" else None,
        "train_cases": len(cases),
        "train_augmentation": bool(augmentation.enabled),
        "train_backbone_vit_in_train_mode": any(m.training for m in module.net.backbone.vit.modules()),
        "train_decoder_in_train_mode": module.net.decoder.training,
    }
    flops_per_slice = None
    times, waits = [], []
    iterator = iter(loader)
    for step in range(total_steps):
        t0 = timer.now()
        batch_data = next(iterator)
        t_data = time.perf_counter()
        batch_data = {k: v.to(device, non_blocking=True) for k, v in batch_data.items()}
        counting = step == 0 and warmup > 0
        with flop_counter() if counting else nullcontext() as counter:
            with autocast():
                loss = module.training_step(batch_data, step)
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if counting:
            flops_per_slice = counter.get_total_flops() / batch
        t1 = timer.now()
        if step >= warmup:
            times.append(t1 - t0)
            waits.append(t_data - t0)
    del iterator
    if not math.isfinite(float(loss.detach())):
        raise RuntimeError(f"training loss is not finite: {float(loss)}")
    total = sum(times)
    out.update(train_slices_per_s=rate(batch * steps, total), train_flops_per_slice=flops_per_slice)
    details = {
        "total_s": total,
        "data_wait_s": sum(waits),
        "dataset_build_s": dataset_build_s,
        "dataset_slices": len(dataset),
        "num_workers": workers,
        **summary(times),
    }
    return checks, details


def bench_predict(module, cases, volume_shape, workers, autocast, device, timer, out, out_dir: Path):
    from la_seg.callbacks.writer import NiftiPredictionWriter
    from la_seg.data.datasets import VolumeDataset, first_item
    from la_seg.data.io import Volume, write_nifti
    from la_seg.data.preprocess import restore_geometry, slices_to_input

    module.eval()
    hp = module.hparams
    x, y, z = volume_shape
    # Warm-up on a small volume of the same in-plane size (kernels, allocator), counting FLOPs and ops.
    warm_depth = min(z, hp.eval_batch_size) if device.type == "cuda" else min(z, 2)
    warm = torch.rand(x, y, warm_depth, device=device)
    recorder, counter = OpRecorder(), flop_counter()
    with torch.inference_mode(), counter, recorder, autocast():
        module.segment_volume(warm)
    resize_ops = [d for n, d in recorder.ops if "upsample" in n or "interpolate" in n]
    chunk = module.eval_chunk(device)
    checks = {
        "predict_eval_batch_size": hp.eval_batch_size,
        "predict_eval_chunk": chunk,
        "predict_forwards_per_case": math.ceil(z / chunk),
        "predict_resize_ops": len(resize_ops),
        "predict_resize_on_device": bool(resize_ops) and all(d.startswith(device.type) for d in resize_ops),
        "predict_inference_mode": True,
        "predict_cache": "none",  # what LADataModule uses for predict unless cache="disk"
    }
    out["flops_per_slice"] = counter.get_total_flops() / warm_depth  # one forward of the segmenter

    dataset = VolumeDataset(cases, with_labels=False, cache="none")
    loader_workers = min(workers, len(dataset))
    loader = DataLoader(
        dataset,
        batch_size=1,
        shuffle=False,
        collate_fn=first_item,
        num_workers=loader_workers,
        pin_memory=device.type == "cuda",
    )
    writer = NiftiPredictionWriter(output_dir=str(out_dir))  # the writer `la-seg predict` uses
    writer.open()
    wait_data = segment = 0.0
    slices = 0
    start = timer.now()
    t_prev = time.perf_counter()
    for i, batch in enumerate(loader):
        t_got = time.perf_counter()
        wait_data += t_got - t_prev
        batch["image"] = batch["image"].to(device, non_blocking=True)
        with torch.inference_mode(), autocast():
            prediction = module.predict_step(batch, i)
        writer.submit(prediction, batch)
        slices += int(prediction["mask"].shape[-1])
        t_prev = time.perf_counter()
        segment += t_prev - t_got
    t_loop = time.perf_counter()
    writer.close()
    total = timer.now() - start
    written = sorted(out_dir.glob("*.nii.gz"))
    if len(written) != len(cases):
        raise RuntimeError(f"predict wrote {len(written)} masks for {len(cases)} volumes")
    out["predict_slices_per_s"] = rate(slices, total)

    # Stage costs, one volume each, measured alone after the end-to-end run (diagnostics, not the figure).
    stages: dict[str, float] = {}
    t0 = time.perf_counter()
    item = dataset[0]
    stages["read_normalise_s"] = time.perf_counter() - t0
    volume = item["image"].to(device)
    t0 = timer.now()
    with torch.inference_mode():
        inputs = slices_to_input(volume, module.net_config.img_size, hp.slice_context)
    stages["resize_in_s"] = timer.now() - t0
    t0 = timer.now()
    with torch.inference_mode():
        restore_geometry(inputs[:, 0], tuple(volume.shape))
    stages["resize_out_s"] = timer.now() - t0
    t0 = time.perf_counter()
    reference = Volume(
        prediction["mask"], prediction["affine"], prediction["spacing"], Path(prediction["image_path"])
    )
    write_nifti(out_dir / "stage_probe.nii.gz", prediction["mask"].astype(np.uint8), reference)
    stages["write_mask_s"] = time.perf_counter() - t0
    details = {
        "total_s": total,
        "volumes": len(cases),
        "slices": slices,
        "num_workers": loader_workers,
        "data_wait_s": wait_data,
        "segment_s": segment,
        "write_wait_s": total - (t_loop - start),
        "per_volume_stage_s": stages,
    }
    return checks, details


# ---- main -------------------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> dict:
    config_path, config = load_config(args.config)
    device_type = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("throughput.py: --device cuda but torch sees no CUDA device")
    device = torch.device(device_type)
    cuda = device.type == "cuda"
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    data = config.get("data") or {}
    trainer = config.get("trainer") or {}
    img_size = args.img_size or int(data.get("img_size", 448))
    batch = args.batch_size or int(data.get("batch_size", 32))
    steps = args.steps or (10 if cuda else 3)
    warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    volumes = args.volumes or (4 if cuda else 2)
    workers = (
        args.num_workers
        if args.num_workers is not None
        else min(int(data.get("num_workers", 0)), os.cpu_count() or 1)
    )
    precision = str(args.precision or trainer.get("precision", "32-true"))
    dtype = autocast_dtype(precision, device.type)

    def autocast():
        return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()

    import lightning
    import timm

    device_name = (
        torch.cuda.get_device_name(device) if cuda else f"cpu: {platform.processor() or platform.machine()}"
    )
    if not cuda:
        try:
            model_name = next(
                line.split(":", 1)[1].strip()
                for line in open("/proc/cpuinfo")
                if line.startswith("model name")
            )
            device_name = f"cpu: {model_name}"
        except (OSError, StopIteration):
            pass
    result: dict[str, Any] = {
        "config": args.config,
        "config_path": str(config_path),
        "device": device_name,
        "device_type": device.type,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "lightning": lightning.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "img_size": img_size,
        "batch_size": batch,
        "steps": steps,
        "warmup": warmup,
        "volumes": volumes,
        "volume_shape": list(args.volume_shape),
        "precision": precision,
        "autocast_dtype": str(dtype).replace("torch.", "") if dtype is not None else None,
        "channels_last": bool(args.channels_last),
        "num_workers": workers,
    }
    details: dict[str, Any] = {}
    memory: dict[str, int] = {}
    fast_path: dict[str, Any] = {}
    timer = Timer(device)
    warnings.filterwarnings("ignore", message=".*self.log.*")  # training_step logs; there is no trainer here
    warnings.filterwarnings("ignore", message=".*self.trainer.*")

    with ExitStack() as stack:
        workdir = Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="la-seg-bench-", dir=args.workdir))
        )
        train_cases, predict_cases, details["synthetic_data_s"] = write_synthetic(
            workdir, tuple(args.volume_shape), args.train_cases, volumes, args.seed, args.phantom_dir
        )
        t0 = time.perf_counter()
        module = build_module(config, args, img_size, device)
        details["build_model_s"] = time.perf_counter() - t0
        net = module.net_config
        result.update(
            backbone=net.backbone,
            trainable_blocks=net.trainable_blocks,
            eval_batch_size=module.hparams.eval_batch_size,
        )
        result["params_total"] = sum(p.numel() for p in module.parameters())
        result["params_trainable"] = sum(p.numel() for p in module.parameters() if p.requires_grad)

        with memory_phase(device, memory, "backbone"):
            checks, first_pass = bench_backbone(
                module, batch, img_size, steps, warmup, autocast, device, timer, result
            )
        fast_path.update(checks)
        with memory_phase(device, memory, "train"):
            checks, details["train"] = bench_train(
                module,
                train_cases,
                config,
                batch,
                img_size,
                steps,
                warmup,
                workers,
                autocast,
                device,
                timer,
                result,
                workdir / "cache",
            )
        fast_path.update(checks)
        module.zero_grad(set_to_none=True)
        out_dir = workdir / "out"
        out_dir.mkdir()
        with memory_phase(device, memory, "predict"):
            checks, details["predict"] = bench_predict(
                module,
                predict_cases,
                tuple(args.volume_shape),
                workers,
                autocast,
                device,
                timer,
                result,
                out_dir,
            )
        fast_path.update(checks)
        fast_path["channels_last_decoder"] = bool(args.channels_last)
        # The floor again, after the other phases: on a shared machine the load drifts over minutes, and the
        # ratios should compare with the floor of the whole run, not of its first minute.
        module.train()
        x = torch.rand(batch, 3, img_size, img_size, device=device)
        second_pass = time_backbone(module.net.backbone, x, steps, autocast, timer)
        times = first_pass + second_pass
        result["backbone_slices_per_s"] = rate(batch * len(times), sum(times))
        details["backbone"] = {
            "total_s": sum(times),
            "first_pass_slices_per_s": rate(batch * steps, sum(first_pass)),
            "second_pass_slices_per_s": rate(batch * steps, sum(second_pass)),
            **summary(times),
        }

    backbone_rate = result["backbone_slices_per_s"]
    result["train_ratio"] = result["train_slices_per_s"] / backbone_rate
    result["train_step_time_ratio"] = backbone_rate / result["train_slices_per_s"]
    result["predict_ratio"] = result["predict_slices_per_s"] / backbone_rate
    peak = max(memory.values())
    result.update(
        peak_memory_kind="cuda_max_allocated" if cuda else "process_rss_peak",
        peak_memory_bytes=peak,
        peak_memory_gb=peak / GB,
        peak_memory_by_phase_gb={k: v / GB for k, v in memory.items()},
    )
    tflops = peak_bf16_tflops(device_name) if cuda else None
    result["peak_bf16_tflops"] = tflops
    flops_train = result.get("train_flops_per_slice")
    result["achieved_train_tflops"] = (
        (flops_train * result["train_slices_per_s"] / 1e12) if flops_train else None
    )
    result["achieved_backbone_tflops"] = result["backbone_flops_per_slice"] * backbone_rate / 1e12
    result["mfu_train"] = result["achieved_train_tflops"] / tflops if tflops and flops_train else None
    result["mfu_backbone"] = result["achieved_backbone_tflops"] / tflops if tflops else None

    base_448 = net.backbone.split(".")[0] == "vit_base_patch14_dinov2" and img_size == 448
    train_peak_gb = memory["train"] / GB
    result["targets"] = {
        "cpu_predict_vs_backbone": {
            "applicable": not cuda and base_448,
            "value": result["predict_ratio"],
            "min": TARGETS["cpu_predict_vs_backbone"],
            "met": result["predict_ratio"] >= TARGETS["cpu_predict_vs_backbone"],
        },
        "cpu_train_step_time_vs_backbone": {
            "applicable": not cuda and base_448 and net.trainable_blocks == 0,
            "value": result["train_step_time_ratio"],
            "max": TARGETS["cpu_train_step_time_vs_backbone"],
            "met": result["train_step_time_ratio"] <= TARGETS["cpu_train_step_time_vs_backbone"],
        },
        "gpu_train_vs_backbone": {
            "applicable": cuda,
            "value": result["train_ratio"],
            "min": TARGETS["gpu_train_vs_backbone"],
            "met": result["train_ratio"] >= TARGETS["gpu_train_vs_backbone"],
        },
        "gpu_peak_memory_gb": {
            "applicable": cuda and batch == 32,
            "value": train_peak_gb,
            "max": TARGETS["gpu_peak_memory_gb"],
            "met": train_peak_gb < TARGETS["gpu_peak_memory_gb"],
        },
    }
    result["fast_path"] = fast_path
    result["details"] = details
    return result


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return value


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    result = _jsonable(run(args))
    text = json.dumps(result, indent=2)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    print(text)
    return result


if __name__ == "__main__":
    main()
