"""MONAI's random intensity transforms as albumentations transforms.

Each draw's seed comes from albumentations' generator, which every DataLoader worker reseeds, so workers do
not augment in lockstep, and the transform composes with the other augmentations. Subclasses name the MONAI
transform; used by la_seg.data.bias_field and la_seg.data.histogram_shift.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any

import albumentations as A
import numpy as np
from monai.transforms import Randomizable


class SeededMonaiTransform(A.ImageOnlyTransform):
    """Applies `monai_transform()` (a fresh MONAI Randomizable, prob 1) to an (H, W, C) float image, seeded
    from albumentations' generator; one draw is shared by the channels."""

    @abstractmethod  # albumentations' metaclass derives from ABCMeta: the base cannot be instantiated
    def monai_transform(self) -> Randomizable:
        """A fresh MONAI random transform with prob 1, drawn anew for every image."""

    def get_params(self) -> dict[str, Any]:
        return {"seed": int(self.random_generator.integers(2**31 - 1))}

    def apply(self, img: np.ndarray, seed: int, **params: Any) -> np.ndarray:
        transform = self.monai_transform()
        transform.set_random_state(seed=seed)
        out = np.asarray(transform(np.moveaxis(img, -1, 0)))  # MONAI's images are channel-first
        return np.ascontiguousarray(np.moveaxis(out, 0, -1), dtype=img.dtype)
