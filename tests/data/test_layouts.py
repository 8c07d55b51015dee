"""find_cases on tiny trees in every supported layout, including the messes real downloads contain."""

import os
import warnings
from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np
import pytest

from la_seg.data import Case, DataError, find_cases
from la_seg.data.layouts import LA_VALUES, LAYOUTS


def _nifti(path: Path, value: int = 1) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.full((4, 4, 3), value, np.uint16), np.eye(4)), path)
    return path


def _nrrd(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nrrd.write(str(path), np.zeros((4, 4, 3), np.uint8), {"spacings": [1.0, 1.0, 1.0]})
    return path


def _lascarqs(root: Path) -> Path:
    """Task 2 and task 1 of a release whose top folder has a release-specific name; folder names clash."""
    release = root / "LAScarQS2022_v2"
    for task, n in (("task2", 3), ("task1", 2)):
        for i in range(1, n + 1):
            folder = release / task / "train_data" / f"train_{i}"
            _nifti(folder / "enhanced.nii.gz")
            _nifti(folder / "atriumSegImgMO.nii.gz", 420)
            if task == "task1":
                _nifti(folder / "scarSegImgM.nii.gz")
    return root


def _utah(root: Path) -> Path:
    for case in ("0RZDK210BSMWAA6467LU", "1D7CUD1955YZPGK8XHJX"):
        _nrrd(root / "Training Set" / case / "lgemri.nrrd")
        _nrrd(root / "Training Set" / case / "laendo.nrrd")
    (root / "Training Set" / "summary.csv").write_text("id,volume\n")
    (root / "Training Set" / "notes").mkdir()
    _nrrd(root / "Training Set" / "notes" / "laendo.nrrd")  # a folder without lgemri.nrrd is no case
    return root


def _msd(root: Path) -> Path:
    task = root / "Task02_Heart"
    for case in ("la_003", "la_004"):
        _nifti(task / "imagesTr" / f"{case}.nii.gz")
        _nifti(task / "labelsTr" / f"{case}.nii.gz")
        (task / "imagesTr" / f"._{case}.nii.gz").write_bytes(b"\x00\x05\x16\x07 macOS resource fork")
        (task / "labelsTr" / f"._{case}.nii.gz").write_bytes(b"\x00\x05\x16\x07")
    _nifti(task / "imagesTs" / "la_001.nii.gz")
    (task / "dataset.json").write_text("{}")
    return root


def _nnunet(root: Path) -> Path:
    dataset = root / "Dataset027_LA"
    for case in ("LA_001", "LA_002"):
        _nifti(dataset / "imagesTr" / f"{case}_0000.nii.gz")
        _nifti(dataset / "imagesTr" / f"{case}_0001.nii.gz")
        _nifti(dataset / "labelsTr" / f"{case}.nii.gz")
    (dataset / "dataset.json").write_text("{}")
    return root


def _files(root: Path) -> Path:
    _nifti(root / "patient_a.nii.gz")
    _nifti(root / "patient_b_0000.nii")
    _nrrd(root / "patient_c.nrrd")
    _nifti(root / "labels" / "patient_a.nii.gz")  # not an input: sub-folders are not searched
    (root / "._patient_a.nii.gz").write_bytes(b"junk")
    (root / "readme.txt").write_text("not a volume")
    return root


def test_layout_names_match_contract():
    assert LAYOUTS == ("auto", "lascarqs", "utah2018", "msd", "nnunet", "files")


def test_lascarqs_nested_release_with_clashing_folder_names(tmp_path):
    with pytest.warns(UserWarning, match="task 1"):
        cases = find_cases(_lascarqs(tmp_path), "lascarqs", require_labels=True)
    ids = [c.case_id for c in cases]
    assert ids == sorted(ids)
    assert set(ids) == {
        "task2_train_data_train_1",
        "task2_train_data_train_2",
        "train_3",
        "task1_train_data_train_1",
        "task1_train_data_train_2",
    }
    for case in cases:
        assert case.image_path.name == "enhanced.nii.gz"
        assert case.label_path == case.image_path.parent / "atriumSegImgMO.nii.gz"
        assert case.spacing is None
        assert case.label_values == (420,)


def test_pooling_lascarqs_tasks_warns_naming_both_folders(tmp_path):
    release = _lascarqs(tmp_path) / "LAScarQS2022_v2"
    with pytest.warns(UserWarning, match="same patients") as record:
        find_cases(release)
    message = str(record[0].message)
    for task in ("task1", "task2"):
        assert str(release / task / "train_data") in message
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        find_cases(release / "task2")  # one task alone: no warning


def test_lascarqs_single_task_keeps_folder_names(tmp_path):
    for i in (1, 2, 10):
        _nifti(tmp_path / "task2" / "train_data" / f"train_{i}" / "enhanced.nii.gz")
        _nifti(tmp_path / "task2" / "train_data" / f"train_{i}" / "atriumSegImgMO.nii.gz")
    cases = find_cases(tmp_path / "task2", "lascarqs")
    assert [c.case_id for c in cases] == ["train_1", "train_10", "train_2"]


def test_lascarqs_root_is_the_case_folder(tmp_path):
    _nifti(tmp_path / "train_7" / "enhanced.nii.gz")
    (case,) = find_cases(tmp_path / "train_7")
    assert case.case_id == "train_7"
    assert case.label_path is None


def test_lascarqs_missing_label(tmp_path):
    _lascarqs(tmp_path)
    _nifti(tmp_path / "LAScarQS2022_v2" / "task2" / "test_data" / "test_9" / "enhanced.nii.gz")
    with pytest.warns(UserWarning, match="task 1"):
        by_id = {c.case_id: c for c in find_cases(tmp_path, "lascarqs")}
    assert by_id["test_9"].label_path is None
    with pytest.raises(DataError, match="test_9"), pytest.warns(UserWarning, match="task 1"):
        find_cases(tmp_path, "lascarqs", require_labels=True)


def test_utah_skips_stray_files(tmp_path):
    """The 0.625 mm correction is applied by file name when reading (test_io), not by the layout."""
    cases = find_cases(_utah(tmp_path), "utah2018", require_labels=True)
    assert [c.case_id for c in cases] == ["0RZDK210BSMWAA6467LU", "1D7CUD1955YZPGK8XHJX"]
    assert all(c.spacing is None and c.label_values == (255,) for c in cases)
    assert all(c.label_path.name == "laendo.nrrd" for c in cases)


def test_msd_skips_macos_junk_and_test_images(tmp_path):
    cases = find_cases(_msd(tmp_path), "msd", require_labels=True)
    assert [c.case_id for c in cases] == ["la_003", "la_004"]
    assert cases[0].image_path == tmp_path / "Task02_Heart" / "imagesTr" / "la_003.nii.gz"
    assert cases[0].label_path == tmp_path / "Task02_Heart" / "labelsTr" / "la_003.nii.gz"


def test_msd_root_may_be_the_task_or_imagestr_folder(tmp_path):
    _msd(tmp_path)
    for root in (tmp_path / "Task02_Heart", tmp_path / "Task02_Heart" / "imagesTr"):
        assert [c.case_id for c in find_cases(root, "msd")] == ["la_003", "la_004"]


def test_nnunet_takes_channel_0000_only(tmp_path):
    cases = find_cases(_nnunet(tmp_path), "nnunet", require_labels=True)
    assert [c.case_id for c in cases] == ["LA_001", "LA_002"]
    assert cases[1].image_path.name == "LA_002_0000.nii.gz"
    assert cases[1].label_path.name == "LA_002.nii.gz"


def test_nnunet_missing_label(tmp_path):
    _nifti(tmp_path / "imagesTr" / "LA_005_0000.nii.gz")
    (case,) = find_cases(tmp_path, "nnunet")
    assert case.label_path is None
    with pytest.raises(DataError, match="LA_005_0000"):
        find_cases(tmp_path, "nnunet", require_labels=True)


def test_several_datasets_are_ambiguous(tmp_path):
    _msd(tmp_path)
    _nnunet(tmp_path)
    with pytest.raises(DataError, match="several data sets"):
        find_cases(tmp_path)


def test_files_folder(tmp_path):
    cases = find_cases(_files(tmp_path), "files")
    assert [c.case_id for c in cases] == ["patient_a", "patient_b", "patient_c"]
    assert all(c.label_path is None and c.spacing is None and c.label_values is None for c in cases)
    assert cases[1].image_path.name == "patient_b_0000.nii"


def test_files_folder_skips_extra_channels(tmp_path):
    _nifti(tmp_path / "x_0000.nii.gz")
    _nifti(tmp_path / "x_0001.nii.gz")
    assert [c.case_id for c in find_cases(tmp_path, "files")] == ["x"]


def test_files_single_file(tmp_path):
    path = _nifti(tmp_path / "scan.nii.gz")
    assert find_cases(path) == [Case("scan", path)]
    assert find_cases(path, "files") == [Case("scan", path)]


@pytest.mark.parametrize("name", ["enhanced.nii.gz", "lgemri.nrrd", "LGEMRI.nrrd", "enhanced.nii"])
def test_lone_layout_file_is_named_after_its_folder(tmp_path, name, monkeypatch):
    write = _nrrd if name.lower().endswith(".nrrd") else _nifti
    path = write(tmp_path / "train_7" / name)
    assert [c.case_id for c in find_cases(path)] == ["train_7"]
    monkeypatch.chdir(path.parent)  # as typed: `--data.predict_root enhanced.nii.gz` inside the case folder
    assert [c.case_id for c in find_cases(Path(name))] == ["train_7"]


def test_files_rejects_non_volume_file(tmp_path):
    path = tmp_path / "scan.txt"
    path.write_text("hello")
    with pytest.raises(DataError, match="not a volume file"):
        find_cases(path, "files")


def test_files_duplicate_ids(tmp_path):
    _nifti(tmp_path / "scan.nii")
    _nifti(tmp_path / "scan.nii.gz")
    with pytest.raises(DataError, match="more than once"):
        find_cases(tmp_path, "files")


def test_files_require_labels(tmp_path):
    with pytest.raises(DataError, match="labels are required"):
        find_cases(_files(tmp_path), "files", require_labels=True)


@pytest.mark.parametrize(
    ("make", "layout", "first"),
    [
        (_lascarqs, "lascarqs", "task1_train_data_train_1"),
        (_utah, "utah2018", "0RZDK210BSMWAA6467LU"),
        (_msd, "msd", "la_003"),
        (_nnunet, "nnunet", "LA_001"),
        (_files, "files", "patient_a"),
    ],
)
@pytest.mark.filterwarnings("ignore:LAScarQS task 1")
def test_auto_detects_each_layout(tmp_path, make, layout, first):
    root = make(tmp_path)
    auto = find_cases(root)
    assert auto == find_cases(root, layout)
    assert auto[0].case_id == first
    assert all(case.label_values == LA_VALUES[layout] for case in auto)


@pytest.mark.parametrize("make", [_msd, _nnunet])
def test_label_values_override_the_layout_default(tmp_path, make):
    root = make(tmp_path)
    assert {case.label_values for case in find_cases(root)} == {(1,)}
    assert {case.label_values for case in find_cases(root, label_values=[2, 3])} == {(2, 3)}


@pytest.mark.parametrize("values", [[], [0, 420], [1.5], "420"])
def test_bad_label_values_are_refused(tmp_path, values):
    with pytest.raises(DataError, match="label_values"):
        find_cases(_msd(tmp_path), label_values=values)


def test_broken_link_is_an_error_not_a_missing_case(tmp_path):
    root = _msd(tmp_path)
    (root / "Task02_Heart" / "imagesTr" / "la_009.nii.gz").symlink_to(tmp_path / "gone.nii.gz")
    with pytest.raises(DataError, match="la_009.nii.gz is a broken link"):
        find_cases(root)


def test_broken_link_label_is_an_error_not_an_unlabelled_case(tmp_path):
    _nifti(tmp_path / "train_1" / "enhanced.nii.gz")
    (tmp_path / "train_1" / "atriumSegImgMO.nii.gz").symlink_to(tmp_path / "gone.nii.gz")
    with pytest.raises(DataError, match="atriumSegImgMO.nii.gz is a broken link"):
        find_cases(tmp_path)


def test_unreadable_case_folder_is_an_error(tmp_path, monkeypatch):
    """os.walk reports the folder it cannot list (rglob would skip it); scandir is patched because the
    tests may run as root, which chmod cannot lock out."""
    _nifti(tmp_path / "train_1" / "enhanced.nii.gz")
    locked = tmp_path / "train_2"
    _nifti(locked / "enhanced.nii.gz")
    real_scandir = os.scandir

    def scandir(path="."):
        if Path(path) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(DataError, match="cannot read folder .*train_2.*Permission denied"):
        find_cases(tmp_path)


def test_unreadable_file_is_an_error(tmp_path, monkeypatch):
    root = _files(tmp_path)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: "patient_c" not in str(p) and real_access(p, mode))
    with pytest.raises(DataError, match="patient_c.nrrd is not readable"):
        find_cases(root)


def test_every_header_is_checked_before_any_case_is_read(tmp_path):
    """A bad header in the last case fails find_cases itself, before a run segments the first ones."""
    root = _msd(tmp_path)
    bad = nib.Nifti1Image(np.zeros((4, 4, 3), np.uint16), np.eye(4))
    bad.header["pixdim"][1:4] = [1.0, 0.0, 1.0]
    nib.save(bad, root / "Task02_Heart" / "labelsTr" / "la_004.nii.gz")
    with pytest.raises(DataError, match="labelsTr/la_004.nii.gz has voxel spacing"):
        find_cases(root)


def test_no_match_names_patterns_and_root(tmp_path):
    (tmp_path / "notes.txt").write_text("nothing here")
    (tmp_path / "sub").mkdir()
    with pytest.raises(DataError) as error:
        find_cases(tmp_path)
    message = str(error.value)
    assert str(tmp_path) in message
    for pattern in ("_0000.nii.gz", "imagesTr", "labelsTr", "enhanced.nii.gz", "atriumSegImgMO.nii.gz"):
        assert pattern in message
    for pattern in ("lgemri.nrrd", "laendo.nrrd", "*.nii.gz", "*.nrrd"):
        assert pattern in message


def test_explicit_layout_without_cases(tmp_path):
    _files(tmp_path)
    with pytest.raises(DataError, match="enhanced.nii.gz"):
        find_cases(tmp_path, "lascarqs")


def test_missing_root(tmp_path):
    with pytest.raises(DataError, match="does not exist.*nowhere"):
        find_cases(tmp_path / "nowhere")


def test_empty_root(tmp_path):
    with pytest.raises(DataError, match="empty"):
        find_cases(tmp_path)


def test_unknown_layout(tmp_path):
    with pytest.raises(DataError, match="unknown layout 'kits'"):
        find_cases(tmp_path, "kits")
