"""Mask codecs: COCO polygons and RLEs to dense bool masks, through pycocotools."""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

import numpy as np
import pycocotools.mask as mask_util
import torch
from torch import Tensor

__all__ = ["polygons_to_bitmask", "rle_to_bitmask", "rles_to_bitmasks"]


def polygons_to_bitmask(polygons: Sequence[Sequence[float]], height: int, width: int) -> Tensor:
    """Rasterise the union of one instance's polygons with pycocotools.

    Args:
        polygons: list of polygons, each a flat ``[x0, y0, x1, y1, ...]`` (>= 3 points).
        height, width: size of the output mask.

    Returns:
        (height, width) bool tensor.

    Raises:
        ValueError: a polygon with an odd number of coordinates or fewer than 3 points
            (pycocotools would read a 4-number polygon as a box).
    """
    if len(polygons) == 0:
        return torch.zeros((height, width), dtype=torch.bool)
    polys = [np.asarray(p, dtype=np.float64).reshape(-1).tolist() for p in polygons]
    for i, p in enumerate(polys):
        if len(p) % 2 or len(p) < 6:
            raise ValueError(f"polygons_to_bitmask: polygon {i} has {len(p)} coordinates; "
                             f"expected an even number >= 6 ([x0, y0, x1, y1, x2, y2, ...])")
    rles = mask_util.frPyObjects(polys, height, width)
    return torch.from_numpy(mask_util.decode(mask_util.merge(rles)).astype(bool))


def _coco_rle(rle: Dict[str, Any], height: Optional[int], width: Optional[int]) -> Dict[str, Any]:
    """Check ``rle`` and return it in the form ``mask_util.decode`` takes (bytes counts)."""
    if not isinstance(rle, dict) or "counts" not in rle or "size" not in rle:
        raise ValueError(f"expected an RLE dict with 'counts' and 'size', got {rle!r:.100}")
    h, w = (int(s) for s in rle["size"])
    if (height is not None and height != h) or (width is not None and width != w):
        raise ValueError(f"RLE size {[h, w]} differs from the expected {[height, width]}")
    counts = rle["counts"]
    if isinstance(counts, list):  # uncompressed RLE (used for iscrowd annotations)
        return mask_util.frPyObjects(rle, h, w)
    if isinstance(counts, str):
        return {"size": [h, w], "counts": counts.encode("ascii")}
    return rle


def rle_to_bitmask(rle: Dict[str, Any], height: Optional[int] = None,
                   width: Optional[int] = None) -> Tensor:
    """Decode one COCO RLE (compressed ``counts`` str/bytes or uncompressed list).

    Args:
        rle: ``{"size": [h, w], "counts": ...}``.
        height, width: expected size; defaults to ``rle["size"]``. A mismatch is an error.

    Returns:
        (h, w) bool tensor.
    """
    try:
        rle = _coco_rle(rle, height, width)
    except ValueError as e:
        raise ValueError(f"rle_to_bitmask: {e}") from None
    return torch.from_numpy(mask_util.decode(rle).view(bool))


def rles_to_bitmasks(rles: Sequence[Dict[str, Any]], height: int, width: int) -> Tensor:
    """Decode N COCO RLEs of one (height, width) image in one call, without per-mask copies.

    Returns:
        (N, height, width) bool tensor. Each mask is column-major in memory (pycocotools'
        layout); call ``.contiguous()`` where row-major memory matters.
    """
    if len(rles) == 0:
        return torch.zeros((0, height, width), dtype=torch.bool)
    try:
        coco = [_coco_rle(r, height, width) for r in rles]
    except ValueError as e:
        raise ValueError(f"rles_to_bitmasks: {e}") from None
    # decode gives (h, w, N) in Fortran order: a transposed view, no copy
    return torch.from_numpy(mask_util.decode(coco).transpose(2, 0, 1).view(bool))
