"""Command line: convert another code base's checkpoint into a segkit checkpoint file.

Usage::

    python -m segkit.checkpoint.convert --from torchvision maskrcnn_resnet50_fpn_coco.pth \\
        mask_rcnn_r50_fpn_torchvision.pth [--experiment NAME]

(``fasterrcnn_resnet50_fpn`` and ``retinanet_resnet50_fpn`` files work the same way; the
experiment is inferred from the weights.) detectron2 model-zoo files (``.pkl`` of numpy
arrays, read through a restricted unpickler, or ``.pth``)::

    python -m segkit.checkpoint.convert --from detectron2 model_final_f10217.pkl \
        mask_rcnn_r50_fpn_d2.pth

(see :mod:`segkit.checkpoint.detectron2` for the rules and the config overrides it prints).
The experiment recorded for a detectron2 file is the one made for detectron2's weights, found
from its heads and ResNet depth: ``mask_rcnn_r50_fpn_3x_detectron2``,
``mask_rcnn_r101_fpn_3x_detectron2``, ``faster_rcnn_r50_fpn_3x_detectron2`` or
``retinanet_r50_fpn_3x_detectron2``.

The output is the segkit checkpoint format (``segkit.checkpoint.io``): ``{"model": state_dict,
"meta": {"format": "segkit", "version": 1, "config": None, "classes": [...], "experiment":
NAME, "iteration": -1}}``, loadable with ``torch.load(..., weights_only=True)``. Evaluate it
with ``segkit-eval --checkpoint DST``: the model is built from the experiment config the file
names (``mask_rcnn_r50_fpn_torchvision``), or from an ``experiment=...`` override.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .io import save_checkpoint

__all__ = ["CONVERTERS", "READERS", "convert_file", "torchvision_coco_classes", "main"]

logger = logging.getLogger(__name__)


def torchvision_coco_classes() -> List[str]:
    """torchvision's COCO category names without ``__background__`` (90 names, "N/A" gaps kept
    so that list index c is segkit class c = COCO category id c + 1)."""
    from torchvision.models.detection import MaskRCNN_ResNet50_FPN_Weights

    names = list(MaskRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"])
    return [n for n in names if n != "__background__"]


StateDict = Dict[str, torch.Tensor]
# a converter: loaded file -> (segkit state dict, info with "experiment", class names)
Converter = Callable[[Dict[str, Any]], Tuple[StateDict, Dict[str, Any], List[str]]]


def _convert_torchvision(state: Dict[str, Any]) -> Tuple[StateDict, Dict[str, Any], List[str]]:
    from .torchvision import convert_torchvision_detection

    model, info = convert_torchvision_detection(state)
    classes = torchvision_coco_classes()
    if len(classes) != info["num_classes"]:
        logger.warning("torchvision model has %d classes, not COCO's %d: class names are "
                       "unknown and written as class_<i>", info["num_classes"], len(classes))
        classes = [f"class_{i}" for i in range(info["num_classes"])]
    return model, info, classes


def _convert_detectron2(state: Dict[str, Any]) -> Tuple[StateDict, Dict[str, Any], List[str]]:
    from .detectron2 import coco_classes_or_generic, convert_detectron2

    model, info = convert_detectron2(state)
    return model, info, coco_classes_or_generic(info["num_classes"])


def _read_detectron2(path: str) -> Dict[str, Any]:
    from .detectron2 import read_detectron2_checkpoint

    return read_detectron2_checkpoint(path)


def _read_torch(path: str) -> Any:
    return torch.load(path, map_location="cpu", weights_only=True)


# --from value -> converter
CONVERTERS: Dict[str, Converter] = {
    "torchvision": _convert_torchvision,
    "detectron2": _convert_detectron2,
}
# --from value -> file reader (default: torch.load(weights_only=True))
READERS: Dict[str, Callable[[str], Any]] = {
    "detectron2": _read_detectron2,
}


def convert_file(source: str, src: str, dst: str,
                 experiment: Optional[str] = None) -> Dict[str, Any]:
    """Convert checkpoint file ``src`` from code base ``source`` into segkit file ``dst``.

    Args:
        source: key of :data:`CONVERTERS` (``"torchvision"``, ``"detectron2"``).
        src: input file (a ``torch.save``'d state dict; detectron2 also ``.pkl``).
        dst: output file, written atomically.
        experiment: experiment config name stored in the metadata; default: the one the
            converter infers (e.g. ``mask_rcnn_r50_fpn_torchvision``).

    Returns:
        The converter's info dict plus ``"classes"`` and ``"experiment"``.

    Raises:
        ValueError: unknown ``source``, unreadable ``src``, or a state dict the converter does
            not support; the message names the file.
    """
    if source not in CONVERTERS:
        raise ValueError(f"unknown --from {source!r}; supported: {', '.join(sorted(CONVERTERS))}")
    if not os.path.isfile(src):
        raise ValueError(f"checkpoint file '{src}' does not exist")
    try:
        state = READERS.get(source, _read_torch)(src)
    except Exception as e:  # torch raises many types for truncated/corrupt/unsafe files
        if source in READERS:  # its own reader's message already names the file
            raise ValueError(f"{type(e).__name__}: {e}") from e
        raise ValueError(f"cannot read '{src}' with torch.load(weights_only=True): "
                         f"{type(e).__name__}: {e}") from e
    if not isinstance(state, dict):
        raise ValueError(f"'{src}' holds a {type(state).__name__}, expected a state dict")
    try:
        model, info, classes = CONVERTERS[source](state)
    except ValueError as e:
        raise ValueError(f"cannot convert '{src}' from {source}: {e}") from e
    name = experiment or info.get("experiment")
    meta = {"config": None, "classes": classes, "experiment": name,
            "source": {"from": source, "file": os.path.basename(src)}}
    if info.get("config_overrides"):
        meta["config_overrides"] = list(info["config_overrides"])
    save_checkpoint(dst, model, meta=meta)
    return {**info, "classes": classes, "experiment": name}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI entry point; returns the process exit code (0 on success, 2 on bad input)."""
    parser = argparse.ArgumentParser(
        prog="python -m segkit.checkpoint.convert",
        description="Convert a checkpoint from another code base into segkit's format.")
    parser.add_argument("--from", dest="source", required=True,
                        help="code base the checkpoint comes from: "
                             + ", ".join(sorted(CONVERTERS)))
    parser.add_argument("src", help="input checkpoint file")
    parser.add_argument("dst", help="output segkit checkpoint file")
    parser.add_argument("--experiment", default=None,
                        help="experiment config name to record (default: inferred)")
    args = parser.parse_args(argv)
    try:
        info = convert_file(args.source, args.src, args.dst, args.experiment)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.dst}: {info.get('arch', args.source)} with {len(info['classes'])} classes, "
          f"experiment {info['experiment']}")
    if info.get("config_overrides"):
        print("evaluate with the overrides: " + " ".join(info["config_overrides"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
