"""One-stage detector: backbone -> dense head (RetinaNet, papers.md section 6).

The head predicts classes and boxes directly from every anchor of every pyramid level, with no
proposal stage. Model I/O: README.md, "Conventions".
"""
from __future__ import annotations

from typing import Any, Dict, List, Sequence

from torch import nn

from segkit.modeling.postprocess import postprocess_batch
from segkit.registry import BACKBONES, HEADS, META_ARCHS, Child

from .base import ImageDetector, backbone_shape_child

__all__ = ["OneStageDetector"]


@META_ARCHS.register("one_stage", children={
    "backbone": Child(BACKBONES),
    "head": backbone_shape_child(HEADS),
})
class OneStageDetector(ImageDetector):
    """Dense detector (RetinaNet).

    Args:
        backbone: module with ``forward(x) -> dict[str, Tensor]``, ``output_shape()`` and
            ``size_divisibility`` (e.g. FPN P3-P7).
        head: ``retinanet``-like module: ``(images, features, gt_instances) -> (detections,
            losses)``; detections are per image ``Instances`` at network-input resolution.
        pixel_mean: per-channel mean in the 0-255 scale, in ``input_format`` channel order.
        pixel_std: per-channel std in the 0-255 scale, in ``input_format`` channel order.
        input_format: channel order the weights expect: "RGB" (torchvision, segkit) or "BGR"
            (Detectron/caffe2 weights). Images always arrive RGB and are flipped for "BGR".
    """

    arch = "one_stage"

    def __init__(self, backbone: nn.Module, head: nn.Module, pixel_mean: Sequence[float],
                 pixel_std: Sequence[float], input_format: str = "RGB"):
        super().__init__(backbone, pixel_mean, pixel_std, input_format)
        self.head = head

    def forward(self, batched_inputs: List[Dict[str, Any]]):
        """Training: dict of scalar losses. Eval: :meth:`inference` with post-processing.

        Args:
            batched_inputs: one dict per image (README.md, "Conventions"); training needs
                ``instances`` with ``gt_boxes`` and ``gt_classes``.

        Returns:
            Training: the head's losses (``{"loss_cls", "loss_box_reg"}`` for RetinaNet).
            Eval: ``[{"instances": Instances}]`` at the original resolution.
        """
        if not self.training:
            return self.inference(batched_inputs)
        missing = [i for i, x in enumerate(batched_inputs) if "instances" not in x]
        if missing:
            raise ValueError(f"one_stage: training inputs {missing} have no 'instances' "
                             f"(ground truth); an image without objects needs empty Instances")
        images = self.preprocess_image(batched_inputs)
        gt_instances = [x["instances"].to(self.device) for x in batched_inputs]
        features = self.backbone(images.tensor)
        _, losses = self.head(images, features, gt_instances)
        return losses

    def inference(self, batched_inputs: List[Dict[str, Any]], do_postprocess: bool = True):
        """Detect objects.

        Args:
            batched_inputs: one dict per image (``image``, optional ``height``/``width``).
            do_postprocess: rescale the boxes to the original image size.

        Returns:
            With post-processing: ``[{"instances": Instances}]`` at (height, width) with
            ``pred_boxes`` (XYXY), ``scores`` and ``pred_classes``. Without: list of Instances
            at network-input resolution.
        """
        images = self.preprocess_image(batched_inputs)
        features = self.backbone(images.tensor)
        results, _ = self.head(images, features, None)
        if not do_postprocess:
            return results
        return postprocess_batch(results, batched_inputs, images.image_sizes)
