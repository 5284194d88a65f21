"""Compiled NMS (segkit._C, csrc/cpu/nms.cpp) against torchvision.ops.nms.

The kernels reproduce torchvision's IoU arithmetic and its stable score order, so on float32 /
float64 the kept indices must be *equal* to torchvision's, not merely close. The per-class
reference for batched_nms is torchvision.ops.nms run class by class and merged by (score
descending, index ascending): torchvision.ops.batched_nms itself offsets boxes per class for
small inputs (a different rounding) and merges with an unstable sort (tie order unspecified),
so it is compared directly only on large inputs with distinct scores.
"""
import math

import pytest
import torch
import torchvision

from segkit.layers import batched_nms, get_backend, nms

ops = torch.ops.segkit


def _boxes(n, g, size=100.0, dtype=torch.float32):
    xy = torch.rand(n, 2, generator=g) * size
    wh = torch.rand(n, 2, generator=g) * size * 0.3
    return torch.cat([xy, xy + wh], 1).to(dtype)


def _per_class_reference(boxes, scores, idxs, thr):
    keep = torch.zeros(scores.shape[0], dtype=torch.bool)
    for c in torch.unique(idxs):
        members = torch.nonzero(idxs == c).flatten()
        keep[members[torchvision.ops.nms(boxes[members], scores[members], thr)]] = True
    kept = torch.nonzero(keep).flatten()
    return kept[torch.sort(scores[kept], descending=True, stable=True)[1]]


def test_compiled_backend_is_active():
    backend = get_backend()
    assert backend["nms"] == "segkit._C" and backend["batched_nms"] == "segkit._C"


@pytest.mark.parametrize("seed", range(4))
def test_nms_equals_torchvision(seed):
    g = torch.Generator().manual_seed(seed)
    for n in (2, 17, 300):
        boxes = _boxes(n, g)
        scores = torch.rand(n, generator=g)
        if seed % 2:
            scores = torch.round(scores * 4) / 4  # many ties: lower index must come first
        for thr in (0.0, 0.3, 0.5, 0.7, 1.0):
            expected = torchvision.ops.nms(boxes, scores, thr)
            assert torch.equal(nms(boxes, scores, thr), expected), (n, thr)


@pytest.mark.parametrize("seed", range(3))
def test_batched_nms_equals_per_class_torchvision(seed):
    g = torch.Generator().manual_seed(10 + seed)
    n = 400
    boxes = _boxes(n, g, size=60.0)
    scores = torch.rand(n, generator=g)
    if seed == 2:
        scores = torch.round(scores * 8) / 8
    idxs = torch.randint(0, 9, (n,), generator=g)
    for thr in (0.3, 0.5, 0.7):
        expected = _per_class_reference(boxes, scores, idxs, thr)
        assert torch.equal(batched_nms(boxes, scores, idxs, thr), expected)
        assert torch.equal(batched_nms(boxes, scores, idxs.int(), thr), expected)


def test_batched_nms_equals_torchvision_on_rpn_and_box_head_sizes():
    g = torch.Generator().manual_seed(3)
    # RPN-like: per-level NMS at 0.7 (torchvision's per-class path for > 1000 boxes).
    n = 5 * 600
    boxes = _boxes(n, g, size=400.0)
    scores = torch.randperm(n, generator=g).float() / n  # distinct: tie order is unspecified there
    levels = torch.arange(5).repeat_interleave(600)
    assert torch.equal(batched_nms(boxes, scores, levels, 0.7),
                       torchvision.ops.batched_nms(boxes, scores, levels, 0.7))
    # Box-head-like: 2000 candidates over 80 classes at 0.5.
    boxes, scores = boxes[:2000], scores[:2000]
    classes = torch.randint(0, 80, (2000,), generator=g)
    assert torch.equal(batched_nms(boxes, scores, classes, 0.5),
                       torchvision.ops.batched_nms(boxes, scores, classes, 0.5))


def test_ties_keep_lower_index_first():
    boxes = torch.tensor([[0, 0, 1, 1], [10, 10, 11, 11], [20, 20, 21, 21], [0, 0, 1, 1.0]])
    scores = torch.tensor([0.5, 0.9, 0.5, 0.5])
    assert nms(boxes, scores, 0.5).tolist() == [1, 0, 2]  # box 3 duplicates box 0
    idxs = torch.tensor([1, 0, 0, 2])  # box 3 is another class now: kept, after 0 and 2
    assert batched_nms(boxes, scores, idxs, 0.5).tolist() == [1, 0, 2, 3]


def test_adversarial_boxes_and_scores():
    nan, inf = float("nan"), float("inf")
    boxes = torch.tensor([
        [0, 0, 0, 0], [0, 0, 0, 0],          # zero area: IoU 0/0 = NaN, never suppresses
        [5, 5, 1, 1], [1, 1, 5, 5],          # inverted and its upright twin
        [0, 0, 1e30, 1e30], [-1e9, -1e9, 1e9, 1e9],  # huge
        [nan, 0, 1, 1], [0, 0, inf, 1],      # non-finite coordinates
        [2, 2, 4, 4], [2, 2, 4, 4],          # duplicates
    ])
    scores = torch.tensor([1.0, 1.0, 0.5, 0.4, 0.9, 0.3, nan, 0.3, 0.2, 0.2])
    idxs = torch.tensor([0, 0, 1, 1, 0, 1, 0, 1, 2, 2])
    for thr in (-1.0, 0.0, 0.5, 0.7, 1.0, nan):
        assert torch.equal(nms(boxes, scores, thr), torchvision.ops.nms(boxes, scores, thr)), thr
        assert torch.equal(batched_nms(boxes, scores, idxs, thr),
                           _per_class_reference(boxes, scores, idxs, thr)), thr


def test_empty_and_single_box():
    for fn in (lambda b, s: nms(b, s, 0.5),
               lambda b, s: batched_nms(b, s, torch.zeros(len(s), dtype=torch.int64), 0.5)):
        empty = fn(torch.zeros(0, 4), torch.zeros(0))
        assert empty.shape == (0,) and empty.dtype == torch.int64
        assert fn(torch.tensor([[1.0, 2, 3, 4]]), torch.tensor([0.3])).tolist() == [0]
    # raw ops too (the public functions return early on empty input)
    assert ops.nms(torch.zeros(0, 4), torch.zeros(0), 0.5).shape == (0,)
    assert ops.batched_nms(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.int32),
                           0.5).shape == (0,)


def test_threshold_equal_to_an_iou():
    """torchvision compares the float IoU with the double threshold; thresholds at and next to
    actual IoUs must decide the same way."""
    g = torch.Generator().manual_seed(5)
    boxes = _boxes(40, g, size=10.0)
    scores = torch.rand(40, generator=g)
    iou = torchvision.ops.box_iou(boxes, boxes)
    for k in range(1, 40, 3):
        v = float(iou[0, k])
        for thr in (v, math.nextafter(v, 1.0), math.nextafter(v, 0.0), v + 1e-12, v - 1e-12):
            assert torch.equal(nms(boxes, scores, thr), torchvision.ops.nms(boxes, scores, thr))


def test_sparse_negative_and_int32_class_ids():
    g = torch.Generator().manual_seed(6)
    boxes = _boxes(300, g, size=50.0)
    scores = torch.rand(300, generator=g)
    idxs = torch.tensor([10**15, -5, 10**15, 3, -5] * 60)  # far apart: not a dense id range
    expected = _per_class_reference(boxes, scores, idxs, 0.4)
    assert torch.equal(batched_nms(boxes, scores, idxs, 0.4), expected)
    small = torch.tensor([7, -5, 7, 3, -5] * 60, dtype=torch.int32)
    assert torch.equal(batched_nms(boxes, scores, small, 0.4),
                       _per_class_reference(boxes, scores, small.long(), 0.4))


def test_non_contiguous_inputs():
    g = torch.Generator().manual_seed(7)
    boxes = _boxes(200, g)
    scores = torch.rand(400, generator=g)[::2]
    idxs = torch.randint(0, 3, (200, 2), generator=g)[:, 1]
    strided_boxes = boxes.t().contiguous().t()
    assert not (strided_boxes.is_contiguous() or scores.is_contiguous() or idxs.is_contiguous())
    assert torch.equal(nms(strided_boxes, scores, 0.5),
                       torchvision.ops.nms(boxes, scores.contiguous(), 0.5))
    assert torch.equal(batched_nms(strided_boxes, scores, idxs, 0.5),
                       _per_class_reference(boxes, scores.contiguous(), idxs.contiguous(), 0.5))


def test_kernel_dtypes():
    """The raw op computes float64 in double (equal to torchvision's float64) and float16 /
    bfloat16 in float (equal to torchvision on the upcast values)."""
    g = torch.Generator().manual_seed(8)
    boxes = _boxes(300, g, dtype=torch.float64)
    scores = torch.rand(300, generator=g, dtype=torch.float64)
    idxs = torch.randint(0, 4, (300,), generator=g)
    assert torch.equal(ops.nms(boxes, scores, 0.5), torchvision.ops.nms(boxes, scores, 0.5))
    assert torch.equal(ops.batched_nms(boxes, scores, idxs, 0.5),
                       _per_class_reference(boxes, scores, idxs, 0.5))
    for dtype in (torch.float16, torch.bfloat16):
        b, s = boxes.to(dtype), scores.to(dtype)
        assert torch.equal(ops.nms(b, s, 0.5), torchvision.ops.nms(b.float(), s.float(), 0.5))
        assert torch.equal(ops.batched_nms(b, s, idxs, 0.5),
                           _per_class_reference(b.float(), s.float(), idxs, 0.5))


def test_nan_and_signed_zero_scores_sort_like_torch():
    """NaN scores come first (torch.sort ranks NaN highest) and -0.0 ties with +0.0."""
    special = torch.tensor([0.0, -0.0, float("nan"), -float("nan"), float("inf"),
                            -float("inf"), 1.0, -1.0, 1e-45, -1e-45])
    g = torch.Generator().manual_seed(9)
    scores = special[torch.randint(0, len(special), (500,), generator=g)]
    boxes = torch.zeros(500, 4)  # zero-area boxes never suppress: the output is the order
    expected = torch.sort(scores, descending=True, stable=True)[1]
    assert torch.equal(nms(boxes, scores, 0.5), expected)
    assert torch.equal(batched_nms(boxes, scores, torch.zeros(500, dtype=torch.int64), 0.5),
                       expected)


def test_result_does_not_depend_on_thread_count():
    g = torch.Generator().manual_seed(11)
    # big enough (4 classes x ~1500 boxes) for the kernel to run the classes in parallel
    boxes = _boxes(6000, g, size=300.0)
    scores = torch.rand(6000, generator=g)
    idxs = torch.randint(0, 4, (6000,), generator=g)
    two = batched_nms(boxes, scores, idxs, 0.6)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = batched_nms(boxes, scores, idxs, 0.6)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


@pytest.mark.parametrize("call, message", [
    (lambda: ops.nms(torch.rand(5, 3), torch.rand(5), 0.5), r"segkit::nms: boxes must have shape \(N, 4\)"),
    (lambda: ops.nms(torch.rand(5, 4), torch.rand(4), 0.5), r"segkit::nms: scores must have shape \(N,\) = \(5,\)"),
    (lambda: ops.nms(torch.rand(5, 4), torch.rand(5, dtype=torch.float64), 0.5),
     "scores are Double but boxes are Float"),
    (lambda: ops.nms(torch.ones(5, 4, dtype=torch.int64), torch.ones(5, dtype=torch.int64), 0.5),
     "boxes must be a floating tensor"),
    (lambda: ops.batched_nms(torch.rand(5, 4), torch.rand(5), torch.zeros(4, dtype=torch.int64), 0.5),
     r"segkit::batched_nms: idxs must have shape \(N,\) = \(5,\)"),
    (lambda: ops.batched_nms(torch.rand(5, 4), torch.rand(5), torch.zeros(5), 0.5),
     "idxs must be an integer tensor"),
])
def test_bad_arguments(call, message):
    with pytest.raises(RuntimeError, match=message):
        call()
