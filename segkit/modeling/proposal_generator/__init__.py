"""Proposal generators (registered in PROPOSAL_GENERATORS): the FPN Region Proposal Network and
proposals precomputed in a file."""
from .precomputed import PrecomputedProposals, run_proposal_generator
from .rpn import RPN
from .rpn_head import StandardRPNHead, convert_torchvision_rpn_head

__all__ = ["PrecomputedProposals", "RPN", "StandardRPNHead", "convert_torchvision_rpn_head",
           "run_proposal_generator"]
