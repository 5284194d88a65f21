"""Checks of the patch sampler's batches, with errors that name what was expected.

A batch is a list of sample dicts, all of one ``kind`` ("mask" or "score"); each has
``image`` (3, S, S), mask samples ``mask`` (g, g) in {-1, +1}, score samples a scalar
``label`` +1 / -1 (see :mod:`segkit_deepmask.modeling.meta_arch`).
"""
from __future__ import annotations

from collections import Counter
from typing import Any, Mapping, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["KINDS", "batch_kind", "check_image_sizes", "stack_labels"]

KINDS = ("mask", "score")


def batch_kind(batch: Sequence[Mapping[str, Any]], arch: str) -> str:
    """The one ``kind`` of a training batch.

    Raises:
        ValueError: empty batch, a sample without a valid kind, or a batch mixing kinds
            (training alternates between the two, papers.md 1.3).
    """
    if not isinstance(batch, (list, tuple)) or not batch:
        raise ValueError(f"{arch}: expected a non-empty list of sample dicts, got "
                         f"{type(batch).__name__}")
    kinds = [s.get("kind") if isinstance(s, Mapping) else None for s in batch]
    bad = [i for i, k in enumerate(kinds) if k not in KINDS]
    if bad:
        raise ValueError(f"{arch}: samples {bad} have kind {kinds[bad[0]]!r}; every training "
                         f"sample needs 'kind' in {KINDS}")
    if len(set(kinds)) > 1:
        raise ValueError(f"{arch}: a batch must be all 'mask' or all 'score' samples "
                         f"(training alternates between the two, papers.md 1.3), got "
                         f"{dict(Counter(kinds))}")
    return kinds[0]


def check_image_sizes(batch: Sequence[Mapping[str, Any]], input_size: int, window_size: int,
                      arch: str) -> None:
    """Raise a ValueError unless every ``image`` is a (3, input_size, input_size) tensor."""
    expected = (3, input_size, input_size)
    for i, sample in enumerate(batch):
        image = sample.get("image") if isinstance(sample, Mapping) else None
        if not isinstance(image, Tensor) or tuple(image.shape) != expected:
            got = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
            raise ValueError(f"{arch}: sample {i} 'image' must be a {expected} tensor "
                             f"(input_size = window_size {window_size} + 2 x context), got {got}")


def stack_labels(batch: Sequence[Mapping[str, Any]], key: str, shape: Tuple[int, ...],
                 device: torch.device, arch: str) -> Tensor:
    """``sample[key]`` of every sample as one (N, *shape) float tensor of -1 / +1.

    Raises:
        ValueError: a missing label, a label of another shape (e.g. masks rasterised at a
            label size other than the model's), or values other than -1 / +1 (0/1 masks).
    """
    labels = []
    for i, sample in enumerate(batch):
        if key not in sample:
            raise ValueError(f"{arch}: {sample.get('kind')} sample {i} has no '{key}'")
        value = torch.as_tensor(sample[key], dtype=torch.float32, device=device)
        if tuple(value.shape) != shape and not (shape == () and value.numel() == 1):
            what = "label_size" if key == "mask" else "a scalar label"
            raise ValueError(f"{arch}: sample {i} '{key}' has shape {tuple(value.shape)}, "
                             f"expected {shape} ({what}; the sampler and the model must agree)")
        labels.append(value.reshape(shape))
    stacked = torch.stack(labels)
    if not bool((stacked.abs() == 1).all()):
        raise ValueError(f"{arch}: '{key}' labels must be -1 or +1 (papers.md 1.2), got values "
                         f"{torch.unique(stacked)[:6].tolist()}")
    return stacked
