"""Two-stage (R-CNN family) detector: backbone -> proposal generator -> ROI heads.

Faster R-CNN with FPN (papers.md section 5) when the ROI heads have no mask head, Mask R-CNN
(section 7) when they do. Model I/O: README.md, "Conventions".
"""
from __future__ import annotations

from typing import Any, Dict, List, Sequence

from torch import nn

from segkit.modeling.postprocess import postprocess_batch
from segkit.modeling.proposal_generator import run_proposal_generator
from segkit.registry import BACKBONES, META_ARCHS, PROPOSAL_GENERATORS, ROI_HEADS, Child

from .base import ImageDetector, backbone_shape_child

__all__ = ["TwoStageDetector"]


@META_ARCHS.register("two_stage", children={
    "backbone": Child(BACKBONES),
    "proposal_generator": backbone_shape_child(PROPOSAL_GENERATORS),
    "roi_heads": backbone_shape_child(ROI_HEADS),
})
class TwoStageDetector(ImageDetector):
    """Generalised R-CNN.

    Args:
        backbone: module with ``forward(x) -> dict[str, Tensor]``, ``output_shape()`` and
            ``size_divisibility``.
        proposal_generator: ``rpn``-like module: ``(images, features, gt_instances) ->
            (proposals, losses)``; one with ``uses_batched_inputs`` (``precomputed``) also
            receives ``batched_inputs=`` (see ``run_proposal_generator``).
        roi_heads: ``standard``-like module: ``(images, features, proposals, gt_instances) ->
            (detections, losses)``.
        pixel_mean: per-channel mean in the 0-255 scale, in ``input_format`` channel order.
        pixel_std: per-channel std in the 0-255 scale, in ``input_format`` channel order.
        input_format: channel order the weights expect: "RGB" (torchvision, segkit) or "BGR"
            (Detectron/caffe2 weights). Images always arrive RGB and are flipped for "BGR".
    """

    arch = "two_stage"

    def __init__(self, backbone: nn.Module, proposal_generator: nn.Module, roi_heads: nn.Module,
                 pixel_mean: Sequence[float], pixel_std: Sequence[float],
                 input_format: str = "RGB"):
        super().__init__(backbone, pixel_mean, pixel_std, input_format)
        self.proposal_generator = proposal_generator
        self.roi_heads = roi_heads

    def forward(self, batched_inputs: List[Dict[str, Any]]):
        """Training: dict of scalar losses. Eval: :meth:`inference` with post-processing.

        Args:
            batched_inputs: one dict per image (README.md, "Conventions"); training needs
                ``instances`` with ``gt_boxes``, ``gt_classes`` (and ``gt_masks`` for masks).

        Returns:
            Training: ``{"loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg"[,
            "loss_mask"]}``. Eval: ``[{"instances": Instances}]`` at the original resolution.
        """
        if not self.training:
            return self.inference(batched_inputs)
        missing = [i for i, x in enumerate(batched_inputs) if "instances" not in x]
        if missing:
            raise ValueError(f"two_stage: training inputs {missing} have no 'instances' "
                             f"(ground truth); an image without objects needs empty Instances")
        images = self.preprocess_image(batched_inputs)
        gt_instances = [x["instances"].to(self.device) for x in batched_inputs]
        features = self.backbone(images.tensor)
        proposals, losses = run_proposal_generator(self.proposal_generator, images, features,
                                                   gt_instances, batched_inputs)
        _, detector_losses = self.roi_heads(images, features, proposals, gt_instances)
        losses = dict(losses)
        losses.update(detector_losses)
        return losses

    def inference(self, batched_inputs: List[Dict[str, Any]], do_postprocess: bool = True):
        """Detect objects.

        Args:
            batched_inputs: one dict per image (``image``, optional ``height``/``width``).
            do_postprocess: rescale to the original size and paste masks.

        Returns:
            With post-processing: ``[{"instances": Instances}]`` at (height, width) with
            ``pred_boxes``, ``scores``, ``pred_classes`` and ``pred_masks`` (N, H, W) bool.
            Without: list of Instances at network-input resolution, ``pred_masks`` as
            (N, M, M) probabilities in box coordinates.
        """
        images = self.preprocess_image(batched_inputs)
        features = self.backbone(images.tensor)
        proposals, _ = run_proposal_generator(self.proposal_generator, images, features, None,
                                              batched_inputs)
        results, _ = self.roi_heads(images, features, proposals, None)
        if not do_postprocess:
            return results
        return postprocess_batch(results, batched_inputs, images.image_sizes)
