"""The wall enhancement map: image intensity ratio (IIR) per surface vertex, the enhanced share of the wall.

IIR (Khurram et al., Heart Rhythm 2014): the LGE intensity of the wall divided by the mean of the LA blood
pool. As CemrgApp does, the wall intensity of a vertex is the maximum along its surface normal over a shell
around the surface (-3..+3 mm; CemrgApp steps -3..+3 voxels of its about 1 mm images), sampled trilinearly.
The blood pool is the LA mask eroded away from the wall, so partial-volume wall voxels do not lower its mean.
By default the pool's shading is allowed for: the receiver coils' sensitivity falls off across the field of
view (10-40 %), so a single pool mean reads the blood on the bright side of the LA, which the -3 mm end of
the shell reaches, as 1.2 or more: on phantoms with such shading fibrosis read up to 5 points above the
true patches, 2 with the shading fitted. The pool's log-intensity is fitted as a quadratic in space (a
smooth field, as coil shading is; blood is uniform under it) and every sample is divided by that field at
its point, scaled to average the pool's mean; `shading: none` divides by the single mean, as Khurram did.
Fibrosis is IIR > 1.2 and dense scar IIR > 1.32 (Benito et al., Europace 2017); the Utah stage grades the
fibrotic share of the wall (Marrouche et al., JAMA 2014, DECAAF: I < 10 %, II 10-20 %, III 20-30 %,
IV >= 30 %). Shares are of the wall AREA: each vertex weighs a third of its triangles' area.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

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
        shading: `quadratic`: divide each sample by the pool's intensity fitted as a smooth field (coil
            shading allowed for); `none`: by the pool's single mean (Khurram 2014).
    """

    erosion_mm: float = 3.0
    min_voxels: int = 50
    shading: Literal["quadratic", "none"] = "quadratic"


@dataclass(frozen=True)
class PoolIntensity:
    """The blood-pool intensity IIR divides by: the eroded pool's `mean` and `voxels`, and where shading is
    fitted, its log-quadratic `coefficients` in voxel coordinates about `centre`, in units of `scale`."""

    mean: float
    voxels: int
    centre: np.ndarray | None = None
    scale: float = 1.0
    coefficients: np.ndarray | None = None

    def at(self, voxels: np.ndarray) -> np.ndarray:
        """The pool's intensity at (N, 3) voxel coordinates."""
        if self.coefficients is None:
            return np.full(len(voxels), self.mean)
        return np.exp(_quadratic_terms((voxels - self.centre) / self.scale) @ self.coefficients)


def _quadratic_terms(u: np.ndarray) -> np.ndarray:
    """The 10 monomials of degree <= 2 of (N, 3) coordinates: a quadratic stays one under any affine map, so
    voxel coordinates fit the same field as world mm."""
    x, y, z = u.T
    return np.stack([np.ones_like(x), x, y, z, x * x, y * y, z * z, x * y, x * z, y * z], axis=1)


def measure_blood_pool(
    image: np.ndarray, mask: np.ndarray, spacing: tuple[float, float, float], settings: BloodPool
) -> PoolIntensity:
    """The intensity of the LA mask eroded by `settings.erosion_mm` (with its shading where asked); a
    DataError when too few voxels remain (the message names the option; the caller prefixes the case)."""
    # the mask's box and one voxel of background around it: every mask voxel's nearest background voxel lies
    # there, and the distance transform of a whole 640 x 640 x 44 volume took 13 s of a case's 25
    box = tuple(slice(max(int(i.min()) - 1, 0), int(i.max()) + 2) for i in np.nonzero(mask))
    pool = distance_transform_edt(mask[box], sampling=spacing) > settings.erosion_mm
    count = int(pool.sum())
    if count < settings.min_voxels:
        raise DataError(
            f"the LA blood pool eroded by {settings.erosion_mm:g} mm holds {count} voxels, fewer than "
            f"--blood_pool.min_voxels {settings.min_voxels}: too small to normalise the wall by (lower "
            "--blood_pool.erosion_mm for a small LA or a coarse grid)"
        )
    values = image[box][pool].astype(np.float64)
    mean = float(values.mean())
    if settings.shading == "none":
        return PoolIntensity(mean, count)
    if mean <= 0:
        raise DataError(f"the LA blood pool's mean intensity is {mean:g}: no shading to fit in a dark pool")
    voxels = (np.argwhere(pool) + [b.start for b in box]).astype(np.float64)
    centre, scale = voxels.mean(axis=0), float(voxels.std()) or 1.0
    terms = _quadratic_terms((voxels - centre) / scale)
    coefficients = np.linalg.lstsq(terms, np.log(np.maximum(values, mean * 1e-3)), rcond=None)[0]
    coefficients[0] += np.log(mean / np.exp(terms @ coefficients).mean())  # averages the pool's mean
    return PoolIntensity(mean, count, centre, scale, coefficients)


def wall_iir(
    image: np.ndarray, world_to_voxel: np.ndarray, mesh: trimesh.Trimesh, shell: Shell, pool: PoolIntensity
) -> np.ndarray:
    """Per vertex: the maximum along the outward normal over `shell` of the image divided by the pool's
    intensity there. Samples beyond the volume take the nearest edge voxel."""
    offsets = shell.offsets()
    points = mesh.vertices[:, None, :] + offsets[None, :, None] * mesh.vertex_normals[:, None, :]
    voxels = points.reshape(-1, 3) @ world_to_voxel[:3, :3].T + world_to_voxel[:3, 3]
    values = map_coordinates(image.astype(np.float32, copy=False), voxels.T, order=1, mode="nearest")
    return (values / pool.at(voxels)).reshape(len(mesh.vertices), len(offsets)).max(axis=1)


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
