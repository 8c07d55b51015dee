"""Training augmentation of resized slices (albumentations 2.x API).

Transforms run on the (S, S, 3) float32 image in [0, 1] and the (S, S) uint8 mask *after* the slice has been
resized to the model input size, so geometric parameters mean the same thing for every source resolution.
Geometric transforms move the mask with the image (nearest-neighbour for the mask); intensity transforms touch
the image only.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

# Elastic deformation strength (pixels of the resized slice) and smoothness: mild, local warps of a few pixels
# at 448 px, which keep the atrium plausible.
ELASTIC_ALPHA = 100.0
ELASTIC_SIGMA = 10.0


@dataclass(frozen=True)
class AugmentationConfig:
    """Random augmentation of training slices; every transform fires independently with probability `p`.

    Attributes:
        enabled: apply augmentation at all (False: training slices are only resized).
        rotate_limit: maximum in-plane rotation in degrees (uniform in [-limit, limit]); 0 disables.
        scale_limit: maximum relative zoom, scale drawn from [1 - limit, 1 + limit]; 0 disables.
        shift_limit: maximum translation as a fraction of the slice size, per axis; 0 disables.
        elastic: mild elastic deformation (a smooth random displacement field of a few pixels).
        brightness_contrast: maximum relative brightness and contrast change; 0 disables.
        gamma: range of the random gamma correction in percent, e.g. (80, 120) = gamma 0.8 to 1.2;
            (100, 100) disables.
        surroundings_brightening: the largest relative brightening of everything outside the atrium (wall,
            myocardium, fat, neighbours) while the atrium keeps its grey values: the gain is drawn from
            [1, 1 + limit] per slice (`la_seg.data.surroundings`); 0 disables. Scans differ in how bright
            their tissue is relative to the blood pool, and a model trained on a few learns theirs.
        bias_field: a smooth multiplicative intensity field across the slice, as an MRI coil's bias field
            brightens one side of a scan (`la_seg.data.bias_field`). Off by default: on the few-hearts
            phantom benchmark it changed Dice by less than one seed's spread (benchmarks/README.md, round 16).
        histogram_shift: a random monotone curve through the grey values (`la_seg.data.histogram_shift`):
            tissues change brightness relative to each other, as they do between scanners. Off by default:
            on the adult-heart benchmark it fixed most of a low-contrast heart's wall called LA, and the
            held-out setting missed more of its LA (benchmarks/README.md, round 23).
        noise: additive Gaussian noise (standard deviation 1 to 5 % of the intensity range).
        blur: Gaussian blur (sigma 0.1 to 1 pixel), mimicking lower in-plane resolution.
        hflip: random flip of the slice's second axis (the volume's Y). Off by default: it mirrors the
            anatomy (the LA sits on one side of the heart), which the test data never shows.
        vflip: random flip of the slice's first axis (the volume's X). Off by default, as hflip. Test-time
            flips (`model.tta: flips`) need a model trained with both, so that it is invariant to them.
        p: probability of each enabled transform.
    """

    enabled: bool = True
    rotate_limit: float = 15.0
    scale_limit: float = 0.1
    shift_limit: float = 0.0625
    elastic: bool = True
    brightness_contrast: float = 0.2
    gamma: tuple[float, float] = (80.0, 120.0)
    surroundings_brightening: float = 0.5
    bias_field: bool = False
    histogram_shift: bool = False
    noise: bool = True
    blur: bool = True
    hflip: bool = False
    vflip: bool = False
    p: float = 0.5

    def __post_init__(self) -> None:
        for name in (
            "rotate_limit",
            "scale_limit",
            "shift_limit",
            "brightness_contrast",
            "surroundings_brightening",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"augmentation.{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.scale_limit < 1.0:
            raise ValueError(f"augmentation.scale_limit must be in [0, 1), got {self.scale_limit}")
        if not 0.0 <= self.p <= 1.0:
            raise ValueError(f"augmentation.p must be in [0, 1], got {self.p}")
        gamma = tuple(self.gamma)
        if len(gamma) != 2 or not 0 < gamma[0] <= gamma[1]:
            raise ValueError(
                f"augmentation.gamma must be (low, high) percent with 0 < low <= high, got {self.gamma}"
            )
        object.__setattr__(self, "gamma", (float(gamma[0]), float(gamma[1])))


def build_train_transform(cfg: AugmentationConfig) -> Callable[..., dict] | None:
    """The training transform described by `cfg` (an albumentations Compose); None when augmentation is
    disabled or every part is off."""
    # Imported here, for training only: evaluation and predict do without albumentations and OpenCV (even as
    # a type: jsonargparse runs a TYPE_CHECKING import of a module whose class it reads). albumentations asks
    # PyPI for a newer version on import (a network call, and a warning offline) unless told not to.
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    import albumentations as A
    import cv2

    if not cfg.enabled:
        return None
    border = {"border_mode": cv2.BORDER_CONSTANT, "fill": 0, "fill_mask": 0}
    transforms: list[A.BasicTransform] = []
    if cfg.hflip:
        transforms.append(A.HorizontalFlip(p=cfg.p))
    if cfg.vflip:
        transforms.append(A.VerticalFlip(p=cfg.p))
    if cfg.rotate_limit > 0 or cfg.scale_limit > 0 or cfg.shift_limit > 0:
        transforms.append(
            A.Affine(
                scale=(1.0 - cfg.scale_limit, 1.0 + cfg.scale_limit),
                translate_percent=(-cfg.shift_limit, cfg.shift_limit),
                rotate=(-cfg.rotate_limit, cfg.rotate_limit),
                interpolation=cv2.INTER_LINEAR,
                mask_interpolation=cv2.INTER_NEAREST,
                p=cfg.p,
                **border,
            )
        )
    if cfg.elastic:
        transforms.append(
            A.ElasticTransform(
                alpha=ELASTIC_ALPHA,
                sigma=ELASTIC_SIGMA,
                interpolation=cv2.INTER_LINEAR,
                mask_interpolation=cv2.INTER_NEAREST,
                p=cfg.p,
                **border,
            )
        )
    if cfg.surroundings_brightening > 0:  # after the geometric transforms: it reads the mask they moved
        from la_seg.data.surroundings import BrightenSurroundings

        transforms.append(BrightenSurroundings(limit=cfg.surroundings_brightening, p=cfg.p))
    if cfg.bias_field:
        from la_seg.data.bias_field import BiasField

        transforms.append(BiasField(p=cfg.p))
    if cfg.histogram_shift:
        from la_seg.data.histogram_shift import HistogramShift

        transforms.append(HistogramShift(p=cfg.p))
    # Gamma before anything that can push values outside [0, 1] (a power of a negative value is NaN).
    if cfg.gamma != (100.0, 100.0):
        transforms.append(A.RandomGamma(gamma_limit=cfg.gamma, p=cfg.p))
    if cfg.brightness_contrast > 0:
        limit = (-cfg.brightness_contrast, cfg.brightness_contrast)
        transforms.append(A.RandomBrightnessContrast(brightness_limit=limit, contrast_limit=limit, p=cfg.p))
    if cfg.noise:
        # One noise field for all channels: with repeated grey channels they are one image.
        transforms.append(A.GaussNoise(std_range=(0.01, 0.05), per_channel=False, p=cfg.p))
    if cfg.blur:
        transforms.append(A.GaussianBlur(sigma_limit=(0.1, 1.0), p=cfg.p))
    return A.Compose(transforms) if transforms else None
