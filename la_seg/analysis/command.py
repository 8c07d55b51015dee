"""`la-seg analyse`: per case, the LA surface with its wall IIR map, the enhanced share of the wall, the Utah
stage, LA size and shape and pictures; a table over all cases with the method and thresholds beside it, and
the QC page (la_seg.qc) with a row per case, the cases flagged for review first.

Inputs are a folder of LGE volumes (any la-seg layout) and a folder of LA masks on their grids (`la-seg
predict`'s output, matched by case id; `<case>_prob.nii.gz` beside a mask adds the probability volume), the
masks and probabilities `la-seg predict --ckpt_path` writes into <out>/masks first, or the data set's own
labels. Outputs go to --out, never into an input folder, one run at a time (a lock file), every file written
atomically.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

import la_seg
from la_seg.analysis.measures import size_and_shape
from la_seg.analysis.pictures import IIR_RANGE, VIEWS, surface_views
from la_seg.analysis.surface import la_surface, open_edges, voxel_to_world, write_ply, write_stl, write_vtk
from la_seg.analysis.wall import (
    UTAH_STAGES,
    BloodPool,
    Shell,
    Thresholds,
    enhanced_percent,
    measure_blood_pool,
    utah_stage,
    vertex_areas,
    wall_iir,
)
from la_seg.atomic import atomic_path, claim_output_folder, write_csv, write_json
from la_seg.data.io import Volume, read_image, read_label
from la_seg.data.layouts import Case, Layout, find_cases
from la_seg.errors import DataError
from la_seg.evaluate import binarise_prediction, check_same_grid, find_predictions
from la_seg.plausibility import Plausibility, case_reasons, review_fields, review_line
from la_seg.qc import write_page
from la_seg.report import COMPANION_SUFFIXES

STEM = "analysis"
PAGE = f"{STEM}.html"
# the QC page's cells beyond case, pictures, LA volume and review
PAGE_COLUMNS = (
    ("fibrosis_percent", "fibrosis (% of wall)", ".1f"),
    ("dense_scar_percent", "dense scar (% of wall)", ".1f"),
    ("utah_stage", "Utah stage", ""),
    ("mean_iir", "mean IIR", ".2f"),
)  # fmt: skip
PREDICTED = "masks"  # the folder of --out that `la-seg predict` writes into for --ckpt_path
COLUMNS = (
    "case_id", "volume_ml", "prob_volume_ml", "mesh_volume_ml", "area_cm2", "sphericity", "diameter_1_mm",
    "diameter_2_mm", "diameter_3_mm", "blood_pool_mean", "blood_pool_voxels", "mean_iir", "fibrosis_percent",
    "dense_scar_percent", "utah_stage", "vertices", "review", "review_reason", "surface", "image_path",
    "mask_path",
)  # fmt: skip


def analyse(
    images: Path,
    out: Path,
    masks: Path | None = None,
    ckpt_path: str | None = None,
    predict_config: str | None = None,
    layout: Layout = "auto",
    shell: Shell = Shell(),  # noqa: B008 (frozen, so sharing is safe)
    thresholds: Thresholds = Thresholds(),  # noqa: B008 (frozen)
    blood_pool: BloodPool = BloodPool(),  # noqa: B008 (frozen)
    smoothing_iterations: int = 20,
    plausibility: Plausibility = Plausibility(),  # noqa: B008 (frozen)
    overwrite: bool = False,
) -> list[dict]:
    """Analyse every case: surface (.vtk and .ply with per-vertex IIR, .stl), pictures, analysis.{csv,json}.

    Args:
        images: the LGE volumes: a data set folder (any layout), a folder of volume files or one file.
        out: the folder to write into (created; never an input folder).
        masks: the LA masks, `<case>.nii.gz` on each image's grid (la-seg predict's --writer.output_dir);
            default: the data set's own labels.
        ckpt_path: instead of --masks, segment --images first with `la-seg predict --ckpt_path` (a checkpoint
            file, best / last, several, or a folder of fold runs) into <out>/masks, with probabilities.
        predict_config: the config of that predict run (its --config: a shipped name such as giant.yaml or
            a file), for what the checkpoint does not set: model.tta, trainer.accelerator, data.num_workers.
        layout: layout of --images; `auto` detects it.
        shell: --shell.inner_mm / outer_mm / step_mm: where the wall is sampled along each normal.
        thresholds: --thresholds.fibrosis / dense_scar: IIR thresholds.
        blood_pool: --blood_pool.erosion_mm / min_voxels: the blood pool IIR is normalised by.
        smoothing_iterations: Taubin smoothing passes of the surface (0: the raw marching-cubes surface).
        plausibility: --plausibility.* (la_seg.plausibility): a mask outside it is flagged for review.
        overwrite: replace an earlier analysis in --out.
    """
    images, out = Path(images).expanduser(), Path(out).expanduser()
    masks = None if masks is None else Path(masks).expanduser()
    if smoothing_iterations < 0:
        raise DataError(f"--smoothing_iterations must be >= 0, got {smoothing_iterations}")
    for option, path in (("--images", images), ("--masks", masks)):
        if path is not None and not path.exists():
            raise DataError(f"{option} {path} does not exist")
    if ckpt_path is not None and masks is not None:
        raise DataError("give --masks or --ckpt_path, not both: --ckpt_path writes the masks it analyses")
    if predict_config is not None and ckpt_path is None:
        raise DataError(
            "--predict_config needs --ckpt_path: it configures the predict run --ckpt_path starts"
        )
    cases = find_cases(images, layout, require_labels=masks is None and ckpt_path is None)
    tables = [out / f"{STEM}.csv", out / f"{STEM}.json", out / PAGE]
    with claim_output_folder(out, (images, masks), tables, overwrite, "analysis"):
        if ckpt_path is not None:
            masks = out / PREDICTED
            _predict(images, ckpt_path, masks, predict_config, overwrite)
        pairs = _pairs(cases, images, masks)
        settings = dict(shell=shell, thresholds=thresholds, pool=blood_pool, smoothing=smoothing_iterations)
        rows, pictures = [], []
        for case, mask_path in pairs:
            rows.append(analyse_case(case, mask_path, out, plausibility=plausibility, **settings))
            pictures.append(_mask_picture(case.case_id, mask_path, out))
            print(_case_line(rows[-1]))
        method = describe_method(shell, thresholds, blood_pool, smoothing_iterations)
        write_csv(out / f"{STEM}.csv", COLUMNS, ([row[c] for c in COLUMNS] for row in rows), method)
        write_json(out / f"{STEM}.json", {"method": method, "cases": rows})
        write_qc_page(out, rows, pictures, thresholds)
    print(f"Analysis of {len(rows)} case(s): {out / STEM}.csv and {STEM}.json; QC page {out / PAGE}")
    return rows


def write_qc_page(
    out: Path, rows: list[dict], mask_pictures: list[str | None], thresholds: Thresholds
) -> None:
    """`<out>/analysis.html` (la_seg.qc's page): a row per case with its IIR pictures (and predict's picture
    of the mask where it drew one), LA volume, the enhanced shares, Utah stage and review flag, flagged
    first."""
    entries = []
    for row, mask_picture in zip(rows, mask_pictures, strict=True):
        views = [f"{row['case_id']}_{view}.png" for view in VIEWS]
        entries.append(row | {"pictures": [*views, *([mask_picture] if mask_picture else [])]})
    legend = (
        f"The LA surface coloured by IIR ({IIR_RANGE[0]:g}-{IIR_RANGE[1]:g}; fibrosis > "
        f"{thresholds.fibrosis:g}, dense scar > {thresholds.dense_scar:g}) from the front and the back; "
        "la-seg predict's picture of the mask (red) where it drew one."
    )
    write_page(out / PAGE, f"la-seg analyse: {out}", entries, PAGE_COLUMNS, legend)


def _mask_picture(case_id: str, mask_path: Path | None, out: Path) -> str | None:
    """predict's picture of the mask (`<case>.png` beside it, --writer.save_png), copied into `out` so the
    page moves with its folder; None where predict drew none."""
    source = None if mask_path is None else mask_path.with_name(f"{case_id}.png")
    if source is None or not source.is_file():
        return None
    name = f"{case_id}_mask.png"
    with atomic_path(out / name) as tmp:
        shutil.copyfile(source, tmp)
    return name


def _predict(images: Path, ckpt_path: str, masks: Path, config: str | None, overwrite: bool) -> None:
    """`la-seg predict` itself into `masks`, so the analysed masks are predict's: its checkpoint rules,
    preprocessing, calibrated threshold, post-processing and review flags."""
    from la_seg.cli import run  # imported here: la_seg.cli imports this module when it runs `analyse`

    written = ["--writer.output_dir", str(masks), "--writer.save_probabilities", "true"]
    written += ["--writer.save_png", "true"]  # the mask's picture on the QC page
    written += ["--writer.overwrite", str(overwrite).lower()]
    options = [] if config is None else ["--config", config]
    run(["predict", *options, "--ckpt_path", ckpt_path, "--data.predict_root", str(images), *written], False)


def _pairs(cases: list[Case], images: Path, masks: Path | None) -> list[tuple[Case, Path | None]]:
    """Each image case with its mask file (None: the case's own label); every case needs one."""
    if masks is None:
        return [(case, None) for case in cases]
    found = find_predictions(masks)
    missing = [case.case_id for case in cases if case.case_id not in found]
    if missing:
        raise DataError(
            f"{len(missing)} case(s) of --images {images} have no mask in {masks}: {missing[:10]}"
        )
    return [(case, found[case.case_id]) for case in cases]


def analyse_case(
    case: Case,
    mask_path: Path | None,
    out: Path,
    shell: Shell,
    thresholds: Thresholds,
    pool: BloodPool,
    smoothing: int,
    plausibility: Plausibility,
) -> dict:
    """One case's files in `out` and its table row; a DataError (naming the case) when it cannot be
    analysed: a mask off the image's grid, an empty mask, a blood pool too small to normalise by."""
    image = read_image(case.image_path, case.spacing)
    mask = _read_mask(case, mask_path, image)
    geometry = image.geometry
    source = mask_path or case.label_path
    if not mask.any():
        raise DataError(f"case {case.case_id}: the mask {source} is empty: no LA to analyse")
    try:
        pool_intensity = measure_blood_pool(image.data, mask, geometry.spacing, pool)
    except DataError as error:
        raise DataError(f"case {case.case_id} ({source}): {error}") from None
    mesh = la_surface(mask, geometry, smoothing)
    to_world = voxel_to_world(geometry)
    iir = wall_iir(image.data, np.linalg.inv(to_world), mesh, shell, pool_intensity)
    areas = vertex_areas(mesh)
    fibrosis = enhanced_percent(iir, areas, thresholds.fibrosis)
    mask_world = np.argwhere(mask) @ to_world[:3, :3].T + to_world[:3, 3]
    probability = _probability_sum(case, mask_path, image)
    reasons = case_reasons(
        torch.from_numpy(mask), geometry.spacing, geometry.voxel_volume_mm3, settings=plausibility
    )
    if edges := open_edges(mesh):
        reasons.append(f"surface not closed ({edges} open edges): its volume and area are not reliable")
    if reasons:
        print(review_line(case.case_id, str(source), "; ".join(reasons)), file=sys.stderr)
    title = f"la-seg {la_seg.__version__} LA surface of {case.case_id}, mm, point data IIR"
    surface = out / f"{case.case_id}.vtk"
    write_vtk(surface, mesh, {"IIR": iir}, title)
    write_stl(out / f"{case.case_id}.stl", mesh)
    write_ply(out / f"{case.case_id}.ply", mesh, {"IIR": iir})
    surface_views(mesh, iir, thresholds, out / case.case_id, case.case_id)
    return {
        "case_id": case.case_id,
        **size_and_shape(mask_world, geometry.voxel_volume_mm3, mesh, probability),
        "blood_pool_mean": pool_intensity.mean,
        "blood_pool_voxels": pool_intensity.voxels,
        "mean_iir": float(np.average(iir, weights=areas)),
        "fibrosis_percent": fibrosis,
        "dense_scar_percent": enhanced_percent(iir, areas, thresholds.dense_scar),
        "utah_stage": utah_stage(fibrosis),
        "vertices": len(mesh.vertices),
        **review_fields(reasons),
        "surface": str(surface),
        "image_path": str(case.image_path),
        "mask_path": str(source),
    }


def _read_mask(case: Case, mask_path: Path | None, image: Volume) -> np.ndarray:
    """The case's binary LA mask on the image's grid (a mask file on another grid is refused)."""
    if mask_path is None:
        assert case.label_path is not None  # find_cases(require_labels=True)
        return read_label(case.label_path, case.spacing, label_values=case.label_values).data.astype(bool)
    mask = read_image(mask_path, case.spacing)
    check_same_grid(mask, image)
    return binarise_prediction(mask, None)


def _probability_sum(case: Case, mask_path: Path | None, image: Volume) -> float | None:
    """The sum of the LA probability map `la-seg predict` wrote beside the mask, None where it wrote none."""
    if mask_path is None:
        return None
    path = mask_path.with_name(f"{case.case_id}{COMPANION_SUFFIXES[0]}.nii.gz")
    if not path.is_file():
        return None
    probability = read_image(path, case.spacing)
    check_same_grid(probability, image)
    return float(probability.data.astype(np.float64).sum())


def describe_method(shell: Shell, thresholds: Thresholds, pool: BloodPool, smoothing: int) -> dict:
    """The method and settings every result is read with: written beside it (CSV comments, JSON)."""
    stages = ", ".join(f"{stage} < {bound:g} %" for bound, stage in UTAH_STAGES)
    return {
        "la_seg_version": la_seg.__version__,
        "surface": f"marching cubes of the mask at 0.5, Taubin-smoothed {smoothing} passes; world mm; files "
        "in LPS (header SPACE=LPS), analysis in RAS",
        "iir": "max along the outward vertex normal over the shell of the LGE intensity (trilinear) / the LA "
        "blood pool's, the mask eroded by blood_pool.erosion_mm (Khurram et al., Heart Rhythm 2014): with "
        "blood_pool.shading quadratic its intensity at the sample, a log-quadratic field fitted to the pool "
        "(coil shading) averaging its mean; with none its mean",
        "shell_mm": asdict(shell),
        "blood_pool": asdict(pool),
        "thresholds_iir": asdict(thresholds),
        "threshold_reference": "Benito et al., Europace 2017 (fibrosis 1.2, dense scar 1.32)",
        "fractions": "share of the wall area above a threshold, %: each vertex weighs 1/3 of its triangles",
        "utah_stage": f"of fibrosis_percent: {stages}, IV otherwise (DECAAF, Marrouche et al., JAMA 2014)",
        "picture_iir_range": list(IIR_RANGE),
    }


def _case_line(row: dict) -> str:
    """One console line per case."""
    return (
        f"{row['case_id']}: LA {row['volume_ml']:.1f} mL, area {row['area_cm2']:.1f} cm2, sphericity "
        f"{row['sphericity']:.2f}, fibrosis {row['fibrosis_percent']:.1f} % (Utah {row['utah_stage']}), "
        f"dense scar {row['dense_scar_percent']:.1f} %" + (" [review]" if row["review"] else "")
    )
