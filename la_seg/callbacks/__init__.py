"""Lightning callbacks: checkpoints, metrics and test report, TensorBoard images, NIfTI prediction writer,
SIGTERM, and the inference settings chosen on validation at the end of fit."""

from la_seg.callbacks.calibration import InferenceCalibration
from la_seg.callbacks.checkpoint import RunCheckpoint
from la_seg.callbacks.images import TensorBoardImages
from la_seg.callbacks.metrics import SegmentationMetrics
from la_seg.callbacks.writer import NiftiPredictionWriter

__all__ = [
    "InferenceCalibration",
    "NiftiPredictionWriter",
    "RunCheckpoint",
    "SegmentationMetrics",
    "TensorBoardImages",
]
