#!/usr/bin/env python
"""The verdict of gpu_check.sh's throughput step: throughput.py's figures against its targets.

    python benchmarks/gpu_check_targets.py throughput.json

Prints one summary line (device, rates, peak memory, MFU, the targets met and the targets missed, each with
its value and bound) and exits 1 when an applicable target is missed, 0 otherwise (also when none applies,
e.g. a CPU rehearsal with a tiny model: the line says so).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def verdict(report: dict) -> tuple[str, list[str]]:
    """The summary line and the applicable targets missed."""
    applicable = {name: t for name, t in report["targets"].items() if t["applicable"]}

    def shown(name: str, target: dict) -> str:
        bound = f">= {target['min']}" if "min" in target else f"< {target['max']}"
        return f"{name} {target['value']:.3g} ({bound})"

    met = [shown(n, t) for n, t in applicable.items() if t["met"]]
    missed = [shown(n, t) for n, t in applicable.items() if not t["met"]]
    r = report
    line = (
        f"throughput: {r['device']} {r['backbone']} S={r['img_size']} B={r['batch_size']} {r['precision']} | "
        f"backbone {r['backbone_slices_per_s']:.1f} sl/s, train {r['train_slices_per_s']:.1f} "
        f"({r['train_ratio']:.2f}x), predict {r['predict_slices_per_s']:.1f} ({r['predict_ratio']:.2f}x) | "
        f"peak {r['peak_memory_gb']:.1f} GB | MFU {r['mfu']} | targets met: {met or 'none'}; "
        f"missed: {missed or 'none'}" + ("" if applicable else " (no target applies to this setting)")
    )
    return line, missed


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    line, missed = verdict(json.loads(Path(args[0]).read_text()))
    print(line)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
