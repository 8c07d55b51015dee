"""An MRI coil's bias field as a training augmentation: a smooth multiplicative intensity field.

A receive coil makes one side of a scan brighter than the other; a model trained on a few scans learns the
grey values their fields happened to give the atrium and misses the part another scan's field darkens.
MONAI's RandBiasField draws the field (the exponential of Legendre polynomials); la_seg.data.seeded_monai
makes it an albumentations transform. Imported by `build_train_transform` only.
"""

from __future__ import annotations

from monai.transforms import RandBiasField

from la_seg.data.seeded_monai import SeededMonaiTransform

# MONAI's defaults: polynomials up to degree 3, coefficients drawn from [0, 0.1]. Across a slice the field's
# brightest point is then about 1.8 times its darkest (median of draws); the `varied` phantoms' fields span
# about 2.3 across their field of view.
DEGREE = 3
COEFF_RANGE = (0.0, 0.1)


class BiasField(SeededMonaiTransform):
    """Multiplies an (H, W, C) float image by one smooth random field shared by its channels."""

    def monai_transform(self) -> RandBiasField:
        return RandBiasField(degree=DEGREE, coeff_range=COEFF_RANGE, prob=1.0)
