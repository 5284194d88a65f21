"""Balanced random sampling of positive and negative training examples.

Both R-CNN stages train on a fixed-size mini-batch per image with a target foreground
fraction: 256 anchors at 1:1 for the RPN (FPN section 5) and 512 RoIs at 1:3 for the box head
(Mask R-CNN section 3, "N RoIs/image at 1:3 pos:neg"). When there are too few positives the
batch is filled with negatives.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

__all__ = ["subsample_labels"]


def subsample_labels(labels: Tensor, num_samples: int, positive_fraction: float,
                     bg_label: int) -> Tuple[Tensor, Tensor]:
    """Randomly pick at most ``num_samples`` elements, at most ``positive_fraction`` positive.

    The draw uses ``torch.randperm`` on ``labels.device`` (first for positives, then for
    negatives), so it is reproducible under ``torch.manual_seed`` and consumes the random
    stream exactly like torchvision's ``BalancedPositiveNegativeSampler`` for one image.

    Args:
        labels: (N,) int tensor. ``-1`` = ignore, ``bg_label`` = negative, any other value =
            positive (e.g. foreground class ids 0..K-1 with ``bg_label = K`` in the ROI heads,
            or {-1, 0, 1} with ``bg_label = 0`` in the RPN).
        num_samples: total number of samples wanted.
        positive_fraction: upper bound on the fraction of positives, in [0, 1].
        bg_label: label value of negatives.

    Returns:
        pos_idx: (P,) int64 indices into ``labels`` of the sampled positives.
        neg_idx: (Q,) int64 indices of the sampled negatives; P + Q <= num_samples.
    """
    if labels.dim() != 1:
        raise ValueError(f"subsample_labels: labels must be 1-D (N,), got {tuple(labels.shape)}")
    if not 0.0 <= positive_fraction <= 1.0:
        raise ValueError(
            f"subsample_labels: positive_fraction must be in [0, 1], got {positive_fraction}"
        )
    if num_samples < 0:
        raise ValueError(f"subsample_labels: num_samples must be >= 0, got {num_samples}")

    positive = torch.nonzero((labels != -1) & (labels != bg_label), as_tuple=True)[0]
    negative = torch.nonzero(labels == bg_label, as_tuple=True)[0]

    num_pos = min(positive.numel(), int(num_samples * positive_fraction))
    # Fill the batch with negatives when positives are scarce.
    num_neg = min(negative.numel(), num_samples - num_pos)

    perm_pos = torch.randperm(positive.numel(), device=positive.device)[:num_pos]
    perm_neg = torch.randperm(negative.numel(), device=negative.device)[:num_neg]
    return positive[perm_pos], negative[perm_neg]
