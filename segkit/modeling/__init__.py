"""Models: backbones, proposal generators, ROI heads and meta-architectures.

Importing ``segkit.modeling`` registers every core component (BACKBONES, PROPOSAL_GENERATORS,
HEADS, ROI_HEADS, META_ARCHS), so ``segkit.registry.build`` can find them by name.
"""
from . import backbone, proposal_generator, roi_heads, meta_arch  # noqa: F401  (registration)
from .meta_arch import TwoStageDetector
from .postprocess import detector_postprocess

__all__ = ["backbone", "proposal_generator", "roi_heads", "meta_arch", "TwoStageDetector",
           "detector_postprocess"]
