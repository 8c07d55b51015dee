"""A random monotone remapping of grey values as a training augmentation: tissues change brightness relative
to each other, not only all together.

Scanners and sequences differ in how bright blood, myocardium, fat and an enhanced wall are relative to one
another (blood 1.2 to 8 times the myocardium); brightness, contrast and gamma move every tissue together, so
a model trained on a few scans still learns their ratios. MONAI's RandHistogramShift draws a random monotone
piecewise-linear curve over the image's range (its ends fixed); la_seg.data.seeded_monai makes it an
albumentations transform. Imported by `build_train_transform` only.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from monai.transforms import RandHistogramShift

from la_seg.data.seeded_monai import SeededMonaiTransform

# Control points of the curve, drawn per slice from this range: fewer points, larger shifts. MONAI's default
# is 10; 4 to 8 moves a mid-grey tissue by up to about a quarter of the range.
CONTROL_POINTS = (4, 8)


class HistogramShift(SeededMonaiTransform):
    """Maps an (H, W, C) float image through one random monotone curve shared by its channels."""

    def monai_transform(self) -> RandHistogramShift:
        return RandHistogramShift(num_control_points=CONTROL_POINTS, prob=1.0)

    def apply(self, img: np.ndarray, seed: int, **params: Any) -> np.ndarray:
        if not img.max() > img.min():  # a blank slice: nothing to remap (MONAI would warn)
            return img
        return super().apply(img, seed, **params)
