"""LA size and shape: volume (mask, probabilities, surface), surface area, sphericity, principal diameters."""

from __future__ import annotations

import numpy as np
import trimesh

ML_PER_MM3 = 1e-3


def sphericity(volume_mm3: float, area_mm2: float) -> float:
    """Wadell's sphericity: the area of the sphere of the same volume over the surface's area (1: a sphere;
    a remodelled LA becomes rounder, Bisbal et al. 2013)."""
    return float(np.pi ** (1 / 3) * (6.0 * volume_mm3) ** (2 / 3) / area_mm2)


def principal_diameters(mask_world: np.ndarray, mesh: trimesh.Trimesh) -> tuple[float, float, float]:
    """The surface's extents (mm) along the principal axes of the LA's voxels (their positions' PCA), largest
    first: the LA's length, width and depth whatever its pose in the scanner."""
    centred = mask_world - mask_world.mean(axis=0)
    axes = np.linalg.svd(centred, full_matrices=False)[2]  # rows: principal directions, largest first
    projected = mesh.vertices @ axes.T
    extents = projected.max(axis=0) - projected.min(axis=0)
    return tuple(float(e) for e in extents)  # type: ignore[return-value]


def size_and_shape(
    mask_world: np.ndarray, voxel_mm3: float, mesh: trimesh.Trimesh, probability_sum: float | None
) -> dict:
    """The measures of one case; `mask_world`: the LA voxels' centres in world mm; `probability_sum`: the sum
    of the LA probability map (counts partly-LA voxels by their share), None where none was written."""
    diameters = principal_diameters(mask_world, mesh)
    return {
        "volume_ml": len(mask_world) * voxel_mm3 * ML_PER_MM3,
        "prob_volume_ml": None if probability_sum is None else probability_sum * voxel_mm3 * ML_PER_MM3,
        "mesh_volume_ml": float(mesh.volume) * ML_PER_MM3,
        "area_cm2": float(mesh.area) / 100.0,
        "sphericity": sphericity(float(mesh.volume), float(mesh.area)),
        **{f"diameter_{i}_mm": d for i, d in enumerate(diameters, start=1)},
    }
