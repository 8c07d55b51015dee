"""`la-seg export-nnunet`: an nnU-Net v2 raw data set with la-seg's cases, voxels, geometry and split."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest

from la_seg.cli import main
from la_seg.data.io import read_case, read_image, read_label
from la_seg.data.layouts import Case, find_cases
from la_seg.data.split import DataSplit, fingerprint, split_cases
from la_seg.data.synthetic import write_dataset
from la_seg.errors import DataError
from la_seg.nnunet import ExportData, export_nnunet, nnunet_case_ids, write_case

SPLIT = {"train": ["train_1", "train_2", "train_3"], "val": ["train_4"], "test": ["train_5", "train_6"]}


def snapshot(root):
    """Every input file with its bytes, to prove the export never writes into the input."""
    return {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def write_split(folder, record: dict):
    """split.json as `fit` writes it: through the split module's own record (edited where a test says so)."""
    path = folder / "split.json"
    path.write_text(json.dumps(record))
    return path


def record(split=SPLIT, **kwargs) -> dict:
    return DataSplit({**split}, **kwargs).to_record()


def test_export_round_trip_keeps_cases_voxels_and_geometry(synth_root, tmp_path):
    before = snapshot(synth_root)
    main(["export-nnunet", "--data.root", str(synth_root), "--out", str(tmp_path / "raw")])
    dataset = tmp_path / "raw" / "Dataset501_LA"
    originals = find_cases(synth_root)
    exported = find_cases(dataset, "nnunet", require_labels=True)
    assert [c.case_id for c in exported] == [c.case_id for c in originals]
    for original, copy in zip(originals, exported, strict=True):
        image, label = read_case(original)
        image_copy, label_copy = read_case(copy)
        np.testing.assert_array_equal(image_copy.data, image.data)
        np.testing.assert_allclose(image_copy.geometry.affine, image.geometry.affine, atol=1e-6)
        np.testing.assert_allclose(label_copy.geometry.affine, image.geometry.affine, atol=1e-6)
        raw_label = np.asanyarray(nib.load(copy.label_path).dataobj)
        assert raw_label.dtype == np.uint8 and set(np.unique(raw_label)) <= {0, 1}
        np.testing.assert_array_equal(raw_label, label.data)
        assert copy.image_path.name == f"{original.case_id}_0000.nii.gz"
    document = json.loads((dataset / "dataset.json").read_text())
    assert document["channel_names"] == {"0": "LGE-MRI"}
    assert document["labels"] == {"background": 0, "left_atrium": 1}
    assert document["numTraining"] == len(originals) and document["file_ending"] == ".nii.gz"
    assert not (dataset / "splits_final.json").exists() and not (dataset / "imagesTs").exists()
    ids = json.loads((dataset / "case_ids.json").read_text())["cases"]
    assert ids == {c.case_id: c.case_id for c in originals}
    assert snapshot(synth_root) == before


def test_split_becomes_splits_final_and_test_cases_stay_out_of_training(synth_root, tmp_path):
    main(
        ["export-nnunet", "--data.root", str(synth_root), "--out", str(tmp_path / "raw"),
         "--split", str(write_split(tmp_path, record())), "--dataset_name", "Dataset777_Atrium"]
    )  # fmt: skip
    dataset = tmp_path / "raw" / "Dataset777_Atrium"
    assert json.loads((dataset / "splits_final.json").read_text()) == [
        {"train": SPLIT["train"], "val": SPLIT["val"]}
    ]
    training = [c.case_id for c in find_cases(dataset, "nnunet", require_labels=True)]
    assert training == SPLIT["train"] + SPLIT["val"]
    assert json.loads((dataset / "dataset.json").read_text())["numTraining"] == 4
    assert sorted(p.name for p in (dataset / "imagesTs").iterdir()) == [
        f"{c}_0000.nii.gz" for c in SPLIT["test"]
    ]
    for case_id in SPLIT["test"]:
        original = next(c for c in find_cases(synth_root) if c.case_id == case_id)
        exported = read_label(dataset / "labelsTs" / f"{case_id}.nii.gz")
        np.testing.assert_array_equal(exported.data, read_label(original.label_path).data)


def test_one_folds_record_exports_every_fold_of_its_cross_validation(synth_root, tmp_path):
    case_ids = [f"train_{i}" for i in range(1, 7)]
    folds = [DataSplit(split_cases(case_ids, (0.8, 0.0, 0.2), 3, None, 2, i), None, 2, i, seed=3,
                       fractions=(0.8, 0.0, 0.2)) for i in range(2)]  # fmt: skip
    target = export_nnunet(
        ExportData(synth_root), tmp_path / "raw", split=write_split(tmp_path, folds[1].to_record())
    )
    assert json.loads((target / "splits_final.json").read_text()) == [
        {"train": fold.parts["train"], "val": fold.parts["val"]} for fold in folds
    ]
    assert sorted(p.name for p in (target / "imagesTs").iterdir()) == [
        f"{c}_0000.nii.gz" for c in folds[0].parts["test"]
    ]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"val": ["train_9"]}, "not found in the data"),
        ({"test": ["train_1"]}, "cases in both 'train' and 'test'"),
        ({"val": ["train_1"]}, "cases in both 'train' and 'val'"),
        ({"val": []}, "no validation cases"),
        ({"train": "train_1"}, "'train' must be a list of case id strings"),
        ({"folds": 3, "fold": 1}, "records no seed and fractions"),
        ({"folds": 2, "fold": 1, "seed": 0, "fractions": [0.7, 0.1, 0.2]}, "was it edited"),
    ],
)
def test_bad_split_files_are_refused_naming_the_file(synth_root, tmp_path, edit, message):
    path = write_split(tmp_path, {**record(), **edit})
    with pytest.raises(DataError, match=message) as error:
        export_nnunet(ExportData(synth_root), tmp_path / "raw", split=path)
    assert str(path) in str(error.value)
    assert not (tmp_path / "raw" / "Dataset501_LA").exists()


def test_a_split_of_other_cases_with_the_same_ids_is_refused(synth_root, tmp_path):
    other = tmp_path / "other"
    write_dataset(other, cases=6, seed=9, shape=(20, 20, 4))  # synth_root's ids, other images
    cases = {c.case_id: c for c in find_cases(other)}
    found = {part: {c: fingerprint(cases[c]) for c in ids} for part, ids in SPLIT.items()}
    path = write_split(tmp_path, record(root=str(other), fingerprints=found))
    with pytest.raises(DataError, match=rf"{path} was made on the cases of {other}, but case 'train_\d' "):
        export_nnunet(ExportData(synth_root), tmp_path / "raw", split=path)
    export_nnunet(ExportData(other), tmp_path / "raw", split=path)  # the cases it was made on


def test_case_ids_nnunet_cannot_take_are_renamed_with_a_map(tmp_path):
    root = tmp_path / "data"
    write_dataset(root, cases=2, seed=1, shape=(24, 20, 6), spacing=(2.0, 2.0, 4.0))
    (root / "train_1").rename(root / "patient 1")
    (root / "train_2").rename(root / "scan_0000")
    target = export_nnunet(ExportData(root), tmp_path / "raw")
    assert [c.case_id for c in find_cases(target, "nnunet")] == ["patient_1", "scan-0000"]
    assert json.loads((target / "case_ids.json").read_text())["cases"] == {
        "patient_1": "patient 1",
        "scan-0000": "scan_0000",
    }


def test_case_ids_that_would_collide_are_refused():
    assert nnunet_case_ids(["la_003", "case-7"]) == {"la_003": "la_003", "case-7": "case-7"}
    with pytest.raises(DataError, match="'a b' and 'a_b' both become"):
        nnunet_case_ids(["a b", "a_b"])
    with pytest.raises(DataError, match="no letters or digits"):
        nnunet_case_ids(["( )"])


def test_spacing_override_is_written_into_the_header(synth_root, tmp_path):
    """Utah's headers say 1 mm; nnU-Net plans from the header, so the export carries la-seg's spacing."""
    original = find_cases(synth_root)[0]
    override = (0.625, 0.625, 0.625)
    write_case(
        Case("utah", original.image_path, original.label_path, override),
        tmp_path / "im",
        tmp_path / "lb",
        "utah",
    )
    for path in (tmp_path / "im" / "utah_0000.nii.gz", tmp_path / "lb" / "utah.nii.gz"):
        assert nib.load(path).header.get_zooms() == pytest.approx(override)
        assert read_image(path).data.shape == read_image(original.image_path).data.shape
    np.testing.assert_array_equal(
        read_image(tmp_path / "im" / "utah_0000.nii.gz").data, read_image(original.image_path).data
    )


def test_existing_output_is_refused_and_replaced_only_with_overwrite(synth_root, tmp_path):
    out = tmp_path / "raw"
    split = write_split(tmp_path, SPLIT)
    export_nnunet(ExportData(synth_root), out)
    with pytest.raises(DataError, match="exists and is not empty; pass --overwrite true"):
        export_nnunet(ExportData(synth_root), out, split=split)
    target = export_nnunet(ExportData(synth_root), out, split=split, overwrite=True)
    assert [c.case_id for c in find_cases(target, "nnunet")] == SPLIT["train"] + SPLIT[
        "val"
    ]  # no stale cases
    assert [p.name for p in out.iterdir()] == ["Dataset501_LA"]  # no staging or retired folders left
    foreign = out / "Dataset502_Other"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not written by la-seg export-nnunet"):
        export_nnunet(ExportData(synth_root), out, dataset_name="Dataset502_Other", overwrite=True)
    assert (foreign / "notes.txt").read_text() == "mine"


def test_export_refuses_to_write_into_the_input_and_bad_names(tmp_path):
    root = tmp_path / "data"
    write_dataset(root, cases=1, seed=2, shape=(24, 20, 6), spacing=(2.0, 2.0, 4.0))
    with pytest.raises(DataError, match="never writes into its input"):
        export_nnunet(ExportData(root), root)
    with pytest.raises(DataError, match="DatasetXXX_Name"):
        export_nnunet(ExportData(root), tmp_path / "raw", dataset_name="LA")
    assert sorted(p.name for p in root.iterdir()) == ["train_1"]


def test_cli_error_is_one_line_and_exit_status_2(synth_root, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "export-nnunet",
                "--data.root",
                str(synth_root),
                "--out",
                str(tmp_path),
                "--split",
                str(tmp_path / "no.json"),
            ]
        )
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith("la-seg: error: cannot read the split file")


def test_unlabelled_cases_are_refused(tmp_path):
    root = tmp_path / "data"
    write_dataset(root, cases=1, seed=3, shape=(24, 20, 6), spacing=(2.0, 2.0, 4.0))
    shutil.copy(root / "train_1" / "enhanced.nii.gz", tmp_path / "scan.nii.gz")
    with pytest.raises(DataError, match="labels are required"):
        export_nnunet(ExportData(tmp_path / "scan.nii.gz", "files"), tmp_path / "raw")
