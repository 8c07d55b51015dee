"""The LightningModule: loss, optimiser and the train / eval / predict steps; metrics live in callbacks."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal, NotRequired, TypedDict, get_args

import lightning as L
import torch
from torch import nn

from la_seg.checkpoints import (
    INFERENCE_FIELDS,
    INPUT_DEFAULTS,
    best_validation_dice,
    holds_backbone,
    input_spec,
    load_checkpoint,
    network_to_rebuild,
    read_backbone_record,
    stored_calibration,
    write_backbone_record,
)
from la_seg.data.io import Geometry, Orientation
from la_seg.data.preprocess import DEFAULT_INPUT, InPlane, InputSpec, labels_to_input
from la_seg.errors import DataError
from la_seg.hub import backbone_weights, with_weights_file
from la_seg.inference import (
    POSTPROCESSING,
    REVIEW_BELOW,
    TTA,
    Agreement,
    Ensemble,
    EnsembleMember,
    Postprocess,
    VolumeResult,
    postprocess_mask,
)
from la_seg.metrics import gather_cases
from la_seg.models.segmenter import LASegmenter, SegmenterConfig
from la_seg.plausibility import (
    Plausibility,
    case_reasons,
    doubt_reasons,
    expected_dice,
    failed_run_reasons,
)

# Largest chunk whole-volume inference runs on CPU. A CPU forward is compute-bound from a few slices on;
# bigger chunks only add GB-sized activations that the allocator maps and page-faults afresh for every op
# (measured: benchmarks/README.md, "Large chunks hurt on CPU").
CPU_EVAL_CHUNK = 4


Loss = Literal["bce", "dice_bce", "batch_dice_bce"]
LOSSES: tuple[str, ...] = get_args(Loss)


class EvalOutput(TypedDict):
    """What validation_step and test_step hand to the callbacks: one case, arrays slices last."""

    case_id: str
    pred: torch.Tensor  # bool (X', Y', Z'), thresholded and post-processed
    label: torch.Tensor  # bool, same layout
    geometry: Geometry
    agreement: NotRequired[Agreement | None]  # with an ensemble or test-time flips: how far the voters agree
    review_reasons: NotRequired[list[str]]  # why the mask cannot be right (la_seg.plausibility)
    expected_dice: NotRequired[float | None]  # the mask's Dice if the probabilities were right


class PredictOutput(TypedDict):
    """What predict_step hands to the writer: tensors, slices last; the writer turns them into files."""

    case_id: str
    mask: torch.Tensor  # bool (X', Y', Z')
    prob: torch.Tensor  # float32, same layout
    geometry: Geometry
    uncertainty: NotRequired[torch.Tensor | None]  # float32 voters' variance (ensemble or TTA), else None
    agreement: NotRequired[Agreement | None]  # per-case agreement of the voters, else None
    review_reasons: NotRequired[list[str]]  # why the mask cannot be right (la_seg.plausibility)
    expected_dice: NotRequired[float | None]  # the mask's Dice if the probabilities were right


class LASegModule(L.LightningModule):
    """Trains the segmenter on 2D slices and evaluates it on whole volumes in their original geometry.

    Args:
        net: the network (backbone, fusion, decoder); `net.img_size` is linked to `data.img_size`.
        slice_context: 2.5D input (neighbouring slices as channels); linked to `data.slice_context`.
        in_plane, target_spacing: how slices are resized to the input (la_seg.data.preprocess); linked to
            `data.in_plane` and `data.target_spacing`.
        intensity_headroom: how the volumes were normalised (la_seg.data.preprocess.normalize_intensity),
            linked to `data.intensity_headroom`: recorded so that test and predict normalise as training did.
        orientation: how volumes were laid out for the network (la_seg.data.io.Orientation), linked to
            `data.orientation`: recorded so that test and predict lay them out as training did.
        loss: `bce` (the paper), `dice_bce` (MONAI DiceCELoss with sigmoid, Dice per slice) or
            `batch_dice_bce` (Dice over the batch's slices as one, as nnU-Net's batch Dice: a per-slice Dice
            weighs a small section of the atrium as much as a large one, which pushes uncertain boundary
            voxels of small sections into the mask).
        optimizer: `adam` (the paper) or `adamw`.
        lr: learning rate (paper: 1e-3).
        weight_decay: weight decay of the optimiser.
        warmup_epochs: linear warm-up length in epochs (0: none).
        scheduler: `none` (constant, the paper) or `cosine` decay to zero after warm-up, stepped per batch.
        eval_batch_size: slices per forward pass when segmenting a whole volume.
        threshold: probability above which a voxel is LA.
        tta: test-time augmentation at evaluation and prediction: `none`, `flips` (the mean over the
            identity and the in-plane flips in X, Y and both; 4x the cost) or `rot180` (identity and flip XY,
            a half turn that does not mirror the anatomy; 2x the cost), both for a model trained with flips,
            or `gamma` (identity and gamma 0.8 and 1.2 on the grey values, 3x the cost; its agreement flags
            masks that hang on one contrast), for a model whose training gamma range reaches both.
        postprocess: `none` or `largest_component` (keep the largest 3D connected component), applied
            the same way in validation, test and predict.
        review_below: with several voters (an ensemble, `tta: flips`, `rot180` or `gamma`), a case is
            flagged for review when their mean pairwise Dice is below this.
        review_expected_dice: a case is flagged for review when its mask's expected Dice under the model's
            own probabilities (la_seg.plausibility.expected_dice) is below this; 0: never.
        plausibility: what a plausible LA mask looks like (volume range, border, components) and the
            validation Dice floor of a working model (la_seg.plausibility); a case outside it is flagged for
            review with the reason.
        save_backbone: store a frozen backbone's weights in every checkpoint (self-contained, but a
            giant checkpoint is 4.5 GB); by default only its name, source and fingerprint are stored.
            A trained or randomly initialised backbone is always stored: it has no other source.
        compile: `torch.compile` the backbone and the decoder.
    """

    def __init__(
        self,
        net: SegmenterConfig = SegmenterConfig(),  # noqa: B008 (never mutated; jsonargparse shows its fields)
        slice_context: bool = DEFAULT_INPUT.slice_context,
        in_plane: InPlane = DEFAULT_INPUT.in_plane,
        target_spacing: float = DEFAULT_INPUT.target_spacing,
        intensity_headroom: float = DEFAULT_INPUT.intensity_headroom,
        orientation: Orientation = DEFAULT_INPUT.orientation,
        loss: Loss = "bce",
        optimizer: Literal["adam", "adamw"] = "adam",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_epochs: int = 0,
        scheduler: Literal["none", "cosine"] = "none",
        eval_batch_size: int = 32,
        threshold: float = 0.5,
        tta: TTA = "none",
        postprocess: Postprocess = "none",
        review_below: float = REVIEW_BELOW,
        review_expected_dice: float = 0.0,
        plausibility: Plausibility = Plausibility(),  # noqa: B008 (frozen)
        save_backbone: bool = False,
        compile: bool = False,
    ) -> None:
        super().__init__()
        if not 0.0 < threshold < 1.0:
            raise DataError(f"model.threshold must lie strictly between 0 and 1, got {threshold}")
        if eval_batch_size < 1:
            raise DataError(f"model.eval_batch_size must be at least 1 slice, got {eval_batch_size}")
        if not 0.0 <= review_expected_dice <= 1.0:
            raise DataError(f"model.review_expected_dice must be in [0, 1], got {review_expected_dice}")
        if isinstance(net, dict):  # hparams read back from YAML
            net = SegmenterConfig(**net)
        # la_seg.data.preprocess's input record; its fields stay flat hyper-parameters (the checkpoint format)
        self.input_spec = InputSpec.checked(  # its fields are linked from data.*: name those
            "data.",
            img_size=net.img_size,
            slice_context=slice_context,
            in_plane=in_plane,
            target_spacing=target_spacing,
            intensity_headroom=intensity_headroom,
            orientation=orientation,
        )
        if isinstance(plausibility, dict):
            plausibility = Plausibility(**plausibility)
        self.save_hyperparameters(
            {
                **locals_without_self(locals()),
                "net": dataclasses.asdict(net),
                "plausibility": dataclasses.asdict(plausibility),
            }
        )
        self.plausibility = plausibility
        self.net_config = net
        self.net = LASegmenter(with_weights_file(net, download=True))
        if loss not in LOSSES:
            raise ValueError(f"model.loss must be one of {list(LOSSES)}, got {loss!r}")
        self._loss_fn: nn.Module | None = None  # built on first use (loss_fn): predict needs none
        if postprocess not in POSTPROCESSING:
            raise ValueError(f"model.postprocess must be one of {list(POSTPROCESSING)}, got {postprocess!r}")
        if compile:
            self.net.backbone.compile()
            self.net.decoder.compile()
        self.member_name = "model"  # the name this model votes under (the CLI sets its checkpoint path)
        self._ensemble: list[Ensemble] = []  # see ensemble()
        self._case_losses: list[dict] = []  # {case_id, loss} of this epoch's evaluated cases on this rank
        # The inference settings chosen on validation at the end of fit (la_seg.callbacks.calibration), as
        # the checkpoint records them; None for a checkpoint without, or before one is loaded.
        self.calibration: dict | None = None
        # The best val/dice each voting checkpoint's run had reached (la_seg.checkpoints.best_validation_dice;
        # None where unknown), this module's and its added members': below plausibility.min_val_dice every
        # mask is flagged.
        self.trained_dice: float | None = None
        self._member_dice: list[float | None] = []

    @property
    def loss_fn(self) -> nn.Module:
        """The training loss, built on first use: predict never computes one, and MONAI's losses take a
        second to import."""
        if self._loss_fn is None:
            if self.hparams.loss == "bce":
                self._loss_fn = nn.BCEWithLogitsLoss()
            else:
                from monai.losses import DiceCELoss

                self._loss_fn = DiceCELoss(sigmoid=True, batch=self.hparams.loss == "batch_dice_bce")
        return self._loss_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        logits = self.net(batch["image"])
        loss = self.loss_fn(logits, batch["label"])
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["image"].shape[0])
        return loss

    def build_optimizer(self) -> torch.optim.Optimizer:
        """The optimiser over the trainable parameters only (a frozen backbone contributes none)."""
        params = [p for p in self.parameters() if p.requires_grad]
        cls = torch.optim.Adam if self.hparams.optimizer == "adam" else torch.optim.AdamW
        return cls(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)

    def configure_optimizers(self):
        optimizer = self.build_optimizer()
        if self.hparams.scheduler == "none" and self.hparams.warmup_epochs == 0:
            return optimizer
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = int(total * self.hparams.warmup_epochs / max(1, self.trainer.max_epochs or 1))
        scheduler = warmup_cosine_schedule(
            optimizer, warmup, total, cosine=self.hparams.scheduler == "cosine"
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---- whole-volume evaluation --------------------------------------------------------------------
    def eval_chunk(self, device: torch.device) -> int:
        """Slices per forward pass of whole-volume inference on `device`."""
        chunk = self.hparams.eval_batch_size
        return min(chunk, CPU_EVAL_CHUNK) if device.type == "cpu" else chunk

    # ---- ensemble members ------------------------------------------------------------------------------
    def add_member(self, member: EnsembleMember, trained_dice: float | None = None) -> None:
        """Another model that votes at test / predict time (e.g. another fold's checkpoint), with the best
        val/dice its run reached. Its fusion and decoder join the ensemble; a frozen backbone equal to one
        already there is not kept twice."""
        self.ensemble().add(member)
        self._member_dice.append(trained_dice)

    @property
    def has_voters(self) -> bool:
        """Whether inference has several voters (members or flips), hence uncertainty and agreement."""
        return len(self.ensemble().heads) > 1 or self.hparams.tta != "none"

    def ensemble(self) -> Ensemble:
        """The module's own net (the first member) and the members added since, built on first use. It is
        held in a list, not as a submodule, so that other members never enter this module's checkpoints."""
        if not self._ensemble:
            own = EnsembleMember(self.member_name, self.net, self.input_spec)
            self._ensemble.append(Ensemble([own]))
        return self._ensemble[0]

    def _prepare_members(self) -> None:
        """Added members live outside the module, so Lightning does not move them: follow the module."""
        if len(self.ensemble().heads) > 1:
            self.ensemble().to(self.device).eval()

    def on_test_start(self) -> None:
        self._prepare_members()

    def on_predict_start(self) -> None:
        self._prepare_members()

    def describe_ensemble(self) -> dict:
        """Members (checkpoint paths), test-time flips and backbone passes, for reports."""
        return {**self.ensemble().describe(), "tta": self.hparams.tta}

    # ---- whole-volume inference --------------------------------------------------------------------
    def infer(
        self,
        image: torch.Tensor,
        spacing: tuple[float, float, float] | None = None,
        keep_logits: bool = False,
        voxel_mm3: float | None = None,
    ) -> VolumeResult:
        """Whole-volume inference of the ensemble (one member: the module's net) with the configured flips;
        the mask post-processed. `spacing`: mm per voxel, slices last (needed with in_plane "spacing"; with
        it, and `voxel_mm3` where known, `review_reasons` says why the mask cannot be right and `agreement`
        how far several voters agree). `keep_logits`: also the module's own net's unflipped slice logits (for
        the evaluation loss)."""
        threshold, chunk, tta = self.hparams.threshold, self.eval_chunk(image.device), self.hparams.tta
        result = self.ensemble().segment_volume(image, threshold, chunk, tta, spacing, keep_logits)
        mask = self.postprocess(result.mask)
        result.expected_dice = expected_dice(result.prob, mask)
        if spacing is not None:
            post, review_below = self.hparams.postprocess, self.review_below()
            result.agreement = result.voter_agreement(spacing, post, review_below, voxel_mm3)
            # the component rule judges the mask before post-processing hides it
            result.review_reasons = case_reasons(mask, spacing, voxel_mm3, result.mask, self.plausibility)
            result.review_reasons += doubt_reasons(result.expected_dice, self.review_expected_dice())
            runs = [self.trained_dice, *self._member_dice]
            result.review_reasons += failed_run_reasons(runs, self.plausibility.min_val_dice)
        result.mask = mask
        return result

    def postprocess(self, mask: torch.Tensor) -> torch.Tensor:
        """The configured post-processing of a binary (X, Y, Z) mask."""
        return postprocess_mask(mask, self.hparams.postprocess)

    def review_below(self) -> float:
        """Mean pairwise Dice below which a case is flagged (model.review_below; older checkpoints: 0.9)."""
        return float(self.hparams.get("review_below", REVIEW_BELOW))

    def review_expected_dice(self) -> float:
        """Expected Dice below which a case is flagged (model.review_expected_dice; older checkpoints: 0)."""
        return float(self.hparams.get("review_expected_dice", 0.0))

    @torch.no_grad()
    def eval_loss(
        self, logits: torch.Tensor, label: torch.Tensor, spacing: tuple[float, float, float] | None = None
    ) -> torch.Tensor:
        """The training loss on a volume's slices, in fp32 outside autocast: per chunk, weighted by slices
        (a batch Dice: over all the volume's slices at once, a 3D Dice).

        Autocast refuses some losses (BCE on probabilities) and would run others in low precision.
        """
        depth = logits.shape[0]
        chunk = depth if self.hparams.get("loss") == "batch_dice_bce" else self.eval_chunk(logits.device)
        size = self.input_spec.img_size
        grid = self.input_spec.grid(label.shape[:2], spacing)
        total = logits.new_zeros(())
        with torch.autocast(device_type=logits.device.type, enabled=False):
            for start in range(0, depth, chunk):
                index = slice(start, min(depth, start + chunk))
                target = labels_to_input(label, size, index=index, grid=grid)
                total += self.loss_fn(logits[index, None].float(), target) * target.shape[0]
        return total / depth

    def _evaluate(self, batch: dict) -> EvalOutput:
        """The loss is the module's own net's (the first member, unflipped), whatever votes: it stays the
        training loss on the model's slices, comparable with training and with single-model runs."""
        image, label, geometry = batch["image"], batch["label"], batch["geometry"]
        spacing, voxel_mm3 = geometry.slices_last_spacing, getattr(geometry, "voxel_volume_mm3", None)
        result = self.infer(image, spacing, keep_logits=True, voxel_mm3=voxel_mm3)
        loss = float(self.eval_loss(result.logits, label, spacing))
        self._case_losses.append({"case_id": batch["case_id"], "loss": loss})
        return EvalOutput(
            case_id=batch["case_id"],
            pred=result.mask,
            label=label.bool(),
            geometry=geometry,
            agreement=result.agreement,
            review_reasons=result.review_reasons,
            expected_dice=result.expected_dice,
        )

    def _log_case_loss(self, stage: str) -> None:
        """`{stage}/loss`: the mean over cases, each counted once whichever ranks evaluated it (a mean over
        ranks' steps would weigh a case twice where the distributed sampler repeats it). Collective."""
        rows, self._case_losses = gather_cases(self._case_losses), []
        if rows:
            mean = sum(row["loss"] for row in rows) / len(rows)
            self.log(f"{stage}/loss", mean, batch_size=len(rows), sync_dist=False)

    def validation_step(self, batch: dict, batch_idx: int) -> EvalOutput:
        return self._evaluate(batch)

    def on_validation_epoch_start(self) -> None:
        self._case_losses = []

    def on_validation_epoch_end(self) -> None:
        self._log_case_loss("val")

    def test_step(self, batch: dict, batch_idx: int) -> EvalOutput:
        return self._evaluate(batch)

    def on_test_epoch_start(self) -> None:
        self._case_losses = []

    def on_test_epoch_end(self) -> None:
        self._log_case_loss("test")

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> PredictOutput:
        geometry = batch["geometry"]
        spacing, voxel_mm3 = geometry.slices_last_spacing, getattr(geometry, "voxel_volume_mm3", None)
        result = self.infer(batch["image"], spacing, voxel_mm3=voxel_mm3)
        return PredictOutput(
            case_id=batch["case_id"],
            mask=result.mask,
            prob=result.prob,
            geometry=geometry,
            uncertainty=result.uncertainty,
            agreement=result.agreement,
            review_reasons=result.review_reasons,
            expected_dice=result.expected_dice,
        )

    # ---- checkpoints (the format lives in la_seg/checkpoints.py) ------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        write_backbone_record(self, checkpoint)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        read_backbone_record(self, checkpoint)
        self.calibration = stored_calibration(checkpoint)
        self.trained_dice = best_validation_dice(checkpoint)

    def inference_settings(self) -> dict:
        """The choices that may differ from training (recorded in reports): threshold, post-processing, ...,
        and `calibration`: what the checkpoint's end-of-fit calibration chose, and how (None without one)."""
        settings = {field: self.hparams.get(field) for field in INFERENCE_FIELDS}
        return {**settings, "weights": self.net_config.weights, "calibration": self.calibration}

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, map_location=None, **kwargs):  # type: ignore[override]
        """Rebuild the model from a checkpoint alone (read once, as data), without any download.

        A self-contained checkpoint skips the hub entirely; a lean one rebuilds its backbone from the
        recorded source, where only a local file or the hub cache will do (la_seg.hub).
        `kwargs` override hyper-parameters (e.g. `threshold`, or `net` with another weights path).
        """
        checkpoint = load_checkpoint(checkpoint_path)
        stored = {k: v for k, v in checkpoint["hyper_parameters"].items() if not k.startswith("_")}
        hparams = {**INPUT_DEFAULTS, **stored}  # older checkpoints lack newer input settings
        net = kwargs.pop("net", None)
        if net is None:
            net = network_to_rebuild(checkpoint)
        else:
            net = SegmenterConfig(**net) if isinstance(net, dict) else net
            if holds_backbone(checkpoint):
                net = dataclasses.replace(net, pretrained=False, weights=None)
        backbone_weights(net, download=False)  # a DataError here when not local: the build then finds it
        module = cls(**{**hparams, **kwargs, "net": net})
        module.on_load_checkpoint(checkpoint)
        module.load_state_dict(checkpoint["state_dict"])
        return module.to(map_location) if map_location is not None else module


def load_member(
    path: str | Path, weights: str | None = None, checkpoint: dict | None = None
) -> EnsembleMember:
    """Another checkpoint's network as an ensemble member named by its path, read as data (weights_only).

    A checkpoint that holds its backbone is built without initialising one (the state overwrites it); a lean
    one rebuilds its frozen backbone offline (see checkpoints.network_to_rebuild for where its weights come
    from), and must match the recorded fingerprint.
    `checkpoint`: the file's contents when already read.
    """
    checkpoint = checkpoint if checkpoint is not None else load_checkpoint(path)
    config = network_to_rebuild(checkpoint, weights)
    stored = holds_backbone(checkpoint)
    try:
        holder = _NetHolder(config, empty_backbone=stored)
    except DataError as error:
        raise DataError(f"checkpoint {path} does not contain its frozen backbone: {error}") from None
    holder.on_load_checkpoint(checkpoint)
    holder.load_state_dict(checkpoint["state_dict"])
    return EnsembleMember(str(path), holder.net.eval(), input_spec(checkpoint))


class _NetHolder(nn.Module):
    """Just the network under the module's attribute names, so that an extra member's checkpoint is read by
    the same functions as the module's (state keys `net.*`, backbone record, shape check)."""

    def __init__(self, config: SegmenterConfig, empty_backbone: bool) -> None:
        super().__init__()
        self.net_config = config
        built = config if empty_backbone else with_weights_file(config, download=False)
        self.net = LASegmenter(built, empty_backbone=empty_backbone)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        read_backbone_record(self, checkpoint)


def warmup_cosine_schedule(
    optimizer: torch.optim.Optimizer, warmup: int, total: int, cosine: bool
) -> torch.optim.lr_scheduler.LRScheduler:
    """Linear warm-up over `warmup` steps (factor (step + 1) / warmup), then constant or cosine decay to zero
    at step `total`; stepped per batch."""
    schedules: list[torch.optim.lr_scheduler.LRScheduler] = []
    if warmup > 0:
        ramp = torch.optim.lr_scheduler.LinearLR(optimizer, 1.0 / warmup, 1.0, total_iters=max(1, warmup - 1))
        schedules.append(ramp)
    if cosine:
        decay = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total - warmup))
        schedules.append(decay)
    if not schedules:
        return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    if len(schedules) == 1:
        return schedules[0]
    return torch.optim.lr_scheduler.SequentialLR(optimizer, schedules, milestones=[warmup])


def locals_without_self(scope: dict) -> dict:
    """The constructor's arguments, as `save_hyperparameters` should record them."""
    return {k: v for k, v in scope.items() if k not in ("self", "__class__")}
