"""The LightningModule: loss, optimiser and the train / eval / predict steps; metrics live in callbacks."""

from __future__ import annotations

import dataclasses
import math
from contextlib import contextmanager
from typing import Literal, TypedDict

import lightning as L
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from monai.transforms import KeepLargestConnectedComponent
from torch import nn

from la_seg.data.io import Geometry
from la_seg.data.preprocess import restore_geometry, slices_to_input
from la_seg.models.segmenter import LASegmenter, SegmenterConfig

BACKBONE_PREFIX = "net.backbone."
# Largest chunk segment_volume runs on CPU. A CPU forward is compute-bound from a few slices on; bigger chunks
# only add GB-sized activations that the allocator maps and page-faults afresh for every op (base at 448 px,
# bf16: 64-slice chunks 2.56 s/slice, 4-slice chunks 1.92 s/slice; see benchmarks/README.md).
CPU_EVAL_CHUNK = 4


class EvalOutput(TypedDict):
    """What validation_step and test_step hand to the callbacks: one case, arrays slices last."""

    case_id: str
    pred: torch.Tensor  # bool (X', Y', Z'), thresholded and post-processed
    label: torch.Tensor  # bool, same layout
    geometry: Geometry


class PredictOutput(TypedDict):
    """What predict_step hands to the writer: tensors, slices last; the writer turns them into files."""

    case_id: str
    mask: torch.Tensor  # bool (X', Y', Z')
    prob: torch.Tensor  # float32, same layout
    geometry: Geometry


class LASegModule(L.LightningModule):
    """Trains the segmenter on 2D slices and evaluates it on whole volumes in their original geometry.

    Args:
        net: the network (backbone, fusion, decoder); `net.img_size` is linked to `data.img_size`.
        slice_context: 2.5D input (neighbouring slices as channels); linked to `data.slice_context`.
        loss: `bce` (the paper) or `dice_bce` (MONAI DiceCELoss with sigmoid).
        optimizer: `adam` (the paper) or `adamw`.
        lr: learning rate (paper: 1e-3).
        weight_decay: weight decay of the optimiser.
        warmup_epochs: linear warm-up length in epochs (0: none).
        scheduler: `none` (constant, the paper) or `cosine` decay to zero after warm-up, stepped per batch.
        eval_batch_size: slices per forward pass when segmenting a whole volume.
        threshold: probability above which a voxel is LA.
        postprocess: `none` or `largest_component` (keep the largest 3D connected component), applied
            the same way in validation, test and predict.
        save_backbone: store a frozen backbone's weights in every checkpoint (self-contained, but a
            giant checkpoint is 4.5 GB); by default only its name, source and fingerprint are stored.
            A trained or randomly initialised backbone is always stored: it has no other source.
        compile: `torch.compile` the backbone and the decoder.
    """

    def __init__(
        self,
        net: SegmenterConfig = SegmenterConfig(),  # noqa: B008 (never mutated; jsonargparse shows its fields)
        slice_context: bool = False,
        loss: Literal["bce", "dice_bce"] = "bce",
        optimizer: Literal["adam", "adamw"] = "adam",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_epochs: int = 0,
        scheduler: Literal["none", "cosine"] = "none",
        eval_batch_size: int = 32,
        threshold: float = 0.5,
        postprocess: Literal["none", "largest_component"] = "none",
        save_backbone: bool = False,
        compile: bool = False,
    ) -> None:
        super().__init__()
        if isinstance(net, dict):  # hparams read back from YAML
            net = SegmenterConfig(**net)
        self.save_hyperparameters({**locals_without_self(locals()), "net": dataclasses.asdict(net)})
        self.net_config = net
        self.net = LASegmenter(net)
        if loss == "bce":
            self.loss_fn: nn.Module = nn.BCEWithLogitsLoss()
        elif loss == "dice_bce":
            self.loss_fn = DiceCELoss(sigmoid=True)
        else:
            raise ValueError(f"model.loss must be 'bce' or 'dice_bce', got {loss!r}")
        self.largest_component = (
            KeepLargestConnectedComponent() if postprocess == "largest_component" else None
        )
        if compile:
            self.net.backbone.compile()
            self.net.decoder.compile()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    # ---- training ---------------------------------------------------------------------------------
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
        cosine = self.hparams.scheduler == "cosine"

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            if not cosine:
                return 1.0
            progress = (step - warmup) / max(1, total - warmup)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---- whole-volume evaluation --------------------------------------------------------------------
    def eval_chunk(self, device: torch.device) -> int:
        """Slices per forward pass in segment_volume on `device`."""
        chunk = self.hparams.eval_batch_size
        return min(chunk, CPU_EVAL_CHUNK) if device.type == "cpu" else chunk

    @torch.no_grad()
    def segment_volume(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Probability map and binary mask, both (X, Y, Z) in the volume's original geometry."""
        depth = image.shape[-1]
        chunk = self.eval_chunk(image.device)
        probs = []
        for start in range(0, depth, chunk):
            index = slice(start, min(depth, start + chunk))
            x = slices_to_input(image, self.net_config.img_size, self.hparams.slice_context, index=index)
            probs.append(torch.sigmoid(self.net(x).float())[:, 0])
        prob = restore_geometry(torch.cat(probs), tuple(image.shape))
        mask = prob > self.hparams.threshold
        if self.largest_component is not None and mask.any():
            mask = self.largest_component(mask[None]).squeeze(0).bool()
        return prob, mask

    def _evaluate(self, batch: dict, stage: str) -> dict:
        prob, mask = self.segment_volume(batch["image"])
        label = batch["label"]
        loss = F.binary_cross_entropy(prob.clamp(1e-6, 1 - 1e-6), label.float())
        self.log(f"{stage}/loss", loss, batch_size=1, sync_dist=True)
        return {"case_id": batch["case_id"], "pred": mask, "label": label.bool(), "spacing": batch["spacing"]}

    def validation_step(self, batch: dict, batch_idx: int) -> dict:
        return self._evaluate(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> dict:
        return self._evaluate(batch, "test")

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict:
        prob, mask = self.segment_volume(batch["image"])
        return {
            "case_id": batch["case_id"],
            "mask": mask.to(torch.uint8).cpu().numpy(),
            "prob": prob.cpu().numpy(),
            "affine": batch["affine"],
            "spacing": batch["spacing"],
            "image_path": batch["image_path"],
        }

    # ---- lean checkpoints ---------------------------------------------------------------------------
    def _backbone_record(self) -> dict:
        net = self.net_config
        return {
            "name": net.backbone,
            "pretrained": net.pretrained,
            "weights": net.weights,
            "fingerprint": self.net.backbone.fingerprint(),
        }

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["backbone"] = self._backbone_record()
        has_source = self.net_config.pretrained or self.net_config.weights is not None
        if self.net.backbone.frozen and has_source and not self.hparams.save_backbone:
            state = checkpoint["state_dict"]
            for key in [k for k in state if k.startswith(BACKBONE_PREFIX)]:
                del state[key]
            checkpoint["backbone"]["stored"] = False
        else:
            checkpoint["backbone"]["stored"] = True

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        record = checkpoint.get("backbone")
        if record is None or record.get("stored", True):
            return
        current = self._backbone_record()
        if current["fingerprint"] != record["fingerprint"]:
            raise RuntimeError(
                "The checkpoint does not contain the frozen backbone; it was trained with "
                f"{record['name']} (weights: {_source(record)}, fingerprint {record['fingerprint']}), but"
                f" the backbone built now ({current['name']}, weights: {_source(current)}) has fingerprint "
                f"{current['fingerprint']}. Point model.net.weights at the same weights file, "
                "or train with model.save_backbone: true for a self-contained checkpoint."
            )
        backbone_state = {BACKBONE_PREFIX + k: v for k, v in self.net.backbone.state_dict().items()}
        checkpoint["state_dict"].update(backbone_state)

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, map_location=None, **kwargs):  # type: ignore[override]
        """Rebuild the model from a checkpoint alone, without any download.

        A self-contained checkpoint skips the hub entirely; a lean one rebuilds its backbone from the
        recorded source with the hub switched to offline, so only cached or local weights are used.
        """
        checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
        record = checkpoint.get("backbone", {})
        net = kwargs.pop("net", None) or SegmenterConfig(**checkpoint["hyper_parameters"]["net"])
        if isinstance(net, dict):
            net = SegmenterConfig(**net)
        if record.get("stored", True):
            net = dataclasses.replace(net, pretrained=False, weights=None)
        with _hub_offline():
            return super().load_from_checkpoint(checkpoint_path, map_location=map_location, net=net, **kwargs)


def _source(record: dict) -> str:
    return record["weights"] or ("hub" if record["pretrained"] else "random")


def locals_without_self(scope: dict) -> dict:
    """The constructor's arguments, as `save_hyperparameters` should record them."""
    return {k: v for k, v in scope.items() if k not in ("self", "__class__")}


@contextmanager
def _hub_offline():
    """Let huggingface_hub (timm's hub loader) use its local cache only; it reads the flag at call time."""
    import huggingface_hub.constants as hub

    previous = hub.HF_HUB_OFFLINE
    hub.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE = previous
