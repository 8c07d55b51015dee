"""`la-seg analyse` and its parts: the surface lies on the mask in world mm whatever the storage, measures of
analytic shapes, the enhanced share of a wall with known patches, files a VTK reader opens, the command end to
end on masks `la-seg predict` wrote, and one clear line for bad input."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import trimesh
from scipy.ndimage import binary_dilation, binary_erosion, generate_binary_structure
from scipy.spatial import cKDTree
from vtkmodules.util.numpy_support import vtk_to_numpy
from vtkmodules.vtkIOGeometry import vtkSTLReader
from vtkmodules.vtkIOLegacy import vtkPolyDataReader
from vtkmodules.vtkIOPLY import vtkPLYReader

from la_seg.analysis.measures import size_and_shape
from la_seg.analysis.surface import (
    RAS_TO_LPS,
    la_surface,
    open_edges,
    voxel_to_world,
    write_ply,
    write_stl,
    write_vtk,
)
from la_seg.analysis.wall import (
    BloodPool,
    Shell,
    Thresholds,
    enhanced_percent,
    measure_blood_pool,
    utah_stage,
    vertex_areas,
    wall_iir,
)
from la_seg.cli import main
from la_seg.data.io import Geometry, read_label
from la_seg.data.synthetic import case_scar_fraction, write_dataset
from tests.storage import stored
from tests.tiny_options import TINY_CLI

SPACING = (0.7, 0.8, 1.2)  # anisotropic, as LGE volumes are
# the tests' phantoms hold an LA of 1-3 mL on 3 mm slices: a thinner erosion leaves a blood pool
SMALL_POOL = ["--blood_pool.erosion_mm", "1.5", "--blood_pool.min_voxels", "20"]


def _grid(shape, spacing=SPACING, origin=(-20.0, 15.0, 40.0)) -> Geometry:
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = origin
    return Geometry(tuple(shape), affine, tuple(spacing), Path("memory"))


def _world(geometry: Geometry) -> np.ndarray:
    """(X, Y, Z, 3) world mm of every voxel centre."""
    index = np.stack(np.indices(geometry.shape), axis=-1).astype(np.float64)
    affine = voxel_to_world(geometry)
    return index @ affine[:3, :3].T + affine[:3, 3]


def _ellipsoid(geometry: Geometry, centre, semi_axes) -> np.ndarray:
    """The mask of an ellipsoid (mm) and its voxels' world mm."""
    world = _world(geometry)
    return (((world - centre) / semi_axes) ** 2).sum(axis=-1) <= 1.0


def _phantom(tmp_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic case's LA mask and the affine it is stored with."""
    root = write_dataset(tmp_path / "phantom", cases=1, seed=3, shape=(48, 44, 14), spacing=(1.0, 1.0, 2.5))[
        0
    ]
    label = read_label(root / "atriumSegImgMO.nii.gz")
    return label.data, label.geometry.affine


def _mesh_in_voxels(mesh: trimesh.Trimesh, geometry: Geometry) -> np.ndarray:
    return (
        mesh.vertices @ np.linalg.inv(voxel_to_world(geometry))[:3, :3].T
        + np.linalg.inv(voxel_to_world(geometry))[:3, 3]
    )


@pytest.mark.parametrize("storage", ["RAS", "LPS"])
def test_raw_surface_vertices_lie_between_an_la_voxel_and_a_background_voxel(tmp_path, storage):
    """Unsmoothed, every vertex on a voxel edge sits halfway between two neighbouring voxels, one LA and one
    not: the surface is the mask's boundary mapped by the file's affine. (Lewiner's marching cubes adds a few
    vertices at cube centres to resolve ambiguous cubes.)"""
    mask, affine = _phantom(tmp_path)
    mask, affine = stored(mask, affine, storage)
    geometry = Geometry(mask.shape, affine, (1.0, 1.0, 2.5), Path("memory"))
    mesh = la_surface(mask, geometry, smoothing_iterations=0)
    voxels = _mesh_in_voxels(mesh, geometry)
    halves = (np.abs(voxels - np.round(voxels)) > 0.25).sum(axis=1)
    np.testing.assert_allclose(voxels * 2, np.round(voxels * 2), atol=1e-6)  # on the half-voxel lattice
    on_edges = voxels[halves == 1]
    assert len(on_edges) > 0.95 * len(voxels)
    low, high = np.floor(on_edges).astype(int), np.ceil(on_edges).astype(int)
    padded = np.pad(mask, 1)  # the surface closes the mask at the border too
    assert (padded[tuple((low + 1).T)] != padded[tuple((high + 1).T)]).all()
    assert open_edges(mesh) == 0 and mesh.volume > 0


def test_an_lps_stored_copy_gives_the_same_world_surface(tmp_path):
    mask, affine = _phantom(tmp_path)
    spacing = (1.0, 1.0, 2.5)
    meshes = {}
    for storage in ("RAS", "LPS"):
        data, moved = stored(mask, affine, storage)
        geometry = Geometry(data.shape, moved, spacing, Path("memory"))
        meshes[storage] = [la_surface(data, geometry, iterations) for iterations in (0, 20)]
    for raw_or_smooth in (0, 1):
        ras, lps = meshes["RAS"][raw_or_smooth], meshes["LPS"][raw_or_smooth]
        distance = cKDTree(ras.vertices).query(lps.vertices)[0]
        assert len(ras.vertices) == len(lps.vertices)
        assert distance.max() < (1e-6 if raw_or_smooth == 0 else 0.05), distance.max()
        assert lps.volume == pytest.approx(ras.volume, rel=1e-3)


def test_a_sphere_measures_as_a_sphere():
    radius = 15.0
    geometry = _grid((50, 45, 30))
    centre = _world(geometry)[25, 22, 15]
    mask = _ellipsoid(geometry, centre, radius)
    mesh = la_surface(mask, geometry, smoothing_iterations=20)
    measures = size_and_shape(_world(geometry)[mask], geometry.voxel_volume_mm3, mesh, None)
    volume_ml, area_cm2 = 4 / 3 * np.pi * radius**3 / 1000, 4 * np.pi * radius**2 / 100
    assert measures["volume_ml"] == pytest.approx(volume_ml, rel=0.02)
    assert measures["mesh_volume_ml"] == pytest.approx(measures["volume_ml"], rel=0.02)
    assert measures["area_cm2"] == pytest.approx(area_cm2, rel=0.04)
    assert measures["sphericity"] == pytest.approx(1.0, abs=0.04)
    for i in (1, 2, 3):
        assert measures[f"diameter_{i}_mm"] == pytest.approx(2 * radius, rel=0.04)


def test_an_ellipsoid_has_its_three_diameters_and_volume():
    semi_axes = np.array([22.0, 15.0, 10.0])
    geometry = _grid((80, 50, 30))
    centre = _world(geometry)[40, 25, 15]
    mask = _ellipsoid(geometry, centre, semi_axes)
    mesh = la_surface(mask, geometry, smoothing_iterations=20)
    measures = size_and_shape(_world(geometry)[mask], geometry.voxel_volume_mm3, mesh, None)
    assert measures["mesh_volume_ml"] == pytest.approx(4 / 3 * np.pi * semi_axes.prod() / 1000, rel=0.02)
    diameters = [measures[f"diameter_{i}_mm"] for i in (1, 2, 3)]
    np.testing.assert_allclose(diameters, 2 * semi_axes, rtol=0.05)
    assert measures["sphericity"] < 0.95


def _sphere_with_patches(radius: float = 15.0):
    """A sphere of blood (100) in a dark wall (30), with a cap of dense scar (IIR 1.5) over 30 % of its area
    and a belt of fibrosis below dense scar (IIR 1.25) over 20 % (a cap above height h holds (R - h) / 2R of a
    sphere's area): image, mask, geometry and each voxel's height above the centre (mm)."""
    geometry = _grid((60, 54, 36), spacing=(0.8, 0.8, 1.2))
    world = _world(geometry)
    offset = world - world[30, 27, 18]
    distance = np.linalg.norm(offset, axis=-1)
    mask = distance <= radius
    image = np.full(geometry.shape, 20.0, dtype=np.float32)
    wall = (distance > radius) & (distance <= radius + 3.0)
    image[mask], image[wall] = 100.0, 30.0
    height = offset[..., 2] / np.maximum(distance, 1e-6)  # z / r: the cap and belt bounds on every shell
    image[wall & (height > 0.4)] = 150.0
    image[wall & (height < -0.6)] = 125.0
    return image, mask, geometry, offset[..., 2]


def _shares(image, mask, geometry, shading: str = "quadratic") -> tuple[float, float]:
    """(fibrosis, dense scar) % of the wall, as analyse measures them."""
    pool = measure_blood_pool(image, mask, geometry.spacing, BloodPool(shading=shading))
    mesh = la_surface(mask, geometry, smoothing_iterations=20)
    iir = wall_iir(image, np.linalg.inv(voxel_to_world(geometry)), mesh, Shell(), pool)
    areas = vertex_areas(mesh)
    return enhanced_percent(iir, areas, Thresholds().fibrosis), enhanced_percent(iir, areas, 1.32)


def test_a_wall_with_known_patches_gives_their_area_shares():
    image, mask, geometry, _ = _sphere_with_patches()
    assert measure_blood_pool(image, mask, geometry.spacing, BloodPool()).mean == pytest.approx(100.0)
    for shading in ("quadratic", "none"):  # nothing to fit in a uniform pool: the same shares
        fibrosis, dense = _shares(image, mask, geometry, shading)
        assert dense == pytest.approx(30.0, abs=3.0)
        assert fibrosis == pytest.approx(50.0, abs=3.0)
    assert utah_stage(fibrosis) == "IV"
    assert [utah_stage(p) for p in (0.0, 9.9, 10.0, 19.9, 20.0, 29.9, 30.0)] == [
        "I",
        "I",
        "II",
        "II",
        "III",
        "III",
        "IV",
    ]


def test_coil_shading_across_the_atrium_is_fitted_out_of_the_blood_pool_reference():
    """Shading from 0.8 below the sphere to 1.25 above it (as receiver coils shade an image): the single pool
    mean loses the fibrosis belt (1.25 x 0.8) and counts shaded blood as enhanced; the fitted one does not."""
    image, mask, geometry, height = _sphere_with_patches()
    shaded = image * np.exp(np.log(1.25) * height / 18.0).astype(np.float32)
    fibrosis, dense = _shares(shaded, mask, geometry)
    assert fibrosis == pytest.approx(50.0, abs=3.0) and dense == pytest.approx(30.0, abs=3.0)
    single_mean = _shares(shaded, mask, geometry, "none")
    assert abs(single_mean[0] - 50.0) > 5.0 or abs(single_mean[1] - 30.0) > 5.0


def _rows(out: Path) -> list[dict]:
    return json.loads((out / "analysis.json").read_text())["cases"]


def _read_vtk(path: Path) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Points, triangles and point arrays as VTK's own legacy reader (Slicer's, ParaView's) reads them."""
    reader = vtkPolyDataReader()
    reader.SetFileName(str(path))
    reader.Update()
    polydata = reader.GetOutput()
    arrays = polydata.GetPointData()
    named = {
        arrays.GetArrayName(i): vtk_to_numpy(arrays.GetArray(i)) for i in range(arrays.GetNumberOfArrays())
    }
    triangles = vtk_to_numpy(polydata.GetPolys().GetConnectivityArray()).reshape(-1, 3)
    return vtk_to_numpy(polydata.GetPoints().GetData()), triangles, named


def test_written_surfaces_open_in_vtk_in_lps_with_their_iir(tmp_path):
    geometry = _grid((30, 30, 20))
    mask = _ellipsoid(geometry, _world(geometry)[15, 15, 10], 8.0)
    mesh = la_surface(mask, geometry, smoothing_iterations=5)
    iir = np.linspace(0.5, 2.0, len(mesh.vertices))
    write_vtk(tmp_path / "case.vtk", mesh, {"IIR": iir}, "la-seg test")
    write_stl(tmp_path / "case.stl", mesh)
    points, triangles, arrays = _read_vtk(tmp_path / "case.vtk")
    np.testing.assert_allclose(points, mesh.vertices * RAS_TO_LPS, atol=1e-4)
    np.testing.assert_array_equal(triangles, mesh.faces)
    np.testing.assert_allclose(arrays["IIR"], iir, rtol=1e-6)
    assert b"SPACE=LPS" in (tmp_path / "case.vtk").read_bytes()[:300]
    reader = vtkSTLReader()
    reader.SetFileName(str(tmp_path / "case.stl"))
    reader.Update()
    assert reader.GetOutput().GetNumberOfPolys() == len(mesh.faces)
    assert (tmp_path / "case.stl").read_bytes()[:80].strip().endswith(b"SPACE=LPS")
    stl = trimesh.load(tmp_path / "case.stl")
    assert stl.volume == pytest.approx(mesh.volume, rel=1e-4)  # outward normals after the LPS flip too
    np.testing.assert_allclose(np.sort(stl.bounds * RAS_TO_LPS, axis=0), mesh.bounds, atol=1e-4)


def _ply_vertex_properties(path: Path) -> dict[str, np.ndarray]:
    """The vertex element's float properties of a binary little-endian PLY, read from its header."""
    data = path.read_bytes()
    end = data.index(b"end_header\n") + len(b"end_header\n")
    header = data[:end].decode("ascii").splitlines()
    vertex = header.index(next(line for line in header if line.startswith("element vertex")))
    count = int(header[vertex].split()[2])
    names = []
    for line in header[vertex + 1 :]:
        if not line.startswith("property float "):
            break
        names.append(line.split()[2])
    table = np.frombuffer(data, dtype=[(name, "<f4") for name in names], count=count, offset=end)
    return {name: table[name] for name in names}


def test_the_ply_surface_opens_in_vtk_in_lps_with_its_iir(tmp_path):
    geometry = _grid((30, 30, 20))
    mesh = la_surface(
        _ellipsoid(geometry, _world(geometry)[15, 15, 10], 8.0), geometry, smoothing_iterations=5
    )
    iir = np.linspace(0.5, 2.0, len(mesh.vertices))
    write_ply(tmp_path / "case.ply", mesh, {"IIR": iir})
    reader = vtkPLYReader()
    reader.SetFileName(str(tmp_path / "case.ply"))
    reader.Update()
    polydata = reader.GetOutput()
    comments = [reader.GetComments().GetValue(i) for i in range(reader.GetComments().GetNumberOfValues())]
    assert "SPACE=LPS" in comments  # where Slicer reads a PLY's coordinate system
    np.testing.assert_allclose(
        vtk_to_numpy(polydata.GetPoints().GetData()), mesh.vertices * RAS_TO_LPS, atol=1e-4
    )
    triangles = vtk_to_numpy(polydata.GetPolys().GetConnectivityArray()).reshape(-1, 3)
    np.testing.assert_array_equal(triangles, mesh.faces)
    properties = _ply_vertex_properties(tmp_path / "case.ply")
    np.testing.assert_allclose(properties["IIR"], iir, rtol=1e-6)
    np.testing.assert_allclose(
        np.stack([properties[a] for a in "xyz"], axis=1), mesh.vertices * RAS_TO_LPS, atol=1e-4
    )
    assert trimesh.load(tmp_path / "case.ply", process=False).volume == pytest.approx(mesh.volume, rel=1e-4)
    assert not list(tmp_path.glob("*.la-seg-tmp"))


def test_analyse_end_to_end_on_masks_that_predict_wrote(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_dataset(tmp_path / "data", cases=2, seed=77, shape=(40, 36, 9), spacing=(0.8, 0.8, 3.0))
    # untrained weights give probabilities near 0.415 everywhere: this threshold marks a blob, not nothing
    predict = ["predict", *TINY_CLI, "--untrained", "true", "--data.predict_root", "data"]
    main(
        [
            *predict,
            "--model.threshold",
            "0.41",
            "--writer.save_probabilities",
            "true",
            "--writer.output_dir",
            "masks",
        ]
    )
    main(["analyse", "--images", "data", "--masks", "masks", "--out", "analysis"])
    out = tmp_path / "analysis"
    lines = (out / "analysis.csv").read_text().splitlines()
    table = list(csv.DictReader(line for line in lines if not line.startswith("#")))
    assert (
        [row["case_id"] for row in table] == [row["case_id"] for row in _rows(out)] == ["train_1", "train_2"]
    )
    for row in _rows(out):
        mask = np.asarray(nib.load(tmp_path / "masks" / f"{row['case_id']}.nii.gz").dataobj)
        probability = np.asarray(nib.load(tmp_path / "masks" / f"{row['case_id']}_prob.nii.gz").dataobj)
        assert row["volume_ml"] == pytest.approx(mask.astype(bool).sum() * 0.8 * 0.8 * 3.0 / 1000)
        assert row["prob_volume_ml"] == pytest.approx(probability.sum() * 0.8 * 0.8 * 3.0 / 1000, rel=1e-4)
        assert row["review"]  # a mask of most of the volume touches its border
        assert len(_read_vtk(out / f"{row['case_id']}.vtk")[2]["IIR"]) == row["vertices"]
        assert len(_ply_vertex_properties(out / f"{row['case_id']}.ply")["IIR"]) == row["vertices"]
        for view in ("anterior", "posterior"):
            assert (out / f"{row['case_id']}_{view}.png").stat().st_size > 0
    text = (out / "analysis.csv").read_text()
    assert "# thresholds_iir: {'fibrosis': 1.2, 'dense_scar': 1.32}" in text
    assert "Khurram" in text and "shell_mm" in text
    assert not list(out.glob("*.la-seg-tmp"))
    capsys.readouterr()

    # the data set's own labels, other thresholds: written beside the results
    labels = ["analyse", "--images", "data", "--out", "labels", "--thresholds.fibrosis", "1.1"]
    main([*labels, *SMALL_POOL])
    assert "'fibrosis': 1.1," in (tmp_path / "labels" / "analysis.csv").read_text()


def test_analyse_with_a_checkpoint_runs_predict_first_and_analyses_its_masks(tmp_path, monkeypatch, capsys):
    """--ckpt_path: `la-seg predict` of a checkpoint a real fit wrote, into <out>/masks, then the analysis."""
    monkeypatch.chdir(tmp_path)
    write_dataset(tmp_path / "data", cases=6, seed=8, shape=(40, 36, 9), spacing=(0.8, 0.8, 3.0))
    short = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1", "--data.batch_size", "8"]
    main(["fit", *TINY_CLI, "--data.root", "data", *short])
    ckpt = next((tmp_path / "runs").glob("**/checkpoints/best.ckpt"))
    # a one-batch model is far from the LA: a low threshold gives predict a mask to analyse
    config = ["trainer: {accelerator: cpu, enable_progress_bar: false}", "data: {num_workers: 0}"]
    (tmp_path / "predict.yaml").write_text("\n".join([*config, "model: {threshold: 0.01}"]))
    analyse = ["analyse", "--images", "data", "--ckpt_path", str(ckpt), "--out", "analysis"]
    main([*analyse, "--predict_config", "predict.yaml"])
    out = tmp_path / "analysis"
    rows = _rows(out)
    assert [row["case_id"] for row in rows] == [f"train_{i}" for i in range(1, 7)]
    for row in rows:
        assert Path(row["mask_path"]).resolve() == out / "masks" / f"{row['case_id']}.nii.gz"
        mask = np.asarray(nib.load(out / "masks" / f"{row['case_id']}.nii.gz").dataobj)
        probability = np.asarray(nib.load(out / "masks" / f"{row['case_id']}_prob.nii.gz").dataobj)
        assert row["volume_ml"] == pytest.approx(mask.astype(bool).sum() * 0.8 * 0.8 * 3.0 / 1000)
        assert row["prob_volume_ml"] == pytest.approx(probability.sum() * 0.8 * 0.8 * 3.0 / 1000, rel=1e-4)
    assert (out / "masks" / "volumes.csv").is_file()
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main([*analyse, "--masks", "data"])
    assert "give --masks or --ckpt_path, not both" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("empty", "case train_1: the mask masks/train_1.nii.gz is empty: no LA to analyse"),
        ("grid", "has shape (40, 36, 8) but its reference"),
        ("pool", "too small to normalise the wall by"),
        ("inside", "--out data/analysis lies inside the input folder data"),
        ("exists", "analysis files exist"),
        ("missing", "case(s) of --images data have no mask in masks: ['train_1']"),
    ],
)
def test_bad_input_gives_one_clear_line(tmp_path, monkeypatch, capsys, case, message):
    monkeypatch.chdir(tmp_path)
    write_dataset(tmp_path / "data", cases=1, seed=5, shape=(40, 36, 9), spacing=(0.8, 0.8, 3.0))
    image = nib.load(tmp_path / "data" / "train_1" / "enhanced.nii.gz")
    label = np.asarray(nib.load(tmp_path / "data" / "train_1" / "atriumSegImgMO.nii.gz").dataobj) > 0
    (tmp_path / "masks").mkdir()
    mask = {"empty": np.zeros_like(label), "grid": label[..., :8], "pool": label & False}.get(case, label)
    if case == "pool":
        mask[20:23, 18:21, 4:6] = True  # an LA of a few voxels: no blood pool left after erosion
    name = "train_9" if case == "missing" else "train_1"
    nib.save(nib.Nifti1Image(mask.astype(np.uint8), image.affine), tmp_path / "masks" / f"{name}.nii.gz")
    out = "data/analysis" if case == "inside" else "out"
    command = ["analyse", "--images", "data", "--masks", "masks", "--out", out]
    if case == "exists":
        main([*command, *SMALL_POOL])
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main([*command, *([] if case == "pool" else SMALL_POOL)])
    error = capsys.readouterr().err.strip().splitlines()
    assert error[-1].startswith("la-seg: error: ") and message in error[-1], error


def test_help_names_analyse_and_every_input(capsys):
    for argv in (["--help"], ["analyse", "--help"]):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "analyse LA surface with its wall IIR map" in text
    assert "surface (.vtk and .ply with per-vertex IIR, .stl), pictures, analysis.{csv,json}." in text
    for option in ("--images", "--masks", "--ckpt_path", "--predict_config", "--shell.inner_mm"):
        assert option in text


# LAScarQS's 0.625 x 0.625 x 2.5 mm, a 100 mm field of view: on coarser grids a 2-3 mm wall blurs below the
# thresholds and analyse under-counts the patches (1 mm in-plane: 2-6 points)
PHANTOM = {"shape": (160, 160, 40), "spacing": (0.625, 0.625, 2.5)}


@pytest.fixture(scope="module")
def scar_phantoms(tmp_path_factory) -> tuple[Path, list[float]]:
    """Three phantoms with wall patches over 10-30 % of the wall, and their true shares (%)."""
    root = tmp_path_factory.mktemp("scar") / "data"
    write_dataset(root, cases=3, seed=0, scar=0.2, **PHANTOM)
    return root, [100 * case_scar_fraction(0, i, scar=0.2, **PHANTOM) for i in (1, 2, 3)]


def _analysed(images: Path, out: Path, masks: Path | None = None) -> list[tuple[float, float]]:
    """(fibrosis %, dense scar %) per case as `la-seg analyse` measures them."""
    main(["analyse", "--images", str(images), "--out", str(out), *(["--masks", str(masks)] if masks else [])])
    return [(row["fibrosis_percent"], row["dense_scar_percent"]) for row in _rows(out)]


def test_phantom_wall_patches_measure_as_their_true_share_on_the_true_mask(tmp_path, scar_phantoms):
    root, truth = scar_phantoms
    for true, (fibrosis, dense) in zip(truth, _analysed(root, tmp_path / "out"), strict=True):
        assert fibrosis == pytest.approx(true, abs=3.0)
        assert dense == pytest.approx(true, abs=3.0)  # the patches are dense scar throughout


@pytest.mark.parametrize("change", [binary_erosion, binary_dilation])
def test_phantom_wall_patches_measure_within_5_points_on_a_mask_a_voxel_off(tmp_path, scar_phantoms, change):
    """A stand-in for a predicted mask: the true mask eroded or dilated by one voxel (2.5 mm across the
    slices), about a good model's boundary error; a tiny model trained in a test segments far worse."""
    root, truth = scar_phantoms
    masks = tmp_path / "masks"
    masks.mkdir()
    for case in sorted(root.iterdir()):
        label = nib.load(case / "atriumSegImgMO.nii.gz")
        changed = change(np.asarray(label.dataobj) > 0, generate_binary_structure(3, 1))
        nib.save(nib.Nifti1Image(changed.astype(np.uint8), label.affine), masks / f"{case.name}.nii.gz")
    for true, (fibrosis, _) in zip(truth, _analysed(root, tmp_path / "out", masks), strict=True):
        assert fibrosis == pytest.approx(true, abs=5.0)
