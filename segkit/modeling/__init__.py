"""Models: backbones, proposal generators, ROI heads, dense heads and meta-architectures.

Importing ``segkit.modeling`` registers every core component (BACKBONES, PROPOSAL_GENERATORS,
HEADS, ROI_HEADS, META_ARCHS, LOSSES), so ``segkit.registry.build`` can find them by name.
"""
from . import losses  # noqa: F401  (registration; first, heads build their losses from LOSSES)
from . import backbone, dense_heads, meta_arch, proposal_generator, roi_heads  # noqa: F401
from .meta_arch import TwoStageDetector
from .postprocess import detector_postprocess

__all__ = ["losses", "backbone", "proposal_generator", "roi_heads", "dense_heads", "meta_arch",
           "TwoStageDetector", "detector_postprocess"]
