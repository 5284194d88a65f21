"""DeepMask / SharpMask meta-architecture: patch training on the sampler's batches.

One class serves both papers, because SharpMask is DeepMask-ours plus a top-down refinement
("the same net yields coarse or sharp masks", papers.md 3.3). It is registered twice:

* ``deepmask.deepmask``: trunk -> (optional head C) -> mask head + score head; the NIPS model
  (papers.md 1.1: no shared head, branch heads on the feature map) or DeepMask-ours (2.1).
  A refinement may be given (then masks come from it), but need not be.
* ``deepmask.sharpmask``: the same with a required ``refinement`` (papers.md 3.1-3.2).

Sample contract (the patch sampler, ``segkit_deepmask.data``): a batch is a list of dicts, all
of one ``kind``, "mask" or "score" (papers.md 1.3 and 2.2: training alternates between
batches of the two kinds). Each has ``image`` (3, S, S) RGB 0-255 (uint8, as the core mapper's
images) with S = ``input_size``; mask samples add ``mask`` (g, g) in {-1, +1} with
g = ``label_size``; score samples add ``label``, a scalar -1 / +1. Other keys are ignored.

Eval mode serves two kinds of input: the sampler's samples (they carry ``kind``) get per-patch
predictions (:meth:`DeepMask.predict_patches`); the core test mapper's inputs (whole images)
get segment proposals at the original resolution (:meth:`DeepMask.inference`,
``segkit_deepmask.modeling.inference``).
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from segkit.modeling.meta_arch.base import ImageDetector
from segkit.registry import META_ARCHS

from ..layers import crop_border
from .batch import batch_kind, check_image_sizes, stack_labels
from .inference import full_image_inference
from .inference_settings import InferenceSettings
from .losses import PatchLogisticLoss
from .wiring import DEFAULT_IN_FEATURE, DEFAULT_WINDOW, meta_arch_children

__all__ = ["DeepMask", "IMAGENET_MEAN", "IMAGENET_STD"]

# ImageNet statistics (papers.md 2.2: 0.485, ... on [0, 1] pixels) in the 0-255 scale of the
# core's images and of the sampler's patches.
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)


@META_ARCHS.register("sharpmask", scope="deepmask", children=meta_arch_children(False))
@META_ARCHS.register("deepmask", scope="deepmask", children=meta_arch_children(True))
class DeepMask(ImageDetector):
    """Class-agnostic segment proposals: a mask and an objectness score per window.

    Args:
        backbone: trunk ``{name: (N, C, H/s, W/s)}`` with ``output_shape()`` (``vgg_a``,
            ``resnet_trunk``).
        mask_head: window features or shared vector -> (N, m, m) coarse mask logits.
        score_head: window features or shared vector -> (N,) score logits.
        shared_head: optional head C, window features -> (N, D) vector that both heads read
            (DeepMask-ours); None for the NIPS model, whose heads read the feature map.
        refinement: optional SharpMask refinement, (shared vector, window features) ->
            (N, 1, W, W) logits; when given, the training and eval masks come from it.
        mask_loss: loss of mask batches (default: per-patch pixel mean, summed over the
            batch, papers.md 1.3).
        score_loss: loss of score batches (default: the same with lambda = 1/32: batch 32
            times 1/32 is the released code's x32 gradient scaling of mask batches relative to
            its batch-averaged score loss, papers.md 2.3 and 10.3).
        in_feature: trunk feature the heads read ("res4", "conv5" for VGG-A).
        input_size: side S of the input patches (192 = 160 + 2 x 16 context; 224 for NIPS).
        window_size: side W of the window the mask and score describe (160; 224 for NIPS).
            The context (S - W) / 2 is cropped off every feature map before the heads.
        label_size: side g of the mask labels; mask logits are resampled bilinearly to it
            (112 for DeepMask-ours, papers.md 2.1; 160 for SharpMask, 3.2; 224 for NIPS, the
            fixed up-sampling to the patch of 1.1).
        align_corners: of that bilinear resampling (False: pixel areas line up).
        train_refinement_only: SharpMask's second stage (papers.md 3.3): trunk, shared head,
            mask head and score head get ``requires_grad=False`` and stay in eval mode (norms
            and dropout), so only the refinement trains, on mask batches only.
        pixel_mean, pixel_std: per-channel statistics in the 0-255 scale of the images
            (ImageNet's, papers.md 2.2); ``input_format``: "RGB" or "BGR" weights.
        inference: full-image inference options, a mapping of
            :class:`~segkit_deepmask.modeling.InferenceSettings` fields (scales, zoom,
            ``max_proposals``, ``mask_threshold``, NMS); None: the paper's defaults.
    """

    arch = "deepmask"
    # eval outputs are proposals (pred_boxes, scores): python -m segkit.engine.save_proposals
    # accepts its checkpoints
    makes_proposals = True
    # and they carry masks: the engine's evaluation scores "segm" (mask AR) too
    predicts_masks = True

    def __init__(self, backbone: nn.Module, mask_head: nn.Module, score_head: nn.Module,
                 shared_head: Optional[nn.Module] = None,
                 refinement: Optional[nn.Module] = None,
                 mask_loss: Optional[nn.Module] = None, score_loss: Optional[nn.Module] = None,
                 in_feature: str = DEFAULT_IN_FEATURE, input_size: int = 192,
                 window_size: int = DEFAULT_WINDOW,
                 label_size: int = 112, align_corners: bool = False,
                 train_refinement_only: bool = False,
                 pixel_mean: Sequence[float] = IMAGENET_MEAN,
                 pixel_std: Sequence[float] = IMAGENET_STD, input_format: str = "RGB",
                 inference: Optional[Mapping[str, Any]] = None):
        super().__init__(backbone, pixel_mean, pixel_std, input_format)
        self.inference_settings = InferenceSettings.from_node(inference)
        self.shared_head, self.mask_head, self.score_head = shared_head, mask_head, score_head
        self.refinement = refinement
        self.mask_loss = mask_loss if mask_loss is not None else PatchLogisticLoss()
        self.score_loss = score_loss if score_loss is not None else PatchLogisticLoss(1 / 32)
        self.in_feature, self.input_size, self.window_size = in_feature, input_size, window_size
        self.label_size, self.align_corners = label_size, align_corners
        self._borders = self._context_borders()
        if train_refinement_only and refinement is None:
            raise ValueError("deepmask: train_refinement_only needs a refinement (SharpMask's "
                             "second stage trains only the refinement, papers.md 3.3)")
        self.train_refinement_only = train_refinement_only
        for module in self.frozen_modules():
            module.requires_grad_(False)
        self.train(self.training)

    def _context_borders(self) -> Dict[str, int]:
        """Pixels cropped off each used feature map: the context over the feature's stride
        (1 at res4, 2 at res3, 4 at res2, 8 at conv1 for 16 px of context, papers.md 3.2)."""
        context2 = self.input_size - self.window_size
        if context2 < 0 or context2 % 2:
            raise ValueError(f"deepmask: input_size {self.input_size} - window_size "
                             f"{self.window_size} must be an even number >= 0 (context on "
                             f"both sides)")
        shapes = self.backbone.output_shape()
        used = [self.in_feature] + list(getattr(self.refinement, "in_features", []))
        borders = {}
        for name in used:
            if name not in shapes:
                raise ValueError(f"deepmask: feature '{name}' is not returned by the trunk, "
                                 f"which returns {sorted(shapes)}")
            stride = shapes[name].stride
            if (context2 // 2) % stride or self.window_size % stride:
                raise ValueError(f"deepmask: context {context2 // 2} px and window "
                                 f"{self.window_size} px must be multiples of the stride "
                                 f"{stride} of '{name}'")
            borders[name] = context2 // 2 // stride
        return borders

    # ------------------------------------------------------------------ freezing
    def frozen_modules(self) -> List[nn.Module]:
        """Modules frozen by ``train_refinement_only`` (empty otherwise)."""
        if not self.train_refinement_only:
            return []
        parts = (self.backbone, self.shared_head, self.mask_head, self.score_head)
        return [m for m in parts if m is not None]

    def train(self, mode: bool = True) -> "DeepMask":
        """Set train/eval mode; frozen modules always stay in eval mode (fixed norm
        statistics, no dropout) so the refinement trains on the stage-1 features."""
        super().train(mode)
        for module in self.frozen_modules():
            module.eval()
        return self

    # ------------------------------------------------------------------ patch forward
    def window_features(self, images: Tensor) -> Dict[str, Tensor]:
        """Trunk features of the windows: the context cropped off every used feature.

        Args:
            images: (N, 3, S, S) normalised patches.

        Returns:
            {name: (N, C, W / stride, W / stride)} for ``in_feature`` and the refinement's
            skips, e.g. res4 (N, 1024, 10, 10).
        """
        features = self.backbone(images)
        return {name: crop_border(features[name], b) for name, b in self._borders.items()}

    def embed(self, features: Mapping[str, Tensor]) -> Tensor:
        """What the heads read: the shared vector (N, D), or the window map (N, C, s, s)."""
        x = features[self.in_feature]
        return x if self.shared_head is None else self.shared_head(x)

    def coarse_mask_logits(self, embedding: Tensor) -> Tensor:
        """The DeepMask mask head's (N, m, m) logits (56 x 56; papers.md 3.4, ``-dm``)."""
        return self.mask_head(embedding)

    def mask_logits(self, features: Mapping[str, Tensor], embedding: Tensor) -> Tensor:
        """(N, g, g) mask logits at ``label_size``: the refinement's if there is one, else the
        mask head's, resampled bilinearly."""
        if self.refinement is not None:
            logits = self.refinement(embedding, features).squeeze(1)
        else:
            logits = self.coarse_mask_logits(embedding)
        if logits.shape[-1] == self.label_size:
            return logits
        return F.interpolate(logits.unsqueeze(1), size=(self.label_size, self.label_size),
                             mode="bilinear", align_corners=self.align_corners).squeeze(1)

    def forward(self, batch: Sequence[Mapping[str, Any]]):
        """Training: the loss of one batch. Eval: :meth:`predict_patches` for the sampler's
        samples (every one has ``kind``), else :meth:`inference` on whole images.

        Args:
            batch: training: sample dicts, all of one ``kind`` (module docstring); eval: those,
                or core model inputs (``image``, ``height``, ``width``, ...).

        Returns:
            Training: ``{"loss_mask": scalar}`` for a mask batch, ``{"loss_score": scalar}``
            for a score batch (only the branch that the batch trains runs).
            Eval: see :meth:`predict_patches` and :meth:`inference`.
        """
        if not self.training:
            if batch and all(isinstance(s, Mapping) and "kind" in s for s in batch):
                return self.predict_patches(batch)
            return self.inference(batch)
        kind = batch_kind(batch, self.arch)
        if kind == "score" and self.train_refinement_only:
            raise ValueError("deepmask: got a score batch but train_refinement_only freezes "
                             "the score head, so it would train nothing; SharpMask's second "
                             "stage samples mask batches only (papers.md 3.3, hfreq = 0)")
        features = self.window_features(self._images(batch))
        embedding = self.embed(features)
        if kind == "mask":
            labels = stack_labels(batch, "mask", (self.label_size, self.label_size), self.device,
                                  self.arch)
            return {"loss_mask": self.mask_loss(self.mask_logits(features, embedding), labels)}
        labels = stack_labels(batch, "label", (), self.device, self.arch)
        return {"loss_score": self.score_loss(self.score_head(embedding), labels)}

    def _images(self, batch: Sequence[Mapping[str, Any]]) -> Tensor:
        """(N, 3, S, S) normalised patches, after checking every image's size."""
        check_image_sizes(batch, self.input_size, self.window_size, self.arch)
        return self.preprocess_image(batch).tensor

    def inference(self, batched_inputs: Sequence[Mapping[str, Any]]
                  ) -> List[Dict[str, Any]]:
        """Segment proposals of whole images (papers.md 1.5, 2.4, 3.4), eval mode.

        Args:
            batched_inputs: core model inputs: ``image`` (3, h, w) 0-255 RGB, resized or not,
                ``height``/``width`` the original size (default: the image's).

        Returns:
            Per image ``{"instances": Instances}`` at (height, width), the best
            ``inference.max_proposals`` windows by score: ``pred_boxes`` (P, 4) XYXY (tight
            boxes of the masks), ``scores`` (P,) sigmoid scores, ``pred_classes`` all 0,
            ``pred_masks`` (P, height, width) bool, ``score_logits``, ``window_boxes`` (P, 4)
            XYXY and ``log2_scales`` (see :func:`~segkit_deepmask.modeling.inference.
            predict_image`).
        """
        return [{"instances": r} for r in full_image_inference(self, batched_inputs)]

    @torch.no_grad()
    def predict_patches(self, batch: Sequence[Mapping[str, Any]]) -> List[Dict[str, Tensor]]:
        """Predict every patch of ``batch`` (``kind`` and labels are not needed).

        Returns:
            Per sample ``{"mask_logits": (g, g), "score_logit": ()}``, plus
            ``"coarse_mask_logits": (m, m)`` (the DeepMask head) when there is a refinement.
        """
        features = self.window_features(self._images(batch))
        embedding = self.embed(features)
        masks = self.mask_logits(features, embedding)
        scores = self.score_head(embedding)
        out = [{"mask_logits": m, "score_logit": s} for m, s in zip(masks, scores)]
        if self.refinement is not None:
            for d, coarse in zip(out, self.coarse_mask_logits(embedding)):
                d["coarse_mask_logits"] = coarse
        return out

    # ------------------------------------------------------------------ dense forward
    def forward_dense(self, images: Tensor, masks: bool = True,
                      skips: bool = True) -> Dict[str, Any]:
        """Fully convolutional outputs over whole images (papers.md 1.5, 2.4, 3.4).

        Nothing is cropped: output position (i, j) is the window whose feature map starts at
        (i, j) of the trunk's ``in_feature`` map, i.e. the window of side W at pixels
        [16 i, 16 i + W) x [16 j, 16 j + W) (its patch, with context, starts 16 px earlier).
        On a 192 x 192 input, position (1, 1) is exactly the patch forward of that input.

        Args:
            images: (N, 3, H, W) normalised images (:meth:`preprocess_image`).
            masks: compute the dense ``masks`` (full-image inference needs them only without
                a shared head: with one, the mask head runs on the best windows' vectors).
            skips: compute the refinement's ``skips`` (when there is a refinement).

        Returns:
            ``features``: the trunk's {name: map}; ``scores``: (N, h, w) logits;
            ``masks``: (N, m * m, h, w) coarse mask logits (row-major m x m per position);
            with a refinement, ``skips``: its horizontal maps over the whole image, shared by
            all windows (the windows' top-down passes are :meth:`SharpMaskRefinement.decode`
            on the embeddings of the top-scoring ones); ``embeddings``: (N, D, h, w) shared
            vectors, or the feature map without a shared head.
        """
        features = self.backbone(images)
        x = features[self.in_feature]
        emb = x if self.shared_head is None else self.shared_head.forward_dense(x)
        out = {"features": features, "embeddings": emb,
               "scores": self.score_head.forward_dense(emb)}
        if masks:
            out["masks"] = self.mask_head.forward_dense(emb)
        if skips and self.refinement is not None:
            out["skips"] = self.refinement.horizontal(features)
        return out
