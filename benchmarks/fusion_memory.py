#!/usr/bin/env python
"""Peak memory of the block fusion against the number of fused blocks, before and after issue 16.5, on CPU.

    python benchmarks/fusion_memory.py --json benchmarks/results/fusion_memory_cpu.json

One random ViT (DINOv2 small's width, `--depth` blocks, frozen, `--img-size` px, `--slices` per pass) taps
4, 12 or all of its blocks, the deepest always its last (equal depth, so equal compute); for each count:

* predict, before: timm's list of every tapped block's map (fp32), then the fusion (la-seg before 16.5);
* predict, after: `DINOBackbone.fused`, a running weighted sum while the blocks run (what inference runs);
* train step, before: under bf16 autocast, timm's fp32 list, each map cast to bf16, fused, backward to the
  fusion weights;
* train step, after: `fusion(backbone(x))`, each map cast to bf16 as its block finishes, fused, backward;
  the fusion weights' gradient is compared with the one before, bit for bit.

Each measurement runs in a fresh process, after one warm-up call: the peak resident set (VmHWM, reset
through /proc/self/clear_refs right before the measured call) minus the resident set just before it.
Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MB = 2**20
CASES = ("predict_before", "predict_after", "train_before", "train_after")


def progress(message: str) -> None:
    print(f"[fusion_memory {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(case: str, taps: int, args: argparse.Namespace) -> dict:
    """In this process: one measurement (see the module docstring)."""
    import timm
    import torch

    from la_seg.models import BlockFusion, DINOBackbone

    torch.set_num_threads(1)
    torch.manual_seed(0)
    depth = args.depth
    indices = sorted({round(i * (depth - 1) / (taps - 1)) for i in range(taps)}) if taps > 1 else [depth - 1]
    backbone = DINOBackbone(
        "vit_small_patch14_dinov2",
        img_size=args.img_size,
        indices=indices,
        model_kwargs={"depth": depth},
    ).eval()
    fusion = BlockFusion(len(indices))
    torch.nn.init.normal_(fusion.logits)
    x = torch.rand(args.slices, 3, args.img_size, args.img_size)
    mean = torch.tensor(timm.data.IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(timm.data.IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)

    def timm_list(dtype: torch.dtype) -> list[torch.Tensor]:
        with torch.no_grad():
            maps = backbone.vit.forward_intermediates(
                (x - mean) / std, indices=indices, norm=True, output_fmt="NCHW", intermediates_only=True
            )
        return [m.to(dtype) for m in maps]

    def run() -> torch.Tensor | None:
        if case == "predict_before":
            with torch.no_grad():
                fusion(timm_list(torch.float32))
            return None
        if case == "predict_after":
            with torch.no_grad():
                backbone.fused(x, [fusion])
            return None
        fusion.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            maps = timm_list(torch.bfloat16) if case == "train_before" else backbone(x)
            (fused,) = fusion(maps)
            fused.float().square().mean().backward()
        return fusion.logits.grad.clone()

    run()  # warm-up: lazily initialised kernels and buffers are not the fusion's memory
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident set
    before_kb = status_kb("VmRSS")
    start = time.perf_counter()
    grad = run()
    seconds = time.perf_counter() - start
    peak_kb = status_kb("VmHWM")
    map_mb = args.slices * backbone.embed_dim * (args.img_size // 14) ** 2 * 4 / MB
    return {
        "case": case,
        "fused_blocks": len(indices),
        "indices": indices,
        "peak_above_start_mb": (peak_kb - before_kb) / 1024,
        "one_fp32_map_mb": map_mb,
        "seconds": seconds,
        "fusion_grad": grad.tolist() if grad is not None else None,
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--depth", type=int, default=40, help="ViT blocks (the largest tap count)")
    p.add_argument("--taps", type=int, nargs="+", default=[4, 12, 40], help="numbers of fused blocks")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--slices", type=int, default=8, help="slices per backbone pass")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--child", nargs=2, metavar=("CASE", "TAPS"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.child[0], int(args.child[1]), args)))
        return {}
    common = ["--depth", str(args.depth), "--img-size", str(args.img_size), "--slices", str(args.slices)]
    # A fixed mmap threshold: glibc then maps every block above it afresh and unmaps it when freed, so the
    # resident set follows the live tensors (its default threshold grows after a free, and freed memory of
    # the warm-up call would stay resident and hide the measured call's peak).
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MALLOC_MMAP_THRESHOLD_": "65536",
        "PYTHONPATH": f"{REPO}:{os.environ.get('PYTHONPATH', '')}",
    }
    rows = []
    for taps in args.taps:
        for case in CASES:
            progress(f"{case} with {taps} fused blocks")
            done = subprocess.run(
                [sys.executable, __file__, *common, "--child", case, str(taps)],
                env=env, capture_output=True, text=True, check=True,
            )  # fmt: skip
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            peak, seconds = rows[-1]["peak_above_start_mb"], rows[-1]["seconds"]
            progress(f"  peak {peak:.1f} MB above the start, {seconds:.1f} s")
    by = {(r["case"], r["fused_blocks"]): r for r in rows}
    counts = sorted({r["fused_blocks"] for r in rows})
    result = {
        "machine": os.uname().machine,
        "torch_threads": 1,
        "vit": {"width": "vit_small (384)", "depth": args.depth, "img_size": args.img_size},
        "slices": args.slices,
        "peak_above_start_mb": {
            case: {str(n): round(by[(case, n)]["peak_above_start_mb"], 1) for n in counts} for case in CASES
        },
        "one_fp32_map_mb": rows[0]["one_fp32_map_mb"],
        "train_fusion_grad_identical": {
            str(n): by[("train_before", n)]["fusion_grad"] == by[("train_after", n)]["fusion_grad"]
            for n in counts
        },
        "runs": [{k: v for k, v in r.items() if k != "fusion_grad"} for r in rows],
    }
    text = json.dumps(result, indent=2)
    if args.json is not None:
        sys.path.insert(0, str(REPO))
        from la_seg.atomic import atomic_write_text

        atomic_write_text(args.json, text + "\n")
    print(text)
    return result


if __name__ == "__main__":
    main()
