"""Proposal-only detector: backbone -> proposal generator, class-agnostic boxes out.

The RPN of FPN evaluated on its own (papers.md section 5, "RPN on FPN"; Table 1 in section
11.4 reports its AR100/AR1k), and the first stage of the precomputed-proposal pipelines:
Fast R-CNN on fixed FPN-RPN proposals (Table 2), MultiPathNet (section 4) and Mask^X R-CNN
stage-wise training (section 8.4). ``python -m segkit.engine.save_proposals`` writes its
outputs to a file that the ``precomputed`` proposal generator reads back.
"""
from __future__ import annotations

from typing import Any, Dict, List, Sequence

import torch
from torch import nn

from segkit.modeling.postprocess import postprocess_batch
from segkit.modeling.proposal_generator import run_proposal_generator
from segkit.registry import BACKBONES, META_ARCHS, PROPOSAL_GENERATORS, Child
from segkit.structures import Instances

from .base import ImageDetector, backbone_shape_child

__all__ = ["ProposalOnlyDetector"]


@META_ARCHS.register("proposal_only", children={
    "backbone": Child(BACKBONES),
    "proposal_generator": backbone_shape_child(PROPOSAL_GENERATORS),
})
class ProposalOnlyDetector(ImageDetector):
    """Class-agnostic object proposals.

    Args:
        backbone: module with ``forward(x) -> dict[str, Tensor]``, ``output_shape()`` and
            ``size_divisibility``.
        proposal_generator: ``rpn``-like module: ``(images, features, gt_instances) ->
            (proposals, losses)``, proposals sorted by decreasing objectness.
        pixel_mean, pixel_std, input_format: input normalisation, as in ``two_stage``.
    """

    arch = "proposal_only"

    def __init__(self, backbone: nn.Module, proposal_generator: nn.Module,
                 pixel_mean: Sequence[float], pixel_std: Sequence[float],
                 input_format: str = "RGB"):
        # The same normalisation and padding as the R-CNN detectors (weights are interchangeable).
        super().__init__(backbone, pixel_mean, pixel_std, input_format)
        self.proposal_generator = proposal_generator

    def forward(self, batched_inputs: List[Dict[str, Any]]):
        """Training: the proposal generator's losses. Eval: :meth:`inference`.

        Args:
            batched_inputs: one dict per image (README.md, "Conventions"); training needs
                ``instances`` with ``gt_boxes`` (classes are ignored: proposals are
                class-agnostic).

        Returns:
            Training: ``{"loss_rpn_cls", "loss_rpn_loc"}``. Eval: ``[{"instances":
            Instances}]`` at the original resolution.
        """
        if not self.training:
            return self.inference(batched_inputs)
        missing = [i for i, x in enumerate(batched_inputs) if "instances" not in x]
        if missing:
            raise ValueError(f"proposal_only: training inputs {missing} have no 'instances' "
                             f"(ground truth); an image without objects needs empty Instances")
        images = self.preprocess_image(batched_inputs)
        gt_instances = [x["instances"].to(self.device) for x in batched_inputs]
        features = self.backbone(images.tensor)
        _, losses = run_proposal_generator(self.proposal_generator, images, features,
                                           gt_instances, batched_inputs)
        if not losses:
            raise ValueError("proposal_only: the proposal generator returned no losses, so "
                             "there is nothing to train (precomputed proposals?)")
        return dict(losses)

    def inference(self, batched_inputs: List[Dict[str, Any]], do_postprocess: bool = True):
        """Propose object boxes.

        Args:
            batched_inputs: one dict per image (``image``, optional ``height``/``width``).
            do_postprocess: rescale to the original size.

        Returns:
            ``[{"instances": Instances}]`` with ``pred_boxes`` (P, 4) XYXY, ``scores`` (P,)
            = sigmoid(objectness), ``pred_classes`` (P,) all 0, sorted by decreasing score,
            P <= the generator's ``post_nms_topk_test``; at (height, width) with
            post-processing, else (without the dict) at network-input resolution.
        """
        images = self.preprocess_image(batched_inputs)
        features = self.backbone(images.tensor)
        proposals, _ = run_proposal_generator(self.proposal_generator, images, features, None,
                                              batched_inputs)
        results = []
        for p in proposals:
            scores = torch.sigmoid(p.objectness_logits)
            results.append(Instances(p.image_size, pred_boxes=p.proposal_boxes, scores=scores,
                                     pred_classes=torch.zeros_like(scores, dtype=torch.int64)))
        if not do_postprocess:
            return results
        return postprocess_batch(results, batched_inputs, images.image_sizes)
