"""Data layer: find cases on disk, read and write volumes, synthesise phantoms."""

from la_seg.data.io import Volume, read_case, read_image, read_label, write_nifti
from la_seg.data.layouts import Case, find_cases
from la_seg.data.synthetic import write_dataset
from la_seg.errors import DataError

__all__ = [
    "Case",
    "DataError",
    "Volume",
    "find_cases",
    "read_case",
    "read_image",
    "read_label",
    "write_dataset",
    "write_nifti",
]
