"""The atrium's surroundings brightened as a training augmentation: the contrast of blood pool to wall,
myocardium, fat and neighbours varies from scan to scan (contrast dose, inversion time, field strength).

A model trained on a few scans learns the contrast those scans happened to have; on a scan whose tissue
is brighter relative to the blood pool it finds the atrium's core and stops (benchmarks/README.md, round
17). Generic brightness, contrast and gamma changes move atrium and surroundings together and do not teach
that, so this transform, reading the training slice's mask, multiplies everything outside the atrium by a
random gain while the atrium keeps its grey values. The mask is blurred first, so the gain rises over a
pixel or two as a partial-volume boundary does, not in a step that would mark the boundary for the model.
Imported by `build_train_transform` only.
"""

from __future__ import annotations

from typing import Any

import albumentations as A
import cv2
import numpy as np

# Standard deviation (pixels of the model input) of the blur that turns the mask into the gain's weight.
EDGE_SIGMA_PX = 1.5


class BrightenSurroundings(A.ImageOnlyTransform):
    """Multiplies an (H, W, C) float image in [0, 1] outside the mask's atrium by a gain drawn from
    [1, 1 + `limit`], clipping at 1; a slice without atrium is left as it is."""

    def __init__(self, limit: float, p: float = 0.5) -> None:
        super().__init__(p=p)
        self.limit = limit

    @property
    def targets_as_params(self) -> list[str]:
        return ["mask"]  # albumentations then refuses a call without one, naming it

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        gain = float(self.random_generator.uniform(1.0, 1.0 + self.limit))
        return {"gain": gain, "atrium": np.asarray(data["mask"], dtype=np.float32)}

    def apply(self, img: np.ndarray, gain: float, atrium: np.ndarray, **params: Any) -> np.ndarray:
        if not atrium.any():
            return img
        inside = cv2.GaussianBlur(atrium, (0, 0), EDGE_SIGMA_PX)
        field = 1.0 + (gain - 1.0) * (1.0 - inside)
        return np.clip(img * field[..., None], 0.0, 1.0).astype(img.dtype)
