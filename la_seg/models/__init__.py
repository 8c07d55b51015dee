"""Plain nn.Modules: DINOv2 backbone, block fusion, image-guided decoder and the segmenter composing them."""

from la_seg.models.backbone import DINOv2Backbone, dinov2_model_names
from la_seg.models.decoder import ImageGuidedDecoder
from la_seg.models.fusion import FUSION_MODES, BlockFusion
from la_seg.models.segmenter import LASegmenter, SegmenterConfig

__all__ = [
    "FUSION_MODES",
    "BlockFusion",
    "DINOv2Backbone",
    "ImageGuidedDecoder",
    "LASegmenter",
    "SegmenterConfig",
    "dinov2_model_names",
]
