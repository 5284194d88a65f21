"""Draw instances (translucent masks, boxes, "class score" labels) on images, and save PNGs.

Drawing goes through ``torchvision.utils.draw_segmentation_masks`` / ``draw_bounding_boxes``;
this module only turns segkit structures and dataset records into their inputs. Colours are a
fixed function of the class id, so one class looks the same in every image and every run.
"""
from __future__ import annotations

import colorsys
import os
from typing import Any, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image, ImageDraw
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

__all__ = ["class_color", "draw_instances", "draw_gt_and_predictions", "save_png",
           "annotations_to_instances"]

Color = Tuple[int, int, int]
TITLE_HEIGHT = 18  # pixels of the title bar above each panel of draw_gt_and_predictions
_GOLDEN = 0.618033988749895  # hue step: consecutive ids get well separated hues


def class_color(class_id: int) -> Color:
    """Deterministic, saturated RGB colour of a contiguous class id."""
    hue = (0.13 + class_id * _GOLDEN) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.75, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def _check_image(image: np.ndarray) -> np.ndarray:
    if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3
            and image.shape[2] == 3):
        desc = (f"{type(image).__name__} {getattr(image, 'dtype', '')} "
                f"{tuple(getattr(image, 'shape', ()))}")
        raise ValueError(f"expected an RGB image as a (H, W, 3) uint8 numpy array, got {desc}")
    return image


def _field(instances: Any, *names: str) -> Any:
    for name in names:
        if instances.has(name):
            return instances.get(name)
    return None


def _masks_to_bool(masks: Any, height: int, width: int) -> torch.Tensor:
    """(N, H, W) bool from a bool/float tensor, ``BitMasks`` or ``PolygonMasks``."""
    if hasattr(masks, "polygons"):  # PolygonMasks: rasterise at the image size
        from segkit.structures import BitMasks

        masks = BitMasks.from_polygon_masks(masks, height, width)
    masks = getattr(masks, "tensor", masks)
    masks = torch.as_tensor(masks).detach().cpu()
    if masks.dtype != torch.bool:
        masks = masks > 0.5
    if tuple(masks.shape[1:]) != (height, width):
        raise ValueError(f"masks have size {tuple(masks.shape[1:])} but the image is "
                         f"{(height, width)}; predictions must be at the original resolution")
    return masks


def _render(image: np.ndarray, boxes: Optional[torch.Tensor], classes: Sequence[int],
            masks: Optional[torch.Tensor], labels: Optional[List[str]],
            colors: Optional[Sequence[Color]], alpha: float, box_width: int) -> np.ndarray:
    """Masks first, then boxes and labels on top, so the outlines stay visible."""
    out = torch.from_numpy(np.array(image)).permute(2, 0, 1)  # a copy: (3, H, W) uint8
    inst_colors = [tuple(colors[c]) if colors is not None and 0 <= c < len(colors)
                   else class_color(c) for c in classes]
    if masks is not None and len(masks):
        out = draw_segmentation_masks(out, masks, alpha=alpha, colors=inst_colors)
    if boxes is not None and len(boxes):
        xyxy = boxes.detach().cpu().float().clone()
        xyxy[:, 2:] = torch.maximum(xyxy[:, 2:], xyxy[:, :2])  # torchvision rejects x2 < x1
        out = draw_bounding_boxes(out, xyxy, labels=labels, colors=inst_colors, width=box_width)
    return out.permute(1, 2, 0).contiguous().numpy()


def draw_instances(
    image: np.ndarray, instances: Any, class_names: Sequence[str], score_thresh: float = 0.0,
    *, alpha: float = 0.5, show_boxes: bool = True, show_masks: bool = True,
    show_labels: bool = True, colors: Optional[Sequence[Color]] = None, box_width: int = 2,
) -> np.ndarray:
    """Draw predictions (or ground truth) of one image.

    Args:
        image: (H, W, 3) uint8 RGB, the original image the instances refer to.
        instances: ``Instances`` of size (H, W) with ``pred_boxes``/``gt_boxes`` (``Boxes``,
            XYXY absolute), ``pred_classes``/``gt_classes`` (N,) contiguous ids, optional
            ``scores`` (N,) and ``pred_masks``/``gt_masks`` ((N, H, W) bool, ``BitMasks`` or
            ``PolygonMasks``).
        class_names: name of each contiguous class id (unknown ids are drawn as numbers).
        score_thresh: instances with a score below it are not drawn.
        alpha: opacity of the mask colour (0 = invisible, 1 = opaque).
        show_boxes, show_masks, show_labels: what to draw; labels ("class score", or just
            "class" without scores) sit on the boxes, so they need ``show_boxes``.
        colors: optional RGB colour per class id (e.g. metadata ``thing_colors``).
        box_width: box outline width in pixels.

    Returns:
        A new (H, W, 3) uint8 RGB array.
    """
    image = _check_image(image)
    height, width = image.shape[:2]
    n = len(instances)
    classes_t = _field(instances, "pred_classes", "gt_classes")
    classes = [0] * n if classes_t is None else [int(c) for c in classes_t.tolist()]
    scores = _field(instances, "scores")
    keep = torch.ones(n, dtype=torch.bool)
    if scores is not None:
        scores = scores.detach().cpu().float()
        keep = scores >= score_thresh
    idx = keep.nonzero().view(-1).tolist()
    classes = [classes[i] for i in idx]
    boxes = _field(instances, "pred_boxes", "gt_boxes") if show_boxes else None
    if boxes is not None:
        boxes = getattr(boxes, "tensor", boxes)[keep]
    masks = _field(instances, "pred_masks", "gt_masks") if show_masks else None
    if masks is not None:
        masks = _masks_to_bool(masks, height, width)[keep]
    labels = None
    if show_labels:
        names = [class_names[c] if 0 <= c < len(class_names) else str(c) for c in classes]
        labels = names if scores is None else [
            f"{nm} {scores[i]:.2f}" for nm, i in zip(names, idx)]
    return _render(image, boxes, classes, masks, labels, colors, alpha, box_width)


def annotations_to_instances(annotations: Sequence[Mapping], image_size: Tuple[int, int]):
    """Record annotations (XYWH boxes, contiguous ids, polygons/RLE) -> ground-truth Instances.

    Returns ``Instances`` with ``gt_boxes`` (XYXY), ``gt_classes``, ``gt_masks`` (``BitMasks``,
    only when every annotation has a segmentation) and ``iscrowd``.
    """
    from segkit.structures import BitMasks, Boxes, Instances, polygons_to_bitmask, rle_to_bitmask

    height, width = image_size
    boxes = torch.tensor([[float(v) for v in a["bbox"]] for a in annotations],
                         dtype=torch.float32).view(-1, 4)
    for i, a in enumerate(annotations):
        if str(a.get("bbox_mode", "xywh")).lower() != "xyxy":
            boxes[i, 2:] += boxes[i, :2]
    inst = Instances(image_size, gt_boxes=Boxes(boxes),
                     gt_classes=torch.tensor([int(a["category_id"]) for a in annotations],
                                             dtype=torch.int64),
                     iscrowd=torch.tensor([int(a.get("iscrowd", 0)) for a in annotations]))
    segs = [a.get("segmentation") for a in annotations]
    if segs and all(segs):
        inst.gt_masks = BitMasks(torch.stack([
            rle_to_bitmask(s, height, width) if isinstance(s, dict)
            else polygons_to_bitmask(s, height, width) for s in segs]))
    return inst


def _title_bar(text: str, width: int) -> np.ndarray:
    bar = Image.new("RGB", (width, TITLE_HEIGHT), (32, 32, 32))
    ImageDraw.Draw(bar).text((4, 3), text, fill=(255, 255, 255))
    return np.asarray(bar)


def draw_gt_and_predictions(
    image: np.ndarray, gt: Union[Sequence[Mapping], Any], pred_instances: Any,
    class_names: Sequence[str], score_thresh: float = 0.0, **draw_kwargs: Any,
) -> np.ndarray:
    """Ground truth (left) and predictions (right) of one image, each under a title bar.

    Args:
        image: (H, W, 3) uint8 RGB original image.
        gt: the record's ``annotations`` list or an ``Instances`` with ``gt_*`` fields.
        pred_instances: predictions at the original resolution (see :func:`draw_instances`).
        class_names: contiguous id -> name.
        score_thresh: predictions below it are not drawn.
        **draw_kwargs: passed to :func:`draw_instances` for both panels.

    Returns:
        (H + TITLE_HEIGHT, 2 * W, 3) uint8 RGB array.
    """
    image = _check_image(image)
    height, width = image.shape[:2]
    if isinstance(gt, (list, tuple)):
        gt = annotations_to_instances(gt, (height, width))
    left = draw_instances(image, gt, class_names, **draw_kwargs)
    right = draw_instances(image, pred_instances, class_names, score_thresh, **draw_kwargs)
    scores = _field(pred_instances, "scores")
    n_pred = len(pred_instances) if scores is None else int((scores >= score_thresh).sum())
    panels = [np.concatenate([_title_bar(f"ground truth ({len(gt)})", width), left]),
              np.concatenate([_title_bar(f"predictions ({n_pred}, score >= {score_thresh:g})",
                                         width), right])]
    return np.concatenate(panels, axis=1)


def save_png(array: np.ndarray, path: Union[str, os.PathLike]) -> str:
    """Write a (H, W, 3) uint8 RGB array as a PNG (parent folders are created)."""
    array = _check_image(array)
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(array).save(path, format="PNG")
    return path
