"""Thin wrappers over torch layers: ``Conv2d`` with fused norm/activation, ``cat``."""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from .batch_norm import FrozenBatchNorm2d

__all__ = ["Conv2d", "cat"]


def cat(tensors: Sequence[Tensor], dim: int = 0) -> Tensor:
    """``torch.cat`` that skips the copy for a single tensor.

    Args:
        tensors: non-empty sequence of tensors with equal shapes except along ``dim``.
        dim: dimension to concatenate along.
    """
    if not isinstance(tensors, (list, tuple)):
        raise TypeError(f"cat: expected a list or tuple of tensors, got {type(tensors).__name__}")
    if len(tensors) == 0:
        raise ValueError("cat: got an empty list; the result's shape and dtype are unknown")
    if len(tensors) == 1:
        return tensors[0]
    return torch.cat(list(tensors), dim)


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` followed by an optional norm layer and activation.

    Same positional/keyword arguments as ``nn.Conv2d`` plus:

    Args:
        norm: a module applied after the convolution (e.g. from ``get_norm``), or None.
        activation: a callable applied last (e.g. ``torch.nn.functional.relu``), or None.

    Input (N, C_in, H, W) -> output (N, C_out, H', W'). Conv weights are stored as ``weight``
    / ``bias`` and the norm as ``norm``, so state-dict keys read ``conv.norm.weight``.
    """

    def __init__(self, *args, norm: Optional[nn.Module] = None,
                 activation: Optional[Callable[[Tensor], Tensor]] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.norm = norm
        self.activation = activation

    def forward(self, x: Tensor) -> Tensor:
        x = super().forward(x)
        if isinstance(self.norm, FrozenBatchNorm2d):
            x = self.norm.forward_(x)  # x is the conv's fresh output: no copy needed
        elif self.norm is not None:
            x = self.norm(x)
        if self.activation is not None:
            x = self.activation(x)
        return x
