"""Instance masks: dense ``BitMasks`` and COCO-style ``PolygonMasks``.

Both hold one mask per instance, support ``len``/indexing/``cat``, and turn into the
(N, M, M) training targets of the mask head with ``crop_and_resize(boxes, M)`` (Mask R-CNN
section 3: the target is the ground-truth mask cropped to the proposal box and resized to
M x M). Boxes are XYXY absolute pixels; a pixel (i, j) covers ``[j, j+1] x [i, i+1]``.
"""
from __future__ import annotations

from typing import Any, Dict, Iterator, List, Optional, Union

import numpy as np
import torch
from torch import Tensor

from ..layers.mask_ops import crop_masks
from .boxes import Boxes
from .rasterize import polygons_to_bitmask, rles_to_bitmasks

__all__ = ["BitMasks", "PolygonMasks"]


class BitMasks:
    """N dense binary masks of one image, ``tensor`` (N, H, W) bool.

    Args:
        tensor: (N, H, W) masks (Tensor or ndarray); non-bool input is converted with ``!= 0``.
    """

    def __init__(self, tensor: Union[Tensor, np.ndarray]):
        device = tensor.device if isinstance(tensor, Tensor) else torch.device("cpu")
        tensor = torch.as_tensor(tensor, device=device)
        if tensor.dim() != 3:
            raise ValueError(f"BitMasks: expected a (N, H, W) tensor, got shape {tuple(tensor.shape)}")
        self.tensor = tensor if tensor.dtype == torch.bool else tensor != 0
        self.image_size = tuple(self.tensor.shape[1:])

    def __len__(self) -> int:
        return self.tensor.shape[0]

    def __getitem__(self, item: Union[int, slice, Tensor, List[int]]) -> "BitMasks":
        """Index with int (-> 1 mask), slice, bool mask (N,) or int64 indices."""
        if isinstance(item, int):
            return BitMasks(self.tensor[item].unsqueeze(0))
        out = self.tensor[item]
        if out.dim() != 3:
            raise IndexError(f"BitMasks: indexing with {item!r} gave shape {tuple(out.shape)}, not (K, H, W)")
        return BitMasks(out)

    def __iter__(self) -> Iterator[Tensor]:
        yield from self.tensor

    def __repr__(self) -> str:
        return f"BitMasks(num_instances={len(self)}, image_size={self.image_size})"

    def to(self, *args: Any, **kwargs: Any) -> "BitMasks":
        return BitMasks(self.tensor.to(*args, **kwargs))

    @property
    def device(self) -> torch.device:
        return self.tensor.device

    @classmethod
    def cat(cls, masks_list: List["BitMasks"]) -> "BitMasks":
        """Concatenate BitMasks of the same image size."""
        if not masks_list:
            raise ValueError("BitMasks.cat: got an empty list; the image size is unknown")
        _check_cat(cls, masks_list)
        sizes = {m.image_size for m in masks_list}
        if len(sizes) > 1:
            raise ValueError(f"BitMasks.cat: masks of different image sizes {sorted(sizes)}")
        return cls(torch.cat([m.tensor for m in masks_list], dim=0))

    @classmethod
    def from_polygon_masks(cls, polygon_masks: Union["PolygonMasks", List[List[np.ndarray]]],
                           height: int, width: int) -> "BitMasks":
        """Rasterise polygons (``PolygonMasks`` or its list form) into (N, height, width) masks."""
        if isinstance(polygon_masks, PolygonMasks):
            polygon_masks = polygon_masks.polygons
        masks = [polygons_to_bitmask(p, height, width) for p in polygon_masks]
        if not masks:
            return cls(torch.zeros((0, height, width), dtype=torch.bool))
        return cls(torch.stack(masks))

    @classmethod
    def from_rles(cls, rles: List[Dict[str, Any]], height: int, width: int) -> "BitMasks":
        """Decode a list of COCO RLE dicts into (N, height, width) masks."""
        return cls(rles_to_bitmasks(rles, height, width).contiguous())

    def area(self) -> Tensor:
        """(N,) int64 number of foreground pixels."""
        return self.tensor.flatten(1).sum(dim=1)

    def nonempty(self) -> Tensor:
        """(N,) bool: the mask has at least one pixel."""
        return self.tensor.flatten(1).any(dim=1)

    def get_bounding_boxes(self) -> Boxes:
        """Tight XYXY boxes around each mask's pixels (x2/y2 exclusive: one past the last pixel).

        Empty masks give ``[0, 0, 0, 0]``.
        """
        n, h, w = self.tensor.shape
        boxes = torch.zeros((n, 4), dtype=torch.float32, device=self.device)
        if n == 0:
            return Boxes(boxes)
        cols = self.tensor.any(dim=1)  # (N, W)
        rows = self.tensor.any(dim=2)  # (N, H)
        # argmax of a bool row returns the first True; on the flipped row, the last.
        boxes[:, 0] = cols.to(torch.uint8).argmax(dim=1).float()
        boxes[:, 2] = (w - cols.flip(1).to(torch.uint8).argmax(dim=1)).float()
        boxes[:, 1] = rows.to(torch.uint8).argmax(dim=1).float()
        boxes[:, 3] = (h - rows.flip(1).to(torch.uint8).argmax(dim=1)).float()
        boxes[~self.nonempty()] = 0
        return Boxes(boxes)

    def crop_and_resize(self, boxes: Union[Tensor, Boxes], mask_size: int,
                        mask_indices: Optional[Tensor] = None) -> Tensor:
        """Mask-head targets: mask i inside box i, resampled to M x M and binarised.

        Aligned RoIAlign (pixel ``(i, j)`` is the sample at its centre ``(j + 0.5, i + 0.5)``)
        averages the 0/1 mask over each of the M x M bins, and the result is thresholded at 0.5.
        The targets are thus 0/1 like :meth:`PolygonMasks.crop_and_resize`, so a batch whose
        images carry different mask types trains on targets of one kind (Mask R-CNN section 3
        rasterises the target; Detectron2 thresholds the same way).

        Only the region around each group of nearby boxes is converted to float, so the cost
        follows the box sizes rather than N x H x W (mask heads pass one mask per positive RoI).

        Args:
            boxes: (N, 4) XYXY absolute boxes (Tensor or ``Boxes``), one per mask.
            mask_size: output side M.
            mask_indices: (N,) int64: box i takes mask ``mask_indices[i]`` (e.g. the GT
                matched to each RoI) without copying full-size masks; default box i, mask i.

        Returns:
            (N, M, M) float32 of 0/1 values, on ``self.device``.
        """
        boxes = _crop_boxes(self, boxes, mask_indices).to(device=self.device, dtype=torch.float32)
        return (crop_masks(self.tensor, boxes, mask_size, mask_indices) >= 0.5).float()


def _crop_boxes(masks: Any, boxes: Union[Tensor, Boxes],
                mask_indices: Optional[Tensor]) -> Tensor:
    """The (N, 4) box tensor of ``crop_and_resize``, checked against the masks / indices."""
    boxes = boxes.tensor if isinstance(boxes, Boxes) else boxes
    name = f"{type(masks).__name__}.crop_and_resize"
    if mask_indices is None:
        n, what = len(masks), "one per mask"
    else:
        n, what = len(mask_indices), "one per mask index"
        in_range = n == 0 or (int(mask_indices.min()) >= 0 and int(mask_indices.max()) < len(masks))
        if mask_indices.dim() != 1 or not in_range:
            raise ValueError(f"{name}: mask_indices must be a (N,) tensor of indices into the "
                             f"{len(masks)} masks, got {mask_indices!r:.100}")
    if boxes.shape != (n, 4):
        raise ValueError(f"{name}: boxes must have shape ({n}, 4) XYXY, {what}, "
                         f"got {tuple(boxes.shape)}")
    return boxes


def _check_cat(cls: type, masks_list: List[Any]) -> None:
    """Reject elements of another type: the two mask types do not concatenate."""
    for m in masks_list:
        if not isinstance(m, cls):
            raise TypeError(f"{cls.__name__}.cat: every element must be {cls.__name__}, got "
                            f"{type(m).__name__} (convert PolygonMasks with "
                            f"BitMasks.from_polygon_masks to mix them)")


def _check_polygons(polygons: Any) -> List[List[np.ndarray]]:
    """Validate and convert to list (instances) of list (polygons) of (2k,) float64 arrays."""
    if isinstance(polygons, PolygonMasks):
        return polygons.polygons
    if not isinstance(polygons, (list, tuple)):
        raise TypeError(f"PolygonMasks: expected a list (one entry per instance) of lists of "
                        f"polygons, got {type(polygons).__name__}")
    out = []
    for i, instance in enumerate(polygons):
        if not isinstance(instance, (list, tuple)):
            raise TypeError(f"PolygonMasks: instance {i} must be a list of polygons, "
                            f"got {type(instance).__name__}")
        polys = []
        for j, p in enumerate(instance):
            if isinstance(p, Tensor):
                p = p.detach().cpu().numpy()
            p = np.asarray(p, dtype=np.float64).reshape(-1)
            if len(p) % 2 != 0 or len(p) < 6:
                raise ValueError(f"PolygonMasks: instance {i} polygon {j} has {len(p)} coordinates; "
                                 f"expected an even number >= 6 (at least 3 points [x, y, ...])")
            polys.append(p)
        out.append(polys)
    return out


class PolygonMasks:
    """N instance masks as polygons, COCO style: each instance is a list of polygons (its
    union), each polygon a flat (2k,) float64 array ``[x0, y0, x1, y1, ...]`` in pixels.

    Polygons stay on the CPU; ``to()`` is a no-op kept for interface parity with ``BitMasks``.

    Args:
        polygons: list (N) of lists of polygons (arrays, tensors or float lists).
    """

    def __init__(self, polygons: List[List[Union[np.ndarray, List[float]]]]):
        self.polygons: List[List[np.ndarray]] = _check_polygons(polygons)

    def __len__(self) -> int:
        return len(self.polygons)

    def __getitem__(self, item: Union[int, slice, Tensor, List[int]]) -> "PolygonMasks":
        """Index with int (-> 1 instance), slice, bool mask (N,) or int64 indices."""
        if isinstance(item, int):
            return PolygonMasks([self.polygons[item]])
        if isinstance(item, slice):
            return PolygonMasks(self.polygons[item])
        idx = torch.as_tensor(item)
        if idx.dtype == torch.bool:
            if idx.shape != (len(self),):
                raise IndexError(f"PolygonMasks: bool index of shape {tuple(idx.shape)} for {len(self)} masks")
            idx = idx.nonzero().view(-1)
        return PolygonMasks([self.polygons[i] for i in idx.view(-1).tolist()])

    def __iter__(self) -> Iterator[List[np.ndarray]]:
        yield from self.polygons

    def __repr__(self) -> str:
        return f"PolygonMasks(num_instances={len(self)})"

    def to(self, *args: Any, **kwargs: Any) -> "PolygonMasks":
        return self

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @classmethod
    def cat(cls, masks_list: List["PolygonMasks"]) -> "PolygonMasks":
        """Concatenate PolygonMasks; an empty list gives 0 instances."""
        _check_cat(cls, masks_list)
        return cls([p for m in masks_list for p in m.polygons])

    def area(self) -> Tensor:
        """(N,) float32 polygon area (shoelace), summed over an instance's polygons.

        Overlapping polygons of one instance are counted twice (COCO polygons rarely overlap);
        this is the geometric area, within about half the perimeter of pycocotools' pixel count.
        """
        areas = []
        for polys in self.polygons:
            total = 0.0
            for p in polys:
                x, y = p[0::2], p[1::2]
                total += 0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1)))
            areas.append(total)
        return torch.tensor(areas, dtype=torch.float32)

    def nonempty(self) -> Tensor:
        """(N,) bool: the instance has at least one polygon."""
        return torch.tensor([len(p) > 0 for p in self.polygons], dtype=torch.bool)

    def get_bounding_boxes(self) -> Boxes:
        """(N, 4) XYXY boxes spanning each instance's vertices; no polygon -> zeros."""
        boxes = torch.zeros((len(self), 4), dtype=torch.float32)
        for i, polys in enumerate(self.polygons):
            if polys:
                xy = np.concatenate(polys).reshape(-1, 2)
                boxes[i] = torch.from_numpy(np.concatenate([xy.min(0), xy.max(0)]).astype(np.float32))
        return Boxes(boxes)

    def crop_and_resize(self, boxes: Union[Tensor, Boxes], mask_size: int,
                        mask_indices: Optional[Tensor] = None) -> Tensor:
        """Rasterise instance i inside box i at ``mask_size`` x ``mask_size``.

        The polygons are translated to the box origin and scaled so the box spans the M x M
        grid, then rasterised with pycocotools (parts outside the box fall off the grid).

        Args:
            boxes: (N, 4) XYXY boxes (Tensor or ``Boxes``), one per instance.
            mask_size: output side M.
            mask_indices: (N,) int64: box i takes instance ``mask_indices[i]``; default i.

        Returns:
            (N, M, M) float32 of 0/1 values, on ``boxes.device``.
        """
        boxes = _crop_boxes(self, boxes, mask_indices)
        polygons = self.polygons if mask_indices is None else [
            self.polygons[i] for i in mask_indices.tolist()]
        out = torch.zeros((len(polygons), mask_size, mask_size), dtype=torch.float32)
        for i, (polys, box) in enumerate(zip(polygons, boxes.detach().cpu().double().numpy())):
            x1, y1, x2, y2 = box
            sx = mask_size / max(x2 - x1, 1e-6)
            sy = mask_size / max(y2 - y1, 1e-6)
            moved = []
            for p in polys:
                q = p.copy()
                q[0::2] = (q[0::2] - x1) * sx
                q[1::2] = (q[1::2] - y1) * sy
                moved.append(q)
            out[i] = polygons_to_bitmask(moved, mask_size, mask_size).float()
        return out.to(boxes.device)
