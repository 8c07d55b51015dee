#!/usr/bin/env python
"""Which of the held-out setting's differences costs a model its Dice (issue 31)?

benchmarks/accuracy.py scores a model on the held-out setting (`synthetic.HELDOUT`) as a whole. This takes one
checkpoint and the same held-out hearts (seed 1, the same cases) again, each time with one group of factors
drawn from the training family's ranges (`synthetic.VARIED`) instead, or four veins, the rest unchanged, and
`la-seg test`s each variant: the Dice a group gives back is what its extrapolation costs.

    python benchmarks/heldout_factors.py --ckpt RUN/checkpoints/best.ckpt --work-dir /tmp/la-seg-accuracy \\
        --json benchmarks/results/heldout_factors.json

--work-dir is benchmarks/accuracy.py's (its training data and split name the checkpoint's data); the variants'
phantoms are written under it and reused. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import accuracy  # noqa: E402  (benchmarks/ is no package)

from la_seg.atomic import write_json  # noqa: E402
from la_seg.data.synthetic import HELDOUT, VARIED  # noqa: E402


def from_training(*fields: str) -> dict:
    """HELDOUT's `fields` as the training family draws them (VARIED's ranges)."""
    return {field: getattr(VARIED, field) for field in fields}


# What each variant of the held-out setting changes. Four veins rather than VARIED's choice of arrangements:
# drawing one would shift every later draw of the case. Even so, the veins' own draws come before the LA's
# warp field, the neighbours and the noise: the veins variant keeps each heart's physics, pose and size, but
# redraws those.
GROUPS = {
    "as held out": {},
    "veins (four)": {"veins": ("four",)},
    "neighbours (pull, walls)": from_training("pull_mm", "pool_wall_mm", "septum_mm"),
    "warp": from_training("warp_mm"),
    "noise": from_training("noise"),
    "contrast (blood, wall, fat, pools)": from_training(
        "blood_to_myocardium", "enhanced", "tissue", "fat", "fat_mm", "la_wall_mm", "pools"
    ),
    "all (the training family)": from_training(*(f.name for f in dataclasses.fields(HELDOUT))),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", type=Path, required=True, help="the checkpoint to test")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/la-seg-accuracy"))
    parser.add_argument("--cases", type=int, default=6, help="held-out hearts per geometry")
    parser.add_argument("--config", default="demo.yaml", help="the checkpoint's recipe (accuracy.py's)")
    parser.add_argument(
        "--heart-scale",
        type=accuracy.positive_heart_scale,
        default=accuracy.ADULT_HEART_SCALE,
        help="the heart size the checkpoint's accuracy.py run drew (its --heart-scale; default 1.5)",
    )
    parser.add_argument("--json", type=Path, default=accuracy.RESULTS / "heldout_factors.json")
    return parser.parse_args(argv)


def variant_folder(work: Path, index: int) -> Path:
    return work / f"test-heldout-factors-{index}"


def run(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    work = args.work_dir
    split = work / "split.json"
    if not split.is_file():
        raise SystemExit(f"heldout_factors.py: no {split}: --work-dir is the accuracy.py run's work folder")
    test_args = argparse.Namespace(options=[], config=args.config, name=f"factors_{args.ckpt.stem}")
    training = accuracy.data_folder(accuracy.TRAINING_STYLE)
    for prefix in accuracy.GEOMETRIES:  # variants of another heart size than the run's would test nothing
        labels = sorted((work / training).glob(f"{prefix}_*/atriumSegImgMO.nii.gz"))
        accuracy.check_heart_scale(labels, prefix, args.heart_scale)
    data = ["--data.root", str(work / training), "--data.split_file", str(split)]
    variants = {}
    for index, (name, changes) in enumerate(GROUPS.items()):
        family = dataclasses.replace(HELDOUT, **changes)
        folder = variant_folder(work, index)
        for prefix in accuracy.GEOMETRIES:
            accuracy.write_phantoms(
                folder, prefix, range(1, args.cases + 1), accuracy.HELDOUT_SEED, family, args.heart_scale
            )
        voters = accuracy.Voters.of([args.ckpt], work, test_args.name)
        report = accuracy.test(work, test_args, voters, [*data, "--data.test_root", str(folder)], [])
        scores = accuracy.score(report)
        variants[name] = {
            "changed": {field: list(value) for field, value in changes.items()},
            "dice_mean": {g: s["dice_mean"] for g, s in scores["per_geometry"].items()},
            "dice_mean_overall": scores["overall"]["dice_mean"],
            "within_5pct_fraction": scores["done_when"]["fraction_within_5pct"],
            "beyond_15pct": scores["done_when"]["beyond_15pct"],
            "volume_error_pct_mean": scores["overall"]["volume_error_pct_mean"],
        }
        dice = " / ".join(f"{d:.3f}" for d in variants[name]["dice_mean"].values())
        accuracy.progress(f"{name}: Dice A / B / C {dice}")
    return {
        "question": "how much Dice does each group of the held-out setting's factors cost, drawn beyond the "
        "training family's ranges (issue 31)?",
        "checkpoint": str(args.ckpt),
        "cases_per_geometry": args.cases,
        "heart_scale": args.heart_scale,
        "heldout_seed": accuracy.HELDOUT_SEED,
        "variants": variants,
        "seconds": round(time.perf_counter() - started, 1),
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    result = run(args)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.json, result)
    accuracy.progress(f"written to {args.json}")


if __name__ == "__main__":
    main()
