"""Two-stage (R-CNN family) detector: backbone -> proposal generator -> ROI heads.

Faster R-CNN with FPN (papers.md section 5) when the ROI heads have no mask head, Mask R-CNN
(section 7) when they do. Model I/O: README.md, "Conventions".
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Sequence

import torch
from torch import Tensor, nn

from segkit.modeling.postprocess import postprocess_batch
from segkit.registry import BACKBONES, META_ARCHS, PROPOSAL_GENERATORS, ROI_HEADS, Child
from segkit.structures import ImageList

__all__ = ["TwoStageDetector"]


def _backbone_shape(built: dict, kwargs: dict, runtime: dict) -> dict:
    return {"input_shape": built["backbone"].output_shape()}


@META_ARCHS.register("two_stage", children={
    "backbone": Child(BACKBONES),
    "proposal_generator": Child(PROPOSAL_GENERATORS, runtime=_backbone_shape),
    "roi_heads": Child(ROI_HEADS, runtime=_backbone_shape),
})
class TwoStageDetector(nn.Module):
    """Generalised R-CNN.

    Args:
        backbone: module with ``forward(x) -> dict[str, Tensor]``, ``output_shape()`` and
            ``size_divisibility``.
        proposal_generator: ``rpn``-like module: ``(images, features, gt_instances) ->
            (proposals, losses)``.
        roi_heads: ``standard``-like module: ``(images, features, proposals, gt_instances) ->
            (detections, losses)``.
        pixel_mean: per-channel mean in the 0-255 scale, in ``input_format`` channel order.
        pixel_std: per-channel std in the 0-255 scale, in ``input_format`` channel order.
        input_format: channel order the weights expect: "RGB" (torchvision, segkit) or "BGR"
            (Detectron/caffe2 weights). Images always arrive RGB and are flipped for "BGR".
    """

    def __init__(self, backbone: nn.Module, proposal_generator: nn.Module, roi_heads: nn.Module,
                 pixel_mean: Sequence[float], pixel_std: Sequence[float],
                 input_format: str = "RGB"):
        super().__init__()
        if input_format not in ("RGB", "BGR"):
            raise ValueError(f"two_stage: input_format must be 'RGB' or 'BGR', "
                             f"got {input_format!r}")
        if len(pixel_mean) != len(pixel_std):
            raise ValueError(f"two_stage: pixel_mean {list(pixel_mean)} and pixel_std "
                             f"{list(pixel_std)} must have the same length")
        if any(s <= 0 for s in pixel_std):
            raise ValueError(f"two_stage: pixel_std must be positive, got {list(pixel_std)}")
        self.backbone = backbone
        self.proposal_generator = proposal_generator
        self.roi_heads = roi_heads
        self.input_format = input_format
        # Not persistent: they are config values, so checkpoints hold learned weights only and
        # converted torchvision/detectron2 files need not carry them.
        mean = torch.tensor(pixel_mean, dtype=torch.float32).view(-1, 1, 1)
        std = torch.tensor(pixel_std, dtype=torch.float32).view(-1, 1, 1)
        self.register_buffer("pixel_mean", mean, persistent=False)
        self.register_buffer("pixel_std", std, persistent=False)

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def preprocess_image(self, batched_inputs: Sequence[Mapping[str, Any]]) -> ImageList:
        """Normalise and pad the images into one batch.

        Args:
            batched_inputs: model inputs with ``image``: (3, H, W) uint8/float RGB 0-255.

        Returns:
            ImageList of (B, 3, Hp, Wp) normalised images, padded to the backbone's
            ``size_divisibility`` (padding is 0 after normalisation, i.e. the mean colour).
        """
        images = []
        channels = self.pixel_mean.shape[0]
        for i, x in enumerate(batched_inputs):
            img = x["image"]
            if not isinstance(img, Tensor) or img.dim() != 3 or img.shape[0] != channels:
                shape = tuple(img.shape) if isinstance(img, Tensor) else type(img).__name__
                raise ValueError(f"two_stage: batched_inputs[{i}]['image'] must be a "
                                 f"({channels}, H, W) tensor, got {shape}")
            img = img.to(self.device, dtype=torch.float32)
            if self.input_format == "BGR":
                img = img.flip(0)
            # div_ on the fresh difference: one image-sized temporary fewer
            images.append((img - self.pixel_mean).div_(self.pixel_std))
        divisibility = int(getattr(self.backbone, "size_divisibility", 0))
        return ImageList.from_tensors(images, size_divisibility=divisibility)

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
        proposals, losses = self.proposal_generator(images, features, gt_instances)
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
        proposals, _ = self.proposal_generator(images, features, None)
        results, _ = self.roi_heads(images, features, proposals, None)
        if not do_postprocess:
            return results
        return postprocess_batch(results, batched_inputs, images.image_sizes)
