#!/usr/bin/env python
"""Does a wider field of view change the mask? The same hearts with more background around them.

Until b4bac3f a slice wider than the model input (img_size x target_spacing mm) was cropped, centred, and the
LA outside the crop got probability 0 without a word; since then such slices are covered by overlapping
windows. This takes held-out cases (default: benchmarks/accuracy.py's training-family folder) and writes two
copies of each with PAD_MM more field of view on the high-X and high-Y sides (the affine unchanged, so every
voxel keeps its world position and the heart moves off the centre): the pad holds the image's 1st-percentile
grey ("dark"), or voxels drawn from the image ("drawn", which keeps its intensity percentiles). Each checkout
given by --pythonpath `la-seg predict`s the cases as stored and both copies with --ckpt; per geometry (the
case id's prefix) Dice and signed LA-volume error against the reference (padded with background).

    python benchmarks/field_of_view.py --ckpt RUN/checkpoints/best.ckpt \\
        --cases /tmp/la-seg-accuracy/test-varied --pythonpath /tmp/la-seg-base --pythonpath . \\
        --json benchmarks/results/field_of_view.json

Copies (written once, reused) and masks stay in --work-dir. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from startup import describe_checkout  # noqa: E402  (benchmarks/ is no package)

from la_seg.atomic import write_json  # noqa: E402
from la_seg.metrics import overlap_3d  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
PAD_MM = 60.0
IMAGE, LABEL = "enhanced.nii.gz", "atriumSegImgMO.nii.gz"  # a LAScarQS task-2 case folder's files
COPIES = ("dark", "drawn")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", type=Path, required=True, help="the checkpoint that predicts")
    p.add_argument(
        "--cases", type=Path, default=Path("/tmp/la-seg-accuracy/test-varied"), help="case folders"
    )
    p.add_argument("--pythonpath", type=Path, action="append", default=None, help="checkout(s) to compare")
    p.add_argument(
        "--pad-mm", type=float, default=PAD_MM, help="field of view added on the high X and Y sides"
    )
    p.add_argument("--work-dir", type=Path, default=Path("/tmp/la-seg-field-of-view"))
    p.add_argument("--json", type=Path, default=RESULTS / "field_of_view.json", help="result file")
    args = p.parse_args(argv)
    if not args.ckpt.is_file() or not args.cases.is_dir() or not args.pad_mm > 0:
        p.error("--ckpt must be a file, --cases a folder of case folders, --pad-mm > 0")
    for name in ("ckpt", "cases", "work_dir"):  # the predict runs start in --work-dir
        setattr(args, name, getattr(args, name).resolve())
    return args


def progress(message: str) -> None:
    print(f"[field_of_view {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def pad_case(case: Path, out: Path, pad_mm: float, fill: str, rng: np.random.Generator) -> None:
    """`case`'s image and label with `pad_mm` more on the high X and Y sides (the same affine): the label's
    pad is background, the image's `fill` ("dark": its 1st-percentile grey; "drawn": voxels drawn from it)."""
    out.mkdir(parents=True, exist_ok=True)
    for name in (IMAGE, LABEL):
        image = nib.load(case / name)
        data = np.asarray(image.dataobj)
        zooms = image.header.get_zooms()
        pads = [round(pad_mm / float(zoom)) for zoom in zooms[:2]]
        big = np.pad(data, ((0, pads[0]), (0, pads[1]), *[(0, 0)] * (data.ndim - 2)))
        if name == IMAGE:
            outside = np.ones(big.shape, bool)
            outside[: data.shape[0], : data.shape[1]] = False
            if fill == "dark":
                big[outside] = np.percentile(data, 1)
            else:
                big[outside] = rng.choice(data.ravel(), int(outside.sum()))
        padded = nib.Nifti1Image(big.astype(image.get_data_dtype()), image.affine, image.header)
        nib.save(padded, out / f".{name}")
        os.replace(out / f".{name}", out / name)


def copies(args: argparse.Namespace) -> dict[str, Path]:
    """The case folders to predict: as stored, and each padded copy (written once)."""
    folders = {"as_stored": args.cases}
    for fill in COPIES:
        folder = args.work_dir / f"{args.cases.name}_{fill}_{args.pad_mm:g}mm"
        rng = np.random.default_rng(0)
        for case in sorted(p for p in args.cases.iterdir() if (p / IMAGE).is_file()):
            if not (folder / case.name / LABEL).is_file():
                pad_case(case, folder / case.name, args.pad_mm, fill, rng)
        folders[fill] = folder
    return folders


def predict(checkout: Path, ckpt: Path, cases: Path, out: Path) -> float:
    """`la-seg predict` of `cases` by the code of `checkout` into `out` (this script's, emptied first): its
    seconds."""
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "la_seg.cli", "predict", "--ckpt_path", str(ckpt)]
    command += ["--data.predict_root", str(cases), "--writer.output_dir", str(out)]
    command += ["--trainer.enable_progress_bar", "false"]
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    # run outside any checkout: `python -m` puts the working folder first on sys.path, before PYTHONPATH
    where = [sys.executable, "-c", "import la_seg; print(la_seg.__file__)"]
    imported = subprocess.run(where, cwd=out.parent, env=env, capture_output=True, text=True).stdout.strip()
    if not Path(imported).is_relative_to(checkout):
        raise SystemExit(f"field_of_view.py: --pythonpath {checkout} imports la_seg from {imported}")
    start = time.perf_counter()
    done = subprocess.run(command, cwd=out.parent, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"field_of_view.py: predict by {checkout} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def score(cases: Path, masks: Path) -> dict:
    """Per geometry (the case id before '_'): mean and min Dice, mean and worst signed LA-volume error %."""
    by_geometry: dict[str, list[tuple[float, float]]] = {}
    for case in sorted(p for p in cases.iterdir() if (p / LABEL).is_file()):
        reference = torch.from_numpy(np.asarray(nib.load(case / LABEL).dataobj) > 0)
        mask = torch.from_numpy(np.asarray(nib.load(masks / f"{case.name}.nii.gz").dataobj) > 0)
        dice, _ = overlap_3d(mask, reference)
        error = 100 * (int(mask.sum()) - int(reference.sum())) / int(reference.sum())
        by_geometry.setdefault(case.name.split("_")[0], []).append((dice, float(error)))
    return {
        geometry: {
            "cases": len(values),
            "dice_mean": round(float(np.mean([d for d, _ in values])), 4),
            "dice_min": round(min(d for d, _ in values), 4),
            "volume_error_pct_mean": round(float(np.mean([e for _, e in values])), 1),
            "volume_error_pct_worst": round(max((e for _, e in values), key=abs), 1),
        }
        for geometry, values in by_geometry.items()
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    folders = copies(args)
    results = []
    for index, checkout in enumerate(path.resolve() for path in args.pythonpath or [REPO]):
        for copy, cases in folders.items():
            out = args.work_dir / f"masks_{index}_{copy}"
            progress(f"{checkout}: la-seg predict {cases}")
            seconds = round(predict(checkout, args.ckpt, cases, out), 1)
            scores = score(cases, out)
            results.append(
                {**describe_checkout(checkout), "copy": copy, "seconds": seconds, "scores": scores}
            )
            figures = ", ".join(f"{g} {s['dice_mean']:.3f}" for g, s in scores.items())
            progress(f"{copy}: Dice {figures}")
    record = {
        "question": "do the same hearts with a wider field of view (the LA off centre) get the same masks?",
        "checkpoint": str(args.ckpt),
        "cases": str(args.cases),
        "pad_mm": args.pad_mm,
        "results": results,
    }
    write_json(args.json, record)
    return record


if __name__ == "__main__":
    main()
