"""DeepMask/SharpMask training samples drawn from any COCO-format dataset (segkit records).

A *mask sample* is an object centred in the patch at the canonical size, jittered by up to
+-16 px and 2^(+-1/4) in scale and flipped at random, with the object's mask in the window as
a {-1, +1} label (papers.md 1.2; 2.2 for the W160 geometry). A *score sample* is a patch with
a +1/-1 objectness label, positives and negatives 50/50 by one of two rules (papers.md 10.2):

* ``"paper"`` (default, papers.md 1.2): positives are jittered like mask samples; negatives
  are at least 32 px (patch pixels) from every canonical positive or at least one octave off
  every object's canonical scale. Patches in between are never drawn.
* ``"released"`` (papers.md 2.2): positives exactly centred at their quarter-octave bucket
  scale; negatives at a random scale of the {-3, -2.75, ..., 2} grid and a random position,
  rejected while an object within +-2.5 octaves has its centre closer than 3 x 16 = 48 px.

Every draw comes from the ``numpy.random.Generator`` passed in, so a sample is a pure function
of its generator's seed (the loader seeds one per sample, see ``loader.py``).
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np
import torch

from segkit.data import get_dataset, read_image
from segkit.data import SerializedList  # records kept out of Python objects for workers

from .objects import ObjectTable
from .patches import GREY, PatchGeometry, crop_patch, mask_label

__all__ = ["PatchSampler", "PRESETS"]

# Geometry per model (papers.md 1.1-1.2 NIPS, 2.1-2.2 DeepMask-ours, 3.2-3.3 SharpMask).
PRESETS: Dict[str, Dict[str, int]] = {
    "deepmask": {"window": 160, "context": 16, "label_size": 112},
    "sharpmask": {"window": 160, "context": 16, "label_size": 160},
    "deepmask_nips": {"window": 224, "context": 0, "label_size": 224},
}
RELEASED_NEG_OCTAVES = 2.5  # objects within +-10 quarter-octave buckets (papers.md 2.2)
RELEASED_SCALE_STEP = 0.25


class PatchSampler:
    """Draws mask and score samples from dataset records.

    Args:
        records: segkit dataset records (``segkit.data.coco``: ``bbox`` XYWH, ``segmentation``
            polygons or RLE, ``iscrowd``, ``area``).
        window, context, label_size, canonical_size: see :class:`PatchGeometry` (defaults:
            DeepMask-ours, input 160 + 2 x 16 = 192, label 112, canonical size 92).
        max_shift: centre jitter bound in patch pixels (16).
        max_log2_scale: scale jitter bound in octaves (1/4).
        flip_prob: probability of a horizontal flip of image and mask (0.5).
        object_sampling: ``"instance"`` (uniform over objects, the paper's default) or
            ``"category"`` (uniform category, then one of its objects: the released code).
        score_rule: ``"paper"`` or ``"released"`` (see the module docstring).
        pos_fraction: probability that a score sample is a positive (0.5).
        neg_min_shift, neg_min_log2_scale: the paper rule's negative margins (32 px, 1 octave).
        neg_log2_scale_range: log2 image scale (patch pixels per image pixel) of negative
            candidates, inclusive; the released rule uses its quarter-octave grid.
        min_area, min_side: objects smaller than this are never sampled (100 px^2, 5 px).
        fill: value of out-of-image input pixels, 0-255 (128: the released 0.5 grey).
        score_only: allow datasets without masks; only score samples can be drawn.
        dataset_name: named in error messages.
        max_tries: negative candidates drawn before giving up.

    Raises:
        ValueError: no images, no usable object, an unknown option or, unless
            ``score_only``, a usable annotation without ``segmentation`` (named).
    """

    def __init__(self, records, *, window: int = 160, context: int = 16, label_size: int = 112,
                 canonical_size: int = 0, max_shift: float = 16.0, max_log2_scale: float = 0.25,
                 flip_prob: float = 0.5, object_sampling: str = "instance",
                 score_rule: str = "paper", pos_fraction: float = 0.5,
                 neg_min_shift: float = 32.0, neg_min_log2_scale: float = 1.0,
                 neg_log2_scale_range: Tuple[float, float] = (-3.0, 2.0),
                 min_area: float = 100.0, min_side: float = 5.0, fill: int = GREY,
                 score_only: bool = False, dataset_name: str = "dataset", max_tries: int = 1000):
        _check_choice("object_sampling", object_sampling, ("instance", "category"))
        _check_choice("score_rule", score_rule, ("paper", "released"))
        lo, hi = neg_log2_scale_range
        for key, value, ok, expected in (
                ("flip_prob", flip_prob, 0 <= flip_prob <= 1, "in [0, 1]"),
                ("pos_fraction", pos_fraction, 0 <= pos_fraction <= 1, "in [0, 1]"),
                ("max_shift", max_shift, max_shift >= 0, ">= 0"),
                ("max_log2_scale", max_log2_scale, max_log2_scale >= 0, ">= 0"),
                ("neg_log2_scale_range", neg_log2_scale_range, lo <= hi, "(low, high)"),
                ("max_tries", max_tries, max_tries > 0, "> 0"),
                ("fill", fill, float(fill).is_integer() and 0 <= fill <= 255,
                 "an integer grey level in 0..255 (the patches are uint8 0-255)")):
            if not ok:
                raise ValueError(f"PatchSampler: '{key}' must be {expected}, got {value!r}")
        self.geometry = PatchGeometry(window, context, label_size, canonical_size)
        self.max_shift, self.max_log2_scale = float(max_shift), float(max_log2_scale)
        self.flip_prob, self.pos_fraction = float(flip_prob), float(pos_fraction)
        self.fill = int(fill)
        self.by_category, self.score_rule = object_sampling == "category", score_rule
        self.neg_min_shift, self.neg_min_log2_scale = float(neg_min_shift), neg_min_log2_scale
        self.neg_log2_scale_range = tuple(float(v) for v in neg_log2_scale_range)
        self.score_only, self.name, self.max_tries = bool(score_only), dataset_name, max_tries
        if not records:
            raise ValueError(f"{dataset_name}: the dataset has no images")
        self.objects = ObjectTable(records, self.geometry.canonical_size, min_area, min_side,
                                   dataset_name)
        if not len(self.objects.usable_rows):
            raise ValueError(
                f"{dataset_name}: no usable object for DeepMask/SharpMask samples among "
                f"{len(records)} image(s) with {self.objects.describe_unusable()}; a sample "
                f"needs a non-crowd object with area >= {min_area:g} and both bbox sides >= "
                f"{min_side:g} px")
        self.sizes = np.asarray([(r["height"], r["width"]) for r in records], dtype=np.int64)
        self._images = SerializedList([(r["file_name"], r.get("image_id")) for r in records])
        if not self.score_only:
            self._check_masks(records)
        segs = [None if self.score_only else a.get("segmentation")
                for r in records for a in r.get("annotations", [])]
        self._segmentations = SerializedList(segs)

    @classmethod
    def from_preset(cls, preset: str, records, **overrides) -> "PatchSampler":
        """A sampler with the geometry of ``PRESETS[preset]``, updated by ``overrides``."""
        _check_choice("preset", preset, tuple(PRESETS))
        return cls(records, **{**PRESETS[preset], **overrides})

    @classmethod
    def from_dataset(cls, node: Mapping[str, Any], preset: str = "deepmask", path: str = "",
                     **overrides) -> "PatchSampler":
        """A sampler over the dataset of a config node (``segkit.data.get_dataset``)."""
        records, metadata = get_dataset(node, path=path)
        overrides.setdefault("dataset_name", metadata["name"])
        return cls.from_preset(preset, records, **overrides)

    def _check_masks(self, records) -> None:
        """Mask samples need a segmentation on every usable object (papers.md 9: box-only
        labels were unsupported by the released code; here they get a clear message)."""
        missing = self.objects.usable & ~self.objects.has_mask
        if missing.any():
            row = int(np.flatnonzero(missing)[0])
            file_name = records[int(self.objects.image[row])]["file_name"]
            raise ValueError(
                f"{self.name}: annotation id {int(self.objects.ann_ids[row])} of {file_name} has "
                f"no 'segmentation' ({int(missing.sum())} of {int(self.objects.usable.sum())} "
                f"usable annotations lack one). DeepMask/SharpMask mask training needs instance "
                f"masks (polygons or RLE); for box-only data train the score head only "
                f"(hfreq=1, PatchSampler(score_only=True))")

    # -- samples ---------------------------------------------------------------------------

    def sample(self, kind: str, rng: np.random.Generator) -> Dict[str, Any]:
        """One ``"mask"`` or ``"score"`` sample (see :meth:`mask_sample`, :meth:`score_sample`)."""
        _check_choice("sample kind", kind, ("mask", "score"))
        return self.mask_sample(rng) if kind == "mask" else self.score_sample(rng)

    def mask_sample(self, rng: np.random.Generator) -> Dict[str, Any]:
        """A jittered, possibly flipped, object-centred patch and its mask label.

        Returns:
            ``{"kind": "mask", "image": (3, S, S) uint8 RGB 0-255, "mask": (g, g)
            float32 in {-1, +1}, "image_id", "file_name", "ann_id": int, "window": (4,)
            float32 XYXY window in image pixels, "crop": (4,) float32 XYXY input region,
            "flipped": bool}``. The boxes describe the unflipped image.
        """
        if self.score_only:
            raise ValueError(f"{self.name}: this PatchSampler is score_only (no masks): it "
                             f"cannot draw mask samples; use hfreq=1")
        row = self.objects.choose(rng, self.by_category)
        cx, cy, f = self._jittered(row, rng)
        out = self._render("mask", int(self.objects.image[row]), cx, cy, f, rng, row)
        h, w = (int(v) for v in self.sizes[int(self.objects.image[row])])
        try:
            label = mask_label(self._segmentations[row], h, w, self.geometry.window_box(cx, cy, f),
                               self.geometry.label_size)
        except ValueError as e:
            raise ValueError(f"{self.name}: {out['file_name']} annotation id {out['ann_id']}: "
                             f"{e}") from None
        out["mask"] = label.flip(-1) if out["flipped"] else label
        return out

    def score_sample(self, rng: np.random.Generator,
                     positive: Optional[bool] = None) -> Dict[str, Any]:
        """A positive (probability ``pos_fraction``) or negative patch by ``score_rule``.

        Args:
            rng: source of every random choice.
            positive: force the label instead of drawing it.

        Returns:
            As :meth:`mask_sample` with ``"kind": "score"`` and ``"label"``: float32 scalar
            tensor +1 / -1 instead of ``"mask"``; ``"ann_id"`` is None for negatives.
        """
        if positive is None:
            positive = bool(rng.random() < self.pos_fraction)
        if positive:
            if self.score_rule == "paper":
                row = self.objects.choose(rng, self.by_category)
                cx, cy, f = self._jittered(row, rng)
            else:  # exactly centred at the bucket scale
                row = self.objects.choose_bucketed(rng)
                (cx, cy), f = self.objects.centres[row], 2.0 ** self.objects.bucket_log2_f[row]
            out = self._render("score", int(self.objects.image[row]), cx, cy, f, rng, row)
        else:
            out = self._render("score", *self._negative(rng), rng)
        out["label"] = torch.tensor(1.0 if positive else -1.0)
        return out

    # -- geometry --------------------------------------------------------------------------

    def _jittered(self, row: int, rng: np.random.Generator) -> Tuple[float, float, float]:
        """Centre and scale f (image px per patch px) of a jittered canonical patch of ``row``:
        log2 offset ~ U(-1/4, 1/4), shift ~ U(-16, 16) patch px per axis (papers.md 1.2, 2.2)."""
        f = 2.0 ** (self.objects.log2_f[row] + rng.uniform(-1, 1) * self.max_log2_scale)
        dx, dy = rng.uniform(-1, 1, size=2) * self.max_shift * f
        cx, cy = self.objects.centres[row]
        return float(cx + dx), float(cy + dy), float(f)

    def is_negative(self, image: int, cx: float, cy: float, f: float) -> bool:
        """Whether the patch centred at ``(cx, cy)`` with scale ``f`` (image px per patch px) in
        record ``image`` is a negative under ``score_rule``, checked against every annotation
        of the image (crowd and tiny ones included)."""
        rows = self.objects.rows_of(image)
        offsets = np.abs(self.objects.centres[rows] - (cx, cy)) / f  # patch pixels
        if self.score_rule == "paper":
            # >= 32 px per axis from the canonical positive (whose jitter is +-16 px per axis),
            # or >= 1 octave from the object's canonical scale (papers.md 1.2)
            far = offsets.max(axis=1) >= self.neg_min_shift
            off_scale = np.abs(np.log2(f) - self.objects.log2_f[rows]) >= self.neg_min_log2_scale
            return bool(np.all(far | off_scale))
        # released rule (papers.md 2.2), distances measured at the candidate's own scale
        near_scale = (np.abs(np.log2(f) - self.objects.bucket_log2_f[rows])
                      <= RELEASED_NEG_OCTAVES + 1e-9)
        close = np.hypot(offsets[:, 0], offsets[:, 1]) < 3.0 * self.max_shift
        return not bool(np.any(near_scale & close))

    def _negative(self, rng: np.random.Generator) -> Tuple[int, float, float, float]:
        """``(image, cx, cy, f)`` of a negative: candidates at a random scale and position
        (any image for the paper rule; images with objects for the released one)."""
        pool = (np.arange(len(self.sizes)) if self.score_rule == "paper"
                else self.objects.images_with_objects)
        lo, hi = self.neg_log2_scale_range
        steps = int(round((hi - lo) / RELEASED_SCALE_STEP))
        for _ in range(self.max_tries):
            image = int(pool[int(rng.integers(len(pool)))])
            log2_scale = (rng.uniform(lo, hi) if self.score_rule == "paper"
                          else lo + RELEASED_SCALE_STEP * int(rng.integers(steps + 1)))
            h, w = self.sizes[image]
            cx, cy, f = float(rng.uniform(0, w)), float(rng.uniform(0, h)), 2.0 ** -log2_scale
            if self.is_negative(image, cx, cy, f):
                return image, cx, cy, f
        raise RuntimeError(
            f"{self.name}: no negative patch among {self.max_tries} candidates (rule "
            f"'{self.score_rule}', log2 scales {self.neg_log2_scale_range}); objects cover "
            f"every candidate position and scale: widen neg_log2_scale_range")

    def _render(self, kind: str, image: int, cx: float, cy: float, f: float,
                rng: np.random.Generator, row: Optional[int] = None) -> Dict[str, Any]:
        """The sample dict without its label: the input patch (flipped at random) and ids."""
        file_name, image_id = self._images[image]
        pixels = read_image(file_name)  # decoded once per sample, also for the mask label
        if pixels.shape[:2] != tuple(self.sizes[image]):
            raise ValueError(f"{self.name}: {file_name} decodes to {pixels.shape[0]}x"
                             f"{pixels.shape[1]} (h x w) but its record says "
                             f"{self.sizes[image][0]}x{self.sizes[image][1]}")
        crop = self.geometry.crop_box(cx, cy, f)
        flipped = bool(rng.random() < self.flip_prob)
        return {"kind": kind,
                "image": crop_patch(pixels, crop, self.geometry.input_size, self.fill, flipped),
                "image_id": image_id, "file_name": file_name,
                "ann_id": None if row is None else int(self.objects.ann_ids[row]),
                "window": torch.tensor(self.geometry.window_box(cx, cy, f), dtype=torch.float32),
                "crop": torch.tensor(crop, dtype=torch.float32), "flipped": flipped}


def _check_choice(key: str, value: Any, allowed: Tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {key} {value!r}; expected one of {', '.join(allowed)}")
