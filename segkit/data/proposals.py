"""Precomputed proposal files: save, load, and map into network-input coordinates.

Fast R-CNN (papers.md section 5, Table 2: "Fast R-CNN on fixed FPN-RPN proposals"),
MultiPathNet (section 4) and Mask^X R-CNN stage-wise training (section 8.4) train and test a
detector on proposals computed once by a separate model. A proposal-only model writes them
(``python -m segkit.engine.save_proposals``); the ``precomputed`` proposal generator reads them.

File format (a ``torch.save`` dict that ``torch.load(weights_only=True)`` reads)::

    {"format": "segkit-proposals", "version": 1,
     "boxes":       {image_id: float32 (N_i, 4) XYXY in ORIGINAL image coordinates},
     "scores":      {image_id: float32 (N_i,) in [0, 1], boxes sorted by decreasing score},
     "image_sizes": {image_id: (height, width) of the original image},
     "meta":        {str: str | int | float | None} (e.g. checkpoint, experiment, dataset)}

``image_id`` is the dataset record's ``image_id`` (an int for COCO, or a str).
"""
from __future__ import annotations

import numbers
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Hashable, Mapping, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

__all__ = ["FORMAT", "VERSION", "ProposalFile", "ProposalFileError", "image_id_key",
           "load_proposals", "save_proposals", "transform_proposals"]

FORMAT = "segkit-proposals"
VERSION = 1


class ProposalFileError(ValueError):
    """A proposal file is missing, truncated/corrupt, or not in the format above."""


def image_id_key(image_id: Any) -> Hashable:
    """The dictionary key of ``image_id``: a Python int (numpy/torch ints included) or a str."""
    if isinstance(image_id, Tensor) and image_id.numel() == 1:
        image_id = image_id.item()
    if isinstance(image_id, numbers.Integral) and not isinstance(image_id, bool):
        return int(image_id)
    if isinstance(image_id, str):
        return image_id
    raise TypeError(f"image_id must be an int or a str, got {image_id!r} "
                    f"({type(image_id).__name__})")


@dataclass
class ProposalFile:
    """Proposals of a set of images, in original image coordinates (see the module docstring).

    Attributes:
        boxes: {image_id: (N_i, 4) float32 XYXY}.
        scores: {image_id: (N_i,) float32}, decreasing.
        image_sizes: {image_id: (height, width)}; may be empty (sizes then go unchecked).
        meta: free-form provenance.
        path: the file it was read from ("" when built in memory).
    """

    boxes: Dict[Hashable, Tensor]
    scores: Dict[Hashable, Tensor]
    image_sizes: Dict[Hashable, Tuple[int, int]] = field(default_factory=dict)
    meta: Dict[str, Any] = field(default_factory=dict)
    path: str = ""

    def __len__(self) -> int:
        return len(self.boxes)

    def __contains__(self, image_id: Any) -> bool:
        return image_id_key(image_id) in self.boxes


def _check_entry(key: Hashable, boxes: Any, scores: Any, where: str) -> Tuple[Tensor, Tensor]:
    if not isinstance(boxes, Tensor) or boxes.dim() != 2 or boxes.shape[1] != 4:
        shape = tuple(boxes.shape) if isinstance(boxes, Tensor) else type(boxes).__name__
        raise ProposalFileError(f"{where}: boxes of image_id {key!r} must be an (N, 4) tensor, "
                                f"got {shape}")
    if not isinstance(scores, Tensor) or scores.shape != boxes.shape[:1]:
        shape = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
        raise ProposalFileError(f"{where}: scores of image_id {key!r} must be a ({len(boxes)},) "
                                f"tensor like its boxes, got {shape}")
    return boxes.float(), scores.float()


def save_proposals(path: str, boxes: Mapping[Any, Tensor], scores: Mapping[Any, Tensor],
                   image_sizes: Optional[Mapping[Any, Tuple[int, int]]] = None,
                   meta: Optional[Mapping[str, Any]] = None) -> str:
    """Write a proposal file atomically (temp file beside ``path``, fsync, rename).

    Args:
        path: destination (``.pth``).
        boxes: {image_id: (N_i, 4) XYXY in original image coordinates}.
        scores: {image_id: (N_i,)} objectness probabilities; each image's boxes are stored
            sorted by decreasing score.
        image_sizes: {image_id: (height, width)} of the original images, checked on use.
        meta: provenance (plain values only).

    Returns:
        ``path``.
    """
    from segkit.checkpoint.io import _atomic_write

    keys = [image_id_key(k) for k in boxes]
    if set(keys) != {image_id_key(k) for k in scores}:
        raise ValueError("save_proposals: boxes and scores must have the same image ids")
    scores = {image_id_key(k): v for k, v in scores.items()}
    out_boxes, out_scores = {}, {}
    for k, b in zip(keys, boxes.values()):
        b, s = _check_entry(k, torch.as_tensor(b), torch.as_tensor(scores[k]), "save_proposals")
        order = torch.argsort(s, descending=True, stable=True)
        out_boxes[k] = b[order].detach().cpu().contiguous()
        out_scores[k] = s[order].detach().cpu().contiguous()
    sizes = {image_id_key(k): (int(h), int(w)) for k, (h, w) in (image_sizes or {}).items()}
    payload = {"format": FORMAT, "version": VERSION, "boxes": out_boxes, "scores": out_scores,
               "image_sizes": sizes, "meta": dict(meta or {})}
    _atomic_write(path, lambda f: torch.save(payload, f))
    return path


def load_proposals(path: str) -> ProposalFile:
    """Read and validate a proposal file (``weights_only=True``: no pickled code runs).

    Raises:
        ProposalFileError: missing, truncated or corrupt file, another kind of file (e.g. a
            checkpoint) or a newer format version; the message names the file.
    """
    if not os.path.isfile(path):
        raise ProposalFileError(f"proposal file '{path}' does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # RuntimeError/EOFError/UnpicklingError/... depending on the damage
        raise ProposalFileError(
            f"cannot read proposal file '{path}' ({os.path.getsize(path)} bytes): "
            f"{type(e).__name__}: {str(e).strip()[:300]}. The file is truncated or corrupt "
            "(an interrupted copy?) or is not a torch file") from e
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        what = (f"a dict with keys {sorted(map(str, obj))[:8]}" if isinstance(obj, dict)
                else f"a {type(obj).__name__}")
        raise ProposalFileError(f"'{path}' is not a segkit proposal file (format "
                                f"'{FORMAT}'): it holds {what}. Write one with "
                                "python -m segkit.engine.save_proposals")
    version = obj.get("version")
    if not isinstance(version, int) or version > VERSION:
        raise ProposalFileError(f"proposal file '{path}' has version {version!r}; this segkit "
                                f"reads versions <= {VERSION}")
    boxes, scores = obj.get("boxes"), obj.get("scores")
    if not isinstance(boxes, dict) or not isinstance(scores, dict) or set(boxes) != set(scores):
        raise ProposalFileError(f"proposal file '{path}': 'boxes' and 'scores' must be dicts "
                                "over the same image ids")
    out_b, out_s = {}, {}
    for k in boxes:
        out_b[k], out_s[k] = _check_entry(k, boxes[k], scores[k], f"proposal file '{path}'")
    sizes = {k: (int(v[0]), int(v[1])) for k, v in (obj.get("image_sizes") or {}).items()}
    return ProposalFile(out_b, out_s, sizes, dict(obj.get("meta") or {}), path)


def transform_proposals(boxes: Tensor, orig_size: Tuple[int, int],
                        input_size: Tuple[int, int], transforms: Any = None) -> Tensor:
    """Map original-image boxes to the network input, as the mapper mapped the image.

    Args:
        boxes: (N, 4) XYXY in original image coordinates.
        orig_size: (height, width) of the original image.
        input_size: (h, w) of the (unpadded) network input.
        transforms: the mapper's ``transforms`` (resize, then flip when training). Without it
            the image is assumed to have been resized only, from ``orig_size`` to
            ``input_size``.

    Returns:
        (N, 4) float32 XYXY boxes at ``input_size`` (not clipped), on ``boxes.device``.
    """
    if transforms is not None:
        out = transforms.apply_boxes(boxes.detach().cpu().double().numpy())
        return torch.from_numpy(np.asarray(out, dtype=np.float32)).to(boxes.device)
    (h, w), (new_h, new_w) = orig_size, input_size
    scale = boxes.new_tensor([new_w / w, new_h / h, new_w / w, new_h / h])
    return boxes.float() * scale
