"""COCO-format glue for evaluation: records -> COCO ground truth, predictions -> COCO results.

Everything here is plain Python / numpy around ``pycocotools``; the evaluator classes in
``coco_evaluation.py`` build on it. The summary statistics are computed from ``COCOeval``'s
accumulated ``precision`` / ``recall`` arrays exactly as ``COCOeval.summarize()`` does, but
without printing and for any ``maxDets`` triple.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np
import pycocotools.mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

__all__ = [
    "instances_to_coco_json", "convert_to_coco_dict", "load_coco_gt", "run_coco_eval",
    "evaluate_coco_json", "stat_names", "category_mapper",
]

logger = logging.getLogger(__name__)

BOX_DECIMALS = 3  # decimals of the XYWH pixel values written into results

# stat-name suffix -> COCOeval area range label (small < 32^2 <= medium < 96^2 <= large px)
_AREA_STATS = (("s", "small"), ("m", "medium"), ("l", "large"))


def stat_names(max_dets: Sequence[int] = (1, 10, 100)) -> List[str]:
    """Names of the summary stats in ``COCOeval.summarize()`` order.

    For ``max_dets=(1, 10, 100)`` these are the 12 standard names: AP, AP50, AP75, APs, APm,
    APl, AR1, AR10, AR100, ARs, ARm, ARl.
    """
    return (["AP", "AP50", "AP75"] + [f"AP{s}" for s, _ in _AREA_STATS]
            + [f"AR{m}" for m in max_dets] + [f"AR{s}" for s, _ in _AREA_STATS])


def category_mapper(contiguous_to_category_id: Optional[Mapping]) -> Dict[int, int]:
    """Normalise a contiguous-id -> dataset-category-id map (keys may be str after JSON).

    ``None`` means the identity: contiguous ids are used as category ids.
    """
    if contiguous_to_category_id is None:
        return {}
    return {int(k): int(v) for k, v in contiguous_to_category_id.items()}


def instances_to_coco_json(
    instances: Any, image_id: int, contiguous_to_category_id: Optional[Mapping] = None
) -> List[Dict[str, Any]]:
    """Convert one image's predictions to COCO result dicts.

    Args:
        instances: ``Instances`` at the original image resolution with ``pred_boxes``
            (``Boxes``, XYXY absolute, (N, 4)), ``scores`` (N,), ``pred_classes`` (N,) contiguous
            ids, optionally ``pred_masks`` ((N, H, W) bool tensor or ``BitMasks``).
        image_id: dataset image id written into every result.
        contiguous_to_category_id: contiguous class id -> dataset category id; ``None`` keeps
            the contiguous id.

    Returns:
        One dict per instance, in the input order: ``image_id``, ``category_id``, ``score``,
        ``bbox`` (XYWH absolute, rounded to 1e-3 px) when boxes are present, ``segmentation``
        (compressed RLE with ``counts`` as ``str``) when masks are present.
    """
    num = len(instances)
    if num == 0:
        return []
    mapping = category_mapper(contiguous_to_category_id)
    scores = instances.scores.detach().cpu().double().tolist()
    classes = instances.pred_classes.detach().cpu().tolist()
    unknown = sorted({c for c in classes if mapping and c not in mapping})
    if unknown:
        raise KeyError(f"pred_classes {unknown} are not in contiguous_to_category_id "
                       f"(known: {sorted(mapping)})")
    results = [{"image_id": int(image_id), "category_id": mapping.get(c, c), "score": s}
               for c, s in zip(classes, scores)]
    if instances.has("pred_boxes"):
        xyxy = instances.pred_boxes.tensor.detach().cpu().double()
        xywh = xyxy.clone()
        xywh[:, 2:] -= xyxy[:, :2]
        # Rounded to 1e-3 px: a float32 box carries up to ~1e-4 px of representation error at
        # COCO image sizes. Rounding writes decimal inputs (e.g. results read from a COCO json)
        # back exactly, which matters when an IoU sits exactly on a threshold (a ground-truth
        # box shifted by whole pixels gives IoU 0.6 or 0.8), and moves any IoU by < 1e-5.
        for res, box in zip(results, xywh.tolist()):
            res["bbox"] = [round(v, BOX_DECIMALS) for v in box]
    if instances.has("pred_masks"):
        masks = instances.pred_masks
        masks = getattr(masks, "tensor", masks).detach().cpu().numpy().astype(np.uint8)
        # pycocotools wants (H, W, N) Fortran-ordered uint8
        rles = mask_util.encode(np.asfortranarray(masks.transpose(1, 2, 0)))
        for res, rle in zip(results, rles):
            rle["counts"] = rle["counts"].decode("ascii")
            res["segmentation"] = rle
    return results


def _annotation_to_coco(ann: Mapping, record: Mapping, mapping: Dict[int, int]) -> Dict:
    """One record annotation -> a COCO ground-truth annotation (id filled in by the caller)."""
    x, y, w, h = (float(v) for v in ann["bbox"])
    if str(ann.get("bbox_mode", "xywh")).lower() == "xyxy":
        w, h = w - x, h - y
    out = {"image_id": int(record["image_id"]), "bbox": [x, y, w, h],
           "category_id": mapping.get(int(ann["category_id"]), int(ann["category_id"])),
           "iscrowd": int(ann.get("iscrowd", 0))}
    segm = ann.get("segmentation")
    if segm:
        if isinstance(segm, dict) and isinstance(segm.get("counts"), bytes):
            segm = {"size": list(segm["size"]), "counts": segm["counts"].decode("ascii")}
        out["segmentation"] = segm
    if "area" in ann:
        out["area"] = float(ann["area"])
    elif segm:
        height, width = int(record["height"]), int(record["width"])
        if isinstance(segm, list):
            rle = mask_util.merge(mask_util.frPyObjects(segm, height, width))
        elif isinstance(segm["counts"], list):  # uncompressed RLE
            rle = mask_util.frPyObjects(segm, height, width)
        else:
            rle = segm
        out["area"] = float(mask_util.area(rle))
    else:
        out["area"] = w * h
    return out


def convert_to_coco_dict(records: Sequence[Mapping], metadata: Mapping) -> Dict[str, Any]:
    """Build a COCO ground-truth dict from dataset records, so any dataset can be evaluated.

    Args:
        records: dataset records (README.md, "Conventions"): ``image_id``, ``height``, ``width``,
            ``file_name``, ``annotations`` with ``bbox`` (XYWH by default), contiguous
            ``category_id``, ``segmentation`` (polygons or RLE), ``iscrowd``, ``area``.
        metadata: dataset metadata with ``thing_classes`` and optionally
            ``contiguous_to_category_id``.

    Returns:
        Dict with ``images``, ``annotations`` (crowd kept, area from the record or computed
        from the mask), ``categories`` in dataset category ids.
    """
    mapping = category_mapper(metadata.get("contiguous_to_category_id"))
    classes = list(metadata.get("thing_classes") or [])
    categories = [{"id": mapping.get(k, k), "name": name} for k, name in enumerate(classes)]
    images, annotations = [], []
    for rec in records:
        for key in ("image_id", "height", "width"):
            if key not in rec:
                raise KeyError(f"record {rec.get('file_name', '?')!r} has no {key!r}")
        images.append({"id": int(rec["image_id"]), "height": int(rec["height"]),
                       "width": int(rec["width"]), "file_name": str(rec.get("file_name", ""))})
        for ann in rec.get("annotations", []):
            annotations.append((ann.get("id"), _annotation_to_coco(ann, rec, mapping)))
    ids = [a_id for a_id, _ in annotations]
    keep_ids = all(isinstance(i, int) and i > 0 for i in ids) and len(set(ids)) == len(ids)
    out_anns = []
    for k, (a_id, ann) in enumerate(annotations):
        ann["id"] = a_id if keep_ids else k + 1  # COCOeval needs unique positive ids
        out_anns.append(ann)
    # ids used by annotations but absent from thing_classes still need a category entry
    used = {a["category_id"] for a in out_anns} - {c["id"] for c in categories}
    categories += [{"id": c, "name": str(c)} for c in sorted(used)]
    return {"info": {"description": f"segkit ground truth for {metadata.get('name')}"},
            "images": images, "annotations": out_anns, "categories": categories}


def load_coco_gt(source: Union[str, os.PathLike, Mapping]) -> COCO:
    """A ``COCO`` object from a json path or an in-memory dict, without pycocotools' prints."""
    with contextlib.redirect_stdout(io.StringIO()):
        if isinstance(source, Mapping):
            coco = COCO()
            coco.dataset = dict(source)
            coco.createIndex()
        else:
            if not os.path.isfile(source):
                raise FileNotFoundError(f"COCO ground-truth json not found: {source}")
            coco = COCO(os.fspath(source))
    return coco


def _summary(coco_eval: COCOeval, max_dets: Sequence[int]) -> Dict[str, float]:
    """The summary stats of an accumulated ``COCOeval`` (same maths as ``summarize()``).

    A stat with no ground truth in its area range is -1, as in pycocotools.
    """
    p, ev = coco_eval.params, coco_eval.eval

    def mean_of(ap: bool, area: str, mdet: int, iou: Optional[float] = None) -> float:
        a, m = p.areaRngLbl.index(area), list(p.maxDets).index(mdet)
        arr = ev["precision"][:, :, :, a, m] if ap else ev["recall"][:, :, a, m]
        if iou is not None:
            arr = arr[np.isclose(p.iouThrs, iou)]
        valid = arr[arr > -1]
        return float(np.mean(valid)) if valid.size else -1.0

    top = max_dets[-1]
    values = [mean_of(True, "all", top), mean_of(True, "all", top, 0.5),
              mean_of(True, "all", top, 0.75)]
    values += [mean_of(True, area, top) for _, area in _AREA_STATS]
    values += [mean_of(False, "all", m) for m in max_dets]
    values += [mean_of(False, area, top) for _, area in _AREA_STATS]
    return dict(zip(stat_names(max_dets), values))


def _no_detections(coco_gt: COCO) -> COCO:
    """An empty detection set for ``coco_gt`` (``loadRes`` cannot take an empty list)."""
    coco_dt = COCO()
    coco_dt.dataset = {"images": list(coco_gt.dataset.get("images", [])),
                       "categories": list(coco_gt.dataset.get("categories", [])),
                       "annotations": []}
    coco_dt.createIndex()
    return coco_dt


def run_coco_eval(
    coco_gt: COCO, results: List[Dict], iou_type: str, img_ids: Optional[Sequence[int]] = None,
    max_dets: Sequence[int] = (1, 10, 100), use_cats: bool = True,
) -> tuple:
    """Run ``COCOeval`` on in-memory results.

    Args:
        coco_gt: ground truth.
        results: COCO result dicts (``bbox`` XYWH for "bbox", RLE ``segmentation`` for "segm").
            May be empty: every stat with ground truth is then 0, the others -1.
        iou_type: "bbox" or "segm".
        img_ids: images to evaluate (default: every ground-truth image).
        max_dets: the three per-image detection limits (ascending).
        use_cats: False sets ``params.useCats = 0``: categories are ignored and every
            detection may match every ground truth of its image (class-agnostic proposals).

    Returns:
        ``(coco_eval, stats)``: the accumulated ``COCOeval`` and the summary stats dict
        (fractions in [0, 1], -1 where undefined).
    """
    if iou_type not in ("bbox", "segm"):
        raise ValueError(f"iou_type must be 'bbox' or 'segm', got {iou_type!r}")
    key = "bbox" if iou_type == "bbox" else "segmentation"
    missing = [i for i, r in enumerate(results) if key not in r]
    if missing:
        raise KeyError(f"{len(missing)} results have no {key!r} (first: index {missing[0]}) "
                       f"but iou_type is {iou_type!r}")
    unknown = {r["image_id"] for r in results} - set(coco_gt.getImgIds())
    if unknown:
        raise ValueError(f"results name image ids that are not in the ground truth: "
                         f"{sorted(unknown)[:10]}")
    # loadRes writes into the dicts (area, id, a box polygon), so it gets copies. For "segm"
    # the box goes: with a "bbox" key loadRes would take the box area for the S/M/L ranges.
    drop = "bbox" if iou_type == "segm" else None
    results = [{k: v for k, v in r.items() if k != drop} for r in results]
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(results) if results else _no_detections(coco_gt)
        coco_eval = COCOeval(coco_gt, coco_dt, iou_type)
        coco_eval.params.maxDets = sorted(int(m) for m in max_dets)
        coco_eval.params.useCats = int(bool(use_cats))
        if img_ids is not None:
            coco_eval.params.imgIds = sorted(int(i) for i in img_ids)
        coco_eval.evaluate()
        coco_eval.accumulate()
    return coco_eval, _summary(coco_eval, coco_eval.params.maxDets)


def evaluate_coco_json(
    gt_json_path: Union[str, os.PathLike], results: Union[List[Dict], str, os.PathLike],
    iou_type: str, max_dets: Sequence[int] = (1, 10, 100),
) -> Dict[str, float]:
    """Evaluate a COCO results list (or results json file) against a ground-truth json.

    Returns:
        The summary stats named by :func:`stat_names` as pycocotools reports them (fractions,
        not percent).
    """
    if not isinstance(results, list):
        with open(results) as f:
            results = json.load(f)
    if not results:
        raise ValueError(f"no results to evaluate against {gt_json_path}")
    _, stats = run_coco_eval(load_coco_gt(gt_json_path), results, iou_type, max_dets=max_dets)
    return stats
