"""An MRI coil's bias field as a training augmentation: a smooth multiplicative intensity field.

A receive coil makes one side of a scan brighter than the other; a model trained on a few scans learns the
grey values their fields happened to give the atrium and misses the part another scan's field darkens.
MONAI's RandBiasField draws the field (the exponential of Legendre polynomials); this module only makes it
an albumentations transform, so that it draws from albumentations' generator (which each DataLoader worker
reseeds) and composes with the other augmentations. Imported by `build_train_transform` only.
"""

from __future__ import annotations

from typing import Any

import albumentations as A
import numpy as np
from monai.transforms import RandBiasField

# MONAI's defaults: polynomials up to degree 3, coefficients drawn from [0, 0.1]. Across a slice the field's
# brightest point is then about 1.8 times its darkest (median of draws); the `varied` phantoms' fields span
# about 2.3 across their field of view.
DEGREE = 3
COEFF_RANGE = (0.0, 0.1)


class BiasField(A.ImageOnlyTransform):
    """Multiplies an (H, W, C) float image by one smooth random field shared by its channels."""

    def get_params(self) -> dict[str, Any]:
        return {"seed": int(self.random_generator.integers(2**31 - 1))}

    def apply(self, img: np.ndarray, seed: int, **params: Any) -> np.ndarray:
        field = RandBiasField(degree=DEGREE, coeff_range=COEFF_RANGE, prob=1.0)
        field.set_random_state(seed=seed)
        out = np.asarray(field(np.moveaxis(img, -1, 0)))
        return np.ascontiguousarray(np.moveaxis(out, 0, -1), dtype=img.dtype)
