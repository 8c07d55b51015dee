"""Lightning callbacks: checkpoints, metrics and test report, TensorBoard images, NIfTI prediction writer,
SIGTERM."""

from la_seg.callbacks.checkpoint import RunCheckpoint
from la_seg.callbacks.images import TensorBoardImages
from la_seg.callbacks.metrics import SegmentationMetrics
from la_seg.callbacks.writer import NiftiPredictionWriter

__all__ = ["RunCheckpoint", "NiftiPredictionWriter", "SegmentationMetrics", "TensorBoardImages"]
