"""Mask codecs: COCO polygons and RLEs to dense bool masks, through pycocotools."""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

import numpy as np
import pycocotools.mask as mask_util
import torch
from torch import Tensor

__all__ = ["polygons_to_bitmask", "rle_to_bitmask"]


def polygons_to_bitmask(polygons: Sequence[Sequence[float]], height: int, width: int) -> Tensor:
    """Rasterise the union of one instance's polygons with pycocotools.

    Args:
        polygons: list of polygons, each a flat ``[x0, y0, x1, y1, ...]`` (>= 3 points).
        height, width: size of the output mask.

    Returns:
        (height, width) bool tensor.
    """
    if len(polygons) == 0:
        return torch.zeros((height, width), dtype=torch.bool)
    rles = mask_util.frPyObjects([np.asarray(p, dtype=np.float64).tolist() for p in polygons],
                                 height, width)
    return torch.from_numpy(mask_util.decode(mask_util.merge(rles)).astype(bool))


def rle_to_bitmask(rle: Dict[str, Any], height: Optional[int] = None, width: Optional[int] = None) -> Tensor:
    """Decode one COCO RLE (compressed ``counts`` str/bytes or uncompressed list).

    Args:
        rle: ``{"size": [h, w], "counts": ...}``.
        height, width: expected size; defaults to ``rle["size"]``. A mismatch is an error.

    Returns:
        (h, w) bool tensor.
    """
    if not isinstance(rle, dict) or "counts" not in rle or "size" not in rle:
        raise ValueError(f"rle_to_bitmask: expected a dict with 'counts' and 'size', got {rle!r:.100}")
    h, w = (int(s) for s in rle["size"])
    if (height is not None and height != h) or (width is not None and width != w):
        raise ValueError(f"rle_to_bitmask: RLE size {[h, w]} differs from the expected {[height, width]}")
    counts = rle["counts"]
    if isinstance(counts, list):  # uncompressed RLE (used for iscrowd annotations)
        rle = mask_util.frPyObjects(rle, h, w)
    elif isinstance(counts, str):
        rle = {"size": [h, w], "counts": counts.encode("ascii")}
    return torch.from_numpy(mask_util.decode(rle).astype(bool))
