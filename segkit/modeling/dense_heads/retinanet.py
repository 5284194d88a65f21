"""RetinaNet's dense head: anchors, class and box subnets, focal-loss training, inference
(papers.md section 6).

Every location of every pyramid level (P3-P7) carries A anchors (3 scales x 3 ratios). Two
subnets, each 4 x (3x3 conv + ReLU) followed by a 3x3 predictor, are shared across levels: the
class subnet predicts K sigmoid logits per anchor, the box subnet 4 class-agnostic deltas.
Training labels every anchor by IoU (>= 0.5 foreground, < 0.4 background, in between ignored),
applies the classification loss to all non-ignored anchors and the box loss to the foreground
ones, both summed and divided by the number of foreground anchors. Inference keeps, per level,
the top 1000 (anchor, class) pairs above a 0.05 score, decodes them, and runs class-wise NMS.
"""
from __future__ import annotations

import math
import re
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from segkit.layers import Conv2d, ShapeSpec, batched_nms, cat, get_norm
from segkit.modeling.anchors import flatten_anchor_outputs, shared_head_anchors
from segkit.modeling.box_coder import Box2BoxTransform
from segkit.modeling.losses import (SigmoidFocalLoss, SmoothL1Loss, box_regression_loss,
                                    check_reduction)
from segkit.modeling.matcher import Matcher
from segkit.registry import HEADS, LOSSES
from segkit.structures import Boxes, ImageList, Instances, pairwise_iou
from segkit.utils.comm import global_mean_count

__all__ = ["RetinaNetHead", "convert_torchvision_retinanet_head"]

_PAPER_SCALES = (1.0, 2 ** (1 / 3), 2 ** (2 / 3))


def _subnet(in_channels: int, conv_dim: int, num_convs: int, norm: str) -> nn.ModuleList:
    """num_convs x (3x3 conv [+ norm] + ReLU); keys ``{i}.weight`` / ``{i}.norm.*``."""
    layers = []
    for i in range(num_convs):
        layers.append(Conv2d(in_channels if i == 0 else conv_dim, conv_dim, 3, padding=1,
                             bias=not norm, norm=get_norm(norm, conv_dim), activation=F.relu))
    return nn.ModuleList(layers)


@HEADS.register("retinanet", children={"cls_loss": LOSSES, "box_loss": LOSSES})
class RetinaNetHead(nn.Module):
    """RetinaNet head: ``(images, features, gt) -> (detections, losses)``.

    Args:
        input_shape: backbone output shapes (runtime, from ``backbone.output_shape()``).
        num_classes: K foreground classes (contiguous ids 0..K-1, no background logit).
        in_features: pyramid levels used, finest first (P3-P7 in the paper).
        num_convs: 3x3 conv + ReLU layers in each subnet before its predictor (4).
        conv_dim: channels of the subnet convs; None = the input channels (256 in the paper).
        norm: norm after each subnet conv ("" = none, the paper; "gn", "bn"); the norm layers
            are not shared across levels, only the convs (as in the paper, which has none).
        prior_prob: pi, the initial foreground probability of every anchor: the class
            predictor's bias starts at -log((1 - pi) / pi) so that the ~100k background anchors
            do not swamp the first iterations (section 6, "Init").
        anchor_sizes: base anchor sizes per level (sqrt area, input pixels): 32..512 on P3-P7.
        anchor_scales: multipliers of every base size; the paper's 3 octave scales
            {2^0, 2^(1/3), 2^(2/3)} by default. ``[1.0]`` uses ``anchor_sizes`` as they are
            (torchvision lists its int-truncated sizes explicitly).
        aspect_ratios: anchor height/width ratios, one list shared by all levels or one per
            level.
        anchor_offset: anchor centre offset inside a cell (see DefaultAnchorGenerator).
        anchor_round_base: round the base anchors like torchvision (needed for parity).
        anchor_stride_from_image: each level's stride = padded size // level size, as
            torchvision; False uses the backbone's nominal strides.
        box_reg_weights: (wx, wy, ww, wh) of the anchor -> box parameterisation.
        iou_thresholds, iou_labels: anchor labelling (Matcher): [0, 0.4) background, [0.4,
            0.5) ignored, >= 0.5 foreground.
        allow_low_quality_matches: also make foreground the anchors with the best IoU of
            each GT (torchvision and Detectron2 do; Detectron's RetinaNet did too).
        cls_loss: built classification loss over (logits, 0/1 targets) with reduction "sum";
            default ``focal`` (alpha 0.25, gamma 2).
        box_loss: built box loss with reduction "sum": on deltas (``smooth_l1``, default beta
            0.1) or on decoded XYXY boxes (``giou``).
        score_thresh_test: minimum sigmoid score of a kept (anchor, class) pair (0.05).
        topk_candidates_test: pairs kept PER LEVEL after the threshold, best first (1000).
        nms_thresh_test: IoU threshold of the class-wise NMS (0.5).
        detections_per_image: detections kept per image after NMS (100).
    """

    def __init__(self, input_shape: Dict[str, ShapeSpec], num_classes: int,
                 in_features: Sequence[str] = ("p3", "p4", "p5", "p6", "p7"),
                 num_convs: int = 4, conv_dim: Optional[int] = None, norm: str = "",
                 prior_prob: float = 0.01,
                 anchor_sizes: Sequence[Sequence[float]] = ((32,), (64,), (128,), (256,), (512,)),
                 anchor_scales: Sequence[float] = _PAPER_SCALES,
                 aspect_ratios: Sequence[Sequence[float]] = ((0.5, 1.0, 2.0),),
                 anchor_offset: float = 0.0, anchor_round_base: bool = False,
                 anchor_stride_from_image: bool = False,
                 box_reg_weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
                 iou_thresholds: Sequence[float] = (0.4, 0.5),
                 iou_labels: Sequence[int] = (0, -1, 1),
                 allow_low_quality_matches: bool = True,
                 cls_loss: Optional[nn.Module] = None, box_loss: Optional[nn.Module] = None,
                 score_thresh_test: float = 0.05, topk_candidates_test: int = 1000,
                 nms_thresh_test: float = 0.5, detections_per_image: int = 100):
        super().__init__()
        if not isinstance(num_classes, int) or num_classes <= 0:
            raise ValueError(f"retinanet: num_classes must be a positive int, got {num_classes!r}")
        if not 0.0 < prior_prob < 1.0:
            raise ValueError(f"retinanet: prior_prob must be in (0, 1), got {prior_prob}")
        self.in_features, self.num_classes = list(in_features), num_classes
        # section 6: each base size times the octave scales 2^0, 2^(1/3), 2^(2/3)
        sizes = [[float(s) * float(m) for s in level for m in anchor_scales]
                 for level in anchor_sizes]
        self.anchor_generator, in_channels, self.num_anchors = shared_head_anchors(
            "retinanet", input_shape, self.in_features, sizes, aspect_ratios, anchor_offset,
            anchor_round_base, anchor_stride_from_image)

        conv_dim = int(conv_dim or in_channels)
        self.cls_subnet = _subnet(in_channels, conv_dim, num_convs, norm)
        self.bbox_subnet = _subnet(in_channels, conv_dim, num_convs, norm)
        last = conv_dim if num_convs > 0 else in_channels
        self.cls_score = nn.Conv2d(last, self.num_anchors * num_classes, 3, padding=1)
        self.bbox_pred = nn.Conv2d(last, self.num_anchors * 4, 3, padding=1)
        # Section 6, "Init": Gaussian sigma = 0.01 and zero bias everywhere, except the prior.
        for layer in [*self.cls_subnet, *self.bbox_subnet, self.cls_score, self.bbox_pred]:
            nn.init.normal_(layer.weight, std=0.01)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
        nn.init.constant_(self.cls_score.bias, -math.log((1 - prior_prob) / prior_prob))

        self.box2box_transform = Box2BoxTransform(box_reg_weights)
        self.anchor_matcher = Matcher(iou_thresholds, iou_labels,
                                      allow_low_quality_matches=allow_low_quality_matches)
        self.cls_loss = cls_loss if cls_loss is not None else SigmoidFocalLoss(0.25, 2.0)
        self.box_loss = box_loss if box_loss is not None else SmoothL1Loss(beta=0.1)
        # the head divides the sums by the number of foreground anchors
        check_reduction(self.cls_loss, ("sum",), "model.head.cls_loss")
        check_reduction(self.box_loss, ("sum",), "model.head.box_loss")
        self.score_thresh = float(score_thresh_test)
        self.topk_candidates = int(topk_candidates_test)
        self.nms_thresh = float(nms_thresh_test)
        self.detections_per_image = int(detections_per_image)

    # ------------------------------------------------------------------ forward
    def predict(self, features: Sequence[Tensor]) -> Tuple[List[Tensor], List[Tensor]]:
        """Run both subnets on every level.

        Args:
            features: per level a (N, C, H_l, W_l) map.

        Returns:
            logits: per level (N, H_l * W_l * A, K); deltas: per level (N, H_l * W_l * A, 4),
            in the (H, W, A) order of the anchors.
        """
        logits, deltas = [], []
        for x in features:
            c, b = x, x
            for layer in self.cls_subnet:
                c = layer(c)
            for layer in self.bbox_subnet:
                b = layer(b)
            logits.append(flatten_anchor_outputs(self.cls_score(c), self.num_classes))
            deltas.append(flatten_anchor_outputs(self.bbox_pred(b), 4))
        return logits, deltas

    def forward(self, images: ImageList, features: Dict[str, Tensor],
                gt_instances: Optional[List[Instances]] = None
                ) -> Tuple[List[Instances], Dict[str, Tensor]]:
        """Detect (eval) or compute the losses (training).

        Args:
            images: the padded batch; ``image_sizes`` bound the clipping.
            features: backbone outputs {name: (N, C, H_l, W_l)}.
            gt_instances: training only; per image ``gt_boxes: Boxes`` (M_i, 4) XYXY and
                ``gt_classes`` (M_i,) int64 in [0, K); M_i may be 0.

        Returns:
            detections: eval only (else []); per image ``Instances`` at network-input
                resolution with ``pred_boxes: Boxes`` (D, 4) XYXY, ``scores`` (D,) and
                ``pred_classes`` (D,) int64, sorted by decreasing score.
            losses: training only (else {}); ``{"loss_cls", "loss_box_reg"}`` scalars.
        """
        feats = [features[f] for f in self.in_features]
        anchors = self.anchor_generator(feats, tuple(images.tensor.shape[-2:]))
        logits, deltas = self.predict(feats)
        if self.training:
            if gt_instances is None:
                raise ValueError("retinanet: gt_instances are required in training mode")
            return [], self.losses(anchors, logits, deltas, gt_instances)
        return self.inference(anchors, logits, deltas, images.image_sizes), {}

    # ------------------------------------------------------------------ training
    @torch.no_grad()
    def label_anchors(self, anchors: Tensor, gt_instances: List[Instances]
                      ) -> Tuple[Tensor, Tensor]:
        """Assign every anchor a class target and a GT box.

        Args:
            anchors: (R, 4) XYXY anchors of all levels.
            gt_instances: per image ``gt_boxes`` (M_i, 4) and ``gt_classes`` (M_i,).

        Returns:
            labels: (N, R) int64: the GT class in [0, K) for foreground, K for background,
                -1 for ignored anchors.
            matched_boxes: (N, R, 4) GT box of every anchor (zeros when M_i == 0).
        """
        labels, matched = [], []
        for inst in gt_instances:
            gt_boxes = inst.gt_boxes.tensor.to(anchors.device)
            matches, match_labels = self.anchor_matcher(pairwise_iou(gt_boxes, anchors))
            if len(gt_boxes):
                classes = inst.gt_classes.to(anchors.device)[matches].clone()
                boxes = gt_boxes[matches]
            else:
                classes = torch.zeros_like(matches)
                boxes = torch.zeros_like(anchors)
            classes[match_labels == 0] = self.num_classes
            classes[match_labels == -1] = -1
            labels.append(classes)
            matched.append(boxes)
        return torch.stack(labels), torch.stack(matched)

    def losses(self, anchors: List[Tensor], logits: List[Tensor], deltas: List[Tensor],
               gt_instances: List[Instances]) -> Dict[str, Tensor]:
        """Classification loss over all non-ignored anchors, box loss over the foreground.

        Both are sums divided by the number of foreground anchors in the batch (at least 1),
        the paper's normaliser (section 6): the ~100k easy negatives contribute little to the
        focal loss, so the count of anchors that matter is the right scale.

        Args:
            anchors: per level (R_l, 4); logits: per level (N, R_l, K); deltas: per level
            (N, R_l, 4); gt_instances: N Instances with ``gt_boxes`` and ``gt_classes``.
        """
        if len(gt_instances) != logits[0].shape[0]:
            raise ValueError(f"retinanet: got {len(gt_instances)} gt_instances for a batch of "
                             f"{logits[0].shape[0]} images")
        all_anchors = cat(anchors)
        labels, matched = self.label_anchors(all_anchors, gt_instances)
        logits_all, deltas_all = cat(logits, dim=1), cat(deltas, dim=1)
        valid = labels >= 0
        fg = valid & (labels != self.num_classes)
        # the batch's foreground count over all processes (segkit.utils.comm): N processes
        # with B images each then train exactly like one process with N*B images
        normalizer = max(1.0, global_mean_count(fg.sum()))

        # One-hot over K + 1 columns, then drop the background column: background = all zeros.
        targets = F.one_hot(labels[valid], self.num_classes + 1)[:, :-1].to(logits_all.dtype)
        loss_cls = self.cls_loss(logits_all[valid], targets)

        fg_anchors = all_anchors[None].expand_as(matched)[fg]
        # deltas for smooth-L1, decoded boxes for GIoU
        loss_box = box_regression_loss(self.box_loss, self.box2box_transform, deltas_all[fg],
                                       fg_anchors, matched[fg])
        return {"loss_cls": loss_cls / normalizer, "loss_box_reg": loss_box / normalizer}

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def inference(self, anchors: List[Tensor], logits: List[Tensor], deltas: List[Tensor],
                  image_sizes: List[Tuple[int, int]]) -> List[Instances]:
        """Per image: per-level threshold + top-k, decode, clip, class-wise NMS, top-D.

        Args:
            anchors: per level (R_l, 4); logits: per level (N, R_l, K); deltas: per level
            (N, R_l, 4); image_sizes: N unpadded (h, w).
        """
        results = []
        for i, image_size in enumerate(image_sizes):
            boxes_lv, scores_lv, classes_lv = [], [], []
            for anchors_l, logits_l, deltas_l in zip(anchors, logits, deltas):
                scores = logits_l[i].sigmoid().flatten()  # (R_l * K,), anchor-major
                candidates = torch.nonzero(scores > self.score_thresh).squeeze(1)
                scores = scores[candidates]
                k = min(self.topk_candidates, scores.numel())
                scores, order = scores.topk(k)
                candidates = candidates[order]
                anchor_idx = torch.div(candidates, self.num_classes, rounding_mode="floor")
                boxes_lv.append(self.box2box_transform.apply_deltas(
                    deltas_l[i][anchor_idx], anchors_l[anchor_idx]))
                scores_lv.append(scores)
                classes_lv.append(candidates % self.num_classes)
            boxes_t, scores, classes = cat(boxes_lv), cat(scores_lv), cat(classes_lv)
            finite = torch.isfinite(boxes_t).all(dim=1)
            if not finite.all():  # a diverged regressor must not crash evaluation
                boxes_t, scores, classes = boxes_t[finite], scores[finite], classes[finite]
            boxes = Boxes(boxes_t).clip(image_size)
            keep = batched_nms(boxes.tensor, scores, classes, self.nms_thresh)
            keep = keep[: self.detections_per_image]
            results.append(Instances(image_size, pred_boxes=boxes[keep], scores=scores[keep],
                                     pred_classes=classes[keep]))
        return results


# torchvision >= 0.13 names subnet convs conv.{i}.0 (Conv2dNormActivation); older files conv.{2i}
_TV_KEY = re.compile(r"^(classification_head|regression_head)\."
                     r"(?:conv\.(\d+)(\.0)?|(cls_logits|bbox_reg))\.(weight|bias)$")


def convert_torchvision_retinanet_head(state_dict: Dict[str, Tensor], prefix: str = "head.",
                                       out_prefix: str = "head.",
                                       drop_first_class: bool = True) -> Dict[str, Tensor]:
    """Rename torchvision ``RetinaNetHead`` (v1, no norm) weights into :class:`RetinaNetHead`.

    ``classification_head.conv.{i}.0`` -> ``cls_subnet.{i}``, ``classification_head.cls_logits``
    -> ``cls_score``, ``regression_head.conv.{i}.0`` -> ``bbox_subnet.{i}``,
    ``regression_head.bbox_reg`` -> ``bbox_pred``; pre-0.13 ``conv.{2i}`` names too.

    torchvision's COCO RetinaNet has 91 sigmoid outputs per anchor whose index 0 is the
    (never positive) background label; ``drop_first_class`` removes it from every anchor's
    block of the class predictor, so segkit class c = torchvision label c + 1.

    Args:
        state_dict: torchvision weights (a full detection model or just its ``head``).
        prefix: prefix of the head keys in ``state_dict``; other keys are ignored.
        out_prefix: prepended to the new keys (``"head."`` suits :class:`OneStageDetector`).
        drop_first_class: drop torchvision's label 0 from the class predictor.

    Raises:
        ValueError: a key under ``prefix`` that is not a v1 torchvision RetinaNet head
            parameter (e.g. the v2 head's GroupNorm layers).
    """
    out: Dict[str, Tensor] = {}
    for full_key, value in state_dict.items():
        if not full_key.startswith(prefix):
            continue
        m = _TV_KEY.match(full_key[len(prefix):])
        if m is None:
            raise ValueError(f"convert_torchvision_retinanet_head: unexpected key {full_key!r}; "
                             f"expected {prefix}classification_head/regression_head conv.{{i}}.0 / "
                             f"cls_logits / bbox_reg weights (a v1 head without norm layers)")
        branch, idx, new_style, predictor, param = m.groups()
        if predictor is not None:
            name = "cls_score" if predictor == "cls_logits" else "bbox_pred"
        else:
            i = int(idx) if new_style else int(idx) // 2
            if not new_style and int(idx) % 2:
                raise ValueError(f"convert_torchvision_retinanet_head: {full_key!r} is a ReLU slot "
                                 f"of the pre-0.13 layout and cannot hold weights")
            name = f"{'cls' if branch == 'classification_head' else 'bbox'}_subnet.{i}"
        out[f"{out_prefix}{name}.{param}"] = value
    if drop_first_class:
        w_key, b_key = f"{out_prefix}cls_score.weight", f"{out_prefix}cls_score.bias"
        reg_key = f"{out_prefix}bbox_pred.bias"
        if w_key in out and reg_key in out:
            num_anchors = out[reg_key].shape[0] // 4
            for key in (w_key, b_key):
                t = out[key]
                t = t.reshape(num_anchors, -1, *t.shape[1:])[:, 1:]
                out[key] = t.reshape(-1, *t.shape[2:])
    return out
