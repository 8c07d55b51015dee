"""la-seg: left-atrium segmentation from LGE MRI with a DINOv2 encoder."""

__version__ = "0.1.0"
