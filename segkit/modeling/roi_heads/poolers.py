"""Multi-level RoI feature pooling for FPN heads (FPN, papers.md section 5).

Each RoI is pooled from exactly one pyramid level, chosen by its size (FPN Eq. 1), with
RoIAlign (Mask R-CNN, papers.md section 7). Every op call goes through ``segkit.layers``.

Box format: XYXY absolute pixel coordinates on the network-input image.
"""
from __future__ import annotations

import math
from typing import List, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from segkit.layers import fpn_levels, multilevel_roi_align, roi_align
from segkit.structures import Boxes

__all__ = ["ROIPooler", "assign_boxes_to_levels", "boxes_to_rois"]

BoxList = Sequence[Union[Boxes, Tensor]]


def _box_tensor(boxes: Union[Boxes, Tensor]) -> Tensor:
    return boxes.tensor if isinstance(boxes, Boxes) else boxes


def boxes_to_rois(box_lists: BoxList) -> Tensor:
    """Concatenate per-image boxes into RoIAlign's ``[batch_idx, x1, y1, x2, y2]`` rows.

    Args:
        box_lists: one entry per image, ``Boxes`` or a (N_i, 4) XYXY tensor.

    Returns:
        (sum N_i, 5) float tensor, column 0 the image index.
    """
    tensors = [_box_tensor(b) for b in box_lists]
    if not tensors:
        raise ValueError("ROIPooler: box_lists is empty; expected one entry per image")
    idx = [torch.full((len(t), 1), float(i), dtype=t.dtype, device=t.device)
           for i, t in enumerate(tensors)]
    return torch.cat([torch.cat(idx, dim=0), torch.cat(tensors, dim=0)], dim=1)


def assign_boxes_to_levels(
    box_lists: BoxList,
    min_level: int,
    max_level: int,
    canonical_box_size: float = 224.0,
    canonical_level: int = 4,
) -> Tensor:
    """FPN level of each box (FPN Eq. 1, papers.md section 5); see :func:`segkit.layers.fpn_levels`.

    Args:
        box_lists: one entry per image, ``Boxes`` or (N_i, 4) XYXY tensors.
        min_level: finest pyramid level available (2 for P2).
        max_level: coarsest pyramid level available (5 for P5).
        canonical_box_size: box side mapped to ``canonical_level``.
        canonical_level: k0.

    Returns:
        (sum N_i,) int64 level index relative to ``min_level`` (0 = finest; -1 for an inverted
        box, which no level pools).
    """
    boxes = torch.cat([_box_tensor(b) for b in box_lists], dim=0)
    return fpn_levels(boxes, min_level, max_level, canonical_box_size, canonical_level)


class ROIPooler(nn.Module):
    """RoIAlign over a feature pyramid, each box pooled from its own level.

    Args:
        output_size: pooled (h, w), or one int for a square output (7 for boxes, 14 for masks).
        scales: spatial scale (1 / stride) of each input level, finest first, e.g.
            ``(1/4, 1/8, 1/16, 1/32)`` for P2-P5. Each must be a power of two so that the
            level index is ``-log2(scale)``.
        sampling_ratio: RoIAlign samples per bin side; 0 = adaptive. Detectron and torchvision
            use 2 (papers.md section 7: results are insensitive to the count).
        aligned: half-pixel offset (detectron2 ``ROIAlignV2``) if True; False reproduces
            Detectron/torchvision (papers.md section 7, section 10 item 8).
        canonical_box_size: ``224`` in FPN Eq. 1.
        canonical_level: ``k0 = 4`` in FPN Eq. 1.
    """

    def __init__(
        self,
        output_size: Union[int, Tuple[int, int]],
        scales: Sequence[float],
        sampling_ratio: int = 0,
        aligned: bool = True,
        canonical_box_size: float = 224.0,
        canonical_level: int = 4,
    ):
        super().__init__()
        if isinstance(output_size, int):
            output_size = (output_size, output_size)
        if len(output_size) != 2:
            raise ValueError(f"ROIPooler: output_size must be an int or (h, w), "
                             f"got {output_size!r}")
        if not scales:
            raise ValueError("ROIPooler: scales is empty; expected one scale per pyramid level")
        levels = [-math.log2(s) for s in scales]
        for s, lvl in zip(scales, levels):
            if abs(lvl - round(lvl)) > 1e-6:
                raise ValueError(f"ROIPooler: scale {s} is not a power of two (1/stride); "
                                 f"scales={list(scales)}")
        levels = [int(round(lvl)) for lvl in levels]
        if levels != list(range(levels[0], levels[0] + len(levels))):
            raise ValueError(f"ROIPooler: scales must be consecutive levels, finest first; "
                             f"got scales={list(scales)} (levels {levels})")
        self.output_size = tuple(int(s) for s in output_size)
        self.scales = [float(s) for s in scales]
        self.sampling_ratio = int(sampling_ratio)
        self.aligned = bool(aligned)
        self.min_level, self.max_level = levels[0], levels[-1]
        self.canonical_box_size = float(canonical_box_size)
        self.canonical_level = int(canonical_level)

    def forward(self, features: List[Tensor], box_lists: BoxList) -> Tensor:
        """Pool one feature grid per box.

        Args:
            features: one (B, C, H_l, W_l) map per level, in the order of ``scales``.
            box_lists: B entries (one per image), ``Boxes`` or (N_i, 4) XYXY tensors in
                network-input pixels.

        Returns:
            (sum N_i, C, h, w) pooled features, in the order of the concatenated boxes.
        """
        if len(features) != len(self.scales):
            raise ValueError(f"ROIPooler: got {len(features)} feature maps but "
                             f"{len(self.scales)} scales")
        if len(box_lists) != features[0].shape[0]:
            raise ValueError(f"ROIPooler: got boxes for {len(box_lists)} images but the features "
                             f"have batch size {features[0].shape[0]}")
        rois = boxes_to_rois(box_lists)
        if len(self.scales) == 1:
            return roi_align(features[0], rois, self.output_size, self.scales[0],
                             self.sampling_ratio, self.aligned)
        # One call assigns every box its level and pools it (compiled segkit._C kernel).
        return multilevel_roi_align(features, rois, self.output_size, self.scales,
                                    self.sampling_ratio, self.aligned, self.canonical_box_size,
                                    self.canonical_level)

    def extra_repr(self) -> str:
        return (f"output_size={self.output_size}, levels=P{self.min_level}-P{self.max_level}, "
                f"sampling_ratio={self.sampling_ratio}, aligned={self.aligned}")
