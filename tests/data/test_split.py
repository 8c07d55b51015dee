import json

import pytest

from la_seg.data.layouts import Case
from la_seg.data.split import (
    PARTS,
    DataSplit,
    check_patients_kept_together,
    check_same_cases,
    fingerprint,
    parse_split,
    read_groups,
    split_cases,
)
from la_seg.data.synthetic import write_dataset
from la_seg.errors import DataError

IDS = [f"case_{i:03d}" for i in range(130)]
# 40 patients with 1, 2 or 3 scans each (LAScarQS task 2 mixes pre- and post-ablation scans of one patient).
SCANS = [f"p{p:02d}_scan{s}" for p in range(40) for s in range(1 + p % 3)]
PATIENTS = {case_id: case_id.split("_")[0] for case_id in SCANS}


def _patients_of(ids):
    return {PATIENTS[case_id] for case_id in ids}


# --------------------------------------------------------------------------------------------- split_cases
def test_split_fractions_match_paper():
    split = split_cases(IDS, (0.7, 0.1, 0.2), seed=42)
    assert [len(split[p]) for p in PARTS] == [91, 13, 26]
    assert sorted(split["train"] + split["val"] + split["test"]) == IDS  # no overlap, nothing lost


def test_split_is_deterministic_and_seeded():
    a = split_cases(IDS, seed=1)
    assert a == split_cases(list(reversed(IDS)), seed=1)  # input order does not matter
    assert a != split_cases(IDS, seed=2)
    assert all(part == sorted(part) for part in a.values())


def test_split_small_sets():
    assert [len(v) for v in split_cases(["a", "b", "c"]).values()] == [1, 1, 1]
    assert [len(v) for v in split_cases(list("abcdefghij")).values()] == [7, 1, 2]
    assert split_cases(["a", "b"], (0.9, 0.1, 0.0))["test"] == []
    with pytest.raises(DataError, match="too few"):
        split_cases(["a", "b"])


@pytest.mark.parametrize("bad", [(0.5, 0.1, 0.1), (0.7, 0.3), (1.2, -0.1, -0.1), (0.0, 0.5, 0.5)])
def test_split_fraction_errors(bad):
    with pytest.raises(DataError, match="data.split"):
        split_cases(IDS, bad)


# ------------------------------------------------------------------------------------------ patient groups
def test_grouped_split_keeps_patients_together_and_counts_patients():
    split = split_cases(SCANS, (0.7, 0.1, 0.2), seed=3, patients=PATIENTS)
    assert sorted(sum(split.values(), [])) == sorted(SCANS)
    per_part = [_patients_of(split[p]) for p in PARTS]
    assert not (per_part[0] & per_part[1] or per_part[0] & per_part[2] or per_part[1] & per_part[2])
    assert [len(p) for p in per_part] == [28, 4, 8]  # 40 patients: round(4.0) val, round(8.0) test
    assert split == split_cases(list(reversed(SCANS)), (0.7, 0.1, 0.2), seed=3, patients=PATIENTS)


def test_split_by_case_is_split_by_singleton_patients():
    assert split_cases(IDS, seed=7, patients={i: i for i in IDS}) == split_cases(IDS, seed=7)


def test_grouped_split_too_few_patients():
    two_patients = {"a_1": "a", "a_2": "a", "b_1": "b", "b_2": "b"}
    with pytest.raises(DataError, match="2 patient"):
        split_cases(two_patients, (0.6, 0.2, 0.2), patients=two_patients)


def test_groups_regex_capture_group_or_whole_match():
    assert read_groups(r"regex:^(p\d+)_", SCANS) == PATIENTS
    assert read_groups(r"regex:^p\d+", ["p1_pre", "p1_post", "p22_pre"]) == {
        "p1_pre": "p1",
        "p1_post": "p1",
        "p22_pre": "p22",
    }


@pytest.mark.parametrize(
    "spec,match",
    [
        (r"regex:^(p\d+)_", r"data\.groups.*finds no patient.*'x_7'.*'y_8'"),
        ("regex:(p", "not a valid regular expression"),
        (r"regex:^(q)?p", "finds no patient"),  # the capture group did not take part in the match
        ("groups.txt", r"data\.groups must be 'regex:PATTERN'.*\.csv"),
    ],
)
def test_groups_spec_errors(spec, match):
    with pytest.raises(DataError, match=match):
        read_groups(spec, ["p1_a", "x_7", "y_8"])


def _write_csv(tmp_path, text):
    path = tmp_path / "patients.csv"
    path.write_text(text)
    return path


def test_groups_csv(tmp_path):
    path = _write_csv(tmp_path, "case_id,patient_id\n" + "".join(f"{c}, {p}\n" for c, p in PATIENTS.items()))
    assert read_groups(str(path), SCANS) == PATIENTS
    bom = _write_csv(tmp_path, "\ufeffcase_id,patient_id\na,1\n\nb,1\n")  # spreadsheet export, blank line
    assert read_groups(str(bom), ["a", "b"]) == {"a": "1", "b": "1"}


@pytest.mark.parametrize(
    "text,match",
    [
        ("case,patient\na,1\nb,2\n", "header case_id,patient_id.*'case,patient'"),
        ("", "header.*empty file"),
        ("case_id,patient_id\na,1\n", r"no patient for the cases \['b'\]"),
        ("case_id,patient_id\na,1\nb,2\nghost,3\n", r"not in the data set: \['ghost'\]"),
        ("case_id,patient_id\na,1\nb,2\na,2\n", "line 4: case 'a' is given two patients"),
        ("case_id,patient_id\na,1\nb,\n", "line 3: expected case_id,patient_id"),
    ],
)
def test_groups_csv_errors(tmp_path, text, match):
    path = _write_csv(tmp_path, text)
    with pytest.raises(DataError, match=match) as error:
        read_groups(str(path), ["a", "b"])
    assert "data.groups" in str(error.value) and str(path) in str(error.value)


def test_groups_csv_missing_file(tmp_path):
    with pytest.raises(DataError, match="cannot read data.groups file"):
        read_groups(str(tmp_path / "nope.csv"), ["a"])


# -------------------------------------------------------------------------------------- cross-validation
@pytest.mark.parametrize("patients", [None, PATIENTS], ids=["cases", "patients"])
@pytest.mark.parametrize("folds", [2, 3, 5])
def test_folds_partition_the_non_test_cases(folds, patients):
    ids = SCANS
    plain = split_cases(ids, (0.7, 0.1, 0.2), seed=11, patients=patients)
    splits = [split_cases(ids, (0.7, 0.1, 0.2), 11, patients, folds, fold) for fold in range(folds)]
    non_test = sorted(set(ids) - set(plain["test"]))
    for split in splits:
        assert split["test"] == plain["test"]  # fixed across folds, and the same as without folds
        assert sorted(split["train"] + split["val"]) == non_test
        assert not set(split["train"]) & set(split["val"])
    vals = [case_id for split in splits for case_id in split["val"]]
    assert sorted(vals) == non_test  # each non-test case is validated in exactly one fold
    if patients is not None:
        for split in splits:
            assert not _patients_of(split["train"]) & _patients_of(split["val"])
        sizes = [len(_patients_of(split["val"])) for split in splits]
    else:
        sizes = [len(split["val"]) for split in splits]
    assert max(sizes) - min(sizes) <= 1


def test_folds_ignore_the_val_fraction():
    with_val = [split_cases(IDS, (0.7, 0.1, 0.2), 0, None, 4, fold) for fold in range(4)]
    without_val = [split_cases(IDS, (0.8, 0.0, 0.2), 0, None, 4, fold) for fold in range(4)]
    assert with_val == without_val


@pytest.mark.parametrize(
    "folds,fold,match",
    [
        (3, 3, r"data\.fold must be in 0\.\.2"),
        (3, -1, r"data\.fold must be in 0\.\.2"),
        (0, 0, r"data\.folds must be >= 1"),
        (1, 1, r"data\.fold must be in 0\.\.0"),
        (9, 0, r"data\.folds=9 needs at least 9 case\(s\) outside the test part.*leave 8"),
    ],
)
def test_fold_errors(folds, fold, match):
    with pytest.raises(DataError, match=match):
        split_cases([f"c{i}" for i in range(10)], (0.7, 0.1, 0.2), 0, None, folds, fold)


def test_folds_count_patients_not_cases():
    # 40 patients, 8 of them test: 32 remain, whatever their number of scans.
    split_cases(SCANS, (0.8, 0.0, 0.2), 0, PATIENTS, folds=32, fold=31)
    with pytest.raises(DataError, match=r"33 patient\(s\) outside the test part.*leave 32"):
        split_cases(SCANS, (0.8, 0.0, 0.2), 0, PATIENTS, folds=33, fold=0)


# --------------------------------------------------------------------------------------- the split record
def test_record_summary_and_round_trip():
    parts = split_cases(SCANS, (0.7, 0.1, 0.2), seed=3, patients=PATIENTS, folds=5, fold=2)
    split = DataSplit(parts, PATIENTS, folds=5, fold=2)
    record = json.loads(json.dumps(split.to_record()))
    assert {p: record[p] for p in PARTS} == parts
    assert record["folds"] == 5 and record["fold"] == 2
    for part in PARTS:
        expected = {"patients": len(_patients_of(parts[part])), "cases": len(parts[part])}
        assert record["summary"][part] == expected
    assert parse_split(record, "split.json") == split
    assert "fold 2 of 5" in split.describe() and f"test {record['summary']['test']['patients']} patients" in (
        split.describe()
    )


def test_record_keeps_its_folders_and_fingerprints(tmp_path):
    write_dataset(tmp_path / "a", cases=2, seed=0, shape=(12, 10, 4))
    write_dataset(tmp_path / "b", cases=2, seed=1, shape=(12, 10, 4))  # the same ids and geometry
    case = {root: Case("train_1", tmp_path / root / "train_1" / "enhanced.nii.gz") for root in "ab"}
    found = {"train": {"train_1": fingerprint(case["a"])}}
    parts = {"train": ["train_1"], "val": [], "test": []}
    split = DataSplit(parts, root=str(tmp_path / "a"), fingerprints=found)
    record = parse_split(json.loads(json.dumps(split.to_record())), "split.json")
    assert (record.root, record.test_root, record.fingerprints) == (split.root, None, found)
    assert found["train"]["train_1"]["shape"] == [12, 10, 4]
    check_same_cases(record, found, {"train": "copy"}, "split.json")  # the same image: accepted
    other = {"train": {"train_1": fingerprint(case["b"])}}
    with pytest.raises(DataError) as error:
        check_same_cases(record, other, {"train": str(tmp_path / "b")}, "split.json")
    message = str(error.value)
    assert "\n" not in message and "'train_1'" in message
    assert str(tmp_path / "a") in message and str(tmp_path / "b") in message


def test_old_records_hold_only_the_parts():
    split = parse_split({"train": ["b", "a"], "val": ["c"]}, "old.ckpt")
    assert split.parts == {"train": ["a", "b"], "val": ["c"], "test": []}
    assert (split.patients, split.folds, split.fold) == (None, 1, 0)
    assert split.summary()["train"] == {"patients": 2, "cases": 2}


@pytest.mark.parametrize(
    "record,match",
    [
        ({"train": ["a"], "valid": ["b"]}, "keys"),
        ({"train": ["a", "a"]}, "more than once"),
        ({"train": ["a"], "test": ["a"]}, "both 'train' and 'test'"),
        ({"train": [], "val": ["a"]}, "no training"),
        ({"train": ["a"], "patients": ["a"]}, "'patients' must map"),
        ({"train": ["a"], "folds": "5"}, "integers"),
        ({"train": ["a"], "root": 3}, "folder paths"),
        ({"train": ["a"], "fingerprints": {"train": ["a"]}}, "'fingerprints' must map"),
        (["a"], "JSON object"),
    ],
)
def test_parse_split_errors(record, match):
    with pytest.raises(DataError, match=f"my.json.*{match}"):
        parse_split(record, "my.json")


def test_separate_test_folder_is_its_own_namespace():
    split = parse_split({"train": ["a"], "test": ["a"]}, "x", separate_test=True)  # ids of another folder
    split.patients = {"a": "p"}
    assert split.summary()["test"] == {"patients": 1, "cases": 1}
    check_patients_kept_together(split, "x")  # test_root's "a" is not data.root's "a"


def test_patients_kept_together():
    split = DataSplit({"train": ["p01_scan0"], "val": ["p01_scan1"], "test": []}, PATIENTS)
    with pytest.raises(DataError, match=r"split\.json puts cases of one patient.*'p01'"):
        check_patients_kept_together(split, "split.json")


def test_duplicate_images_hashes_only_files_of_equal_size(tmp_path, monkeypatch):
    from la_seg.data import split as split_module

    files = {"a": b"same bytes", "b": b"same bytes", "c": b"same size!", "d": b"longer than the rest"}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    hashed = []
    real = split_module.hashlib.sha256

    def counting():
        hashed.append(1)
        return real()

    monkeypatch.setattr(split_module.hashlib, "sha256", counting)
    groups = split_module.duplicate_images({name: tmp_path / name for name in files})
    assert groups == [["a", "b"]]
    assert len(hashed) == 3  # d has a size of its own: never read


def test_group_duplicates_merges_their_patients():
    from la_seg.data.split import group_duplicates

    patients = {"a1": "A", "a2": "A", "b1": "B", "c1": "C"}
    merged = group_duplicates(patients, [["a2", "b1"]], patients)
    assert merged == {"a1": "A", "a2": "A", "b1": "A", "c1": "C"}
    assert group_duplicates(None, [["x", "y"]], ["x", "y", "z"]) == {"x": "x", "y": "x", "z": "z"}
