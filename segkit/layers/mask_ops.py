"""Mask R-CNN's two mask resamplings (section 3): full-image masks cropped to boxes at M x M
(the training targets) and M x M predictions pasted back into full images."""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import ops
from .ops import roi_align

__all__ = ["crop_masks", "paste_masks_in_image"]

# Upper bound on sampled pixels (masks x region height x region width) per grid_sample call.
# The sampling grid costs 8 bytes per pixel, so 2**23 pixels keep one chunk near 100 MB.
_PIXEL_BUDGET = 1 << 23
# crop_masks groups boxes while (group size x union region) stays within this multiple of the
# boxes' own regions (and within the pixel budget).
_CROP_MAX_WASTE = 2.0


def _pixel_extents(boxes: Tensor, height: int, width: int,
                   mask_size: Tuple[int, int] = (1 << 30, 1 << 30)) -> Tensor:
    """Integer pixel ranges [x0, x1) x [y0, y1) where a pasted mask can be non-zero, clipped
    to the image.

    Bilinear sampling with zero padding reaches half a mask cell past the box edge (the value
    there falls from half the edge cell's value to 0), so for thresholds below 0.5 pixels just
    outside the box can be on; half a cell plus one pixel of slack on each side covers them.

    Args:
        boxes: (N, 4) XYXY float boxes.
        mask_size: (Mh, Mw) of the masks (the default, huge, gives no half-cell margin).
    Returns:
        (N, 4) int64 ``[x0, y0, x1, y1]``.
    """
    b = boxes.detach().cpu().double()
    half_w = ((b[:, 2] - b[:, 0]) / (2 * mask_size[1])).clamp(min=0)
    half_h = ((b[:, 3] - b[:, 1]) / (2 * mask_size[0])).clamp(min=0)
    x0 = ((b[:, 0] - half_w).floor() - 1).clamp(0, width)
    y0 = ((b[:, 1] - half_h).floor() - 1).clamp(0, height)
    x1 = ((b[:, 2] + half_w).ceil() + 1).clamp(0, width)
    y1 = ((b[:, 3] + half_h).ceil() + 1).clamp(0, height)
    return torch.stack([x0, y0, x1, y1], dim=1).long()


def _chunks(extents: Tensor, budget: Optional[int] = None,
            max_waste: float = float("inf")) -> List[Tuple[int, int, List[int]]]:
    """Group consecutive items so that each group's union region times its size fits ``budget``.

    Args:
        extents: (N, 4) int64 ``[x0, y0, x1, y1]`` pixel ranges, one per item.
        budget: bound on ``group size x union area`` (pixels processed by one call);
            default ``_PIXEL_BUDGET``.
        max_waste: also start a new group when ``group size x union area`` would exceed this
            multiple of the sum of the items' own areas (keeps far-apart items apart).

    Returns:
        A list of ``(start, end, [x0, y0, x1, y1] union region)`` tuples.
    """
    budget = _PIXEL_BUDGET if budget is None else budget
    groups = []
    start, region, own = 0, None, 0
    for i, e in enumerate(extents.tolist()):
        area = (e[2] - e[0]) * (e[3] - e[1])
        merged = e if region is None else [min(region[0], e[0]), min(region[1], e[1]),
                                           max(region[2], e[2]), max(region[3], e[3])]
        pixels = (i - start + 1) * (merged[2] - merged[0]) * (merged[3] - merged[1])
        if region is not None and (pixels > budget or pixels > max_waste * (own + area)):
            groups.append((start, i, region))
            start, merged, own = i, e, 0
        region = merged
        own += area
    if region is not None:
        groups.append((start, len(extents), region))
    return groups


def paste_masks_in_image(masks: Tensor, boxes: Tensor, image_size: Tuple[int, int],
                         threshold: float = 0.5) -> Tensor:
    """Paste per-box mask probabilities into full-image binary masks.

    Each mask is treated as a continuous image stretched over its box: the full-image pixel
    with centre ``(x + 0.5, y + 0.5)`` takes the bilinearly interpolated mask value at that
    point (``grid_sample``, ``align_corners=False``, zero outside the mask), then is kept where
    the value is ``>= threshold``. Only each box's pixel extent is sampled: the compiled kernel
    (``segkit._C``) visits each box's pixels once, one mask per core, so the cost follows the
    box areas; the ``grid_sample`` fallback works in chunks of bounded size.

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
    if masks.shape[0] == 0 or height == 0 or width == 0:
        return torch.zeros((masks.shape[0], height, width), dtype=torch.bool, device=masks.device)
    boxes = boxes.to(device=masks.device, dtype=torch.float32)
    return ops._impl("paste_masks", masks.device)(masks.float(), boxes, (height, width),
                                                  float(threshold))


def _paste_grid_sample(masks: Tensor, boxes: Tensor, image_size: Tuple[int, int],
                       threshold: float) -> Tensor:
    """:func:`paste_masks_in_image` with ``grid_sample`` over chunks of boxes (the fallback of
    the compiled kernel, and the CUDA path of a CPU-only build)."""
    height, width = image_size
    n = masks.shape[0]
    out = torch.zeros((n, height, width), dtype=torch.bool, device=masks.device)
    masks = masks.float()
    boxes = boxes.to(device=masks.device, dtype=torch.float32)
    extents = _pixel_extents(boxes, height, width, tuple(masks.shape[1:]))
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


def _roi_read_extents(boxes: Tensor, height: int, width: int) -> Tensor:
    """(N, 4) int64 ``[x0, y0, x1, y1]``: the pixels aligned RoIAlign reads for each box.

    Its samples lie in ``[x1 - 0.5, x2 - 0.5]`` and interpolate columns ``floor(x)`` and
    ``floor(x) + 1``. One more pixel each side keeps every sample off a cut inside the image;
    a cut clipped to the image border is the border, where RoIAlign clamps as before.
    """
    b = torch.nan_to_num(boxes.detach().cpu().double()).view(-1, 2, 2)  # (N, corner, xy)
    lo = (b.amin(dim=1) - 0.5).floor() - 1  # min/max: an inverted box samples backwards
    hi = (b.amax(dim=1) - 0.5).floor() + 3
    size = torch.tensor([width, height, width, height], dtype=torch.float64)
    return torch.minimum(torch.cat([lo, hi], dim=1).clamp(min=0), size).long()


def crop_masks(masks: Tensor, boxes: Tensor, mask_size: int,
               mask_indices: Optional[Tensor] = None) -> Tensor:
    """Crop a mask to each box and resample it to M x M with aligned RoIAlign.

    The result equals ``roi_align`` over the full float masks (up to float rounding), but
    boxes are sorted left to right and grouped so that each group converts only one small
    region of its masks to float: the cost follows the box sizes, not N x H x W.

    Args:
        masks: (K, H, W) bool (or 0/1) masks.
        boxes: (N, 4) XYXY absolute float32 boxes on ``masks.device``.
        mask_size: output side M.
        mask_indices: (N,) int64, box i is cropped from ``masks[mask_indices[i]]``; by
            default box i from mask i (N = K). A mask head passes the GT index matched to
            each RoI instead of first copying one full-size mask per RoI.

    Returns:
        (N, M, M) float32 in [0, 1]: the fraction of each bin covered by the mask.
    """
    if mask_indices is not None:
        mask_indices = mask_indices.to(device=masks.device, dtype=torch.int64)
    n, (_, h, w) = len(boxes), masks.shape
    out = torch.zeros((n, mask_size, mask_size), dtype=torch.float32, device=masks.device)
    if n == 0:
        return out
    order = torch.argsort(boxes[:, 0].detach().cpu(), stable=True)
    extents = _roi_read_extents(boxes, h, w)[order]
    order = order.to(masks.device)
    for start, end, (x0, y0, x1, y1) in _chunks(extents, max_waste=_CROP_MAX_WASTE):
        if x1 <= x0 or y1 <= y0:
            continue  # every box of the group lies outside the image: all samples are 0
        idx = order[start:end]
        src = idx if mask_indices is None else mask_indices[idx]
        crop = masks[src, None, y0:y1, x0:x1].float()
        batch_idx = torch.arange(end - start, device=masks.device, dtype=torch.float32)
        shift = torch.tensor([x0, y0, x0, y0], dtype=torch.float32, device=masks.device)
        rois = torch.cat([batch_idx[:, None], boxes[idx] - shift], dim=1)
        out[idx] = roi_align(crop, rois, (mask_size, mask_size), 1.0, 0, True)[:, 0]
    return out.clamp_(0, 1)


ops._add_op("paste_masks", _paste_grid_sample, "torch.grid_sample")
