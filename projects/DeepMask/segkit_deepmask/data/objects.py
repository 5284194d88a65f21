"""Flat arrays over a dataset's annotations: what the patch sampler draws objects from.

Every annotation of every record is a row (crowd and tiny ones too: the negative rules must
keep away from them as well); the rows usable as training objects are flagged ``usable``:
not crowd, area >= 100 px and both bbox sides >= 5 px, the released code's filter for mask
samples (papers.md 2.2), which we also apply to score positives.
"""
from __future__ import annotations

from typing import Any, Dict, List, Sequence

import numpy as np

__all__ = ["ObjectTable"]


def _xywh(ann: Dict[str, Any], where: str) -> List[float]:
    """The annotation's box as XYWH, from its ``bbox`` in ``bbox_mode`` (default XYWH)."""
    if len(ann.get("bbox") or ()) != 4:
        raise ValueError(f"{where}: bbox must be [x, y, w, h], got {ann.get('bbox')!r}")
    box = [float(v) for v in ann["bbox"]]
    mode = ann.get("bbox_mode", "xywh")
    if mode == "xyxy":
        return [box[0], box[1], box[2] - box[0], box[3] - box[1]]
    if mode != "xywh":
        raise ValueError(f"{where}: unknown bbox_mode {mode!r}; expected 'xywh' or 'xyxy'")
    return box


class ObjectTable:
    """Annotations of ``records`` as numpy arrays (one row per annotation).

    Args:
        records: segkit dataset records (``segkit.data.coco``); ``bbox`` in its
            ``bbox_mode`` (COCO XYWH by default).
        canonical_size: the patch's canonical object size (max bbox side, patch pixels).
        min_area, min_side: the usability filter (papers.md 2.2: 100 and 5).

    Attributes:
        image: (N,) int64 record index of each annotation.
        boxes: (N, 4) float64 XYWH boxes in image pixels.
        centres: (N, 2) float64 bbox centres (x, y).
        log2_f: (N,) float64 log2 of the canonical scale f (image pixels per patch pixel)
            that brings the max bbox side to ``canonical_size``.
        ann_ids, category: (N,) int64 annotation ids (-1 when missing), contiguous classes.
        crowd: (N,) bool; area: (N,) float64 (the annotation's ``area``, else w * h).
        usable: (N,) bool; has_mask: (N,) bool, the annotation has a ``segmentation``.
        first: (num_images + 1,) int64, rows of record i are ``first[i]:first[i + 1]``.
    """

    def __init__(self, records: Sequence[Dict[str, Any]], canonical_size: int,
                 min_area: float = 100.0, min_side: float = 5.0, dataset: str = "dataset"):
        rows, first = [], [0]
        for i, rec in enumerate(records):
            for ann in rec.get("annotations", []):
                where = f"{dataset}: {rec.get('file_name')} annotation id {ann.get('id')}"
                x, y, w, h = _xywh(ann, where)
                area = ann.get("area")
                rows.append((i, x, y, w, h, ann.get("id"), ann.get("category_id", 0),
                             bool(ann.get("iscrowd", 0)), w * h if area is None else float(area),
                             ann.get("segmentation") is not None))
            first.append(len(rows))
        cols = list(zip(*rows)) if rows else [()] * 10
        self.image = np.asarray(cols[0], dtype=np.int64)
        self.boxes = np.asarray(cols[1:5], dtype=np.float64).T.reshape(-1, 4)
        self.ann_ids = np.asarray([-1 if a is None else a for a in cols[5]], dtype=np.int64)
        self.category = np.asarray(cols[6], dtype=np.int64)
        self.crowd = np.asarray(cols[7], dtype=bool)
        self.area = np.asarray(cols[8], dtype=np.float64)
        self.has_mask = np.asarray(cols[9], dtype=bool)
        self.min_area, self.min_side = float(min_area), float(min_side)
        self.usable = (~self.crowd & (self.area >= min_area)
                       & (self.boxes[:, 2:].min(axis=1) >= min_side))
        self.first = np.asarray(first, dtype=np.int64)
        self.centres = self.boxes[:, :2] + self.boxes[:, 2:] / 2.0
        max_side = np.maximum(self.boxes[:, 2:].max(axis=1), 1e-6)
        self.log2_f = np.log2(max_side / canonical_size)
        # Released code's quarter-octave buckets (papers.md 2.2): the smallest q with
        # max_side in (objSz * 2^((q-1)/4), objSz * 2^((q+1)/4)], i.e. q = ceil(4 log2 f - 1),
        # so a bucketed object appears between objSz and objSz * 2^(1/4) in its patch.
        self.bucket_log2_f = np.ceil(4.0 * self.log2_f - 1.0 - 1e-9) / 4.0
        self.usable_rows = np.flatnonzero(self.usable)
        self._by_category = {int(c): np.flatnonzero(self.usable & (self.category == c))
                             for c in np.unique(self.category[self.usable])}
        self.images_with_usable = np.unique(self.image[self.usable])
        self.images_with_objects = np.unique(self.image)

    def __len__(self) -> int:
        return len(self.image)

    def rows_of(self, image: int) -> slice:
        """Rows of record ``image`` (all its annotations)."""
        return slice(int(self.first[image]), int(self.first[image + 1]))

    def describe_unusable(self) -> str:
        """Why annotations are not usable, as counts by reason (for error messages)."""
        small = ~self.crowd & (self.area < self.min_area)
        thin = ~self.crowd & (self.boxes[:, 2:].min(axis=1) < self.min_side)
        return (f"{len(self)} annotation(s): {int(self.crowd.sum())} crowd, {int(small.sum())} "
                f"with area < {self.min_area:g}, {int(thin.sum())} with a bbox side < "
                f"{self.min_side:g}")

    def choose(self, rng: np.random.Generator, by_category: bool) -> int:
        """A usable row: uniformly over instances (the default: the papers define samples per
        object, papers.md 1.2), or a category uniformly over the categories with a usable
        instance, then one of its instances uniformly (the released code, papers.md 2.2)."""
        if by_category:
            cats = sorted(self._by_category)
            rows = self._by_category[cats[int(rng.integers(len(cats)))]]
            return int(rows[int(rng.integers(len(rows)))])
        return int(self.usable_rows[int(rng.integers(len(self.usable_rows)))])

    def choose_bucketed(self, rng: np.random.Generator) -> int:
        """Released positives (papers.md 2.2): an image with a usable object uniformly, one of
        its occupied scale buckets uniformly, then one of the bucket's objects uniformly."""
        img = int(self.images_with_usable[int(rng.integers(len(self.images_with_usable)))])
        rows = np.arange(self.first[img], self.first[img + 1])[self.usable[self.rows_of(img)]]
        buckets = np.unique(self.bucket_log2_f[rows])
        bucket = buckets[int(rng.integers(len(buckets)))]
        rows = rows[self.bucket_log2_f[rows] == bucket]
        return int(rows[int(rng.integers(len(rows)))])
