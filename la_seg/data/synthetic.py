"""LGE-MRI-like phantoms of the left atrium, written as a LAScarQS task-2 tree, for the demo and the tests.

Each case has a bright LA blood pool (body, four pulmonary veins, an appendage) inside a dark myocardial
wall with patchy enhancement, next to equally bright chambers and vessels (LV, RV, RA, both aortas), so a
model must use shape and position, not intensity, to find the LA. Pose and size vary per case, and Rician
noise, a smooth bias field, blur and anisotropic slices make it look like an acquisition. The anatomy is
laid out in mm for a 100 mm field of view and scaled to the actual one, so small test volumes still hold a
whole heart; the default grid (240 x 240 x 60 at LAScarQS's 0.625 x 0.625 x 2.5 mm: 150 mm) holds an
adult-size one (LA about 35-95 mL). Everything is vectorised numpy: each shape is evaluated only in the box
around it and the smooth fields are outer products of 1D waves, so large phantoms (640 x 640 x 44) take
seconds; the same seed gives the same bytes on disk.

Three styles (`style`, `la-seg synth --style`). `classic`: the fixed physics above (the demo's data, every
earlier seed's bytes). `varied`, the training family: each case draws its physics over the ranges of
`VARIED` (domain randomisation, as centres differ): blood 1.2-8.5x myocardium, a thin LA wall enhanced above
the blood pool, epicardial fat nearly as bright as blood, other chambers as bright as the LA, pulled towards
it behind walls down to 1 mm, the LA warped by a smooth field in mm, the scanner grid rotated in-plane (the
affine says so), bias field and Rician noise, and the pulmonary veins as four, with a left common trunk or
with a right middle vein (as patients vary). `heldout`, the held-out setting that nothing is trained or tuned
on: both vein variants at once, which no training case has, with neighbours closer, the LA warped more and
noise higher than any training case (`HELDOUT`).
"""

from __future__ import annotations

import functools
import itertools
import shutil
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy.ndimage import distance_transform_edt, gaussian_filter
from skimage.measure import marching_cubes

from la_seg.data.io import Geometry, write_nifti
from la_seg.errors import DataError

LA_LABEL = 420  # the LAScarQS atriumSegImgMO value
_FOV_MM = 100.0
_SEPTUM_MM = 3.0  # the thinnest wall between two blood pools
# Shapes are evaluated in a box this far (anatomy mm) around them: beyond every wall and septum their
# distance is compared with, even as the ellipsoids' first-order distance underestimates. Elsewhere: _FAR.
_MARGIN_MM = 12.0
_FAR = np.float32(1e6)
_SIGNAL_SCALE = 600.0  # blood pool grey value, roughly a scanner's range
# Grey values relative to blood (1.0) at the inversion time of an LGE scan: healthy myocardium nulled,
# blood bright, enhanced (fibrotic) wall brighter still.
_BLOOD, _MYOCARDIUM, _ENHANCED, _TISSUE, _LUNG = 1.0, 0.12, 1.4, 0.35, 0.06
# `scar` patches: well above the dense-scar IIR (1.32), so blur, bias and noise keep them above it
_SCAR = 2.2
# Where the other blood pools are pulled from, towards the LA's nominal centre (anatomy mm)
_LA_NOMINAL_CENTRE = np.array([0.0, 10.0, 0.0])
POOL_NAMES = ("LV", "RV", "RA", "ascending aorta", "descending aorta")


# Pulmonary-vein arrangements: four separate veins; the left pair through one common trunk; an extra right
# middle vein; both variants at once (each variant is common in patients, 15-30 %)
VEIN_ARRANGEMENTS = ("four", "left_trunk", "right_middle", "left_trunk_right_middle")


@dataclass(frozen=True)
class Physics:
    """One case's physics: grey values relative to the LA blood pool (1.0) and wall geometry in mm.

    Wall thicknesses and the enhancement are further jittered per case by 0.85-1.15 and 0.9-1.1 (as
    `classic` always did); `enhanced_cut` is the threshold on a unit-variance smooth field above which the LA
    wall is enhanced (lower: more of it); `noise` and `bias` are the ranges the Rician noise's sd and the bias
    field's (linear, quadratic) log-coefficients are drawn from.
    """

    myocardium: float
    enhanced: float
    enhanced_cut: tuple[float, float]
    tissue: float
    fat: float
    fat_mm: float
    pools: float  # the other chambers' and vessels' blood, relative to the LA's
    la_wall_mm: float
    septum_mm: float
    pool_walls_mm: tuple[float, float, float, float, float]  # POOL_NAMES order
    pull_mm: float  # every other pool moved this far towards the LA
    warp_mm: float  # amplitude of the smooth field added to the LA's signed distance
    noise: tuple[float, float]
    bias: tuple[float, float]
    grid_angle_deg: float  # the scanner grid's in-plane rotation (about the through-plane axis)
    veins: str  # one of VEIN_ARRANGEMENTS

    @property
    def blood_to_myocardium(self) -> float:
        return 1.0 / self.myocardium


CLASSIC = Physics(
    myocardium=_MYOCARDIUM,
    enhanced=_ENHANCED,
    enhanced_cut=(0.1, 0.4),
    tissue=_TISSUE,
    fat=_TISSUE,
    fat_mm=0.0,
    pools=_BLOOD,
    la_wall_mm=2.5,
    septum_mm=_SEPTUM_MM,
    pool_walls_mm=(8.0, 3.5, 2.5, 2.0, 2.0),
    pull_mm=0.0,
    warp_mm=0.0,
    noise=(0.03, 0.07),
    bias=(0.2, 0.15),
    grid_angle_deg=0.0,
    veins="four",
)


@dataclass(frozen=True)
class Family:
    """Ranges a style draws each case's Physics from: (low, high) uniform; blood_to_myocardium log-uniform."""

    blood_to_myocardium: tuple[float, float]
    enhanced: tuple[float, float]
    enhanced_cut: tuple[float, float]
    tissue: tuple[float, float]
    fat: tuple[float, float]
    fat_mm: tuple[float, float]
    pools: tuple[float, float]
    la_wall_mm: tuple[float, float]
    septum_mm: tuple[float, float]
    lv_wall_mm: tuple[float, float]
    pool_wall_mm: tuple[float, float]  # RV, RA and both aortas, each drawn
    pull_mm: tuple[float, float]
    warp_mm: tuple[float, float]
    noise: tuple[float, float]
    bias: tuple[float, float]
    grid_angle_deg: tuple[float, float]
    veins: tuple[str, ...]  # the VEIN_ARRANGEMENTS drawn from, each as likely

    def draw(self, rng: np.random.Generator) -> Physics:
        low, high = np.log(self.blood_to_myocardium)
        return Physics(
            myocardium=float(np.exp(-rng.uniform(low, high))),
            enhanced=float(rng.uniform(*self.enhanced)),
            enhanced_cut=self.enhanced_cut,
            tissue=float(rng.uniform(*self.tissue)),
            fat=float(rng.uniform(*self.fat)),
            fat_mm=float(rng.uniform(*self.fat_mm)),
            pools=float(rng.uniform(*self.pools)),
            la_wall_mm=float(rng.uniform(*self.la_wall_mm)),
            septum_mm=float(rng.uniform(*self.septum_mm)),
            pool_walls_mm=(
                float(rng.uniform(*self.lv_wall_mm)),
                *(float(w) for w in rng.uniform(*self.pool_wall_mm, size=4)),
            ),
            pull_mm=float(rng.uniform(*self.pull_mm)),
            warp_mm=float(rng.uniform(*self.warp_mm)),
            noise=self.noise,
            bias=self.bias,
            grid_angle_deg=float(rng.uniform(*self.grid_angle_deg)),
            # last, and only where there is a choice: the other draws, and a one-arrangement family's cases,
            # stay as they were before families drew their veins
            veins=self.veins[int(rng.integers(len(self.veins)))] if len(self.veins) > 1 else self.veins[0],
        )


# The training family: what centres differ in, each drawn per case.
VARIED = Family(
    blood_to_myocardium=(1.2, 8.5),
    enhanced=(1.05, 1.7),
    enhanced_cut=(-0.8, 0.4),
    tissue=(0.2, 0.5),
    fat=(0.6, 0.95),
    fat_mm=(0.0, 4.0),
    pools=(0.9, 1.1),
    la_wall_mm=(1.0, 2.6),
    septum_mm=(1.0, 3.0),
    lv_wall_mm=(5.0, 9.0),
    pool_wall_mm=(1.0, 3.0),
    pull_mm=(0.0, 5.0),
    warp_mm=(0.0, 3.0),
    noise=(0.02, 0.10),
    bias=(0.35, 0.3),
    grid_angle_deg=(-12.0, 12.0),
    veins=("four", "left_trunk", "right_middle"),
)
# The held-out setting: the low-contrast, bright-fat end of VARIED combined with what no training case has:
# both vein variants at once, neighbours pulled closer, a stronger warp and more noise.
HELDOUT = Family(
    blood_to_myocardium=(1.2, 1.6),
    enhanced=(1.2, 1.6),
    enhanced_cut=(-0.8, 0.4),
    tissue=(0.3, 0.5),
    fat=(0.85, 0.95),
    fat_mm=(2.0, 4.0),
    pools=(0.95, 1.1),
    la_wall_mm=(1.0, 2.0),
    septum_mm=(1.0, 2.0),
    lv_wall_mm=(5.0, 9.0),
    pool_wall_mm=(1.0, 2.0),
    pull_mm=(5.0, 8.0),
    warp_mm=(3.0, 4.0),
    noise=(0.10, 0.13),
    bias=(0.35, 0.3),
    grid_angle_deg=(-12.0, 12.0),
    veins=("left_trunk_right_middle",),
)
STYLES = {"classic": None, "varied": VARIED, "heldout": HELDOUT}
# The default grid (`la-seg synth` repeats it, so that its `--help` loads no numpy): LAScarQS's spacing over
# 150 mm, where the heart is adult-size
DEFAULT_SHAPE, DEFAULT_SPACING = (240, 240, 60), (0.625, 0.625, 2.5)


def draw_physics(rng: np.random.Generator, style: str | Family) -> Physics:
    """A case's physics: CLASSIC without a draw (so classic seeds keep their bytes), else drawn from the
    style's Family (its first draws from the case's generator); a Family itself is drawn from as a style (a
    benchmark's variant of one: the same draws, other ranges)."""
    if isinstance(style, Family):
        return style.draw(rng)
    if style not in STYLES:
        raise DataError(f"synthetic style must be one of {list(STYLES)}, got {style!r}")
    family = STYLES[style]
    return CLASSIC if family is None else family.draw(rng)


def case_physics(seed: int, index: int, style: str | Family) -> Physics:
    """The physics of case `index` that write_dataset(seed, ..., style=style) writes."""
    return draw_physics(_case_rng(seed, index), style)


def synthesize_case(
    rng: np.random.Generator,
    shape: tuple[int, int, int] = DEFAULT_SHAPE,
    spacing: tuple[float, float, float] = DEFAULT_SPACING,
    partial_volume: bool = False,
    anatomy_fov_mm: float | None = None,
    scar: float | None = None,
    style: str | Family = "classic",
) -> tuple[np.ndarray, np.ndarray]:
    """One phantom on a `shape` grid of `spacing` mm: image int16 (X, Y, Z) and label uint16 (LA = 420).

    `partial_volume`: the anatomy is drawn on a grid about 0.6 mm fine and each voxel averages its sub-voxels,
    as an acquisition integrates over the voxel (a thick slice mixes blood and wall where a wall crosses it);
    the label follows the partial-volume rule of manual labels: a voxel is LA when at least half of it is.
    Otherwise each voxel is sampled at its centre. `anatomy_fov_mm`: the heart is as large as in a field of
    view of this many mm whatever the grid covers (hearts do not grow with the scanner's field of view);
    None scales it to the grid's smallest extent. `scar`: see _scar_patches; None keeps the LA wall's
    random patchy enhancement of unknown extent. `style`: classic, varied or heldout (the module's
    docstring); the grid of a varied or heldout case is rotated in-plane by its Physics.grid_angle_deg,
    which write_dataset writes into the affine (`grid_affine`).
    """
    case = _synthesize(rng, shape, spacing, partial_volume, anatomy_fov_mm, scar, style)
    return case.image, (case.fraction >= 0.5).astype(np.uint16) * LA_LABEL


def case_la_fraction(
    seed: int,
    index: int,
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
    anatomy_fov_mm: float | None = None,
    style: str | Family = "classic",
) -> np.ndarray:
    """How much of each voxel is LA (float32, 0..1) in case `index` that write_dataset(seed, ...,
    partial_volume=True) writes; its label is where this is at least 0.5. Lets a benchmark ask how many
    voxels a grid leaves partly LA. Read-only: the last few are kept, as a benchmark asks for each case's
    twice (its figures and its worst cases), and the fine grid takes seconds."""
    return _la_fraction(seed, index, tuple(shape), tuple(spacing), anatomy_fov_mm, style)


@functools.lru_cache(maxsize=8)
def _la_fraction(
    seed: int,
    index: int,
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
    anatomy_fov_mm: float | None,
    style: str | Family,
) -> np.ndarray:
    fraction = _synthesize(_case_rng(seed, index), shape, spacing, True, anatomy_fov_mm, style=style).fraction
    fraction.setflags(write=False)
    return fraction


# case_structures' codes: 0 tissue, lung or background; then these; a pool k of POOL_NAMES is POOL_CODE + k
LA_CODE, LA_WALL_CODE, FAT_CODE, OTHER_WALL_CODE, POOL_CODE = 1, 2, 3, 4, 10


def case_structures(
    seed: int,
    index: int,
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
    anatomy_fov_mm: float | None = None,
    style: str | Family = "classic",
) -> np.ndarray:
    """What lies at each voxel's centre (uint8 codes above) in case `index` that write_dataset(seed, ...)
    writes: where a mask's false positives are (a neighbouring pool, the LA wall, fat)."""
    return _synthesize(_case_rng(seed, index), shape, spacing, False, anatomy_fov_mm, style=style).structures


def case_scar_fraction(
    seed: int,
    index: int,
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
    scar: float,
    partial_volume: bool = False,
    anatomy_fov_mm: float | None = None,
) -> float:
    """The true enhanced share (0..1) of the LA wall area in case `index` that write_dataset(seed, ...,
    scar=scar) writes: what `la-seg analyse` should measure as its fibrosis and dense-scar fractions."""
    return _synthesize(
        _case_rng(seed, index), shape, spacing, partial_volume, anatomy_fov_mm, scar
    ).scar_share  # type: ignore[return-value]


def grid_affine(
    shape: tuple[int, int, int], spacing: tuple[float, float, float], angle_deg: float = 0.0
) -> np.ndarray:
    """The affine of a phantom grid: centred on the world origin, voxel axes rotated by `angle_deg` about the
    through-plane (last) axis."""
    rotation = _rotation(np.deg2rad([0.0, 0.0, angle_deg])).astype(np.float64)
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag(spacing)
    affine[:3, 3] = rotation @ (-(np.array(shape) - 1) / 2 * np.array(spacing))
    return affine


def _case_rng(seed: int, index: int) -> np.random.Generator:
    """Case `index` of a data set depends only on (seed, index): a larger data set extends a smaller one."""
    return np.random.default_rng([seed, index])


@dataclass
class _Case:
    image: np.ndarray  # int16
    fraction: np.ndarray  # LA share per voxel (0 or 1 without partial volume)
    scar_share: float | None  # the true enhanced share of the wall area (None without `scar`)
    structures: np.ndarray  # case_structures' codes (at the fine grid's sub-voxels with partial volume)
    physics: Physics


def _synthesize(
    rng: np.random.Generator,
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
    partial_volume: bool,
    anatomy_fov_mm: float | None,
    scar: float | None = None,
    style: str | Family = "classic",
) -> _Case:
    """synthesize_case's phantom with what benchmarks and tests ask of it."""
    shape, spacing = _check_grid(shape, spacing)
    physics = draw_physics(rng, style)
    fov = np.array(shape) * np.array(spacing)
    reference_fov = float(fov.min()) if anatomy_fov_mm is None else float(anatomy_fov_mm)
    scale = reference_fov / _FOV_MM * rng.uniform(0.85, 1.15)  # per-case heart size
    rotation = _rotation(np.deg2rad(rng.uniform([-10, -10, -20], [10, 10, 20])))
    shift = rng.uniform([-0.12, -0.12, -0.08], [0.12, 0.12, 0.08]) * fov
    # Anatomy coordinates (mm, 100 mm FOV): x right, y posterior, z superior; pose = rotate, scale, shift,
    # in world mm; the grid's own axes are world's rotated by the grid angle.
    if physics.grid_angle_deg:
        grid = _rotation(np.deg2rad([0.0, 0.0, physics.grid_angle_deg]))
        rotation, shift = grid.T @ rotation, grid.T.astype(np.float64) @ shift
    factor = _supersampling(spacing) if partial_volume else (1, 1, 1)
    fine_shape = tuple(n * f for n, f in zip(shape, factor, strict=True))
    fine_spacing = tuple(s / f for s, f in zip(spacing, factor, strict=True))
    frame = _Frame(fine_shape, fine_spacing, rotation, shift, scale)

    d_la, la_wall = _left_atrium(rng, frame, physics)
    others = _other_blood_pools(rng, frame, physics)

    image = physics.tissue * (1.0 + 0.25 * _smooth_field(rng, frame, wavelength=(15.0, 40.0)))
    for side in (-1.0, 1.0):  # lungs, lateral and posterior
        image[_ellipsoid(frame, [40.0 * side, 18.0, 0.0], [16.0, 30.0, 70.0]) < 0] = _LUNG
    structures = np.zeros(fine_shape, np.uint8)
    if physics.fat_mm > 0:  # epicardial fat: a patchy layer outside every wall
        outside_walls = np.minimum.reduce([d_la - la_wall, *(distance - wall for distance, wall in others)])
        fat = (outside_walls >= 0) & (outside_walls < physics.fat_mm)
        fat[fat] = _smooth_field(rng, frame, wavelength=(10.0, 30.0), voxels=np.nonzero(fat)) > -0.5
        image[fat] = physics.fat
        structures[fat] = FAT_CODE
    myocardium = d_la < la_wall
    for distance, wall in others:
        myocardium |= distance < wall
    image[myocardium] = physics.myocardium
    structures[myocardium] = OTHER_WALL_CODE
    # Blood where one chamber holds the voxel and the others are a septum away (no other distance below
    # the septum); the LA wall always separates the LA from its neighbours.
    near = sum((distance < physics.septum_mm).astype(np.uint8) for distance, _ in others)
    outside_la = d_la >= la_wall
    for k, (distance, _) in enumerate(others):
        pool = (distance < 0) & (near == 1) & outside_la
        image[pool] = physics.pools
        structures[pool] = POOL_CODE + k
    la = d_la < 0
    image[la] = _BLOOD
    wall = (d_la >= 0) & (d_la < la_wall)
    structures[wall] = LA_WALL_CODE
    structures[la] = LA_CODE
    if scar is None:
        enhanced = np.zeros_like(wall)  # patchy fibrosis: a smooth field thresholded on the wall only
        field = _smooth_field(rng, frame, wavelength=(8.0, 20.0), voxels=np.nonzero(wall))
        enhanced[wall] = field > rng.uniform(*physics.enhanced_cut)
        image[enhanced] = physics.enhanced * _jitter(rng, 0.9, 1.1)
        scar_share = None
    else:
        enhanced, scar_share = _scar_patches(rng, frame, d_la, wall, scar)
        image[enhanced] = _SCAR * _jitter(rng, 0.95, 1.05)
    fraction = la.astype(np.float32)
    if partial_volume:
        image = _block_mean(image, factor)
        fraction = _block_mean(fraction, factor)
        frame = _Frame(shape, spacing, rotation, shift, scale)

    image = gaussian_filter(image, sigma=(0.7, 0.7, 0.3), mode="nearest")
    image *= _bias_field(rng, frame, fov, physics.bias)
    noise = np.float32(rng.uniform(*physics.noise))
    real = image + noise * rng.standard_normal(shape, dtype=np.float32)
    image = np.hypot(real, noise * rng.standard_normal(shape, dtype=np.float32))  # Rician magnitude
    image = np.clip(np.rint(image * _SIGNAL_SCALE * _jitter(rng, 0.8, 1.2)), 0, np.iinfo(np.int16).max)
    return _Case(image.astype(np.int16), fraction, scar_share, structures, physics)


def _scar_patches(
    rng: np.random.Generator, frame: _Frame, d_la: np.ndarray, wall: np.ndarray, scar: float
) -> tuple[np.ndarray, float]:
    """Wall enhancement of known area: the wall voxels to enhance and the enhanced share of the LA surface.

    The case's target share is `scar` times a per-case factor 0.5..1.5 (at most 1). Patches are where a
    smooth field (wavelengths 10-25 mm) on the LA surface (marching cubes of its signed distance) is above
    the area-weighted quantile that leaves that share; a wall voxel is enhanced through the whole wall
    thickness when the field is above it at its nearest LA voxel, so every normal through a patch meets it,
    as `la-seg analyse` samples the wall.
    """
    if not 0.0 <= scar <= 1.0:
        raise DataError(f"synthetic scar must be a share of the wall area in 0..1, got {scar}")
    target = min(1.0, scar * rng.uniform(0.5, 1.5))
    waves = [(rng.normal(size=3), rng.uniform(10.0, 25.0), rng.uniform(0, 2 * np.pi)) for _ in range(6)]

    def field(points: np.ndarray) -> np.ndarray:  # anatomy mm (N, 3)
        return sum(np.cos(2 * np.pi / w * points @ (k / np.linalg.norm(k)) + p) for k, w, p in waves)

    near = np.nonzero(d_la < _MARGIN_MM)  # the LA and its wall, with room around them
    box = tuple(slice(int(i.min()), int(i.max()) + 1) for i in near)
    origin = np.array([b.start for b in box])
    verts, faces, _, _ = marching_cubes(d_la[box], level=0.0, spacing=frame.spacing)
    world = verts + (origin - (np.array(frame.shape) - 1) / 2) * frame.spacing
    surface = field((world - frame.shift) @ frame.rotation / frame.scale)
    triangle = np.cross(world[faces[:, 1]] - world[faces[:, 0]], world[faces[:, 2]] - world[faces[:, 0]])
    areas = np.zeros(len(world))
    np.add.at(areas, faces, np.repeat(np.linalg.norm(triangle, axis=1)[:, None] / 6.0, 3, axis=1))
    order = np.argsort(-surface)
    covered = np.cumsum(areas[order]) / areas.sum()
    above = order[: int(np.searchsorted(covered, target - 1e-9)) + 1] if target > 0 else order[:0]
    threshold = surface[above].min() if len(above) else np.inf
    share = float(areas[surface >= threshold].sum() / areas.sum())

    _, nearest = distance_transform_edt(d_la[box] >= 0, sampling=frame.spacing, return_indices=True)
    in_wall = np.nonzero(wall[box])
    la_voxel = [nearest[axis][in_wall] + origin[axis] for axis in range(3)]
    enhanced = np.zeros_like(wall)
    wall_voxels = tuple(i + o for i, o in zip(in_wall, origin, strict=True))
    enhanced[wall_voxels] = field(frame.at(la_voxel)) >= threshold
    return enhanced, share


def write_dataset(
    out: str | Path,
    cases: int,
    seed: int,
    shape: tuple[int, int, int] = DEFAULT_SHAPE,
    spacing: tuple[float, float, float] = DEFAULT_SPACING,
    partial_volume: bool = False,
    anatomy_fov_mm: float | None = None,
    prefix: str = "train_",
    scar: float | None = None,
    style: str | Family = "classic",
    first: int = 1,
) -> list[Path]:
    """Write `cases` phantoms as out/train_1..train_N/{enhanced,atriumSegImgMO}.nii.gz and return the folders.

    Case i depends only on (seed, i) (`_case_rng`), so a larger data set extends a smaller one, and `first`
    (the first case's i) writes cases of a data set without the ones before them. Each case
    folder appears complete (written beside, then renamed). Existing non-empty case folders are kept when they
    hold what these settings give (an interrupted run rerun, or more cases) and refused otherwise, rather
    than overwritten. `partial_volume`, `anatomy_fov_mm`, `scar` and `style`: see synthesize_case
    (case_scar_fraction gives each case's true enhanced share, case_physics its physics); `prefix` names the
    case folders (`<prefix><i>`).
    """
    out = Path(out)
    if cases < 1:
        raise DataError(f"number of synthetic cases must be at least 1, got {cases}")
    if first < 1:
        raise DataError(f"the first synthetic case's number must be at least 1, got {first}")
    shape, spacing = _check_grid(shape, spacing)
    draw_physics(np.random.default_rng(0), style)  # an unknown style refused before anything is made
    folders = [out / f"{prefix}{i}" for i in range(first, first + cases)]
    settings = (shape, spacing, partial_volume, anatomy_fov_mm, scar, style)

    def make(i: int) -> tuple[tuple[np.ndarray, np.ndarray], np.ndarray]:
        """Case i's (image, label) and affine."""
        case = _synthesize(_case_rng(seed, i), *settings)
        label = (case.fraction >= 0.5).astype(np.uint16) * LA_LABEL
        return (case.image, label), grid_affine(shape, spacing, case.physics.grid_angle_deg)

    made = {}
    for i, folder in enumerate(folders, start=first):  # checked before anything is written
        if folder.is_dir() and any(folder.iterdir()):
            made[i] = make(i)
            if not _holds(folder, *made[i]):
                raise DataError(
                    f"refusing to overwrite the non-empty case folder {folder}: it holds other data than "
                    "these settings give"
                )
    for i, folder in enumerate(folders, start=first):
        if i in made:
            continue  # complete (renamed into place whole) and of these settings
        (image, label), affine = make(i)
        staging = out / f".{folder.name}.partial"  # a killed run's is replaced
        shutil.rmtree(staging, ignore_errors=True)
        try:
            for name, data in (("enhanced.nii.gz", image), ("atriumSegImgMO.nii.gz", label)):
                write_nifti(staging / name, data, Geometry(shape, affine, spacing, folder / name))  # no input
            if folder.is_dir():
                folder.rmdir()  # empty
            staging.rename(folder)
        finally:  # interrupted (Ctrl-C): no half-written case is left
            shutil.rmtree(staging, ignore_errors=True)
    return folders


def _holds(folder: Path, case: tuple[np.ndarray, np.ndarray], affine: np.ndarray) -> bool:
    """Whether `folder` holds exactly the image and label `case` (as written: same voxels and affine)."""
    try:
        for name, data in zip(("enhanced.nii.gz", "atriumSegImgMO.nii.gz"), case, strict=True):
            written = nib.load(folder / name)
            if not np.allclose(written.affine, affine) or not np.array_equal(
                np.asanyarray(written.dataobj), data
            ):
                return False
    except (OSError, ValueError, nib.filebasedimages.ImageFileError):
        return False
    return True


_PV_STEP_MM = 0.6  # sub-voxel size of partial-volume phantoms


def _supersampling(spacing: tuple[float, float, float]) -> tuple[int, int, int]:
    """Sub-voxels per voxel along each axis for partial-volume phantoms: about _PV_STEP_MM, at least 2."""
    return tuple(max(2, round(s / _PV_STEP_MM)) for s in spacing)  # type: ignore[return-value]


def _block_mean(array: np.ndarray, factor: tuple[int, int, int]) -> np.ndarray:
    """Mean over blocks of `factor` voxels: a fine grid back to the voxel grid (float32)."""
    x, y, z = (n // f for n, f in zip(array.shape, factor, strict=True))
    blocks = array.reshape(x, factor[0], y, factor[1], z, factor[2])
    return blocks.mean(axis=(1, 3, 5), dtype=np.float32)


def _check_grid(shape, spacing) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    shape = tuple(int(n) for n in shape)
    spacing = tuple(float(s) for s in spacing)
    if len(shape) != 3 or min(shape) < 1:
        raise DataError(f"synthetic shape must be three positive sizes, got {shape}")
    if len(spacing) != 3 or not all(np.isfinite(s) and s > 0 for s in spacing):
        raise DataError(f"synthetic spacing must be three positive numbers in mm, got {spacing}")
    return shape, spacing


class _Frame:
    """The anatomy coordinates of every voxel, kept as per-axis terms (anatomy = rotated, scaled world mm).

    Each anatomy coordinate is a sum of one 1D term per grid axis, so any box of the grid is built from
    three small arrays: shapes are evaluated only in the box around them, plane waves as outer products.
    """

    def __init__(self, shape, spacing, rotation: np.ndarray, shift: np.ndarray, scale: float) -> None:
        self.shape, self.spacing = shape, spacing
        self.rotation, self.shift, self.scale = rotation, shift, scale
        self.world = world = [  # voxel centres in mm, centred on 0
            (np.arange(n, dtype=np.float32) - (n - 1) / 2) * s for n, s in zip(shape, spacing, strict=True)
        ]
        # terms[col][row]: what world axis `row` adds to anatomy coordinate `col`
        self.terms = [
            [np.float32(rotation[r, col] / scale) * (world[r] - np.float32(shift[r])) for r in range(3)]
            for col in range(3)
        ]

    def coords(self, box: tuple[slice, slice, slice]) -> list[np.ndarray]:
        """Anatomy coordinates on a box of the grid, each broadcast to the box's shape."""
        return [
            terms[0][box[0], None, None] + terms[1][None, box[1], None] + terms[2][None, None, box[2]]
            for terms in self.terms
        ]

    def at(self, voxels: list[np.ndarray]) -> np.ndarray:
        """Anatomy coordinates (N, 3) of the voxels at the index arrays `voxels`."""
        return np.stack([sum(terms[row][voxels[row]] for row in range(3)) for terms in self.terms], axis=-1)

    def box(self, low: np.ndarray, high: np.ndarray) -> tuple[slice, slice, slice]:
        """The grid box holding the anatomy-space box [low, high] (empty slices where it misses the grid)."""
        corners = np.array(list(itertools.product(*zip(low, high, strict=True))))
        world = self.shift + self.scale * corners @ self.rotation.T.astype(np.float64)
        index_low = world.min(axis=0) / self.spacing + (np.array(self.shape) - 1) / 2
        index_high = world.max(axis=0) / self.spacing + (np.array(self.shape) - 1) / 2
        return tuple(  # type: ignore[return-value]
            slice(int(np.clip(np.floor(lo), 0, n)), int(np.clip(np.ceil(hi) + 1, 0, n)))
            for lo, hi, n in zip(index_low, index_high, self.shape, strict=True)
        )

    def distance(self, low, high, signed_distance) -> np.ndarray:
        """A shape's signed distance in the box around it (plus a margin), _FAR elsewhere."""
        out = np.full(self.shape, _FAR, np.float32)
        box = self.box(np.asarray(low) - _MARGIN_MM, np.asarray(high) + _MARGIN_MM)
        if all(s.stop > s.start for s in box):
            out[box] = signed_distance(self.coords(box))
        return out


def _jitter(rng: np.random.Generator, low: float = 0.85, high: float = 1.15) -> float:
    return float(rng.uniform(low, high))


def _left_atrium(rng: np.random.Generator, frame: _Frame, physics: Physics) -> tuple[np.ndarray, float]:
    """The LA's signed distance and wall thickness: body, pulmonary veins leaving posterior-laterally (four;
    the left ones through a common trunk; a right middle vein; or both: physics.veins), appendage
    anterior-left; warped by a smooth field of up to physics.warp_mm (_warp)."""
    la_centre = np.array([0.0, 10.0, 0.0]) + rng.uniform(-3, 3, 3)
    la_axes = np.array([19.0, 13.0, 13.0]) * rng.uniform(0.85, 1.15, 3)
    body = _ellipsoid(frame, la_centre, la_axes)
    tubes = []  # (start, end, radius at start, radius at end)
    for side in (-1.0, 1.0):
        trunk = "left_trunk" in physics.veins and side < 0  # the left veins leave through one short trunk
        if trunk:
            ostium = la_centre + la_axes * np.array([0.55 * side, 0.35, 0.0])
            trunk_end = ostium + 9.0 * _jitter(rng) * np.array([side, 0.5, 0.0]) / np.hypot(1.0, 0.5)
            tubes.append((ostium, trunk_end, 6.5 * _jitter(rng), 5.5))
        for level in (-1.0, 1.0):
            start = trunk_end if trunk else la_centre + la_axes * np.array([0.55 * side, 0.35, 0.4 * level])
            direction = np.array([side, 0.6 * _jitter(rng, 0.6, 1.4), 0.35 * level * _jitter(rng, 0.5, 1.5)])
            end = start + 18.0 * _jitter(rng, 0.8, 1.25) * direction / np.linalg.norm(direction)
            radius = 4.2 * _jitter(rng)
            tubes.append((start, end, radius, radius))
    if "right_middle" in physics.veins:  # a right middle vein between the two right ones
        start = la_centre + la_axes * np.array([0.6, 0.3, 0.0])
        end = start + 15.0 * _jitter(rng) * np.array([1.0, 0.5, 0.0]) / np.hypot(1.0, 0.5)
        tubes.append((start, end, 3.0 * _jitter(rng), 2.8))
    laa_start = la_centre + la_axes * np.array([-0.7, -0.55, 0.35])
    laa_direction = np.array([-0.6, -0.7, 0.3]) / np.linalg.norm([-0.6, -0.7, 0.3])
    laa_end = laa_start + 13.0 * _jitter(rng) * laa_direction
    tubes.append((laa_start, laa_end, 5.0 * _jitter(rng), 2.5 * _jitter(rng)))
    if physics.warp_mm > 0:  # roots from the centre: a vein stays joined where the warp dents the body
        tubes += [(la_centre, start, r, r) for start, _, r, _ in tubes]
    branches = np.full(frame.shape, _FAR, np.float32)
    for tube in tubes:
        branches = np.minimum(branches, _tube(frame, *tube))
    if physics.warp_mm > 0:
        _warp(rng, frame, body, branches, physics.warp_mm)
    return np.minimum(body, branches), physics.la_wall_mm * _jitter(rng)


_BRANCH_DENT_MM = 1.0  # the most the warp may shrink a vein or the appendage: they stay whole


def _warp(rng: np.random.Generator, frame: _Frame, body: np.ndarray, branches: np.ndarray, warp_mm: float):
    """One smooth field (wavelengths 15-40 mm, in anatomy mm) moves the LA's surface by up to `warp_mm`, in
    place: the body both ways, the veins and appendage outwards fully and inwards by at most
    _BRANCH_DENT_MM, so that no vein is cut off."""
    near = np.nonzero(np.minimum(body, branches) < _MARGIN_MM)
    bend = warp_mm * np.tanh(_smooth_field(rng, frame, wavelength=(15.0, 40.0), voxels=near))
    body[near] += bend
    branches[near] += np.minimum(bend, _BRANCH_DENT_MM)


def _other_blood_pools(
    rng: np.random.Generator, frame: _Frame, physics: Physics
) -> list[tuple[np.ndarray, float]]:
    """(signed distance, wall thickness) of the pools as bright as the LA (POOL_NAMES: LV, RV, RA, ascending
    and descending aorta), each moved physics.pull_mm towards the LA."""

    def pulled(*points) -> list[np.ndarray]:
        towards = _LA_NOMINAL_CENTRE - np.mean(points, axis=0)
        move = physics.pull_mm * towards / np.linalg.norm(towards)
        return [np.asarray(point, np.float64) + move for point in points]

    lv, rv, ra = pulled([-14.0, -34.0, -20.0]), pulled([18.0, -52.0, -14.0]), pulled([31.0, -6.0, -2.0])
    ascending = pulled([2.0, -20.0, -2.0], [4.0, -14.0, 60.0])
    descending = pulled([-18.0, 38.0, -60.0], [-18.0, 36.0, 60.0])
    walls = physics.pool_walls_mm
    return [
        (_ellipsoid(frame, *lv, np.array([22.0, 20.0, 28.0]) * _jitter(rng)), walls[0]),
        (_ellipsoid(frame, *rv, np.array([22.0, 10.0, 22.0]) * _jitter(rng)), walls[1]),
        (_ellipsoid(frame, *ra, np.array([15.0, 15.0, 17.0]) * _jitter(rng)), walls[2]),
        (_tube(frame, *ascending, 13.0 * _jitter(rng), 12.0), walls[3]),
        (_tube(frame, *descending, 10.0 * _jitter(rng), 10.0), walls[4]),
    ]


def _rotation(angles: np.ndarray) -> np.ndarray:
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return (rz @ ry @ rx).astype(np.float32)


def _ellipsoid(frame: _Frame, centre, axes) -> np.ndarray:
    """Approximate signed distance (mm, negative inside) to an ellipsoid: first-order f / |grad f|."""
    centre, axes = np.asarray(centre, np.float32), np.asarray(axes, np.float32)

    def signed_distance(p: list[np.ndarray]) -> np.ndarray:
        u = [(p[i] - centre[i]) / axes[i] for i in range(3)]
        f = u[0] ** 2 + u[1] ** 2 + u[2] ** 2 - 1.0
        grad = 2.0 * np.sqrt(sum((u[i] / axes[i]) ** 2 for i in range(3))) + 1e-6
        return f / grad

    return frame.distance(centre - axes, centre + axes, signed_distance)


def _tube(frame: _Frame, start, end, r_start: float, r_end: float) -> np.ndarray:
    """Signed distance (mm) to a capsule from start to end whose radius tapers from r_start to r_end."""
    start, end = np.asarray(start, np.float32), np.asarray(end, np.float32)
    axis = end - start
    length2 = float(axis @ axis)

    def signed_distance(p: list[np.ndarray]) -> np.ndarray:
        rel = [p[i] - start[i] for i in range(3)]
        t = np.clip(sum(rel[i] * axis[i] for i in range(3)) / length2, 0.0, 1.0)
        dist = np.sqrt(sum((rel[i] - t * axis[i]) ** 2 for i in range(3)))
        return dist - (r_start + (r_end - r_start) * t)

    radius = max(r_start, r_end)
    return frame.distance(np.minimum(start, end) - radius, np.maximum(start, end) + radius, signed_distance)


def _smooth_field(rng: np.random.Generator, frame: _Frame, wavelength: tuple[float, float], voxels=None):
    """A smooth random field of zero mean and unit variance: a sum of random plane waves, on the whole grid
    or at the `voxels` (index arrays). On the grid each wave is an outer product of three 1D complex waves."""
    waves = 6
    field = np.zeros(frame.shape if voxels is None else voxels[0].shape, np.float32)
    for _ in range(waves):
        direction = rng.normal(size=3)
        k = 2 * np.pi / rng.uniform(*wavelength) * direction / np.linalg.norm(direction)
        phase = rng.uniform(0, 2 * np.pi)
        # the phase k . anatomy + phase, split into one term per grid axis
        axis_phase = [sum(np.float32(k[col]) * frame.terms[col][row] for col in range(3)) for row in range(3)]
        axis_phase[0] = axis_phase[0] + np.float32(phase)
        if voxels is None:
            x, y, z = (np.exp(1j * p).astype(np.complex64) for p in axis_phase)
            field += ((x[:, None] * y[None, :])[:, :, None] * z[None, None, :]).real
        else:
            field += np.cos(sum(axis_phase[row][voxels[row]] for row in range(3)))
    return field * np.float32(np.sqrt(2.0 / waves))


def _bias_field(
    rng: np.random.Generator, frame: _Frame, fov: np.ndarray, bias: tuple[float, float]
) -> np.ndarray:
    """Smooth multiplicative coil-sensitivity shading across the field of view: exp of a linear and a
    quadratic term per axis, coefficients up to `bias` (classic (0.2, 0.15): about 0.7 to 1.4)."""
    u = [frame.world[i] / np.float32(fov[i] / 2) for i in range(3)]  # -1..1 over the FOV
    linear = rng.uniform(-bias[0], bias[0], 3)
    quadratic = rng.uniform(-bias[1], bias[1], 3)
    x, y, z = (np.exp(np.float32(linear[i]) * u[i] + np.float32(quadratic[i]) * u[i] ** 2) for i in range(3))
    return (x[:, None, None] * y[None, :, None] * z[None, None, :]).astype(np.float32)
