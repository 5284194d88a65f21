"""Where a dense window lies in the original image, and its mask pasted there (papers.md 2.4).

Coordinates are continuous original-image pixels: pixel ``(r, c)`` covers
``[c, c + 1) x [r, r + 1)`` (COCO's convention); every box is XYXY absolute, float32.

At scale ``s`` the image is resized to ``(round(H s), round(W s))`` and padded by ``window / 2``
grey pixels (papers.md 2.4). Dense position ``(i, j)`` of the stride-16 grid reads the feature
cells ``[i, i + window / 16)``, i.e. the padded-image pixels ``[16 i, 16 i + window)``, so its
window starts at ``16 i - window / 2`` in the resized image and at ``(16 i - window / 2) / s`` in
the original, with side ``window / s`` (papers.md 2.4: top-left ``((x - 1) 16 / s - 80 / s,
...)`` for the 1-based grid ``x`` of the released code, side ``160 / s``). ``s`` is taken per
axis (resized size / original size), so rounding the resized size shifts nothing.

Pasting: the window's M x M mask logits are stretched over the window and every image pixel
whose centre lies inside it takes the bilinearly interpolated logit at its centre (cell centres
at ``(k + 0.5) side / M``, values clamped at the edge cells). For a window on whole pixels
this is exactly ``F.interpolate(logits, size=side, mode="bilinear", align_corners=False)``
pasted at the top-left corner; the released code rounds the side down to ``floor(160 / s)`` and
the corner to a whole pixel, which moves a mask by less than one pixel. Pixels are on where the
logit exceeds ``log(t / (1 - t))`` (probability ``t``, 0.2 on COCO, papers.md 1.5 and 2.4), and
only pixels inside the image are pasted (clipping).
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
from torch import Tensor

__all__ = ["window_boxes", "paste_window_masks", "probability_to_logit"]


def probability_to_logit(threshold: float) -> float:
    """``log(t / (1 - t))``: a sigmoid probability threshold on the logits (papers.md 2.4)."""
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"mask threshold must be a probability in (0, 1), got {threshold}")
    return math.log(threshold / (1.0 - threshold))


def window_boxes(rows: Tensor, cols: Tensor, window: int, stride: int,
                 scale_xy: Tuple[float, float]) -> Tensor:
    """Original-image windows of dense positions at one scale (module docstring).

    Args:
        rows, cols: (N,) int grid positions (i, j) on the stride-``stride`` dense grid.
        window: window side W in resized-image pixels (160; 224 for the NIPS model).
        stride: stride of the dense grid (16).
        scale_xy: (sx, sy) resized size / original size along x and y.

    Returns:
        (N, 4) float32 XYXY windows in original-image pixels (they may leave the image).
    """
    sx, sy = (float(v) for v in scale_xy)
    x0 = (cols.double() * stride - window / 2.0) / sx
    y0 = (rows.double() * stride - window / 2.0) / sy
    return torch.stack([x0, y0, x0 + window / sx, y0 + window / sy], dim=1).float()


# Bound on the logits resampled by one batched product (windows x rows x columns): 2^22
# float32 values, 16 MB, whatever the image size.
_PIXEL_BUDGET = 1 << 22


def _axis(start: Tensor, end: Tensor, size: int, cells: int):
    """One axis of a group of windows: which pixels they cover and how to interpolate there.

    Args:
        start, end: (n,) float64 window edges [start, end) in image pixels.
        size: image size along the axis (pixels outside [0, size) are clipped).
        cells: mask cells M along the axis.

    Returns:
        first: (n,) int64 first covered pixel (its centre lies in the window, clipped);
        count: (n,) int64 covered pixels (0 when the window misses the image);
        weights: (n, L, M) float64 bilinear weights of pixels first + t, t < L = max(count),
            align_corners=False and edge-clamped; rows t >= count are 0.
    """
    # pixel c is covered when its centre c + 0.5 lies in [start, end)
    first = torch.ceil(start - 0.5).clamp(0, size).long()
    count = (torch.ceil(end - 0.5).clamp(0, size).long() - first).clamp(min=0)
    t = torch.arange(int(count.max()) if count.numel() else 0, device=start.device)
    centres = (first[:, None] + t).double() + 0.5
    u = ((centres - start[:, None]) / (end - start)[:, None] * cells - 0.5).clamp(0, cells - 1)
    i0 = u.floor().long()
    valid = t < count[:, None]
    frac = (u - i0) * valid
    weights = torch.zeros((*u.shape, cells), dtype=torch.float64, device=start.device)
    weights.scatter_add_(2, i0[..., None], ((1.0 - frac) * valid)[..., None])
    weights.scatter_add_(2, (i0 + 1).clamp(max=cells - 1)[..., None], frac[..., None])
    return first, count, weights


def _chunks(rows: Tensor, cols: Tensor) -> List[Tensor]:
    """Window indices grouped by clipped size (smallest first) so that each group's padded
    product, windows x max rows x max columns, stays within the budget (a single window
    larger than the budget forms a group of its own)."""
    rows, cols = rows.cpu(), cols.cpu()
    order = torch.argsort(rows * cols, stable=True).tolist()
    groups, start, ny, nx = [], 0, 0, 0
    for end, k in enumerate(order):
        ny, nx = max(ny, int(rows[k])), max(nx, int(cols[k]))
        if end > start and (end - start + 1) * ny * nx > _PIXEL_BUDGET:
            groups.append(torch.tensor(order[start:end]))
            start, ny, nx = end, int(rows[k]), int(cols[k])
    if order:
        groups.append(torch.tensor(order[start:]))
    return groups


def _first_last(on: Tensor) -> Tuple[Tensor, Tensor]:
    """(n,) first and last True index along dim 1 of an (n, L) bool tensor (0 if none)."""
    last = on.shape[1] - 1 - torch.argmax(on.flip(1).int(), dim=1)
    return torch.argmax(on.int(), dim=1), last


def paste_window_masks(logits: Tensor, windows: Tensor, image_size: Tuple[int, int],
                       threshold: float = 0.2, with_masks: bool = True
                       ) -> Tuple[Tensor, Optional[Tensor]]:
    """Paste window masks into the image and take the tight box of each binarised mask.

    Only each window's pixels inside the image are resampled (batched products of the
    separable bilinear weights, windows grouped by clipped size), so the cost follows the
    clipped window areas, and full-image masks are only ever stored as bool.

    Args:
        logits: (N, M, M) mask logits of the windows (56 x 56 DeepMask, 160 x 160 SharpMask).
        windows: (N, 4) XYXY float windows in image pixels (:func:`window_boxes`).
        image_size: (H, W) of the image.
        threshold: binarisation probability t (pixels with logit > log(t / (1 - t)) are on).
        with_masks: also return the (N, H, W) bool masks (False: boxes only, no H x W memory).

    Returns:
        boxes: (N, 4) float32 XYXY tight boxes of the pasted masks (pixel edges: a mask with
            columns 3..7 on gives x0 = 3, x1 = 8). A mask that is empty inside the image gets its
            window clipped to the image instead: the score still says an object is centred in
            that window, and the window is then the best box there is.
        masks: (N, H, W) bool on ``logits.device``, or None.
    """
    if logits.dim() != 3 or logits.shape[-1] != logits.shape[-2]:
        raise ValueError(f"paste_window_masks: logits must be (N, M, M), got {tuple(logits.shape)}")
    if windows.shape != (logits.shape[0], 4):
        raise ValueError(f"paste_window_masks: windows must be ({logits.shape[0]}, 4) XYXY, got "
                         f"{tuple(windows.shape)}")
    height, width = int(image_size[0]), int(image_size[1])
    cutoff = probability_to_logit(threshold)
    n, cells, device = logits.shape[0], logits.shape[-1], logits.device
    masks = (torch.zeros((n, height, width), dtype=torch.bool, device=device)
             if with_masks else None)
    win = windows.detach().to(device, torch.float64)
    size = torch.tensor([width, height, width, height], dtype=torch.float64, device=device)
    boxes = torch.minimum(win.clamp(min=0), size)  # the clipped window, for empty masks
    x0, cx, wx = _axis(win[:, 0], win[:, 2], width, cells)
    y0, cy, wy = _axis(win[:, 1], win[:, 3], height, cells)
    for group in _chunks(cy, cx):
        g = group.to(device)
        ny, nx = int(cy[g].max()), int(cx[g].max())
        if ny == 0 or nx == 0:
            continue  # these windows miss the image (never on the dense grid)
        ry, rx = wy[g, :ny].to(logits.dtype), wx[g, :nx].to(logits.dtype)
        on = (ry @ logits[g] @ rx.transpose(1, 2)) > cutoff  # (n, ny, nx)
        # rows and columns past a window's own extent (zero weights) are padding: off
        on &= (torch.arange(ny, device=device) < cy[g, None])[:, :, None]
        on &= (torch.arange(nx, device=device) < cx[g, None])[:, None, :]
        rows, cols = on.any(dim=2), on.any(dim=1)
        (r0, r1), (c0, c1) = _first_last(rows), _first_last(cols)
        tight = torch.stack([x0[g] + c0, y0[g] + r0, x0[g] + c1 + 1, y0[g] + r1 + 1], dim=1)
        filled = rows.any(dim=1)
        boxes[g[filled]] = tight[filled].double()
        if masks is not None:
            extents = torch.stack([y0[g], x0[g], cy[g], cx[g]], dim=1).tolist()
            for i, (k, (top, left, h, w)) in enumerate(zip(g.tolist(), extents)):
                masks[k, top:top + h, left:left + w] = on[i, :h, :w]
    return boxes.float(), masks
