"""Turn a publisher's file into a segkit checkpoint, per ``source`` of a catalog entry.

* ``torchvision``: detection models through
  :func:`segkit.checkpoint.torchvision.convert_torchvision_detection`; an ImageNet ResNet
  (``task: backbone``) through :func:`segkit.modeling.backbone.convert_torchvision_resnet`,
  stored under ``backbone.bottom_up.`` so that the file is a ``train.init_weights`` for any
  segkit model with that ResNet.
* ``detectron2``: :func:`segkit.checkpoint.detectron2.read_detectron2_checkpoint` (restricted
  unpickler) and :func:`~segkit.checkpoint.detectron2.convert_detectron2` (which also
  re-lays out a RetinaNet head: subnet numbering and anchor order, its rule 5).
* ``segkit``: already a segkit checkpoint, used as it is.

The converted file holds the composed config of the entry (experiment + overrides +
``dataset.num_classes`` from the entry's classes), its class names, and where it came from, so
``segkit-eval --checkpoint`` and ``segkit-demo --checkpoint`` work on it directly.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Sequence, Tuple

import torch
from omegaconf import DictConfig, open_dict

from .catalog import ZooEntry, ZooError

__all__ = ["CONVERTER_VERSION", "BACKBONE_PREFIX", "convert", "entry_config"]

# Bump when a conversion rule changes: converted files of older versions are not reused.
# 2: detectron2's RetinaNet head is re-laid out by convert_detectron2 itself.
CONVERTER_VERSION = 2
BACKBONE_PREFIX = "backbone.bottom_up."


def entry_config(entry: ZooEntry, overrides: Sequence[str] = ()) -> DictConfig:
    """The composed config of ``entry``: its experiment, its overrides, then ``overrides``;
    ``dataset.num_classes`` is the number of the entry's classes (backbones keep theirs)."""
    from segkit.config import compose

    try:
        cfg = compose([f"experiment={entry.experiment}", *entry.overrides, *overrides])
    except Exception as e:  # Hydra's errors name the bad override / missing config
        raise ZooError(f"model zoo entry '{entry.name}' ({entry.catalog_file}): cannot compose "
                       f"experiment={entry.experiment} with overrides "
                       f"{[*entry.overrides, *overrides]}: {e}") from e
    if entry.classes:
        with open_dict(cfg):
            cfg.dataset.num_classes = len(entry.classes)
    return cfg


def _read(entry: ZooEntry, raw: Path) -> Tuple[Dict[str, torch.Tensor], Any]:
    """``(segkit state dict, number of classes the weights have or None)``."""
    if entry.source == "torchvision":
        state = torch.load(raw, map_location="cpu", weights_only=True)
        if entry.task == "backbone":
            from segkit.modeling.backbone import convert_torchvision_resnet

            return {BACKBONE_PREFIX + k: v for k, v in convert_torchvision_resnet(state).items()}, None
        from segkit.checkpoint.torchvision import convert_torchvision_detection

        state, info = convert_torchvision_detection(state)
        return state, info["num_classes"]
    if entry.source == "detectron2":
        from segkit.checkpoint.detectron2 import convert_detectron2, read_detectron2_checkpoint

        state, report = convert_detectron2(read_detectron2_checkpoint(str(raw)))
        return state, report["num_classes"]
    raise ZooError(f"'{entry.name}': source {entry.source!r} needs no conversion")


def convert(entry: ZooEntry, raw: Path, dst: Path, source_sha256: str) -> Path:
    """Convert the downloaded ``raw`` file of ``entry`` into the segkit checkpoint ``dst``.

    Raises:
        ZooError: the file cannot be read or converted, or its number of classes differs
            from the entry's class list; the message names the entry and the file.
    """
    from segkit.checkpoint import save_checkpoint
    from segkit.config import to_plain

    cfg = entry_config(entry)
    try:
        state, num_classes = _read(entry, raw)
    except ZooError:
        raise
    except Exception as e:  # converters raise ValueError subclasses, torch.load many types
        raise ZooError(f"cannot convert '{raw}' of model zoo entry '{entry.name}' from "
                       f"{entry.source}: {type(e).__name__}: {e}") from e
    if num_classes is not None and num_classes != len(entry.classes):
        raise ZooError(f"'{raw}' has {num_classes} classes but model zoo entry '{entry.name}' "
                       f"({entry.catalog_file}) lists {len(entry.classes)} class names")
    meta = {"config": None if entry.task == "backbone" else to_plain(cfg),
            "classes": list(entry.classes), "experiment": entry.experiment,
            "source": {"from": entry.source, "file": entry.filename, "url": entry.urls[0],
                       "sha256": source_sha256},
            "model_zoo": {"name": entry.name, "converter_version": CONVERTER_VERSION}}
    save_checkpoint(str(dst), state, meta=meta)
    return dst
