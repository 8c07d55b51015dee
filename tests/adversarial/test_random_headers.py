"""Random NIfTI headers: la-seg either reads a usable volume or refuses the file with a DataError."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np
from hostile import raw_nifti
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from la_seg.data import read_image
from la_seg.errors import DataError

finite_or_not = st.one_of(
    st.floats(min_value=-5, max_value=5, allow_nan=False),
    st.sampled_from([0.0, math.nan, math.inf, -math.inf, 1e-30, 1e30]),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@example(  # two axes parallel, hidden by a 1e30 scale: crashed in the oblique check before it was refused
    shape=[1, 1, 1],
    matrix=[0.0, 0.0, 2.5e-36, 0.0, 1e30, 1.0, 1.0, 0.0, 0.0],
    codes=(0, 1),
    pixdim=[1.0, 1.0, 1.0],
    dtype=np.int16,
)
@given(
    shape=st.lists(st.integers(1, 6), min_size=1, max_size=5),
    matrix=st.lists(finite_or_not, min_size=9, max_size=9),
    codes=st.tuples(st.sampled_from([0, 1, 2, 4]), st.sampled_from([0, 1, 2, 4])),
    pixdim=st.lists(finite_or_not, min_size=3, max_size=3),
    dtype=st.sampled_from([np.int16, np.uint8, np.float32, np.float64, np.complex64, np.int64]),
)
def test_any_header_reads_sanely_or_is_refused(shape, matrix, codes, pixdim, dtype):
    rows = np.eye(4)[:3].copy()
    rows[:, :3] = np.asarray(matrix, dtype=np.float64).reshape(3, 3)
    data = np.arange(int(np.prod(shape)), dtype=np.float64).reshape(shape).astype(dtype)
    fields = {"qform_code": codes[0], "sform_code": codes[1], "srow_x": rows[0], "srow_y": rows[1]}
    fields |= {"srow_z": rows[2], "pixdim": np.asarray([1.0, *pixdim, 1.0, 1.0, 1.0, 1.0], dtype=np.float32)}
    with tempfile.TemporaryDirectory() as folder:
        path = raw_nifti(Path(folder) / "random.nii.gz", data, **fields)
        try:
            volume = read_image(path)
        except DataError as error:
            assert "random.nii.gz" in str(error)
            return
    spacing = np.asarray(volume.geometry.spacing)
    assert volume.data.ndim == 3 and volume.data.dtype == np.float32
    assert np.isfinite(spacing).all() and (spacing > 0).all(), spacing
    assert np.isfinite(volume.geometry.affine).all()
    assert abs(np.linalg.det(volume.geometry.affine[:3, :3])) > 0
