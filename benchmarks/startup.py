#!/usr/bin/env python
"""Startup overhead of `la-seg predict` (issue 8.3): its wall time for one volume minus its forward passes.

    python benchmarks/startup.py --json benchmarks/results/startup_cpu.json      # giant, ~4.5 GB weights
    python benchmarks/startup.py --backbone vit_small_patch14_dinov2 --backbone-kwargs '{"depth": 4}'
    python benchmarks/startup.py --pythonpath /tmp/la-seg-base --pythonpath .   # before / after
    python benchmarks/startup.py --commands --repeats 3 --json benchmarks/results/startup_commands.json

Each run is a fresh `python -m la_seg.cli predict --config giant.yaml` process with a local weights file
(random weights written once to a cache path), on one volume with few slices so the forward passes stay short.
The forward time comes from the run itself: a Lightning callback (added with `--trainer.callbacks+=`) times
each predict batch. Everything else, imports, building the model, loading weights, reading and writing files,
is the startup overhead. With several `--pythonpath` checkouts the runs alternate (a, b, a, b, ...), so a
drifting load hits them alike. Target: at most 10 s on CPU.

`--commands` measures what a user meets first (issue 28): each command's seconds to its first output line
and to its exit, beside `python -c "import torch"` as the floor: `--help`, option typos (a plain
subcommand's and fit's), `synth` of two small cases, `predict` of one 112x96x24 volume with a demo-sized
checkpoint (fitted once, one step, not timed), `evaluate` of that mask and `export-nnunet` of a small set.
Runs alternate over commands, so a drifting load hits them alike; the CPU and the load average before and
after are recorded. With `--pythonpath DIR` the commands run from that checkout (one per call).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGET_S = 10.0
CACHE = Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "la-seg"
# A callback every checkout can load (Lightning API only): wall times of the predict batches, as JSON.
PROBE = '''
import json, os, time
from lightning.pytorch.callbacks import Callback


class ForwardTimer(Callback):
    """Seconds of each predict batch (the forward passes of one volume), written at the end of predict."""

    def __init__(self):
        self.batches = []

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.start = time.perf_counter()

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.batches.append(time.perf_counter() - self.start)

    def on_predict_end(self, trainer, pl_module):
        with open(os.environ["LA_SEG_STARTUP_PROBE"], "w") as f:
            json.dump({"batches_s": self.batches}, f)
'''


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", default="vit_giant_patch14_dinov2", help="timm DINOv2 model of the run")
    p.add_argument("--backbone-kwargs", type=json.loads, default={}, help="JSON timm overrides (tiny models)")
    p.add_argument("--weights", type=Path, default=None, help="weights file (default: random, in ~/.cache)")
    p.add_argument("--pythonpath", type=Path, action="append", default=None, help="checkout(s) to measure")
    p.add_argument("--slices", type=int, default=4, help="slices of the volume")
    p.add_argument("--shape", type=int, nargs=2, default=(640, 640), metavar=("X", "Y"))
    p.add_argument("--repeats", type=int, default=1, help="runs per checkout (the median is reported)")
    p.add_argument("--python", default=sys.executable, help="the interpreter of the runs")
    p.add_argument("--json", type=Path, default=None, help="write the results here (also printed)")
    p.add_argument("--commands", action="store_true", help="time every command's first line and exit instead")
    p.add_argument("overrides", nargs="*", help="further la-seg predict options, after `--`")
    args = p.parse_args(argv)
    if args.slices < 1 or args.repeats < 1 or min(args.shape) < 1:
        p.error("--slices, --repeats and --shape must be >= 1")
    return args


def write_volume(path: Path, shape: tuple[int, int], slices: int) -> Path:
    """A random LGE-sized volume (nibabel only, so any checkout reads it), 0.625 x 0.625 x 2.5 mm."""
    import nibabel as nib
    import numpy as np

    data = np.random.default_rng(0).random((*shape, slices), dtype=np.float32) * 1000
    nib.save(nib.Nifti1Image(data, np.diag([0.625, 0.625, 2.5, 1.0])), path)
    return path


def predict_command(
    args: argparse.Namespace, checkout: Path, weights: Path, volume: Path, out_dir: Path
) -> list[str]:
    """The predict run: random decoder weights (no checkpoint, which older checkouts could not read), so a
    checkout that refuses to predict without --ckpt_path is told --untrained true."""
    net = ["--model.net.backbone", args.backbone]
    if "--untrained" in (checkout / "la_seg" / "cli.py").read_text():
        net += ["--untrained", "true"]
    if args.backbone_kwargs:
        net += ["--model.net.backbone_kwargs", json.dumps(args.backbone_kwargs)]
    return [
        *(args.python, "-m", "la_seg.cli", "predict", "--config", "giant.yaml", *net),
        *("--model.net.weights", str(weights), "--data.predict_root", str(volume)),
        *("--data.num_workers", "0", "--writer.output_dir", str(out_dir)),
        *("--trainer.devices", "1", "--trainer.callbacks+=la_seg_startup_probe.ForwardTimer"),
        *args.overrides,
    ]


def run_once(args, checkout: Path, weights: Path, volume: Path, workdir: Path, index: int) -> dict:
    """One `la-seg predict` process: its wall time, the forward time its callback saw, the difference."""
    probe = workdir / f"probe_{index}.json"
    env = {**os.environ, "PYTHONPATH": f"{checkout}{os.pathsep}{workdir}", "LA_SEG_STARTUP_PROBE": str(probe)}
    command = predict_command(args, checkout, weights, volume, workdir / f"masks_{index}")
    start = time.perf_counter()
    done = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0 or not probe.is_file():
        tail = "\n".join((done.stdout + done.stderr).splitlines()[-20:])
        raise SystemExit(f"startup.py: la-seg predict failed in {checkout} (exit {done.returncode}):\n{tail}")
    forward = sum(json.loads(probe.read_text())["batches_s"])
    print(f"[startup] {checkout}: wall {wall:.2f} s, forward {forward:.2f} s", file=sys.stderr, flush=True)
    return {"wall_s": wall, "forward_s": forward, "startup_overhead_s": wall - forward}


def default_weights(args: argparse.Namespace) -> Path:
    """The cache path of the random weights of this backbone (and overrides), written once, reused after."""
    import hashlib

    name = f"random_{args.backbone}"
    if args.backbone_kwargs:
        name += "_" + hashlib.sha1(json.dumps(args.backbone_kwargs, sort_keys=True).encode()).hexdigest()[:8]
    return CACHE / f"{name}.safetensors"


def describe_checkout(checkout: Path) -> dict:
    """The checkout's path, commit and whether its tracked files differ from that commit (edited)."""
    git = ["git", "-C", str(checkout)]
    commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    status = [*git, "status", "--porcelain", "--untracked-files=no"]
    edited = bool(subprocess.run(status, capture_output=True, text=True).stdout)
    return {"pythonpath": str(checkout), "commit": commit or None, "edited": edited}


def timed(command: list[str], cwd: Path, env: dict) -> dict:
    """Seconds from start to the first line the process prints (stdout or stderr) and to its exit."""
    start = time.perf_counter()
    process = subprocess.Popen(
        command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    first = process.stdout.readline()
    first_line_s = time.perf_counter() - start
    rest = process.stdout.read()
    status = process.wait()
    exit_s = time.perf_counter() - start
    lines = (first + rest).strip().splitlines() or [""]
    return {
        "first_line_s": first_line_s,
        "exit_s": exit_s,
        "status": status,
        "first_line": first.strip()[:120],
        "output_tail": lines[-1][:200],
    }


def prepare_commands(args: argparse.Namespace, work: Path, env: dict) -> dict[str, Path]:
    """Data and a one-step demo-sized checkpoint (not timed)."""
    la_seg = [args.python, "-m", "la_seg.cli"]
    data, one = work / "data", work / "one"
    steps = [
        [*la_seg, "synth", "--out", str(data), "--cases", "8", "--shape", "[48, 44, 12]",
         "--spacing", "[1.6, 1.6, 4]"],
        [*la_seg, "synth", "--out", str(one), "--cases", "1", "--shape", "[112, 96, 24]", "--seed", "3"],
        [*la_seg, "fit", "--config", "demo.yaml", "--data.root", str(data), "--trainer.max_epochs", "1",
         "--trainer.limit_train_batches", "1", "--data.num_workers", "0",
         "--trainer.enable_progress_bar", "false"],
    ]  # fmt: skip
    for step in steps:
        done = subprocess.run(step, cwd=work, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"startup.py: preparing failed: {' '.join(step)}\n{done.stderr[-2000:]}")
    from la_seg.runs import find_checkpoint

    return {"data": data, "one": one, "ckpt": find_checkpoint(work / "runs" / "demo", "last")}


def command_lines(args: argparse.Namespace, work: Path, prepared: dict[str, Path], index: int) -> dict:
    """Each timed command, writing into fresh folders of run `index`."""
    la_seg = [args.python, "-m", "la_seg.cli"]
    masks = work / f"masks_{index}"
    return {
        "import torch (floor)": [args.python, "-c", "import torch; print(torch.__version__)"],
        "--help": [*la_seg, "--help"],
        "option typo (synth --outt)": [*la_seg, "synth", "--outt", "x"],
        "option typo (fit --data.rooot)": [*la_seg, "fit", "--config", "demo.yaml", "--data.rooot", "x"],
        "synth 2 cases 112x96x24": [*la_seg, "synth", "--out", str(work / f"synth_{index}"), "--cases", "2",
                                    "--shape", "[112, 96, 24]"],
        "predict 1 volume 112x96x24": [*la_seg, "predict", "--config", "demo.yaml", "--ckpt_path",
                                       str(prepared["ckpt"]), "--data.predict_root", str(prepared["one"]),
                                       "--writer.output_dir", str(masks), "--data.num_workers", "0"],
        "evaluate 1 case": [*la_seg, "evaluate", "--pred", str(masks), "--ref", str(prepared["one"]),
                            "--out", str(work / f"evaluate_{index}")],
        "export-nnunet 8 cases": [*la_seg, "export-nnunet", "--data.root", str(prepared["data"]),
                                  "--out", str(work / f"nnunet_{index}")],
    }  # fmt: skip


def load_now() -> dict:
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    return {"load_average": list(os.getloadavg()), "uptime": uptime}


def measure_commands(args: argparse.Namespace) -> dict:
    """`--commands`: every command's median time to its first line and to its exit, over `repeats` runs."""
    from la_seg.runtime import cpu_model

    checkout = (args.pythonpath or [REPO])[0].resolve()  # one checkout per call: before / after in turn
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    before = load_now()
    runs: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="la-seg-startup-") as tmp:
        work = Path(tmp)
        prepared = prepare_commands(args, work, env)
        for repeat in range(args.repeats):
            for name, command in command_lines(args, work, prepared, repeat).items():
                result = timed(command, work, env)
                runs.setdefault(name, []).append(result)
                took = f"first line {result['first_line_s']:.2f} s, exit {result['exit_s']:.2f} s"
                print(f"[startup] {name}: {took} (status {result['status']})", file=sys.stderr, flush=True)
    commands = {
        name: {
            "first_line_s": statistics.median(r["first_line_s"] for r in measured),
            "exit_s": statistics.median(r["exit_s"] for r in measured),
            "statuses": sorted({r["status"] for r in measured}),
            "first_line": measured[-1]["first_line"],
            "output_tail": measured[-1]["output_tail"],
            "runs": [{k: r[k] for k in ("first_line_s", "exit_s")} for r in measured],
        }
        for name, measured in runs.items()
    }
    return {
        "mode": "commands",
        "repeats": args.repeats,
        "cpu_model": cpu_model(),
        "cpu_cores_available": len(os.sched_getaffinity(0)),
        "load_before": before,
        "load_after": load_now(),
        **describe_checkout(checkout),
        "commands": commands,
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]
    if args.commands:
        return publish(measure_commands(args), args.json)
    from random_weights import ensure_random_weights

    from la_seg.runtime import describe_cpu

    checkouts = [path.resolve() for path in (args.pythonpath or [REPO])]
    weights = args.weights or default_weights(args)
    weights = ensure_random_weights(args.backbone, weights, args.backbone_kwargs)
    runs: dict[Path, list[dict]] = {checkout: [] for checkout in checkouts}
    with tempfile.TemporaryDirectory(prefix="la-seg-startup-") as tmp:
        workdir = Path(tmp)
        (workdir / "la_seg_startup_probe.py").write_text(PROBE)
        volume = write_volume(workdir / "case_001.nii.gz", tuple(args.shape), args.slices)
        for repeat in range(args.repeats):
            for i, checkout in enumerate(checkouts):
                runs[checkout].append(run_once(args, checkout, weights, volume, workdir, repeat * 100 + i))
    results = []
    for checkout, measured in runs.items():
        overhead = statistics.median(r["startup_overhead_s"] for r in measured)
        results.append({**describe_checkout(checkout), "startup_overhead_s": overhead, "runs": measured})
        results[-1]["target_met"] = overhead <= TARGET_S
    report = {
        "backbone": args.backbone,
        "backbone_kwargs": args.backbone_kwargs,
        "weights": str(weights),
        "weights_gb": weights.stat().st_size / 1e9,
        "volume": [*args.shape, args.slices],
        "target_s": TARGET_S,
        **describe_cpu(),
        "load_average": list(os.getloadavg()),
        "checkouts": results,
    }
    return publish(report, args.json)


def publish(report: dict, path: Path | None) -> dict:
    """Print `report` as JSON and, with --json, write it there (atomically)."""
    from la_seg.atomic import atomic_write_text

    text = json.dumps(report, indent=2)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, text + "\n")
    print(text)
    return report


if __name__ == "__main__":
    main()
