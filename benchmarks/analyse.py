#!/usr/bin/env python
"""Time per case of `la-seg analyse` on 640x640x44 volumes (0.625 x 0.625 x 2.5 mm), beside `la-seg predict`'s
for the same volumes with a small untrained model (issue 32).

    python benchmarks/analyse.py --json benchmarks/results/analyse_cpu.json

Synthetic cases with wall scar (`synth --scar`) are written once; analyse reads them with their true labels
(an untrained model's mask is a blob, not an LA: its mesh would not be an LA's size). Each command is one
fresh `python -m la_seg.cli` process, as a user runs it; its wall time over the cases is the time per case,
startup included. The JSON records the machine (CPU, cores, load average) and the measured fractions.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from la_seg.runtime import describe_cpu  # noqa: E402

SHAPE, SPACING = (640, 640, 44), (0.625, 0.625, 2.5)
PREDICT = ["--config", "demo.yaml", "--untrained", "true", "--data.num_workers", "0",
           "--trainer.enable_progress_bar", "false"]  # fmt: skip


def timed(argv: list[str]) -> float:
    """Wall seconds of `la-seg ARGV` in a fresh process (this checkout first on the path)."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    start = time.perf_counter()
    command = [sys.executable, "-m", "la_seg.cli", *argv]
    subprocess.run(command, check=True, env={**os.environ, "PYTHONPATH": path}, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", type=int, default=2)
    p.add_argument("--scar", type=float, default=0.2, help="synth --scar")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        synth = timed(["synth", "--out", str(work / "data"), "--cases", str(args.cases),
                       "--scar", str(args.scar), "--shape", json.dumps(SHAPE),
                       "--spacing", json.dumps(SPACING)])  # fmt: skip
        predict = timed(["predict", *PREDICT, "--data.predict_root", str(work / "data"),
                         "--writer.output_dir", str(work / "masks")])  # fmt: skip
        analyse = timed(["analyse", "--images", str(work / "data"), "--out", str(work / "analysis")])
        cases = json.loads((work / "analysis" / "analysis.json").read_text())["cases"]
    result = {
        "shape": SHAPE,
        "spacing_mm": SPACING,
        "cases": args.cases,
        "synth_s": synth,
        "predict_s_per_case": predict / args.cases,
        "analyse_s_per_case": analyse / args.cases,
        "analysed": [
            {k: row[k] for k in ("case_id", "vertices", "fibrosis_percent", "dense_scar_percent")}
            for row in cases
        ],
        "predict_options": PREDICT,
        **describe_cpu(),
        "load_average": list(os.getloadavg()),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
