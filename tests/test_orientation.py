"""End to end: a volume stored with its through-plane axis first gets the same mask as the same image stored
axial-last, written back on its own grid (correctness issue: slice orientation is checked, not assumed)."""

import nibabel as nib
import numpy as np
from tiny_options import TINY_CLI

from la_seg.cli import main
from la_seg.data.synthetic import synthesize_case

TINY = [
    *TINY_CLI,
    "--untrained", "true",  # seed_everything gives both runs the same weights; only the slicing may differ
]  # fmt: skip


def test_through_plane_first_volume_gets_the_axial_mask_back(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spacing = (0.8, 0.8, 3.0)
    image, _ = synthesize_case(np.random.default_rng(5), shape=(40, 36, 9), spacing=spacing)
    affine = np.diag([*spacing, 1.0])
    order = (2, 0, 1)  # stored slices-first: array axis 0 is the through-plane axis
    (tmp_path / "axial").mkdir()
    (tmp_path / "slices_first").mkdir()
    nib.save(nib.Nifti1Image(image, affine), tmp_path / "axial" / "c.nii.gz")
    nib.save(
        nib.Nifti1Image(np.transpose(image, order), affine[:, [*order, 3]]),
        tmp_path / "slices_first" / "c.nii.gz",
    )
    for name in ("axial", "slices_first"):
        out = ["--writer.output_dir", str(tmp_path / f"out_{name}"), "--writer.save_probabilities", "true"]
        main(["predict", *TINY, "--data.predict_root", str(tmp_path / name), *out])
    axial = nib.load(tmp_path / "out_axial" / "c_prob.nii.gz")
    stored = nib.load(tmp_path / "out_slices_first" / "c_prob.nii.gz")
    assert stored.shape == (9, 40, 36)  # the input's own grid ...
    np.testing.assert_allclose(stored.affine, affine[:, [*order, 3]])  # ... and geometry
    back = np.transpose(np.asarray(stored.dataobj), np.argsort(order))
    np.testing.assert_allclose(back, np.asarray(axial.dataobj), atol=1e-5)
    assert np.asarray(axial.dataobj).std() > 0  # a real probability map, not a constant
