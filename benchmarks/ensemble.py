#!/usr/bin/env python
"""Cost of a k-member ensemble that shares one frozen backbone pass (la_seg.inference.Ensemble) against one
model: FLOPs per slice (fake tensors, so giant at 448 needs neither weights nor memory) and measured predict
time per volume, side by side in one run.

    python benchmarks/ensemble.py --json benchmarks/results/ensemble_cpu.json   # giant FLOPs, base timing
    python benchmarks/ensemble.py --quick                                        # tiny model, seconds

FLOPs: `FlopCounterMode` over `Ensemble.forward` on one slice, the members' backbones deduplicated as
`Ensemble.add` does for equal fingerprints. Timing: `Ensemble.segment_volume` on a random (X, Y, Z) volume,
random weights (`pretrained` off: they cost the same), under the config's `trainer.precision` autocast, with
the chunk `LASegModule` uses on that device; one model and the ensemble alternate `--repeats` times so drift
on a shared machine hits both alike.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from contextlib import nullcontext
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent
REPO = BENCHMARKS.parent
for path in (REPO, BENCHMARKS):  # `python benchmarks/ensemble.py` from a checkout without `pip install`
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import timm  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from throughput import compute_dtype  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from la_seg.config_file import resolve_config_paths  # noqa: E402
from la_seg.data.preprocess import InputSpec  # noqa: E402
from la_seg.inference import Ensemble, EnsembleMember  # noqa: E402
from la_seg.models.segmenter import LASegmenter, SegmenterConfig  # noqa: E402
from la_seg.module import CPU_EVAL_CHUNK  # noqa: E402

FLOPS_TARGET_MAX_RATIO = 1.1  # a 5-member giant ensemble at 448 px: <= 1.1x one model's FLOPs per slice
QUICK = {"config": "demo.yaml", "img_size": 56, "volume_shape": (64, 64, 8)}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--flops-config", default="giant.yaml", help="config whose model FLOPs are counted")
    p.add_argument("--timing-config", default="base.yaml", help="config whose predict time is measured")
    p.add_argument(
        "--img-size", type=int, default=None, help="slice side (default: the config's data.img_size)"
    )
    p.add_argument("--members", type=int, default=5, help="ensemble size k (default 5)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--precision", default=None, help="override trainer.precision (e.g. 32-true)")
    p.add_argument("--volume-shape", type=int, nargs=3, default=(640, 640, 44), metavar=("X", "Y", "Z"))
    p.add_argument("--repeats", type=int, default=1, help="timed volumes per setting (default 1)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--skip-timing", action="store_true", help="FLOPs only")
    p.add_argument("--quick", action="store_true", help="tiny demo model at 56 px on a 64x64x8 volume")
    p.add_argument("--json", type=Path, default=None, help="write the results here (also printed)")
    args = p.parse_args(argv)
    if args.members < 1 or args.repeats < 1 or min(args.volume_shape) < 1:
        p.error("--members, --repeats and --volume-shape must be positive")
    if args.quick:
        args.flops_config = args.timing_config = QUICK["config"]
        args.img_size, args.volume_shape = QUICK["img_size"], QUICK["volume_shape"]
    return args


def shown(path: Path) -> str:
    """A config path as the report shows it: relative to the checkout when it lies inside."""
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def progress(message: str) -> None:
    print(f"[ensemble {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def stretched_input(net: LASegmenter) -> InputSpec:
    """The input the benchmark's segmenters get: slices stretched to their img_size (no mm grid to keep)."""
    return InputSpec(img_size=net.config.img_size, in_plane="stretch")


def net_config(config: dict, img_size: int | None) -> SegmenterConfig:
    """The config's network with random weights (nothing downloaded) at `img_size`, backbone frozen (the
    setting in which members can share it; the demo config trains its tiny ViT)."""
    net = SegmenterConfig(**((config.get("model") or {}).get("net") or {}))
    size = img_size or int((config.get("data") or {}).get("img_size", net.img_size))
    return dataclasses.replace(net, pretrained=False, weights=None, img_size=size, trainable_blocks=0)


def fake_segmenters(net: SegmenterConfig, members: int, mode: FakeTensorMode) -> list[LASegmenter]:
    """`members` segmenters with fake CPU weights (shapes only), sharing the first one's backbone module.

    Built on the meta device, then moved to fake CPU tensors: meta alone fails in the backbone's autocast
    check, and timm cannot be built under FakeTensorMode (it reads drop-path rates with .item()).
    """
    cpu = torch.device("cpu")
    with torch.device("meta"):
        nets = [LASegmenter(net) for _ in range(members)]
    with mode:  # to_empty's fresh tensors are fake ones under the mode: shapes, no storage
        nets = [n.to_empty(device=cpu) for n in nets]
    for other in nets[1:]:
        other.backbone = nets[0].backbone  # what Ensemble.add does for equal fingerprints
    return nets


def load_config(name: str) -> tuple[Path, dict]:
    """A config file, or one shipped with la-seg, as `la-seg --config NAME` finds it."""
    path = Path(resolve_config_paths(["--config", name])[1])
    if not path.is_file():
        raise SystemExit(f"config {name} not found (neither a file nor shipped with la-seg)")
    return path, yaml.safe_load(path.read_text()) or {}


def autocast_dtype(precision: str, device_type: str) -> torch.dtype | None:
    """The dtype Lightning's `*-mixed` precision autocasts to, or None for full precision."""
    return compute_dtype(precision) if "mixed" in str(precision) else None


def count_flops(fn, *args) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn(*args)
    return counter.get_total_flops()


def flops_figures(config_name: str, img_size: int | None, members: int) -> dict:
    """FLOPs per slice of one model and of the shared k-member ensemble."""
    path, config = load_config(config_name)
    net = net_config(config, img_size)
    progress(f"FLOPs: {members} x {net.backbone} at {net.img_size} px on fake tensors")
    mode = FakeTensorMode(allow_non_fake_inputs=True)  # to_empty reads the meta tensors (shapes only)
    nets = fake_segmenters(net, members, mode)
    with mode:
        x = torch.empty(1, 3, net.img_size, net.img_size)
        inputs = {stretched_input(nets[0]).kind: x}
        one = count_flops(Ensemble([EnsembleMember("0", nets[0], stretched_input(nets[0]))]).eval(), inputs)
        ensemble = count_flops(
            Ensemble([EnsembleMember(str(i), n, stretched_input(n)) for i, n in enumerate(nets)]).eval(),
            inputs,
        )
        backbone = count_flops(nets[0].backbone, x)
    head = one - backbone
    ratio = ensemble / one
    applicable = net.backbone.split(".")[0] == "vit_giant_patch14_dinov2" and net.img_size == 448
    return {
        "config": shown(path),
        "backbone": net.backbone,
        "img_size": net.img_size,
        "members": members,
        "backbone_flops_per_slice": backbone,
        "head_flops_per_slice": head,
        "one_model_flops_per_slice": one,
        "ensemble_flops_per_slice": ensemble,
        "ratio": ratio,
        "expected_ratio": 1 + (members - 1) * head / one,
        "target": {
            "applicable": applicable and members == 5,
            "max": FLOPS_TARGET_MAX_RATIO,
            "value": ratio,
            "met": ratio <= FLOPS_TARGET_MAX_RATIO,
        },
    }


def real_ensembles(net: SegmenterConfig, members: int, device: torch.device) -> tuple[Ensemble, Ensemble]:
    """One model and k models whose backbones hold equal random weights (deduplicated by fingerprint)."""
    nets = []
    for seed in range(members):
        torch.manual_seed(seed)
        nets.append(LASegmenter(net).to(device).eval())
        if seed:
            nets[-1].backbone.load_state_dict(nets[0].backbone.state_dict())
    one = Ensemble([EnsembleMember("0", nets[0], stretched_input(nets[0]))]).eval()
    ensemble = Ensemble([EnsembleMember(str(i), n, stretched_input(n)) for i, n in enumerate(nets)]).eval()
    if len(ensemble.backbones) != 1:
        raise RuntimeError("the ensemble members should share one backbone")
    return one, ensemble


def timed(ensemble: Ensemble, image: torch.Tensor, chunk: int, autocast, device: torch.device) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    with autocast():
        ensemble.segment_volume(image, chunk=chunk)
    sync()
    return time.perf_counter() - start


def timing_figures(args: argparse.Namespace) -> dict:
    """Predict time per volume of one model and of the k-member ensemble, alternating."""
    path, config = load_config(args.timing_config)
    net = net_config(config, args.img_size)
    device = torch.device(args.device)
    precision = args.precision or (config.get("trainer") or {}).get("precision", "32-true")
    dtype = autocast_dtype(precision, device.type)
    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else nullcontext
    eval_batch = int((config.get("model") or {}).get("eval_batch_size", 32))
    chunk = min(eval_batch, CPU_EVAL_CHUNK) if device.type == "cpu" else eval_batch
    progress(f"timing: building 1 + {args.members} x {net.backbone} at {net.img_size} px on {device}")
    one, ensemble = real_ensembles(net, args.members, device)
    image = torch.rand(*args.volume_shape, generator=torch.Generator().manual_seed(0)).to(device)
    timed(one, image[..., :chunk], chunk, autocast, device)  # warm-up: allocator, kernels
    times: dict[str, list[float]] = {"one": [], "ensemble": []}
    for repeat in range(args.repeats):
        for name, model in (("one", one), ("ensemble", ensemble)):
            progress(f"timing: {name} ({repeat + 1}/{args.repeats}), volume {tuple(args.volume_shape)}")
            times[name].append(timed(model, image, chunk, autocast, device))
            progress(f"timing: {name} took {times[name][-1]:.1f} s")
    one_s, ensemble_s = (sum(times[k]) / len(times[k]) for k in ("one", "ensemble"))
    return {
        "config": shown(path),
        "backbone": net.backbone,
        "img_size": net.img_size,
        "members": args.members,
        "device": device.type,
        "precision": str(precision),
        "threads": torch.get_num_threads(),
        "chunk": chunk,
        "volume_shape": list(args.volume_shape),
        "one_model_s_per_volume": one_s,
        "ensemble_s_per_volume": ensemble_s,
        "ratio": ensemble_s / one_s,
        "flops_ratio": flops_figures(args.timing_config, args.img_size, args.members)["ratio"],
        "times_s": times,
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = {
        "quick": args.quick,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "machine": platform.processor() or platform.machine(),
        "flops": flops_figures(args.flops_config, args.img_size, args.members),
    }
    if not args.skip_timing:
        result["timing"] = timing_figures(args)
    text = json.dumps(result, indent=2)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    print(text)
    return result


if __name__ == "__main__":
    main()
