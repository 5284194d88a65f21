"""Meta-architectures; importing registers ``two_stage`` (META_ARCHS)."""
from .two_stage import TwoStageDetector

__all__ = ["TwoStageDetector"]
