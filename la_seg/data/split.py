"""The experiment's train/val/test split: fractions, patient groups, cross-validation folds, split files.

Pure functions and one small record class, no Lightning. LADataModule finds the cases, asks here for the split
and stores the record (`DataSplit.to_record`) in split.json and in checkpoints.

Rules:
- Fractions apply to patients (to cases when no groups are given). Validation and test get round-half-up
  (n * fraction) patients, at least one when their fraction is > 0; training gets the rest.
- The sorted patient ids are permuted by numpy's Generator(seed); test takes the last patients of that order,
  validation the ones before, training the rest. So the test part depends only on the patients, the fractions
  and the seed, never on the fold, and the split is identical on every DDP rank and every rerun.
- Cross-validation (folds = k > 1): the patients outside the test part are cut into k contiguous parts of that
  order (sizes differ by at most one); fold i validates on the i-th and trains on the others. The validation
  fraction is then ignored.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
import warnings
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from la_seg.data.io import check_header
from la_seg.errors import DataError

if TYPE_CHECKING:
    from la_seg.data.layouts import Case

PARTS = ("train", "val", "test")
GROUPS_REGEX_PREFIX = "regex:"
GROUPS_CSV_HEADER = ("case_id", "patient_id")
# Written beside the parts in split.json; read back so that a split.json used as data.split_file keeps them.
_RECORD_KEYS = (
    "summary", "patients", "folds", "fold", "seed", "fractions", "root", "test_root", "fingerprints",
)  # fmt: skip
_FINGERPRINT_HEAD = 1 << 16  # bytes of an image file hashed into its fingerprint: its header and first voxels
_SUM_TOLERANCE = 1e-6
_SHOWN = 10  # ids quoted in an error message before "... (N more)"


def check_fractions(split: Sequence[float]) -> tuple[float, float, float]:
    """(train, val, test) fractions: three numbers >= 0 summing to 1, train > 0."""
    values = tuple(float(f) for f in split)
    if len(values) != 3 or any(not np.isfinite(f) or f < 0 for f in values):
        raise DataError(f"data.split must be three fractions (train, val, test) >= 0, got {tuple(split)}")
    if abs(sum(values) - 1.0) > _SUM_TOLERANCE:
        raise DataError(f"data.split fractions must sum to 1, got {values} (sum {sum(values):.6g})")
    if values[0] <= 0:
        raise DataError(f"data.split needs a training fraction > 0, got {values}")
    return values


def check_folds(folds: int, fold: int) -> None:
    """folds >= 1 (1 = no cross-validation) and 0 <= fold < folds."""
    if folds < 1:
        raise DataError(f"data.folds must be >= 1 (1 = no cross-validation), got {folds}")
    if not 0 <= fold < folds:
        raise DataError(
            f"data.fold must be in 0..{folds - 1} (0-based, below data.folds={folds}), got {fold}"
        )


def listing(ids: Sequence[str]) -> str:
    """Ids for an error message: the first few, then how many more."""
    shown = ", ".join(map(repr, ids[:_SHOWN]))
    return f"[{shown}{f', ... ({len(ids) - _SHOWN} more)' if len(ids) > _SHOWN else ''}]"


# ------------------------------------------------------------------------------------------------- groups
def read_groups(spec: str, case_ids: Collection[str]) -> dict[str, str]:
    """case id -> patient id for every case in `case_ids`, from the data.groups option.

    `spec` is either `regex:PATTERN`, searched in each case id (the first capture group of the first match is
    the patient, or the whole match if the pattern has no group), or the path of a CSV file whose header is
    `case_id,patient_id` and which has one row per case of the data set.
    """
    if spec.startswith(GROUPS_REGEX_PREFIX):
        return _groups_from_regex(spec[len(GROUPS_REGEX_PREFIX) :], case_ids)
    if spec.lower().endswith(".csv"):
        return _groups_from_csv(Path(spec).expanduser(), case_ids)
    raise DataError(
        f"data.groups must be '{GROUPS_REGEX_PREFIX}PATTERN' (a regular expression on the case id) or the "
        f"path of a .csv file with the header {','.join(GROUPS_CSV_HEADER)}, got {spec!r}"
    )


def _groups_from_regex(pattern: str, case_ids: Collection[str]) -> dict[str, str]:
    try:
        compiled = re.compile(pattern)
    except re.error as error:
        raise DataError(f"data.groups: {pattern!r} is not a valid regular expression: {error}") from error
    patients, unmatched = {}, []
    for case_id in sorted(case_ids):
        match = compiled.search(case_id)
        patient = match and (match.group(1) if compiled.groups else match.group(0))
        if patient:
            patients[case_id] = patient
        else:
            unmatched.append(case_id)
    if unmatched:
        raise DataError(
            f"data.groups regex {pattern!r} finds no patient id in the case ids {listing(unmatched)}; "
            "the first capture group (or the whole match) must be a non-empty patient id"
        )
    return patients


def _groups_from_csv(path: Path, case_ids: Collection[str]) -> dict[str, str]:
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:  # -sig: spreadsheets write a BOM
            rows = [[cell.strip() for cell in row] for row in csv.reader(handle)]
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise DataError(f"cannot read data.groups file {path}: {error}") from error
    if not rows or tuple(rows[0]) != GROUPS_CSV_HEADER:
        found = ",".join(rows[0]) if rows else "an empty file"
        raise DataError(
            f"data.groups file {path} must start with the header {','.join(GROUPS_CSV_HEADER)}, got {found!r}"
        )
    patients: dict[str, str] = {}
    for line, row in enumerate(rows[1:], start=2):
        if not any(row):
            continue
        if len(row) != 2 or not all(row):
            raise DataError(f"data.groups file {path}, line {line}: expected case_id,patient_id, got {row}")
        case_id, patient = row
        if patients.setdefault(case_id, patient) != patient:
            raise DataError(
                f"data.groups file {path}, line {line}: case {case_id!r} is given two patients, "
                f"{patients[case_id]!r} and {patient!r}"
            )
    unknown = sorted(set(patients) - set(case_ids))
    if unknown:
        raise DataError(
            f"data.groups file {path} names cases that are not in the data set: {listing(unknown)}"
        )
    missing = sorted(set(case_ids) - set(patients))
    if missing:
        raise DataError(
            f"data.groups file {path} has no patient for the cases {listing(missing)}: add a row each"
        )
    return patients


# ------------------------------------------------------------------------------------------- duplicates
def duplicate_images(images: Mapping[str, Path]) -> list[list[str]]:
    """Groups (sorted, of two or more) of case ids whose image files are byte-identical: the same scan twice.

    Cheap: only files of equal size are hashed, each once (sha256 of its bytes).
    """
    by_size: dict[int, list[str]] = {}
    for case_id, path in images.items():
        by_size.setdefault(Path(path).stat().st_size, []).append(case_id)
    groups: dict[str, list[str]] = {}
    for same_size in by_size.values():
        if len(same_size) < 2:
            continue
        for case_id in same_size:
            digest = hashlib.sha256()
            with open(images[case_id], "rb") as handle:
                for block in iter(lambda h=handle: h.read(1 << 20), b""):
                    digest.update(block)
            groups.setdefault(digest.hexdigest(), []).append(case_id)
    return sorted(sorted(ids) for ids in groups.values() if len(ids) > 1)


def group_duplicates(patients: Mapping[str, str] | None, duplicates: Sequence[Sequence[str]],
                     case_ids: Collection[str]) -> dict[str, str]:  # fmt: skip
    """case id -> patient with the patients of each duplicate group merged into one (its first's)."""
    merged = dict(patients) if patients is not None else {case_id: case_id for case_id in case_ids}
    for group in duplicates:
        keep, others = merged[group[0]], {merged[case_id] for case_id in group[1:]}
        merged = {case_id: keep if patient in others else patient for case_id, patient in merged.items()}
    return merged


# ------------------------------------------------------------------------------------------ fingerprints
def fingerprint(case: Case) -> dict:
    """What tells a case's image from another of the same id, cheaply (header and first 64 KiB, no voxel
    decoded): shape and spacing as la-seg reads them, the file's size and the sha256 of its first bytes."""
    with warnings.catch_warnings():  # find_cases gave the header's warnings already
        warnings.simplefilter("ignore")
        geometry = check_header(case.image_path, case.spacing)
    with open(case.image_path, "rb") as handle:
        head = hashlib.sha256(handle.read(_FINGERPRINT_HEAD)).hexdigest()
    return {
        "shape": [int(n) for n in geometry.shape],
        "spacing": [float(s) for s in geometry.spacing],
        "size_bytes": Path(case.image_path).stat().st_size,
        "sha256_head": head,
    }


def check_same_cases(
    split: DataSplit, found: Mapping[str, Mapping[str, dict]], roots: Mapping[str, str], source: str
) -> None:
    """Refuse `split` when a case it recorded differs from the case of that id found now (`found`: {part:
    {case id: fingerprint}} under `roots`): another data set sharing the case ids would be scored silently."""
    for part, cases in found.items():
        recorded = (split.fingerprints or {}).get(part, {})
        for case_id, now in cases.items():
            then = recorded.get(case_id, {})
            differing = [key for key in now if key in then and then[key] != now[key]]
            if differing:
                key = differing[0]
                raise DataError(
                    f"{source} was made on the cases of {split.root_of(part)}, but case {case_id!r} under "
                    f"{roots[part]} is another image ({key} {then[key]} there, {now[key]} here): a different "
                    "data set with the same case ids; use the data set the split was made on"
                )


# ------------------------------------------------------------------------------------------ random split
def split_cases(
    case_ids: Iterable[str],
    split: Sequence[float] = (0.7, 0.1, 0.2),
    seed: int = 42,
    patients: Mapping[str, str] | None = None,
    folds: int = 1,
    fold: int = 0,
) -> dict[str, list[str]]:
    """Random split of the (unique) `case_ids` into {"train", "val", "test"}, each part sorted.

    `patients` maps every case id to its patient (see read_groups); all cases of a patient go to one part.
    Without it every case is its own patient. See the module docstring for the rules.
    """
    fractions = check_fractions(split)
    check_folds(folds, fold)
    cases_of: dict[str, list[str]] = {}
    for case_id in sorted(case_ids):
        cases_of.setdefault(patients[case_id] if patients else case_id, []).append(case_id)
    ordered = sorted(cases_of)
    shuffled = [ordered[i] for i in np.random.default_rng(seed).permutation(len(ordered))]
    unit = "patient(s)" if patients else "case(s)"
    n_val, n_test = (_part_size(len(shuffled), f) for f in fractions[1:])
    outside_test = shuffled[: len(shuffled) - n_test]
    if folds > 1:
        if len(outside_test) < folds:
            raise DataError(
                f"data.folds={folds} needs at least {folds} {unit} outside the test part, but "
                f"{len(shuffled)} {unit} with data.split={fractions} leave {len(outside_test)}"
            )
        held_out = set(np.array_split(np.arange(len(outside_test)), folds)[fold].tolist())
        val = [patient for i, patient in enumerate(outside_test) if i in held_out]
        train = [patient for i, patient in enumerate(outside_test) if i not in held_out]
    else:
        if len(outside_test) - n_val < 1:
            needed = 1 + sum(f > 0 for f in fractions[1:])
            raise DataError(
                f"{len(shuffled)} {unit} are too few for data.split={fractions}: every part with a fraction "
                f"> 0 needs at least one, so at least {needed} are needed"
            )
        train, val = outside_test[: len(outside_test) - n_val], outside_test[len(outside_test) - n_val :]
    test = shuffled[len(outside_test) :]
    return {
        part: sorted(c for p in chosen for c in cases_of[p])
        for part, chosen in zip(PARTS, (train, val, test), strict=True)
    }


def _part_size(n: int, fraction: float) -> int:
    """round-half-up(n * fraction), at least 1 for a fraction > 0."""
    return max(1, int(np.floor(n * fraction + 0.5))) if fraction > 0 else 0


# ---------------------------------------------------------------------------------------- the split record
@dataclass
class DataSplit:
    """The split of one experiment and how it was made; written to split.json and stored in checkpoints.

    Attributes:
        parts: {"train": [...], "val": [...], "test": [...]} sorted case ids.
        patients: case id -> patient id (data.groups), or None: every case is its own patient.
        folds, fold: the cross-validation fold this split is (1, 0: no cross-validation).
        separate_test: the test part names cases of data.test_root, a namespace of its own (they are neither
            checked for overlap with train/val nor grouped into patients).
        seed, fractions: how a random split was drawn (None for a split file): with them one fold's record
            rebuilds every fold of its cross-validation (`cross_validation`).
        root, test_root: the absolute folders whose cases the parts name (test_root: the test part's, when
            it is a separate folder); None in records of older la-seg versions.
        fingerprints: {part: {case id: fingerprint(case)}} of the cases the split was made on, so that it is
            never applied to other cases of the same ids (`check_same_cases`); None in older records.
    """

    parts: dict[str, list[str]]
    patients: dict[str, str] | None = None
    folds: int = 1
    fold: int = 0
    separate_test: bool = field(default=False, compare=False)
    seed: int | None = field(default=None, compare=False)
    fractions: tuple[float, float, float] | None = field(default=None, compare=False)
    root: str | None = field(default=None, compare=False)
    test_root: str | None = field(default=None, compare=False)
    fingerprints: dict[str, dict[str, dict]] | None = field(default=None, compare=False)

    def root_of(self, part: str) -> str | None:
        """The folder whose cases `part` names."""
        return self.test_root if part == "test" and self.test_root is not None else self.root

    def summary(self) -> dict[str, dict[str, int]]:
        """{part: {"patients": n, "cases": m}}."""
        return {
            part: {"patients": len({self.patient_of(part, c) for c in ids}), "cases": len(ids)}
            for part, ids in self.parts.items()
        }

    def patient_of(self, part: str, case_id: str) -> str:
        """The patient of a case of `part` (the case itself without groups or in a separate test folder)."""
        if self.patients is None or (part == "test" and self.separate_test):
            return case_id
        return self.patients.get(case_id, case_id)

    def describe(self) -> str:
        """One log line: patients and cases per part (and the fold)."""
        counts = ", ".join(
            f"{p} {s['patients']} patients / {s['cases']} cases" for p, s in self.summary().items()
        )
        return f"data split: {counts}" + (f" (fold {self.fold} of {self.folds})" if self.folds > 1 else "")

    def to_record(self) -> dict:
        """JSON-able: the parts (what data.split_file reads), then the summary, folds and patients."""
        record: dict = {**self.parts, "summary": self.summary(), "folds": self.folds, "fold": self.fold}
        if self.seed is not None and self.fractions is not None:
            record |= {"seed": self.seed, "fractions": list(self.fractions)}
        if self.patients is not None:
            record["patients"] = dict(sorted(self.patients.items()))
        for key in ("root", "test_root", "fingerprints"):
            if getattr(self, key) is not None:
                record[key] = getattr(self, key)
        return record


def parse_split(data: object, source: str, separate_test: bool = False) -> DataSplit:
    """A DataSplit from a record (to_record's, or just the parts); errors start with `source`."""
    allowed = (*PARTS, *_RECORD_KEYS)
    if not isinstance(data, dict) or set(data) - set(allowed):
        keys = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise DataError(
            f"{source} must be a JSON object with the keys {PARTS} (and {_RECORD_KEYS}), got {keys}"
        )
    parts: dict[str, list[str]] = {}
    for part in PARTS:
        ids = data.get(part, [])
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise DataError(f"{source}: {part!r} must be a list of case id strings")
        repeated = sorted({i for i in ids if ids.count(i) > 1})
        if repeated:
            raise DataError(f"{source}: {part!r} lists cases more than once: {listing(repeated)}")
        parts[part] = sorted(ids)
    # With test_root the test ids name cases of another folder (their own namespace).
    same_namespace = ("train", "val") if separate_test else PARTS
    for i, a in enumerate(same_namespace):
        for b in same_namespace[i + 1 :]:
            overlap = sorted(set(parts[a]) & set(parts[b]))
            if overlap:
                raise DataError(f"{source}: cases in both {a!r} and {b!r}: {listing(overlap)}")
    if not parts["train"]:
        raise DataError(f"{source} has no training cases")
    patients = data.get("patients")
    if patients is not None and not (
        isinstance(patients, dict) and all(isinstance(v, str) for v in (*patients, *patients.values()))
    ):
        raise DataError(f"{source}: 'patients' must map case ids to patient id strings")
    folds, fold = data.get("folds", 1), data.get("fold", 0)
    if not (isinstance(folds, int) and isinstance(fold, int)) or not 0 <= fold < max(folds, 1):
        raise DataError(
            f"{source}: 'folds' and 'fold' must be integers with 0 <= fold < folds, got {folds!r}, {fold!r}"
        )
    seed, fractions = data.get("seed"), data.get("fractions")
    if (seed is None) != (fractions is None) or (seed is not None and not isinstance(seed, int)):
        raise DataError(
            f"{source}: 'seed' (an integer) and 'fractions' come together, got {seed!r}, {fractions!r}"
        )
    if fractions is not None:
        fractions = check_fractions(fractions) if isinstance(fractions, list) else fractions
        if not isinstance(fractions, tuple):
            raise DataError(f"{source}: 'fractions' must be a list of three numbers, got {fractions!r}")
    roots = [data.get(key) for key in ("root", "test_root")]
    if not all(root is None or isinstance(root, str) for root in roots):
        raise DataError(f"{source}: 'root' and 'test_root' must be folder paths, got {roots}")
    fingerprints = data.get("fingerprints")
    if fingerprints is not None and not (
        isinstance(fingerprints, dict)
        and all(isinstance(cases, dict) for cases in fingerprints.values())
        and all(isinstance(f, dict) for cases in fingerprints.values() for f in cases.values())
    ):
        raise DataError(f"{source}: 'fingerprints' must map each part to {{case id: fingerprint}}")
    return DataSplit(parts, patients, folds, fold, separate_test, seed, fractions, *roots, fingerprints)


def read_split_file(path: str | Path, separate_test: bool = False) -> DataSplit:
    """The split.json that `fit` writes (or any file of its parts), as a DataSplit; errors name the file."""
    path = Path(path).expanduser()
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise DataError(f"cannot read the split file {path}: {error}") from None
    return parse_split(data, f"split file {path}", separate_test)


def cross_validation(split: DataSplit, source: str) -> list[DataSplit]:
    """Every fold of the cross-validation that `split` is one fold of ([split] without cross-validation).

    The folds are drawn again from the record's cases, patients, seed and fractions by `split_cases`, and
    must give back `split` itself for its own fold (else the record was edited or is not la-seg's).
    """
    if split.folds == 1:
        return [split]
    if split.seed is None or split.fractions is None:
        raise DataError(
            f"{source} is fold {split.fold} of {split.folds} but records no seed and fractions to rebuild "
            "the other folds from (written by an older la-seg?): run fit again to rewrite it"
        )
    cases = [case for part in PARTS for case in split.parts[part]]
    folds = []
    for fold in range(split.folds):
        parts = split_cases(cases, split.fractions, split.seed, split.patients, split.folds, fold)
        folds.append(DataSplit(parts, split.patients, split.folds, fold, False, split.seed, split.fractions))
    if folds[split.fold].parts != split.parts:
        raise DataError(
            f"{source}: its parts are not what its seed {split.seed} and fractions {list(split.fractions)} "
            f"give for fold {split.fold} of {split.folds}: was it edited?"
        )
    return folds


def check_patients_kept_together(split: DataSplit, source: str) -> None:
    """Every patient's cases lie in one part (test excluded when it is a separate folder)."""
    parts_of: dict[str, set[str]] = {}
    for part, ids in split.parts.items():
        if part == "test" and split.separate_test:
            continue
        for case_id in ids:
            parts_of.setdefault(split.patient_of(part, case_id), set()).add(part)
    straddling = sorted(p for p, parts in parts_of.items() if len(parts) > 1)
    if straddling:
        raise DataError(
            f"{source} puts cases of one patient into several parts; patients {listing(straddling)}"
        )


def check_known(split: DataSplit, known: Mapping[str, tuple[Collection[str], str]], source: str) -> None:
    """Every case of the parts in `known` ({part: (ids found, where)}) exists; other parts are not checked."""
    for part, (ids, where) in known.items():
        unknown = [case_id for case_id in split.parts[part] if case_id not in ids]
        if unknown:
            raise DataError(f"{source}: {part!r} names cases not found under {where}: {listing(unknown)}")
