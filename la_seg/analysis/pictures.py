"""Pictures of the LA surface coloured by IIR, from the front (anterior) and the back (posterior).

Drawn with matplotlib's Agg canvas (no display), on one fixed IIR colour scale for every case, so pictures of
different patients compare; the colour bar marks the thresholds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import trimesh
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from mpl_toolkits.mplot3d.art3d import Poly3DCollection

from la_seg.analysis.wall import Thresholds
from la_seg.atomic import atomic_path

IIR_RANGE = (0.6, 1.6)  # the colour scale: blood pool (1.0) mid-scale, dense scar (1.32) near the top
# (elevation, azimuth, where the viewer is) in RAS world: in front (+A) and behind (-A), head up
VIEWS = {"anterior": (0.0, 90.0, (0.0, 1.0, 0.0)), "posterior": (0.0, -90.0, (0.0, -1.0, 0.0))}
AMBIENT = 0.35  # shading: the rest of the light comes from the viewer, so the surface's shape shows


def surface_views(
    mesh: trimesh.Trimesh, iir: np.ndarray, thresholds: Thresholds, stem: Path, title: str
) -> list[Path]:
    """Write `<stem>_anterior.png` and `<stem>_posterior.png`; returns their paths."""
    norm = Normalize(*IIR_RANGE)
    colours = colormaps["inferno"](norm(iir[mesh.faces].mean(axis=1)))
    low, high = mesh.bounds
    centre, half = (low + high) / 2, (high - low).max() / 2
    paths = []
    for view, (elevation, azimuth, viewer) in VIEWS.items():
        light = AMBIENT + (1 - AMBIENT) * np.abs(mesh.face_normals @ np.asarray(viewer))
        shaded = colours.copy()
        shaded[:, :3] *= light[:, None]
        figure = Figure(figsize=(5, 5), dpi=100)
        FigureCanvasAgg(figure)
        axes = figure.add_subplot(projection="3d")
        axes.add_collection3d(Poly3DCollection(mesh.triangles, facecolors=shaded, linewidths=0))
        for set_limits, c in zip((axes.set_xlim, axes.set_ylim, axes.set_zlim), centre, strict=True):
            set_limits(c - half, c + half)
        axes.set_box_aspect((1, 1, 1))
        axes.view_init(elev=elevation, azim=azimuth)
        axes.set_axis_off()
        axes.set_title(f"{title}: {view}")
        bar = figure.colorbar(ScalarMappable(norm, "inferno"), ax=axes, shrink=0.6, label="IIR")
        for value in (thresholds.fibrosis, thresholds.dense_scar):
            bar.ax.axhline(value, color="cyan", linewidth=1)
        path = stem.with_name(f"{stem.name}_{view}.png")
        with atomic_path(path) as tmp:
            figure.savefig(tmp, format="png")
        paths.append(path)
    return paths
