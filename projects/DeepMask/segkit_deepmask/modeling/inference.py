"""Full-image DeepMask / SharpMask inference: class-agnostic segment proposals of whole images.

papers.md 1.5, 2.4 and 3.4. For every scale of the pyramid (:class:`InferenceSettings`) the
image is resized, padded by ``window / 2`` grey pixels and run fully convolutionally (the
``forward_dense`` forms) at stride 16, giving a score logit and a shared vector per window.
Scores of all scales are ranked together (sigmoid probabilities, no NMS by default) and only
the best ``max_proposals`` windows get masks: the mask head on their vectors (DeepMask), or the
SharpMask top-down pass on their vectors and their crops of the whole-image skip maps, all in
one batch. Each mask is resized into its window of the ORIGINAL image, binarised at 0.2 and
clipped (:mod:`segkit_deepmask.modeling.windows`).

Input resolution: the pyramid is relative to the original image, ``(height, width)`` of the
model input (the input image itself when they are absent). The core test mapper may have
resized the image; each scale is resampled from whatever resolution arrived, so the result
does not depend on ``dataloader.min_size_test`` except through the detail the mapper kept
(keep its resize from shrinking images; COCO's 800 / 1333 only enlarges them). Outputs are
in original-image pixels; a flipped input gives outputs of the flipped image.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from segkit.layers import nms
from segkit.structures import Boxes, Instances

from .inference_settings import InferenceSettings
from .windows import paste_window_masks, window_boxes

__all__ = ["full_image_inference", "predict_image"]


@dataclass
class _Level:
    """Dense outputs of one pyramid scale, kept until the windows of all scales are ranked."""

    log2_scale: float
    scale_xy: Tuple[float, float]  # resized / original size along x and y
    scores: Tensor  # (h, w) score logits
    embeddings: Optional[Tensor]  # (D, h, w) shared vectors (models with head C)
    masks: Optional[Tensor]  # (m * m, h, w) dense coarse masks (models without head C)
    skips: Optional[List[Tensor]]  # refinement skip maps [(C_l, h r_l, w r_l)], coarsest first


def _stride(model: nn.Module) -> int:
    return int(model.backbone.output_shape()[model.in_feature].stride)


def pyramid_level(model: nn.Module, image: Tensor, orig_size: Tuple[int, int],
                  log2_scale: float, settings: InferenceSettings) -> _Level:
    """Dense outputs at one scale.

    Args:
        model: a :class:`~segkit_deepmask.modeling.DeepMask` in eval mode.
        image: (3, h, w) normalised image (any resolution of the original).
        orig_size: (H, W) of the original image; the scale is relative to it.
        log2_scale: the scale s = 2^log2_scale; the image is resized to round((H, W) * s).
        settings: padding grey, antialiasing, which outputs to keep.
    """
    height, width = orig_size
    scale = 2.0 ** log2_scale
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    x = image[None]
    if tuple(x.shape[-2:]) != size:
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False,
                          antialias=settings.antialias)
    # window / 2 of grey on every side (papers.md 2.4), then up to a multiple of the stride at
    # the bottom and right so that every skip map is exactly 2, 4, 8 x the stride-16 grid
    window, stride, half = model.window_size, _stride(model), model.window_size // 2
    padded = [-(-(side + window) // stride) * stride for side in size]
    grey = (settings.pad_value - model.pixel_mean) / model.pixel_std
    canvas = grey.expand(1, 3, *padded).clone()
    canvas[:, :, half:half + size[0], half:half + size[1]] = x
    refine = model.refinement is not None and not settings.coarse_masks
    dense = model.forward_dense(canvas, masks=model.shared_head is None, skips=refine)
    return _Level(log2_scale, (size[1] / width, size[0] / height), dense["scores"][0],
                  None if model.shared_head is None else dense["embeddings"][0],
                  dense["masks"][0] if model.shared_head is None else None,
                  [s[0] for s in dense["skips"]] if refine else None)


def _by_level(level_idx: Tensor) -> Iterator[Tuple[int, Tensor]]:
    """(level, indices of the windows at that level) for every level present."""
    for k in torch.unique(level_idx).tolist():
        yield k, torch.nonzero(level_idx == k).flatten()


def _windows(model: nn.Module, levels: Sequence[_Level], level_idx: Tensor,
             pos: Tensor) -> Tensor:
    """(N, 4) XYXY original-image windows of flat positions ``pos`` of ``levels``."""
    out = torch.zeros((len(pos), 4), device=pos.device)
    for k, sel in _by_level(level_idx):
        w = levels[k].scores.shape[1]
        out[sel] = window_boxes(pos[sel] // w, pos[sel] % w, model.window_size, _stride(model),
                                levels[k].scale_xy).to(out.device)
    return out


def _crop(skip: Tensor, rows: Tensor, cols: Tensor, ratio: int, size: int) -> Tensor:
    """Windows of a skip map: (C, H, W) -> (N, C, size * ratio, size * ratio), window n at
    (rows[n] * ratio, cols[n] * ratio) (papers.md 3.4: offset (x - 1) 2^(j-1), side 10 2^(j-1))."""
    offsets = torch.arange(size * ratio, device=skip.device)
    r = rows[:, None] * ratio + offsets
    c = cols[:, None] * ratio + offsets
    return skip[:, r[:, :, None], c[:, None, :]].permute(1, 0, 2, 3)


def _window_masks(model: nn.Module, levels: Sequence[_Level], level_idx: Tensor, pos: Tensor,
                  refine: bool, batch_size: Optional[int]) -> Tensor:
    """(N, M, M) mask logits of the windows: coarse (m = 56) or refined (160 x 160)."""
    groups, vectors, coarse, crops = [], [], [], None
    stride = _stride(model)
    shapes = model.backbone.output_shape()
    for k, sel in _by_level(level_idx):
        level, p = levels[k], pos[sel]
        groups.append(sel)
        if level.masks is not None:  # no shared vector: the dense masks (NIPS model)
            side = int(round(level.masks.shape[0] ** 0.5))
            coarse.append(level.masks.flatten(1)[:, p].T.reshape(-1, side, side))
            continue
        vectors.append(level.embeddings.flatten(1)[:, p].T)
        if refine:
            w, size = level.scores.shape[1], model.window_size // stride
            ratios = [stride // shapes[f].stride for f in model.refinement.in_features]
            got = [_crop(s, p // w, p % w, r, size) for s, r in zip(level.skips, ratios)]
            crops = [[g] for g in got] if crops is None else [c + [g] for c, g in zip(crops, got)]
    order = torch.cat(groups)
    if coarse:
        logits = torch.cat(coarse)
    elif refine:  # one batch of all top windows (papers.md 3.4), optionally in chunks
        vec, skips = torch.cat(vectors), [torch.cat(c) for c in crops]
        step = batch_size or max(1, len(vec))
        logits = torch.cat([model.refinement.decode(vec[i:i + step],
                                                    [s[i:i + step] for s in skips])[:, 0]
                            for i in range(0, len(vec), step)])
    else:
        logits = model.coarse_mask_logits(torch.cat(vectors))
    out = torch.empty_like(logits)
    out[order] = logits
    return out


@torch.no_grad()
def predict_image(model: nn.Module, image: Tensor, orig_size: Tuple[int, int],
                  settings: InferenceSettings) -> Instances:
    """Segment proposals of one image.

    Args:
        model: a DeepMask / SharpMask meta-architecture in eval mode.
        image: (3, h, w) normalised image (a resampling of the original image).
        orig_size: (H, W) of the original image.
        settings: pyramid, number of windows, threshold, NMS.

    Returns:
        Instances of size (H, W), sorted by decreasing score, P <= ``max_proposals``:
        ``pred_boxes`` (P, 4) XYXY tight boxes of the masks, ``scores`` (P,) sigmoid scores,
        ``pred_classes`` (P,) all 0, ``pred_masks`` (P, H, W) bool (with ``paste_masks``),
        ``score_logits`` (P,), ``window_boxes`` (P, 4) XYXY windows, ``log2_scales`` (P,).
    """
    levels = [pyramid_level(model, image, orig_size, s, settings) for s in settings.log2_scales()]
    logits = torch.cat([lv.scores.flatten() for lv in levels])
    level_idx = torch.cat([torch.full((lv.scores.numel(),), k, device=logits.device)
                           for k, lv in enumerate(levels)])
    pos = torch.cat([torch.arange(lv.scores.numel(), device=logits.device) for lv in levels])
    order = torch.sort(logits, descending=True, stable=True).indices
    refine = model.refinement is not None and not settings.coarse_masks
    coarse = None
    if settings.nms_thresh is not None:
        order = order[: settings.nms_pre_topk]
        coarse = _window_masks(model, levels, level_idx[order], pos[order], False, None)
        boxes, _ = paste_window_masks(coarse, _windows(model, levels, level_idx[order],
                                                       pos[order]),
                                      orig_size, settings.mask_threshold, with_masks=False)
        keep = nms(boxes, logits[order], settings.nms_thresh)[: settings.max_proposals]
        order, coarse = order[keep], coarse[keep]
    order = order[: settings.max_proposals]
    level_idx, pos, logits = level_idx[order], pos[order], logits[order]
    windows = _windows(model, levels, level_idx, pos)
    if coarse is not None and not refine:  # the NMS pass already computed the kept masks
        masks = coarse
    else:
        masks = _window_masks(model, levels, level_idx, pos, refine, settings.refine_batch_size)
    boxes, pasted = paste_window_masks(masks, windows, orig_size, settings.mask_threshold,
                                       with_masks=settings.paste_masks)
    scales = torch.tensor([lv.log2_scale for lv in levels], device=logits.device)
    out = Instances(tuple(orig_size), pred_boxes=Boxes(boxes), scores=torch.sigmoid(logits),
                    pred_classes=torch.zeros(len(logits), dtype=torch.int64,
                                             device=logits.device),
                    score_logits=logits, window_boxes=Boxes(windows),
                    log2_scales=scales[level_idx])
    if pasted is not None:
        out.pred_masks = pasted
    return out


def full_image_inference(model: nn.Module, batched_inputs: Sequence[Mapping[str, Any]],
                         settings: Optional[InferenceSettings] = None) -> List[Instances]:
    """:func:`predict_image` of every model input (images of any sizes, one at a time).

    Args:
        model: a DeepMask / SharpMask meta-architecture in eval mode.
        batched_inputs: core model inputs: ``image`` (3, h, w) 0-255 RGB, optional
            ``height``/``width`` (original size; default the image's).
        settings: default ``model.inference_settings``.

    Returns:
        One Instances per input at its original size (see :func:`predict_image`).
    """
    if model.training:
        raise ValueError(f"{model.arch}: full-image inference needs eval mode (dropout off); "
                         f"call model.eval() first")
    settings = settings if settings is not None else model.inference_settings
    images = model.preprocess_image(batched_inputs)  # checked, normalised (padded together)
    out = []
    for i, (inp, (h, w)) in enumerate(zip(batched_inputs, images.image_sizes)):
        size = (int(inp.get("height", h)), int(inp.get("width", w)))
        out.append(predict_image(model, images.tensor[i, :, :h, :w], size, settings))
    return out
