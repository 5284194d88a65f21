"""Options of DeepMask / SharpMask full-image inference (the ``model.inference`` config node).

Scales (papers.md 1.5, 2.4 and 10): the papers run the 224-window NIPS model at 2^-2 ... 2^1 in
half-octave steps. The released code runs its 160-window models at 2^-2.5 ... 2^0.5: half an
octave lower, because a 160 window holds its canonical object at 92 px instead of 128 px
(92 / 128 = 2^-0.48), so the lower scales keep the object sizes found by each scale those of
the paper. The default is the paper's range; ``log2_scale_min=-2.5 log2_scale_max=0.5`` gives
the released one. ``zoom`` adds that many further, up-sampled, steps above the largest scale
for small objects (DeepMaskZoom / SharpMaskZoom: 1, Zoom^2: 2; papers.md 1.5 and 2.4).
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from typing import Any, List, Mapping, Optional

from ..data.patches import GREY

__all__ = ["InferenceSettings"]


@dataclass(frozen=True)
class InferenceSettings:
    """Full-image inference options.

    Attributes:
        log2_scale_min, log2_scale_max, log2_scale_step: the pyramid, in octaves of the
            original image (defaults: the paper's -2, 1, 1/2: seven scales).
        zoom: extra up-sampled scales above ``log2_scale_max`` (0, 1 or 2 in the papers).
        max_proposals: windows kept per image, the best by score over all scales (1000 for
            proposals; the released evaluation keeps 500, its demo 5).
        mask_threshold: probability at which masks are binarised (0.2 on COCO, 0.1 on PASCAL).
        nms_thresh: None (default, papers.md 10.5: no NMS), or a box IoU above which a
            window is dropped for a better-scoring one. Boxes are the tight boxes of the
            coarse (DeepMask head) masks of the ``nms_pre_topk`` best windows, so the NMS is
            cheap and SharpMask still refines only the kept windows.
        nms_pre_topk: windows considered by the NMS.
        coarse_masks: use the DeepMask mask head even when there is a refinement (the
            released code's ``-dm``).
        refine_batch_size: SharpMask refines the top windows in one batch (papers.md 3.4);
            set a size to bound the memory (about 0.6 MB per window at 160 x 160).
        pad_value: grey of the ``window / 2`` border around every scale, 0-255 (the patch
            sampler's ``fill``: the released 0.5 grey, papers.md 2.4).
        antialias: antialiased bilinear down-sampling of the pyramid (as the patch sampler's
            PIL resize, so full images look like the training patches).
        paste_masks: return full-image masks (False: boxes and scores only, e.g. as a proposal
            generator; the boxes are the same).
    """

    log2_scale_min: float = -2.0
    log2_scale_max: float = 1.0
    log2_scale_step: float = 0.5
    zoom: int = 0
    max_proposals: int = 1000
    mask_threshold: float = 0.2
    nms_thresh: Optional[float] = None
    nms_pre_topk: int = 3000
    coarse_masks: bool = False
    refine_batch_size: Optional[int] = None
    pad_value: float = float(GREY)
    antialias: bool = True
    paste_masks: bool = True

    def __post_init__(self):
        span = (self.log2_scale_max - self.log2_scale_min) / self.log2_scale_step \
            if self.log2_scale_step > 0 else -1
        checks = (
            ("log2_scale_step", self.log2_scale_step > 0, "> 0"),
            ("log2_scale_max", span >= 0 and abs(span - round(span)) < 1e-6,
             "log2_scale_min plus a whole number of log2_scale_step"),
            ("zoom", int(self.zoom) == self.zoom and self.zoom >= 0, "an int >= 0"),
            ("max_proposals", int(self.max_proposals) == self.max_proposals
             and self.max_proposals > 0, "an int > 0"),
            ("mask_threshold", 0 < self.mask_threshold < 1, "a probability in (0, 1)"),
            ("nms_thresh", self.nms_thresh is None or 0 < self.nms_thresh <= 1,
             "null or an IoU in (0, 1]"),
            ("nms_pre_topk", self.nms_thresh is None or self.nms_pre_topk >= self.max_proposals,
             ">= max_proposals when nms_thresh is set"),
            ("refine_batch_size", self.refine_batch_size is None or self.refine_batch_size > 0,
             "null or > 0"),
            ("pad_value", 0 <= self.pad_value <= 255, "a grey level in 0..255"))
        for key, ok, expected in checks:
            if not ok:
                raise ValueError(f"deepmask inference: '{key}' must be {expected}, got "
                                 f"{getattr(self, key)!r}")

    @classmethod
    def from_node(cls, node: Optional[Mapping[str, Any]]) -> "InferenceSettings":
        """Settings from a config node (a mapping of the attributes; None: the defaults).

        Raises:
            ValueError: an unknown key (with a "did you mean") or an invalid value.
        """
        if node is None:
            return cls()
        if isinstance(node, cls):
            return node
        names = [f.name for f in dataclasses.fields(cls)]
        for key in node:
            if key not in names:
                close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.6)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                raise ValueError(f"unknown key '{key}' in model.inference{hint} accepted: "
                                 f"{', '.join(names)}")
        return cls(**dict(node))

    def log2_scales(self) -> List[float]:
        """log2 of every pyramid scale, ascending: min, min + step, ..., max + zoom * step."""
        steps = round((self.log2_scale_max - self.log2_scale_min) / self.log2_scale_step)
        return [self.log2_scale_min + k * self.log2_scale_step
                for k in range(steps + int(self.zoom) + 1)]

    def replace(self, **changes: Any) -> "InferenceSettings":
        """A copy with ``changes`` (validated)."""
        return dataclasses.replace(self, **changes)

