"""Proposals read from a file instead of predicted: Fast R-CNN on fixed proposals.

The FPN paper's Fast R-CNN ablations (papers.md section 5, Table 2), MultiPathNet (section 4,
on DeepMask/SharpMask proposals) and Mask^X R-CNN stage-wise training (section 8.4, "precomputed
RPN R-50-FPN 1x proposals") all run the second stage on proposals computed once by another
model. ``precomputed`` plays the proposal generator's part in ``two_stage``: it looks every
image up by ``image_id`` in a :mod:`segkit.data.proposals` file (original coordinates) and
maps the boxes into the network input exactly as the mapper mapped the image (resize, flip).

Proposal generators that need the model inputs (image ids, original sizes, transforms) set
``uses_batched_inputs = True``; meta-architectures call them through :func:`run_proposal_generator`.
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from segkit.data.proposals import ProposalFile, image_id_key, load_proposals, transform_proposals
from segkit.registry import PROPOSAL_GENERATORS
from segkit.structures import Boxes, ImageList, Instances

__all__ = ["PrecomputedProposals", "run_proposal_generator"]


def run_proposal_generator(generator: nn.Module, images: ImageList, features: Dict[str, Tensor],
                           gt_instances: Optional[List[Instances]],
                           batched_inputs: Sequence[Mapping[str, Any]]
                           ) -> Tuple[List[Instances], Dict[str, Tensor]]:
    """Call ``generator(images, features, gt_instances)``, adding ``batched_inputs=`` for
    generators that declare ``uses_batched_inputs`` (the RPN's signature stays as it is)."""
    if getattr(generator, "uses_batched_inputs", False):
        return generator(images, features, gt_instances, batched_inputs=batched_inputs)
    return generator(images, features, gt_instances)


@PROPOSAL_GENERATORS.register("precomputed")
class PrecomputedProposals(nn.Module):
    """Proposals from a file: ``(images, features, gt, batched_inputs) -> (proposals, {})``.

    Args:
        file: proposal file (``python -m segkit.engine.save_proposals``) used in training, and
            in eval mode too unless ``test_file`` is given.
        test_file: proposal file used in eval mode (the validation images). Needed when the
            training and validation images share ids (e.g. the embedded dataset); COCO ids are
            unique across splits, so one file holding both splits also works.
        max_proposals: keep at most this many (the best) proposals per image; None keeps all.
            The FPN paper trains Fast R-CNN on 2000 proposals per image and tests on 1000.
        min_score: drop proposals whose stored score is below this.
        min_box_size: after mapping and clipping, keep boxes wider and taller than this.
    """

    uses_batched_inputs = True

    def __init__(self, file: Optional[str] = None, test_file: Optional[str] = None,
                 max_proposals: Optional[int] = None, min_score: float = 0.0,
                 min_box_size: float = 0.0):
        super().__init__()
        if not file:
            raise ValueError("precomputed proposals: 'file' is not set; give the proposal "
                             "file with model.proposal_generator.file=PATH (written by "
                             "python -m segkit.engine.save_proposals)")
        if max_proposals is not None and int(max_proposals) <= 0:
            raise ValueError(f"precomputed proposals: max_proposals must be positive or null, "
                             f"got {max_proposals}")
        self.max_proposals = None if max_proposals is None else int(max_proposals)
        self.min_score, self.min_box_size = float(min_score), float(min_box_size)
        # Read once here; plain attributes (not buffers), so checkpoints never carry them.
        self.train_proposals = load_proposals(file)
        self.test_proposals = (load_proposals(test_file) if test_file and test_file != file
                               else self.train_proposals)

    def forward(self, images: ImageList, features: Dict[str, Tensor],
                gt_instances: Optional[List[Instances]] = None,
                batched_inputs: Optional[Sequence[Mapping[str, Any]]] = None
                ) -> Tuple[List[Instances], Dict[str, Tensor]]:
        """Look up and map the proposals of every image of the batch.

        Args:
            images: the padded batch; ``image_sizes`` give each network-input size.
            features: unused (the proposals do not depend on them).
            gt_instances: unused.
            batched_inputs: the model inputs: ``image_id``, ``height``/``width`` (original
                size, defaulting to the input size) and the mapper's ``transforms``.

        Returns:
            proposals: per image ``Instances`` with ``proposal_boxes`` (P, 4) XYXY at the
                network-input size and ``objectness_logits`` (P,) (the logit of the stored
                score), sorted by decreasing score.
            losses: {} (nothing is learned here).
        """
        if batched_inputs is None or len(batched_inputs) != len(images):
            raise ValueError("precomputed proposals need the model inputs (batched_inputs, one "
                             "per image) to find each image's proposals by image_id")
        source = self.train_proposals if self.training else self.test_proposals
        return [self._one_image(source, x, size, images.device)
                for x, size in zip(batched_inputs, images.image_sizes)], {}

    def _one_image(self, source: ProposalFile, inp: Mapping[str, Any],
                   input_size: Tuple[int, int], device: torch.device) -> Instances:
        if inp.get("image_id") is None:
            raise ValueError(f"precomputed proposals from '{source.path}': the model input "
                             "has no 'image_id' (use the dataset mapper's output)")
        key = image_id_key(inp["image_id"])
        if key not in source.boxes:
            raise KeyError(f"proposal file '{source.path}' has no proposals for image_id "
                           f"{key!r} ({len(source)} images in the file); was it written for "
                           "another dataset or split?")
        orig = (int(inp.get("height", input_size[0])), int(inp.get("width", input_size[1])))
        if key in source.image_sizes and source.image_sizes[key] != orig:
            raise ValueError(f"proposal file '{source.path}': image_id {key!r} was "
                             f"{source.image_sizes[key]} (h, w) when the proposals were made "
                             f"but the input says {orig}; was it written for another dataset "
                             "or split?")
        boxes, scores = source.boxes[key], source.scores[key]  # sorted by decreasing score
        if self.min_score > 0:
            keep = scores >= self.min_score
            boxes, scores = boxes[keep], scores[keep]
        if self.max_proposals is not None:
            boxes, scores = boxes[: self.max_proposals], scores[: self.max_proposals]
        mapped = Boxes(transform_proposals(boxes, orig, input_size, inp.get("transforms")))
        mapped.clip(input_size)
        keep = mapped.nonempty(threshold=self.min_box_size)
        return Instances(input_size, proposal_boxes=mapped[keep].to(device),
                         objectness_logits=torch.logit(scores[keep], eps=1e-6).to(device))
