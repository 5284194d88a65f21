"""Mask R-CNN FPN mask head, its loss and its inference (papers.md section 7).

14x14 RoIAlign features -> 4 x (3x3 conv 256 + ReLU) -> 2x2 stride-2 deconv 256 + ReLU (28x28)
-> 1x1 conv to K mask logits (or 1 when class-agnostic).
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from segkit.layers import ShapeSpec
from segkit.registry import HEADS
from segkit.structures import Instances
from segkit.utils.comm import global_mean_count

__all__ = ["MaskRCNNConvUpsampleHead", "mask_rcnn_loss", "mask_rcnn_inference"]


@HEADS.register("mask_rcnn_conv_upsample")
class MaskRCNNConvUpsampleHead(nn.Module):
    """FCN mask head of Mask R-CNN with FPN (papers.md section 7, "Heads").

    Args:
        input_shape: pooled RoI feature shape (channels, stride unused, height, width), given
            at build time by the ROI heads.
        num_classes: K foreground classes (given by the ROI heads).
        num_conv: number of 3x3 conv + ReLU layers (4 in the paper).
        conv_dim: channels of the convs and the deconv (256).
        cls_agnostic: predict one mask for every class instead of one per class (given by the
            ROI heads' ``cls_agnostic_mask``).

    Parameters are named ``mask_fcn1..N``, ``deconv`` and ``predictor`` (the converters rely on
    it). Output resolution is twice the input (28 for 14x14 RoIs).
    """

    def __init__(self, input_shape: ShapeSpec, num_classes: int, num_conv: int = 4,
                 conv_dim: int = 256, cls_agnostic: bool = False):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"mask_rcnn_conv_upsample: num_classes must be >= 1, "
                             f"got {num_classes}")
        self.num_classes = int(num_classes)
        self.cls_agnostic = bool(cls_agnostic)
        channels = int(input_shape.channels)
        self._conv_names: List[str] = []
        for i in range(num_conv):
            conv = nn.Conv2d(channels, conv_dim, kernel_size=3, padding=1)
            self.add_module(f"mask_fcn{i + 1}", conv)
            self._conv_names.append(f"mask_fcn{i + 1}")
            channels = conv_dim
        self.deconv = nn.ConvTranspose2d(channels, conv_dim, kernel_size=2, stride=2)
        self.predictor = nn.Conv2d(conv_dim, 1 if cls_agnostic else num_classes, kernel_size=1)
        # MSRA init for the mask convs (Detectron's e2e Mask R-CNN FPN config, papers.md
        # section 7); fan_out keeps the backward signal variance of the ReLU stack constant.
        for name in self._conv_names + ["deconv"]:
            layer = getattr(self, name)
            nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(layer.bias)
        # The logits layer is not followed by a ReLU: a small Gaussian keeps the initial
        # sigmoid outputs near 0.5 (Detectron's GaussianFill 0.001).
        nn.init.normal_(self.predictor.weight, std=0.001)
        nn.init.zeros_(self.predictor.bias)

    def forward(self, x: Tensor) -> Tensor:
        """Args:
            x: (R, C, M/2, M/2) pooled RoI features.

        Returns:
            (R, K or 1, M, M) mask logits.
        """
        for name in self._conv_names:
            x = F.relu_(getattr(self, name)(x))  # in place: conv backward never reads its output
        x = F.relu_(self.deconv(x))
        return self.predictor(x)


def _select_class(logits: Tensor, classes: Tensor) -> Tensor:
    """(R, K, M, M) logits and (R,) classes -> (R, M, M); class-agnostic (R, 1, M, M) passes."""
    if logits.shape[1] == 1:
        return logits[:, 0]
    idx = torch.arange(logits.shape[0], device=logits.device)
    return logits[idx, classes]


def mask_rcnn_loss(logits: Tensor, gt_classes: Tensor, targets: Tensor) -> Tensor:
    """Per-pixel sigmoid binary cross-entropy on the GT class channel only, averaged over the
    pixels of the positive RoIs of the whole batch (all processes).

    Mask R-CNN (papers.md section 7, "Loss"): the K masks do not compete, only the channel of
    the RoI's ground-truth class is trained, and only on positive RoIs (the caller passes
    positives only).

    Args:
        logits: (P, K or 1, M, M) mask logits of the P positive RoIs.
        gt_classes: (P,) int64 GT class of each RoI.
        targets: (P, M, M) float in [0, 1], the GT mask cropped to each RoI and resized to M.

    Returns:
        scalar loss; 0 (still attached to ``logits``) when P = 0.
    """
    # Mean over the positive RoIs of the whole batch, all processes included (called by every
    # process, also one without positives: segkit.utils.comm.global_mean_count).
    num_rois = global_mean_count(logits.shape[0])
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    expected = (logits.shape[0],) + tuple(logits.shape[2:])
    if tuple(targets.shape) != expected:
        raise ValueError(f"mask_rcnn_loss: targets must have shape {expected}, "
                         f"got {tuple(targets.shape)}")
    chosen = _select_class(logits, gt_classes)
    loss = F.binary_cross_entropy_with_logits(chosen, targets.to(chosen.dtype), reduction="sum")
    return loss / (num_rois * chosen[0].numel())


def mask_rcnn_inference(logits: Tensor, detections: List[Instances]) -> None:
    """Attach the predicted-class mask probabilities to each detection, in place.

    Uses the k-th mask for the predicted class k (papers.md section 7, "Inference"); pasting
    into the image and binarising at 0.5 happen later, in ``segkit.modeling.postprocess``.

    Args:
        logits: (sum N_i, K or 1, M, M) logits for the detections of all images, in order.
        detections: per image Instances with ``pred_classes``; gains ``pred_masks``:
            (N_i, M, M) float probabilities in the detection box frame.
    """
    if not detections:
        return
    probs = _select_class(logits, torch.cat([d.pred_classes for d in detections])).sigmoid()
    for det, p in zip(detections, probs.split([len(d) for d in detections])):
        det.pred_masks = p
