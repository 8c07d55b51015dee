"""Whole-volume inference beyond one model: ensembles that share a frozen backbone pass, test-time views
(flips, gammas), and per-voxel uncertainty with per-case agreement figures. Plain torch (no Lightning).

Why an ensemble is cheap here: k folds' models trained on the same frozen DINOv2 weights differ only in their
fusion + decoder heads, so they can share one backbone pass per slice; with giant at 448 px the backbone is
~98 % of a model's FLOPs and a 5-member ensemble costs ~1.1x one model. Members whose backbones differ
(another architecture, weights, tapped blocks, or a trained backbone) run their own pass.

Entry points:

    ensemble = Ensemble([EnsembleMember("fold0", net0, spec0), EnsembleMember("fold1", net1, spec1)])
    ensemble.eval()
    result = ensemble.segment_volume(image, threshold=0.5, chunk=32, tta="flips")   # image: (X, Y, Z)
    result.prob, result.mask, result.uncertainty              # (X, Y, Z) float32, bool, float32 or None
    result.voter_agreement(geometry.slices_last_spacing, "largest_part")   # Agreement or None (one voter)

A single model is the one-member case and takes the same path as LASegModule.infer, with the same
result bit for bit and no extra copies. A field of view wider than the model input (S pixels at the input's
mm per pixel) is covered with overlapping S x S windows, as nnU-Net slides its patch: nothing is cut away.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, TypedDict, get_args

import numpy as np
import torch
from torch import Tensor, nn

from la_seg.data.preprocess import InputSpec, SliceGrid, restore_geometry, slice_grid, slices_to_input
from la_seg.errors import DataError
from la_seg.metrics import overlap_3d, volume_ml
from la_seg.models.segmenter import LASegmenter
from la_seg.plausibility import disagreement_reasons

TTA = Literal["none", "flips", "rot180", "gamma"]
# Windows over a slice wider than the model input overlap by this share of their side; where they overlap,
# their probabilities are averaged with Gaussian weights of this share of a side as sigma around each window's
# centre (MONAI's sliding_window_inference "gaussian" mode and nnU-Net: 1/8), so that a window's edge, where
# it sees a structure cut off, counts little against a window that holds it whole.
WINDOW_OVERLAP = 0.25
WINDOW_SIGMA = 0.125


@dataclass(frozen=True)
class View:
    """One test-time view of a model input: in-plane flips of an (N, C, H, W) input (H and W being the
    volume's X and Y, see slices_to_input), then a gamma on its grey values in [0, 1]. `flips_trained` are
    the data.augmentation flips that make a model invariant to it; a gamma needs the training's gamma range
    to reach it (check_tta_trained)."""

    flip_dims: tuple[int, ...] = ()
    flips_trained: tuple[str, ...] = ()
    gamma: float = 1.0

    def show(self, x: Tensor) -> Tensor:
        """The model input as this view shows it."""
        x = x.flip(self.flip_dims) if self.flip_dims else x
        return x.pow(self.gamma) if self.gamma != 1.0 else x

    def restore(self, output: Tensor) -> Tensor:
        """An (N, H, W) output of the shown input, back in the input's place (a gamma moves no pixel)."""
        return output.flip(self.flip_dims) if self.flip_dims else output


VIEWS: dict[str, View] = {
    "identity": View(),
    "flip_x": View((-2,), ("vflip",)),
    "flip_y": View((-1,), ("hflip",)),
    "flip_xy": View((-2, -1), ("hflip", "vflip")),
    # the ends of the default training gamma range (data.augmentation.gamma [80, 120]): the same anatomy in
    # another contrast between blood, wall and surroundings, which a model that learnt the LA's shape
    # segments alike, and one that learnt a grey level does not (benchmarks/README.md, round 25)
    "gamma_0.8": View(gamma=0.8),
    "gamma_1.2": View(gamma=1.2),
}
# The voters of each model.tta: "rot180" is identity and flip XY, an in-plane half turn that, unlike one
# flip, does not mirror the anatomy; "gamma" the identity and the two gammas.
TTA_VIEWS: dict[str, tuple[str, ...]] = {
    "none": ("identity",),
    "flips": ("identity", "flip_x", "flip_y", "flip_xy"),
    "rot180": ("identity", "flip_xy"),
    "gamma": ("identity", "gamma_0.8", "gamma_1.2"),
}
# Post-processing of a binary mask (model.postprocess): none, keep the largest 3D connected component, or
# keep the largest part after cutting the mask at its narrow necks (postprocess_mask).
Postprocess = Literal["none", "largest_component", "largest_part"]
POSTPROCESSING: tuple[str, ...] = get_args(Postprocess)
# Mean pairwise Dice below which a case is flagged for review (writer.review_below).
REVIEW_BELOW = 0.9
AGREEMENT_DIGITS = 4  # of the mean pairwise Dice, in agreements and reports

# (img_size, slice_context, in_plane, target_spacing): what one model input looks like (InputSpec.kind)
InputKind = tuple[int, bool, str, float]


@dataclass(frozen=True)
class EnsembleMember:
    """One model of an ensemble and the InputSpec it was trained with (the net stores only its img_size)."""

    name: str
    net: LASegmenter
    spec: InputSpec

    def __post_init__(self) -> None:
        if self.spec.img_size != self.net.config.img_size:
            raise ValueError(
                f"member {self.name}: its input spec has img_size {self.spec.img_size}, its net "
                f"{self.net.config.img_size}"
            )

    @property
    def input_kind(self) -> InputKind:
        return self.spec.kind


class Agreement(TypedDict):
    """How far the voters of one case agree (see voter_agreements)."""

    voters: list[str]
    volumes_ml: list[float]  # LA volume of each voter's mask
    volume_spread_ml: float  # max - min of volumes_ml
    mean_pairwise_dice: float  # mean 3D Dice over all voter pairs (both empty counts as 1)
    postprocess: str  # what each voter's mask went through before it was compared, as the delivered mask
    review_below: float  # the level it was judged by
    review: bool  # mean_pairwise_dice < review_below


@dataclass
class VolumeResult:
    """Whole-volume outputs, slices last, in the volume's original (X, Y, Z) geometry.

    Voters are the ensemble members when there are several (each averaged over its views), otherwise the
    test-time views of the single model: members disagree about what they learnt (what an ensemble adds),
    and with one model its views are the only spread there is. `uncertainty` is the voters' variance of
    the probability (population variance, in [0, 0.25]); not the entropy of the mean, which is high wherever
    the mean is near 0.5 even when every voter says the same, so it would not tell disagreement from a
    boundary that every model finds soft. None with a single voter.
    """

    prob: Tensor  # float32 mean probability over voters
    mask: Tensor  # bool, prob > threshold (no post-processing: the caller applies its own)
    uncertainty: Tensor | None  # float32 variance of the voters' probabilities
    voter_names: list[str]
    voter_masks: list[Tensor] = field(default_factory=list)  # bool, one per voter (only with >1 voter)
    # With keep_logits: the first member's float32 (Z, S, S) slice logits of the identity view in model
    # geometry, which its training loss is computed on (whatever else votes).
    logits: Tensor | None = None
    # Why the mask cannot be right (la_seg.plausibility), filled by the caller that post-processes it, with
    # the post-processed mask's expected Dice under `prob` (la_seg.plausibility.expected_dice).
    review_reasons: list[str] = field(default_factory=list)
    expected_dice: float | None = None
    # How far the voters agree, each voter's mask post-processed as the delivered one (voter_agreement),
    # filled by the same caller; None for a single voter.
    agreement: Agreement | None = None

    def voter_agreement(
        self,
        spacing: Sequence[float],
        postprocess: str,
        review_below: float = REVIEW_BELOW,
        voxel_mm3: float | None = None,
    ) -> Agreement | None:
        """Agreement of the voters' masks, each post-processed as the delivered mask is (`spacing`: mm per
        voxel, slices last; `voxel_mm3`: the voxel's true volume, Geometry.voxel_volume_mm3); None for a
        single voter."""
        if len(self.voter_masks) < 2:
            return None
        masks, names = self.voter_masks, self.voter_names
        return case_agreement(masks, names, spacing, postprocess, review_below, voxel_mm3)


def case_agreement(
    masks: Sequence[Tensor],
    names: Sequence[str],
    spacing: Sequence[float],
    postprocess: str,
    review_below: float = REVIEW_BELOW,
    voxel_mm3: float | None = None,
) -> Agreement:
    """Per-case agreement of binary masks, all of them one set of voters (voter_agreements)."""
    if len(masks) != len(names):
        raise ValueError(f"need one name per mask, got {len(masks)} masks, {len(names)} names")
    named = dict(zip(names, masks, strict=True))
    (agreement,) = voter_agreements(named, [names], spacing, postprocess, review_below, voxel_mm3)
    return agreement


def voter_agreements(
    masks: Mapping[str, Tensor],
    voter_sets: Sequence[Sequence[str]],
    spacing: Sequence[float],
    postprocess: str,
    review_below: float = REVIEW_BELOW,
    voxel_mm3: float | None = None,
) -> list[Agreement]:
    """Per-case agreement of each set of voters (names of `masks`), every binary mask first post-processed
    (postprocess_mask) as the delivered mask is, once whatever number of sets it votes in: LA volume per mask
    and its spread in mL, mean pairwise Dice, and whether that Dice is below `review_below` (the case
    deserves a human look).

    Post-processed, because the delivered mask is what can be wrong: an island in one voter's raw mask that
    post-processing removes is no doubt about the delivered LA (the component rule judges the raw mask), yet
    it lowers agreement, and a calibrated review threshold with it. On the accuracy benchmark the raw masks of
    one good validation case (Dice 0.95) agreed at 0.964 for that reason, and the threshold calibrated on them
    passed two masks 47 % too large; post-processed, none (benchmarks/README.md, round 27)."""
    for names in voter_sets:
        if len(set(names)) != len(names) or len(names) < 2 or not set(names) <= masks.keys():
            raise ValueError(f"voters {list(names)}: need >= 2 distinct names among the masks' {list(masks)}")
    voting = dict.fromkeys(name for names in voter_sets for name in names)
    delivered = {name: postprocess_mask(masks[name], postprocess) for name in voting}
    volumes = {name: volume_ml(mask, spacing, voxel_mm3) for name, mask in delivered.items()}
    agreements = []
    for names in voter_sets:
        pairs = itertools.combinations(names, 2)
        dices = [overlap_3d(delivered[a], delivered[b])[0] for a, b in pairs]
        mean_dice = round(sum(dices) / len(dices), AGREEMENT_DIGITS)  # as printed: 0.9000 is not below 0.9
        spread = [volumes[name] for name in names]
        agreements.append(
            Agreement(
                voters=list(names),
                volumes_ml=spread,
                volume_spread_ml=max(spread) - min(spread),
                mean_pairwise_dice=mean_dice,
                postprocess=postprocess,
                review_below=review_below,
                review=bool(disagreement_reasons(mean_dice, review_below)),
            )
        )
    return agreements


class _Head(nn.Module):
    """A member's fusion + decoder: everything after the (shareable) backbone. The backbone applies the
    fusion while its blocks run (DINOBackbone.fused); the head decodes the fused maps."""

    def __init__(self, net: LASegmenter) -> None:
        super().__init__()
        self.fusion = net.fusion
        self.decoder = net.decoder

    def forward(self, fused: list[Tensor], image: Tensor) -> Tensor:
        return self.decoder(fused, image)


@dataclass
class _Pass:
    """A backbone run once per chunk (and view), the input it sees, and the members that decode it."""

    backbone_key: str
    kind: InputKind
    members: list[int]


class Ensemble(nn.Module):
    """Averages the probabilities of several LASegmenters (and of their test-time views) in the original
    geometry, running each distinct backbone once per chunk of slices (and view).

    Members share a backbone when both are frozen, of the same architecture with the same tapped blocks, and
    their weights have the same `fingerprint()` (or are the same module): the ensemble then holds that
    backbone once, and the other members' copies are freed as soon as the caller drops its segmenters (build
    it with `add` while loading checkpoints one by one to hold at most two backbones at a time).
    Members whose input differs (img_size, slice_context) cannot share a pass: they form their own pass (with
    the same backbone module where the weights allow), so such models can still be ensembled; the cost is one
    more backbone pass, visible in `describe()`. Call `.eval()` first, as for any nn.Module.
    """

    def __init__(self, members: Sequence[EnsembleMember] = ()) -> None:
        super().__init__()
        self.backbones = nn.ModuleDict()
        self.heads = nn.ModuleList()
        self.names: list[str] = []
        self.passes: list[_Pass] = []
        self._architectures: dict[str, str] = {}
        self._fingerprints: dict[str, str] = {}
        for member in members:
            self.add(member)

    def add(self, member: EnsembleMember) -> None:
        """Adds one member, sharing an equal frozen backbone and a pass with earlier members where it can."""
        if member.name in self.names:
            raise DataError(f"ensemble member name {member.name!r} is used twice; give every member its own")
        key = self._backbone_key(member.net)
        self.heads.append(_Head(member.net))
        self.names.append(member.name)
        index = len(self.heads) - 1
        for shared in self.passes:
            if shared.backbone_key == key and shared.kind == member.input_kind:
                shared.members.append(index)
                return
        self.passes.append(_Pass(key, member.input_kind, [index]))

    def _backbone_key(self, net: LASegmenter) -> str:
        backbone = net.backbone
        architecture = net.config.backbone.split(".")[0]
        fingerprint = functools.cache(backbone.fingerprint)  # hashed only if a candidate turns up
        for key, existing in self.backbones.items():
            if existing is backbone:
                return key
            comparable = (
                existing.frozen
                and backbone.frozen
                and self._architectures[key] == architecture
                and list(existing.indices) == list(backbone.indices)
            )
            if comparable and self._fingerprint(key) == fingerprint():
                return key
        key = f"backbone{len(self.backbones)}"
        self.backbones[key] = backbone
        self._architectures[key] = architecture
        return key

    def _fingerprint(self, key: str) -> str:
        """Computed only when another frozen backbone could match: a lone model never pays for the hash."""
        if key not in self._fingerprints:
            self._fingerprints[key] = self.backbones[key].fingerprint()
        return self._fingerprints[key]

    @property
    def input_kinds(self) -> list[InputKind]:
        """The (img_size, slice_context, in_plane, target_spacing) inputs that `forward` needs, one slice
        stack each."""
        return list(dict.fromkeys(p.kind for p in self.passes))

    def describe(self) -> dict:
        """Members and backbone passes per slice and view, for reports."""
        return {
            "members": list(self.names),
            "passes": [
                {
                    "backbone": p.backbone_key,
                    "img_size": p.kind[0],
                    "slice_context": p.kind[1],
                    "in_plane": p.kind[2],
                    "target_spacing": p.kind[3],
                    "members": [self.names[m] for m in p.members],
                }
                for p in self.passes
            ],
        }

    def forward(
        self,
        inputs: Mapping[InputKind, Tensor],
        tta: TTA | Sequence[str] = "none",
        first_logits: list[Tensor] | None = None,
    ) -> list[list[Tensor]]:
        """Per member, per view of `tta` (a model.tta, in TTA_VIEWS order, or names of VIEWS): (N, S, S)
        float32 probabilities, back in the input's place.

        `inputs` maps each of `input_kinds` to its (N, 3, S, S) slice stack. Each pass runs its backbone once
        per view, on the stack as the view shows it (DINOv2 features are not flip-equivariant); all its
        members decode it. `first_logits`, if given, receives the first member's (N, S, S) float32 logits of
        the identity view.
        """
        views = _views(tta)
        probs: list[list[Tensor]] = [[] for _ in self.heads]
        for shared in self.passes:
            backbone = self.backbones[shared.backbone_key]
            for name in views:
                view = VIEWS[name]
                x = view.show(inputs[shared.kind])
                fused = backbone.fused(x, [self.heads[m].fusion for m in shared.members])
                for m, maps in zip(shared.members, fused, strict=True):
                    logits = self.heads[m](maps, x).float()[:, 0]
                    if m == 0 and name == "identity" and first_logits is not None:
                        first_logits.append(logits)
                    probs[m].append(view.restore(torch.sigmoid(logits)))
        return probs

    def grids(self, shape: Sequence[int], spacing: Sequence[float] | None) -> dict[InputKind, SliceGrid]:
        """Where the slices of an (X, Y, ...) volume of `spacing` mm land in each input kind."""
        return {k: slice_grid(shape[:2], k[0], k[2], spacing, k[3]) for k in self.input_kinds}

    @torch.no_grad()
    def segment_volume(
        self,
        image: Tensor,
        threshold: float = 0.5,
        chunk: int = 32,
        tta: TTA | Sequence[str] = "none",
        spacing: Sequence[float] | None = None,
        keep_logits: bool = False,
    ) -> VolumeResult:
        """Segments an (X, Y, Z) volume in [0, 1] (slices last) of `spacing` mm per voxel (needed by members
        with in_plane "spacing"), `chunk` model inputs per backbone pass: slices, or where a slice is wider
        than the input, windows of slices (plane_windows; joined by join_windows where they overlap). `tta`:
        a model.tta, or the names of the VIEWS to run (one model's views are then its voters, by name).

        Each voter's probability is assembled in model geometry, restored to (X, Y) once, then folded into a
        running mean and variance, so memory holds one full-size float map per output plus a bool mask per
        voter, whatever the number of members and views.
        """
        if not self.heads:
            raise DataError("the ensemble has no members: add at least one model")
        if isinstance(chunk, bool) or int(chunk) < 1:
            raise DataError(f"chunk (slices per forward pass) must be a positive integer, got {chunk!r}")
        views = _views(tta)
        several = len(self.heads) > 1
        voter_names = list(self.names) if several else list(views)
        per_voter: list[list[Tensor]] = [[] for _ in voter_names]
        first_logits: list[Tensor] = []
        grids = self.grids(tuple(image.shape), spacing)
        windows = {k: plane_windows(grids[k].plane, k[0]) for k in self.input_kinds}
        kind_of = {m: p.kind for p in self.passes for m in p.members}
        voter_grids = [grids[kind_of[m]] for m in range(len(self.heads))] if several else [grids[kind_of[0]]]
        depth = image.shape[-1]
        step = max(1, int(chunk) // max(len(w) for w in windows.values()))  # windows x slices per pass
        for start in range(0, depth, step):
            index = slice(start, min(depth, start + step))
            inputs = {
                k: cut_windows(slices_to_input(image, k[0], k[1], index, grids[k]), windows[k])
                for k in windows
            }
            member_probs = self(inputs, tta, first_logits if keep_logits else None)
            member_probs = [
                [join_windows(p, windows[kind_of[m]], grids[kind_of[m]].plane) for p in viewed]
                for m, viewed in enumerate(member_probs)
            ]
            if keep_logits:
                first_logits[-1] = join_windows(
                    first_logits[-1], windows[kind_of[0]], grids[kind_of[0]].plane
                )
            voters = [_sum(viewed) for viewed in member_probs] if several else member_probs[0]
            for stack, probs in zip(per_voter, voters, strict=True):
                stack.append(probs)
        mean = m2 = None
        masks = []
        for n, stack in enumerate(per_voter, start=1):
            voter = torch.cat(stack) if len(stack) > 1 else stack[0]
            stack.clear()
            if several and len(views) > 1:
                voter = voter.div_(len(views))  # a sum made here, not a caller's tensor
            prob = restore_geometry(voter, tuple(image.shape), voter_grids[0 if not several else n - 1])
            if len(voter_names) > 1:
                masks.append(prob > threshold)
            mean, m2 = _welford_update(mean, m2, prob, n)
        uncertainty = None if m2 is None else (m2 / len(voter_names)).clamp_(min=0.0)
        logits = torch.cat(first_logits) if keep_logits else None
        return VolumeResult(mean, mean > threshold, uncertainty, voter_names, masks, logits)


def plane_windows(plane: Sequence[int], side: int) -> list[tuple[slice, slice]]:
    """`side` x `side` windows covering a `plane` of at least that size (MONAI's dense_patch_slices), each
    overlapping the next by WINDOW_OVERLAP of a side; a plane of one window's size gets that one window."""
    if tuple(plane) == (side, side):
        return [(slice(0, side), slice(0, side))]
    from monai.data.utils import dense_patch_slices  # a 3 s import, for wide fields of view only

    interval = [max(1, int(side * (1 - WINDOW_OVERLAP)))] * 2
    return [
        (slice(int(x.start), int(x.stop)), slice(int(y.start), int(y.stop)))
        for x, y in dense_patch_slices(tuple(plane), (side, side), interval)
    ]


def cut_windows(planes: Tensor, windows: list[tuple[slice, slice]]) -> Tensor:
    """(N, C, H, W) planes as (len(windows) * N, C, S, S) inputs, window after window."""
    if len(windows) == 1:
        return planes
    return torch.cat([planes[..., x, y] for x, y in windows])


def join_windows(outputs: Tensor, windows: list[tuple[slice, slice]], plane: Sequence[int]) -> Tensor:
    """The inverse of cut_windows for (len(windows) * N, S, S) outputs: (N, *plane), at each pixel the mean of
    the windows that cover it, weighted by a Gaussian around each window's centre (WINDOW_SIGMA); a pixel that
    one window covers gets that window's value. The weight is the product of MONAI's 1D importance maps (each
    at least 1e-3): its 2D map clamps the whole corner of a window to 1e-3, where two windows side by side
    would then count alike whichever holds the pixel nearer its centre."""
    if len(windows) == 1:
        return outputs
    from monai.data.utils import compute_importance_map  # plane_windows imported MONAI already

    side = outputs.shape[-1]
    line = compute_importance_map((side,), "gaussian", WINDOW_SIGMA, outputs.device, outputs.dtype)
    weight = line[:, None] * line[None, :]
    parts = outputs.unflatten(0, (len(windows), -1))
    total = outputs.new_zeros((parts.shape[1], *plane))
    weights = outputs.new_zeros(tuple(plane))
    for (x, y), part in zip(windows, parts, strict=True):
        total[:, x, y] += part * weight
        weights[x, y] += weight
    return total / weights


def postprocess_mask(mask: Tensor, postprocess: str) -> Tensor:
    """`postprocess` (POSTPROCESSING) applied to a binary (X, Y, Z) mask (slices last); an empty mask is
    returned as is.

    `largest_part` drops a neighbouring chamber or vessel that a thin wall's partial-volume voxels joined to
    the LA, which `largest_component` keeps whole: the mask's core (eroded by one pixel in-plane, so bridges
    up to two pixels wide vanish) is split into 3D components, every mask voxel goes to its nearest core
    component, and the largest component of the voxels that went to the largest core is kept. Thin parts
    without a core of their own (vein tips, small sections in the end slices) follow the core beside them.
    """
    if postprocess not in POSTPROCESSING:
        raise DataError(f"postprocess must be one of {list(POSTPROCESSING)}, got {postprocess!r}")
    if postprocess == "none" or not mask.any():
        return mask
    if postprocess == "largest_part":
        mask = _largest_part(mask)
    return _largest_component(mask)


def _largest_part(mask: Tensor) -> Tensor:
    """The voxels of `mask` nearest to its largest core component (postprocess_mask); `mask` itself when it
    has no core."""
    from scipy import ndimage  # only this post-processing needs it

    whole = mask.cpu().numpy().astype(bool)
    box = tuple(slice(int(i.min()), int(i.max()) + 1) for i in np.nonzero(whole))
    array = whole[box]
    in_plane = np.zeros((3, 3, 3), bool)
    in_plane[:, :, 1] = True
    core = ndimage.binary_erosion(array, structure=in_plane)
    parts, count = ndimage.label(core, structure=np.ones((3, 3, 3), bool))
    if count == 0:
        return mask
    largest = int(np.argmax(np.bincount(parts.ravel())[1:])) + 1
    nearest = ndimage.distance_transform_edt(parts == 0, return_distances=False, return_indices=True)
    kept = np.zeros_like(whole)
    kept[box] = array & (parts[tuple(nearest)] == largest)
    return torch.from_numpy(kept).to(mask.device)


def _largest_component(mask: Tensor) -> Tensor:
    """The largest 26-connected component of `mask` (the first of equals), as MONAI's
    KeepLargestConnectedComponent keeps it (tests/test_inference.py compares the two); through scipy, as
    MONAI's import alone takes about a second, more than predict's whole inference on a small volume."""
    from scipy import ndimage

    parts, count = ndimage.label(mask.cpu().numpy().astype(bool), structure=np.ones((3, 3, 3), bool))
    if count <= 1:
        return mask.bool()
    largest = int(np.argmax(np.bincount(parts.ravel())[1:])) + 1
    return torch.from_numpy(parts == largest).to(mask.device)


def _views(tta: str | Sequence[str]) -> tuple[str, ...]:
    """The views of a model.tta, or `tta` itself where it names views (VIEWS) directly."""
    if isinstance(tta, str):
        if tta not in TTA_VIEWS:
            raise DataError(f"tta must be one of {list(TTA_VIEWS)}, got {tta!r}")
        return TTA_VIEWS[tta]
    unknown = [name for name in tta if name not in VIEWS]
    if unknown or not tta or len(set(tta)) != len(tta):
        raise DataError(f"test-time views must be distinct names among {list(VIEWS)}, got {list(tta)}")
    return tuple(tta)


def _sum(tensors: list[Tensor]) -> Tensor:
    """Sum of a list, without a copy for a single element (the one-model, no-TTA fast path)."""
    total = tensors[0]
    for t in tensors[1:]:
        total = total + t
    return total


def _welford_update(mean: Tensor | None, m2: Tensor | None, value: Tensor, n: int):
    """Welford's running mean and sum of squared deviations after the n-th value. Exact for equal values
    (delta 0: the mean stays put and m2 stays 0), where E[x^2] - E[x]^2 would leave rounding noise."""
    if mean is None:
        return value, None
    delta = value - mean
    mean += delta / n  # `mean` is the first voter's map, owned here
    term = delta.mul_(value - mean)
    return mean, term if m2 is None else m2.add_(term)


def check_tta_trained(tta: str, augmentation: dict | None, model: str) -> None:
    """Refuse test-time views that `model` was not trained to be invariant to: a mirrored LGE slice puts the
    LA where the model never saw it (Dice 0.87 -> 0.41 on the demo), and a gamma beyond the training's range
    shows it a contrast it never saw. `augmentation` is the training's data.augmentation (None: not
    recorded, as in checkpoints of la-seg before 0.1.1)."""
    views = [VIEWS[name] for name in _views(tta)]
    flips = sorted({field for view in views for field in view.flips_trained})
    gammas = sorted({view.gamma for view in views if view.gamma != 1.0})
    if not flips and not gammas:
        return
    if augmentation is None:
        raise DataError(
            f"model.tta {tta}: {model} does not record its training augmentation, so whether it was trained "
            "for these test-time views is unknown; use model.tta none"
        )
    active = augmentation.get("enabled", True) and augmentation.get("p", 0.5) > 0
    missing = [field for field in flips if not (active and augmentation.get(field, False))]
    if missing:
        options = " and ".join(f"data.augmentation.{field} true" for field in missing)
        raise DataError(
            f"model.tta {tta}: {model} was trained without {', '.join(missing)} (a flipped slice shows it "
            f"anatomy it never saw, which lowers Dice); use model.tta none, or train with {options}"
        )
    low, high = (float(g) / 100.0 for g in augmentation.get("gamma", (100.0, 100.0)))
    beyond = [g for g in gammas if not (active and low <= g <= high)]
    if beyond:
        trained = f"gamma {low:g} to {high:g}" if active else "no augmentation"
        needed = f"[{100 * min(gammas[0], low):g}, {100 * max(gammas[-1], high):g}]"
        raise DataError(
            f"model.tta {tta}: {model} was trained with {trained}, which does not reach gamma "
            f"{', '.join(f'{g:g}' for g in beyond)} (a contrast it never saw, which lowers Dice); use "
            f"model.tta none, or train with data.augmentation.gamma {needed}"
        )
