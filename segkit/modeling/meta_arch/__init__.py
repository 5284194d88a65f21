"""Meta-architectures; importing registers ``two_stage``, ``one_stage`` and ``proposal_only``
(META_ARCHS)."""
from .one_stage import OneStageDetector
from .proposal_only import ProposalOnlyDetector
from .two_stage import TwoStageDetector

__all__ = ["OneStageDetector", "ProposalOnlyDetector", "TwoStageDetector"]
