"""CUDA kernels of segkit's compiled ops (csrc/cuda/*.cu), through the public segkit.layers API.

References: torchvision's CUDA ops (same semantics), segkit's own CPU kernels (CPU and CUDA
must agree), torchvision's MultiScaleRoIAlign for the fused multi-level op, and gradcheck in
float64. Every test needs a GPU and is skipped without one.

The CUDA backward passes scatter with atomic adds, so gradients are compared with tolerances
(and gradcheck gets a small nondet_tol), never bit for bit.
"""
import importlib

import pytest
import torch
import torchvision
from torchvision.ops import MultiScaleRoIAlign

from segkit import layers

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

CUDA = "cuda"
F32_TOL = dict(rtol=1e-5, atol=1e-5)


def _rois(num, batch, img_h, img_w, device=CUDA, dtype=torch.float32, seed=0):
    """Random (num, 5) rois [b, x1, y1, x2, y2]; some stick out of the image, none inverted."""
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(num, 2, generator=g) * torch.tensor([img_w, img_h]) * 1.1 - 5
    wh = torch.rand(num, 2, generator=g) * torch.tensor([img_w, img_h]) * 0.5 + 1
    b = torch.randint(0, batch, (num, 1), generator=g).float()
    return torch.cat([b, xy, xy + wh], 1).to(device=device, dtype=dtype)


def _feat(*shape, device=CUDA, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)


def _boxes_scores(n, device=CUDA, seed=0):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * 200
    wh = torch.rand(n, 2, generator=g) * 60 + 1
    boxes = torch.cat([xy, xy + wh], 1)
    # Distinct scores: with ties, torchvision's (unstable) sort may order equal-score boxes
    # differently from segkit's stable one, and the comparisons below are exact.
    scores = (torch.randperm(n, generator=g).float() + 1) / n
    return boxes.to(device), scores.to(device)


def _grad_of(fn, x, grad_out):
    x = x.detach().clone().requires_grad_()
    (g,) = torch.autograd.grad(fn(x), x, grad_out)
    return g


def test_cuda_kernels_are_compiled():
    """The comparisons below are only meaningful if segkit._C (with CUDA) is the backend."""
    from segkit.layers import _compiled
    assert _compiled.available()
    info = importlib.import_module("segkit._C").build_info()
    assert "cuda" in info["devices"], info
    backend = layers.get_backend()
    for op in ("roi_align", "nms", "batched_nms"):
        assert backend[op] == "segkit._C", backend


# ---------------------------------------------------------------------------------------------
# roi_align


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sampling_ratio", [0, 2])
@pytest.mark.parametrize("scale", [1.0, 0.25])
def test_roi_align_matches_torchvision_and_cpu(aligned, sampling_ratio, scale):
    x = _feat(2, 4, 20, 24)
    rois = _rois(50, 2, 20 / scale, 24 / scale)
    args = ((5, 6), scale, sampling_ratio, aligned)
    out = layers.roi_align(x, rois, *args)
    assert out.device.type == "cuda" and out.shape == (50, 4, 5, 6)
    torch.testing.assert_close(out, torchvision.ops.roi_align(x, rois, *args), **F32_TOL)
    torch.testing.assert_close(out.cpu(), layers.roi_align(x.cpu(), rois.cpu(), *args), **F32_TOL)

    go = _feat(*out.shape, seed=1)
    grad = _grad_of(lambda t: layers.roi_align(t, rois, *args), x, go)
    ref = _grad_of(lambda t: torchvision.ops.roi_align(t, rois, *args), x, go)
    torch.testing.assert_close(grad, ref, **F32_TOL)
    grad_cpu = _grad_of(lambda t: layers.roi_align(t, rois.cpu(), *args), x.cpu(), go.cpu())
    torch.testing.assert_close(grad.cpu(), grad_cpu, **F32_TOL)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_roi_align_half_types(dtype):
    """16-bit maps accumulate in float: close to the float32 result on the same rounded inputs."""
    x = _feat(2, 4, 16, 16, dtype=dtype)
    rois = _rois(30, 2, 32, 32, dtype=dtype)
    tol = 2e-3 if dtype == torch.float16 else 2e-2
    out = layers.roi_align(x, rois, 7, 0.5, 0, True)
    assert out.dtype == dtype
    ref = torchvision.ops.roi_align(x.float(), rois.float(), 7, 0.5, 0, True)
    torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol)
    torch.testing.assert_close(out.cpu(), layers.roi_align(x.cpu(), rois.cpu(), 7, 0.5, 0, True),
                               rtol=tol, atol=tol)

    go = _feat(*out.shape, dtype=dtype, seed=1)
    grad = _grad_of(lambda t: layers.roi_align(t, rois, 7, 0.5, 0, True), x, go)
    assert grad.dtype == dtype
    ref = _grad_of(lambda t: torchvision.ops.roi_align(t, rois.float(), 7, 0.5, 0, True),
                   x.float(), go.float())
    torch.testing.assert_close(grad.float(), ref, rtol=tol, atol=4 * tol)


def test_roi_align_half_matches_torchvision_half():
    """torchvision computes sample positions in half (errors of ~0.03 px at x ~ 32), segkit in
    float; on a smooth map those position errors barely change the value, so both agree."""
    ys, xs = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    x = torch.stack([0.05 * xs + 0.03 * ys + c for c in range(8)])[None].half().to(CUDA)
    rois = _rois(20, 1, 64, 64, dtype=torch.float16)
    out = layers.roi_align(x, rois, 7, 0.5, 2, True)
    ref = torchvision.ops.roi_align(x, rois, 7, 0.5, 2, True)
    torch.testing.assert_close(out, ref, rtol=1e-2, atol=1e-2)


def test_roi_align_channels_last():
    x = _feat(2, 8, 16, 20)
    rois = _rois(25, 2, 32, 40)
    ref = layers.roi_align(x, rois, 7, 0.5, 0, True)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    out = layers.roi_align(x_cl, rois, 7, 0.5, 0, True)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, ref, **F32_TOL)
    go = _feat(*ref.shape, seed=1)
    grad_cl = _grad_of(lambda t: layers.roi_align(t, rois, 7, 0.5, 0, True), x_cl, go)
    grad = _grad_of(lambda t: layers.roi_align(t, rois, 7, 0.5, 0, True), x, go)
    torch.testing.assert_close(grad_cl, grad, **F32_TOL)


def test_roi_align_gradcheck_double():
    x = _feat(1, 2, 6, 7, dtype=torch.float64).requires_grad_()
    rois = torch.tensor([[0, 0.3, 0.7, 4.2, 5.1], [0, 1.9, 0.4, 6.3, 3.8]],
                        dtype=torch.float64, device=CUDA)
    for aligned in (True, False):
        fn = lambda t: layers.roi_align(t, rois, (3, 2), 1.0, 2, aligned)  # noqa: E731
        # nondet_tol: the backward's atomic adds may sum in a different order on each run.
        assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-5, nondet_tol=1e-10)


def test_roi_align_runs_on_current_stream():
    x = _feat(2, 4, 16, 16)
    rois = _rois(10, 2, 16, 16)
    ref = layers.roi_align(x, rois, 5, 1.0, 0, True)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        out = layers.roi_align(x, rois, 5, 1.0, 0, True)
    torch.cuda.current_stream().wait_stream(stream)
    torch.testing.assert_close(out, ref)


def test_cuda_backward_reports_nondeterminism():
    """Atomic-add backwards warn under use_deterministic_algorithms(True, warn_only=True)."""
    x = _feat(1, 2, 8, 8).requires_grad_()
    rois = _rois(3, 1, 8, 8)
    was_on = torch.are_deterministic_algorithms_enabled()
    was_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with pytest.warns(UserWarning, match="_roi_align_backward"):
            layers.roi_align(x, rois, 3, 1.0).sum().backward()
        with pytest.warns(UserWarning, match="_roi_pool_backward"):
            layers.roi_pool(x, rois, 3, 1.0).sum().backward()
    finally:
        torch.use_deterministic_algorithms(was_on, warn_only=was_warn_only)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_roi_align_on_second_device():
    x = _feat(1, 2, 8, 8, device="cuda:1")
    rois = _rois(4, 1, 8, 8, device="cuda:1")
    out = layers.roi_align(x, rois, 3, 1.0, 0, True)
    assert out.device == torch.device("cuda:1")
    torch.testing.assert_close(out.cpu(), layers.roi_align(x.cpu(), rois.cpu(), 3, 1.0, 0, True),
                               **F32_TOL)


# ---------------------------------------------------------------------------------------------
# roi_pool


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_roi_pool_matches_torchvision_and_cpu(scale):
    x = _feat(2, 3, 15, 17)
    rois = _rois(40, 2, 15 / scale, 17 / scale)
    out = layers.roi_pool(x, rois, (4, 5), scale)
    ref = torchvision.ops.roi_pool(x, rois, (4, 5), scale)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    torch.testing.assert_close(out.cpu(), layers.roi_pool(x.cpu(), rois.cpu(), (4, 5), scale),
                               rtol=0, atol=0)
    go = _feat(*out.shape, seed=1)
    grad = _grad_of(lambda t: layers.roi_pool(t, rois, (4, 5), scale), x, go)
    ref = _grad_of(lambda t: torchvision.ops.roi_pool(t, rois, (4, 5), scale), x, go)
    torch.testing.assert_close(grad, ref, **F32_TOL)
    grad_cpu = _grad_of(lambda t: layers.roi_pool(t, rois.cpu(), (4, 5), scale), x.cpu(), go.cpu())
    torch.testing.assert_close(grad.cpu(), grad_cpu, **F32_TOL)


def test_roi_pool_half_is_exact():
    """Max pooling copies input values, so half results equal the float ones exactly."""
    x = _feat(2, 3, 12, 12, dtype=torch.float16)
    rois = _rois(20, 2, 12, 12, dtype=torch.float16)
    out = layers.roi_pool(x, rois, 3, 1.0)
    assert out.dtype == torch.float16
    ref = torchvision.ops.roi_pool(x.float(), rois.float(), 3, 1.0)
    torch.testing.assert_close(out.float(), ref, rtol=0, atol=0)


def test_roi_pool_gradcheck_double():
    # Distinct, well-separated values so that the eps perturbation never changes an argmax.
    g = torch.Generator().manual_seed(0)
    x = (torch.randperm(48, generator=g).double().reshape(1, 1, 6, 8) * 0.1).to(CUDA)
    x.requires_grad_()
    rois = torch.tensor([[0, 0.0, 0.0, 5.0, 4.0], [0, 2.0, 1.0, 7.0, 5.0]],
                        dtype=torch.float64, device=CUDA)
    fn = lambda t: layers.roi_pool(t, rois, (2, 3), 1.0)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-5, nondet_tol=1e-10)


# ---------------------------------------------------------------------------------------------
# multilevel_roi_align (FPN)

_SCALES = [1 / 4, 1 / 8, 1 / 16, 1 / 32]


def _pyramid(batch=2, channels=3, img=(256, 320), dtype=torch.float32, seed=0):
    return [_feat(batch, channels, img[0] // s, img[1] // s, dtype=dtype, seed=seed + i)
            for i, s in enumerate((4, 8, 16, 32))]


def _image_boxes(batch=2, per_image=30, img=(256, 320), seed=0):
    g = torch.Generator().manual_seed(seed)
    boxes = []
    for _ in range(batch):
        xy = torch.rand(per_image, 2, generator=g) * torch.tensor([img[1], img[0]]) * 0.7
        wh = torch.rand(per_image, 2, generator=g) * 300 + 2
        boxes.append(torch.cat([xy, xy + wh], 1).to(CUDA))
    return boxes


def _to_rois(boxes):
    return torch.cat([torch.cat([torch.full_like(b[:, :1], i), b], 1) for i, b in enumerate(boxes)])


def test_multilevel_matches_torchvision_multiscale_roi_align():
    """MultiScaleRoIAlign uses aligned=False, canonical 224 at level 4 (FPN Eq. 1)."""
    img = (256, 320)
    feats = _pyramid(img=img)
    boxes = _image_boxes(img=img)
    msr = MultiScaleRoIAlign(["p2", "p3", "p4", "p5"], (7, 7), sampling_ratio=2)
    ref = msr({f"p{i + 2}": f for i, f in enumerate(feats)}, boxes, [img] * len(boxes))
    out = layers.multilevel_roi_align(feats, _to_rois(boxes), 7, _SCALES, sampling_ratio=2,
                                      aligned=False, canonical_box_size=224.0, canonical_level=4)
    torch.testing.assert_close(out, ref, **F32_TOL)


@pytest.mark.parametrize("aligned", [True, False])
def test_multilevel_matches_cpu_forward_and_backward(aligned):
    feats = _pyramid()
    rois = _to_rois(_image_boxes())
    def fn(*fs):
        return layers.multilevel_roi_align(list(fs), rois, (5, 6), _SCALES, 0, aligned)

    out = fn(*feats)
    out_cpu = layers.multilevel_roi_align([f.cpu() for f in feats], rois.cpu(), (5, 6), _SCALES,
                                          0, aligned)
    torch.testing.assert_close(out.cpu(), out_cpu, **F32_TOL)

    go = _feat(*out.shape, seed=7)
    leaves = [f.clone().requires_grad_() for f in feats]
    grads = torch.autograd.grad(fn(*leaves), leaves, go)
    leaves_cpu = [f.cpu().requires_grad_() for f in feats]
    grads_cpu = torch.autograd.grad(
        layers.multilevel_roi_align(leaves_cpu, rois.cpu(), (5, 6), _SCALES, 0, aligned),
        leaves_cpu, go.cpu())
    for g, g_cpu in zip(grads, grads_cpu):
        torch.testing.assert_close(g.cpu(), g_cpu, **F32_TOL)


def test_multilevel_equals_per_level_roi_align():
    """Each RoI is pooled from exactly one level: its FPN level, with that level's scale."""
    feats = _pyramid()
    boxes = torch.cat(_image_boxes())
    rois = _to_rois(_image_boxes())
    out = layers.multilevel_roi_align(feats, rois, 7, _SCALES, 2, True)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    k = torch.floor(4 + torch.log2(torch.sqrt(area) / 224) + 1e-6).clamp(2, 5).long() - 2
    for lvl, f in enumerate(feats):
        m = k == lvl
        if m.any():
            ref = torchvision.ops.roi_align(f, rois[m], 7, _SCALES[lvl], 2, True)
            torch.testing.assert_close(out[m], ref, **F32_TOL)


def test_multilevel_half():
    feats = _pyramid(dtype=torch.float16)
    rois = _to_rois(_image_boxes()).half()
    out = layers.multilevel_roi_align(feats, rois, 7, _SCALES, 2, True)
    assert out.dtype == torch.float16
    ref = layers.multilevel_roi_align([f.float() for f in feats], rois.float(), 7, _SCALES, 2, True)
    torch.testing.assert_close(out.float(), ref, rtol=2e-3, atol=2e-3)


def test_multilevel_gradcheck_double():
    feats = [_feat(1, 2, 8, 8, dtype=torch.float64, seed=1).requires_grad_(),
             _feat(1, 2, 4, 4, dtype=torch.float64, seed=2).requires_grad_()]
    # scales 1/4, 1/8 (levels 2, 3); canonical 16 px at level 3 puts the small box on level 2
    # and the large one on level 3.
    rois = torch.tensor([[0, 1.3, 2.1, 9.7, 8.2], [0, 0.6, 1.7, 27.4, 30.1]],
                        dtype=torch.float64, device=CUDA)

    def fn(f0, f1):
        return layers.multilevel_roi_align([f0, f1], rois, 2, [0.25, 0.125], 2, True,
                                           canonical_box_size=16.0, canonical_level=3)

    assert torch.autograd.gradcheck(fn, tuple(feats), eps=1e-6, atol=1e-5, nondet_tol=1e-10)


# ---------------------------------------------------------------------------------------------
# multicontext_roi_align (device-agnostic composite over roi_align)


def test_multicontext_matches_cpu_and_expanded_roi_align():
    x = _feat(2, 3, 16, 16)
    rois = _rois(12, 2, 64, 64)
    scales = (1.0, 1.5, 2.0, 4.0)
    out = layers.multicontext_roi_align(x, rois, 5, scales, 0.25)
    assert out.shape == (12, 4, 3, 5, 5)
    out_cpu = layers.multicontext_roi_align(x.cpu(), rois.cpu(), 5, scales, 0.25)
    torch.testing.assert_close(out.cpu(), out_cpu, **F32_TOL)
    cx, cy = (rois[:, 1] + rois[:, 3]) / 2, (rois[:, 2] + rois[:, 4]) / 2
    w, h = rois[:, 3] - rois[:, 1], rois[:, 4] - rois[:, 2]
    for i, s in enumerate(scales):
        grown = torch.stack([rois[:, 0], cx - s * w / 2, cy - s * h / 2,
                             cx + s * w / 2, cy + s * h / 2], 1)
        ref = torchvision.ops.roi_align(x, grown, 5, 0.25, 0, True)
        torch.testing.assert_close(out[:, i], ref, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# nms / batched_nms


@pytest.mark.parametrize("n", [1, 63, 64, 65, 1000, 5000])
@pytest.mark.parametrize("iou_threshold", [0.3, 0.5, 0.7])
def test_nms_matches_torchvision(n, iou_threshold):
    boxes, scores = _boxes_scores(n)
    keep = layers.nms(boxes, scores, iou_threshold)
    assert keep.device.type == "cuda" and keep.dtype == torch.int64
    assert torch.equal(keep, torchvision.ops.nms(boxes, scores, iou_threshold))
    assert torch.equal(keep.cpu(), layers.nms(boxes.cpu(), scores.cpu(), iou_threshold))


@pytest.mark.parametrize("n", [10, 500, 3000])
def test_batched_nms_matches_torchvision(n):
    boxes, scores = _boxes_scores(n, seed=3)
    idxs = torch.randint(0, 7, (n,), generator=torch.Generator().manual_seed(4)).to(CUDA)
    keep = layers.batched_nms(boxes, scores, idxs, 0.5)
    assert torch.equal(keep, torchvision.ops.batched_nms(boxes, scores, idxs, 0.5))
    assert torch.equal(keep.cpu(), layers.batched_nms(boxes.cpu(), scores.cpu(), idxs.cpu(), 0.5))
    assert torch.all(scores[keep][:-1] >= scores[keep][1:])  # decreasing score


def test_nms_ties_keep_lower_index_first():
    boxes = torch.tensor([[0, 0, 10, 10], [50, 50, 60, 60], [100, 100, 110, 110.0]], device=CUDA)
    scores = torch.full((3,), 0.5, device=CUDA)
    assert layers.nms(boxes, scores, 0.5).tolist() == [0, 1, 2]


def test_batched_nms_separates_classes():
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [0, 0, 10, 10.0]], device=CUDA)
    scores = torch.tensor([0.9, 0.8, 0.7], device=CUDA)
    idxs = torch.tensor([0, 0, 1], device=CUDA)
    assert layers.batched_nms(boxes, scores, idxs, 0.5).tolist() == [0, 2]


# ---------------------------------------------------------------------------------------------
# Empty inputs, invalid RoIs, device mismatch


def test_empty_inputs():
    x = _feat(1, 4, 8, 8)
    no_rois = torch.zeros(0, 5, device=CUDA)
    assert layers.roi_align(x, no_rois, 7, 1.0).shape == (0, 4, 7, 7)
    assert layers.roi_pool(x, no_rois, 7, 1.0).shape == (0, 4, 7, 7)
    out = layers.multilevel_roi_align([x, _feat(1, 4, 4, 4)], no_rois, 7, [0.25, 0.125])
    assert out.shape == (0, 4, 7, 7) and out.device.type == "cuda"
    assert layers.multicontext_roi_align(x, no_rois, 7, (1.0, 2.0)).shape == (0, 2, 4, 7, 7)
    for keep in (layers.nms(torch.zeros(0, 4, device=CUDA), torch.zeros(0, device=CUDA), 0.5),
                 layers.batched_nms(torch.zeros(0, 4, device=CUDA), torch.zeros(0, device=CUDA),
                                    torch.zeros(0, dtype=torch.int64, device=CUDA), 0.5)):
        assert keep.shape == (0,) and keep.dtype == torch.int64 and keep.device.type == "cuda"
    # Zero channels: empty output, no launch.
    assert layers.roi_align(_feat(1, 0, 8, 8), _rois(3, 1, 8, 8), 7, 1.0).shape == (3, 0, 7, 7)


def test_out_of_range_batch_index_gives_zeros():
    """The CUDA kernels cannot raise: such RoIs pool to zeros and get no gradient."""
    x = _feat(2, 3, 8, 8).requires_grad_()
    rois = torch.tensor([[5, 1, 1, 6, 6], [-1, 1, 1, 6, 6], [1, 1, 1, 6, 6.0]], device=CUDA)
    out = layers.roi_align(x, rois, 3, 1.0)
    assert torch.all(out[:2] == 0) and out[2].abs().sum() > 0
    out.sum().backward()
    torch.cuda.synchronize()  # surfaces any device-side fault here
    ref = _grad_of(lambda t: torchvision.ops.roi_align(t, rois[2:], 3, 1.0, 0, True).sum(),
                   x, torch.tensor(1.0, device=CUDA))
    torch.testing.assert_close(x.grad, ref)

    pooled = layers.roi_pool(x, rois, 3, 1.0)
    assert torch.all(pooled[:2] == 0)
    feats = [_feat(2, 3, 16, 16), _feat(2, 3, 8, 8)]
    ml = layers.multilevel_roi_align(feats, rois, 3, [0.25, 0.125])
    assert torch.all(ml[:2] == 0)
    torch.cuda.synchronize()


def test_non_finite_rois_give_zeros():
    x = _feat(1, 3, 8, 8)
    rois = torch.tensor([[0, float("nan"), 1, 6, 6], [0, 1, 1, float("inf"), 6]], device=CUDA)
    assert torch.all(layers.roi_align(x, rois, 3, 1.0) == 0)
    assert torch.all(layers.roi_pool(x, rois, 3, 1.0) == 0)
    torch.cuda.synchronize()


def test_device_mismatch_raises_clear_error():
    x = _feat(1, 3, 8, 8)
    rois_cpu = _rois(2, 1, 8, 8, device="cpu")
    with pytest.raises((RuntimeError, ValueError), match="device"):
        layers.roi_align(x, rois_cpu, 3, 1.0)
    with pytest.raises((RuntimeError, ValueError), match="device"):
        layers.roi_pool(x, rois_cpu, 3, 1.0)
    with pytest.raises((RuntimeError, ValueError), match="device"):
        layers.multilevel_roi_align([x, _feat(1, 3, 4, 4)], rois_cpu, 3, [0.25, 0.125])
    boxes, scores = _boxes_scores(10)
    with pytest.raises((RuntimeError, ValueError), match="device"):
        layers.nms(boxes, scores.cpu(), 0.5)
    with pytest.raises((RuntimeError, ValueError), match="device"):
        layers.batched_nms(boxes, scores, torch.zeros(10, dtype=torch.int64), 0.5)
