"""The wall enhancement map: image intensity ratio (IIR) per surface vertex, the enhanced share of the wall.

IIR (Khurram et al., Heart Rhythm 2014): the LGE intensity of the wall divided by the mean of the LA blood
pool. As CemrgApp does, the wall intensity of a vertex is the maximum along its surface normal over a shell
around the surface (-3..+3 mm; CemrgApp steps -3..+3 voxels of its about 1 mm images), sampled trilinearly.
The blood pool is the LA mask eroded away from the wall, so partial-volume wall voxels do not lower its mean.
Fibrosis is IIR > 1.2 and dense scar IIR > 1.32 (Benito et al., Europace 2017); the Utah stage grades the
fibrotic share of the wall (Marrouche et al., JAMA 2014, DECAAF: I < 10 %, II 10-20 %, III 20-30 %,
IV >= 30 %). Shares are of the wall AREA: each vertex weighs a third of its triangles' area.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import trimesh
from scipy.ndimage import distance_transform_edt, map_coordinates

from la_seg.errors import DataError

UTAH_STAGES = ((10.0, "I"), (20.0, "II"), (30.0, "III"))  # below each bound (% of wall area); else IV


@dataclass(frozen=True)
class Shell:
    """Where along each vertex normal the wall intensity is sampled (mm; negative: into the LA).

    Args:
        inner_mm: the innermost sample, inside the LA (CemrgApp: -3).
        outer_mm: the outermost sample, outside the LA (CemrgApp: +3).
        step_mm: the distance between samples.
    """

    inner_mm: float = -3.0
    outer_mm: float = 3.0
    step_mm: float = 0.5

    def __post_init__(self) -> None:
        if not self.inner_mm <= self.outer_mm or self.step_mm <= 0:
            raise DataError(
                f"shell: need inner_mm <= outer_mm and step_mm > 0, got {self.inner_mm}, {self.outer_mm}, "
                f"{self.step_mm}"
            )

    def offsets(self) -> np.ndarray:
        """The sample positions along the normal, mm."""
        count = int(np.floor((self.outer_mm - self.inner_mm) / self.step_mm + 1e-9)) + 1
        return self.inner_mm + self.step_mm * np.arange(count)


@dataclass(frozen=True)
class Thresholds:
    """IIR thresholds: centres use different ones, so every result names those it used.

    Args:
        fibrosis: IIR above this is fibrosis (Benito 2017: 1.2).
        dense_scar: IIR above this is dense scar (Benito 2017: 1.32).
    """

    fibrosis: float = 1.2
    dense_scar: float = 1.32

    def __post_init__(self) -> None:
        if not 0 < self.fibrosis <= self.dense_scar:
            raise DataError(
                f"thresholds: need 0 < fibrosis <= dense_scar, got {self.fibrosis} and {self.dense_scar}"
            )


@dataclass(frozen=True)
class BloodPool:
    """The LA blood pool that IIR is normalised by.

    Args:
        erosion_mm: only LA voxels at least this far from the mask's edge count (away from the wall).
        min_voxels: fewer voxels than this are too few to normalise by: the case is refused.
    """

    erosion_mm: float = 3.0
    min_voxels: int = 50


def measure_blood_pool(
    image: np.ndarray, mask: np.ndarray, spacing: tuple[float, float, float], settings: BloodPool
) -> tuple[float, int]:
    """(mean intensity, voxel count) of the LA mask eroded by `settings.erosion_mm`; a DataError when too few
    voxels remain (the message names the option; the caller prefixes the case)."""
    pool = distance_transform_edt(mask, sampling=spacing) > settings.erosion_mm
    count = int(pool.sum())
    if count < settings.min_voxels:
        raise DataError(
            f"the LA blood pool eroded by {settings.erosion_mm:g} mm holds {count} voxels, fewer than "
            f"--blood_pool.min_voxels {settings.min_voxels}: too small to normalise the wall by (lower "
            "--blood_pool.erosion_mm for a small LA or a coarse grid)"
        )
    return float(image[pool].mean()), count


def wall_iir(
    image: np.ndarray, world_to_voxel: np.ndarray, mesh: trimesh.Trimesh, shell: Shell, pool_mean: float
) -> np.ndarray:
    """Per vertex: the maximum of the image along the outward normal over `shell`, divided by `pool_mean`.
    Samples beyond the volume take the nearest edge voxel."""
    offsets = shell.offsets()
    points = mesh.vertices[:, None, :] + offsets[None, :, None] * mesh.vertex_normals[:, None, :]
    voxels = points.reshape(-1, 3) @ world_to_voxel[:3, :3].T + world_to_voxel[:3, 3]
    values = map_coordinates(image.astype(np.float32, copy=False), voxels.T, order=1, mode="nearest")
    return values.reshape(len(mesh.vertices), len(offsets)).max(axis=1) / pool_mean


def vertex_areas(mesh: trimesh.Trimesh) -> np.ndarray:
    """Each vertex's share of the surface: a third of the area of every triangle it belongs to (mm^2)."""
    areas = np.zeros(len(mesh.vertices))
    np.add.at(areas, mesh.faces, np.repeat(mesh.area_faces[:, None] / 3.0, 3, axis=1))
    return areas


def enhanced_percent(iir: np.ndarray, areas: np.ndarray, threshold: float) -> float:
    """The share of the wall area whose IIR is above `threshold`, %."""
    return float(100.0 * areas[iir > threshold].sum() / areas.sum())


def utah_stage(fibrosis_percent: float) -> str:
    """The Utah stage (I-IV) of a fibrotic share of the wall (%)."""
    return next((stage for bound, stage in UTAH_STAGES if fibrosis_percent < bound), "IV")
