"""Mask R-CNN R50-FPN on CPU: segkit vs torchvision, same weights, one run, printed as ratios.

Both models get the same random weights (torchvision's ``maskrcnn_resnet50_fpn`` converted by
``segkit.checkpoint.torchvision``), the same 800x1333 input and the same settings (score
threshold 0 so both run the mask head on 100 detections, as a trained model does on a busy
COCO image). Measurements:

* inference: seconds per image, the two models interleaved, ``--repeats`` rounds of
  ``--iters`` images each, median of the rounds;
* training: seconds per iteration (forward + backward + SGD step, batch of one 800x1333
  image with 8 objects), interleaved the same way;
* peak memory of training: each side runs in a fresh child process (glibc's default malloc
  settings) and reports its resident-set peak during the iterations above its resident set
  just before them (CPU tensors do not go through Python's allocator, so the kernel's
  high-water mark, reset through /proc/self/clear_refs, is the honest measure).

glibc's malloc returns large temporaries to the OS and page-faults them back on the next
image, which costs about 25% of detection inference on this kind of machine; the script sets
``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_`` (for both sides alike) by
re-executing itself unless ``--system-malloc`` is given.

Usage: ``python benchmarks/mask_rcnn.py [--threads 2] [--iters 3] [--repeats 3]``
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from common import MALLOC_ENV, interleave, reexec_with_tuned_malloc


def build_pair(seed: int = 0):
    """torchvision's and segkit's Mask R-CNN R50-FPN with identical weights, eval settings equal."""
    import torch
    import torchvision
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.ops.misc import FrozenBatchNorm2d

    from segkit.checkpoint.torchvision import convert_torchvision_detection
    from segkit.config import compose
    from segkit.engine.defaults import build_model

    torch.manual_seed(seed)
    # frozen BN and trainable res3-res5, as torchvision builds it from ImageNet weights
    backbone = resnet_fpn_backbone(backbone_name="resnet50", weights=None,
                                   norm_layer=FrozenBatchNorm2d, trainable_layers=3)
    tv = torchvision.models.detection.MaskRCNN(backbone, num_classes=91, box_score_thresh=0.0)
    sk_state, _ = convert_torchvision_detection(tv.state_dict())
    cfg = compose(["experiment=mask_rcnn_r50_fpn_torchvision", "train.device=cpu",
                   "model.roi_heads.score_thresh_test=0.0"])
    sk = build_model(cfg)
    sk.load_state_dict(sk_state)
    return tv, sk


def make_input(h: int = 800, w: int = 1333, n_objects: int = 8, seed: int = 0):
    """A textured image (uint8 RGB) and ``n_objects`` boxes with rectangular masks."""
    import torch

    g = torch.Generator().manual_seed(seed)
    img = (torch.rand(3, h // 8, w // 8, generator=g) * 255)
    img = torch.nn.functional.interpolate(img[None], size=(h, w), mode="bilinear")[0]
    img = img.clamp(0, 255).to(torch.uint8)
    xy = torch.rand(n_objects, 2, generator=g) * torch.tensor([w * 0.7, h * 0.7])
    wh = 32 + torch.rand(n_objects, 2, generator=g) * torch.tensor([w * 0.25, h * 0.25])
    boxes = torch.cat([xy, xy + wh], dim=1).round()
    labels = torch.randint(1, 91, (n_objects,), generator=g)
    masks = torch.zeros(n_objects, h, w, dtype=torch.uint8)
    for i, (x0, y0, x1, y1) in enumerate(boxes.long().tolist()):
        masks[i, y0:y1, x0:x1] = 1
    return img, boxes, labels, masks


def segkit_inputs(img, boxes, labels, masks, train: bool):
    from segkit.structures import BitMasks, Boxes, Instances

    d = {"image": img, "height": img.shape[1], "width": img.shape[2]}
    if train:
        d["instances"] = Instances(
            tuple(img.shape[1:]), gt_boxes=Boxes(boxes.float()), gt_classes=labels - 1,
            gt_masks=BitMasks(masks.bool()))
    return [d]


def torchvision_inputs(img, boxes, labels, masks, train: bool):
    images = [img.float() / 255.0]
    if not train:
        return images, None
    return images, [{"boxes": boxes.float(), "labels": labels, "masks": masks}]


def time_inference(tv, sk, data, iters: int, repeats: int):
    import torch

    tv.eval(), sk.eval()
    tv_in, _ = torchvision_inputs(*data, train=False)
    sk_in = segkit_inputs(*data, train=False)
    runs = {"torchvision": lambda: tv(tv_in), "segkit": lambda: sk(sk_in)}
    return interleave(runs, iters, repeats, torch.no_grad)


def time_training(tv, sk, data, iters: int, repeats: int):
    import contextlib

    import torch

    tv.train(), sk.train()
    tv_in, tv_targets = torchvision_inputs(*data, train=True)
    sk_in = segkit_inputs(*data, train=True)
    opts = {
        "torchvision": torch.optim.SGD([p for p in tv.parameters() if p.requires_grad], lr=1e-5),
        "segkit": torch.optim.SGD([p for p in sk.parameters() if p.requires_grad], lr=1e-5),
    }

    def step(model, inputs, opt):
        losses = model(*inputs)
        opt.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        opt.step()

    runs = {"torchvision": lambda: step(tv, (tv_in, tv_targets), opts["torchvision"]),
            "segkit": lambda: step(sk, (sk_in,), opts["segkit"])}
    return interleave(runs, iters, repeats, contextlib.nullcontext)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_memory_child(side: str, iters: int) -> None:
    """Child-process entry: the resident-set peak of ``iters`` training steps above the
    resident set just before them. Writing 5 to /proc/self/clear_refs resets the kernel's
    peak (VmHWM), so building the models does not mask the training peak."""
    import gc

    import torch

    tv, sk = build_pair()
    model = tv if side == "torchvision" else sk
    del tv, sk
    gc.collect()
    data = make_input()
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    if side == "torchvision":
        inputs = torchvision_inputs(*data, train=True)
    else:
        inputs = (segkit_inputs(*data, train=True),)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status_kib("VmRSS")
    for _ in range(iters):
        losses = model(*inputs)
        opt.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        opt.step()
    peak = _status_kib("VmHWM")
    print(json.dumps({"peak_mib": (peak - base) / 1024.0}))


def measure_peak(side: str, iters: int, threads: int) -> float:
    # glibc defaults in the child: with the tuned thresholds freed memory stays resident and
    # later allocations reuse it without raising the peak, which would hide the difference
    env = {k: v for k, v in os.environ.items() if k not in MALLOC_ENV}
    out = subprocess.run(
        [sys.executable, __file__, "--child-peak", side, "--iters", str(iters),
         "--threads", str(threads), "--system-malloc"],
        check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--iters", type=int, default=3, help="images/iterations per round")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds (median taken)")
    p.add_argument("--system-malloc", action="store_true", help="keep glibc's default settings")
    p.add_argument("--child-peak", choices=["torchvision", "segkit"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not args.system_malloc:
        reexec_with_tuned_malloc(__file__, sys.argv[1:])
    import torch

    torch.set_num_threads(args.threads)
    if args.child_peak:
        peak_memory_child(args.child_peak, args.iters)
        return
    tv, sk = build_pair()
    data = make_input()
    infer = time_inference(tv, sk, data, args.iters, args.repeats)
    train = time_training(tv, sk, data, args.iters, args.repeats)
    del tv, sk
    peak = {side: measure_peak(side, args.iters, args.threads) for side in ("torchvision", "segkit")}
    rows = [
        ("inference s/image (800x1333)", infer),
        ("training s/iteration", train),
        ("training peak memory growth MiB", peak),
    ]
    print(f"Mask R-CNN R50-FPN, CPU, {args.threads} threads, torch {torch.__version__}, "
          f"malloc {'system' if args.system_malloc else 'tuned'}")
    print(f"{'measure':34s} {'torchvision':>12s} {'segkit':>12s} {'tv/segkit':>10s}")
    for name, v in rows:
        ratio = v["torchvision"] / v["segkit"] if v["segkit"] > 0 else float("nan")
        print(f"{name:34s} {v['torchvision']:12.3f} {v['segkit']:12.3f} {ratio:10.2f}")
    print("tv/segkit > 1 means segkit is faster (or uses less memory).")


if __name__ == "__main__":
    main()
