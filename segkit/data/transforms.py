"""Geometric transforms applied consistently to an image and its annotations.

An *augmentation* (``ResizeShortestEdge``, ``RandomFlip``) looks at the image, draws its random
parameters from a ``numpy.random.Generator`` and returns a deterministic *transform*
(``ResizeTransform``, ``HFlipTransform``). The transform is then applied to the image, the
boxes, the polygons and the bit masks, so all of them stay aligned.

Coordinates are continuous pixel-edge coordinates: pixel ``(row i, col j)`` covers
``[j, j + 1) x [i, i + 1)``. Under this convention a resize by ``(sx, sy)`` is ``x * sx`` and a
horizontal flip of an image of width ``W`` is ``x -> W - x``, for boxes and polygons alike.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

__all__ = [
    "Transform", "ResizeTransform", "HFlipTransform", "NoOpTransform", "TransformList",
    "Augmentation", "ResizeShortestEdge", "RandomFlip", "apply_augmentations",
]


class Transform:
    """A deterministic geometric transform. Subclasses override the ``apply_*`` methods."""

    def output_size(self, height: int, width: int) -> Tuple[int, int]:
        """Image size ``(h, w)`` after the transform for an input of ``(height, width)``."""
        return height, width

    def apply_image(self, image: np.ndarray) -> np.ndarray:
        """Args: image (H, W, 3) uint8. Returns the transformed (H', W', 3) uint8 image.

        The result may be a view of ``image`` (a flip is a negative stride), so that the copy
        the caller makes anyway (the mapper's HWC -> CHW) is the only one.
        """
        return image

    def apply_coords(self, coords: np.ndarray) -> np.ndarray:
        """Args: coords (N, 2) float x, y. Returns transformed (N, 2) coordinates."""
        return coords

    def apply_boxes(self, boxes: np.ndarray) -> np.ndarray:
        """Args: boxes (N, 4) XYXY absolute. Returns (N, 4) XYXY boxes.

        The four corners are transformed and re-bounded, so the result is a valid XYXY box
        (x1 <= x2) even for transforms that swap the sides, like a flip.
        """
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        corners = boxes[:, [0, 1, 2, 1, 0, 3, 2, 3]].reshape(-1, 2)
        corners = self.apply_coords(corners).reshape(-1, 4, 2)
        return np.concatenate([corners.min(axis=1), corners.max(axis=1)], axis=1)

    def apply_polygons(self, polygons: Sequence[np.ndarray]) -> List[np.ndarray]:
        """Args: polygons, each (2k,) flat [x0, y0, x1, y1, ...]. Returns the same layout."""
        return [self.apply_coords(np.asarray(p, np.float64).reshape(-1, 2)).reshape(-1)
                for p in polygons]

    def apply_masks(self, masks: np.ndarray) -> np.ndarray:
        """Args: masks (N, H, W) bool or uint8. Returns (N, H', W') bool, C-contiguous."""
        return np.ascontiguousarray(masks, dtype=bool)


class NoOpTransform(Transform):
    """The identity."""


class ResizeTransform(Transform):
    """Resize from ``(h, w)`` to ``(new_h, new_w)``; bilinear for images and masks."""

    def __init__(self, h: int, w: int, new_h: int, new_w: int):
        self.h, self.w, self.new_h, self.new_w = h, w, new_h, new_w

    def output_size(self, height: int, width: int) -> Tuple[int, int]:
        return self.new_h, self.new_w

    def apply_image(self, image: np.ndarray) -> np.ndarray:
        if image.shape[:2] != (self.h, self.w):
            raise ValueError(f"ResizeTransform expects an image of size {(self.h, self.w)}, "
                             f"got {image.shape[:2]}")
        if (self.new_h, self.new_w) == (self.h, self.w):
            return image
        # PIL's bilinear filter widens its support when shrinking, i.e. it anti-aliases.
        return np.asarray(Image.fromarray(image).resize((self.new_w, self.new_h), Image.BILINEAR))

    def apply_coords(self, coords: np.ndarray) -> np.ndarray:
        out = np.array(coords, dtype=np.float64, copy=True)
        out[:, 0] *= self.new_w / self.w
        out[:, 1] *= self.new_h / self.h
        return out

    def apply_masks(self, masks: np.ndarray) -> np.ndarray:
        if masks.shape[0] == 0 or (self.new_h, self.new_w) == (self.h, self.w):
            return np.ascontiguousarray(masks, dtype=bool).reshape(-1, self.new_h, self.new_w)
        # Bilinear on the 0/1 mask thresholded at 0.5 keeps the boundary where the polygon
        # rasteriser would put it (half-pixel centres, align_corners=False), unlike nearest.
        t = torch.from_numpy(np.ascontiguousarray(masks, dtype=np.float32))[:, None]
        t = F.interpolate(t, size=(self.new_h, self.new_w), mode="bilinear", align_corners=False)
        return (t[:, 0] >= 0.5).numpy()


class HFlipTransform(Transform):
    """Horizontal flip of an image of width ``width``."""

    def __init__(self, width: int):
        self.width = width

    def apply_image(self, image: np.ndarray) -> np.ndarray:
        return image[:, ::-1]  # a view: see Transform.apply_image

    def apply_coords(self, coords: np.ndarray) -> np.ndarray:
        out = np.array(coords, dtype=np.float64, copy=True)
        out[:, 0] = self.width - out[:, 0]
        return out

    def apply_masks(self, masks: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(masks[:, :, ::-1], dtype=bool)


class TransformList(Transform):
    """Transforms applied in order."""

    def __init__(self, transforms: Sequence[Transform]):
        self.transforms = list(transforms)

    def output_size(self, height: int, width: int) -> Tuple[int, int]:
        for t in self.transforms:
            height, width = t.output_size(height, width)
        return height, width

    def apply_image(self, image):
        for t in self.transforms:
            image = t.apply_image(image)
        return image

    def apply_coords(self, coords):
        for t in self.transforms:
            coords = t.apply_coords(coords)
        return coords

    def apply_masks(self, masks):
        for t in self.transforms:
            masks = t.apply_masks(masks)
        return masks


class Augmentation:
    """Draws a :class:`Transform` for one image."""

    def get_transform(self, height: int, width: int, rng: np.random.Generator) -> Transform:
        raise NotImplementedError


class ResizeShortestEdge(Augmentation):
    """Scale the short side to a size drawn from ``min_sizes``, capping the long side.

    Args:
        min_sizes: candidate short-side lengths; one is chosen per image ("choice") or, with
            ``sample_style="range"``, an integer is drawn uniformly from ``[min, max]`` of them.
        max_size: the long side never exceeds this (the scale is reduced instead), as in the
            Mask R-CNN recipe (short side 800, long side <= 1333).
        sample_style: "choice" or "range".
    """

    def __init__(self, min_sizes: Sequence[int] | int, max_size: int, sample_style: str = "choice"):
        sizes = [int(min_sizes)] if np.isscalar(min_sizes) else [int(s) for s in min_sizes]
        if not sizes or min(sizes) <= 0:
            raise ValueError(f"ResizeShortestEdge min_sizes must be positive ints, "
                             f"got {min_sizes!r}")
        if sample_style not in ("choice", "range"):
            raise ValueError(f"sample_style must be 'choice' or 'range', got {sample_style!r}")
        if sample_style == "range" and len(sizes) != 2:
            raise ValueError(f"sample_style='range' needs two sizes [min, max], got {sizes}")
        if max_size <= 0:
            raise ValueError(f"ResizeShortestEdge max_size must be positive, got {max_size!r}")
        self.min_sizes, self.max_size, self.sample_style = sizes, int(max_size), sample_style

    def get_transform(self, height, width, rng):
        if self.sample_style == "range":
            size = int(rng.integers(self.min_sizes[0], self.min_sizes[1] + 1))
        elif len(self.min_sizes) == 1:
            size = self.min_sizes[0]  # no draw: a test-time mapper consumes no randomness
        else:
            size = self.min_sizes[int(rng.integers(len(self.min_sizes)))]
        new_h, new_w = self.output_shape(height, width, size, self.max_size)
        return ResizeTransform(height, width, new_h, new_w)

    @staticmethod
    def output_shape(height: int, width: int, short: int, max_size: int) -> Tuple[int, int]:
        """``(new_h, new_w)`` with the short side ``short`` and the long side <= ``max_size``."""
        scale = short / min(height, width)
        if max(height, width) * scale > max_size:
            scale = max_size / max(height, width)
        return int(height * scale + 0.5), int(width * scale + 0.5)


class RandomFlip(Augmentation):
    """Horizontal flip with probability ``prob``."""

    def __init__(self, prob: float = 0.5):
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"RandomFlip prob must be in [0, 1], got {prob!r}")
        self.prob = float(prob)

    def get_transform(self, height, width, rng):
        if self.prob > 0 and rng.random() < self.prob:
            return HFlipTransform(width)
        return NoOpTransform()


def apply_augmentations(augs: Sequence[Augmentation], image: np.ndarray,
                        rng: np.random.Generator) -> Tuple[np.ndarray, TransformList]:
    """Draw and apply ``augs`` in order to ``image`` (H, W, 3) uint8.

    Returns:
        The transformed image and the :class:`TransformList` to apply to its annotations.
    """
    transforms = []
    for aug in augs:
        t = aug.get_transform(image.shape[0], image.shape[1], rng)
        image = t.apply_image(image)
        transforms.append(t)
    return image, TransformList(transforms)
