"""Pasting fixed-size mask predictions back into full images (Mask R-CNN section 3)."""
from __future__ import annotations

from typing import List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["paste_masks_in_image"]

# Upper bound on sampled pixels (masks x region height x region width) per grid_sample call.
# The sampling grid costs 8 bytes per pixel, so 2**23 pixels keep one chunk near 100 MB.
_PIXEL_BUDGET = 1 << 23


def _pixel_extents(boxes: Tensor, height: int, width: int) -> Tensor:
    """Integer pixel ranges [x0, x1) x [y0, y1) that can lie inside each box, clipped to the image.

    Only pixels whose centre falls inside the box can reach a pasted probability >= 0.5 (the
    mask is zero-padded outside), so one pixel of slack on each side is enough.

    Args:
        boxes: (N, 4) XYXY float boxes.
    Returns:
        (N, 4) int64 ``[x0, y0, x1, y1]``.
    """
    b = boxes.detach().cpu().double()
    x0 = (b[:, 0].floor() - 1).clamp(0, width)
    y0 = (b[:, 1].floor() - 1).clamp(0, height)
    x1 = (b[:, 2].ceil() + 1).clamp(0, width)
    y1 = (b[:, 3].ceil() + 1).clamp(0, height)
    return torch.stack([x0, y0, x1, y1], dim=1).long()


def _chunks(extents: Tensor) -> List[Tuple[int, int, List[int]]]:
    """Group consecutive masks so each group's union region times its size fits the budget.

    Returns a list of ``(start, end, [x0, y0, x1, y1] union region)`` tuples.
    """
    groups = []
    start, region = 0, None
    for i, e in enumerate(extents.tolist()):
        merged = e if region is None else [min(region[0], e[0]), min(region[1], e[1]),
                                           max(region[2], e[2]), max(region[3], e[3])]
        pixels = (i - start + 1) * (merged[2] - merged[0]) * (merged[3] - merged[1])
        if region is not None and pixels > _PIXEL_BUDGET:
            groups.append((start, i, region))
            start, merged = i, e
        region = merged
    if region is not None:
        groups.append((start, len(extents), region))
    return groups


def paste_masks_in_image(masks: Tensor, boxes: Tensor, image_size: Tuple[int, int],
                         threshold: float = 0.5) -> Tensor:
    """Paste per-box mask probabilities into full-image binary masks.

    Each mask is treated as a continuous image stretched over its box: the full-image pixel
    with centre ``(x + 0.5, y + 0.5)`` takes the bilinearly interpolated mask value at that
    point (``grid_sample``, ``align_corners=False``, zero outside the mask), then is kept where
    the value is ``>= threshold``. Only each box's pixel extent is sampled, in chunks of
    bounded size, so memory stays near the size of the (N, h, w) bool output.

    Args:
        masks: (N, M, M) (or (N, Mh, Mw), or (N, 1, Mh, Mw)) float mask probabilities in [0, 1].
        boxes: (N, 4) XYXY boxes in image pixels, float.
        image_size: (h, w) of the output image.
        threshold: binarisation threshold on the pasted probability.

    Returns:
        (N, h, w) bool masks on ``masks.device``. Boxes with zero width or height give empty masks.
    """
    if masks.dim() == 4 and masks.shape[1] == 1:
        masks = masks[:, 0]
    if masks.dim() != 3:
        raise ValueError(f"paste_masks_in_image: masks must have shape (N, M, M), got {tuple(masks.shape)}")
    if boxes.dim() != 2 or boxes.shape[1] != 4 or boxes.shape[0] != masks.shape[0]:
        raise ValueError(f"paste_masks_in_image: boxes must have shape ({masks.shape[0]}, 4) XYXY, "
                         f"got {tuple(boxes.shape)}")
    height, width = int(image_size[0]), int(image_size[1])
    n = masks.shape[0]
    out = torch.zeros((n, height, width), dtype=torch.bool, device=masks.device)
    if n == 0 or height == 0 or width == 0:
        return out

    masks = masks.float()
    boxes = boxes.to(device=masks.device, dtype=torch.float32)
    extents = _pixel_extents(boxes, height, width)
    for start, end, (rx0, ry0, rx1, ry1) in _chunks(extents):
        if rx1 <= rx0 or ry1 <= ry0:
            continue  # every box of this chunk lies outside the image
        b = boxes[start:end]
        bw = (b[:, 2] - b[:, 0]).clamp(min=1e-6)
        bh = (b[:, 3] - b[:, 1]).clamp(min=1e-6)
        xs = torch.arange(rx0, rx1, device=masks.device, dtype=torch.float32) + 0.5
        ys = torch.arange(ry0, ry1, device=masks.device, dtype=torch.float32) + 0.5
        # Normalised sampling coordinates: -1 / +1 are the box edges (align_corners=False).
        gx = (xs[None, :] - b[:, 0:1]) / bw[:, None] * 2 - 1  # (n, w_r)
        gy = (ys[None, :] - b[:, 1:2]) / bh[:, None] * 2 - 1  # (n, h_r)
        grid = torch.stack([gx[:, None, :].expand(-1, gy.shape[1], -1),
                            gy[:, :, None].expand(-1, -1, gx.shape[1])], dim=3)
        pasted = F.grid_sample(masks[start:end, None], grid, mode="bilinear",
                               padding_mode="zeros", align_corners=False)[:, 0]
        keep = pasted >= threshold
        # Degenerate boxes have no interior pixels.
        keep &= ((b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1]))[:, None, None]
        out[start:end, ry0:ry1, rx0:rx1] = keep
    return out
