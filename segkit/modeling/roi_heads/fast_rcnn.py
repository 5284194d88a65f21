"""Fast R-CNN predictor: per-RoI class scores and class-specific box deltas, loss and inference.

Class layout: K foreground classes 0..K-1, softmax over K+1 outputs with background LAST
(index K). Box deltas are class-specific, (R, K*4), in the R-CNN parameterisation of
``segkit.modeling.box_coder.Box2BoxTransform`` (weights (10, 10, 5, 5)).
Boxes are XYXY absolute pixels on the network-input image.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from segkit.layers import batched_nms
from segkit.modeling.box_coder import Box2BoxTransform
from segkit.modeling.losses import box_regression_loss
from segkit.structures import Boxes, Instances

__all__ = ["FastRCNNOutputLayers", "fast_rcnn_losses", "fast_rcnn_inference", "decode_boxes"]


class FastRCNNOutputLayers(nn.Module):
    """Two sibling linear layers on the box-head features (Fast R-CNN / FPN, papers.md section 5).

    Args:
        input_size: length of the box-head feature vector (1024).
        num_classes: K foreground classes.

    Parameters are named ``cls_score`` ((K+1) outputs, background last) and ``bbox_pred``
    (K*4 outputs, 4 per class in class order); the checkpoint converters rely on it.
    """

    def __init__(self, input_size: int, num_classes: int):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"FastRCNNOutputLayers: num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.cls_score = nn.Linear(input_size, num_classes + 1)
        self.bbox_pred = nn.Linear(input_size, num_classes * 4)
        # Small Gaussian init (Detectron/detectron2): the classifier starts near uniform and the
        # regressor near the identity transform so early losses are well scaled.
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.zeros_(self.bbox_pred.bias)

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        """Args:
            x: (R, D) box-head features (or (R, ...) which is flattened).

        Returns:
            scores: (R, K+1) logits, background last.
            deltas: (R, K*4) class-specific box deltas.
        """
        x = torch.flatten(x, start_dim=1)
        return self.cls_score(x), self.bbox_pred(x)


def decode_boxes(transform: Box2BoxTransform, deltas: Tensor, boxes: Tensor) -> Tensor:
    """Apply class-specific deltas to proposals.

    Args:
        transform: the box coder.
        deltas: (R, K*4) deltas.
        boxes: (R, 4) XYXY proposal boxes.

    Returns:
        (R, K, 4) XYXY decoded boxes.
    """
    # apply_deltas broadcasts each proposal over its K delta groups: no (R*K, 4) box copy
    return transform.apply_deltas(deltas, boxes).reshape(boxes.shape[0], deltas.shape[1] // 4, 4)


def fast_rcnn_losses(
    scores: Tensor,
    deltas: Tensor,
    proposal_boxes: Tensor,
    gt_boxes: Tensor,
    gt_classes: Tensor,
    transform: Box2BoxTransform,
    smooth_l1_beta: float = 0.0,
    cls_loss: Optional[nn.Module] = None,
    box_loss: Optional[nn.Module] = None,
) -> dict:
    """Softmax classification + class-specific box regression losses on sampled RoIs.

    Both losses are normalised by the number R of sampled RoIs (not by the foreground count),
    so the box loss weight does not jump with the foreground fraction of a batch.

    Args:
        scores: (R, K+1) logits, background last.
        deltas: (R, K*4) predicted deltas.
        proposal_boxes: (R, 4) XYXY sampled proposals.
        gt_boxes: (R, 4) XYXY matched GT box of each proposal (ignored for background).
        gt_classes: (R,) int64 targets in 0..K (K = background).
        transform: box coder giving the regression targets.
        smooth_l1_beta: smooth-L1 transition point; 0 gives plain L1 (detectron2 default),
            torchvision uses 1/9. Used when ``box_loss`` is None.
        cls_loss: optional LOSSES module called as ``(scores (R, K+1), gt_classes (R,))``;
            reduction "mean" is used as is, "sum" is divided by R. None: mean cross-entropy.
        box_loss: optional LOSSES module with reduction "sum" (divided by R) on the foreground
            RoIs, on deltas (``smooth_l1``) or on decoded boxes (``giou``); None: smooth-L1 /
            L1 with ``smooth_l1_beta``.

    Returns:
        ``{"loss_cls": scalar, "loss_box_reg": scalar}``.
    """
    num = scores.shape[0]
    if num == 0:
        zero = scores.sum() * 0.0 + deltas.sum() * 0.0  # keep the graph for DDP
        return {"loss_cls": zero, "loss_box_reg": zero}
    num_classes = scores.shape[1] - 1
    if cls_loss is None:
        loss_cls = F.cross_entropy(scores, gt_classes, reduction="mean")
    else:
        loss_cls = cls_loss(scores, gt_classes)
        if getattr(cls_loss, "reduction", "mean") == "sum":
            loss_cls = loss_cls / num

    fg = torch.nonzero((gt_classes >= 0) & (gt_classes < num_classes), as_tuple=True)[0]
    pred = deltas.reshape(num, -1, 4)[fg, gt_classes[fg]]
    if box_loss is not None:
        loss_box = box_regression_loss(box_loss, transform, pred, proposal_boxes[fg], gt_boxes[fg])
        return {"loss_cls": loss_cls, "loss_box_reg": loss_box / num}
    target = transform.get_deltas(proposal_boxes[fg], gt_boxes[fg])
    if smooth_l1_beta > 0:
        loss_box = F.smooth_l1_loss(pred, target, beta=smooth_l1_beta, reduction="sum")
    else:
        loss_box = F.l1_loss(pred, target, reduction="sum")
    # An empty foreground set sums to 0 and still reaches ``deltas`` through the indexing,
    # so every parameter gets a (zero) gradient, as DDP requires.
    return {"loss_cls": loss_cls, "loss_box_reg": loss_box / num}


def fast_rcnn_inference(
    scores: Tensor,
    deltas: Tensor,
    proposal_boxes: List[Tensor],
    image_sizes: List[Tuple[int, int]],
    transform: Box2BoxTransform,
    score_thresh: float = 0.05,
    nms_thresh: float = 0.5,
    detections_per_image: int = 100,
    min_box_size: float = 1e-2,
) -> List[Instances]:
    """Turn per-RoI predictions into final detections (papers.md section 7, "Inference").

    Order, identical to torchvision's ``RoIHeads.postprocess_detections`` so that converted
    torchvision models reproduce its detections: softmax, decode every class, clip to the
    image, drop the background column, flatten to (RoI, class) candidates, keep scores >
    ``score_thresh``, drop boxes with a side < ``min_box_size``, class-aware NMS, keep the top
    ``detections_per_image`` by score.

    Args:
        scores: (sum R_i, K+1) logits of all images, background last.
        deltas: (sum R_i, K*4) deltas.
        proposal_boxes: per image (R_i, 4) XYXY proposals.
        image_sizes: per image (h, w) network-input size (for clipping).
        transform: box coder.
        score_thresh: minimum class probability.
        nms_thresh: IoU threshold of the per-class NMS.
        detections_per_image: maximum detections kept per image.
        min_box_size: minimum box side in pixels (0 keeps every clipped box).

    Returns:
        per image ``Instances(image_size, pred_boxes: Boxes (N, 4), scores: (N,),
        pred_classes: (N,) int64)`` sorted by decreasing score.
    """
    counts = [len(b) for b in proposal_boxes]
    probs = F.softmax(scores, dim=-1)
    boxes = decode_boxes(transform, deltas, torch.cat(proposal_boxes, dim=0))
    results = []
    for probs_i, boxes_i, size in zip(probs.split(counts), boxes.split(counts), image_sizes):
        num_classes = boxes_i.shape[1]
        boxes_i = Boxes(boxes_i.reshape(-1, 4)).clip(size).tensor.reshape(-1, num_classes, 4)
        probs_i = probs_i[:, :num_classes]  # background is the last column
        labels = torch.arange(num_classes, device=probs_i.device).expand_as(probs_i)
        boxes_i, probs_i, labels = boxes_i.reshape(-1, 4), probs_i.reshape(-1), labels.reshape(-1)

        keep = torch.nonzero(probs_i > score_thresh, as_tuple=True)[0]
        boxes_i, probs_i, labels = boxes_i[keep], probs_i[keep], labels[keep]
        wh = boxes_i[:, 2:] - boxes_i[:, :2]
        keep = torch.nonzero((wh >= min_box_size).all(dim=1), as_tuple=True)[0]
        boxes_i, probs_i, labels = boxes_i[keep], probs_i[keep], labels[keep]

        keep = batched_nms(boxes_i, probs_i, labels, nms_thresh)[:detections_per_image]
        results.append(Instances(tuple(size), pred_boxes=Boxes(boxes_i[keep]),
                                 scores=probs_i[keep], pred_classes=labels[keep]))
    return results
