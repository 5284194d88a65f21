"""Detection ops (RoIAlign family, RoIPool, NMS) behind one dispatch point.

Every op call in segkit goes through this module. The implementations live in the
module-level table :data:`_BACKEND`: the compiled ``segkit._C`` kernels (built from
``csrc/``, see :mod:`segkit.layers._compiled`) when the extension loaded, torchvision's ops
otherwise. A missing or mismatched build falls back to torchvision with one warning per
process, and :func:`get_backend` (shown by ``segkit.collect_env()`` and
``python -m segkit.utils.env``) says which implementation runs. A tensor on a device the build
has no kernels for (CUDA tensors with a CPU-only build) also takes the torchvision path.

Box format everywhere: XYXY absolute pixel coordinates, float; RoI rows are
``[batch_idx, x1, y1, x2, y2]``.
"""
from __future__ import annotations

import math
import warnings
from typing import Callable, Dict, List, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
import torchvision.ops

from . import _compiled

__all__ = [
    "roi_align", "ROIAlign", "roi_pool", "ROIPool", "multilevel_roi_align",
    "multicontext_roi_align", "nms", "batched_nms", "fpn_levels",
    "register_backend", "get_backend",
]

COMPILED = "segkit._C"

_Size = Union[int, Tuple[int, int], Sequence[int]]


def fpn_levels(boxes: Tensor, min_level: int, max_level: int, canonical_box_size: float = 224.0,
               canonical_level: int = 4) -> Tensor:
    """FPN level of each box (FPN Eq. 1, papers.md section 5), relative to ``min_level``.

    ``k = floor(k0 + log2(sqrt(w * h) / 224) + 1e-6)`` clamped to ``[min_level, max_level]``.
    A 224x224 box (the ImageNet pre-training size) lands on ``k0 = canonical_level``; each
    halving of the box side moves one level finer. The area is ``w * h`` without the "+1" of
    Detectron (papers.md section 10 item 8), as torchvision's MultiScaleRoIAlign and detectron2
    compute it; the 1e-6 keeps boxes of exactly 112, 224, ... px on the coarser level despite
    rounding in ``log2``. An inverted box (negative area) belongs to no level: -1.

    Args:
        boxes: (R, 4) XYXY boxes in network-input pixels.
        min_level / max_level: finest and coarsest pyramid levels available (2 and 5 for P2-P5).
        canonical_box_size: box side mapped to ``canonical_level``.
        canonical_level: k0.

    Returns:
        (R,) int64 level index relative to ``min_level`` (0 = finest), -1 for inverted boxes.
    """
    if not boxes.is_floating_point():
        boxes = boxes.float()
    if boxes.dtype in (torch.float16, torch.bfloat16):
        boxes = boxes.float()  # the formula in float at least, as the compiled kernels
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    level = torch.floor(canonical_level + torch.log2(torch.sqrt(area) / canonical_box_size)
                        + torch.tensor(1e-6, dtype=area.dtype, device=area.device))
    level = torch.clamp(level, min=min_level, max=max_level)
    return torch.where(torch.isnan(level), torch.full_like(level, min_level - 1),
                       level).to(torch.int64) - min_level


def _pyramid_min_level(spatial_scales: Sequence[float]) -> int:
    """Level of the finest map; checks the scales are consecutive powers of two, finest first."""
    if not spatial_scales:
        raise ValueError("multilevel_roi_align: spatial_scales is empty; expected one per level")
    levels = []
    for s in spatial_scales:
        lvl = -math.log2(s) if s > 0 else float("nan")
        if not abs(lvl - round(lvl)) < 1e-6:
            raise ValueError(f"multilevel_roi_align: spatial scale {s} is not a power of two "
                             f"(1/stride); spatial_scales={list(spatial_scales)}")
        levels.append(int(round(lvl)))
    if levels != list(range(levels[0], levels[0] + len(levels))):
        raise ValueError(f"multilevel_roi_align: spatial_scales must be consecutive levels, finest "
                         f"first; got {list(spatial_scales)} (levels {levels})")
    return levels[0]


def _expand_rois(rois: Tensor, context_scales: Sequence[float]) -> Tensor:
    """(K, 5) RoIs -> (K * S, 5), box k at context scale s in row ``k * S + i``.

    Each box grows by ``(s - 1) / 2`` of its size on every side about its centre (MultiPathNet's
    foveal regions, papers.md section 4.1): s = 1 is the box itself, s = 1.5 is
    ``(x - 0.25 w, y - 0.25 h, 1.5 w, 1.5 h)``.
    """
    s = torch.tensor(list(context_scales), dtype=rois.dtype, device=rois.device)
    grow = ((s - 1) * 0.5)[None, :]                                   # (1, S)
    dx = (rois[:, 3] - rois[:, 1])[:, None] * grow                    # (K, S)
    dy = (rois[:, 4] - rois[:, 2])[:, None] * grow
    out = torch.stack([rois[:, :1].expand_as(dx), rois[:, 1:2] - dx, rois[:, 2:3] - dy,
                       rois[:, 3:4] + dx, rois[:, 4:5] + dy], dim=2)  # (K, S, 5)
    return out.reshape(-1, 5)


# -- torchvision implementations (the fallback, and the reference of the compiled ones) ------

def _tv_roi_align(input, rois, output_size, spatial_scale, sampling_ratio, aligned):
    return torchvision.ops.roi_align(input, rois, output_size, spatial_scale, sampling_ratio, aligned)


def _tv_roi_pool(input, rois, output_size, spatial_scale):
    return torchvision.ops.roi_pool(input, rois, output_size, spatial_scale)


def _tv_multilevel_roi_align(features, rois, output_size, spatial_scales, sampling_ratio,
                             aligned, canonical_box_size, canonical_level):
    min_level = _pyramid_min_level(spatial_scales)
    levels = fpn_levels(rois[:, 1:], min_level, min_level + len(features) - 1,
                        canonical_box_size, canonical_level)
    out = features[0].new_zeros((rois.shape[0], features[0].shape[1]) + tuple(output_size))
    for lvl, (feat, scale) in enumerate(zip(features, spatial_scales)):
        idx = torch.nonzero(levels == lvl, as_tuple=True)[0]
        if idx.numel() == 0:
            continue
        pooled = torchvision.ops.roi_align(feat, rois[idx], output_size, scale,
                                           sampling_ratio, aligned)
        # In place into one (R, C, h, w) buffer; autograd still flows to ``pooled``.
        out.index_put_((idx,), pooled)
    return out


def _tv_multicontext_roi_align(input, rois, output_size, context_scales, spatial_scale,
                               sampling_ratio, aligned):
    pooled = torchvision.ops.roi_align(input, _expand_rois(rois, context_scales), output_size,
                                       spatial_scale, sampling_ratio, aligned)
    return pooled.reshape((rois.shape[0], len(context_scales), input.shape[1]) + tuple(output_size))


# op name -> (name, implementation) used without the compiled build, or for devices it lacks
_FALLBACK: Dict[str, Tuple[str, Callable]] = {}
# op name -> (backend name, callable). Signatures: the torchvision-style ones above.
_BACKEND: Dict[str, Tuple[str, Callable]] = {}


def _add_op(op: str, fallback: Callable, fallback_name: str = "torchvision") -> None:
    """Put ``op`` in the table: ``segkit._C``'s kernel when built, else ``fallback``.

    ``segkit.layers._compiled`` must define a function named ``op`` with the fallback's
    signature. Used for the ops here and for mask pasting (``segkit.layers.mask_ops``).
    """
    _FALLBACK[op] = (fallback_name, fallback)
    if _compiled.available():
        _BACKEND[op] = (COMPILED, getattr(_compiled, op))
    else:
        _BACKEND[op] = (fallback_name, fallback)


for _op, _fn in [("roi_align", _tv_roi_align), ("roi_pool", _tv_roi_pool),
                 ("multilevel_roi_align", _tv_multilevel_roi_align),
                 ("multicontext_roi_align", _tv_multicontext_roi_align),
                 ("nms", torchvision.ops.nms), ("batched_nms", torchvision.ops.batched_nms)]:
    _add_op(_op, _fn)

if not _compiled.available():
    # One warning per process: a missing build is a visible slowdown, never a silent one.
    # CI runs tests/layers/test_compiled_backend.py, which fails in this state.
    warnings.warn(f"segkit.layers: compiled ops unavailable ({_compiled.load_error()}); using "
                  f"torchvision's ops, which are slower on CPU. Rebuild with "
                  f"`pip install --no-build-isolation -e .`", RuntimeWarning, stacklevel=2)


def register_backend(op: str, fn: Callable, backend: str) -> None:
    """Replace the implementation of ``op`` (a key of :func:`get_backend`).

    Args:
        op: op name; must already exist in the table.
        fn: callable with the same signature as the torchvision-style op it replaces.
        backend: short name shown by :func:`get_backend` (e.g. ``"segkit._C"``).
    """
    if op not in _BACKEND:
        raise KeyError(f"segkit.layers.ops: unknown op {op!r}; expected one of {sorted(_BACKEND)}")
    _BACKEND[op] = (backend, fn)


def get_backend() -> Dict[str, str]:
    """Return ``{op name: backend name}`` for every dispatched op (CPU tensors)."""
    return {op: name for op, (name, _) in _BACKEND.items()}


def _impl(op: str, device: torch.device) -> Callable:
    """The implementation of ``op`` for tensors on ``device``."""
    name, fn = _BACKEND[op]
    if name == COMPILED and not _compiled.supports(device, op):
        return _FALLBACK[op][1]
    return fn


def _pair(output_size: _Size, op: str) -> Tuple[int, int]:
    if isinstance(output_size, int):
        return (int(output_size), int(output_size))
    size = tuple(int(s) for s in output_size)
    if len(size) != 2:
        raise ValueError(f"{op}: output_size must be an int or (h, w), got {output_size!r}")
    return size


def _check_rois(op: str, input: Tensor, rois: Tensor) -> None:
    if rois.dim() != 2 or rois.shape[-1] != 5:
        raise ValueError(f"{op}: rois must have shape (K, 5) [batch_idx, x1, y1, x2, y2], "
                         f"got {tuple(rois.shape)}")
    if input.dim() != 4:
        raise ValueError(f"{op}: input must have shape (B, C, H, W), got {tuple(input.shape)}")
    if input.device != rois.device:
        raise ValueError(f"{op}: input is on {input.device} but rois are on {rois.device}")


def roi_align(
    input: Tensor,
    rois: Tensor,
    output_size: _Size,
    spatial_scale: float = 1.0,
    sampling_ratio: int = 0,
    aligned: bool = True,
) -> Tensor:
    """RoIAlign (Mask R-CNN, section 3): bilinear pooling of each RoI to a fixed grid.

    Args:
        input: (B, C, H, W) feature map, NCHW or channels-last, float16/bfloat16/float32/float64.
        rois: (K, 5) rows ``[batch_idx, x1, y1, x2, y2]`` in image coordinates (XYXY).
        output_size: int or (h, w) of the pooled output.
        spatial_scale: feature-map scale relative to the image (1 / stride).
        sampling_ratio: samples per bin side; 0 = adaptive (ceil(roi_size / output_size)).
        aligned: if True, shift box coordinates by -0.5 so pixel centres line up (the
            "half-pixel" correction); False reproduces the original Detectron behaviour.

    Returns:
        (K, C, h, w) pooled features (in the input's memory format). K = 0 gives an empty
        tensor of that shape.
    """
    _check_rois("roi_align", input, rois)
    output_size = _pair(output_size, "roi_align")
    if rois.numel() == 0:
        return input.new_zeros((0, input.shape[1]) + output_size)
    rois = rois.to(dtype=input.dtype)
    return _impl("roi_align", input.device)(input, rois, output_size, float(spatial_scale),
                                            int(sampling_ratio), bool(aligned))


class ROIAlign(nn.Module):
    """Module form of :func:`roi_align` with fixed output size, scale and sampling settings."""

    def __init__(self, output_size: _Size, spatial_scale: float,
                 sampling_ratio: int = 0, aligned: bool = True):
        super().__init__()
        self.output_size = _pair(output_size, "ROIAlign")
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


def roi_pool(input: Tensor, rois: Tensor, output_size: _Size, spatial_scale: float = 1.0) -> Tensor:
    """RoIPool (Fast R-CNN, section 2.1): max over each of h x w bins of the quantised RoI.

    The baseline pooling of Fast R-CNN and MultiPathNet; box coordinates are rounded to the
    feature grid, which is the misalignment RoIAlign removes.

    Args:
        input: (B, C, H, W) feature map.
        rois: (K, 5) rows ``[batch_idx, x1, y1, x2, y2]`` in image coordinates (XYXY).
        output_size: int or (h, w).
        spatial_scale: feature-map scale relative to the image (1 / stride).

    Returns:
        (K, C, h, w); bins that fall outside the map are 0.
    """
    _check_rois("roi_pool", input, rois)
    output_size = _pair(output_size, "roi_pool")
    if rois.numel() == 0:
        return input.new_zeros((0, input.shape[1]) + output_size)
    rois = rois.to(dtype=input.dtype)
    return _impl("roi_pool", input.device)(input, rois, output_size, float(spatial_scale))


class ROIPool(nn.Module):
    """Module form of :func:`roi_pool`."""

    def __init__(self, output_size: _Size, spatial_scale: float):
        super().__init__()
        self.output_size = _pair(output_size, "ROIPool")
        self.spatial_scale = float(spatial_scale)

    def forward(self, input: Tensor, rois: Tensor) -> Tensor:
        """Args: input (B, C, H, W); rois (K, 5). Returns (K, C, h, w)."""
        return roi_pool(input, rois, self.output_size, self.spatial_scale)

    def extra_repr(self) -> str:
        return f"output_size={self.output_size}, spatial_scale={self.spatial_scale}"


def multilevel_roi_align(
    features: List[Tensor],
    rois: Tensor,
    output_size: _Size,
    spatial_scales: Sequence[float],
    sampling_ratio: int = 0,
    aligned: bool = True,
    canonical_box_size: float = 224.0,
    canonical_level: int = 4,
) -> Tensor:
    """RoIAlign over a feature pyramid, each RoI pooled from its own level, in one call.

    The level of each RoI is :func:`fpn_levels` (FPN Eq. 1); the compiled kernel assigns and
    pools in one pass instead of a gather / pool / scatter per level.

    Args:
        features: one (B, C, H_l, W_l) map per level, finest first.
        rois: (K, 5) rows ``[batch_idx, x1, y1, x2, y2]`` in network-input pixels (XYXY).
        output_size: int or (h, w).
        spatial_scales: 1 / stride of each map, consecutive powers of two (``1/4, 1/8, ...``).
        sampling_ratio, aligned: as :func:`roi_align`.
        canonical_box_size, canonical_level: ``224`` and ``k0 = 4`` of FPN Eq. 1.

    Returns:
        (K, C, h, w) pooled features in the order of ``rois``. Inverted boxes (negative area)
        belong to no level and give zeros, as torchvision's MultiScaleRoIAlign.
    """
    op = "multilevel_roi_align"
    if len(features) == 0 or len(features) != len(spatial_scales):
        raise ValueError(f"{op}: got {len(features)} feature maps but {len(spatial_scales)} "
                         f"spatial scales; expected one scale per map")
    _check_rois(op, features[0], rois)
    _pyramid_min_level(spatial_scales)
    output_size = _pair(output_size, op)
    if rois.numel() == 0:
        return features[0].new_zeros((0, features[0].shape[1]) + output_size)
    rois = rois.to(dtype=features[0].dtype)
    return _impl(op, rois.device)(list(features), rois, output_size,
                                  [float(s) for s in spatial_scales], int(sampling_ratio),
                                  bool(aligned), float(canonical_box_size), int(canonical_level))


def multicontext_roi_align(
    input: Tensor,
    rois: Tensor,
    output_size: _Size,
    context_scales: Sequence[float] = (1.0, 1.5, 2.0, 4.0),
    spatial_scale: float = 1.0,
    sampling_ratio: int = 0,
    aligned: bool = True,
) -> Tensor:
    """RoIAlign of every box at several context scales (MultiPathNet foveal regions).

    Box ``(x, y, w, h)`` at scale s becomes the box of size ``s*w x s*h`` with the same centre
    (papers.md section 4.1: 1x, 1.5x, 2x and 4x by default). Regions may extend past the
    image: RoIAlign reads zeros there.

    Args:
        input: (B, C, H, W) feature map.
        rois: (K, 5) rows ``[batch_idx, x1, y1, x2, y2]`` (XYXY, image pixels).
        output_size: int or (h, w) of each pooled region.
        context_scales: the S scale factors, each > 0.
        spatial_scale, sampling_ratio, aligned: as :func:`roi_align`.

    Returns:
        (K, S, C, h, w): ``out[k, i]`` is box k pooled at ``context_scales[i]``.
    """
    op = "multicontext_roi_align"
    _check_rois(op, input, rois)
    output_size = _pair(output_size, op)
    context_scales = [float(s) for s in context_scales]
    if not context_scales or min(context_scales) <= 0:
        raise ValueError(f"{op}: context_scales must be non-empty and positive, got {context_scales}")
    if rois.numel() == 0:
        return input.new_zeros((0, len(context_scales), input.shape[1]) + output_size)
    rois = rois.to(dtype=input.dtype)
    return _impl(op, input.device)(input, rois, output_size, context_scales, float(spatial_scale),
                                   int(sampling_ratio), bool(aligned))


def _check_boxes_scores(name: str, boxes: Tensor, scores: Tensor) -> None:
    if boxes.dim() != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"{name}: boxes must have shape (N, 4) XYXY, got {tuple(boxes.shape)}")
    if scores.shape != boxes.shape[:1]:
        raise ValueError(f"{name}: scores must have shape ({boxes.shape[0]},), got {tuple(scores.shape)}")
    if scores.device != boxes.device:
        raise ValueError(f"{name}: boxes are on {boxes.device} but scores are on {scores.device}")


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
    return _impl("nms", boxes.device)(boxes.float(), scores.float(), float(iou_threshold))


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
    if idxs.device != boxes.device:
        raise ValueError(f"batched_nms: boxes are on {boxes.device} but idxs are on {idxs.device}")
    if boxes.shape[0] == 0:
        return torch.empty((0,), dtype=torch.int64, device=boxes.device)
    return _impl("batched_nms", boxes.device)(boxes.float(), scores.float(), idxs,
                                              float(iou_threshold))
