"""What every meta-architecture shares: pixel normalisation and batching of the model input.

Model I/O: README.md, "Conventions". Images arrive as (3, H, W) RGB in the 0-255 scale.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from segkit.registry import Child
from segkit.structures import ImageList

__all__ = ["ImageDetector", "backbone_shape_child"]


def _backbone_shape(built: dict, kwargs: dict, runtime: dict) -> dict:
    return {"input_shape": built["backbone"].output_shape()}


def backbone_shape_child(registry) -> Child:
    """A child built with ``input_shape=`` the already-built backbone's ``output_shape()``."""
    return Child(registry, runtime=_backbone_shape)


class ImageDetector(nn.Module):
    """Base of the meta-architectures: normalises images and pads them into one batch.

    Args:
        backbone: module with ``forward(x) -> dict[str, Tensor]``, ``output_shape()`` and
            ``size_divisibility``.
        pixel_mean: per-channel mean in the 0-255 scale, in ``input_format`` channel order.
        pixel_std: per-channel std in the 0-255 scale, in ``input_format`` channel order.
        input_format: channel order the weights expect: "RGB" (torchvision, segkit) or "BGR"
            (Detectron/caffe2 weights). Images always arrive RGB and are flipped for "BGR".

    Subclasses set ``arch`` (their registry name, used in error messages).
    """

    arch = "detector"

    def __init__(self, backbone: nn.Module, pixel_mean: Sequence[float],
                 pixel_std: Sequence[float], input_format: str = "RGB"):
        super().__init__()
        if input_format not in ("RGB", "BGR"):
            raise ValueError(f"{self.arch}: input_format must be 'RGB' or 'BGR', "
                             f"got {input_format!r}")
        if len(pixel_mean) != len(pixel_std):
            raise ValueError(f"{self.arch}: pixel_mean {list(pixel_mean)} and pixel_std "
                             f"{list(pixel_std)} must have the same length")
        if any(s <= 0 for s in pixel_std):
            raise ValueError(f"{self.arch}: pixel_std must be positive, got {list(pixel_std)}")
        self.backbone = backbone
        self.input_format = input_format
        # Not persistent: they are config values, so checkpoints hold learned weights only and
        # converted torchvision/detectron2 files need not carry them.
        mean = torch.tensor(pixel_mean, dtype=torch.float32).view(-1, 1, 1)
        std = torch.tensor(pixel_std, dtype=torch.float32).view(-1, 1, 1)
        self.register_buffer("pixel_mean", mean, persistent=False)
        self.register_buffer("pixel_std", std, persistent=False)

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def preprocess_image(self, batched_inputs: Sequence[Mapping[str, Any]]) -> ImageList:
        """Normalise and pad the images into one batch.

        Args:
            batched_inputs: model inputs with ``image``: (3, H, W) uint8/float RGB 0-255.

        Returns:
            ImageList of (B, 3, Hp, Wp) normalised images, padded to the backbone's
            ``size_divisibility`` (padding is 0 after normalisation, i.e. the mean colour).
        """
        images = []
        channels = self.pixel_mean.shape[0]
        for i, x in enumerate(batched_inputs):
            img = x["image"]
            if not isinstance(img, Tensor) or img.dim() != 3 or img.shape[0] != channels:
                shape = tuple(img.shape) if isinstance(img, Tensor) else type(img).__name__
                raise ValueError(f"{self.arch}: batched_inputs[{i}]['image'] must be a "
                                 f"({channels}, H, W) tensor, got {shape}")
            img = img.to(self.device, dtype=torch.float32)
            if self.input_format == "BGR":
                img = img.flip(0)
            # div_ on the fresh difference: one image-sized temporary fewer
            images.append((img - self.pixel_mean).div_(self.pixel_std))
        divisibility = int(getattr(self.backbone, "size_divisibility", 0))
        return ImageList.from_tensors(images, size_divisibility=divisibility)
