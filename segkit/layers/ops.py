"""Detection ops (RoIAlign, NMS) behind one dispatch point.

Every op call in segkit goes through this module. The implementations live in the
module-level table :data:`_BACKEND`; today it holds ``torchvision.ops``, and the compiled
``segkit._C`` backend will replace entries with :func:`register_backend` without touching
callers. :func:`get_backend` reports which implementation is active (for the env report).

Box format everywhere: XYXY absolute pixel coordinates, float.
"""
from __future__ import annotations

from typing import Callable, Dict, Tuple, Union

import torch
from torch import Tensor, nn
import torchvision.ops

__all__ = [
    "roi_align", "ROIAlign", "nms", "batched_nms",
    "register_backend", "get_backend",
]

# op name -> (backend name, callable). Signatures follow torchvision.ops.
_BACKEND: Dict[str, Tuple[str, Callable]] = {
    "roi_align": ("torchvision", torchvision.ops.roi_align),
    "nms": ("torchvision", torchvision.ops.nms),
    "batched_nms": ("torchvision", torchvision.ops.batched_nms),
}


def register_backend(op: str, fn: Callable, backend: str) -> None:
    """Replace the implementation of ``op`` (one of ``roi_align``, ``nms``, ``batched_nms``).

    Args:
        op: op name; must already exist in the table.
        fn: callable with the same signature as the torchvision op.
        backend: short name shown by :func:`get_backend` (e.g. ``"segkit._C"``).
    """
    if op not in _BACKEND:
        raise KeyError(f"segkit.layers.ops: unknown op {op!r}; expected one of {sorted(_BACKEND)}")
    _BACKEND[op] = (backend, fn)


def get_backend() -> Dict[str, str]:
    """Return ``{op name: backend name}`` for every dispatched op."""
    return {op: name for op, (name, _) in _BACKEND.items()}


def roi_align(
    input: Tensor,
    rois: Tensor,
    output_size: Union[int, Tuple[int, int]],
    spatial_scale: float = 1.0,
    sampling_ratio: int = 0,
    aligned: bool = True,
) -> Tensor:
    """RoIAlign (Mask R-CNN, section 3): bilinear pooling of each RoI to a fixed grid.

    Args:
        input: (B, C, H, W) feature map.
        rois: (K, 5) rows ``[batch_idx, x1, y1, x2, y2]`` in image coordinates (XYXY).
        output_size: int or (h, w) of the pooled output.
        spatial_scale: feature-map scale relative to the image (1 / stride).
        sampling_ratio: samples per bin side; 0 = adaptive (ceil(roi_size / output_size)).
        aligned: if True, shift box coordinates by -0.5 so pixel centres line up (the
            "half-pixel" correction); False reproduces the original Detectron behaviour.

    Returns:
        (K, C, h, w) pooled features. K = 0 gives an empty tensor of that shape.
    """
    if rois.dim() != 2 or rois.shape[-1] != 5:
        raise ValueError(f"roi_align: rois must have shape (K, 5) [batch_idx, x1, y1, x2, y2], "
                         f"got {tuple(rois.shape)}")
    if isinstance(output_size, int):
        output_size = (output_size, output_size)
    output_size = tuple(int(s) for s in output_size)
    if rois.numel() == 0:
        return input.new_zeros((0, input.shape[1]) + output_size)
    rois = rois.to(dtype=input.dtype)
    return _BACKEND["roi_align"][1](input, rois, output_size, spatial_scale, sampling_ratio, aligned)


class ROIAlign(nn.Module):
    """Module form of :func:`roi_align` with fixed output size, scale and sampling settings."""

    def __init__(self, output_size: Union[int, Tuple[int, int]], spatial_scale: float,
                 sampling_ratio: int = 0, aligned: bool = True):
        super().__init__()
        self.output_size = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
        self.spatial_scale = float(spatial_scale)
        self.sampling_ratio = int(sampling_ratio)
        self.aligned = bool(aligned)

    def forward(self, input: Tensor, rois: Tensor) -> Tensor:
        """Args: input (B, C, H, W); rois (K, 5) ``[batch_idx, x1, y1, x2, y2]``.
        Returns (K, C, h, w)."""
        return roi_align(input, rois, self.output_size, self.spatial_scale,
                         self.sampling_ratio, self.aligned)

    def extra_repr(self) -> str:
        return (f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
                f"sampling_ratio={self.sampling_ratio}, aligned={self.aligned}")


def _check_boxes_scores(name: str, boxes: Tensor, scores: Tensor) -> None:
    if boxes.dim() != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"{name}: boxes must have shape (N, 4) XYXY, got {tuple(boxes.shape)}")
    if scores.shape != boxes.shape[:1]:
        raise ValueError(f"{name}: scores must have shape ({boxes.shape[0]},), got {tuple(scores.shape)}")


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Greedy non-maximum suppression.

    Args:
        boxes: (N, 4) XYXY boxes.
        scores: (N,) scores.
        iou_threshold: boxes with IoU > this with a higher-scoring kept box are removed.

    Returns:
        (K,) int64 indices of kept boxes, sorted by decreasing score.
    """
    _check_boxes_scores("nms", boxes, scores)
    if boxes.shape[0] == 0:
        return torch.empty((0,), dtype=torch.int64, device=boxes.device)
    return _BACKEND["nms"][1](boxes.float(), scores.float(), float(iou_threshold))


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """NMS applied independently per category ``idxs``.

    Args:
        boxes: (N, 4) XYXY boxes.
        scores: (N,) scores.
        idxs: (N,) int category (or image/level) index; boxes of different idxs never suppress
            each other.
        iou_threshold: IoU threshold as in :func:`nms`.

    Returns:
        (K,) int64 indices of kept boxes, sorted by decreasing score.
    """
    _check_boxes_scores("batched_nms", boxes, scores)
    if idxs.shape != scores.shape:
        raise ValueError(f"batched_nms: idxs must have shape ({boxes.shape[0]},), got {tuple(idxs.shape)}")
    if boxes.shape[0] == 0:
        return torch.empty((0,), dtype=torch.int64, device=boxes.device)
    return _BACKEND["batched_nms"][1](boxes.float(), scores.float(), idxs, float(iou_threshold))
