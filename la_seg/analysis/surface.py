"""The LA surface: a closed triangle mesh of the mask in world mm, smoothed without shrinking, and its files
(VTK PolyData, STL, PLY).

Vertices are computed in RAS mm (la-seg's world: the input's affine, its axes scaled to the spacing la-seg
measures with, which is the header's except for overrides such as Utah 2018's). Files are written in LPS
with `SPACE=LPS` in their header (a comment line in PLY): 3D Slicer reads it there and assumes LPS without
it, as do ITK-based tools, so the surface lies on the image in Slicer; ParaView ignores the comment and shows
LPS coordinates (flip x and y to overlay a NIfTI shown in RAS).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import trimesh
from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation
from skimage.measure import marching_cubes
from trimesh.exchange.ply import export_ply
from trimesh.exchange.stl import export_stl
from trimesh.smoothing import filter_taubin

from la_seg.atomic import atomic_path
from la_seg.data.io import Geometry

RAS_TO_LPS = np.array([-1.0, -1.0, 1.0])
# Taubin's shrink-free smoothing: a positive step, then a slightly larger negative one (pass band ~0.1)
TAUBIN_LAMBDA, TAUBIN_MU = 0.5, 0.53
_VTK_TITLE_MAX = 255  # a legacy VTK title line holds at most 256 characters, newline included
# never starting with "solid", which marks an ASCII STL
_STL_HEADER = b"la-seg LA surface, mm, SPACE=LPS".ljust(80, b" ")


def voxel_to_world(geometry: Geometry) -> np.ndarray:
    """(4, 4) voxel index -> RAS mm: the affine, each axis scaled to `geometry.spacing`."""
    affine = np.asarray(geometry.affine, dtype=np.float64).copy()
    axes = affine[:3, :3]
    affine[:3, :3] = axes / np.linalg.norm(axes, axis=0) * np.asarray(geometry.spacing)
    return affine


def la_surface(mask: np.ndarray, geometry: Geometry, smoothing_iterations: int) -> trimesh.Trimesh:
    """The mask's boundary (marching cubes at 0.5 on the zero-padded mask, so a mask touching the border is
    closed there too) in RAS mm, outward-facing, Taubin-smoothed `smoothing_iterations` times.

    The mask is first brought to RAS array order (axis permutations and flips): marching cubes splits
    ambiguous cubes by their array order, so this gives one surface for every storage of the same patient.
    """
    affine = voxel_to_world(geometry)
    orientation = io_orientation(affine)
    canonical = apply_orientation(mask.astype(np.float32), orientation)
    affine = affine @ inv_ornt_aff(orientation, mask.shape)
    voxels, faces, _, _ = marching_cubes(np.pad(canonical, 1), level=0.5)
    world = (voxels - 1.0) @ affine[:3, :3].T + affine[:3, 3]
    mesh = trimesh.Trimesh(world, faces, process=False)
    if mesh.volume < 0:  # marching cubes' winding is for its own array axes: make the normals point outward
        mesh.invert()
    if smoothing_iterations:
        filter_taubin(mesh, lamb=TAUBIN_LAMBDA, nu=TAUBIN_MU, iterations=smoothing_iterations)
    return mesh


def open_edges(mesh: trimesh.Trimesh) -> int:
    """Edges not shared by exactly two faces: 0 for a closed surface, whose volume can be trusted."""
    counts = np.unique(mesh.edges_sorted, axis=0, return_counts=True)[1]
    return int((counts != 2).sum())


def write_vtk(path: Path, mesh: trimesh.Trimesh, point_data: dict[str, np.ndarray], title: str) -> None:
    """Legacy binary VTK 4.2 POLYDATA in LPS mm with float per-vertex arrays, atomically.

    Written here because meshio writes VTK 5.1 UNSTRUCTURED_GRID, which older VTK (CemrgApp/MITK) and the
    electro-anatomical mapping imports do not read as a surface; 4.2 PolyData is what they all read.
    """
    title = f"{title} SPACE=LPS"[:_VTK_TITLE_MAX]
    points = (mesh.vertices * RAS_TO_LPS).astype(">f4")
    faces = np.asarray(mesh.faces, dtype=np.int64)
    cells = np.hstack([np.full((len(faces), 1), 3), faces]).astype(">i4")
    parts = [
        f"# vtk DataFile Version 4.2\n{title}\nBINARY\nDATASET POLYDATA\n".encode(),
        f"POINTS {len(points)} float\n".encode(),
        points.tobytes(),
        f"\nPOLYGONS {len(faces)} {cells.size}\n".encode(),
        cells.tobytes(),
        f"\nPOINT_DATA {len(points)}\n".encode(),
    ]
    for name, values in point_data.items():
        parts += [f"SCALARS {name} float 1\nLOOKUP_TABLE default\n".encode(), values.astype(">f4").tobytes()]
        parts.append(b"\n")
    with atomic_path(path) as tmp:
        tmp.write_bytes(b"".join(parts))


def write_stl(path: Path, mesh: trimesh.Trimesh) -> None:
    """Binary STL in LPS mm, its 80-byte header naming the coordinate system (`SPACE=LPS`), atomically."""
    lps = _in_lps(mesh)
    with atomic_path(path) as tmp:
        tmp.write_bytes(_STL_HEADER + export_stl(lps)[len(_STL_HEADER) :])


def write_ply(path: Path, mesh: trimesh.Trimesh, point_data: dict[str, np.ndarray]) -> None:
    """Binary PLY in LPS mm with a `comment SPACE=LPS` header line (Slicer reads the frame from PLY comments)
    and each of `point_data` as a float vertex property, atomically.

    VTK's PLY reader (Slicer, ParaView) keeps only the geometry; readers of named vertex properties (trimesh,
    plyfile) get the values too.
    """
    lps = _in_lps(mesh)
    for name, values in point_data.items():
        lps.vertex_attributes[name] = values.astype(np.float32)
    data = export_ply(lps, encoding="binary")
    end = data.index(b"end_header\n")  # the header is ASCII lines before the binary body
    with atomic_path(path) as tmp:
        tmp.write_bytes(data[:end] + b"comment SPACE=LPS\n" + data[end:])


def _in_lps(mesh: trimesh.Trimesh) -> trimesh.Trimesh:
    """The mesh with x and y negated: a rotation (det +1), so its faces keep their outward winding."""
    return trimesh.Trimesh(mesh.vertices * RAS_TO_LPS, mesh.faces, process=False)
