"""Convert torchvision Faster/Mask R-CNN and RetinaNet (ResNet-FPN, v1) weights into segkit's
key layout.

torchvision and segkit build the same networks (FPN, papers.md section 5; Mask R-CNN, section
7) with different parameter names and one different convention: torchvision's softmax puts the
background class FIRST (index 0) while segkit puts it LAST (README.md, "Conventions"). The
converter renames every tensor, rotates the classifier rows so background moves from 0 to K,
and drops the background's box-regression block and mask channel, which torchvision learns
but never uses. torchvision's 91 COCO outputs therefore become segkit's ``num_classes = 90``
(segkit class c = torchvision label c + 1 = COCO category id c + 1).

The converted model reproduces torchvision's detections when built from the experiment
configs ``mask_rcnn_r50_fpn_torchvision`` / ``faster_rcnn_r50_fpn_torchvision`` (torchvision
RoIAlign settings, anchor rounding, ...); ``tests/modeling/test_torchvision_parity.py``
checks it.

RetinaNet (``retinanet_resnet50_fpn``) has sigmoid outputs and no background class, but
torchvision's COCO model still reserves output 0 for it (never a positive target); the
converter drops that output from every anchor's block, which gives the same ``num_classes =
90`` and class mapping. Its model is ``retinanet_r50_fpn_torchvision``
(``tests/modeling/test_retinanet.py`` checks the parity).
"""
from __future__ import annotations

import re
from typing import Any, Dict, List, Mapping, Tuple

import torch
from torch import Tensor

from segkit.modeling.backbone import convert_torchvision_fpn
from segkit.modeling.dense_heads import convert_torchvision_retinanet_head
from segkit.modeling.proposal_generator import convert_torchvision_rpn_head

__all__ = ["UnsupportedCheckpointError", "convert_torchvision_detection"]

SUPPORTED = ("torchvision maskrcnn_resnet50_fpn / fasterrcnn_resnet50_fpn (v1) or "
             "retinanet_resnet50_fpn (v1) state dicts")
# (blocks in layer1..4, bottleneck?) -> ResNet depth
_DEPTHS = {((2, 2, 2, 2), False): 18, ((3, 4, 6, 3), False): 34, ((3, 4, 6, 3), True): 50,
           ((3, 4, 23, 3), True): 101, ((3, 8, 36, 3), True): 152}
_BOX_HEAD = {"fc6": "fc1", "fc7": "fc2"}
# new (Conv2dNormActivation, ``mask_head.{i}.0``) and pre-0.13 (``mask_head.mask_fcn{i+1}``) names
_MASK_CONV = re.compile(r"^roi_heads\.mask_head\.(?:(\d+)\.0|mask_fcn(\d+))\.(weight|bias)$")


class UnsupportedCheckpointError(ValueError):
    """The state dict is not a torchvision detection model this converter understands."""


def _background_last(t: Tensor, rows_per_class: int = 1) -> Tensor:
    """Move the first class block (torchvision's background) to the end."""
    return torch.cat([t[rows_per_class:], t[:rows_per_class]], dim=0)


def _resnet_depth(state_dict: Mapping[str, Tensor]) -> int:
    body = [k for k in state_dict if k.startswith("backbone.body.")]
    blocks, bottleneck = [], any(".conv3." in k for k in body)
    for layer in range(1, 5):
        ids = {int(k.split(".")[3]) for k in body if k.startswith(f"backbone.body.layer{layer}.")}
        blocks.append(len(ids))
    depth = _DEPTHS.get((tuple(blocks), bottleneck))
    if depth is None:
        raise UnsupportedCheckpointError(
            f"backbone.body has {blocks} blocks per stage (bottleneck={bottleneck}), which is no "
            f"ResNet depth in {sorted(set(_DEPTHS.values()))}; expected {SUPPORTED}")
    return depth


def convert_torchvision_detection(
    state_dict: Mapping[str, Any],
) -> Tuple[Dict[str, Tensor], Dict[str, Any]]:
    """Rename a torchvision Faster/Mask R-CNN state dict into a segkit ``two_stage`` one.

    Args:
        state_dict: ``model.state_dict()`` of ``torchvision.models.detection.
            maskrcnn_resnet50_fpn``, ``fasterrcnn_resnet50_fpn`` or ``retinanet_resnet50_fpn``
            (any ``num_classes``), or a dict holding it under ``"model"`` (torchvision's
            reference training scripts). A ``head.*`` key selects RetinaNet (``one_stage``).

    Returns:
        (segkit_state_dict, info) with info ``{"arch": "maskrcnn_resnet50_fpn" |
        "fasterrcnn_resnet50_fpn" | "retinanet_resnet50_fpn", "depth": int, "num_classes": K
        (torchvision's outputs - 1), "has_mask": bool, "experiment": matching experiment
        config name or None}``.

    Raises:
        UnsupportedCheckpointError: keys that are not part of a supported model (listed), or
            missing parts (e.g. a v2 model, whose box head has convs, or a keypoint model).
    """
    if "model" in state_dict and isinstance(state_dict["model"], Mapping):
        state_dict = state_dict["model"]
    state_dict = {k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
    non_tensors = [k for k, v in state_dict.items() if not isinstance(v, Tensor)]
    if non_tensors:
        raise UnsupportedCheckpointError(f"values of {non_tensors[:5]} are not tensors; expected "
                                         f"{SUPPORTED}")
    if any(k.startswith("head.") for k in state_dict):
        return _convert_retinanet(state_dict)
    out: Dict[str, Tensor] = {}
    used: set = set()
    unexpected: List[str] = []

    def take(key: str) -> Tensor:
        used.add(key)
        return state_dict[key]

    # backbone + RPN head: the backbone/RPN converters own those key layouts
    backbone = {k: v for k, v in state_dict.items() if k.startswith("backbone.")}
    rpn = {k: v for k, v in state_dict.items() if k.startswith("rpn.")}
    try:
        fpn = convert_torchvision_fpn(backbone, levels=(2, 3, 4, 5), prefix="backbone.")
        head = convert_torchvision_rpn_head(rpn, prefix="rpn.", out_prefix="rpn_head.")
        out.update({"backbone." + k: v for k, v in fpn.items()})
        out.update({"proposal_generator." + k: v for k, v in head.items()})
    except ValueError as e:
        raise UnsupportedCheckpointError(f"{e}; expected {SUPPORTED}") from e
    used.update(backbone, rpn)
    depth = _resnet_depth(state_dict) if backbone else None

    for key in state_dict:
        if key in used:
            continue
        parts = key.split(".")
        if key.startswith("roi_heads.box_head.") and len(parts) == 4 and parts[2] in _BOX_HEAD:
            out[f"roi_heads.box_head.{_BOX_HEAD[parts[2]]}.{parts[3]}"] = take(key)
        elif key.startswith("roi_heads.box_predictor.cls_score."):
            out["roi_heads.box_predictor.cls_score." + parts[-1]] = _background_last(take(key))
        elif key.startswith("roi_heads.box_predictor.bbox_pred."):
            # drop torchvision's (never used) background regression block, rows 0..3
            out["roi_heads.box_predictor.bbox_pred." + parts[-1]] = take(key)[4:]
        elif (m := _MASK_CONV.match(key)) is not None:
            idx = int(m.group(1)) + 1 if m.group(1) is not None else int(m.group(2))
            out[f"roi_heads.mask_head.mask_fcn{idx}.{m.group(3)}"] = take(key)
        elif key.startswith("roi_heads.mask_predictor.conv5_mask."):
            out["roi_heads.mask_head.deconv." + parts[-1]] = take(key)
        elif key.startswith("roi_heads.mask_predictor.mask_fcn_logits."):
            out["roi_heads.mask_head.predictor." + parts[-1]] = take(key)[1:]  # drop background
        else:
            unexpected.append(key)
    if unexpected:
        raise UnsupportedCheckpointError(
            f"unexpected keys {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''} "
            f"({len(unexpected)} in all); expected {SUPPORTED}")

    cls_key = "roi_heads.box_predictor.cls_score.weight"
    box_key = "roi_heads.box_predictor.bbox_pred.weight"
    required = ["roi_heads.box_head.fc1.weight", "roi_heads.box_head.fc2.weight", cls_key, box_key,
                "proposal_generator.rpn_head.conv.weight", "backbone.fpn_lateral2.weight",
                "backbone.bottom_up.stem.conv1.weight"]
    missing = [k for k in required if k not in out]
    has_mask = any(k.startswith("roi_heads.mask_head.") for k in out)
    if has_mask:
        missing += [f"roi_heads.mask_head.{k}.weight" for k in ("mask_fcn1", "deconv", "predictor")
                    if f"roi_heads.mask_head.{k}.weight" not in out]
    if missing:
        raise UnsupportedCheckpointError(f"missing parts {missing} (no torchvision key maps to "
                                         f"them); expected {SUPPORTED}")
    num_classes = out[cls_key].shape[0] - 1
    if out[box_key].shape[0] != 4 * num_classes:
        raise UnsupportedCheckpointError(
            f"roi_heads.box_predictor.bbox_pred has {out[box_key].shape[0] + 4} rows for "
            f"{num_classes + 1} classes; expected class-specific regression (4 per class)")
    arch = f"{'maskrcnn' if has_mask else 'fasterrcnn'}_resnet{depth}_fpn"
    experiment = None
    if depth == 50:
        experiment = f"{'mask' if has_mask else 'faster'}_rcnn_r50_fpn_torchvision"
    info = {"arch": arch, "depth": depth, "num_classes": num_classes, "has_mask": has_mask,
            "experiment": experiment}
    return {k: v.detach().clone().contiguous() for k, v in out.items()}, info


def _convert_retinanet(state_dict: Mapping[str, Tensor]
                       ) -> Tuple[Dict[str, Tensor], Dict[str, Any]]:
    """RetinaNet branch of :func:`convert_torchvision_detection` (``one_stage`` layout)."""
    backbone = {k: v for k, v in state_dict.items() if k.startswith("backbone.")}
    head = {k: v for k, v in state_dict.items() if k.startswith("head.")}
    unexpected = [k for k in state_dict if k not in backbone and k not in head]
    if unexpected:
        raise UnsupportedCheckpointError(
            f"unexpected keys {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''} "
            f"({len(unexpected)} in all); expected {SUPPORTED}")
    try:
        # RetinaNet's FPN starts at C3: torchvision inner block i is level i + 3
        fpn = convert_torchvision_fpn(backbone, levels=(3, 4, 5), prefix="backbone.")
        out = {"backbone." + k: v for k, v in fpn.items()}
        out.update(convert_torchvision_retinanet_head(head, prefix="head.", out_prefix="head."))
    except ValueError as e:
        raise UnsupportedCheckpointError(f"{e}; expected {SUPPORTED}") from e
    required = ["head.cls_score.weight", "head.bbox_pred.weight", "head.cls_subnet.0.weight",
                "head.bbox_subnet.0.weight", "backbone.fpn_lateral3.weight",
                "backbone.top_block.p6.weight", "backbone.bottom_up.stem.conv1.weight"]
    missing = [k for k in required if k not in out]
    if missing:
        raise UnsupportedCheckpointError(f"missing parts {missing} (no torchvision key maps to "
                                         f"them); expected {SUPPORTED}")
    num_anchors = out["head.bbox_pred.weight"].shape[0] // 4
    num_classes = out["head.cls_score.weight"].shape[0] // num_anchors
    depth = _resnet_depth(state_dict)
    info = {"arch": f"retinanet_resnet{depth}_fpn", "depth": depth, "num_classes": num_classes,
            "has_mask": False,
            "experiment": "retinanet_r50_fpn_torchvision" if depth == 50 else None}
    return {k: v.detach().clone().contiguous() for k, v in out.items()}, info
