"""Loss functions as registered modules, so each head picks its losses from config.

Every loss is an ``nn.Module`` registered in ``LOSSES`` and built from a node such as
``{name: focal, alpha: 0.25, gamma: 2.0}``. All take ``reduction`` in ``{"none", "mean", "sum"}``;
heads that normalise by a count of their own (number of sampled anchors, number of foreground
anchors, ...) use ``reduction="sum"`` and divide themselves, which is why ``sum`` is the default
of the dense losses.

========= ======================================================== ===========================
key       module (defaults)                                        forward
========= ======================================================== ===========================
focal     SigmoidFocalLoss(alpha=0.25, gamma=2.0, reduction="sum") (logits, targets) same shape
smooth_l1 SmoothL1Loss(beta=0.0, reduction="sum")                  (pred, target) same shape
giou      GIoULoss(reduction="sum", eps=1e-7)                      (pred, target) (N, 4) XYXY
ce        CrossEntropyLoss(reduction="mean", ignore_index=-100,    (logits (N, C), labels (N,))
          label_smoothing=0.0)
========= ======================================================== ===========================

The element-wise maths is fvcore's (``fvcore.nn.sigmoid_focal_loss``, ``smooth_l1_loss``,
``giou_loss``), i.e. Detectron2's, and matches ``torchvision.ops.sigmoid_focal_loss`` /
``generalized_box_iou_loss`` (tests/modeling/test_losses.py).

Box losses in heads: a loss with the class attribute ``decoded_boxes = True`` (``giou``) compares
decoded XYXY boxes, the others compare box deltas; :func:`box_regression_loss` does the
dispatch, so a head's ``box_loss`` can be ``smooth_l1`` or ``giou`` from config.
"""
from __future__ import annotations

import warnings
from typing import Optional, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from segkit.registry import LOSSES

with warnings.catch_warnings():
    # fvcore.nn scripts a few functions at import time; newer torch warns about torch.jit.script
    warnings.simplefilter("ignore")
    from fvcore.nn import giou_loss as _fv_giou_loss
    from fvcore.nn import sigmoid_focal_loss as _fv_sigmoid_focal_loss
    from fvcore.nn import smooth_l1_loss as _fv_smooth_l1_loss

__all__ = ["SigmoidFocalLoss", "SmoothL1Loss", "GIoULoss", "CrossEntropyLoss", "REDUCTIONS",
           "box_regression_loss", "check_reduction", "check_same_shape"]

REDUCTIONS = ("none", "mean", "sum")


def _check_reduction(loss: str, reduction: str) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"loss '{loss}': reduction must be one of {list(REDUCTIONS)}, "
                         f"got {reduction!r}")
    return reduction


def check_same_shape(loss: str, **tensors: Tensor) -> None:
    """Raise a ValueError naming the loss and every argument's shape unless all ``tensors``
    (a loss's inputs, by argument name) have one shape: broadcasting would silently compute a
    different loss."""
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        listed = " and ".join(f"{name} {shape}" for name, shape in shapes.items())
        raise ValueError(f"loss '{loss}': {listed} must have the same shape")


def check_reduction(loss: Optional[nn.Module], allowed: Sequence[str], where: str) -> None:
    """Raise a ValueError naming the config key when a head gets a loss it cannot normalise.

    Args:
        loss: built loss module (``None`` passes).
        allowed: reductions the head supports (heads divide sums by their own counts).
        where: config path of the loss node, e.g. ``model.proposal_generator.box_loss``.
    """
    red = getattr(loss, "reduction", None)
    if loss is not None and red not in allowed:
        opts = " or ".join(repr(a) for a in allowed)
        raise ValueError(f"{where}.reduction must be {opts} here (the head normalises the loss "
                         f"itself: set reduction {opts}), got {red!r}")


def box_regression_loss(loss: nn.Module, transform, pred_deltas: Tensor, src_boxes: Tensor,
                        target_boxes: Tensor) -> Tensor:
    """Box loss between predicted deltas and GT boxes, in the space the loss works in.

    Args:
        loss: e.g. ``SmoothL1Loss`` (on deltas) or ``GIoULoss`` (``decoded_boxes = True``).
        transform: the head's ``Box2BoxTransform``.
        pred_deltas: (P, 4) predicted deltas relative to ``src_boxes``.
        src_boxes: (P, 4) XYXY anchors / proposals.
        target_boxes: (P, 4) XYXY matched GT boxes.

    Returns:
        ``loss(decode(pred_deltas), target_boxes)`` for decoded-box losses, else
        ``loss(pred_deltas, encode(src_boxes, target_boxes))``.
    """
    if getattr(loss, "decoded_boxes", False):
        return loss(transform.apply_deltas(pred_deltas, src_boxes), target_boxes)
    return loss(pred_deltas, transform.get_deltas(src_boxes, target_boxes))


@LOSSES.register("focal", aliases=("sigmoid_focal",))
class SigmoidFocalLoss(nn.Module):
    """Sigmoid focal loss (papers.md section 6, RetinaNet, eq. 5).

    ``FL(p_t) = -alpha_t * (1 - p_t)^gamma * log(p_t)`` per element, with ``p = sigmoid(logit)``,
    ``p_t = p`` for a positive target and ``1 - p`` for a negative one, ``alpha_t = alpha`` for
    positives and ``1 - alpha`` for negatives.

    Args:
        alpha: weight of the positives in [0, 1]; ``alpha < 0`` disables the balancing
            (``alpha_t = 1``).
        gamma: focusing exponent >= 0; ``gamma = 0`` is the alpha-balanced binary cross-entropy.
        reduction: "none" | "mean" | "sum".

    Forward:
        logits: (*) float logits; targets: (*) same shape, 0/1 (float or bool/int).
        Returns the loss, shape (*) for "none" else a scalar.
    """

    def __init__(self, alpha: float = 0.25, gamma: float = 2.0, reduction: str = "sum"):
        super().__init__()
        if gamma < 0:
            raise ValueError(f"loss 'focal': gamma must be >= 0, got {gamma}")
        if alpha > 1:
            raise ValueError(f"loss 'focal': alpha must be <= 1 (or < 0 to disable), got {alpha}")
        self.alpha = float(alpha)
        self.gamma = float(gamma)
        self.reduction = _check_reduction("focal", reduction)

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        check_same_shape("focal", logits=logits, targets=targets)
        return _fv_sigmoid_focal_loss(logits, targets.to(logits.dtype), alpha=self.alpha,
                                      gamma=self.gamma, reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, gamma={self.gamma}, reduction={self.reduction!r}"


@LOSSES.register("smooth_l1")
class SmoothL1Loss(nn.Module):
    """Smooth-L1 loss with a transition point ``beta`` (papers.md section 5, Fast R-CNN).

    ``0.5 * x^2 / beta`` if ``|x| < beta`` else ``|x| - 0.5 * beta``, with ``x = pred - target``;
    ``beta = 0`` (below 1e-5) is exactly L1 (no NaN gradient). Unlike ``torch``'s Huber loss the
    linear part always has slope 1.

    Args:
        beta: L1 -> L2 change point (>= 0).
        reduction: "none" | "mean" | "sum".

    Forward: pred, target of the same shape (typically (N, 4) box deltas).
    """

    def __init__(self, beta: float = 0.0, reduction: str = "sum"):
        super().__init__()
        if beta < 0:
            raise ValueError(f"loss 'smooth_l1': beta must be >= 0, got {beta}")
        self.beta = float(beta)
        self.reduction = _check_reduction("smooth_l1", reduction)

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        check_same_shape("smooth_l1", pred=pred, target=target)
        return _fv_smooth_l1_loss(pred, target, beta=self.beta, reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"beta={self.beta}, reduction={self.reduction!r}"


@LOSSES.register("giou")
class GIoULoss(nn.Module):
    """Generalized IoU loss ``1 - GIoU`` between paired boxes (Rezatofighi et al., 2019).

    Args:
        reduction: "none" | "mean" | "sum".
        eps: added to the union and enclosing areas against division by zero.

    Forward:
        pred_boxes, target_boxes: (N, 4) XYXY absolute boxes, paired row by row; boxes must be
        well formed (x2 >= x1, y2 >= y1), i.e. decoded boxes, not deltas.
        Returns (N,) for "none" else a scalar (0 for N = 0).
    """

    decoded_boxes = True  # heads give it decoded boxes, not deltas (box_regression_loss)

    def __init__(self, reduction: str = "sum", eps: float = 1e-7):
        super().__init__()
        self.reduction = _check_reduction("giou", reduction)
        self.eps = float(eps)

    def forward(self, pred_boxes: Tensor, target_boxes: Tensor) -> Tensor:
        if pred_boxes.shape != target_boxes.shape or pred_boxes.shape[-1:] != (4,):
            raise ValueError(f"loss 'giou': boxes must both be (N, 4) XYXY, got "
                             f"{tuple(pred_boxes.shape)} and {tuple(target_boxes.shape)}")
        return _fv_giou_loss(pred_boxes, target_boxes, reduction=self.reduction, eps=self.eps)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}, eps={self.eps}"


@LOSSES.register("ce", aliases=("cross_entropy",))
class CrossEntropyLoss(nn.Module):
    """Softmax cross-entropy (``F.cross_entropy``), e.g. the Fast R-CNN K+1-way classifier.

    Args:
        reduction: "none" | "mean" | "sum" ("mean" averages over non-ignored labels).
        ignore_index: label value that contributes nothing.
        label_smoothing: in [0, 1).

    Forward: logits (N, C) float, labels (N,) int64 in [0, C) or ``ignore_index``.
    An empty batch gives 0 (not NaN) with "mean", so an image without samples trains on.
    """

    def __init__(self, reduction: str = "mean", ignore_index: int = -100,
                 label_smoothing: float = 0.0):
        super().__init__()
        self.reduction = _check_reduction("ce", reduction)
        self.ignore_index = int(ignore_index)
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"loss 'ce': label_smoothing must be in [0, 1), got {label_smoothing}")
        self.label_smoothing = float(label_smoothing)

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        if logits.numel() == 0 and self.reduction == "mean":
            return logits.sum() * 0.0
        return F.cross_entropy(logits, labels, reduction=self.reduction,
                               ignore_index=self.ignore_index,
                               label_smoothing=self.label_smoothing)

    def extra_repr(self) -> str:
        return (f"reduction={self.reduction!r}, ignore_index={self.ignore_index}, "
                f"label_smoothing={self.label_smoothing}")
