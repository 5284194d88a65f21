"""Map detections from the network-input resolution back to the original image.

The mapper resizes each image before the model sees it; users and evaluators want boxes and
masks in the original (height, width). Boxes are rescaled and clipped; Mask R-CNN's M x M
box-frame probabilities are resized to their box and binarised at 0.5 (papers.md section 7,
"Inference") by ``segkit.layers.paste_masks_in_image``.
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Sequence, Tuple

from segkit.layers import paste_masks_in_image
from segkit.structures import Boxes, Instances

__all__ = ["detector_postprocess", "postprocess_batch"]


def detector_postprocess(results: Instances, output_height: int, output_width: int,
                         mask_threshold: float = 0.5) -> Instances:
    """Rescale one image's detections to ``(output_height, output_width)``.

    Args:
        results: detections at network-input resolution (``results.image_size`` = (h, w) of
            the resized, unpadded input) with ``pred_boxes`` (XYXY) and optionally
            ``pred_masks`` (N, M, M) float probabilities in the box frame (or (N, 1, M, M)),
            ``proposal_boxes`` (proposal-only models).
        output_height: original image height.
        output_width: original image width.
        mask_threshold: binarisation threshold of the pasted masks.

    Returns:
        New Instances of size (output_height, output_width) with the same fields; boxes scaled
        and clipped, ``pred_masks`` (N, output_height, output_width) bool.
    """
    in_h, in_w = results.image_size
    if in_h <= 0 or in_w <= 0:
        raise ValueError(f"detector_postprocess: detections have image_size {results.image_size}")
    scale_x, scale_y = output_width / in_w, output_height / in_h
    out = Instances((int(output_height), int(output_width)), **results.get_fields())
    for name in ("pred_boxes", "proposal_boxes"):
        if out.has(name):
            # a copy: the caller's (network-resolution) Instances stays untouched
            boxes = Boxes(out.get(name).tensor.clone())
            boxes.scale(scale_x, scale_y).clip(out.image_size)
            out.set(name, boxes)
    if out.has("pred_masks"):
        out.pred_masks = paste_masks_in_image(out.pred_masks, out.pred_boxes.tensor, out.image_size,
                                              threshold=mask_threshold)
    return out


def postprocess_batch(results: List[Instances], batched_inputs: Sequence[Mapping[str, Any]],
                      image_sizes: Sequence[Tuple[int, int]]) -> List[Dict[str, Instances]]:
    """Post-process a batch to the model output format ``[{"instances": Instances}, ...]``.

    Args:
        results: per image detections at network-input resolution.
        batched_inputs: the model inputs; ``height``/``width`` give the original size and
            default to the input image size.
        image_sizes: per image (h, w) network-input size.

    Returns:
        per image ``{"instances": Instances}`` at the original resolution.
    """
    out = []
    for res, inp, size in zip(results, batched_inputs, image_sizes):
        height = int(inp.get("height", size[0]))
        width = int(inp.get("width", size[1]))
        out.append({"instances": detector_postprocess(res, height, width)})
    return out
