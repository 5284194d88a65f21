"""Region Proposal Network on a feature pyramid (papers.md section 5, "RPN on FPN").

Every location of every level carries A anchors (one size per level, 3 aspect ratios); a shared
head predicts an objectness logit and 4 box deltas per anchor. Training labels anchors with
IoU thresholds (positive > 0.7 or best for a GT, negative < 0.3), samples 256 per image at up
to 1:1 and applies BCE + smooth-L1/L1 (either can be replaced by a LOSSES entry through the
``cls_loss`` / ``box_loss`` config nodes). Inference keeps the top-k anchors of each level,
decodes and clips them, and runs NMS per level before keeping the best proposals of the image.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from segkit.layers import ShapeSpec, batched_nms, cat
from segkit.modeling.anchors import flatten_anchor_outputs, shared_head_anchors
from segkit.modeling.box_coder import Box2BoxTransform
from segkit.modeling.losses import SmoothL1Loss, box_regression_loss, check_reduction
from segkit.modeling.matcher import Matcher
from segkit.modeling.sampler import subsample_labels
from segkit.registry import LOSSES, PROPOSAL_GENERATORS, Child
from segkit.structures import Boxes, ImageList, Instances, pairwise_iou

from .rpn_head import StandardRPNHead

__all__ = ["RPN"]


@PROPOSAL_GENERATORS.register("rpn", children={
    "box_loss": Child(LOSSES, optional=True),
    "cls_loss": Child(LOSSES, optional=True),
})
class RPN(nn.Module):
    """Region Proposal Network: ``(images, features, gt) -> (proposals, losses)``.

    Args:
        input_shape: backbone output shapes (runtime, from ``backbone.output_shape()``).
        in_features: feature maps used, finest first (one anchor size per map).
        anchor_sizes: anchor sizes per level (sqrt area in input pixels); FPN: 32..512.
        aspect_ratios: anchor height/width ratios, one list for all levels or one per level.
        anchor_offset: anchor centre offset inside a cell (see DefaultAnchorGenerator).
        anchor_round_base: round the base anchors like torchvision (needed for parity).
        anchor_stride_from_image: derive each level's stride as padded_size // level_size like
            torchvision (needed for parity when a level's size was rounded up, e.g. P6 of a
            padded size that is not a multiple of 64); False uses the backbone's strides.
        box_reg_weights: (wx, wy, ww, wh) of the anchor -> box parameterisation.
        iou_thresholds, iou_labels: anchor labelling (Matcher); low-quality matches are on.
        batch_size_per_image, positive_fraction: anchors sampled per image for the losses.
        pre_nms_topk_train, pre_nms_topk_test: anchors kept PER LEVEL (by logit) before NMS.
        post_nms_topk_train, post_nms_topk_test: proposals kept PER IMAGE after NMS.
        nms_thresh: IoU threshold of the per-level NMS.
        min_box_size: proposals must be wider and taller than this (pixels) after clipping;
            0 removes only empty boxes (torchvision uses 1e-3).
        score_thresh: proposals need sigmoid(objectness) >= this (torchvision's score_thresh).
        loss_weight_cls, loss_weight_loc: multipliers of ``loss_rpn_cls`` / ``loss_rpn_loc``.
        smooth_l1_beta: beta of the smooth-L1 box loss; 0 means L1 (used when ``box_loss`` is
            not given).
        box_reg_loss: "smooth_l1" or "l1" (used when ``box_loss`` is not given).
        box_loss: optional LOSSES module (config node, e.g. ``{name: giou}`` or
            ``{name: smooth_l1, beta: 0.111}``) replacing ``smooth_l1_beta``/``box_reg_loss``;
            ``giou`` is applied to decoded boxes. Must use ``reduction: sum``.
        cls_loss: optional LOSSES module for the objectness, called as
            ``(logits (S,), targets (S,) 0/1)`` on the S sampled anchors, e.g. ``{name: focal}``;
            ``None`` is binary cross-entropy. Must use ``reduction: sum``.
        Both losses are divided by ``batch_size_per_image * N`` (see :meth:`losses`).
    """

    def __init__(self, input_shape: Dict[str, ShapeSpec],
                 in_features: Sequence[str] = ("p2", "p3", "p4", "p5", "p6"),
                 anchor_sizes: Sequence[Sequence[float]] = ((32,), (64,), (128,), (256,), (512,)),
                 aspect_ratios: Sequence[Sequence[float]] = ((0.5, 1.0, 2.0),),
                 anchor_offset: float = 0.0, anchor_round_base: bool = False,
                 anchor_stride_from_image: bool = False,
                 box_reg_weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
                 iou_thresholds: Sequence[float] = (0.3, 0.7),
                 iou_labels: Sequence[int] = (0, -1, 1),
                 batch_size_per_image: int = 256, positive_fraction: float = 0.5,
                 pre_nms_topk_train: int = 2000, pre_nms_topk_test: int = 1000,
                 post_nms_topk_train: int = 1000, post_nms_topk_test: int = 1000,
                 nms_thresh: float = 0.7, min_box_size: float = 0.0, score_thresh: float = 0.0,
                 loss_weight_cls: float = 1.0, loss_weight_loc: float = 1.0,
                 smooth_l1_beta: float = 0.0, box_reg_loss: str = "smooth_l1",
                 box_loss: Optional[nn.Module] = None, cls_loss: Optional[nn.Module] = None):
        super().__init__()
        if box_reg_loss not in ("smooth_l1", "l1"):
            raise ValueError(f"rpn: box_reg_loss must be 'smooth_l1' or 'l1', got {box_reg_loss!r}")
        self.in_features = list(in_features)
        self.anchor_generator, in_channels, num_anchors = shared_head_anchors(
            "rpn", input_shape, self.in_features, anchor_sizes, aspect_ratios, anchor_offset,
            anchor_round_base, anchor_stride_from_image)
        self.rpn_head = StandardRPNHead(in_channels, num_anchors)
        self.box2box_transform = Box2BoxTransform(box_reg_weights)
        self.anchor_matcher = Matcher(iou_thresholds, iou_labels, allow_low_quality_matches=True)
        self.batch_size_per_image, self.positive_fraction = batch_size_per_image, positive_fraction
        self.pre_nms_topk = {True: pre_nms_topk_train, False: pre_nms_topk_test}
        self.post_nms_topk = {True: post_nms_topk_train, False: post_nms_topk_test}
        self.nms_thresh, self.min_box_size = nms_thresh, min_box_size
        self.score_thresh = score_thresh
        self.loss_weight = {"loss_rpn_cls": loss_weight_cls, "loss_rpn_loc": loss_weight_loc}
        self.smooth_l1_beta = 0.0 if box_reg_loss == "l1" else float(smooth_l1_beta)
        if box_loss is not None and (smooth_l1_beta != 0.0 or box_reg_loss != "smooth_l1"):
            raise ValueError("rpn: set either box_loss or the legacy smooth_l1_beta/box_reg_loss, "
                             "not both")
        check_reduction(box_loss, ("sum",), "model.proposal_generator.box_loss")
        check_reduction(cls_loss, ("sum",), "model.proposal_generator.cls_loss")
        # Default: the legacy smooth-L1/L1 on deltas, summed (identical numbers).
        self.box_loss = (box_loss if box_loss is not None
                         else SmoothL1Loss(self.smooth_l1_beta, reduction="sum"))
        self.cls_loss = cls_loss  # None: BCE on the sampled anchors

    def forward(self, images: ImageList, features: Dict[str, Tensor],
                gt_instances: Optional[List[Instances]] = None
                ) -> Tuple[List[Instances], Dict[str, Tensor]]:
        """Predict proposals (and losses in training mode).

        Args:
            images: the padded batch; ``image_sizes`` bound the clipping.
            features: backbone outputs {name: (N, C, H_l, W_l)}.
            gt_instances: training only; per image ``gt_boxes: Boxes`` (M_i, 4) XYXY, M_i may
                be 0 (crowd boxes were dropped by the mapper).

        Returns:
            proposals: per image ``Instances`` with ``proposal_boxes: Boxes`` (P, 4) XYXY and
                ``objectness_logits`` (P,), sorted by decreasing score (detached).
            losses: {"loss_rpn_cls", "loss_rpn_loc"} scalars in training, else {}.
        """
        feats = [features[f] for f in self.in_features]
        anchors = self.anchor_generator(feats, tuple(images.tensor.shape[-2:]))
        logits, deltas = self.rpn_head(feats)
        # (N, A, H, W) -> (N, H*W*A) and (N, A*4, H, W) -> (N, H*W*A, 4), matching the
        # (H, W, A) anchor order.
        logits = [flatten_anchor_outputs(x, 1)[..., 0] for x in logits]
        deltas = [flatten_anchor_outputs(x, 4) for x in deltas]
        losses: Dict[str, Tensor] = {}
        if self.training:
            if gt_instances is None:
                raise ValueError("rpn: gt_instances are required in training mode")
            losses = self.losses(anchors, logits, deltas, gt_instances)
        with torch.no_grad():
            proposals = self.find_top_proposals(
                anchors, [x.detach() for x in logits], [x.detach() for x in deltas],
                images.image_sizes)
        return proposals, losses

    @torch.no_grad()
    def label_anchors(self, anchors: Tensor, gt_instances: List[Instances]
                      ) -> Tuple[Tensor, Tensor]:
        """Match anchors to GT and sample the training batch of every image.

        Args:
            anchors: (R, 4) XYXY anchors of all levels.
            gt_instances: per image ``gt_boxes`` (M_i, 4).

        Returns:
            labels: (N, R) int64, 1 = sampled positive, 0 = sampled negative, -1 = unused.
            matched_boxes: (N, R, 4) GT box of every anchor (zeros when M_i == 0).
        """
        labels, matched = [], []
        for inst in gt_instances:
            gt_boxes = inst.gt_boxes.tensor.to(anchors.device)
            matches, match_labels = self.anchor_matcher(pairwise_iou(gt_boxes, anchors))
            # Sampling happens after matching, per image, with the same randperm calls as
            # torchvision's sampler, so a fixed seed reproduces its mini-batch.
            pos, neg = subsample_labels(match_labels, self.batch_size_per_image,
                                        self.positive_fraction, 0)
            sampled = torch.full_like(matches, -1)
            sampled[pos], sampled[neg] = 1, 0
            labels.append(sampled)
            matched.append(gt_boxes[matches] if len(gt_boxes) else torch.zeros_like(anchors))
        return torch.stack(labels), torch.stack(matched)

    def losses(self, anchors: List[Tensor], logits: List[Tensor], deltas: List[Tensor],
               gt_instances: List[Instances]) -> Dict[str, Tensor]:
        """Objectness BCE on sampled anchors and box regression on sampled positives.

        Both are summed and divided by ``batch_size_per_image * N`` (the nominal number of
        sampled anchors, as in Detectron), so an image with no GT gives a finite cls loss and
        a zero box loss.

        Args:
            anchors: per level (R_l, 4); logits: per level (N, R_l); deltas: per level
            (N, R_l, 4); gt_instances: N Instances with ``gt_boxes``.
        """
        if len(gt_instances) != logits[0].shape[0]:
            raise ValueError(f"rpn: got {len(gt_instances)} gt_instances for a batch of "
                             f"{logits[0].shape[0]} images")
        all_anchors = cat(anchors)
        labels, matched = self.label_anchors(all_anchors, gt_instances)
        logits_all, deltas_all = cat(logits, dim=1), cat(deltas, dim=1)
        pos = labels == 1
        valid = labels >= 0
        loss_loc = box_regression_loss(self.box_loss, self.box2box_transform, deltas_all[pos],
                                       all_anchors[None].expand_as(matched)[pos], matched[pos])
        cls_targets = labels[valid].to(logits_all.dtype)
        if self.cls_loss is None:
            loss_cls = F.binary_cross_entropy_with_logits(logits_all[valid], cls_targets,
                                                          reduction="sum")
        else:
            loss_cls = self.cls_loss(logits_all[valid], cls_targets)
        normalizer = self.batch_size_per_image * len(gt_instances)
        return {"loss_rpn_cls": loss_cls * (self.loss_weight["loss_rpn_cls"] / normalizer),
                "loss_rpn_loc": loss_loc * (self.loss_weight["loss_rpn_loc"] / normalizer)}

    def find_top_proposals(self, anchors: List[Tensor], logits: List[Tensor],
                           deltas: List[Tensor], image_sizes: List[Tuple[int, int]]
                           ) -> List[Instances]:
        """Per-level top-k, decode, clip, drop small/low-score boxes, per-level NMS, top-k.

        Args:
            anchors: per level (R_l, 4); logits: per level (N, R_l); deltas: per level
                (N, R_l, 4); image_sizes: N unpadded (h, w).

        Returns:
            Per image ``Instances`` (see :meth:`forward`).
        """
        num_images = logits[0].shape[0]
        batch_idx = torch.arange(num_images, device=logits[0].device)[:, None]
        pre_topk, post_topk = self.pre_nms_topk[self.training], self.post_nms_topk[self.training]
        boxes_lv, scores_lv, level_ids = [], [], []
        for level, (anchors_l, logits_l, deltas_l) in enumerate(zip(anchors, logits, deltas)):
            k = min(pre_topk, logits_l.shape[1])
            # Top-k on logits before decoding: only k boxes per level are ever decoded.
            scores, idx = logits_l.topk(k, dim=1)
            boxes = self.box2box_transform.apply_deltas(
                deltas_l[batch_idx, idx].reshape(-1, 4), anchors_l[idx].reshape(-1, 4))
            boxes_lv.append(boxes.view(num_images, k, 4))
            scores_lv.append(scores)
            level_ids.append(torch.full((k,), level, dtype=torch.int64, device=scores.device))
        boxes_all, scores_all, level_ids = cat(boxes_lv, 1), cat(scores_lv, 1), cat(level_ids)

        results = []
        for boxes_t, scores, image_size in zip(boxes_all, scores_all, image_sizes):
            levels = level_ids
            finite = torch.isfinite(boxes_t).all(dim=1) & torch.isfinite(scores)
            if not finite.all():
                if self.training:
                    raise FloatingPointError("rpn: predicted boxes or logits are not finite "
                                             "during training (diverged?)")
                boxes_t, scores, levels = boxes_t[finite], scores[finite], levels[finite]
            boxes = Boxes(boxes_t).clip(image_size)
            keep = boxes.nonempty(threshold=self.min_box_size)
            if self.score_thresh > 0:
                keep &= torch.sigmoid(scores) >= self.score_thresh
            boxes, scores, levels = boxes[keep], scores[keep], levels[keep]
            # NMS per level (batched by level id), as torchvision and Detectron do for FPN.
            keep = batched_nms(boxes.tensor, scores, levels, self.nms_thresh)[:post_topk]
            results.append(Instances(image_size, proposal_boxes=boxes[keep],
                                     objectness_logits=scores[keep]))
        return results
