"""segkit's compiled ops vs torchvision's on Mask R-CNN shapes, CPU, one run, printed as ratios.

Shapes are those of Mask R-CNN R50-FPN on one 800x1333 image (padded to 800x1344): FPN maps
P2-P5 with 256 channels; 1000 proposals pooled to 7x7 (box head) and 100 detections pooled to
14x14 (mask head); sampling ratio 2 (Detectron, torchvision) and 0 (adaptive). Boxes have
log-uniform sides from 16 to 800 px and aspect ratios 1:2 to 2:1, as RPN proposals.

Rows:

* ``roi_align`` on one map, stride 16 (a C4 head) and stride 4 (the finest FPN map), forward
  and forward + backward, against ``torchvision.ops.roi_align``;
* ``multilevel_roi_align`` (level assignment and pooling in one call) against
  ``torchvision.ops.MultiScaleRoIAlign``, forward and forward + backward;
* ``roi_pool`` against ``torchvision.ops.roi_pool``;
* ``batched_nms`` against ``torchvision.ops.batched_nms`` on the RPN's (2000 boxes per level,
  5 levels, IoU 0.7) and the box head's (1000 boxes x 80 classes above a score threshold,
  IoU 0.5) workloads; ``nms`` on the RPN's boxes of one level;
* ``paste_masks_in_image`` (100 28x28 masks into 800x1333) against the ``grid_sample``
  implementation it replaces.

Both sides are interleaved in one process with the same thread count (2 by default) and
malloc settings, ``--repeats`` rounds, median; the ratio is torchvision time / segkit time
(> 1: segkit faster). Usage: ``python benchmarks/ops.py [--threads 2] [--repeats 5]``.
"""
from __future__ import annotations

import argparse
import sys

from common import interleave, reexec_with_tuned_malloc

# targets of the compiled ops on CPU (segkit issue 3): ratio of torchvision time to segkit's
TARGETS = {"roi_align fwd+bwd": 4.0, "multilevel fwd+bwd": 4.0, "batched_nms": 1.0}


def proposals(n, gen, height=800, width=1333):
    """(n, 4) XYXY boxes: log-uniform sides 16-800 px, aspect 1:2-2:1, clipped to the image."""
    import torch

    centre = torch.rand(n, 2, generator=gen) * torch.tensor([width, height])
    side = torch.exp(torch.empty(n, 1).uniform_(2.77, 6.68, generator=gen))
    aspect = torch.exp(torch.empty(n, 1).uniform_(-0.69, 0.69, generator=gen))
    wh = torch.cat([side * aspect.sqrt(), side / aspect.sqrt()], dim=1)
    boxes = torch.cat([centre - wh / 2, centre + wh / 2], dim=1)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
    return boxes


def jittered(objects, per_object, gen, scale=0.1):
    """Boxes scattered around each object box (overlapping clusters, as detector outputs)."""
    import torch

    base = objects.repeat_interleave(per_object, dim=0)
    wh = (base[:, 2:] - base[:, :2]).repeat(1, 2)
    return base + torch.randn(base.shape, generator=gen) * wh * scale


def roi_rows(args):
    import torch
    import torchvision
    from torchvision.ops import MultiScaleRoIAlign

    import segkit.layers as L

    gen = torch.Generator().manual_seed(0)
    maps = {s: torch.randn(1, 256, 800 // s, 1344 // s, generator=gen) for s in (4, 8, 16, 32)}
    sets = {"1000x7x7": (proposals(1000, gen), 7), "100x14x14": (proposals(100, gen), 14)}
    rows = []

    def both(name, tv_fn, sk_fn, inputs):
        """forward, and forward + backward through autograd, of both sides."""
        fwd = interleave({"torchvision": tv_fn, "segkit": sk_fn}, 1, args.repeats, torch.no_grad)
        rows.append((f"{name} fwd", fwd))
        grads = {}

        def backward(fn):
            def run():
                for t in inputs:
                    t.grad = None
                out = fn()
                if "g" not in grads:
                    grads["g"] = torch.randn(out.shape, generator=gen)
                out.backward(grads["g"])
            return run

        for t in inputs:
            t.requires_grad_(True)
        both_ = interleave({"torchvision": backward(tv_fn), "segkit": backward(sk_fn)}, 1,
                           args.repeats)
        for t in inputs:
            t.requires_grad_(False)
            t.grad = None
        rows.append((f"{name} fwd+bwd", both_))

    for stride in (16, 4):
        x = maps[stride]
        for label, (boxes, size) in sets.items():
            rois = torch.cat([torch.zeros(len(boxes), 1), boxes], dim=1)
            for sr in (2, 0):
                if stride == 4 and sr == 0:
                    continue  # every box on the finest map with an adaptive grid: not a real case
                both(f"roi_align s{stride} {label} sr{sr}",
                     lambda: torchvision.ops.roi_align(x, rois, size, 1 / stride, sr, True),
                     lambda: L.roi_align(x, rois, size, 1 / stride, sr, True), [x])

    names = ["p2", "p3", "p4", "p5"]
    feats = [maps[s] for s in (4, 8, 16, 32)]
    for label, (boxes, size) in sets.items():
        rois = torch.cat([torch.zeros(len(boxes), 1), boxes], dim=1)
        for sr in (2, 0):
            mra = MultiScaleRoIAlign(names, size, sr)
            both(f"multilevel {label} sr{sr}",
                 lambda: mra(dict(zip(names, feats)), [boxes], [(800, 1344)]),
                 lambda: L.multilevel_roi_align(feats, rois, size, [1 / 4, 1 / 8, 1 / 16, 1 / 32],
                                                sr, False), feats)

    boxes, size = sets["1000x7x7"]
    rois = torch.cat([torch.zeros(len(boxes), 1), boxes], dim=1)
    x = maps[16]
    both("roi_pool s16 1000x7x7",
         lambda: torchvision.ops.roi_pool(x, rois, 7, 1 / 16),
         lambda: L.roi_pool(x, rois, 7, 1 / 16), [x])
    return rows


def nms_rows(args):
    import torch
    import torchvision

    import segkit.layers as L

    gen = torch.Generator().manual_seed(1)
    rows = []
    # RPN: 2000 top-scoring anchors per level over 5 levels, clustered on 100 objects
    objects = proposals(100, gen)
    rpn = torch.cat([jittered(objects, 20, gen) for _ in range(5)])
    rpn_scores = torch.rand(len(rpn), generator=gen)
    rpn_levels = torch.arange(5).repeat_interleave(2000)
    # box head: 1000 proposals x 80 classes, the ~6% above score 0.05 (COCO-like)
    head = jittered(objects, 10, gen).repeat(80, 1)
    head_scores = torch.rand(len(head), generator=gen) ** 8
    head_classes = torch.arange(80).repeat_interleave(1000)
    keep = head_scores > 0.05
    head, head_scores, head_classes = head[keep], head_scores[keep], head_classes[keep]
    cases = [
        (f"batched_nms rpn 5x2000 iou0.7", (rpn, rpn_scores, rpn_levels, 0.7)),
        (f"batched_nms head {len(head)}/80cls iou0.5", (head, head_scores, head_classes, 0.5)),
    ]
    for name, a in cases:
        rows.append((name, interleave({"torchvision": lambda: torchvision.ops.batched_nms(*a),
                                       "segkit": lambda: L.batched_nms(*a)}, 3, args.repeats)))
    one = (rpn[:2000], rpn_scores[:2000], 0.7)
    rows.append(("nms rpn 2000 iou0.7", interleave({"torchvision": lambda: torchvision.ops.nms(*one),
                                                    "segkit": lambda: L.nms(*one)}, 3, args.repeats)))
    return rows


def paste_rows(args):
    import torch

    from segkit.layers import paste_masks_in_image
    from segkit.layers.mask_ops import _paste_grid_sample

    gen = torch.Generator().manual_seed(2)
    masks = torch.rand(100, 28, 28, generator=gen)
    boxes = proposals(100, gen)
    return [("paste_masks 100 at 800x1333", interleave({
        "torchvision": lambda: _paste_grid_sample(masks, boxes, (800, 1333), 0.5),
        "segkit": lambda: paste_masks_in_image(masks, boxes, (800, 1333))}, 1, args.repeats))]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5, help="interleaved rounds (median taken)")
    p.add_argument("--only", choices=["roi", "nms", "paste"], help="one group of rows")
    p.add_argument("--system-malloc", action="store_true", help="keep glibc's default settings")
    args = p.parse_args(argv)
    if not args.system_malloc:
        reexec_with_tuned_malloc(__file__, sys.argv[1:])
    import torch

    import segkit
    from segkit.layers import get_backend

    torch.set_num_threads(args.threads)
    if get_backend()["roi_align"] != "segkit._C":
        sys.exit(f"segkit._C is not built: {segkit.collect_env()['segkit._C']}")
    print(f"segkit ops vs torchvision, CPU, {args.threads} threads, torch {torch.__version__}, "
          f"median of {args.repeats} interleaved rounds, malloc "
          f"{'system' if args.system_malloc else 'tuned'}")
    print(f"{'op (paste: torch grid_sample baseline)':44s} {'tv ms':>9s} {'segkit ms':>10s} {'tv/segkit':>10s}")
    groups = {"roi": roi_rows, "nms": nms_rows, "paste": paste_rows}
    worst = {}
    for key, fn in groups.items():
        if args.only and key != args.only:
            continue
        for name, t in fn(args):
            ratio = t["torchvision"] / t["segkit"]
            print(f"{name:44s} {t['torchvision'] * 1e3:9.2f} {t['segkit'] * 1e3:10.2f} {ratio:10.2f}",
                  flush=True)
            for target in TARGETS:
                op, _, kind = target.partition(" ")
                if name.startswith(op) and (not kind or name.endswith(kind)):
                    worst[target] = min(worst.get(target, float("inf")), ratio)
    print("tv/segkit > 1 means segkit is faster.")
    for target, goal in TARGETS.items():
        if target in worst:
            status = "met" if worst[target] >= goal else "NOT met"
            print(f"target {target} >= {goal:g}x: lowest ratio {worst[target]:.2f} ({status})")


if __name__ == "__main__":
    main()
