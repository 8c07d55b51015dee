"""Plain nn.Modules: DINOv2/v3 backbone, block fusion, image-guided decoder and the segmenter of the three."""

from la_seg.models.backbone import DINOBackbone, dino_model_names
from la_seg.models.decoder import DecoderBlock, ImageGuidedDecoder, SegmentationHead
from la_seg.models.fusion import FUSION_MODES, BlockFusion, FusionMode
from la_seg.models.segmenter import LASegmenter, SegmenterConfig

__all__ = [
    "FUSION_MODES",
    "BlockFusion",
    "DINOBackbone",
    "DecoderBlock",
    "FusionMode",
    "ImageGuidedDecoder",
    "LASegmenter",
    "SegmentationHead",
    "SegmenterConfig",
    "dino_model_names",
]
