"""R-CNN box parameterisation: encode GT boxes as deltas relative to reference boxes and back.

The parameterisation is the one used by every detector in this code base (RPN, Fast R-CNN box
head, RetinaNet; papers.md sections 5-7 "box targets use the R-CNN parameterisation"):

    dx = wx * (gx - px) / pw        dy = wy * (gy - py) / ph
    dw = ww * log(gw / pw)          dh = wh * log(gh / ph)

with (px, py, pw, ph) the centre and size of the reference box (anchor or proposal) and
(gx, gy, gw, gh) those of the target box. Widths are ``x2 - x1`` (no "+1" pixel convention),
which is what torchvision and detectron2 use, so converted weights decode identically.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

__all__ = ["Box2BoxTransform", "DEFAULT_SCALE_CLAMP"]

# exp(dw) is capped so that a box can grow at most 1000/16 times its reference size: the
# largest ratio between the biggest image side (~1000 px) and the smallest anchor (16 px).
DEFAULT_SCALE_CLAMP = math.log(1000.0 / 16)


def _centers_and_sizes(boxes: Tensor):
    """(N, 4) XYXY boxes -> centre x, centre y, width, height, each (N,)."""
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    return boxes[:, 0] + 0.5 * w, boxes[:, 1] + 0.5 * h, w, h


class Box2BoxTransform:
    """Encodes/decodes XYXY boxes as (dx, dy, dw, dh) deltas w.r.t. reference boxes.

    Args:
        weights: (wx, wy, ww, wh) multipliers of the deltas. (1, 1, 1, 1) for the RPN,
            (10, 10, 5, 5) for the Fast R-CNN box head; they rescale the targets to roughly
            unit variance so that one smooth-L1 beta suits all four coordinates.
        scale_clamp: upper bound applied to dw and dh before ``exp`` when decoding.
    """

    def __init__(self, weights: Sequence[float], scale_clamp: float = DEFAULT_SCALE_CLAMP):
        weights = tuple(float(w) for w in weights)
        if len(weights) != 4 or any(w <= 0 for w in weights):
            raise ValueError(
                f"Box2BoxTransform: weights must be 4 positive numbers (wx, wy, ww, wh), "
                f"got {weights!r}"
            )
        self.weights = weights
        self.scale_clamp = float(scale_clamp)

    def __repr__(self) -> str:
        return f"Box2BoxTransform(weights={self.weights}, scale_clamp={self.scale_clamp:.4f})"

    def get_deltas(self, src_boxes: Tensor, target_boxes: Tensor) -> Tensor:
        """Deltas that transform ``src_boxes`` into ``target_boxes``.

        Args:
            src_boxes: (N, 4) XYXY reference boxes (anchors or proposals); must have positive
                width and height.
            target_boxes: (N, 4) XYXY boxes to encode, paired row by row with ``src_boxes``.

        Returns:
            (N, 4) float tensor of (dx, dy, dw, dh), in the dtype of ``target_boxes``.
        """
        if src_boxes.shape != target_boxes.shape or src_boxes.shape[-1:] != (4,):
            raise ValueError(
                f"Box2BoxTransform.get_deltas: src_boxes and target_boxes must both be (N, 4), "
                f"got {tuple(src_boxes.shape)} and {tuple(target_boxes.shape)}"
            )
        src_boxes = src_boxes.to(target_boxes.dtype)
        wx, wy, ww, wh = self.weights

        src_cx, src_cy, src_w, src_h = _centers_and_sizes(src_boxes)
        tgt_cx, tgt_cy, tgt_w, tgt_h = _centers_and_sizes(target_boxes)

        dx = wx * (tgt_cx - src_cx) / src_w
        dy = wy * (tgt_cy - src_cy) / src_h
        dw = ww * torch.log(tgt_w / src_w)
        dh = wh * torch.log(tgt_h / src_h)
        return torch.stack((dx, dy, dw, dh), dim=1)

    def apply_deltas(self, deltas: Tensor, boxes: Tensor) -> Tensor:
        """Apply ``deltas`` to ``boxes``; the inverse of :meth:`get_deltas`.

        Args:
            deltas: (N, K*4) deltas; K > 1 holds one (dx, dy, dw, dh) group per class
                (class-specific regression) and every group is applied to the same box.
            boxes: (N, 4) XYXY reference boxes.

        Returns:
            (N, K*4) XYXY decoded boxes in the dtype of ``deltas``.
        """
        if deltas.dim() != 2 or deltas.shape[1] % 4 != 0 or boxes.shape != (deltas.shape[0], 4):
            raise ValueError(
                f"Box2BoxTransform.apply_deltas: expected deltas (N, K*4) and boxes (N, 4), got "
                f"{tuple(deltas.shape)} and {tuple(boxes.shape)}"
            )
        boxes = boxes.to(deltas.dtype)
        wx, wy, ww, wh = self.weights

        ctr_x, ctr_y, widths, heights = _centers_and_sizes(boxes)

        dx = deltas[:, 0::4] / wx
        dy = deltas[:, 1::4] / wy
        # Clamp before exp: an untrained or diverging regressor must not produce inf boxes.
        dw = torch.clamp(deltas[:, 2::4] / ww, max=self.scale_clamp)
        dh = torch.clamp(deltas[:, 3::4] / wh, max=self.scale_clamp)

        pred_ctr_x = dx * widths[:, None] + ctr_x[:, None]
        pred_ctr_y = dy * heights[:, None] + ctr_y[:, None]
        half_w = 0.5 * (torch.exp(dw) * widths[:, None])
        half_h = 0.5 * (torch.exp(dh) * heights[:, None])

        x1 = pred_ctr_x - half_w
        y1 = pred_ctr_y - half_h
        x2 = pred_ctr_x + half_w
        y2 = pred_ctr_y + half_h
        # (N, K, 4) -> (N, K*4) keeps each class's box contiguous.
        return torch.stack((x1, y1, x2, y2), dim=2).reshape(deltas.shape)
