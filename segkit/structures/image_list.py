"""``ImageList``: a batch of differently sized images padded into one tensor."""
from __future__ import annotations

import math
from typing import Any, List, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["ImageList"]


class ImageList:
    """Images of different sizes padded (bottom/right) into one (B, C, Hp, Wp) tensor.

    Args:
        tensor: (B, C, Hp, Wp) padded batch.
        image_sizes: the B unpadded sizes (h, w).
    """

    def __init__(self, tensor: Tensor, image_sizes: List[Tuple[int, int]]):
        if tensor.dim() != 4 or tensor.shape[0] != len(image_sizes):
            raise ValueError(f"ImageList: expected a (B, C, H, W) tensor with B = {len(image_sizes)} "
                             f"image sizes, got shape {tuple(tensor.shape)}")
        self.tensor = tensor
        self.image_sizes = [(int(h), int(w)) for h, w in image_sizes]

    def __len__(self) -> int:
        return len(self.image_sizes)

    def __getitem__(self, idx: int) -> Tensor:
        """The unpadded image ``idx``, (C, h, w) (a view)."""
        h, w = self.image_sizes[idx]
        return self.tensor[idx, ..., :h, :w]

    def to(self, *args: Any, **kwargs: Any) -> "ImageList":
        return ImageList(self.tensor.to(*args, **kwargs), self.image_sizes)

    @property
    def device(self) -> torch.device:
        return self.tensor.device

    @staticmethod
    def from_tensors(tensors: Sequence[Tensor], size_divisibility: int = 0,
                     pad_value: float = 0.0) -> "ImageList":
        """Pad images to a common size and stack them.

        The padded size is the per-dimension maximum, rounded up to a multiple of
        ``size_divisibility`` so every FPN level divides evenly (FPN section 3: a stride-32
        top level needs inputs divisible by 32).

        Args:
            tensors: non-empty list of (C, H, W) tensors with equal C, dtype and device.
            size_divisibility: pad H and W up to a multiple of this (0 or 1 = no rounding).
            pad_value: value written into the padding.

        Returns:
            ``ImageList`` with tensor (B, C, Hp, Wp) and the original sizes.
        """
        if not isinstance(tensors, (list, tuple)) or len(tensors) == 0:
            raise ValueError("ImageList.from_tensors: expected a non-empty list of (C, H, W) tensors")
        first = tensors[0]
        for i, t in enumerate(tensors):
            if not isinstance(t, Tensor):
                raise TypeError(f"ImageList.from_tensors: element {i} is {type(t).__name__}, not a Tensor")
            if t.dim() != first.dim() or t.shape[:-2] != first.shape[:-2] or t.dim() != 3:
                raise ValueError(f"ImageList.from_tensors: element {i} has shape {tuple(t.shape)}; "
                                 f"expected (C, H, W) with C = {tuple(first.shape[:-2])}")
        image_sizes = [(int(t.shape[-2]), int(t.shape[-1])) for t in tensors]
        max_h = max(h for h, _ in image_sizes)
        max_w = max(w for _, w in image_sizes)
        if size_divisibility > 1:
            d = int(size_divisibility)
            max_h = int(math.ceil(max_h / d) * d)
            max_w = int(math.ceil(max_w / d) * d)
        batched = first.new_full((len(tensors),) + tuple(first.shape[:-2]) + (max_h, max_w), pad_value)
        for img, pad in zip(tensors, batched):
            pad[..., : img.shape[-2], : img.shape[-1]].copy_(img)
        return ImageList(batched, image_sizes)
