"""The embedded dataset: generated shapes with instance masks, in COCO format, cached on disk.

It needs no download, is the same bytes on every run (one seeded generator per image) and is
small enough to train a small Mask R-CNN on CPU in minutes. See ``segkit.data.shapes`` for what
the images contain. On first use both splits are written under the root::

    root/manifest.json                      version + parameters; must match or we regenerate
    root/annotations/instances_{split}.json COCO instances (RLE masks of the visible parts)
    root/{split}/000001.png ...

Generation happens in a temporary sibling folder that is renamed into place with
``os.replace``, so an interrupted or concurrent run never leaves a half-written dataset.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from typing import Any, Dict, Optional

import numpy as np
import pycocotools.mask as mask_util
from PIL import Image

from segkit.data.coco import load_coco_json
from segkit.data.shapes import CLASSES, draw_image
from segkit.registry import DATASETS

__all__ = ["embedded", "embedded_root", "ensure_embedded", "FORMAT", "VERSION"]

logger = logging.getLogger(__name__)

FORMAT = "segkit-embedded"
VERSION = 1  # bump whenever the drawing changes, so cached copies are regenerated
SPLITS = ("train", "val")


def embedded_root() -> str:
    """Default root: ``$SEGKIT_CACHE/embedded`` (``SEGKIT_CACHE`` defaults to ~/.cache/segkit)."""
    cache = os.environ.get("SEGKIT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                           "segkit")
    return os.path.join(cache, "embedded")


def _split_json(root: str, split: str) -> str:
    return os.path.join(root, "annotations", f"instances_{split}.json")


def _write_split(folder: str, split: str, num_images: int, image_size: int) -> None:
    """Draw ``num_images`` images of one split and their COCO json under ``folder``."""
    os.makedirs(os.path.join(folder, split))
    images, annotations = [], []
    lo = max(16, int(round(0.625 * image_size)))
    for i in range(num_images):
        # one generator per image: image i is the same whatever the split's size
        rng = np.random.default_rng([VERSION, SPLITS.index(split), i])
        h, w = (int(v) for v in rng.integers(lo, image_size + 1, size=2))
        image, objects = draw_image(h, w, rng)
        file_name = f"{i + 1:06d}.png"
        Image.fromarray(image).save(os.path.join(folder, split, file_name), compress_level=1)
        images.append({"id": i + 1, "file_name": file_name, "height": h, "width": w})
        for cls, mask in objects:
            rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
            annotations.append({
                "id": len(annotations) + 1, "image_id": i + 1, "category_id": cls + 1,
                "segmentation": {"size": [h, w], "counts": rle["counts"].decode("ascii")},
                "area": float(mask_util.area(rle)),
                "bbox": [float(v) for v in mask_util.toBbox(rle)], "iscrowd": 0,
            })
    coco = {
        "info": {"description": f"segkit embedded shapes v{VERSION} ({split})",
                 "version": str(VERSION)},
        "licenses": [], "images": images, "annotations": annotations,
        "categories": [{"id": k + 1, "name": n, "supercategory": "shape"}
                       for k, n in enumerate(CLASSES)],
    }
    os.makedirs(os.path.join(folder, "annotations"), exist_ok=True)
    with open(_split_json(folder, split), "w", encoding="utf-8") as f:
        json.dump(coco, f, separators=(",", ":"))


def _manifest_ok(root: str, params: Dict[str, Any]) -> bool:
    """True when ``root`` holds a complete dataset generated with ``params`` by this version."""
    try:
        with open(os.path.join(root, "manifest.json"), encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return False
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        return False
    if manifest.get("params") != params:
        return False
    for split in SPLITS:
        folder = os.path.join(root, split)
        if not (os.path.isfile(_split_json(root, split)) and os.path.isdir(folder)
                and len(os.listdir(folder)) == params[f"num_{split}_images"]):
            return False
    return True


def ensure_embedded(root: Optional[str] = None, num_train_images: int = 400,
                    num_val_images: int = 50, image_size: int = 256) -> str:
    """Generate the dataset under ``root`` unless an identical one is already there.

    Returns:
        The dataset root.

    Raises:
        FileExistsError: ``root`` exists, is not empty and is not an embedded dataset (we never
            delete a folder we did not write).
    """
    root = os.path.abspath(os.path.expanduser(root or embedded_root()))
    for key, value, least in (("num_train_images", num_train_images, 1),
                              ("num_val_images", num_val_images, 1),
                              ("image_size", image_size, 32)):
        if not isinstance(value, int) or value < least:
            raise ValueError(f"embedded dataset '{key}' must be an int >= {least}, got {value!r}")
    params = {"num_train_images": num_train_images, "num_val_images": num_val_images,
              "image_size": image_size}
    if _manifest_ok(root, params):
        return root
    foreign = not os.path.isfile(os.path.join(root, "manifest.json"))
    if os.path.isdir(root) and os.listdir(root) and foreign:
        raise FileExistsError(f"embedded dataset root {root} exists and is not a segkit embedded "
                              f"dataset (no manifest.json); pick an empty or new folder")
    parent, base = os.path.split(root)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{base}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    logger.info("generating the embedded dataset (%s) under %s", params, root)
    try:
        for split in SPLITS:
            _write_split(tmp, split, params[f"num_{split}_images"], image_size)
        with open(os.path.join(tmp, "manifest.json"), "w", encoding="utf-8") as f:
            json.dump({"format": FORMAT, "version": VERSION, "params": params,
                       "classes": list(CLASSES)}, f, indent=1)
        _swap_in(tmp, root, params)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def _swap_in(tmp: str, root: str, params: Dict[str, Any]) -> None:
    """Rename ``tmp`` to ``root``; a stale dataset at ``root`` is moved aside and deleted."""
    stale = None
    if os.path.isdir(root):
        if _manifest_ok(root, params):  # another process finished first: keep theirs
            return
        stale = f"{tmp}.stale"
        try:
            os.replace(root, stale)
        except FileNotFoundError:  # a concurrent run moved the stale copy aside first
            stale = None
    try:
        os.replace(tmp, root)
    except OSError:
        # lost a race: a concurrent run renamed its (identical) dataset in between
        if not _manifest_ok(root, params):
            raise
    finally:
        if stale:
            shutil.rmtree(stale, ignore_errors=True)


@DATASETS.register("embedded")
def embedded(split: str, root: Optional[str] = None, num_train_images: int = 400,
             num_val_images: int = 50, image_size: int = 256, config_path: str = ""):
    """DATASETS entry: one split of the embedded shapes dataset, generated on first use.

    Args:
        split: "train" or "val".
        root: dataset folder; default ``$SEGKIT_CACHE/embedded`` (~/.cache/segkit/embedded).
        num_train_images: images in the train split (both splits are written together).
        num_val_images: images in the val split.
        image_size: largest image side; each side is drawn from [0.625, 1] x ``image_size``,
            so both orientations occur (160-256 px by default).
        config_path: dotted config path, filled by ``get_dataset()`` for error messages.

    Returns:
        ``(records, metadata)`` as for ``coco_json``; ``thing_classes`` are the shape names.
    """
    if split not in SPLITS:
        where = f" (config key '{config_path}.split')" if config_path else ""
        raise ValueError(f"embedded dataset split must be 'train' or 'val', got {split!r}{where}")
    root = ensure_embedded(root, num_train_images, num_val_images, image_size)
    return load_coco_json(_split_json(root, split), os.path.join(root, split),
                          name=f"embedded_{split}", config_path=config_path)
