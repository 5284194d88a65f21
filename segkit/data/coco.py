"""COCO-format instance annotations -> segkit dataset records.

A record is one image::

    {"file_name": str, "image_id": int, "height": int, "width": int,
     "annotations": [{"bbox": [x, y, w, h] (COCO XYWH, absolute pixels), "bbox_mode": "xywh",
                      "category_id": contiguous id 0..K-1, "segmentation": polygons
                      (list[list[float]]) or an RLE dict (compressed or not, as in the file),
                      "iscrowd": 0/1, "area": float, "id": int}, ...]}

Contiguous ids follow the sorted dataset category ids; ``metadata["contiguous_to_category_id"]``
maps them back for evaluation. What the reader does with imperfect annotations:

* a box with ``w <= 0`` or ``h <= 0`` carries no object: it is dropped, and one warning per
  file lists how many and which annotation ids, by reason;
* a box partly outside the image is clipped to it (the segmentation and area stay as given,
  COCO's evaluation uses them unchanged); a box entirely outside is dropped like an empty one;
* polygons with fewer than 3 points are dropped (an annotation left without any is dropped);
* a category id missing from ``categories``, a non-finite or non-numeric bbox, a malformed
  segmentation or duplicate ids are errors naming the file and the annotation id;
* images without annotations are kept (evaluation needs them); the training loader's
  ``filter_empty`` drops them; crowd annotations are kept with ``iscrowd=1``.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import warnings
from collections import Counter
from typing import Any, Dict, List, Optional, Tuple

import pycocotools.mask as mask_util
from pycocotools.coco import COCO

from segkit.registry import DATASETS

__all__ = ["load_coco_json", "coco_json", "coco_2017", "datasets_root"]


def _key(config_path: str, arg: str) -> str:
    return f"{config_path}.{arg}" if config_path else arg


def _check_paths(json_file: str, image_root: str, config_path: str) -> None:
    if not os.path.isfile(json_file):
        raise FileNotFoundError(
            f"COCO annotation file not found: {json_file} (config key "
            f"'{_key(config_path, 'json')}'); expected a COCO instances json file")
    if not os.path.isdir(image_root):
        raise FileNotFoundError(
            f"image folder not found: {image_root} (config key '{_key(config_path, 'images')}'); "
            f"expected the folder the json's image file_name entries are relative to")


def _read_json(json_file: str) -> Dict[str, Any]:
    try:
        with open(json_file, "r", encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:  # a truncated or binary file
        raise ValueError(f"malformed JSON in {json_file}: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{json_file}: expected a COCO json object with 'images', "
                         f"'annotations' and 'categories', got a {type(data).__name__}")
    for k in ("images", "categories"):
        if not isinstance(data.get(k), list):
            raise ValueError(f"{json_file}: missing or invalid '{k}' list (COCO format expected)")
    data.setdefault("annotations", [])
    # pycocotools indexes by these keys and would fail with a bare KeyError
    for k, required in (("images", ("id", "file_name")), ("categories", ("id", "name")),
                        ("annotations", ("id", "image_id"))):
        for i, entry in enumerate(data[k]):
            missing = [r for r in required if not isinstance(entry, dict) or r not in entry]
            if missing:
                raise ValueError(f"{json_file}: {k}[{i}] lacks {', '.join(missing)}")
    dup = [i for i, n in Counter(a["id"] for a in data["annotations"]).items() if n > 1]
    if dup:
        raise ValueError(f"{json_file}: duplicate annotation ids, e.g. {sorted(dup)[:10]}")
    return data


def _segmentation(ann: dict, height: int, width: int, where: str) -> Optional[Any]:
    """The annotation's mask in record form; ``None`` when it has no usable mask."""
    seg = ann.get("segmentation")
    if isinstance(seg, dict):  # RLE, compressed (str counts) or uncompressed (list counts)
        if "counts" not in seg or list(seg.get("size", [])) != [height, width]:
            raise ValueError(f"{where}: RLE segmentation must have 'counts' and size "
                             f"[{height}, {width}] (the image size), got size {seg.get('size')}")
        return seg
    if not seg:
        return None
    if not isinstance(seg, list) or not all(isinstance(p, list) for p in seg):
        raise ValueError(f"{where}: segmentation must be a list of polygons or an RLE dict")
    polys = []
    for p in seg:
        if len(p) % 2:
            raise ValueError(f"{where}: polygon with an odd number of coordinates ({len(p)})")
        if len(p) >= 6:  # fewer than 3 points has no area
            polys.append(_numbers(p, where, "polygon coordinates"))
    return polys or None


def _numbers(values: list, where: str, what: str) -> List[float]:
    """``values`` as floats; anything else than finite numbers is an error naming ``where``."""
    try:
        out = [float(v) for v in values]
    except (TypeError, ValueError):
        out = []
    if len(out) != len(values) or not all(math.isfinite(v) for v in out):
        raise ValueError(f"{where}: {what} must be finite numbers, got {values!r:.120}")
    return out


# Why the reader drops an annotation (the keys of the ``dropped`` dict), as the warning says it.
_EMPTY_BOX = "an empty box (w <= 0 or h <= 0)"
_OUTSIDE = "a box entirely outside its image"
_DEGENERATE = "only degenerate polygons (fewer than 3 points)"


def _annotation(ann: dict, img: dict, cat_map: Dict[int, int], json_file: str,
                dropped: Dict[str, List[int]]) -> Optional[dict]:
    """Convert one COCO annotation; an unusable one is listed in ``dropped[reason]``."""
    ann_id = ann.get("id")
    where = f"{json_file}: annotation id {ann_id} (image id {img['id']})"
    if ann.get("category_id") not in cat_map:
        raise ValueError(f"{where}: category_id {ann.get('category_id')!r} is not in the "
                         f"file's categories (ids {sorted(cat_map)})")
    bbox = ann.get("bbox")
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        raise ValueError(f"{where}: bbox must be [x, y, w, h], got {bbox!r}")
    x, y, w, h = _numbers(bbox, where, "bbox [x, y, w, h] values")
    height, width = img["height"], img["width"]
    x1, y1 = min(max(x, 0.0), width), min(max(y, 0.0), height)
    x2, y2 = min(max(x + w, 0.0), width), min(max(y + h, 0.0), height)
    reason, seg = None, None
    if w <= 0 or h <= 0:
        reason = _EMPTY_BOX
    elif x2 <= x1 or y2 <= y1:
        reason = _OUTSIDE
    else:
        seg = _segmentation(ann, height, width, where)
        if seg is None and ann.get("segmentation"):
            reason = _DEGENERATE
    if reason:
        dropped.setdefault(reason, []).append(ann_id)
        return None
    out = {"bbox": [x1, y1, x2 - x1, y2 - y1], "bbox_mode": "xywh",
           "category_id": cat_map[ann["category_id"]], "iscrowd": int(ann.get("iscrowd", 0)),
           "id": ann_id}
    if seg is not None:
        out["segmentation"] = seg
    area = ann.get("area")
    if area is None:
        area = (float(mask_util.area(_to_rle(seg, height, width))) if seg is not None
                else (x2 - x1) * (y2 - y1))
    out["area"] = float(area)
    return out


def _warn_dropped(json_file: str, dropped: Dict[str, List[int]]) -> None:
    """One warning per file naming the dropped annotations, by reason."""
    parts = []
    for reason, ids in dropped.items():
        shown = ", ".join(str(i) for i in ids[:20]) + (" ..." if len(ids) > 20 else "")
        parts.append(f"{len(ids)} with {reason}: ids {shown}")
    total = sum(len(ids) for ids in dropped.values())
    warnings.warn(f"{json_file}: dropped {total} annotation(s) that mark no object; "
                  + "; ".join(parts), stacklevel=3)


def _to_rle(seg: Any, height: int, width: int) -> dict:
    """Polygons or (un)compressed RLE -> one compressed RLE."""
    if isinstance(seg, dict):
        if isinstance(seg["counts"], list):
            return mask_util.frPyObjects(seg, height, width)
        counts = seg["counts"]
        if isinstance(counts, str):
            counts = counts.encode("ascii")
        return {"size": seg["size"], "counts": counts}
    return mask_util.merge(mask_util.frPyObjects(seg, height, width))


def load_coco_json(json_file: str, image_root: str, name: Optional[str] = None,
                   config_path: str = "", label_map: str = "sorted"
                   ) -> Tuple[List[dict], Dict[str, Any]]:
    """Read a COCO instances json into records and metadata.

    Args:
        json_file: path of the annotation file.
        image_root: folder that the images' ``file_name`` entries are relative to.
        name: dataset name; defaults to the json file's stem.
        config_path: dotted config path of the dataset node, for error messages.
        label_map: how category ids become contiguous class ids. ``"sorted"``: 0..K-1 over
            the sorted category ids. ``"category_id"``: class = category id - 1, with "N/A"
            names for the ids the file does not use; this is the labelling of models trained
            with gaps in the id range, such as torchvision's 90-class COCO models.

    Returns:
        ``(records, metadata)``: one record per image in file order (see the module
        docstring), and ``{"name", "thing_classes", "contiguous_to_category_id",
        "json_file", "image_root"}``.

    Raises:
        FileNotFoundError: the json file or the image folder does not exist.
        ValueError: malformed JSON, an annotation with an unknown category or image id,
            duplicate ids, or a malformed bbox/segmentation (the message names the file and id).
    """
    json_file, image_root = os.fspath(json_file), os.fspath(image_root)
    _check_paths(json_file, image_root, config_path)
    data = _read_json(json_file)
    coco = _index(data, json_file)
    cat_map, thing_classes, to_category_id = _label_map(coco, label_map, json_file, config_path)
    records, dropped = [], {}
    for img in data["images"]:
        h, w = img.get("height"), img.get("width")
        if not (isinstance(h, int) and isinstance(w, int) and h > 0 and w > 0):
            raise ValueError(f"{json_file}: image id {img.get('id')} needs positive integer "
                             f"'height' and 'width', got {h!r} x {w!r}")
        anns = [_annotation(a, img, cat_map, json_file, dropped) for a in coco.imgToAnns[img["id"]]]
        records.append({"file_name": os.path.join(image_root, img["file_name"]),
                        "image_id": img["id"], "height": h, "width": w,
                        "annotations": [a for a in anns if a is not None]})
    if dropped:
        _warn_dropped(json_file, dropped)
    metadata = {
        "name": name or os.path.splitext(os.path.basename(json_file))[0],
        "thing_classes": thing_classes, "contiguous_to_category_id": to_category_id,
        "json_file": json_file, "image_root": image_root,
    }
    return records, metadata


def _index(data: Dict[str, Any], json_file: str) -> COCO:
    """pycocotools' index of ``data``, after checking ids that it would silently overwrite."""
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco.createIndex()
    if len(coco.cats) != len(data["categories"]):
        raise ValueError(f"{json_file}: duplicate category ids in 'categories'")
    if len(coco.imgs) != len(data["images"]):
        raise ValueError(f"{json_file}: duplicate image ids in 'images'")
    for ann in data["annotations"]:
        if ann.get("image_id") not in coco.imgs:
            raise ValueError(f"{json_file}: annotation id {ann.get('id')} refers to image id "
                             f"{ann.get('image_id')!r}, which is not in 'images'")
    return coco


def _label_map(coco: COCO, label_map: str, json_file: str, config_path: str
               ) -> Tuple[Dict[int, int], List[str], Dict[int, int]]:
    """``(category id -> class, thing_classes, class -> category id)`` for ``label_map``."""
    cat_ids = sorted(coco.cats)
    if label_map == "sorted":
        cat_map = {cid: i for i, cid in enumerate(cat_ids)}
        return (cat_map, [coco.cats[cid]["name"] for cid in cat_ids],
                {i: cid for cid, i in cat_map.items()})
    if label_map == "category_id":
        if cat_ids and cat_ids[0] < 1:
            raise ValueError(f"{json_file}: label_map 'category_id' needs category ids >= 1, "
                             f"got {cat_ids[0]}")
        top = cat_ids[-1] if cat_ids else 0
        return ({cid: cid - 1 for cid in cat_ids},
                [coco.cats[i]["name"] if i in coco.cats else "N/A" for i in range(1, top + 1)],
                {i: i + 1 for i in range(top)})
    raise ValueError(f"unknown label_map {label_map!r} (config key "
                     f"'{_key(config_path, 'label_map')}'); expected 'sorted' or 'category_id'")


@DATASETS.register("coco_json")
def coco_json(json: str, images: str, name: Optional[str] = None, config_path: str = "",
              label_map: str = "sorted"):
    """DATASETS entry for any COCO-format dataset: see :func:`load_coco_json`.

    ``config_path`` is filled by ``get_dataset()`` at build time, not set in configs.
    """
    return load_coco_json(json, images, name=name, config_path=config_path, label_map=label_map)


def datasets_root() -> str:
    """Where the standard datasets live: ``$SEGKIT_DATASETS``, default ``./datasets``."""
    return os.environ.get("SEGKIT_DATASETS", "datasets")


@DATASETS.register("coco_2017")
def coco_2017(split: str, config_path: str = "", label_map: str = "sorted"):
    """COCO 2017 ``train`` or ``val`` from ``$SEGKIT_DATASETS/coco`` (default ./datasets/coco)."""
    if split not in ("train", "val"):
        raise ValueError(f"coco_2017 split must be 'train' or 'val', got {split!r} "
                         f"(config key '{_key(config_path, 'split')}')")
    root = os.path.join(datasets_root(), "coco")
    json_file = os.path.join(root, "annotations", f"instances_{split}2017.json")
    image_root = os.path.join(root, f"{split}2017")
    missing = [p for p in (json_file, image_root) if not os.path.exists(p)]
    if missing:
        raise FileNotFoundError(
            f"COCO 2017 {split} not found: missing {', '.join(missing)}. Expected "
            f"$SEGKIT_DATASETS/coco/annotations/instances_{split}2017.json and "
            f"$SEGKIT_DATASETS/coco/{split}2017/ (SEGKIT_DATASETS is "
            f"{os.environ.get('SEGKIT_DATASETS', 'unset, so ./datasets is used')}); download "
            f"COCO 2017 there or set SEGKIT_DATASETS to the folder that holds coco/")
    name = f"coco_2017_{split}" + ("" if label_map == "sorted" else f"_{label_map}")
    return load_coco_json(json_file, image_root, name=name, config_path=config_path,
                          label_map=label_map)
