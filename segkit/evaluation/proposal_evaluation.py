"""Class-agnostic proposal recall (registered as ``proposals`` in ``EVALUATORS``).

Average recall (AR) of object proposals (papers.md section 5, RPN): recall averaged over the
IoU thresholds 0.50:0.05:0.95, at the top 10 / 100 / 1000 proposals of each image (by score),
over all objects and per COCO area range (small < 32^2 <= medium < 96^2 <= large).

It is pycocotools' ``COCOeval`` run with ``params.useCats = 0`` (every proposal may match every
ground-truth object of its image, whatever its class) and ``params.maxDets = [10, 100, 1000]``:
the numbers equal a direct ``COCOeval`` on the same json data. Crowd ground truth is what
pycocotools makes of it: a crowd region is never a recall target, and a proposal matched to it
is ignored. Ground truth comes from ``metadata["json_file"]`` or is built from the records,
exactly as in :class:`~segkit.evaluation.COCOEvaluator`.

Reading the numbers: ``COCOeval.eval["recall"]`` has shape (T IoU thresholds, K = 1 category
with ``useCats = 0``, A area ranges [all, small, medium, large], M maxDets); entry -1 means
"no ground truth". ``AR@N`` is the mean over T of ``recall[:, 0, A=all, M=index of N]``,
``ARs@N`` the same with A=small, etc. pycocotools' own ``summarize()`` only reports AR for all
three maxDets and the S/M/L split at the largest one, so the split at 100 is read from the array.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch

from segkit.registry import EVALUATORS
from segkit.structures import Instances

from .coco_evaluation import COCOEvaluator
from .coco_utils import instances_to_coco_json, run_coco_eval

__all__ = ["ProposalEvaluator", "proposal_recall"]

logger = logging.getLogger(__name__)

_AREAS = (("", "all"), ("s", "small"), ("m", "medium"), ("l", "large"))


def proposal_recall(coco_eval, max_dets: Sequence[int],
                    area_max_dets: Optional[Sequence[int]] = None) -> Dict[str, float]:
    """AR metrics from an accumulated class-agnostic ``COCOeval`` (fractions, -1 undefined).

    Args:
        coco_eval: evaluated and accumulated ``COCOeval`` (``useCats = 0``).
        max_dets: limits reported for all areas: ``AR@N``.
        area_max_dets: limits for which the small/medium/large split ``ARs@N``, ``ARm@N``,
            ``ARl@N`` is reported (default: the two largest of ``max_dets``).

    Returns:
        ``{"AR@10": ..., "AR@100": ..., "AR@1000": ..., "ARs@100": ..., ...}``: the mean over
        the IoU thresholds of the recall at that limit, as pycocotools' ``summarize()`` computes
        it (-1 where the area range has no ground truth).
    """
    p, recall = coco_eval.params, coco_eval.eval["recall"]  # (T, K, A, M)
    limits = list(p.maxDets)
    area_max_dets = list(max_dets[-2:] if area_max_dets is None else area_max_dets)

    def mean_recall(area: str, mdet: int) -> float:
        if mdet not in limits:
            raise ValueError(f"maxDets {mdet} was not evaluated (params.maxDets = {limits})")
        r = recall[:, :, p.areaRngLbl.index(area), limits.index(mdet)]
        r = r[r > -1]
        return float(np.mean(r)) if r.size else -1.0

    out = {f"AR@{m}": mean_recall("all", m) for m in max_dets}
    for m in area_max_dets:
        for suffix, area in _AREAS[1:]:
            out[f"AR{suffix}@{m}"] = mean_recall(area, m)
    return out


@EVALUATORS.register("proposals", aliases=("proposal_recall",))
class ProposalEvaluator(COCOEvaluator):
    """Class-agnostic AR of proposals for boxes and (when predicted) masks.

    Args:
        records: the dataset records being evaluated (ground truth when the metadata has no
            ``json_file``).
        metadata: dataset metadata (``thing_classes``, ``contiguous_to_category_id``, optional
            ``json_file``, ``name``).
        iou_types: any of "bbox", "segm". "segm" is skipped (logged) when the predictions carry
            no ``pred_masks``, the usual case for an RPN.
        output_dir: where ``coco_proposals_results.json`` is written (None: not written).
        max_dets: the three per-image proposal limits, ascending (default 10, 100, 1000).
        area_max_dets: limits at which the small/medium/large split is reported (default: the
            two largest of ``max_dets``).

    ``process()`` takes model outputs ``{"instances": Instances}`` at the original resolution
    with ``pred_boxes`` (XYXY), ``scores`` and optionally ``pred_masks``; ``pred_classes`` are
    ignored. Only the top ``max_dets[-1]`` proposals of an image (by score) are kept, which is
    all pycocotools looks at.

    ``evaluate()`` returns ``{iou_type: {"AR@10", "AR@100", "AR@1000", "ARs@100", "ARm@100",
    "ARl@100", "ARs@1000", "ARm@1000", "ARl@1000"}}`` in percent (x100), NaN where an area
    range has no ground truth.
    """

    results_file = "coco_proposals_results.json"

    def __init__(
        self, records: Sequence[Mapping], metadata: Mapping,
        iou_types: Sequence[str] = ("bbox", "segm"), output_dir: Optional[str] = None,
        max_dets: Sequence[int] = (10, 100, 1000),
        area_max_dets: Optional[Sequence[int]] = None,
    ):
        super().__init__(records, metadata, iou_types=iou_types, output_dir=output_dir,
                         max_dets=max_dets)
        self.area_max_dets = tuple(int(m) for m in (area_max_dets or self.max_dets[-2:]))
        bad = [m for m in self.area_max_dets if m not in self.max_dets]
        if bad:
            raise ValueError(f"area_max_dets {bad} must be among max_dets {list(self.max_dets)}")

    def _to_results(self, instances, image_id: int) -> List[Dict[str, Any]]:
        """The image's top ``max_dets[-1]`` proposals, all in one category of the ground truth."""
        if not instances.has("scores"):
            raise KeyError("proposal predictions need 'scores' (e.g. sigmoid objectness)")
        if len(instances) > self.max_dets[-1]:
            # pycocotools keeps the top maxDets by a stable sort on -score: same selection, and
            # the kept ones stay in an order that sorts the same way.
            order = np.argsort(-instances.scores.detach().numpy(), kind="mergesort")
            instances = instances[order[: self.max_dets[-1]].tolist()]
        fields = dict(instances.get_fields())
        fields.pop("pred_classes", None)
        # class-agnostic: one category for all (and one that COCOeval's catIds contain)
        agnostic = Instances(instances.image_size, **fields)
        agnostic.pred_classes = torch.zeros(len(agnostic), dtype=torch.int64)
        results = instances_to_coco_json(agnostic, image_id)
        cat = self._category_id
        for r in results:
            r["category_id"] = cat
        return results

    @property
    def _category_id(self) -> int:
        """A category id of the ground truth (with ``useCats = 0`` COCOeval still drops
        detections whose category is not one of ``params.catIds``)."""
        cats = sorted(self.coco_gt.getCatIds())
        return int(cats[0]) if cats else 1

    def _evaluate_one(self, results: List[Dict], iou_type: str, img_ids: List[int]) -> Dict:
        """Class-agnostic COCOeval of one IoU type -> AR metrics in percent (NaN undefined)."""
        if not results:
            logger.warning("no proposals at all on %d images: AR is 0 (NaN without ground "
                           "truth)", len(img_ids))
        coco_eval, _ = run_coco_eval(self.coco_gt, results, iou_type, img_ids,
                                     self.max_dets, use_cats=False)
        stats = proposal_recall(coco_eval, self.max_dets, self.area_max_dets)
        metrics = {n: (v * 100.0 if v >= 0 else math.nan) for n, v in stats.items()}
        logger.info("%s proposal recall on %d images:\n%s", iou_type, len(img_ids),
                    "\n".join(f"  {n:>8}: {v:.3f}" for n, v in metrics.items()))
        return metrics
