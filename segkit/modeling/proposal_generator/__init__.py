"""Proposal generators (registered in PROPOSAL_GENERATORS): the FPN Region Proposal Network."""
from .rpn import RPN
from .rpn_head import StandardRPNHead, convert_torchvision_rpn_head

__all__ = ["RPN", "StandardRPNHead", "convert_torchvision_rpn_head"]
