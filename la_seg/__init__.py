"""la-seg: left-atrium segmentation from LGE MRI with a DINOv2 encoder."""

from la_seg.runtime import prefer_passive_openmp

prefer_passive_openmp()  # before anything imports torch: OpenMP reads its wait policy once, when it loads

__version__ = "0.1.0"
