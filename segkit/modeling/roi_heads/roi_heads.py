"""Standard R-CNN ROI heads: box head + Fast R-CNN predictor, optional Mask R-CNN mask head.

Training (papers.md sections 5, 7): proposals (plus the GT boxes) are matched to GT at IoU
0.5, 512 RoIs/image are sampled at 1:3 foreground:background, the box branch is trained on all
of them and the mask branch on the sampled foreground only. Inference: box branch on every
proposal -> score threshold, NMS, top-100 -> mask branch on those detections only.
Boxes are XYXY absolute pixels on the network-input (resized, unpadded) image.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from segkit.layers import ShapeSpec
from segkit.modeling.box_coder import Box2BoxTransform
from segkit.modeling.matcher import Matcher
from segkit.modeling.sampler import subsample_labels
from segkit.modeling.losses import check_reduction
from segkit.registry import HEADS, LOSSES, ROI_HEADS, Child
from segkit.structures import Boxes, ImageList, Instances, pairwise_iou

from .fast_rcnn import FastRCNNOutputLayers, fast_rcnn_inference, fast_rcnn_losses
from .mask_head import mask_rcnn_inference, mask_rcnn_loss
from .poolers import ROIPooler

__all__ = ["StandardROIHeads"]

DEFAULT_IN_FEATURES = ("p2", "p3", "p4", "p5")


def _pooled_shape(kwargs: dict, runtime: dict, resolution_key: str, default: int) -> ShapeSpec:
    """Shape of one pooled RoI feature; the stride of a pooled RoI is meaningless (0)."""
    in_features = kwargs.get("in_features", DEFAULT_IN_FEATURES)
    input_shape = runtime.get("input_shape")
    if input_shape is None:
        raise ValueError("roi_heads 'standard' needs the runtime input_shape (the backbone's "
                         "output_shape()) to size its heads")
    res = int(kwargs.get(resolution_key, default))
    return ShapeSpec(channels=_common_channels(input_shape, in_features), stride=0,
                     height=res, width=res)


def _box_head_runtime(built: dict, kwargs: dict, runtime: dict) -> dict:
    return {"input_shape": _pooled_shape(kwargs, runtime, "box_pooler_resolution", 7)}


def _mask_head_runtime(built: dict, kwargs: dict, runtime: dict) -> dict:
    if kwargs.get("num_classes") is None:
        raise ValueError("roi_heads 'standard': num_classes is not set (it comes from "
                         "dataset.num_classes); the mask head needs it")
    return {"input_shape": _pooled_shape(kwargs, runtime, "mask_pooler_resolution", 14),
            "num_classes": int(kwargs["num_classes"]),
            "cls_agnostic": bool(kwargs.get("cls_agnostic_mask", False))}


def _common_channels(input_shape: Dict[str, ShapeSpec], in_features: Sequence[str]) -> int:
    missing = [f for f in in_features if f not in input_shape]
    if missing:
        raise ValueError(f"roi_heads: in_features {missing} not produced by the backbone; "
                         f"available: {sorted(input_shape)}")
    channels = {input_shape[f].channels for f in in_features}
    if len(channels) != 1:
        raise ValueError(f"roi_heads: in_features {list(in_features)} must share one channel "
                         f"count (the heads are shared across levels), got {sorted(channels)}")
    return channels.pop()


@ROI_HEADS.register("standard", children={
    "box_head": Child(HEADS, runtime=_box_head_runtime),
    "mask_head": Child(HEADS, runtime=_mask_head_runtime, optional=True),
    "cls_loss": Child(LOSSES, optional=True),
    "box_loss": Child(LOSSES, optional=True),
})
class StandardROIHeads(nn.Module):
    """Box (and mask) heads on FPN RoI features.

    Args:
        input_shape: backbone ``output_shape()`` (runtime).
        num_classes: K foreground classes (background is softmax index K).
        box_head: module mapping (R, C, r, r) pooled features to (R, D); must expose
            ``output_size = D`` (e.g. ``fc_box_head``).
        mask_head: optional module mapping (R, C, m, m) to (R, K or 1, 2m, 2m) mask logits.
        in_features: pyramid levels RoIs are pooled from, finest first.
        box_pooler_resolution: pooled size for the box head (7).
        box_pooler_sampling_ratio: RoIAlign samples per bin side (0 = adaptive; 2 in
            torchvision/Detectron).
        pooler_aligned: RoIAlign half-pixel offset (False reproduces torchvision/Detectron).
        mask_pooler_resolution: pooled size for the mask head (14).
        mask_pooler_sampling_ratio: None = same as the box pooler.
        batch_size_per_image: sampled RoIs per image (512).
        positive_fraction: maximum foreground fraction of the sample (0.25).
        iou_threshold: proposals with IoU >= this with a GT are foreground (0.5).
        proposal_append_gt: add the GT boxes to the proposals (so every GT has a perfect RoI).
        box_reg_weights: (wx, wy, ww, wh) of the box coder.
        smooth_l1_beta: box loss smooth-L1 beta; 0 = L1 (used when ``box_loss`` is not given).
        cls_loss: optional LOSSES module for the K+1-way classifier (config node, e.g.
            ``{name: ce, label_smoothing: 0.1}``); reduction "mean" or "sum" (divided by the
            number of sampled RoIs). None: mean cross-entropy.
        box_loss: optional LOSSES module for the class-specific box regression on foreground
            RoIs, e.g. ``{name: giou}`` (decoded boxes) or ``{name: smooth_l1, beta: 0.5}``;
            reduction "sum" (divided by the number of sampled RoIs). Replaces ``smooth_l1_beta``.
        score_thresh_test, nms_thresh_test, detections_per_image, min_box_size_test:
            inference filters (see ``fast_rcnn_inference``).
        cls_agnostic_mask: the mask head predicts one class-agnostic mask.
    """

    def __init__(
        self,
        input_shape: Dict[str, ShapeSpec],
        num_classes: int,
        box_head: nn.Module,
        mask_head: Optional[nn.Module] = None,
        in_features: Sequence[str] = DEFAULT_IN_FEATURES,
        box_pooler_resolution: int = 7,
        box_pooler_sampling_ratio: int = 0,
        pooler_aligned: bool = True,
        mask_pooler_resolution: int = 14,
        mask_pooler_sampling_ratio: Optional[int] = None,
        batch_size_per_image: int = 512,
        positive_fraction: float = 0.25,
        iou_threshold: float = 0.5,
        proposal_append_gt: bool = True,
        box_reg_weights: Sequence[float] = (10.0, 10.0, 5.0, 5.0),
        smooth_l1_beta: float = 0.0,
        score_thresh_test: float = 0.05,
        nms_thresh_test: float = 0.5,
        detections_per_image: int = 100,
        min_box_size_test: float = 1e-2,
        cls_agnostic_mask: bool = False,
        cls_loss: Optional[nn.Module] = None,
        box_loss: Optional[nn.Module] = None,
    ):
        super().__init__()
        self.in_features = list(in_features)
        _common_channels(input_shape, self.in_features)
        if not hasattr(box_head, "output_size"):
            raise ValueError(f"roi_heads 'standard': box_head {type(box_head).__name__} must "
                             f"expose output_size (length of its per-RoI feature)")
        head_agnostic = getattr(mask_head, "cls_agnostic", cls_agnostic_mask)
        if mask_head is not None and head_agnostic != cls_agnostic_mask:
            raise ValueError(f"roi_heads 'standard': cls_agnostic_mask={cls_agnostic_mask} but the "
                             f"mask head has cls_agnostic={mask_head.cls_agnostic}")
        self.num_classes = int(num_classes)
        scales = [1.0 / input_shape[f].stride for f in self.in_features]
        self.box_pooler = ROIPooler(box_pooler_resolution, scales, box_pooler_sampling_ratio,
                                    pooler_aligned)
        self.box_head = box_head
        self.box_predictor = FastRCNNOutputLayers(box_head.output_size, self.num_classes)
        self.mask_head = mask_head
        if mask_head is not None:
            ratio = (box_pooler_sampling_ratio if mask_pooler_sampling_ratio is None
                     else mask_pooler_sampling_ratio)
            self.mask_pooler = ROIPooler(mask_pooler_resolution, scales, ratio, pooler_aligned)
        self.box_transform = Box2BoxTransform(box_reg_weights)
        # No "ignore" band: below the threshold is background (Mask R-CNN section 3, papers.md 7).
        self.proposal_matcher = Matcher([iou_threshold], [0, 1], allow_low_quality_matches=False)
        self.batch_size_per_image = int(batch_size_per_image)
        self.positive_fraction = float(positive_fraction)
        self.proposal_append_gt = bool(proposal_append_gt)
        self.smooth_l1_beta = float(smooth_l1_beta)
        if box_loss is not None and smooth_l1_beta != 0.0:
            raise ValueError("roi_heads 'standard': set either box_loss or the legacy "
                             "smooth_l1_beta, not both")
        check_reduction(cls_loss, ("mean", "sum"), "model.roi_heads.cls_loss")
        check_reduction(box_loss, ("sum",), "model.roi_heads.box_loss")
        self.cls_loss, self.box_loss = cls_loss, box_loss  # None: CE / smooth_l1_beta
        self.score_thresh_test = float(score_thresh_test)
        self.nms_thresh_test = float(nms_thresh_test)
        self.detections_per_image = int(detections_per_image)
        self.min_box_size_test = float(min_box_size_test)

    @torch.no_grad()
    def label_and_sample_proposals(self, proposals: List[Instances],
                                   gt_instances: List[Instances]) -> List[Instances]:
        """Match proposals to GT and sample the training RoIs of each image.

        Args:
            proposals: per image Instances with ``proposal_boxes`` (R_i boxes).
            gt_instances: per image Instances with ``gt_boxes``, ``gt_classes`` (may be empty).

        Returns:
            per image Instances of the S_i sampled RoIs (foreground first) with
            ``proposal_boxes``, ``gt_classes`` (0..K, K = background), ``gt_boxes`` (matched GT;
            the proposal itself for background) and ``gt_index`` (index of the matched GT).
        """
        out = []
        for props, gt in zip(proposals, gt_instances):
            boxes = props.proposal_boxes.tensor.detach()
            gt_boxes = gt.gt_boxes.tensor.to(boxes)
            if self.proposal_append_gt and len(gt) > 0:
                boxes = torch.cat([boxes, gt_boxes], dim=0)
            if len(gt) > 0:
                iou = pairwise_iou(Boxes(gt_boxes), Boxes(boxes))
            else:
                iou = boxes.new_zeros((0, boxes.shape[0]))
            matched, labels = self.proposal_matcher(iou)
            classes = torch.full((boxes.shape[0],), self.num_classes, dtype=torch.int64,
                                 device=boxes.device)
            if len(gt) > 0:
                classes = torch.where(labels == 1, gt.gt_classes.to(boxes.device)[matched], classes)
            classes[labels == -1] = -1
            pos, neg = subsample_labels(classes, self.batch_size_per_image,
                                        self.positive_fraction, self.num_classes)
            idx = torch.cat([pos, neg])
            matched_boxes = gt_boxes[matched[idx]] if len(gt) > 0 else boxes[idx]
            out.append(Instances(props.image_size, proposal_boxes=Boxes(boxes[idx]),
                                 gt_classes=classes[idx], gt_boxes=Boxes(matched_boxes),
                                 gt_index=matched[idx]))
        return out

    def forward(self, images: ImageList, features: Dict[str, Tensor],
                proposals: List[Instances], gt_instances: Optional[List[Instances]] = None
                ) -> Tuple[List[Instances], Dict[str, Tensor]]:
        """Run the heads.

        Args:
            images: the padded batch (its ``image_sizes`` clip the detections).
            features: backbone outputs by name, (B, C, H_l, W_l).
            proposals: per image Instances with ``proposal_boxes`` and ``objectness_logits``.
            gt_instances: per image GT (training only) with ``gt_boxes``, ``gt_classes`` and,
                for a mask head, ``gt_masks`` (BitMasks or PolygonMasks).

        Returns:
            (results, losses). Training: the sampled RoIs (Instances as returned by
            :meth:`label_and_sample_proposals`) and ``{"loss_cls", "loss_box_reg"[,
            "loss_mask"]}``. Eval: per image detections with ``pred_boxes``, ``scores``,
            ``pred_classes`` and, with a mask head, ``pred_masks`` (N, M, M) probabilities in
            box coordinates, at network-input resolution; losses ``{}``.
        """
        feats = [features[f] for f in self.in_features]
        if self.training:
            if gt_instances is None:
                raise ValueError("roi_heads: training needs gt_instances (one Instances per image)")
            sampled = self.label_and_sample_proposals(proposals, gt_instances)
            boxes = [s.proposal_boxes for s in sampled]
            scores, deltas = self.box_predictor(self.box_head(self.box_pooler(feats, boxes)))
            losses = fast_rcnn_losses(
                scores, deltas, torch.cat([b.tensor for b in boxes]),
                torch.cat([s.gt_boxes.tensor for s in sampled]),
                torch.cat([s.gt_classes for s in sampled]), self.box_transform, self.smooth_l1_beta,
                cls_loss=self.cls_loss, box_loss=self.box_loss)
            if self.mask_head is not None:
                losses["loss_mask"] = self._mask_loss(feats, sampled, gt_instances)
            return sampled, losses

        boxes = [p.proposal_boxes for p in proposals]
        scores, deltas = self.box_predictor(self.box_head(self.box_pooler(feats, boxes)))
        detections = fast_rcnn_inference(
            scores, deltas, [b.tensor for b in boxes], list(images.image_sizes), self.box_transform,
            self.score_thresh_test, self.nms_thresh_test, self.detections_per_image,
            self.min_box_size_test)
        if self.mask_head is not None:
            # Masks only for the final detections (Mask R-CNN section 3, papers.md 7).
            logits = self.mask_head(self.mask_pooler(feats, [d.pred_boxes for d in detections]))
            mask_rcnn_inference(logits, detections)
        return detections, {}

    def _mask_loss(self, feats: List[Tensor], sampled: List[Instances],
                   gt_instances: List[Instances]) -> Tensor:
        """Mask loss on the sampled foreground RoIs only (papers.md section 7, "Loss").

        Args:
            feats: per level (B, C, H_l, W_l) features, finest first.
            sampled: per image the sampled RoIs from :meth:`label_and_sample_proposals`.
            gt_instances: per image GT with ``gt_masks`` ((M_i, H, W) BitMasks or PolygonMasks).

        Returns:
            scalar mean BCE over the P foreground RoIs' (M, M) targets on their GT class channel;
            0, still attached to the mask head, when P = 0.
        """
        fg = [s[(s.gt_classes >= 0) & (s.gt_classes < self.num_classes)] for s in sampled]
        logits = self.mask_head(self.mask_pooler(feats, [f.proposal_boxes for f in fg]))
        size = logits.shape[-1]
        targets = []
        for f, gt in zip(fg, gt_instances):
            if len(f) == 0:
                continue
            if not gt.has("gt_masks"):
                raise ValueError("roi_heads: the mask head needs gt_masks in every training "
                                 "Instances (PolygonMasks or BitMasks)")
            # The target is the matched GT mask inside the RoI, rasterised at M x M (section
            # 7); mask_indices avoids copying one full-image mask per RoI.
            targets.append(gt.gt_masks.crop_and_resize(
                f.proposal_boxes.tensor, size, mask_indices=f.gt_index).to(logits.device))
        # No foreground RoI in this process's batch still calls the loss: it normalises with a
        # count summed over the processes, a collective every process must join (and it
        # returns a zero loss attached to the mask head, as DDP requires).
        target = torch.cat(targets) if targets else logits.new_zeros((0, size, size))
        return mask_rcnn_loss(logits, torch.cat([f.gt_classes for f in fg]), target)
