"""Generators of hostile inputs, one family per class of failure.

Each maker takes a folder to create and returns the path to hand to `la-seg` (a file or a folder) together
with the text the error line must contain (the file or option a user has to fix). The makers start from a
valid small phantom and break exactly one thing, so a test that fails points at one class of failure.
"""

from __future__ import annotations

import gzip
import pickle
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np

from la_seg.data.synthetic import synthesize_case

SHAPE = (48, 44, 10)
SPACING = (1.6, 1.6, 4.0)
AFFINE = np.diag([*SPACING, 1.0])

Maker = Callable[[Path], tuple[Path, str]]


def phantom(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A small image (int16) and its LA label (uint16, 420)."""
    return synthesize_case(np.random.default_rng(seed), shape=SHAPE, spacing=SPACING)


def save_nifti(path: Path, data: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def valid_image(folder: Path, name: str = "case.nii.gz", seed: int = 0) -> Path:
    return save_nifti(folder / name, phantom(seed)[0])


# ---- corrupt containers ------------------------------------------------------------------------------
def _truncated_gzip(folder: Path) -> tuple[Path, str]:
    path = valid_image(folder)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 6 // 10])
    return path, path.name


def _flipped_bytes(folder: Path) -> tuple[Path, str]:
    """Bytes flipped in the middle of the deflate stream: nibabel never reaches the gzip CRC."""
    path = valid_image(folder)
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    for i in range(middle, middle + 16):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    return path, path.name


def _zero_byte(suffix: str) -> Maker:
    def make(folder: Path) -> tuple[Path, str]:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"case{suffix}"
        path.write_bytes(b"")
        return path, path.name

    return make


def _gzip_of_noise(folder: Path) -> tuple[Path, str]:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "case.nii.gz"
    path.write_bytes(gzip.compress(np.random.default_rng(1).bytes(4096)))
    return path, path.name


def _noise_named_gzip(folder: Path) -> tuple[Path, str]:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "case.nii.gz"
    path.write_bytes(np.random.default_rng(2).bytes(4096))
    return path, path.name


def _nrrd_garbage_header(folder: Path) -> tuple[Path, str]:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "lgemri.nrrd"
    path.write_bytes(b"NRRD0004\ntype: nonsense\ndimension: banana\n\n\x00\x01")
    return path, path.name


def _nrrd_truncated(folder: Path) -> tuple[Path, str]:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "lgemri.nrrd"
    nrrd.write(str(path), phantom()[0], {"encoding": "raw"})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path, path.name


def _directory_named_like_a_volume(folder: Path) -> tuple[Path, str]:
    (folder / "case.nii.gz").mkdir(parents=True)
    return folder, folder.name


CORRUPT_CONTAINERS: dict[str, Maker] = {
    "truncated_gzip": _truncated_gzip,
    "flipped_bytes": _flipped_bytes,
    "zero_byte_nii_gz": _zero_byte(".nii.gz"),
    "zero_byte_nii": _zero_byte(".nii"),
    "zero_byte_nrrd": _zero_byte(".nrrd"),
    "gzip_of_noise": _gzip_of_noise,
    "noise_named_gzip": _noise_named_gzip,
    "nrrd_garbage_header": _nrrd_garbage_header,
    "nrrd_truncated": _nrrd_truncated,
    "directory_named_like_a_volume": _directory_named_like_a_volume,
}


# ---- bad headers and geometry ------------------------------------------------------------------------
def raw_nifti(path: Path, data: np.ndarray, **fields) -> Path:
    """A .nii.gz whose header fields are set byte for byte: nibabel's writer would repair (or refuse) them."""
    header = nib.Nifti1Header()
    header.set_data_shape(data.shape)
    header.set_data_dtype(data.dtype)
    header.set_sform(AFFINE, code=1)
    header.set_qform(AFFINE, code=1)
    header["vox_offset"] = 352
    for name, value in fields.items():
        header[name] = value
    payload = header.binaryblock + b"\x00" * 4 + np.asarray(data).tobytes(order="F")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(payload, mtime=0))
    return path


def _with_affine(affine: np.ndarray) -> Maker:
    """The affine as the only (sform) orientation."""

    def make(folder: Path) -> tuple[Path, str]:
        rows = {f"srow_{axis}": affine[i] for i, axis in enumerate("xyz")}
        path = raw_nifti(folder / "case.nii.gz", phantom()[0], qform_code=0, sform_code=1, **rows)
        return path, path.name

    return make


def _zero_pixdim_without_codes(folder: Path) -> tuple[Path, str]:
    """qform and sform codes 0: readers fall back to pixdim, which says 0 mm."""
    pixdim = np.array([1.0, 1.6, 0.0, 4.0, 1.0, 1.0, 1.0, 1.0], dtype=np.float32)
    path = raw_nifti(folder / "case.nii.gz", phantom()[0], qform_code=0, sform_code=0, pixdim=pixdim)
    return path, path.name


def _huge_header(folder: Path) -> tuple[Path, str]:
    """A header that claims a 30000^3 int16 volume (54 TB) in front of a few bytes of data."""
    header = nib.Nifti1Header()
    header.set_data_dtype(np.int16)
    header.set_data_shape((30000, 30000, 30000))
    header.set_zooms((1.0, 1.0, 1.0))
    header.set_sform(np.eye(4), code=1)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "case.nii"
    path.write_bytes(header.binaryblock + b"\x00" * 4 + b"\x00" * 1024)
    return path, path.name


def _nrrd_zero_directions(folder: Path) -> tuple[Path, str]:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "scan.nrrd"
    header = {"space": "left-posterior-superior", "space directions": np.zeros((3, 3))}
    nrrd.write(str(path), phantom()[0], header)
    return path, path.name


def _with_shape(shape: tuple[int, ...]) -> Maker:
    def make(folder: Path) -> tuple[Path, str]:
        data = np.random.default_rng(3).integers(0, 500, size=shape).astype(np.int16)
        path = save_nifti(folder / "case.nii.gz", data)
        return path, path.name

    return make


_SINGULAR = AFFINE.copy()
_SINGULAR[:3, 1] = 0.0
_NAN = AFFINE.copy()
_NAN[0, 0] = np.nan

BAD_GEOMETRY: dict[str, Maker] = {
    "zero_spacing_in_sform": _with_affine(np.diag([1.6, 0.0, 4.0, 1.0])),
    "singular_affine": _with_affine(_SINGULAR),
    "nan_affine": _with_affine(_NAN),
    "zero_pixdim_without_codes": _zero_pixdim_without_codes,
    "huge_header": _huge_header,
    "nrrd_zero_directions": _nrrd_zero_directions,
    "two_dimensional": _with_shape((48, 44)),
    "four_dimensional_series": _with_shape((48, 44, 10, 2)),
}


# ---- wrong data types (images) -----------------------------------------------------------------------
def _typed_image(dtype) -> Maker:
    def make(folder: Path) -> tuple[Path, str]:
        image = phantom()[0]
        if np.dtype(dtype).names:  # RGB: a structured (R, G, B) uint8 type
            data = np.zeros(image.shape, dtype=dtype)
            for channel in np.dtype(dtype).names:
                data[channel] = np.clip(image // 4, 0, 255)
        else:
            data = image.astype(dtype)
        path = save_nifti(folder / "case.nii.gz", data)
        return path, path.name

    return make


BAD_IMAGE_TYPES: dict[str, Maker] = {
    "rgb": _typed_image(np.dtype([("R", "u1"), ("G", "u1"), ("B", "u1")])),
    "complex": _typed_image(np.complex64),
}


# ---- wrong labels (a LAScarQS-style test folder of one case) -----------------------------------------
def _case_with_label(label_of: Callable[[np.ndarray], np.ndarray], affine=AFFINE) -> Maker:
    def make(folder: Path) -> tuple[Path, str]:
        image, label = phantom()
        case = folder / "train_1"
        save_nifti(case / "enhanced.nii.gz", image)
        label_path = save_nifti(case / "atriumSegImgMO.nii.gz", label_of(label), affine)
        return folder, label_path.name

    return make


def _float_noise(label: np.ndarray) -> np.ndarray:
    return (label > 0).astype(np.float32) + np.float32(1e-6)


_SHIFTED = AFFINE.copy()
_SHIFTED[:3, 3] = [5.0, 0.0, 0.0]

BAD_LABELS: dict[str, Maker] = {
    "float_noise": _case_with_label(_float_noise),
    "other_shape": _case_with_label(lambda label: label[:-2]),
    "other_affine": _case_with_label(lambda label: label, _SHIFTED),
}


# ---- hostile names -----------------------------------------------------------------------------------
def _named(*names: str) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        for seed, name in enumerate(names):
            valid_image(folder, name, seed)
        return folder

    return make


COLLIDING_NAMES: dict[str, tuple[Callable[[Path], Path], list[str]]] = {
    # with --writer.save_probabilities true, case "c"'s probability map is c_prob.nii.gz: case "c_prob"'s mask
    "mask_vs_probability": (_named("c.nii.gz", "c_prob.nii.gz"), ["--writer.save_probabilities", "true"]),
    # one file system's two names are another's one (macOS, Windows)
    "case_insensitive": (_named("Case.nii.gz", "case.nii.gz"), []),
}

VALID_ODD_NAMES = ("with space.nii.gz", "ünïcödé.nii.gz", "-dash.nii.gz", "dots.in.name.nii.gz")


# ---- hostile checkpoints -----------------------------------------------------------------------------
class _RunsCode:
    """Unpickling this runs code: it touches a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _pickle_bomb(real: Path, folder: Path) -> tuple[Path, str]:
    import torch

    checkpoint = torch.load(real, map_location="cpu", weights_only=True)
    checkpoint["payload"] = _RunsCode(folder / "code_ran")
    path = folder / "best.ckpt"
    torch.save(checkpoint, path)
    return path, path.name


def _bytes_of(make_bytes: Callable[[bytes], bytes]) -> Callable[[Path, Path], tuple[Path, str]]:
    def make(real: Path, folder: Path) -> tuple[Path, str]:
        path = folder / "model.ckpt"
        path.write_bytes(make_bytes(real.read_bytes()))
        return path, path.name

    return make


def _directory(real: Path, folder: Path) -> tuple[Path, str]:
    path = folder / "model.ckpt"
    path.mkdir()
    return path, path.name


def _not_a_lightning_checkpoint(real: Path, folder: Path) -> tuple[Path, str]:
    import torch

    path = folder / "model.ckpt"
    torch.save({"weights": torch.zeros(3)}, path)
    return path, path.name


def _other_model_size(real: Path, folder: Path) -> tuple[Path, str]:
    """The same record with every tensor of another width: a checkpoint of a bigger model."""
    import torch

    checkpoint = torch.load(real, map_location="cpu", weights_only=True)
    checkpoint["state_dict"] = {
        key: torch.zeros(*(s + 1 for s in value.shape)) if value.ndim else value
        for key, value in checkpoint["state_dict"].items()
    }
    path = folder / "model.ckpt"
    torch.save(checkpoint, path)
    return path, path.name


HOSTILE_CHECKPOINTS: dict[str, Callable[[Path, Path], tuple[Path, str]]] = {
    "pickled_code": _pickle_bomb,
    "zero_byte": _bytes_of(lambda data: b""),
    "truncated": _bytes_of(lambda data: data[: len(data) // 2]),
    "noise": _bytes_of(lambda data: np.random.default_rng(4).bytes(len(data))),
    "text": _bytes_of(lambda data: b"model: big\n"),
    "plain_pickle": _bytes_of(lambda data: pickle.dumps({"state_dict": {}})),
    "directory": _directory,
    "not_a_lightning_checkpoint": _not_a_lightning_checkpoint,
    "other_model_size": _other_model_size,
}
