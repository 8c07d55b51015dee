"""Data layer: find cases on disk, read and write volumes, synthesise phantoms."""

from la_seg.data.io import (
    Geometry,
    Volume,
    check_header,
    read_case,
    read_image,
    read_label,
    through_plane_axis,
    write_nifti,
)
from la_seg.data.layouts import Case, find_cases
from la_seg.data.synthetic import write_dataset
from la_seg.errors import DataError

__all__ = [
    "Case",
    "DataError",
    "Geometry",
    "Volume",
    "check_header",
    "find_cases",
    "read_case",
    "read_image",
    "read_label",
    "through_plane_axis",
    "write_dataset",
    "write_nifti",
]
