"""Find the cases of a data set on disk, whatever release layout it came in.

Public data sets ship in several folder conventions and their top-level folder names change between
releases, so every layout here searches for the files that define a case rather than for fixed parents.
"""

from __future__ import annotations

import os
import re
import stat
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal, get_args

from la_seg.data.io import check_header
from la_seg.errors import DataError


@dataclass(frozen=True)
class Case:
    """One image (and its label, if any); `spacing` overrides the header's, `label_values` are the label's LA
    values (None: every non-zero voxel). Utah 2018's 0.625 mm is applied by file name when reading."""

    case_id: str
    image_path: Path
    label_path: Path | None = None
    spacing: tuple[float, float, float] | None = None
    label_values: tuple[int, ...] | None = None


Layout = Literal["auto", "lascarqs", "utah2018", "msd", "nnunet", "files"]
LAYOUTS: tuple[str, ...] = get_args(Layout)

VOLUME_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".nhdr")  # .nhdr: NRRD with a detached data file
# Files that look like images but that la-seg does not read: skipped beside files it reads, with a warning.
OTHER_IMAGE_EXTENSIONS = (
    ".mha", ".mhd", ".raw", ".raw.gz", ".hdr", ".img", ".img.gz", ".dcm", ".ima", ".mgz", ".mgh", ".gipl",
    ".gipl.gz", ".vtk", ".vti", ".nii.bz2", ".nii.xz", ".nii.zst", ".nrrd.gz", ".npy", ".npz", ".h5",
    ".tif", ".tiff",
)  # fmt: skip
# The LA value of each layout's labels (LAScarQS also marks scar, with 1); plain files: any non-zero value.
LA_VALUES: dict[str, tuple[int, ...] | None] = {
    "lascarqs": (420,),
    "utah2018": (255,),
    "msd": (1,),
    "nnunet": (1,),
    "files": None,
}

_LASCARQS_IMAGE = "enhanced.nii.gz"
_LASCARQS_LABEL = "atriumSegImgMO.nii.gz"
_UTAH_IMAGE = "lgemri.nrrd"
_UTAH_LABEL = "laendo.nrrd"
_LASCARQS_SCAR = "scarSegImgM.nii.gz"  # only task 1 has it
_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
# Stems that name a file's role in its case folder, not a patient: a lone such file takes its folder's name.
_FIXED_STEMS = frozenset(
    name.lower().removesuffix(".nii.gz").removesuffix(".nrrd")
    for name in (_LASCARQS_IMAGE, _LASCARQS_LABEL, _LASCARQS_SCAR, _UTAH_IMAGE, _UTAH_LABEL)
)

# What each layout looks for; quoted in the error when nothing matches, so a user sees what to fix.
PATTERNS = {
    "nnunet": "imagesTr/<case>_0000.nii.gz with labelsTr/<case>.nii.gz (nnU-Net raw)",
    "msd": "imagesTr/<case>.nii.gz with labelsTr/<case>.nii.gz (Medical Segmentation Decathlon)",
    "lascarqs": f"<case>/{_LASCARQS_IMAGE} with <case>/{_LASCARQS_LABEL} at any depth (LAScarQS 2022)",
    "utah2018": f"<ID>/{_UTAH_IMAGE} with <ID>/{_UTAH_LABEL} at any depth (Utah 2018 LA challenge)",
    "files": "*.nii, *.nii.gz, *.nrrd or *.nhdr files directly in the folder, or one such file",
}


def find_cases(
    root: str | Path,
    layout: Layout = "auto",
    require_labels: bool = False,
    label_values: Sequence[int] | None = None,
    spacing: Sequence[float] | None = None,
) -> list[Case]:
    """The cases under `root`, sorted by case_id, each header already checked (no voxel read), so bad
    inputs fail before any case is processed. With `require_labels` a missing label is an error;
    `label_values` replaces the layout's LA value(s), `spacing` every header's voxel size (data.spacing)."""
    root = Path(root).expanduser()
    if layout not in LAYOUTS:
        raise DataError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if not root.exists():
        raise DataError(f"data root does not exist (or is a broken link): {root}")
    if not (root.is_dir() or root.is_file()):  # reading a FIFO would wait for a writer that never comes
        raise DataError(f"data root {root} is {_special_kind(root)}, not a folder or a volume file")
    if root.is_dir() and not _listdir(root):
        raise DataError(f"data root is an empty folder: {root}")
    if layout == "auto":
        layout = _detect(root)
    cases = _FINDERS[layout](root)
    if not cases:
        raise DataError(f"no cases of layout {layout!r} under {root}; looked for {PATTERNS[layout]}")
    for case in cases:
        check_case_id(case.case_id, case.image_path)
    counts = Counter(case.case_id for case in cases)
    clashes = sorted(case_id for case_id, n in counts.items() if n > 1)
    if clashes:
        paths = [str(case.image_path) for case in cases if case.case_id in clashes]
        raise DataError(f"case ids {clashes} occur more than once under {root}: {paths}")
    if require_labels:
        check_labelled(cases)
    values = LA_VALUES[layout] if label_values is None else _check_label_values(label_values)
    given = tuple(float(s) for s in spacing) if spacing is not None else None
    cases = [replace(case, label_values=values, spacing=given or case.spacing) for case in cases]
    for case in cases:
        for path in (case.image_path, case.label_path):
            if path is not None:
                check_header(path, case.spacing)
    return sorted(cases, key=lambda case: case.case_id)


def _special_kind(path: Path) -> str:
    """What a path that is neither a folder nor a regular file is, in words."""
    mode = path.stat().st_mode
    kinds = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))  # fmt: skip
    return next((name for test, name in kinds if test(mode)), "a special file")


def check_case_id(case_id: str, source: Path) -> None:
    """A case id names output files (`<case_id>.nii.gz`): never empty, hidden (leading dot) or all dots."""
    if not case_id.strip() or case_id.startswith(".") or "/" in case_id or os.sep in case_id:
        raise DataError(
            f"cannot name a case after {source}: its case id would be {case_id!r} (empty, hidden or a "
            "path); rename the file or folder"
        )


def check_labelled(cases: Sequence[Case]) -> None:
    """The one check that labels are there where they are required."""
    unlabelled = [str(case.image_path) for case in cases if case.label_path is None]
    if unlabelled:
        raise DataError(f"labels are required but {len(unlabelled)} case(s) have none: {unlabelled[:5]}")


def _check_label_values(values: Sequence[int]) -> tuple[int, ...]:
    if isinstance(values, (str, int)) or not values:
        raise DataError(f"data.label_values must be a non-empty list of integers, got {values!r}")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v != 0 for v in values):
        raise DataError(f"data.label_values must be non-zero integers (0 is background), got {list(values)}")
    return tuple(values)


def _detect(root: Path) -> str:
    """Pick the layout from what is on disk, most specific first."""
    if root.is_file():
        return "files"
    if _dataset_dirs(root):
        return "nnunet" if _is_nnunet(_single_dataset_dir(root)) else "msd"
    if _search(root, _LASCARQS_IMAGE):
        return "lascarqs"
    if _search(root, _UTAH_IMAGE):
        return "utah2018"
    if _volume_files(root):
        return "files"
    looked_for = "; ".join(f"{name}: {pattern}" for name, pattern in PATTERNS.items())
    raise DataError(f"no known data layout under {root}. Looked for {looked_for}")


def _split_ext(name: str) -> tuple[str, str] | None:
    """Split a volume file name into (stem, extension), or None if it is not a volume file."""
    lower = name.lower()
    for ext in VOLUME_EXTENSIONS:
        if lower.endswith(ext) and len(name) > len(ext):
            return name[: -len(ext)], name[-len(ext) :]
    return None


def _walk(root: Path) -> list[tuple[Path, list[str], list[str]]]:
    """os.walk over the visible part of root, following links but each real folder once: a link back up the
    tree (`loop -> .`, `case/up -> ..`) or to a folder already searched is not followed, and named in a
    warning. A folder that cannot be listed is an error (Path.rglob would silently leave it, and every case
    in it, out)."""

    def refuse(error: OSError) -> None:
        raise DataError(f"cannot read folder {error.filename} under {root}: {error.strerror}") from error

    # Folders inside the tree are searched under their own path; links are followed only to folders elsewhere.
    inside = {_identity(Path(folder)) for folder, _, _ in os.walk(root, onerror=refuse)}
    seen, skipped, entries = set(inside), [], []
    for folder, dirs, files in os.walk(root, onerror=refuse, followlinks=True):
        kept = []
        for name in sorted(d for d in dirs if not d.startswith(".") and d != "__MACOSX"):
            path = Path(folder) / name
            identity = _identity(path)
            if not path.is_symlink():
                kept.append(name)
            elif identity in seen:
                skipped.append(path)
            else:
                seen.add(identity)
                kept.append(name)
        dirs[:] = kept
        entries.append((Path(folder), dirs, sorted(f for f in files if not f.startswith("."))))
    if skipped:
        shown = ", ".join(f"{link} -> {os.path.realpath(link)}" for link in skipped[:5])
        more = f" and {len(skipped) - 5} more" if len(skipped) > 5 else ""
        warnings.warn(
            f"symbolic link loop or repeated folder under {root}: {shown}{more} lead(s) to a folder already "
            "searched; followed once",
            stacklevel=4,
        )
    return entries


def _identity(folder: Path) -> tuple[int, int]:
    """A folder's identity on disk (links followed): the same real folder reached twice is the same."""
    try:
        status = folder.stat()
    except OSError as error:
        raise DataError(f"cannot read folder {folder}: {error.strerror or error}") from error
    return status.st_dev, status.st_ino


def _readable(path: Path) -> bool:
    """Whether a data file is there; a broken link or an unreadable file is an error, not an absent file."""
    if not os.path.lexists(path):
        return False
    if not path.is_file():
        kind = "a broken link" if path.is_symlink() else "not a regular file"
        raise DataError(f"{path} is {kind}; fix or remove it")
    if not os.access(path, os.R_OK):
        raise DataError(f"{path} is not readable (permissions); fix its permissions or remove it")
    return True


def _search(root: Path, name: str) -> list[Path]:
    """All visible files called `name` under root, at any depth."""
    found = [folder / name for folder, _, files in _walk(root) if name in files]
    return [path for path in found if _readable(path)]


def _unique_ids(folders: list[Path], root: Path) -> list[str]:
    """Folder names as ids; where two clash, prefix parents until they differ (task1/train_1 vs task2/...)."""
    # a case folder that is root itself is named after the resolved folder (`.` and `..` name nothing)
    parts = [folder.relative_to(root).parts or (folder.resolve().name,) for folder in folders]
    depth = [1] * len(folders)
    while True:
        ids = ["_".join(p[-d:]) for p, d in zip(parts, depth, strict=True)]
        counts = Counter(ids)
        growing = [i for i, case_id in enumerate(ids) if counts[case_id] > 1 and depth[i] < len(parts[i])]
        if not growing:
            return ids
        for i in growing:
            depth[i] += 1


def _folder_cases(root: Path, image_name: str, label_name: str) -> list[Case]:
    """Cases that are folders holding a fixed image file name and, optionally, a fixed label file name."""
    images = _search(root, image_name)
    folders = [image.parent for image in images]
    cases = []
    for case_id, folder, image in zip(_unique_ids(folders, root), folders, images, strict=True):
        label = folder / label_name
        cases.append(Case(case_id, image, label if _readable(label) else None))
    return cases


def _find_lascarqs(root: Path) -> list[Case]:
    if root.is_file():
        raise DataError(f"layout 'lascarqs' needs a folder, got the file {root}")
    cases = _folder_cases(root, _LASCARQS_IMAGE, _LASCARQS_LABEL)
    _warn_pooled_tasks(cases)
    return cases


def _warn_pooled_tasks(cases: list[Case]) -> None:
    """LAScarQS task 1 (with scar labels) and task 2 share patients: pooled, splits leak cases."""
    folders = [case.image_path.parent for case in cases]
    task1 = [folder for folder in folders if (folder / _LASCARQS_SCAR).is_file()]
    task2 = [folder for folder in folders if not (folder / _LASCARQS_SCAR).is_file()]
    if task1 and task2:
        warnings.warn(
            f"LAScarQS task 1 cases (with {_LASCARQS_SCAR}, under {os.path.commonpath(task1)}) are pooled "
            f"with task 2 cases (under {os.path.commonpath(task2)}); the same patients appear in both "
            "tasks, so splits would leak: point data.root at one task",
            stacklevel=4,
        )


def _find_utah(root: Path) -> list[Case]:
    if root.is_file():
        raise DataError(f"layout 'utah2018' needs a folder, got the file {root}")
    return _folder_cases(root, _UTAH_IMAGE, _UTAH_LABEL)


def _listdir(folder: Path) -> list[Path]:
    """The entries of a folder, sorted; a folder that cannot be listed is an error, naming it."""
    try:
        return sorted(folder.iterdir())
    except OSError as error:
        raise DataError(f"cannot read folder {folder}: {error.strerror or error}") from error


def _volume_files(folder: Path) -> list[Path]:
    """Visible volume files directly in `folder` (no recursion, so label sub-folders stay out)."""
    return [p for p in _listdir(folder) if not p.name.startswith(".") and _split_ext(p.name) and _readable(p)]


def _strip(name: str, extensions: tuple[str, ...]) -> str | None:
    """`name` without the first of `extensions` it ends with (letter case ignored), or None."""
    return next((name[: -len(ext)] for ext in extensions if name.lower().endswith(ext)), None)


def _warn_skipped_images(folder: Path, read: list[Path]) -> None:
    """Warn naming every file in `folder` that looks like an image la-seg does not read (a .raw beside a
    .nhdr that is read is that header's data, not an image of its own)."""
    data_of_read = {p.name[: -len(".nhdr")] for p in read if p.name.lower().endswith(".nhdr")}
    skipped = [
        str(p)
        for p in _listdir(folder)
        if p not in read
        and not p.name.startswith(".")
        and p.name.lower().endswith(OTHER_IMAGE_EXTENSIONS)
        and _strip(p.name, (".raw.gz", ".raw")) not in data_of_read
    ]
    if skipped:
        warnings.warn(
            f"skipped {len(skipped)} file(s) under {folder} that look like images but are not read (la-seg "
            f"reads {', '.join(VOLUME_EXTENSIONS)}; convert them to read them): {skipped}",
            stacklevel=4,
        )


def _dataset_dirs(root: Path) -> list[Path]:
    """Folders holding an imagesTr folder with a volume file in it: root, its parent, or below root."""
    if root.is_file():
        return []
    if root.name == "imagesTr":
        candidates = [root.parent]
    elif (root / "imagesTr").is_dir():
        candidates = [root]
    else:
        candidates = [folder for folder, dirs, _ in _walk(root) if "imagesTr" in dirs]
    return [c for c in candidates if _volume_files(c / "imagesTr")]


def _single_dataset_dir(root: Path) -> Path:
    dirs = _dataset_dirs(root)
    if not dirs:
        raise DataError(f"no imagesTr folder with images under {root}; looked for {PATTERNS['nnunet']}")
    if len(dirs) > 1:
        found = [str(d) for d in dirs]
        raise DataError(f"several data sets with imagesTr under {root}: {found}; point the root at one")
    return dirs[0]


def _is_nnunet(dataset: Path) -> bool:
    """nnU-Net names images <case>_0000; the Decathlon release does not."""
    for image in _volume_files(dataset / "imagesTr"):
        stem, _ = _split_ext(image.name)
        if _CHANNEL.match(stem):
            return True
    return False


def _label_for(labels_dir: Path, case: str, ext: str) -> Path | None:
    """The label with the image's extension, else with any volume extension."""
    for suffix in (ext, *VOLUME_EXTENSIONS):
        label = labels_dir / f"{case}{suffix}"
        if _readable(label):
            return label
    return None


def _find_msd(root: Path) -> list[Case]:
    return _images_tr_cases(root, lambda stem: stem)


def _find_nnunet(root: Path) -> list[Case]:
    """Only channel _0000 starts a case: further channels (_0001, ...) belong to the same case."""

    def case_of(stem: str) -> str | None:
        match = _CHANNEL.match(stem)
        return match["case"] if match and match["channel"] == "0000" else None

    return _images_tr_cases(root, case_of)


def _images_tr_cases(root: Path, case_of: Callable[[str], str | None]) -> list[Case]:
    """imagesTr/<file> with labelsTr/<case>.<ext>; `case_of` maps a file stem to its case (None: skip)."""
    dataset = _single_dataset_dir(root)
    cases = []
    _warn_skipped_images(dataset / "imagesTr", _volume_files(dataset / "imagesTr"))
    for image in _volume_files(dataset / "imagesTr"):
        stem, ext = _split_ext(image.name)
        case_id = case_of(stem)
        if case_id is not None:
            cases.append(Case(case_id, image, _label_for(dataset / "labelsTr", case_id, ext)))
    return cases


def _find_files(root: Path) -> list[Case]:
    if root.is_file():
        split = _split_ext(root.name)
        if split is None:
            raise DataError(f"{root} is not a volume file; expected one of {', '.join(VOLUME_EXTENSIONS)}")
        files = [root]
    else:
        files = _volume_files(root)
        _warn_skipped_images(root, files)
    stems = {_split_ext(f.name)[0] for f in files}
    cases = []
    for image in files:
        stem = _split_ext(image.name)[0]
        match = _CHANNEL.match(stem)
        if match and match["channel"] != "0000" and f"{match['case']}_0000" in stems:
            continue  # an extra channel of an nnU-Net style case: only _0000 is the LGE image
        case_id = match["case"] if match and match["channel"] == "0000" else stem
        if root.is_file() and stem.lower() in _FIXED_STEMS:  # train_7/enhanced.nii.gz is case train_7
            case_id = Path(os.path.abspath(image)).parent.name
        cases.append(Case(case_id, image))
    return cases


_FINDERS: dict[str, Callable[[Path], list[Case]]] = {
    "lascarqs": _find_lascarqs,
    "utah2018": _find_utah,
    "msd": _find_msd,
    "nnunet": _find_nnunet,
    "files": _find_files,
}
