"""Full-image inference time of DeepMask and SharpMask, measured side by side.

The papers report seconds per COCO image (papers.md 11.2: DeepMask-ours 0.46 s, SharpMask
0.76 s; the FPN paper's M40 re-timing 0.49 s / 0.77 s). :func:`time_inference` runs every
model on the same images in one process, interleaved (which model goes first alternates from
image to image, so warm caches and clock changes hit all alike), and reports medians::

    python -m segkit_deepmask.timing --deepmask DM.pth --sharpmask SM.pth \\
        --num-images 20 --size 480 640 train.device=cuda

Without checkpoints the models of ``model=deepmask`` / ``model=sharpmask`` are timed with
random weights (the time does not depend on the weights); the Hydra overrides apply to both
(``model.inference.zoom=1``, ``model/backbone=deepmask_resnet18``, ...).
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch
from torch import nn

__all__ = ["time_inference", "main"]


def _sync(model: nn.Module) -> None:
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def time_inference(models: Mapping[str, nn.Module], inputs: Sequence[Mapping[str, Any]],
                   repeats: int = 1, warmup: int = 1) -> Dict[str, float]:
    """Median seconds per image of each model's eval-mode forward on the same inputs.

    Args:
        models: {name: model}, each taking ``[input]`` (one image per call, as evaluated).
        inputs: core model inputs (``image`` (3, H, W) 0-255, ``height``, ``width``).
        repeats: passes over ``inputs``; every pass times every model on every image.
        warmup: untimed calls per model on the first input (allocator, cuDNN autotuning).

    Returns:
        {name: median seconds per image}.
    """
    if not inputs or not models:
        raise ValueError("time_inference needs at least one model and one input")
    names = list(models)
    for model in models.values():
        model.eval()
        for _ in range(warmup):
            model([inputs[0]])
        _sync(model)
    times: Dict[str, List[float]] = {name: [] for name in names}
    for r in range(repeats):
        for i, inp in enumerate(inputs):
            for name in names if (r + i) % 2 == 0 else names[::-1]:
                start = time.perf_counter()
                models[name]([inp])
                _sync(models[name])
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def _model(arch: str, checkpoint: Optional[str], overrides: Sequence[str]) -> nn.Module:
    from segkit.checkpoint import load_checkpoint, load_state_dict_report
    from segkit.config import compose
    from segkit.engine.cli import checkpoint_config
    from segkit.engine.defaults import build_model

    if checkpoint is None:
        return build_model(compose(["~experiment", f"model={arch}", *overrides]))
    ckpt = load_checkpoint(checkpoint)
    model = build_model(checkpoint_config(ckpt.get("meta") or {}, overrides, checkpoint))
    load_state_dict_report(model, ckpt["model"], source=checkpoint)
    return model


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, float]:
    """Command line (module docstring); prints and returns the medians."""
    parser = argparse.ArgumentParser(prog="python -m segkit_deepmask.timing",
                                     description="Seconds per image, DeepMask vs SharpMask.")
    parser.add_argument("--deepmask", help="DeepMask checkpoint (default: random weights)")
    parser.add_argument("--sharpmask", help="SharpMask checkpoint (default: random weights)")
    parser.add_argument("--num-images", type=int, default=10)
    parser.add_argument("--size", type=int, nargs=2, default=(480, 640), metavar=("H", "W"),
                        help="size of the random test images (COCO-like by default)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("overrides", nargs="*", help="hydra overrides for both models")
    args = parser.parse_args(argv)
    models = {"deepmask": _model("deepmask", args.deepmask, args.overrides),
              "sharpmask": _model("sharpmask", args.sharpmask, args.overrides)}
    gen = torch.Generator().manual_seed(0)
    h, w = args.size
    inputs = [{"image": torch.randint(0, 256, (3, h, w), generator=gen, dtype=torch.uint8),
               "height": h, "width": w} for _ in range(args.num_images)]
    medians = time_inference(models, inputs, repeats=args.repeats)
    device = next(models["deepmask"].parameters()).device
    for name, seconds in medians.items():
        print(f"{name:>10}: {seconds:.3f} s/image (median of {args.num_images * args.repeats}, "
              f"{h}x{w}, {device})")
    return medians


if __name__ == "__main__":
    main()
