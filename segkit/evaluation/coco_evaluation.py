"""COCO box / mask AP evaluator (registered as ``coco`` in ``EVALUATORS``).

The evaluator collects per-image predictions as COCO result dicts (boxes XYWH, masks as
compressed RLE, dataset category ids), then runs pycocotools' ``COCOeval`` once per IoU type.
Ground truth is the dataset's own json file when the metadata names one, otherwise it is
built from the records, so any dataset in the record format can be evaluated.
"""
from __future__ import annotations

import json
import logging
import math
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np

from segkit.registry import EVALUATORS

from .coco_utils import (
    category_mapper, convert_to_coco_dict, evaluate_coco_json, instances_to_coco_json,
    load_coco_gt, run_coco_eval, stat_names,
)
from .evaluator import DatasetEvaluator, gather_to_main

__all__ = ["COCOEvaluator", "instances_to_coco_json", "evaluate_coco_json"]

logger = logging.getLogger(__name__)

RESULTS_FILE = "coco_instances_results.json"


@EVALUATORS.register("coco")
class COCOEvaluator(DatasetEvaluator):
    """Box and/or mask AP on a COCO-style dataset, as pycocotools computes it.

    Args:
        records: the dataset records being evaluated (README.md "Conventions"; contiguous category
            ids). Used for ground truth when ``metadata["json_file"]`` is absent.
        metadata: dataset metadata (``thing_classes``, ``contiguous_to_category_id``,
            optional ``json_file``, ``name``).
        iou_types: any of "bbox", "segm". "segm" is skipped with a warning when the
            predictions carry no ``pred_masks``.
        output_dir: where ``coco_instances_results.json`` is written (None: not written).
        max_dets: per-image detection limits for AR (the largest also bounds AP).

    ``evaluate()`` returns ``{iou_type: {"AP", "AP50", "AP75", "APs", "APm", "APl",
    "AR1", "AR10", "AR100", "ARs", "ARm", "ARl", "AP-<class>"...}}`` in percent (x100);
    NaN where a stat is undefined (no ground truth of that area / class).
    """

    results_file = RESULTS_FILE  # written to output_dir by evaluate()

    def __init__(
        self, records: Sequence[Mapping], metadata: Mapping,
        iou_types: Sequence[str] = ("bbox", "segm"), output_dir: Optional[str] = None,
        max_dets: Sequence[int] = (1, 10, 100),
    ):
        bad = [t for t in iou_types if t not in ("bbox", "segm")]
        if bad:
            raise ValueError(f"COCOEvaluator iou_types must be 'bbox'/'segm', got {bad}")
        if len(max_dets) != 3 or list(max_dets) != sorted(max_dets):
            raise ValueError(f"max_dets must be 3 ascending ints, got {list(max_dets)}")
        self.records = list(records)
        self.metadata = dict(metadata)
        self.iou_types = tuple(iou_types)
        self.output_dir = output_dir
        self.max_dets = tuple(int(m) for m in max_dets)
        self.mapping = category_mapper(self.metadata.get("contiguous_to_category_id"))
        self._coco_gt = None
        self.reset()

    def reset(self) -> None:
        """Forget the predictions collected so far."""
        self._predictions: List[Dict[str, Any]] = []  # one {"image_id", "results"} per image

    @property
    def coco_gt(self):
        """The ground truth as a pycocotools ``COCO`` (built lazily, once)."""
        if self._coco_gt is None:
            json_file = self.metadata.get("json_file")
            if json_file:
                self._coco_gt = load_coco_gt(json_file)
            else:
                logger.info("building COCO ground truth from %d records of %r",
                            len(self.records), self.metadata.get("name"))
                self._coco_gt = load_coco_gt(convert_to_coco_dict(self.records, self.metadata))
        return self._coco_gt

    def process(self, inputs: Sequence[Mapping], outputs: Sequence[Mapping]) -> None:
        """Collect one batch.

        Args:
            inputs: model input dicts, each with ``image_id``.
            outputs: model output dicts, each with ``instances`` (original resolution:
                ``pred_boxes`` XYXY, ``scores``, ``pred_classes``, optional ``pred_masks``).
        """
        if len(inputs) != len(outputs):
            raise ValueError(f"process() got {len(inputs)} inputs but {len(outputs)} outputs")
        for inp, out in zip(inputs, outputs):
            if "image_id" not in inp:
                raise KeyError(f"model input {inp.get('file_name', '?')!r} has no 'image_id'")
            image_id = int(inp["image_id"])
            results = []
            if "instances" in out:
                results = self._to_results(out["instances"].to("cpu"), image_id)
            self._predictions.append({"image_id": image_id, "results": results})

    def _to_results(self, instances, image_id: int) -> List[Dict[str, Any]]:
        """One image's predictions as COCO result dicts (category ids of the dataset)."""
        return instances_to_coco_json(instances, image_id, self.mapping)

    def evaluate(self) -> Dict[str, Dict[str, float]]:
        """Run COCOeval for every IoU type (main process only; others return ``{}``)."""
        predictions = gather_to_main(self._predictions)
        if predictions is None:  # not the main process
            return {}
        img_ids = sorted({p["image_id"] for p in predictions})
        results = [r for p in predictions for r in p["results"]]
        if self.output_dir:
            os.makedirs(self.output_dir, exist_ok=True)
            path = os.path.join(self.output_dir, self.results_file)
            with open(path, "w") as f:
                json.dump(results, f)
            logger.info("wrote %d results to %s", len(results), path)
        out = {}
        for iou_type in self.iou_types:
            key = "bbox" if iou_type == "bbox" else "segmentation"
            if results and not all(key in r for r in results):
                logger.warning("skipping %r evaluation: predictions have no %r", iou_type, key)
                continue
            out[iou_type] = self._evaluate_one(results, iou_type, img_ids)
        return out

    def _evaluate_one(self, results: List[Dict], iou_type: str, img_ids: List[int]) -> Dict:
        names = stat_names(self.max_dets)
        classes = list(self.metadata.get("thing_classes") or [])
        if not results:
            logger.warning("no predictions at all for %r on %d images: AP and AR are 0 "
                           "(NaN where there is no ground truth)", iou_type, len(img_ids))
        coco_eval, stats = run_coco_eval(self.coco_gt, results, iou_type, img_ids, self.max_dets)
        metrics = {n: (v * 100.0 if v >= 0 else math.nan) for n, v in stats.items()}
        metrics.update(self._per_class_ap(coco_eval, classes))
        logger.info("%s results on %d images:\n%s", iou_type, len(img_ids),
                    "\n".join(f"  {n:>6}: {metrics[n]:.3f}" for n in names))
        return metrics

    def _per_class_ap(self, coco_eval, classes: List[str]) -> Dict[str, float]:
        """AP (IoU 0.5:0.95, all areas, largest maxDets) per contiguous class, in percent."""
        precision = coco_eval.eval["precision"]  # (T iou, R recall, K cat, A area, M maxdets)
        cat_ids = list(coco_eval.params.catIds)
        out = {}
        for k, name in enumerate(classes):
            cat = self.mapping.get(k, k)
            if cat not in cat_ids:
                out[f"AP-{name}"] = math.nan
                continue
            p = precision[:, :, cat_ids.index(cat), 0, -1]
            p = p[p > -1]
            out[f"AP-{name}"] = float(np.mean(p)) * 100.0 if p.size else math.nan
        return out
