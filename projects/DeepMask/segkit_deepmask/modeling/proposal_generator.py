"""DeepMask / SharpMask as the proposal generator of a core ``two_stage`` model.

The FAIR pipeline of papers.md 4 (MultiPathNet) runs a Fast R-CNN on DeepMask or SharpMask
proposals. Here a trained, frozen DeepMask/SharpMask model takes the proposal generator's seat:
it reads the raw model inputs (``batched_inputs``: the 0-255 images and their original size),
not the two-stage backbone's features, runs full-image inference
(:mod:`segkit_deepmask.modeling.inference`) and hands the tight boxes of its masks to the ROI
heads in the two-stage model's network-input coordinates.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from segkit.registry import META_ARCHS, PROPOSAL_GENERATORS, Child
from segkit.structures import Boxes, ImageList, Instances

from .inference import full_image_inference

__all__ = ["DeepMaskProposals", "SharpMaskProposals"]

logger = logging.getLogger(__name__)


@PROPOSAL_GENERATORS.register("deepmask", scope="deepmask", children={"model": Child(META_ARCHS)})
class DeepMaskProposals(nn.Module):
    """Frozen DeepMask proposals: ``(images, features, gt, batched_inputs) -> (proposals, {})``.

    Args:
        model: a built ``deepmask`` / ``sharpmask`` meta-architecture; its ``inference``
            settings (scales, ``max_proposals``, threshold, NMS) decide the proposals.
        weights: checkpoint file of that model (``segkit.checkpoint`` format or a bare state
            dict); every tensor must load. None keeps the model's current weights (random
            unless loaded otherwise, e.g. from a two-stage checkpoint that holds them).
        min_box_size: after mapping to the network input, keep boxes wider and taller than
            this (pixels), as the ``precomputed`` generator does.

    The model is frozen (``requires_grad=False``) and always in eval mode; no loss is
    returned. Its masks are not pasted (boxes come from the same binarised masks).
    """

    uses_batched_inputs = True
    requires_refinement = False

    def __init__(self, model: nn.Module, weights: Optional[str] = None,
                 min_box_size: float = 0.0):
        super().__init__()
        name = type(self).__name__
        if not hasattr(model, "inference_settings"):
            raise TypeError(f"{name}: 'model' must be a deepmask/sharpmask meta-architecture, "
                            f"got {type(model).__name__}")
        if self.requires_refinement and getattr(model, "refinement", None) is None:
            raise ValueError(f"{name}: the sharpmask proposal generator needs a model with a "
                             f"refinement (model/proposal_generator=sharpmask builds "
                             f"model=sharpmask); use the deepmask one for DeepMask models")
        self.model = model
        if weights:
            self._load(weights)
        else:
            logger.warning("%s: no 'weights' file: proposals come from the model's current "
                           "weights", name)
        self.model.requires_grad_(False)
        self.model.eval()
        self.settings = model.inference_settings.replace(paste_masks=False)
        self.min_box_size = float(min_box_size)

    def _load(self, path: str) -> None:
        from segkit.checkpoint import load_checkpoint, load_state_dict_report

        report = load_state_dict_report(self.model, load_checkpoint(path)["model"], source=path)
        bad = report.missing + [k for k, _, _ in report.shape_mismatch]
        if bad:
            raise ValueError(f"{type(self).__name__}: weights '{path}' do not fit the model: "
                             f"{len(bad)} tensors missing or of another shape (first: "
                             f"{bad[:3]}); was it trained with another model config?")

    def train(self, mode: bool = True) -> "DeepMaskProposals":
        """The wrapped model stays in eval mode (no dropout, fixed norms) in training too."""
        super().train(mode)
        self.model.eval()
        return self

    def forward(self, images: ImageList, features: Dict[str, Tensor],
                gt_instances: Optional[List[Instances]] = None,
                batched_inputs: Optional[Sequence[Mapping[str, Any]]] = None
                ) -> Tuple[List[Instances], Dict[str, Tensor]]:
        """Propose boxes for every image of the batch.

        Args:
            images: the two-stage model's padded batch; ``image_sizes`` are the network-input
                sizes the proposals are mapped to.
            features: unused (the model runs its own trunk on the raw images).
            gt_instances: unused.
            batched_inputs: the model inputs: ``image`` (3, h, w) 0-255 RGB and
                ``height``/``width`` (original size).

        Returns:
            proposals: per image ``Instances`` at the network-input size with
                ``proposal_boxes`` (P, 4) XYXY and ``objectness_logits`` (P,) (the score
                logits), sorted by decreasing score.
            losses: {} (nothing is learned here).
        """
        if batched_inputs is None or len(batched_inputs) != len(images.image_sizes):
            raise ValueError(f"{type(self).__name__} needs the model inputs (batched_inputs, one "
                             f"per image): it runs on the raw images, not on the features")
        with torch.no_grad():
            results = full_image_inference(self.model, batched_inputs, self.settings)
        return [self._to_input(r, size, images.device)
                for r, size in zip(results, images.image_sizes)], {}

    def _to_input(self, result: Instances, input_size: Tuple[int, int],
                  device: torch.device) -> Instances:
        """Original-image boxes -> network-input boxes. The model saw the input image itself
        (flipped if the mapper flipped it), so only the resize is undone: boxes scale by the
        input / original size, the same map as ``transform_proposals`` for a resize."""
        height, width = result.image_size
        boxes = Boxes(result.pred_boxes.tensor.clone())
        boxes.scale(input_size[1] / width, input_size[0] / height).clip(input_size)
        keep = boxes.nonempty(threshold=self.min_box_size)
        return Instances(tuple(input_size), proposal_boxes=boxes[keep].to(device),
                         objectness_logits=result.score_logits[keep].to(device))


@PROPOSAL_GENERATORS.register("sharpmask", scope="deepmask",
                              children={"model": Child(META_ARCHS)})
class SharpMaskProposals(DeepMaskProposals):
    """:class:`DeepMaskProposals` of a SharpMask model (refined masks give the boxes)."""

    requires_refinement = True
