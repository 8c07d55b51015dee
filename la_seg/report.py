"""The one owner of the test report: file names, the CSV (a plain table, one row per case), the JSON (header
saying what was scored and how, cases, summary) and the printed table; `test` and `evaluate` use it."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from la_seg.atomic import remove_stale_temp_files, write_csv, write_json
from la_seg.plausibility import REVIEW_COLUMNS, review_line

REPORT_COLUMNS = ("case_id", "dice", "iou", "hd95_mm", "assd_mm", "volume_pred_ml", "volume_ref_ml")
METRIC_KEYS = REPORT_COLUMNS[1:]
# The model's own estimate of a case's Dice (la_seg.plausibility.expected_dice); none when only masks are
# scored (`la-seg evaluate`).
EXPECTED_DICE = "expected_dice"
SUFFIXES = (".csv", ".json")
# Maps `la-seg predict` writes beside `<case_id>.nii.gz` masks: `la-seg evaluate` and `analyse` skip them.
COMPANION_SUFFIXES = ("_prob", "_uncertainty")
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def report_stem(out_dir: Path, scored: str) -> str:
    """`test_<scored>` (e.g. test_heldout, test_other_centre), or `test_<scored>-2`, -3, ... when a report of
    that name is in `out_dir` already: every `la-seg test` keeps its own report, none is overwritten."""
    base = "test_" + (_UNSAFE.sub("_", scored).strip("._") or "data")
    stem, n = base, 1
    while any((Path(out_dir) / f"{stem}{suffix}").exists() for suffix in SUFFIXES):
        n += 1
        stem = f"{base}-{n}"
    return stem


def write_report(
    rows: list[dict],
    summary: dict,
    out_dir: Path,
    stem: str,
    header: dict[str, Any],
    agreements: dict[str, dict] | None = None,
) -> list[Path]:
    """`<stem>.csv` (a plain table: one row per case, read as is by pandas, spreadsheets and csv.DictReader)
    and `<stem>.json` (header, cases, summary with mean, sd and n), both written atomically; returns them.
    Rows carry REVIEW_COLUMNS (la_seg.plausibility). `agreements` (case id -> the voters' Agreement) go into
    the JSON cases that have one."""
    out_dir = Path(out_dir)
    remove_stale_temp_files(out_dir)
    csv_path, json_path = (out_dir / f"{stem}{suffix}" for suffix in SUFFIXES)
    columns = [*REPORT_COLUMNS, "failed", EXPECTED_DICE, *REVIEW_COLUMNS]
    write_csv(csv_path, columns, [_csv_row(row) for row in rows])
    keys = (*REPORT_COLUMNS, "failed", EXPECTED_DICE, *REVIEW_COLUMNS, "slice_dice", "slice_iou")
    cases = [{k: row.get(k) for k in keys} for row in rows]
    for case in cases:
        if case["case_id"] in (agreements or {}):
            case["agreement"] = agreements[case["case_id"]]
    write_json(json_path, {"header": header, "cases": cases, "summary": summary})
    return [csv_path, json_path]


def format_table(rows: list[dict], summary: dict, header: dict[str, Any]) -> str:
    """The per-case table printed after `la-seg test`, a line per case flagged for review; ends with the
    checkpoint and the n/failed/review counts."""
    width = max([len("case"), *(len(str(r["case_id"])) for r in rows)]) + 2
    titles, widths = ("Dice", "IoU", "HD95mm", "ASSDmm", "V_pred mL", "V_ref mL"), (8, 8, 9, 9, 11, 10)

    def line(name: str, cells) -> str:
        return f"{name:<{width}}" + "".join(f"{c:>{w}}" for c, w in zip(cells, widths, strict=True))

    title = line("case", titles)
    lines = [title, "-" * len(title)]
    lines += [line(str(row["case_id"]), [_fmt(row[k]) for k in METRIC_KEYS]) for row in rows]
    lines.append("-" * len(title))
    lines += [line(stat, [_fmt(summary[k][stat]) for k in METRIC_KEYS]) for stat in ("mean", "sd")]
    lines.append(line("n", [summary[k]["n"] for k in METRIC_KEYS]))
    rule = header.get("empty_distance", "nan")
    failed_rule = "left out of their means" if rule == "nan" else "the image diagonal"
    cases = summary["cases"]
    lines += [
        f"slice-wise Dice {_fmt(summary['slice_dice']['mean'])}, IoU {_fmt(summary['slice_iou']['mean'])} "
        f"over {summary['slice_dice']['n']} slices",
        f"failed (empty prediction or reference): {cases['failed']}; their HD95/ASSD: {failed_rule}",
        f"checkpoint: {header.get('checkpoint')}",
    ]
    flagged = [row for row in rows if row["review"]]
    lines += [review_line(row["case_id"], row["source"], row["review_reason"]) for row in flagged]
    lines.append(f"n = {cases['n']} cases, failed = {cases['failed']}, review = {len(flagged)}")
    return "\n".join(lines)


def _csv_row(row: dict) -> list:
    """One case's CSV cells; an undefined metric (a failed case's HD95/ASSD) is an empty cell (README)."""
    metrics = [_fmt(row[k], undefined="") for k in METRIC_KEYS]
    expected = _fmt(row.get(EXPECTED_DICE), undefined="")
    return [row["case_id"], *metrics, int(row["failed"]), expected, *_review(row)]


def _review(row: dict) -> tuple[int, str]:
    """The review flag as 0/1, as `failed` is written, and its reason."""
    return int(row["review"]), row["review_reason"]


def _fmt(value: float | None, undefined: str = "nan") -> str:
    """4 decimals, or `undefined` for NaN / None (the CSV's empty cell: spreadsheets and pandas read it as
    missing, not as the text "nan")."""
    return undefined if value is None or math.isnan(value) else f"{value:.4f}"
