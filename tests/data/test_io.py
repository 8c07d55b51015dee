"""Reading and writing volumes: geometry kept, labels binarised, bad files refused with the file named."""

import os
from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np
import pytest

from la_seg.data import Case, DataError, Geometry, find_cases, read_case, read_image, read_label, write_nifti
from la_seg.data.io import _NRRD_TYPES, _nrrd_dtype, check_header

AFFINE = np.array(
    [
        [0.0, -0.625, 0.0, 120.5],
        [0.625, 0.0, 0.0, -80.25],
        [0.0, 0.0, 2.5, 33.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
)


def _save(path: Path, data: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def _pair(tmp_path: Path, label_shape=(6, 5, 4), label_affine=AFFINE) -> Case:
    image = _save(tmp_path / "enhanced.nii.gz", np.arange(120, dtype=np.int16).reshape(6, 5, 4))
    label = np.zeros(label_shape, np.uint16)
    label[2:4, 1:3, 1:3] = 420
    return Case("c", image, _save(tmp_path / "atriumSegImgMO.nii.gz", label, label_affine))


def test_read_image_keeps_geometry_and_casts_to_float32(tmp_path):
    data = np.arange(120, dtype=np.int16).reshape(6, 5, 4)
    volume = read_image(_save(tmp_path / "img.nii.gz", data))
    assert volume.data.dtype == np.float32
    np.testing.assert_array_equal(volume.data, data)
    np.testing.assert_allclose(volume.geometry.affine, AFFINE)
    assert volume.geometry.affine.dtype == np.float64
    assert volume.geometry.spacing == pytest.approx((0.625, 0.625, 2.5))
    assert volume.geometry.source == tmp_path / "img.nii.gz"


def test_read_image_keeps_nan(tmp_path):
    data = np.ones((3, 3, 2), np.float64)
    data[1, 1, 1] = np.nan
    volume = read_image(_save(tmp_path / "nan.nii", data))
    assert np.isnan(volume.data[1, 1, 1]) and np.isnan(volume.data).sum() == 1


def test_read_label_binarises(tmp_path):
    data = np.array([0, 1, 255, 420], np.uint16).reshape(2, 2, 1)
    volume = read_label(_save(tmp_path / "lab.nii.gz", data))
    assert volume.data.dtype == np.uint8
    np.testing.assert_array_equal(volume.data.ravel(), [0, 1, 1, 1])


def test_spacing_override_keeps_the_file_affine(tmp_path):
    """Measurements use the override; the affine stays the file's so written masks overlay the image."""
    path = _save(tmp_path / "img.nii.gz", np.zeros((3, 3, 3), np.float32))
    volume = read_image(path, spacing=(1.0, 2.0, 3.0))
    assert volume.geometry.spacing == (1.0, 2.0, 3.0) and volume.geometry.spacing_source == "data.spacing"
    np.testing.assert_allclose(volume.geometry.affine, AFFINE)


def test_truncated_nifti_names_the_file(tmp_path):
    path = _save(tmp_path / "enhanced.nii.gz", np.random.default_rng(0).normal(size=(20, 20, 10)))
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataError, match="enhanced.nii.gz"):
        read_image(path)


def test_garbage_file_names_the_file(tmp_path):
    path = tmp_path / "broken.nii.gz"
    path.write_bytes(b"this is not gzip at all")
    with pytest.raises(DataError, match="broken.nii.gz"):
        read_image(path)
    raw = tmp_path / "broken.nii"
    raw.write_bytes(b"\x00" * 10)
    with pytest.raises(DataError, match="broken.nii"):
        read_label(raw)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="does not exist.*ghost.nii.gz"):
        read_image(tmp_path / "ghost.nii.gz")


def test_2d_array_refused(tmp_path):
    path = _save(tmp_path / "slice.nii.gz", np.zeros((8, 8), np.float32))
    with pytest.raises(DataError, match=r"slice.nii.gz is 2D \(shape \(8, 8\)\)"):
        read_image(path)


def test_4d_series_refused(tmp_path):
    path = _save(tmp_path / "cine.nii.gz", np.zeros((4, 4, 3, 5), np.float32))
    with pytest.raises(DataError, match=r"cine.nii.gz is 4D.*\(4, 4, 3, 5\)"):
        read_image(path)


def test_trailing_singleton_squeezed(tmp_path):
    data = np.arange(48, dtype=np.float32).reshape(4, 4, 3, 1)
    volume = read_image(_save(tmp_path / "vol.nii.gz", data))
    assert volume.data.shape == (4, 4, 3)
    np.testing.assert_array_equal(volume.data, data[..., 0])
    assert volume.geometry.spacing == pytest.approx((0.625, 0.625, 2.5))


def test_read_case_pair(tmp_path):
    image, label = read_case(_pair(tmp_path))
    assert image.data.shape == label.data.shape == image.geometry.shape == (6, 5, 4)
    assert label.data.sum() == 8 and label.data.max() == 1


def test_read_case_without_label(tmp_path):
    case = _pair(tmp_path)
    image, label = read_case(Case("c", case.image_path))
    assert label is None and image.data.shape == (6, 5, 4)


def test_read_case_shape_mismatch_names_both_files(tmp_path):
    with pytest.raises(DataError, match=r"enhanced.nii.gz.*\(6, 5, 4\).*atriumSegImgMO.nii.gz.*\(6, 5, 3\)"):
        read_case(_pair(tmp_path, label_shape=(6, 5, 3)))


def test_read_case_affine_mismatch_names_both_files(tmp_path):
    shifted = AFFINE.copy()
    shifted[0, 3] += 1.0
    with pytest.raises(DataError, match="enhanced.nii.gz and label .*atriumSegImgMO.nii.gz have different"):
        read_case(_pair(tmp_path, label_affine=shifted))


def test_read_case_tolerates_float_noise_in_affine(tmp_path):
    nudged = AFFINE.copy()
    nudged[:3, 3] += 1e-5
    read_case(_pair(tmp_path, label_affine=nudged))


def test_nrrd_affine_from_lps_header(tmp_path):
    path = tmp_path / "lgemri.nrrd"
    directions = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 2.0]])
    header = {"space": "LPS", "space directions": directions, "space origin": [10.0, 20.0, 30.0]}
    data = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    nrrd.write(str(path), data, header)
    volume = read_image(path)
    np.testing.assert_array_equal(volume.data, data)  # (X, Y, Z) order like nibabel
    expected = np.array([[-1.0, 0, 0, -10.0], [0, -1.0, 0, -20.0], [0, 0, 2.0, 30.0], [0, 0, 0, 1]])
    np.testing.assert_allclose(volume.geometry.affine, expected)  # LPS -> RAS
    assert volume.geometry.spacing == (1.0, 1.0, 2.0)


NRRD_TYPE_NAMES = [*_NRRD_TYPES, "int8_t", "uint16_t", "uint64_t"]  # the spec allows a "_t" suffix


@pytest.mark.parametrize("endian", ["little", "big"])
@pytest.mark.parametrize("name", NRRD_TYPE_NAMES)
def test_nrrd_voxel_types_read_as_pynrrd_reads_them(tmp_path, name, endian):
    """la-seg names the voxel type from the header alone (to refuse oversized volumes before reading):
    every type name of the NRRD format gives the dtype and values that pynrrd's reader gives."""
    path = tmp_path / "scan.nrrd"
    header = f"NRRD0004\ntype: {name}\ndimension: 3\nsizes: 2 2 2\nspacings: 1 1 1\nencoding: raw\n"
    voxels = np.random.default_rng(0).integers(0, 100, 64, dtype=np.uint8).tobytes()
    for width in (1, 2, 4, 8):  # the voxel size is whatever pynrrd reads without a size mismatch
        path.write_bytes(f"{header}endian: {endian}\n\n".encode() + voxels[: 8 * width])
        try:
            expected, _ = nrrd.read(str(path))
            break
        except nrrd.NRRDError:
            continue
    assert _nrrd_dtype(nrrd.read_header(str(path)), path) == expected.dtype
    np.testing.assert_array_equal(read_image(path).data, expected.astype(np.float32))


def test_nrrd_space_with_permuted_axes_is_refused(tmp_path):
    """A world space lists x, y, z in order; 'posterior-left-superior' would need its axes swapped."""
    path = tmp_path / "scan.nrrd"
    header = {"space": "posterior-left-superior", "space directions": np.eye(3)}
    nrrd.write(str(path), np.zeros((2, 2, 2), np.int16), header)
    with pytest.raises(DataError, match="scan.nrrd has an unknown NRRD space 'posterior-left-superior'"):
        read_image(path)


def test_nrrd_without_directions_uses_spacings(tmp_path):
    path = tmp_path / "laendo.nrrd"
    nrrd.write(str(path), np.full((3, 3, 2), 255, np.uint8), {"spacings": [0.5, 0.5, 1.5]})
    volume = read_label(path)
    np.testing.assert_allclose(volume.geometry.affine, np.diag([0.5, 0.5, 1.5, 1.0]))
    assert volume.geometry.spacing == (0.5, 0.5, 1.5) and volume.data.min() == 1


def test_utah_case_gets_true_spacing(tmp_path):
    header = {"space": "left-posterior-superior", "space directions": np.eye(3), "space origin": [0.0] * 3}
    folder = tmp_path / "Training Set" / "ABC"
    folder.mkdir(parents=True)
    nrrd.write(str(folder / "lgemri.nrrd"), np.ones((4, 4, 2), np.uint8), header)
    nrrd.write(str(folder / "laendo.nrrd"), np.full((4, 4, 2), 255, np.uint8), header)
    image, label = read_case(find_cases(tmp_path)[0])
    assert image.geometry.spacing == label.geometry.spacing == (0.625, 0.625, 0.625)
    assert image.geometry.spacing_source.startswith("utah2018")
    np.testing.assert_allclose(image.geometry.affine, np.diag([-1.0, -1.0, 1.0, 1.0]))  # the header's own
    assert label.data.min() == 1


def test_corrupt_nrrd_names_the_file(tmp_path):
    path = tmp_path / "lgemri.nrrd"
    path.write_text("NRRD0004\ntype: what\n\n")
    with pytest.raises(DataError, match="lgemri.nrrd"):
        read_image(path)


def test_write_nifti_roundtrip(tmp_path):
    (tmp_path / "in").mkdir()
    reference = read_image(_save(tmp_path / "in" / "in.nii.gz", np.zeros((6, 5, 4), np.float32)))
    mask = np.zeros((6, 5, 4), np.uint8)
    mask[1:3, 2, 0] = 1
    out = tmp_path / "out" / "nested" / "mask.nii.gz"
    write_nifti(out, mask, reference.geometry)
    image = nib.load(out)
    assert image.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asanyarray(image.dataobj), mask)
    np.testing.assert_allclose(image.affine, AFFINE)
    assert int(image.header["qform_code"]) == 1 and int(image.header["sform_code"]) == 1
    np.testing.assert_allclose(image.get_qform(), AFFINE, atol=1e-5)
    assert sorted(p.name for p in out.parent.iterdir()) == ["mask.nii.gz"]  # no temp file left behind


@pytest.mark.parametrize("dtype", [np.float32, np.int16, np.uint16, np.float64])
def test_write_nifti_keeps_dtype(tmp_path, dtype):
    reference = Geometry((3, 3, 2), np.eye(4), (1.0, 1.0, 1.0), tmp_path / "ref.nii.gz")
    data = np.arange(18).reshape(3, 3, 2).astype(dtype)
    write_nifti(tmp_path / "x.nii", data, reference)
    image = nib.load(tmp_path / "x.nii")
    assert image.get_data_dtype() == dtype
    np.testing.assert_array_equal(np.asanyarray(image.dataobj), data)


def test_write_nifti_bool_becomes_uint8(tmp_path):
    reference = Geometry((3, 3, 2), np.eye(4), (1.0, 1.0, 1.0), tmp_path / "ref.nii.gz")
    write_nifti(tmp_path / "b.nii.gz", np.ones((3, 3, 2), bool), reference)
    assert nib.load(tmp_path / "b.nii.gz").get_data_dtype() == np.uint8


def test_write_nifti_is_reproducible_and_replaces(tmp_path):
    reference = Geometry((3, 3, 2), AFFINE, (0.625, 0.625, 2.5), tmp_path / "ref.nii.gz")
    first, second = tmp_path / "a.nii.gz", tmp_path / "b.nii.gz"
    write_nifti(first, np.ones((3, 3, 2), np.uint8), reference)
    os.utime(first, (0, 0))
    write_nifti(second, np.ones((3, 3, 2), np.uint8), reference)
    assert first.read_bytes() == second.read_bytes()
    write_nifti(first, np.zeros((3, 3, 2), np.uint8), reference)
    assert np.asanyarray(nib.load(first).dataobj).max() == 0


def test_write_nifti_from_utah_reference_overlays_the_image(tmp_path):
    """A mask written for a Utah image keeps the image's header affine, so viewers overlay the two."""
    source = tmp_path / "in" / "lgemri.nrrd"
    source.parent.mkdir()
    nrrd.write(str(source), np.zeros((4, 4, 2), np.int16), {"spacings": [1.0, 1.0, 1.0]})
    reference = read_image(source).geometry
    assert reference.spacing == (0.625, 0.625, 0.625)
    write_nifti(tmp_path / "pred.nii.gz", np.ones((4, 4, 2), np.uint8), reference)
    written = nib.load(tmp_path / "pred.nii.gz")
    np.testing.assert_allclose(written.affine, np.eye(4))


def test_write_nifti_refuses_bad_targets(tmp_path):
    (tmp_path / "in").mkdir()
    source = _save(tmp_path / "in" / "in.nii.gz", np.zeros((3, 3, 2), np.float32))
    reference = read_image(source).geometry
    before = source.read_bytes()
    with pytest.raises(DataError, match="is the input .* never writes into its input"):
        write_nifti(source, np.ones((3, 3, 2), np.uint8), reference)
    with pytest.raises(DataError, match="the folder of the input .* never writes into its input"):
        write_nifti(tmp_path / "in" / "beside.nii.gz", np.ones((3, 3, 2), np.uint8), reference)
    assert source.read_bytes() == before and sorted((tmp_path / "in").iterdir()) == [source]
    with pytest.raises(DataError, match="must end with .nii"):
        write_nifti(tmp_path / "out" / "out.nrrd", np.ones((3, 3, 2), np.uint8), reference)
    with pytest.raises(DataError, match="does not match the reference grid"):
        write_nifti(tmp_path / "out" / "out.nii.gz", np.ones((3, 3, 3), np.uint8), reference)


def test_write_nifti_failure_leaves_no_temp_file(tmp_path, monkeypatch):
    reference = Geometry((3, 3, 2), np.eye(4), (1.0, 1.0, 1.0), tmp_path / "ref.nii.gz")

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        write_nifti(tmp_path / "out" / "x.nii.gz", np.zeros((3, 3, 2), np.uint8), reference)
    assert list((tmp_path / "out").iterdir()) == []


# Bad data is refused up front, naming the file.


def _stored_gzip(path: Path, image: nib.Nifti1Image) -> Path:
    """A .nii.gz of stored (uncompressed) deflate blocks: a flipped payload byte stays valid deflate, so
    only gzip's CRC can notice it."""
    import gzip

    path.write_bytes(gzip.compress(image.to_bytes(), compresslevel=0))
    return path


def test_flipped_bytes_inside_nii_gz_are_refused(tmp_path):
    image = nib.Nifti1Image(np.arange(4000, dtype=np.int16).reshape(20, 20, 10), AFFINE)
    path = _stored_gzip(tmp_path / "enhanced.nii.gz", image)
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    path.write_bytes(bytes(blob))
    assert np.asanyarray(nib.load(path).dataobj).shape == (20, 20, 10)  # nibabel alone accepts it
    with pytest.raises(DataError, match="enhanced.nii.gz.*CRC"):
        read_image(path)


def test_intact_stored_gzip_reads(tmp_path):
    data = np.arange(4000, dtype=np.int16).reshape(20, 20, 10)
    volume = read_image(_stored_gzip(tmp_path / "ok.nii.gz", nib.Nifti1Image(data, AFFINE)))
    np.testing.assert_array_equal(volume.data, data)


def test_nifti2_gz_reads(tmp_path):
    data = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    path = tmp_path / "n2.nii.gz"
    nib.save(nib.Nifti2Image(data, AFFINE), path)
    volume = read_image(path)
    np.testing.assert_array_equal(volume.data, data)
    np.testing.assert_allclose(volume.geometry.affine, AFFINE)


@pytest.mark.parametrize("pixdim", [[0.0, 1.0, 1.0], [1.0, -1.0, 1.0], [1.0, 1.0, np.nan]])
def test_bad_nifti_voxel_size_refused(tmp_path, pixdim):
    image = nib.Nifti1Image(np.zeros((4, 4, 3), np.int16), np.eye(4))
    image.header["pixdim"][1:4] = pixdim
    path = tmp_path / "bad.nii.gz"
    nib.save(image, path)
    with pytest.raises(DataError, match="bad.nii.gz has voxel spacing"):
        read_image(path)


@pytest.mark.parametrize("column", [np.zeros(3), np.array([0.0, 0.0, np.inf])])
def test_degenerate_sform_refused(tmp_path, column):
    image = nib.Nifti1Image(np.zeros((4, 4, 3), np.int16), np.eye(4))
    sform = np.eye(4)
    sform[:3, 1] = column
    image.set_sform(sform, code=1)
    path = tmp_path / "sform.nii"
    nib.save(image, path)
    with pytest.raises(DataError, match="sform.nii has a (degenerate|non-finite)"):
        read_image(path)


def test_nifti_without_qform_or_sform_warns_naming_the_file(tmp_path):
    image = nib.Nifti1Image(np.zeros((4, 4, 3), np.int16), None)
    image.header.set_qform(None, code=0)
    image.header.set_sform(None, code=0)
    path = tmp_path / "noorient.nii.gz"
    nib.save(image, path)
    assert int(nib.load(path).header["qform_code"]) == int(nib.load(path).header["sform_code"]) == 0
    with pytest.warns(UserWarning, match="noorient.nii.gz has neither qform nor sform"):
        read_image(path)


@pytest.mark.parametrize(
    "header",
    [
        {"space": "RAS", "space directions": np.diag([1.0, 0.0, 1.0])},
        {"space": "RAS", "space directions": np.array([[1.0, 0, 0], [2.0, 0, 0], [0, 0, 1.0]])},
        {"spacings": [1.0, 0.0, 1.0]},
        {},
    ],
    ids=["zero-direction", "parallel-directions", "zero-spacing", "no-spacing-info"],
)
def test_bad_nrrd_geometry_refused(tmp_path, header):
    path = tmp_path / "scan.nrrd"
    nrrd.write(str(path), np.zeros((4, 4, 3), np.int16), header)
    with pytest.raises(DataError, match="scan.nrrd (has voxel spacing|has a degenerate|has neither)"):
        read_image(path)


def test_label_with_float_noise_refused(tmp_path):
    path = _save(tmp_path / "noisy.nii.gz", np.full((4, 4, 3), 1e-6, np.float32))
    with pytest.raises(DataError, match="noisy.nii.gz holds non-integer values"):
        read_label(path)


def test_float_label_with_integer_values_reads(tmp_path):
    data = np.zeros((4, 4, 3), np.float32)
    data[1, 1, 1] = 420.0
    volume = read_label(_save(tmp_path / "float.nii.gz", data), label_values=[420])
    assert volume.data.sum() == 1


@pytest.mark.parametrize(
    "dtype",
    [np.complex64, np.dtype([("R", "u1"), ("G", "u1"), ("B", "u1")])],
    ids=["complex", "rgb"],
)
def test_non_scalar_voxels_refused(tmp_path, dtype):
    path = tmp_path / "odd.nii"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 3), dtype), np.eye(4)), path)
    with pytest.raises(DataError, match=r"odd.nii has voxel type .*(complex|\('R')"):
        read_image(path)


def test_huge_header_refused_before_allocating(tmp_path):
    """A 24-byte payload whose header claims 30000^3 float32 voxels: refused from the header alone."""
    header = nib.Nifti1Header()
    header.set_data_shape((30000, 30000, 30000))
    header.set_data_dtype(np.float32)
    header.set_sform(np.eye(4), code=1)
    path = tmp_path / "huge.nii"
    path.write_bytes(header.binaryblock + b"\x00" * 28)
    with pytest.raises(DataError, match=r"huge.nii claims shape \(30000, 30000, 30000\).*GiB"):
        read_image(path)


def test_label_values_select_the_la_and_warn_about_the_rest(tmp_path):
    data = np.zeros((4, 4, 3), np.uint16)
    data[0, 0, 0], data[1, 1, 1], data[2, 2, 2] = 420, 420, 1  # LA and scar, as in LAScarQS task 1
    path = _save(tmp_path / "multi.nii.gz", data)
    with pytest.warns(UserWarning, match=r"multi.nii.gz: values \[1\] are not LA values \[420\]"):
        assert read_label(path, label_values=[420]).data.sum() == 2
    assert read_label(path, label_values=[420, 1]).data.sum() == 3
    assert read_label(path).data.sum() == 3  # None: every non-zero value


def test_label_without_the_selected_values_refused(tmp_path):
    data = np.zeros((4, 4, 3), np.uint8)
    data[1, 1, 1] = 1
    path = _save(tmp_path / "ones.nii.gz", data)
    with pytest.raises(DataError, match=r"ones.nii.gz holds none of the LA values \[420\].*label_values"):
        read_label(path, label_values=[420])
    assert read_label(_save(tmp_path / "empty.nii.gz", data * 0), label_values=[420]).data.sum() == 0


def test_read_case_uses_the_case_label_values(tmp_path):
    case = _pair(tmp_path)
    label = nib.load(case.label_path).get_fdata()
    _, binary = read_case(Case("c", case.image_path, case.label_path, label_values=(420,)))
    np.testing.assert_array_equal(binary.data, label == 420)


@pytest.mark.parametrize("name", ["lgemri.nrrd", "laendo.nrrd"])
def test_utah_spacing_by_file_name_in_any_layout(tmp_path, name):
    """A lone Utah file (files layout, or given directly) gets 0.625 mm, not its header's 1 mm."""
    directions = np.diag([-1.0, -1.0, 1.0])
    header = {"space": "left-posterior-superior", "space directions": directions, "space origin": [5.0, 6, 7]}
    path = tmp_path / name
    nrrd.write(str(path), np.full((4, 4, 3), 255, np.uint8), header)
    (case,) = find_cases(path)
    volume = read_label(case.image_path)
    assert volume.geometry.spacing == (0.625, 0.625, 0.625)
    assert "true 0.625 mm" in volume.geometry.spacing_source
    ras = [[1, 0, 0, -5], [0, 1, 0, -6], [0, 0, 1, 7], [0, 0, 0, 1]]  # LPS header in RAS, not rescaled
    np.testing.assert_allclose(volume.geometry.affine, ras)


@pytest.mark.parametrize("name", ["lgemri.nrrd", "laendo.nrrd"])
def test_utah_file_whose_header_holds_no_spacing_gets_the_true_spacing(tmp_path, name):
    """The challenge's own files: type, dimension, sizes, encoding; no space directions, no spacings."""
    path = tmp_path / name
    nrrd.write(str(path), np.full((4, 4, 3), 255, np.uint8), {"encoding": "gzip"})
    assert not {"space directions", "spacings"} & set(nrrd.read_header(str(path)))
    geometry = check_header(path)
    assert geometry.spacing == (0.625, 0.625, 0.625) and geometry.spacing_source.startswith("utah2018")


def test_other_file_without_spacing_names_the_option_and_takes_it(tmp_path):
    path = tmp_path / "scan.nrrd"
    nrrd.write(str(path), np.zeros((4, 4, 3), np.int16), {"encoding": "gzip"})
    with pytest.raises(DataError, match=r"scan.nrrd has neither .* --data.spacing '\[x, y, z\]'"):
        check_header(path)
    geometry = check_header(path, spacing=(0.7, 0.7, 2.0))
    assert geometry.spacing == (0.7, 0.7, 2.0) and geometry.spacing_source == "data.spacing"


def test_utah_name_with_other_header_spacing_is_kept(tmp_path):
    """Only the 1 mm headers of the challenge release are wrong; a resampled file keeps its own spacing."""
    path = tmp_path / "lgemri.nrrd"
    nrrd.write(str(path), np.zeros((4, 4, 3), np.int16), {"spacings": [0.8, 0.8, 2.0]})
    geometry = read_image(path).geometry
    assert geometry.spacing == (0.8, 0.8, 2.0) and geometry.spacing_source == "header"


def test_flipped_bytes_inside_gzip_nrrd_are_refused(tmp_path):
    path = tmp_path / "lgemri.nrrd"
    data = np.arange(4000, dtype=np.int16).reshape(20, 20, 10)
    nrrd.write(str(path), data, {"encoding": "gzip", "spacings": [1.0, 1.0, 2.5]}, compression_level=0)
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    path.write_bytes(bytes(blob))
    with pytest.raises(DataError, match="lgemri.nrrd.*incorrect data check"):
        read_image(path)


def test_voxel_volume_is_the_determinant_scaled_to_the_spacing(tmp_path):
    sheared = np.diag([1.6, 1.6, 4.0, 1.0])
    sheared[0, 2] = 2.0
    norms = tuple(float(n) for n in np.linalg.norm(sheared[:3, :3], axis=0))
    geometry = Geometry((4, 4, 4), sheared, norms, tmp_path / "s.nii.gz")
    assert geometry.voxel_volume_mm3 == pytest.approx(abs(np.linalg.det(sheared[:3, :3])))
    assert geometry.voxel_volume_mm3 < np.prod(norms)  # the column norms overstate it
    square = Geometry((4, 4, 4), np.diag([1.0, 1.0, 1.0, 1.0]), (0.625, 0.625, 0.625), tmp_path / "u.nrrd")
    assert square.voxel_volume_mm3 == pytest.approx(0.625**3)  # an override (Utah) scales it


def test_sheared_header_warns_naming_the_file(tmp_path):
    sheared = np.diag([1.6, 1.6, 4.0, 1.0])
    sheared[1, 2] = 1.0
    path = _save(tmp_path / "tilted.nii.gz", np.zeros((4, 4, 3), np.float32), sheared)
    with pytest.warns(UserWarning, match="tilted.nii.gz has non-orthogonal"):
        read_image(path)


@pytest.mark.parametrize("space", ["scanner-xyz", "3D-right-handed"])
def test_nrrd_space_without_anatomical_frame_warns(tmp_path, space):
    path = tmp_path / "scan.nrrd"
    nrrd.write(str(path), np.zeros((4, 4, 3), np.int16), {"space": space, "space directions": np.eye(3)})
    with pytest.warns(UserWarning, match="no anatomical frame"):
        assert read_image(path).geometry.spacing == (1.0, 1.0, 1.0)
