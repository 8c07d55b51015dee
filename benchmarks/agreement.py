"""Does member agreement rank cases the way their true Dice does? (issue 12.4)

Synthesises phantoms, trains k folds of the tiny demo model on CPU, tests the k-fold ensemble (`la-seg test
--ckpt_path <run folder>`) on the fixed test part and on extra held-out phantoms, and reports the Spearman
correlation between each case's mean pairwise Dice of the members (agreement) and its Dice against the
reference, with n, overall and per set. A useful review flag needs a clearly positive rho.

    python benchmarks/agreement.py           # 24 + 12 cases, 96x96x24, 3 folds x 4 epochs: ~6 min on 2 cores
    python benchmarks/agreement.py --quick   # a smoke run (~1 min): checks the pipeline, not the claim

Writes benchmarks/results/agreement.json (or --json; --quick: agreement_quick.json).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

from scipy.stats import spearmanr

from la_seg.atomic import write_json
from la_seg.cli import main as la_seg
from la_seg.data.synthetic import write_dataset

RESULTS = Path(__file__).parent / "results"
# The demo config at 56 px with a small random ViT: trains in seconds per epoch on a CPU core.
MODEL = [
    "--config", "demo.yaml",
    "--data.img_size", "56",
    "--data.num_workers", "0",
    "--data.batch_size", "16",
    "--model.net.backbone_kwargs", "{depth: 4, embed_dim: 48, num_heads: 3}",
    "--model.net.decoder_channels", "[32, 16, 16, 8]",
    "--trainer.enable_progress_bar", "false",
    "--trainer.enable_model_summary", "false",
]  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--cases", type=int, default=24, help="phantoms to train and test on (fixed test part)"
    )
    parser.add_argument("--heldout", type=int, default=12, help="extra held-out phantoms (another seed)")
    parser.add_argument("--shape", type=int, nargs=3, default=(96, 96, 24), help="phantom shape X Y Z")
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--limit-train-batches", type=int, default=None, help="training batches per epoch")
    parser.add_argument("--work-dir", type=Path, default=None, help="keep data and runs here (default: temp)")
    parser.add_argument("--json", type=Path, default=None, help="result file")
    parser.add_argument("--quick", action="store_true", help="9 + 3 small cases, 1 short epoch: a smoke run")
    args = parser.parse_args(argv)
    if args.quick:
        args.cases, args.heldout, args.shape, args.epochs = 9, 3, (64, 64, 12), 1
        args.limit_train_batches = args.limit_train_batches or 2
    args.json = args.json or RESULTS / ("agreement_quick.json" if args.quick else "agreement.json")
    return args


def train_folds(work: Path, args: argparse.Namespace) -> Path:
    """One `la-seg fit` per fold; returns the run folder holding version_0 .. version_{k-1}."""
    logger = [
        "--trainer.logger.init_args.save_dir",
        str(work / "runs"),
        "--trainer.logger.init_args.name",
        "folds",
    ]
    limit = (
        ["--trainer.limit_train_batches", str(args.limit_train_batches)] if args.limit_train_batches else []
    )
    data = ["--data.root", str(work / "data"), "--data.folds", str(args.folds)]
    for fold in range(args.folds):
        la_seg(["fit", *MODEL, *logger, *limit, *data, "--data.fold", str(fold),
                "--trainer.max_epochs", str(args.epochs)])  # fmt: skip
    return work / "runs" / "folds"


def test_ensemble(
    work: Path, runs: Path, args: argparse.Namespace, name: str, test_root: Path | None
) -> list:
    """`la-seg test` of the k-fold ensemble; (case, agreement, Dice) per case of its report."""
    logger = [
        "--trainer.logger.init_args.save_dir",
        str(work / "runs"),
        "--trainer.logger.init_args.name",
        name,
    ]
    heldout = ["--data.test_root", str(test_root)] if test_root else []
    data = ["--data.root", str(work / "data"), "--data.folds", str(args.folds)]
    la_seg(["test", *MODEL, *logger, *heldout, *data, "--ckpt_path", str(runs)])
    report = json.loads((work / "runs" / name / "ensemble" / "test_heldout.json").read_text())
    members = report["header"]["ensemble"]["members"]
    if len(members) != args.folds:
        raise RuntimeError(f"expected a {args.folds}-member ensemble, the report names {members}")
    return [
        {
            "set": name,
            "case_id": c["case_id"],
            "agreement": c["agreement"]["mean_pairwise_dice"],
            "dice": c["dice"],
        }
        for c in report["cases"]
    ]


def correlation(cases: list[dict]) -> dict:
    """Spearman's rho of agreement against Dice, with n and the two-sided p-value (nan below 3 cases or
    when either side is constant)."""
    n = len(cases)
    if n < 3:
        return {"n": n, "spearman_rho": math.nan, "p_value": math.nan}
    rho, p_value = spearmanr([c["agreement"] for c in cases], [c["dice"] for c in cases])
    return {"n": n, "spearman_rho": float(rho), "p_value": float(p_value)}


def run(args: argparse.Namespace, work: Path) -> dict:
    started = time.perf_counter()
    write_dataset(work / "data", args.cases, seed=0, shape=tuple(args.shape))
    write_dataset(work / "heldout", args.heldout, seed=1, shape=tuple(args.shape))
    runs = train_folds(work, args)
    cases = test_ensemble(work, runs, args, "test_part", None)
    cases += test_ensemble(work, runs, args, "heldout", work / "heldout")
    return {
        "question": "does the k-fold members' mean pairwise Dice rank cases like their true Dice?",
        "overall": correlation(cases),
        "per_set": {
            name: correlation([c for c in cases if c["set"] == name]) for name in ("test_part", "heldout")
        },
        "settings": {
            "cases": args.cases,
            "heldout": args.heldout,
            "shape": list(args.shape),
            "folds": args.folds,
            "epochs": args.epochs,
            "limit_train_batches": args.limit_train_batches,
            "model": MODEL,
            "threads": os.environ.get("OMP_NUM_THREADS"),
        },
        "seconds": round(time.perf_counter() - started, 1),
        "cases": cases,
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.work_dir is not None:
        args.work_dir.mkdir(parents=True, exist_ok=True)
        result = run(args, args.work_dir)
    else:
        with tempfile.TemporaryDirectory(prefix="la-seg-agreement-") as work:
            result = run(args, Path(work))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.json, result)
    overall = result["overall"]
    print(
        f"Spearman rho (agreement vs Dice) = {overall['spearman_rho']:.3f}, p = {overall['p_value']:.3g}, "
        f"n = {overall['n']} cases; written to {args.json}",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
