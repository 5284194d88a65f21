"""Mirror padding for the DeepMask-ours and SharpMask convolutions, and the context crop.

DeepMask-ours replaces the zero padding of every 3x3 and 7x7 convolution by mirror padding, so
that a window near an image border sees image-like values instead of a black frame; with the
32 px of context this narrows the gap between patch training and fully convolutional inference
(papers.md 2.1 item 5). The paper says "reflective"; the released code pads *symmetrically*
(``cba|abcd``: the edge pixel is repeated, Matlab's ``padarray(..., 'symmetric')``). torch's
``"reflect"`` mode is the other mirror (``dcb|abcd``: the edge is not repeated, numpy's
``"reflect"``) and torch has no symmetric mode, so :func:`pad2d` implements it by indexing.
Both are available; ``"symmetric"`` is the default because it is the only concrete definition
the authors give (papers.md section 10: where paper and code differ, both are exposed).
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["PADDING_MODES", "pad2d", "convert_padding", "crop_border"]

PADDING_MODES = ("zeros", "symmetric", "reflect")


def _symmetric_index(size: int, before: int, after: int, device: torch.device) -> Tensor:
    """Source index of every output position of a symmetric pad along one axis."""
    idx = torch.arange(-before, size + after, device=device)
    idx = torch.where(idx < 0, -idx - 1, idx)  # -1 -> 0, -2 -> 1: the edge pixel repeats
    return torch.where(idx >= size, 2 * size - 1 - idx, idx)


def pad2d(x: Tensor, pad: Tuple[int, int, int, int], mode: str) -> Tensor:
    """Pad the last two dimensions of ``x``.

    Args:
        x: (N, C, H, W).
        pad: (left, right, top, bottom), as ``F.pad``.
        mode: "zeros", "symmetric" (``cba|abcd``) or "reflect" (``dcb|abcd``).

    Returns:
        (N, C, H + top + bottom, W + left + right).
    """
    left, right, top, bottom = pad
    if mode == "zeros":
        return F.pad(x, pad)
    if mode == "reflect":
        return F.pad(x, pad, mode="reflect")
    if mode != "symmetric":
        raise ValueError(f"pad2d: mode must be one of {PADDING_MODES}, got {mode!r}")
    h, w = x.shape[-2:]
    if max(left, right) > w or max(top, bottom) > h:
        raise ValueError(f"pad2d: symmetric padding {pad} is larger than the input "
                         f"{h}x{w}; each side can mirror at most the whole input")
    x = x.index_select(-1, _symmetric_index(w, left, right, x.device))
    return x.index_select(-2, _symmetric_index(h, top, bottom, x.device))


class _PadInput:
    """Forward pre-hook that pads a convolution's input (its own padding is set to 0)."""

    def __init__(self, padding: Tuple[int, int], mode: str):
        self.padding, self.mode = padding, mode

    def __call__(self, module: nn.Module, args: tuple) -> tuple:
        ph, pw = self.padding
        return (pad2d(args[0], (pw, pw, ph, ph), self.mode),) + tuple(args[1:])


def convert_padding(module: nn.Module, mode: str) -> nn.Module:
    """Make every padded 3x3 and 7x7 ``nn.Conv2d`` in ``module`` pad with ``mode``.

    The convolutions keep their weights and state-dict keys (so converted checkpoints of the
    core ResNet still load); the padding moves into a forward pre-hook. 1x1 convolutions have
    no padding and max-pools keep theirs, as in the released code (papers.md 2.1 item 5).

    Args:
        module: a module tree, modified in place.
        mode: "zeros" (no change), "symmetric" or "reflect".

    Returns:
        ``module``.

    Raises:
        ValueError: unknown mode, or a convolution that was already converted.
    """
    if mode not in PADDING_MODES:
        raise ValueError(f"padding must be one of {PADDING_MODES}, got {mode!r}")
    if mode == "zeros":
        return module
    for name, conv in module.named_modules():
        if not isinstance(conv, nn.Conv2d) or conv.kernel_size not in ((3, 3), (7, 7)):
            continue
        if getattr(conv, "mirror_padding", None) is not None:
            raise ValueError(f"convert_padding: '{name}' already pads with "
                             f"{conv.mirror_padding!r}")
        if conv.padding_mode != "zeros" or not isinstance(conv.padding, tuple):
            raise ValueError(f"convert_padding: '{name}' must use numeric zero padding, got "
                             f"padding={conv.padding!r}, padding_mode={conv.padding_mode!r}")
        if conv.padding == (0, 0):
            continue
        conv.register_forward_pre_hook(_PadInput(tuple(conv.padding), mode))
        conv.padding = (0, 0)
        conv.mirror_padding = mode
    return module


def crop_border(x: Tensor, border: int) -> Tensor:
    """Drop ``border`` pixels on every side: (N, C, H, W) -> (N, C, H - 2b, W - 2b).

    Patch training feeds the window plus its context; cropping the context off the feature
    maps leaves exactly the window's features (papers.md 2.1 item 3, 3.2's crop column).
    """
    if border == 0:
        return x
    h, w = x.shape[-2:]
    if 2 * border >= min(h, w):
        raise ValueError(f"crop_border: cannot crop {border} px from each side of a {h}x{w} map")
    return x[..., border:h - border, border:w - border]
