"""The one owner of QC pictures and the QC page: what a person looks at to decide which masks to check.

A picture shows three slices through the LA (the acquired slice plane and two cuts across the slices), each
named, under a line naming the case and its LA volume; a case flagged for review (la_seg.plausibility) gets
a red `REVIEW: reason` banner. The page (`predict` with `--writer.qc_page`, `test` with
`--metrics.qc_page`) is one HTML file with a row per case, the cases that most need review first; it links
its pictures by relative file name and loads nothing else, so it opens offline and moves with its folder.
"""

from __future__ import annotations

import html
import io
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import quote

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from la_seg.atomic import atomic_path, atomic_write_text

TILE = 160  # pixels per view: three views make a 480 px wide picture, small enough for a page of many cases
LINE = 18  # pixels per text line
REVIEW_RED = (200, 0, 0)


def overlay(
    grey: torch.Tensor, ref: torch.Tensor | None = None, pred: torch.Tensor | None = None, size: int = TILE
) -> torch.Tensor:
    """(3, size, size) float picture of a 2D slice (values in [0, 1]) with the reference in green and the
    prediction in red: the one overlay renderer of TensorBoard pictures and the writer's PNGs."""
    planes = [grey.float()] + [(m if m is not None else torch.zeros_like(grey)).float() for m in (ref, pred)]
    planes = F.interpolate(torch.stack(planes)[None].cpu(), size=(size, size), mode="nearest")[0]
    grey, ref_plane, pred_plane = planes.clamp(0, 1)
    return torch.stack([grey * 0.6 + 0.4 * pred_plane, grey * 0.6 + 0.4 * ref_plane, grey * 0.6]).clamp(0, 1)


def qc_picture(
    image: torch.Tensor,
    mask: torch.Tensor,
    case_id: str,
    volume_ml: float,
    review_reason: str = "",
    reference: torch.Tensor | None = None,
) -> Image.Image:
    """Slices through the centre of the mask (or of the reference where the mask is empty), slices last,
    the mask in red and a reference in green (overlap yellow), labelled for a reader."""
    shown = mask if mask.any() or reference is None else reference
    centre = shown.nonzero().float().mean(0).round().long() if shown.any() else torch.tensor(mask.shape) // 2
    i, j, k = (int(c) for c in centre)
    low, high = image.min(), image.max()
    grey = (image - low) / (high - low) if high > low else torch.zeros_like(image)
    ref = reference if reference is not None else torch.zeros_like(mask)
    cuts = [
        (f"slice plane, slice {k + 1}/{mask.shape[2]}", (slice(None), slice(None), k)),
        (f"across slices, column {j + 1}", (slice(None), j, slice(None))),
        (f"across slices, row {i + 1}", (i, slice(None), slice(None))),
    ]
    tiles = torch.cat([overlay(grey[c], ref=ref[c], pred=mask[c], size=TILE) for _, c in cuts], dim=2)
    views = Image.fromarray((tiles.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    lines = 3 if review_reason else 2
    picture = Image.new("RGB", (views.width, views.height + lines * LINE), "white")
    picture.paste(views, (0, lines * LINE))
    draw, font = ImageDraw.Draw(picture), ImageFont.load_default(size=13)
    top = 0
    if review_reason:
        draw.rectangle((0, 0, picture.width, LINE - 1), fill=REVIEW_RED)
        draw.text((4, 2), _fit(draw, font, f"REVIEW: {review_reason}", picture.width - 8), "white", font)
        top = LINE
    legend = "mask red, reference green" if reference is not None else "mask red"
    draw.text((4, top + 2), f"{case_id}   LA {volume_ml:.1f} mL   ({legend})", "black", font)
    for n, (name, _) in enumerate(cuts):
        draw.text((n * TILE + 4, top + LINE + 2), _fit(draw, font, name, TILE - 8), "black", font)
    return picture


def _fit(draw: ImageDraw.ImageDraw, font: ImageFont.ImageFont, text: str, width: int) -> str:
    """`text`, cut with an ellipsis to fit `width` pixels (a long review reason must not run off)."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def png_bytes(picture: Image.Image) -> bytes:
    """The picture encoded as PNG: what a test run keeps per case until its page is written (small)."""
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def save_png(path: Path, picture: Image.Image | bytes) -> None:
    """Write a picture (or PNG bytes) atomically."""
    with atomic_path(path) as tmp:
        if isinstance(picture, bytes):
            tmp.write_bytes(picture)
        else:
            picture.save(tmp, format="PNG")


def review_order(rows: Sequence[dict]) -> list[dict]:
    """Flagged cases first; then the lowest Dice (where a reference exists); then the volume furthest from
    the run's median (the odd ones out); then case id."""
    median = statistics.median(row["volume_ml"] for row in rows) if rows else 0.0

    def key(row: dict) -> tuple:
        dice = row.get("dice")
        dice = math.inf if dice is None or math.isnan(dice) else dice
        return (not row["review"], dice, -abs(row["volume_ml"] - median), str(row["case_id"]))

    return sorted(rows, key=key)


def write_page(
    path: Path,
    title: str,
    rows: Sequence[dict],
    columns: Sequence[tuple[str, str, str]] = (),
    legend: str | None = None,
) -> Path:
    """Write the QC page: one table row per case (`case_id`, `picture`: a file name relative to the page, or
    `pictures`: several, `volume_ml`, `review`, `review_reason`, and `dice` where a reference exists), in
    review order. `columns`: further cells of each row, as (key, header, format spec);
    `legend`: what the pictures show (default: the masks' colours).

    An inline script marks `<body data-pictures="loaded N/M">` once the pictures have loaded, for a browser
    test; the page needs nothing but its pictures."""
    with_dice = any(row.get("dice") is not None for row in rows)
    ordered = review_order(rows)
    flagged = sum(bool(row["review"]) for row in rows)
    cells = []
    for row in ordered:
        case, dice = html.escape(str(row["case_id"])), row.get("dice")
        dice_cell = f"<td>{'nan' if dice is None or math.isnan(dice) else f'{dice:.4f}'}</td>"
        reason = html.escape(row["review_reason"]) if row["review"] else ""
        pictures = row["pictures"] if "pictures" in row else [row["picture"]]
        images = "".join(f'<img src="{html.escape(quote(name))}" alt="{case}">' for name in pictures)
        extra = "".join(f"<td>{html.escape(format(row[key], spec))}</td>" for key, _, spec in columns)
        cells.append(
            f'<tr data-case="{case}" data-review="{int(bool(row["review"]))}"><td>{case}</td>'
            f'<td class="views">{images}</td><td>{row["volume_ml"]:.1f}</td>'
            f"{dice_cell if with_dice else ''}{extra}"
            f'<td class="review">{reason}</td></tr>'
        )
    if legend is None:
        legend = f"Mask in red{', reference in green' if with_dice else ''}."
    head = "<th>case</th><th>views</th><th>LA volume (mL)</th>" + ("<th>Dice</th>" if with_dice else "")
    head += "".join(f"<th>{html.escape(header)}</th>" for _, header, _ in columns)
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 1em; }}
table {{ border-collapse: collapse; }}
td, th {{ border: 1px solid #ccc; padding: 4px 8px; text-align: left; vertical-align: top; }}
tr[data-review="1"] {{ background: #fdecea; }}
td.review {{ color: #b00000; font-weight: bold; }}
td.views {{ white-space: nowrap; }}
td.views img {{ max-height: 320px; }}
</style></head>
<body data-pictures="loading">
<h1>{html.escape(title)}</h1>
<p>{len(rows)} case(s), {flagged} flagged for review; flagged cases first, then the lowest Dice, then the
LA volume furthest from this run's median. {html.escape(legend)}</p>
<table><thead><tr>{head}<th>review</th></tr></thead>
<tbody>
{chr(10).join(cells)}
</tbody></table>
<script>
window.addEventListener("load", () => {{
  const pictures = [...document.images];
  const loaded = pictures.filter((p) => p.complete && p.naturalWidth > 0).length;
  document.body.dataset.pictures = `loaded ${{loaded}}/${{pictures.length}}`;
}});
</script>
</body></html>
"""
    atomic_write_text(path, page)
    return path
