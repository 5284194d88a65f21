"""``Boxes``: a list of axis-aligned boxes as one (N, 4) tensor, and pairwise overlaps.

Format everywhere: XYXY absolute pixel coordinates ``(x1, y1, x2, y2)``, float32. A box covers
the continuous region ``[x1, x2] x [y1, y2]``; its width is ``x2 - x1`` (no "+1").
"""
from __future__ import annotations

from typing import Any, Iterator, List, Sequence, Tuple, Union

import torch
from torch import Tensor

__all__ = [
    "Boxes", "pairwise_intersection", "pairwise_iou", "pairwise_ioa",
    "xywh_to_xyxy", "xyxy_to_xywh",
]


def xywh_to_xyxy(boxes: Tensor) -> Tensor:
    """Convert COCO ``[x, y, w, h]`` boxes (..., 4) to ``[x1, y1, x2, y2]`` (new tensor)."""
    boxes = torch.as_tensor(boxes)
    return torch.cat([boxes[..., :2], boxes[..., :2] + boxes[..., 2:]], dim=-1)


def xyxy_to_xywh(boxes: Tensor) -> Tensor:
    """Convert ``[x1, y1, x2, y2]`` boxes (..., 4) to COCO ``[x, y, w, h]`` (new tensor)."""
    boxes = torch.as_tensor(boxes)
    return torch.cat([boxes[..., :2], boxes[..., 2:] - boxes[..., :2]], dim=-1)


class Boxes:
    """N boxes stored as ``tensor`` (N, 4), XYXY absolute pixels, float.

    Args:
        tensor: (N, 4) boxes (Tensor, ndarray or nested list). Integer input becomes float32;
            an empty input becomes shape (0, 4).
    """

    def __init__(self, tensor: Union[Tensor, Sequence[Sequence[float]], Any]):
        device = tensor.device if isinstance(tensor, Tensor) else torch.device("cpu")
        tensor = torch.as_tensor(tensor, device=device)
        if not tensor.is_floating_point():
            tensor = tensor.to(torch.float32)
        if tensor.numel() == 0:
            tensor = tensor.reshape(0, 4)
        if tensor.dim() != 2 or tensor.shape[-1] != 4:
            raise ValueError(f"Boxes: expected a (N, 4) XYXY tensor, got shape {tuple(tensor.shape)}")
        self.tensor = tensor

    # --- container protocol -------------------------------------------------------------
    def __len__(self) -> int:
        return self.tensor.shape[0]

    def __getitem__(self, item: Union[int, slice, Tensor, List[int]]) -> "Boxes":
        """Index with an int (-> 1 box), slice, bool mask (N,) or int64 index tensor/list."""
        if isinstance(item, int):
            return Boxes(self.tensor[item].view(1, -1))
        return Boxes(self.tensor[item].view(-1, 4))

    def __iter__(self) -> Iterator[Tensor]:
        """Iterate over the (4,) rows."""
        yield from self.tensor

    def __repr__(self) -> str:
        return f"Boxes({self.tensor})"

    def clone(self) -> "Boxes":
        return Boxes(self.tensor.clone())

    def to(self, *args: Any, **kwargs: Any) -> "Boxes":
        """Same as ``Tensor.to`` (device and/or dtype); returns a new ``Boxes``."""
        return Boxes(self.tensor.to(*args, **kwargs))

    @property
    def device(self) -> torch.device:
        return self.tensor.device

    @classmethod
    def cat(cls, boxes_list: List["Boxes"]) -> "Boxes":
        """Concatenate a list of ``Boxes`` into one. An empty list gives 0 boxes."""
        if not isinstance(boxes_list, (list, tuple)):
            raise TypeError(f"Boxes.cat: expected a list of Boxes, got {type(boxes_list).__name__}")
        if len(boxes_list) == 0:
            return cls(torch.empty(0, 4))
        for b in boxes_list:
            if not isinstance(b, Boxes):
                raise TypeError(f"Boxes.cat: every element must be Boxes, got {type(b).__name__}")
        return cls(torch.cat([b.tensor for b in boxes_list], dim=0))

    # --- geometry ------------------------------------------------------------------------
    def area(self) -> Tensor:
        """(N,) area ``(x2 - x1) * (y2 - y1)``; negative for inverted boxes."""
        b = self.tensor
        return (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])

    def widths(self) -> Tensor:
        """(N,) ``x2 - x1``."""
        return self.tensor[:, 2] - self.tensor[:, 0]

    def heights(self) -> Tensor:
        """(N,) ``y2 - y1``."""
        return self.tensor[:, 3] - self.tensor[:, 1]

    def centers(self) -> Tensor:
        """(N, 2) box centres ``(cx, cy)``."""
        return (self.tensor[:, :2] + self.tensor[:, 2:]) / 2

    def clip(self, image_size: Tuple[int, int]) -> "Boxes":
        """Clip in place to the image: x to [0, w], y to [0, h]. Returns self.

        Args:
            image_size: (h, w).
        Raises:
            ValueError: if a coordinate is inf/nan (usually a diverged regression).
        """
        if not torch.isfinite(self.tensor).all():
            raise ValueError("Boxes.clip: box tensor contains inf or nan values")
        h, w = image_size
        self.tensor[:, 0::2] = self.tensor[:, 0::2].clamp(min=0, max=w)
        self.tensor[:, 1::2] = self.tensor[:, 1::2].clamp(min=0, max=h)
        return self

    def nonempty(self, threshold: float = 0.0) -> Tensor:
        """(N,) bool: width > threshold and height > threshold."""
        return (self.widths() > threshold) & (self.heights() > threshold)

    def scale(self, scale_x: float, scale_y: float) -> "Boxes":
        """Scale x coordinates by ``scale_x`` and y by ``scale_y`` in place. Returns self."""
        self.tensor[:, 0::2] *= scale_x
        self.tensor[:, 1::2] *= scale_y
        return self

    def inside_box(self, image_size: Tuple[int, int], boundary_threshold: int = 0) -> Tensor:
        """(N,) bool: box lies inside the (h, w) image extended by ``boundary_threshold``."""
        h, w = image_size
        t = boundary_threshold
        b = self.tensor
        return (b[:, 0] >= -t) & (b[:, 1] >= -t) & (b[:, 2] < w + t) & (b[:, 3] < h + t)


def _as_tensor(boxes: Union[Boxes, Tensor]) -> Tensor:
    return boxes.tensor if isinstance(boxes, Boxes) else boxes


def pairwise_intersection(boxes1: Union[Boxes, Tensor], boxes2: Union[Boxes, Tensor]) -> Tensor:
    """(N, M) intersection areas between N boxes and M boxes (XYXY)."""
    a, b = _as_tensor(boxes1), _as_tensor(boxes2)
    lt = torch.max(a[:, None, :2], b[None, :, :2])
    rb = torch.min(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    return wh[..., 0] * wh[..., 1]


def pairwise_iou(boxes1: Union[Boxes, Tensor], boxes2: Union[Boxes, Tensor]) -> Tensor:
    """(N, M) intersection-over-union between N boxes and M boxes (XYXY).

    Pairs whose union is empty (two zero-area boxes) get IoU 0, never NaN.
    """
    inter = pairwise_intersection(boxes1, boxes2)
    area1 = Boxes(_as_tensor(boxes1)).area().clamp(min=0)
    area2 = Boxes(_as_tensor(boxes2)).area().clamp(min=0)
    union = area1[:, None] + area2[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=torch.finfo(inter.dtype).tiny),
                       torch.zeros_like(inter))


def pairwise_ioa(boxes1: Union[Boxes, Tensor], boxes2: Union[Boxes, Tensor]) -> Tensor:
    """(N, M) intersection over the area of ``boxes2`` ("intersection over area").

    Used e.g. to find boxes covered by crowd regions (``boxes2`` = crowd boxes). Zero-area
    ``boxes2`` give 0.
    """
    inter = pairwise_intersection(boxes1, boxes2)
    area2 = Boxes(_as_tensor(boxes2)).area().clamp(min=0)
    return torch.where(area2[None, :] > 0, inter / area2.clamp(min=torch.finfo(inter.dtype).tiny)[None, :],
                       torch.zeros_like(inter))
