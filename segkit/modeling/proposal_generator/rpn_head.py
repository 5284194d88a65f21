"""The RPN's convolutional head, shared across pyramid levels (papers.md section 5)."""
from __future__ import annotations

import re
from typing import Dict, List, Sequence, Tuple

import torch.nn.functional as F
from torch import Tensor, nn

from segkit.layers import Conv2d

__all__ = ["StandardRPNHead", "convert_torchvision_rpn_head"]


class StandardRPNHead(nn.Module):
    """3x3 conv + ReLU, then sibling 1x1 convs for objectness (A) and box deltas (4A).

    FPN section 5 attaches "the same head on every level ... with parameters shared across
    levels", which works because every level has the same channel count d. Weights start from
    N(0, 0.01) with zero bias (Faster R-CNN / torchvision / Detectron).

    Args:
        in_channels: channels C of every input level.
        num_anchors: anchors per location A (same on every level).
        box_dim: numbers regressed per anchor (4 for XYXY deltas).
    """

    def __init__(self, in_channels: int, num_anchors: int, box_dim: int = 4):
        super().__init__()
        if in_channels <= 0 or num_anchors <= 0:
            raise ValueError(f"StandardRPNHead: in_channels and num_anchors must be > 0, got "
                             f"{in_channels} and {num_anchors}")
        self.conv = Conv2d(in_channels, in_channels, kernel_size=3, padding=1,
                           activation=F.relu_)
        self.objectness_logits = nn.Conv2d(in_channels, num_anchors, kernel_size=1)
        self.anchor_deltas = nn.Conv2d(in_channels, num_anchors * box_dim, kernel_size=1)
        self.num_anchors, self.box_dim = num_anchors, box_dim
        for layer in (self.conv, self.objectness_logits, self.anchor_deltas):
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.zeros_(layer.bias)

    def forward(self, features: Sequence[Tensor]) -> Tuple[List[Tensor], List[Tensor]]:
        """Run the head on every level.

        Args:
            features: per level a (N, C, H_l, W_l) map.

        Returns:
            objectness: per level (N, A, H_l, W_l) logits.
            deltas: per level (N, A * box_dim, H_l, W_l), anchor a's deltas at channels
                ``a * box_dim : (a + 1) * box_dim``.
        """
        objectness, deltas = [], []
        for x in features:
            t = self.conv(x)
            objectness.append(self.objectness_logits(t))
            deltas.append(self.anchor_deltas(t))
        return objectness, deltas


_TV_HEAD_KEY = re.compile(r"^head\.(conv(?:\.0)?(?:\.0)?|cls_logits|bbox_pred)\.(weight|bias)$")
_TV_HEAD_NAMES = {"cls_logits": "objectness_logits", "bbox_pred": "anchor_deltas"}


def convert_torchvision_rpn_head(state_dict: Dict[str, Tensor], prefix: str = "rpn.",
                                 out_prefix: str = "rpn_head.") -> Dict[str, Tensor]:
    """Rename torchvision ``RegionProposalNetwork`` head weights into :class:`StandardRPNHead`.

    ``head.conv.0.0`` (or the pre-v2 ``head.conv``) -> ``conv``, ``head.cls_logits`` ->
    ``objectness_logits``, ``head.bbox_pred`` -> ``anchor_deltas``. The torchvision
    ``AnchorGenerator`` has no weights.

    Args:
        state_dict: torchvision weights (a full detection model or just its ``rpn``).
        prefix: prefix of the RPN keys in ``state_dict`` (``"rpn."`` for a detection model,
            ``""`` for an ``RegionProposalNetwork`` state dict); other keys are ignored.
        out_prefix: prepended to the new keys; the default suits :class:`RPN`'s state dict.

    Returns:
        New dict with the renamed tensors.

    Raises:
        ValueError: a key under ``prefix`` that is not a torchvision RPN head parameter, or a
            multi-conv head (``conv_depth > 1``), which :class:`StandardRPNHead` does not have.
    """
    out = {}
    for full_key, value in state_dict.items():
        if not full_key.startswith(prefix):
            continue
        m = _TV_HEAD_KEY.match(full_key[len(prefix):])
        if m is None:
            raise ValueError(f"convert_torchvision_rpn_head: unexpected key {full_key!r}; expected "
                             f"{prefix}head.conv.0.0 / cls_logits / bbox_pred weights (a single "
                             f"3x3 conv head)")
        module, param = m.groups()
        name = _TV_HEAD_NAMES.get(module, "conv")
        out[f"{out_prefix}{name}.{param}"] = value
    return out
