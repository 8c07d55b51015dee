"""Host memory per DDP process of a 2-process `la-seg fit` (gloo on CPU) on synthetic data (issue 16.6).

Each process records the decoded training volumes its SliceDataset keeps (data.cache: memory), its RSS once
the training set is built (Linux) and its peak RSS (ru_maxrss). Run it on two versions of la-seg to compare,
e.g. "before" with PYTHONPATH pointing at an older checkout:

    python benchmarks/ddp_host_memory.py --label now --shape 512 512 64

The JSON file holds one entry per label; an existing file is extended.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

RANK_SCRIPT = """
import atexit, json, os, resource
from la_seg.cli import main
from la_seg.data.datasets import SliceDataset

rank = os.environ.get("LOCAL_RANK", "0")
record = {"rank": int(rank)}
init = SliceDataset.__init__

def recording_init(self, cases, *args, **kwargs):
    init(self, cases, *args, **kwargs)
    kept = self.cache._memory.values()
    record["train_cases"] = len(self.cases)
    record["train_slices"] = len(self)
    record["cache_mb"] = sum(e.image.nbytes + e.label.nbytes for e in kept) / 2**20
    with open("/proc/self/statm") as statm:
        record["rss_after_train_set_mb"] = int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

def write():
    record["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with open(f"rank_{rank}.json", "w") as out:
        json.dump(record, out)

SliceDataset.__init__ = recording_init
atexit.register(write)
main()
"""

TINY = [
    "--config", "demo.yaml", "--data.img_size", "28", "--data.num_workers", "0",
    "--model.net.backbone_kwargs", "{depth: 2, embed_dim: 24, num_heads: 2}",
    "--model.net.decoder_channels", "[8, 8, 8, 8]", "--trainer.enable_progress_bar", "false",
    "--trainer.enable_model_summary", "false", "--trainer.max_epochs", "1",
    "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
]  # fmt: skip
DDP = ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", required=True)
    parser.add_argument("--out", default="benchmarks/results/ddp_host_memory.json")
    parser.add_argument("--cases", type=int, default=10)
    parser.add_argument("--shape", type=int, nargs=3, default=[320, 320, 40])
    args = parser.parse_args()
    from la_seg.data.synthetic import write_dataset

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        write_dataset(
            work / "data", cases=args.cases, seed=0, shape=tuple(args.shape), spacing=(1.0, 1.0, 2.5)
        )
        (work / "rank.py").write_text(RANK_SCRIPT)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        argv = [sys.executable, "rank.py", "fit", *TINY, *DDP, "--data.root", "data"]
        run = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True, timeout=1200)
        if run.returncode:
            sys.exit(run.stderr[-3000:])
        ranks = [json.loads((work / f"rank_{r}.json").read_text()) for r in (0, 1)]
    result = {"cases": args.cases, "shape": args.shape, "processes": 2, "ranks": ranks}
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {}
    results[args.label] = result
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({args.label: result}, indent=2))


if __name__ == "__main__":
    main()
