"""``segkit-demo``: run a segkit checkpoint on images, write drawings and COCO-style results.

Usage::

    segkit-demo --checkpoint model.pth --input img.jpg|folder --output out/ \\
        [--score-thresh 0.5] [--device cpu] [--config-override KEY=VALUE ...]

For every input image ``<name>.png`` with the predictions drawn is written to the output
folder, plus one ``predictions.json`` holding COCO-style results (image file name, contiguous
``category_id`` and ``category_name``, ``bbox`` XYWH at the original resolution, ``score`` and,
for mask models, an RLE ``segmentation``). Images are resized as the test mapper does
(``dataloader.min_size_test`` / ``max_size_test`` of the checkpoint's config).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

__all__ = ["main", "DemoError", "list_images", "load_model", "predict_image"]

logger = logging.getLogger("segkit.demo")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")
PREDICTIONS_FILE = "predictions.json"


class DemoError(RuntimeError):
    """A demo input (checkpoint, input path, config) is unusable; the message says why."""


def _parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="segkit-demo", description="Run a segkit checkpoint on an image or a folder of "
        "images; write <name>.png drawings and predictions.json.")
    parser.add_argument("--checkpoint", required=True, help="segkit checkpoint file (.pth)")
    parser.add_argument("--input", required=True, help="an image file or a folder of images")
    parser.add_argument("--output", required=True, help="output folder (created)")
    parser.add_argument("--score-thresh", type=float, default=0.5,
                        help="keep predictions with score >= this (default 0.5)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--config-override", nargs="*", default=[], metavar="KEY=VALUE",
                        help="Hydra-style overrides of the checkpoint's config")
    return parser.parse_args(list(sys.argv[1:] if argv is None else argv))


def list_images(path: str) -> Tuple[List[Path], List[Path]]:
    """``(images, skipped)``: the image files of ``path`` (a file or a folder, sorted, not
    recursive) and the folder entries skipped because their extension is not an image's."""
    p = Path(path)
    if p.is_file():
        return [p], []
    if not p.is_dir():
        raise DemoError(f"--input {path!r} is neither an image file nor a folder")
    entries = sorted(e for e in p.iterdir() if e.is_file() and not e.name.startswith("."))
    images = [e for e in entries if e.suffix.lower() in IMAGE_EXTENSIONS]
    return images, [e for e in entries if e not in images]


def load_model(checkpoint: str, device: str, overrides: Sequence[str] = ()) -> Tuple[Any, Any,
                                                                                     List[str]]:
    """Build the checkpoint's model in eval mode on ``device``.

    Returns:
        ``(model, cfg, class_names)``.

    Raises:
        DemoError: missing/unreadable checkpoint or no usable config.
    """
    from hydra.errors import HydraException
    from omegaconf import OmegaConf, open_dict

    from segkit.checkpoint import CheckpointError, load_checkpoint, load_state_dict_report
    from segkit.engine.cli import checkpoint_config
    from segkit.engine.defaults import build_model

    try:
        ckpt = load_checkpoint(checkpoint)
    except CheckpointError as e:  # missing, truncated, not weights_only-safe: the message says
        raise DemoError(str(e)) from e
    meta = ckpt.get("meta") or {}
    try:
        cfg = checkpoint_config(meta, overrides, checkpoint)
    except (ValueError, HydraException) as e:  # bad override, no config: the message says
        raise DemoError(f"config of {checkpoint!r} (--config-override): {e}") from e
    classes = [str(c) for c in meta.get("classes") or []]
    with open_dict(cfg):
        cfg.train.device = device
        if cfg.dataset.get("num_classes") is None:
            if not classes:
                raise DemoError(f"checkpoint {checkpoint!r}: dataset.num_classes is null and "
                                "meta.classes is empty, so the number of classes is unknown")
            cfg.dataset.num_classes = len(classes)
    num_classes = int(OmegaConf.select(cfg, "dataset.num_classes"))
    if len(classes) != num_classes:
        logger.warning("checkpoint has %d class names for %d classes; using numbers",
                       len(classes), num_classes)
        classes = [f"class_{i}" for i in range(num_classes)]
    try:
        model = build_model(cfg)
    except (RuntimeError, ValueError, KeyError) as e:  # e.g. --device cuda without CUDA
        raise DemoError(f"cannot build the model of {checkpoint!r}: {e}") from e
    load_state_dict_report(model, ckpt["model"], source=checkpoint)
    return model.eval(), cfg, classes


def predict_image(model: Any, image: np.ndarray, min_size: int, max_size: int,
                  file_name: str = "", image_id: int = 0):
    """Run ``model`` on one (H, W, 3) uint8 RGB image resized like the test mapper.

    Returns:
        ``Instances`` on the CPU at the original (H, W): ``pred_boxes`` (XYXY), ``scores``,
        ``pred_classes`` and, for mask models, ``pred_masks`` (N, H, W) bool.
    """
    from segkit.data.transforms import ResizeShortestEdge

    height, width = image.shape[:2]
    tfm = ResizeShortestEdge(int(min_size), int(max_size)).get_transform(
        height, width, np.random.default_rng(0))  # one size: draws nothing
    resized = np.ascontiguousarray(tfm.apply_image(image).transpose(2, 0, 1))
    inputs = [{"image": torch.from_numpy(resized), "height": height, "width": width,
               "file_name": file_name, "image_id": image_id}]
    with torch.no_grad():
        return model(inputs)[0]["instances"].to("cpu")


def _output_name(path: Path, used: set) -> str:
    name = f"{path.stem}.png"
    if name in used:  # a.jpg and a.png in one folder: keep both drawings
        name = f"{path.name}.png"
    used.add(name)
    return name


def run_demo(args: argparse.Namespace) -> int:
    """The demo proper; returns the process exit code (1 when any image failed)."""
    from segkit.data.mapper import read_image
    from segkit.evaluation import instances_to_coco_json
    from segkit.utils.visualizer import draw_instances, save_png

    if not os.path.isfile(args.checkpoint):  # before listing the input: the likelier mistake
        raise DemoError(f"checkpoint file {args.checkpoint!r} does not exist")
    images, skipped = list_images(args.input)
    if skipped:
        logger.warning("skipping %d non-image file(s) in %s: %s", len(skipped), args.input,
                       ", ".join(p.name for p in skipped))
    if not images:
        raise DemoError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) in {args.input!r}")
    model, cfg, classes = load_model(args.checkpoint, args.device, args.config_override)
    dl = cfg.dataloader
    os.makedirs(args.output, exist_ok=True)
    results: List[Dict[str, Any]] = []
    failed, used = [], set()
    for image_id, path in enumerate(images):
        try:
            image = read_image(str(path))
            inst = predict_image(model, image, dl.min_size_test, dl.max_size_test,
                                 str(path), image_id)
        except Exception as e:  # one bad image must not stop the others
            logger.error("failed on %s: %s: %s", path, type(e).__name__, e)
            failed.append(path)
            continue
        inst = inst[inst.scores >= args.score_thresh]
        save_png(draw_instances(image, inst, classes),
                 os.path.join(args.output, _output_name(path, used)))
        for res in instances_to_coco_json(inst, image_id, None):
            res["file_name"] = path.name
            res["category_name"] = classes[res["category_id"]]
            results.append(res)
        logger.info("%s: %d instance(s) with score >= %g", path.name, len(inst),
                    args.score_thresh)
    with open(os.path.join(args.output, PREDICTIONS_FILE), "w") as f:
        json.dump(results, f)
    logger.info("wrote %d drawing(s) and %s (%d predictions) to %s", len(images) - len(failed),
                PREDICTIONS_FILE, len(results), args.output)
    if failed:
        logger.error("%d image(s) failed: %s", len(failed), ", ".join(str(p) for p in failed))
        return 1
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``segkit-demo``; returns the exit code (0 ok, 1 some images failed,
    2 unusable checkpoint/input/config)."""
    args = _parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return run_demo(args)
    except DemoError as e:
        logger.error("%s", e)
        print(f"segkit-demo: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
