"""Dataset record -> model input: decode the image, augment, build ground-truth ``Instances``.

The output is the model input of README.md, "Conventions"::

    {"image": uint8 Tensor (3, H', W') RGB, resized, "height": H, "width": W (original size),
     "file_name": str, "image_id": int, "transforms": TransformList (the geometric
     transform applied to the image, e.g. for precomputed proposals), "instances":
     Instances (training only) with
     gt_boxes: Boxes (N, 4) XYXY absolute at (H', W'), gt_classes: int64 (N,),
     gt_masks: PolygonMasks or BitMasks (N, H', W')}
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image, ImageOps

from segkit.data.transforms import (Augmentation, RandomFlip, ResizeShortestEdge, Transform,
                                    apply_augmentations)
from segkit.structures import (BitMasks, Boxes, Instances, PolygonMasks, polygons_to_bitmask,
                               rles_to_bitmasks)

__all__ = ["DatasetMapper", "ImageReadError", "read_image"]


class ImageReadError(OSError):
    """An image file is missing, unreadable or corrupt; the message and ``.path`` name it."""

    # One positional message argument, so a DataLoader worker can re-raise it in the main
    # process as the same type (torch rebuilds worker exceptions from their message).
    def __init__(self, message: str, path: Optional[str] = None):
        super().__init__(message)
        self.path = path


def read_image(path: str) -> np.ndarray:
    """Decode an image file to RGB.

    The EXIF orientation is applied, as COCO's height/width describe the upright image.

    Returns:
        (H, W, 3) uint8 RGB array (read-only: it shares the decoded buffer).

    Raises:
        ImageReadError: missing, unreadable, truncated or corrupt file (the message names it).
    """
    try:
        with Image.open(path) as im:
            # Loads the pixels (a truncated file fails here) and rotates without a copy
            # when there is no orientation tag.
            ImageOps.exif_transpose(im, in_place=True)
            return np.asarray(im if im.mode == "RGB" else im.convert("RGB"))
    except FileNotFoundError as e:
        raise ImageReadError(f"cannot read image {path}: file not found", path) from e
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageReadError(f"cannot read image {path}: {type(e).__name__}: {e}", path) from e


def _boxes_xyxy(anns: Sequence[Mapping[str, Any]], path: str) -> np.ndarray:
    """(N, 4) float64 XYXY boxes of ``anns``, whose ``bbox`` is in ``bbox_mode`` (default
    "xywh", as in COCO files; "xyxy" is accepted too)."""
    boxes = np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4)
    modes = [a.get("bbox_mode", "xywh") for a in anns]
    for a, mode in zip(anns, modes):
        if mode not in ("xywh", "xyxy"):
            raise ValueError(f"{path}: annotation id {a.get('id')}: unknown bbox_mode {mode!r}; "
                             f"expected 'xywh' or 'xyxy'")
    xywh = np.array([m == "xywh" for m in modes], dtype=bool)
    boxes[xywh, 2:] += boxes[xywh, :2]
    return boxes


def _size_mismatch(path: str, decoded: Sequence[int], h: int, w: int) -> ValueError:
    hint = ""
    if tuple(decoded) == (w, h):
        hint = ("; height and width are swapped, the usual sign of an EXIF orientation tag: "
                "segkit, like COCO, uses the upright (rotated) image, so the annotations must "
                "describe it too")
    return ValueError(f"{path}: decoded image is {decoded[0]}x{decoded[1]} (h x w) but the "
                      f"dataset record says {h}x{w}{hint}")


class DatasetMapper:
    """Callable turning one dataset record into one model input dict.

    Args:
        is_train: training mode: random short-side size and flip, crowd annotations dropped,
            ``instances`` built. In test mode only the image is resized (to ``min_size``).
        min_size: short-side size(s); training picks one per image ("choice").
        max_size: cap on the long side.
        flip_prob: probability of a horizontal flip (training only).
        mask_format: "polygon" keeps polygons as ``PolygonMasks`` (cheap, exact); an image
            with any RLE annotation falls back to ``BitMasks`` since RLE has no polygon form.
            "bitmask" always gives ``BitMasks`` at the resized size.
        use_masks: build ``gt_masks`` (False for box-only models and datasets).
    """

    def __init__(self, is_train: bool, min_size: Union[int, Sequence[int]], max_size: int,
                 flip_prob: float = 0.5, mask_format: str = "polygon", use_masks: bool = True):
        if mask_format not in ("polygon", "bitmask"):
            raise ValueError(f"mask_format must be 'polygon' or 'bitmask', got {mask_format!r}")
        self.is_train, self.mask_format, self.use_masks = is_train, mask_format, use_masks
        augs: List[Augmentation] = [ResizeShortestEdge(min_size, max_size, "choice")]
        if is_train and flip_prob > 0:
            augs.append(RandomFlip(flip_prob))
        self.augmentations = augs

    @classmethod
    def from_config(cls, dataloader: Mapping[str, Any], is_train: bool,
                    use_masks: bool = True) -> "DatasetMapper":
        """Build from the ``dataloader`` config node (min/max_size_train/test, random_flip,
        mask_format)."""
        if is_train:
            return cls(True, list(dataloader["min_size_train"]), dataloader["max_size_train"],
                       flip_prob=dataloader.get("random_flip", 0.5),
                       mask_format=dataloader.get("mask_format", "polygon"), use_masks=use_masks)
        return cls(False, dataloader["min_size_test"], dataloader["max_size_test"], 0.0,
                   mask_format=dataloader.get("mask_format", "polygon"), use_masks=use_masks)

    def __call__(self, record: Mapping[str, Any],
                 rng: Optional[np.random.Generator] = None) -> Dict[str, Any]:
        """Map one record.

        Args:
            record: dataset record (not modified).
            rng: source of the augmentation randomness. The loaders pass one seeded per sample
                so batches do not depend on the number of workers; by default a generator is
                seeded from numpy's global RNG (which the loader workers seed).

        Returns:
            The model input of the module docstring: ``image`` uint8 (3, H', W') RGB,
            ``height``/``width`` (the original size), ``file_name``, ``image_id``,
            ``transforms`` (original -> input coordinates) and, in training, ``instances``
            (boxes XYXY at (H', W')).

        Raises:
            ImageReadError: the image cannot be read.
            ValueError: the decoded size differs from the record's height/width.
        """
        if rng is None:
            rng = np.random.default_rng(np.random.randint(0, 2**31 - 1))
        path = record["file_name"]
        image = read_image(path)
        h, w = record.get("height", image.shape[0]), record.get("width", image.shape[1])
        if image.shape[:2] != (h, w):
            raise _size_mismatch(path, image.shape[:2], h, w)
        image, tfm = apply_augmentations(self.augmentations, image, rng)
        out = {"file_name": path, "image_id": record.get("image_id"), "height": h, "width": w,
               "image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
               "transforms": tfm}
        if self.is_train:
            out["instances"] = self.annotations_to_instances(
                record.get("annotations", []), tfm, (h, w), image.shape[:2], path)
        return out

    def annotations_to_instances(self, annotations: Sequence[Mapping[str, Any]], tfm: Transform,
                                 orig_size, image_size, path: str = "") -> Instances:
        """Transform the non-crowd annotations and pack them into ``Instances``.

        Boxes are clipped to the transformed image and boxes left empty are removed, together
        with their classes and masks.

        Args:
            annotations: the record's annotations (``bbox`` in its ``bbox_mode``, contiguous
                ``category_id``, ``segmentation`` as polygons or RLE at ``orig_size``).
            tfm: the transform that was applied to the image.
            orig_size: (H, W) of the decoded image; image_size: (H', W') after ``tfm``.
            path: the image file, named in error messages.

        Returns:
            ``Instances`` of ``image_size`` with ``gt_boxes`` (N, 4) XYXY absolute float32,
            ``gt_classes`` (N,) int64 and, with ``use_masks``, ``gt_masks``: ``PolygonMasks``
            or ``BitMasks`` (N, H', W') (see ``mask_format``).
        """
        # Crowd regions are not object instances: Mask R-CNN (like Detectron) neither matches
        # nor trains on them. They stay in the records for evaluation.
        anns = [a for a in annotations if not a.get("iscrowd", 0)]
        boxes = _boxes_xyxy(anns, path)
        gt_boxes = Boxes(torch.as_tensor(tfm.apply_boxes(boxes), dtype=torch.float32))
        gt_boxes.clip(image_size)
        inst = Instances(image_size, gt_boxes=gt_boxes,
                         gt_classes=torch.tensor([int(a["category_id"]) for a in anns],
                                                 dtype=torch.int64))
        if self.use_masks:
            inst.gt_masks = self._masks(anns, tfm, orig_size, image_size, path)
        keep = inst.gt_boxes.nonempty(threshold=1e-5)
        return inst if bool(keep.all()) else inst[keep]

    def _masks(self, anns, tfm: Transform, orig_size, image_size, path: str):
        """``PolygonMasks`` (all polygons, ``mask_format="polygon"``) or ``BitMasks`` (N, H', W')."""
        segs = []
        for a in anns:
            if a.get("segmentation") is None:
                raise ValueError(f"{path}: annotation id {a.get('id')} has no segmentation, but "
                                 f"the mapper builds masks (use_masks=False for box-only data)")
            segs.append(a["segmentation"])
        if self.mask_format == "polygon" and all(isinstance(s, list) for s in segs):
            return PolygonMasks([tfm.apply_polygons(s) for s in segs])
        h, w = image_size
        masks = np.zeros((len(segs), h, w), dtype=bool)
        rle_idx = [i for i, s in enumerate(segs) if isinstance(s, dict)]
        for i, s in enumerate(segs):
            if not isinstance(s, dict):  # rasterising after the transform is exact at (h, w)
                masks[i] = polygons_to_bitmask(tfm.apply_polygons(s), h, w).numpy()
        if rle_idx:  # decoded at the original size in one call, then transformed like the image
            try:
                decoded = rles_to_bitmasks([segs[i] for i in rle_idx], *orig_size).numpy()
            except ValueError as e:
                raise ValueError(f"{path}: {e}") from None
            masks[rle_idx] = tfm.apply_masks(decoded)
        return BitMasks(torch.from_numpy(masks))
