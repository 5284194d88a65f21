"""Tiny COCO-format datasets written from a spec, for tests and examples (no download).

Each object is a flat-coloured polygon on a dark background, painted where pycocotools
rasterises it, so the pixels match the annotation exactly; the annotation holds the polygon,
its RLE, or no segmentation at all (box-only data).
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Sequence, Tuple

import numpy as np
import pycocotools.mask as mask_util
from PIL import Image

__all__ = ["write_coco_dataset", "square"]


def square(x: float, y: float, side: float) -> list:
    """Flat polygon ``[x0, y0, ...]`` of the axis-aligned square with corner (x, y)."""
    return [x, y, x + side, y, x + side, y + side, x, y + side]


def _annotation(obj: Dict[str, Any], ann_id: int, image_id: int, h: int, w: int
                ) -> Tuple[dict, np.ndarray]:
    """The COCO annotation of ``obj`` and its (h, w) bool mask."""
    poly = [float(v) for v in obj["polygon"]]
    xs, ys = poly[0::2], poly[1::2]
    x0, y0 = max(min(xs), 0.0), max(min(ys), 0.0)
    x1, y1 = min(max(xs), float(w)), min(max(ys), float(h))
    ann = {"id": ann_id, "image_id": image_id, "category_id": obj.get("category", 1),
           "bbox": [x0, y0, x1 - x0, y1 - y0], "iscrowd": int(obj.get("iscrowd", 0))}
    kind = obj.get("segmentation", "polygon")
    rle = mask_util.merge(mask_util.frPyObjects([poly], h, w))
    ann["area"] = float(mask_util.area(rle))
    if kind == "polygon":
        ann["segmentation"] = [poly]
    elif kind == "rle":
        ann["segmentation"] = {"size": [h, w], "counts": rle["counts"].decode("ascii")}
    elif kind is not None:
        raise ValueError(f"object segmentation must be 'polygon', 'rle' or None, got {kind!r}")
    return ann, mask_util.decode(rle).astype(bool)


def write_coco_dataset(root: str, images: Sequence[Dict[str, Any]], num_categories: int = 2,
                       name: str = "instances") -> Tuple[str, str]:
    """Write PNG images and a COCO instances json under ``root``.

    Args:
        root: output folder (created).
        images: one dict per image: ``{"height": int, "width": int, "objects": [{"polygon":
            [x0, y0, x1, y1, ...] in pixels (may leave the image), "category": 1-based id
            (default 1), "iscrowd": 0/1, "segmentation": "polygon" (default) | "rle" | None,
            "color": (r, g, b) uint8 (default distinct per object)}, ...]}``, later objects painted
            over earlier ones. The bbox is the polygon's extent clipped to the image (XYWH);
            background pixels are (40, 40, 40).
        num_categories: categories 1..K named ``c1``..``cK``.
        name: stem of the json file (``load_coco_json`` names the dataset after it).

    Returns:
        ``(json_file, image_root)`` for ``segkit.data.load_coco_json``.
    """
    image_root = os.path.join(root, "images")
    os.makedirs(image_root, exist_ok=True)
    coco: Dict[str, list] = {"images": [], "annotations": [], "categories": [
        {"id": k, "name": f"c{k}"} for k in range(1, num_categories + 1)]}
    for image_id, spec in enumerate(images, start=1):
        h, w = int(spec["height"]), int(spec["width"])
        canvas = np.full((h, w, 3), 40, dtype=np.uint8)
        for k, obj in enumerate(spec.get("objects", [])):
            ann, mask = _annotation(obj, len(coco["annotations"]) + 1, image_id, h, w)
            canvas[mask] = obj.get("color", (200, 60 + 40 * (k % 5), 30 + 50 * (k % 4)))
            coco["annotations"].append(ann)
        file_name = f"{image_id:04d}.png"
        Image.fromarray(canvas).save(os.path.join(image_root, file_name))
        coco["images"].append({"id": image_id, "file_name": file_name, "height": h, "width": w})
    json_file = os.path.join(root, f"{name}.json")
    with open(json_file, "w", encoding="utf-8") as f:
        json.dump(coco, f)
    return json_file, image_root
