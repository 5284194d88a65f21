"""Patch geometry of DeepMask/SharpMask training samples: windows, crops and mask labels.

Coordinates are continuous image pixels: pixel ``(i, j)`` covers ``[j, j + 1) x [i, i + 1)``
(COCO's convention). A patch is a square described by its centre ``(cx, cy)`` and its scale
``f`` = image pixels per patch pixel; every box here is XYXY absolute (float).

The input patch of side ``S = window + 2 * context`` shows the window (the region the mask
label and the score describe) plus context on every side: 160 + 2 x 16 = 192 for DeepMask-ours
and SharpMask (papers.md 2.1 item 3, ``wSz = iSz + 32``), and 224 + 0 for the NIPS model, whose
224 patch is all window: its 56x56 mask output is upsampled to cover the whole 224 patch
(papers.md 1.1), and the canonical object (128 px) sits in that same 224 square (1.2).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from segkit.structures import BitMasks, PolygonMasks, rle_to_bitmask

__all__ = ["GREY", "PatchGeometry", "crop_patch", "mask_label", "square_box"]

Box = Tuple[float, float, float, float]
# Out-of-image pixels: the released code's 0.5 grey (papers.md 2.2) in the 0-255 scale of the
# core's images; uint8 cannot hold 127.5, so 128 (half a grey level above it).
GREY = 128


def square_box(cx: float, cy: float, side: float) -> Box:
    """XYXY square of ``side`` image pixels centred on ``(cx, cy)``."""
    half = side / 2.0
    return (cx - half, cy - half, cx + half, cy + half)


@dataclass(frozen=True)
class PatchGeometry:
    """Sizes of one sample, in patch pixels.

    Args:
        window: side of the window W that the mask label and the score describe (160, or 224
            for the NIPS model).
        context: context added on every side of the window (32 px in total for DeepMask-ours:
            ``context=16``; 0 for the NIPS model).
        label_size: side g of the mask label (112 DeepMask-ours, 160 SharpMask, papers.md 2.1
            and 3.2; 224 for the NIPS model's upsampled output).
        canonical_size: max bbox side of a canonical object in the patch; default
            ``ceil(window * 128 / 224)`` (128 in a 224 window, 92 in a 160 one, papers.md 2.2).
    """

    window: int = 160
    context: int = 16
    label_size: int = 112
    canonical_size: int = 0  # 0: derived from the window

    def __post_init__(self):
        for key in ("window", "label_size"):
            if int(getattr(self, key)) <= 0:
                raise ValueError(f"patch geometry '{key}' must be a positive int, "
                                 f"got {getattr(self, key)!r}")
        if self.context < 0 or self.canonical_size < 0:
            raise ValueError(f"patch geometry 'context' and 'canonical_size' must be >= 0, got "
                             f"{self.context!r} and {self.canonical_size!r}")
        if not self.canonical_size:
            object.__setattr__(self, "canonical_size", math.ceil(self.window * 128 / 224))

    @property
    def input_size(self) -> int:
        """Side S of the input patch: window + 2 * context."""
        return self.window + 2 * self.context

    def crop_box(self, cx: float, cy: float, f: float) -> Box:
        """XYXY image region of the whole input patch (window + context) at scale ``f``."""
        return square_box(cx, cy, self.input_size * f)

    def window_box(self, cx: float, cy: float, f: float) -> Box:
        """XYXY image region of the window (what the label describes) at scale ``f``."""
        return square_box(cx, cy, self.window * f)


def crop_patch(image: np.ndarray, box: Sequence[float], size: int, fill: int = GREY,
               flip: bool = False) -> Tensor:
    """Crop a square region of an image, resample it to ``size`` x ``size``, pad with ``fill``.

    Only the part of ``box`` inside the image is resampled (PIL bilinear, antialiased when
    shrinking); the rest is ``fill``, the 0.5 grey of papers.md 2.2 for out-of-image pixels.
    The patch stays uint8 RGB 0-255 like the core mapper's images, so patches and full images
    go through one normalisation in the model (``pixel_mean``/``pixel_std`` in 0-255 units).
    Where the image edge falls inside an output pixel it is rounded to the nearest output
    pixel edge, so the image part may shift by up to half an output pixel at the border.

    Args:
        image: (H, W, 3) uint8 RGB.
        box: XYXY square region in image pixels (may extend beyond the image).
        size: output side S.
        fill: value of out-of-image pixels, 0-255 (default 128: the released 0.5 grey, as
            close as uint8 gets to 127.5).
        flip: mirror the patch horizontally.

    Returns:
        (3, S, S) uint8 RGB 0-255.
    """
    # numpy throughout: small torch ops pay for intra-op threads on a busy loader process
    h, w = image.shape[:2]
    x0, y0, x1, y1 = (float(v) for v in box)
    k = size / (x1 - x0)  # output pixels per image pixel
    out = np.full((3, size, size), fill, dtype=np.uint8)
    # output pixel range covered by the image, then the exact image range of those pixels
    dx0, dx1 = (int(np.clip(round((v - x0) * k), 0, size)) for v in (0.0, float(w)))
    dy0, dy1 = (int(np.clip(round((v - y0) * k), 0, size)) for v in (0.0, float(h)))
    if dx1 > dx0 and dy1 > dy0:
        src = (max(x0 + dx0 / k, 0.0), max(y0 + dy0 / k, 0.0),
               min(x0 + dx1 / k, float(w)), min(y0 + dy1 / k, float(h)))
        part = Image.fromarray(image).resize((dx1 - dx0, dy1 - dy0), Image.BILINEAR, box=src)
        out[:, dy0:dy1, dx0:dx1] = np.asarray(part, dtype=np.uint8).transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(out[:, :, ::-1]) if flip else out)


def mask_label(segmentation: Any, height: int, width: int, window: Sequence[float],
               size: int) -> Tensor:
    """The instance's mask inside ``window`` as a ``size`` x ``size`` {-1, +1} label.

    Polygons are rasterised directly at the label resolution (pycocotools, exact); an RLE is
    decoded at image size and resampled (RoIAlign average). Both are thresholded at 0.5
    (papers.md 2.2). Label cells whose centre lies outside the image are -1: the object is
    cut at the image border, like the grey padding of the input.

    Args:
        segmentation: the record's ``segmentation``: list of polygons or an RLE dict.
        height, width: image size.
        window: XYXY window in image pixels.
        size: label side g.

    Returns:
        (g, g) float32 with values -1 (background) and +1 (object).
    """
    box = torch.tensor([list(window)], dtype=torch.float64)
    if isinstance(segmentation, dict):
        full = rle_to_bitmask(segmentation, height, width)
        inside = BitMasks(full[None]).crop_and_resize(box.float(), size)[0]
    else:
        inside = PolygonMasks([segmentation]).crop_and_resize(box, size)[0]
    x0, y0, x1, y1 = (float(v) for v in window)
    centres = (torch.arange(size, dtype=torch.float64) + 0.5) / size
    in_x = ((x0 + centres * (x1 - x0)) >= 0) & ((x0 + centres * (x1 - x0)) < width)
    in_y = ((y0 + centres * (y1 - y0)) >= 0) & ((y0 + centres * (y1 - y0)) < height)
    inside = inside * (in_y[:, None] & in_x[None, :]).float()
    return inside * 2.0 - 1.0
