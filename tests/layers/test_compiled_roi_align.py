"""Compiled RoIAlign, its FPN form and its multi-context form against torchvision.

Forward values and gradients are compared with ``torchvision.ops.roi_align`` and
``MultiScaleRoIAlign`` on random and adversarial RoIs, in float64 to within rounding and in
float32 to float32 rounding; gradients also pass ``gradcheck``; the backward is bitwise
deterministic for any thread count; the ops trace under ``torch.library.opcheck`` (schema,
autograd registration, fake kernels, AOT dispatch) and ``torch.export``.
"""
import pytest
import torch
import torchvision
from torchvision.ops import MultiScaleRoIAlign

from segkit.layers import get_backend, multicontext_roi_align, multilevel_roi_align, roi_align
from segkit.layers import ops as ops_module

tv_roi_align = torchvision.ops.roi_align


def _rois(n, batch, width, height, gen, max_size=None, dtype=torch.float64):
    """(n, 5) RoIs in random image order with boxes partly outside a width x height image."""
    max_size = max_size or max(width, height)
    xy = torch.rand(n, 2, generator=gen, dtype=dtype) * torch.tensor([width, height], dtype=dtype) * 1.2 - 8
    wh = torch.rand(n, 2, generator=gen, dtype=dtype) * max_size
    b = torch.randint(0, batch, (n, 1), generator=gen).to(dtype)
    return torch.cat([b, xy, xy + wh], dim=1)


def _adversarial_rois(batch, width, height, dtype=torch.float64):
    """Edge cases: outside the image, zero size, inverted, huge, on the border; batch out of order."""
    w, h = float(width), float(height)
    rows = [
        [1, -50.0, -40.0, -20.0, -10.0],      # entirely outside (top-left)
        [0, w + 5, h + 5, w + 60, h + 70],     # entirely outside (bottom-right)
        [1, 10.0, 12.0, 10.0, 12.0],           # zero size
        [0, 30.0, 25.0, 10.0, 5.0],            # inverted
        [1, -2e3, -1e3, 2e3, 1.5e3],           # huge (adaptive sampling gets a big grid)
        [0, 0.0, 0.0, w, h],                   # the whole image
        [1, w - 1.0, 0.0, w, h],               # one-pixel column on the right border
        [0, 3.25, 7.5, 3.75, 30.0],            # thinner than a bin
    ]
    return torch.tensor([[min(r[0], batch - 1)] + r[1:] for r in rows], dtype=dtype)


def test_compiled_kernels_are_the_backend():
    assert get_backend()["roi_align"] == "segkit._C"
    assert get_backend()["multilevel_roi_align"] == "segkit._C"
    assert get_backend()["multicontext_roi_align"] == "segkit._C"


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sampling_ratio", [0, 1, 2, 3])
@pytest.mark.parametrize("channels_last", [False, True])
def test_roi_align_forward_and_grad_match_torchvision(aligned, sampling_ratio, channels_last):
    gen = torch.Generator().manual_seed(sampling_ratio + 10 * aligned)
    x = torch.randn(2, 5, 21, 27, generator=gen, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    rois = torch.cat([_rois(30, 2, 108, 84, gen, 60), _adversarial_rois(2, 108, 84)])
    for output_size, scale in [((7, 7), 0.25), ((3, 5), 0.25), ((14, 14), 0.5)]:
        xs = x.detach().requires_grad_()
        xt = x.detach().requires_grad_()
        out = roi_align(xs, rois, output_size, scale, sampling_ratio, aligned)
        ref = tv_roi_align(xt, rois, output_size, scale, sampling_ratio, aligned)
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
        assert out.is_contiguous(memory_format=torch.channels_last) == channels_last
        g = torch.randn(out.shape, generator=gen, dtype=torch.float64)
        out.backward(g)
        ref.backward(g)
        torch.testing.assert_close(xs.grad, xt.grad, rtol=1e-10, atol=1e-12)


def test_roi_align_float32_non_contiguous_input_and_empty():
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(3, 16, 40, 50, generator=gen)
    x = base[:, ::2, :, 1:]  # strided channels, offset columns: not contiguous in any format
    assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    rois = _rois(50, 3, 200, 160, gen, 120, dtype=torch.float32)
    rois_t = rois.t().contiguous().t()  # column-major RoI storage
    out = roi_align(x, rois_t, 7, 0.25, 2, True)
    ref = tv_roi_align(x.contiguous(), rois, 7, 0.25, 2, True)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=5e-5)
    # no RoI: raw op returns an empty result and an all-zero gradient
    empty = torch.ops.segkit.roi_align(x.contiguous(), rois[:0], 0.25, 7, 7, 2, True)
    assert empty.shape == (0, 8, 7, 7)
    grad = torch.ops.segkit._roi_align_backward(empty, rois[:0], 0.25, 7, 7, 3, 8, 40, 49, 2, True)
    assert grad.shape == (3, 8, 40, 49) and not grad.any()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_roi_align_half_precision_accumulates_in_float(dtype):
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(1, 8, 32, 32, generator=gen)
    rois = _rois(20, 1, 128, 128, gen, 100, dtype=torch.float32)
    rois = rois.to(dtype).float()  # the wrapper casts RoIs to the features' dtype
    ref = tv_roi_align(x, rois, 7, 0.25, 0, True)
    xh = x.to(dtype).requires_grad_()
    out = roi_align(xh, rois, 7, 0.25, 0, True)
    assert out.dtype == dtype
    # inputs rounded to `dtype`, sums in float: error of a few units of the last place
    tol = {torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol)
    g = torch.randn(out.shape, generator=gen)
    out.backward(g.to(dtype))
    xf = x.clone().requires_grad_()
    tv_roi_align(xf, rois, 7, 0.25, 0, True).backward(g)
    torch.testing.assert_close(xh.grad.float(), xf.grad, rtol=5 * tol, atol=5 * tol)


def test_roi_align_backward_is_deterministic_for_any_thread_count():
    gen = torch.Generator().manual_seed(5)
    rois = _rois(200, 2, 120, 120, gen, 100, dtype=torch.float32)  # heavy overlap
    g = torch.randn(200, 40, 7, 7, generator=gen)
    threads = torch.get_num_threads()
    for grad in (g, g.contiguous(memory_format=torch.channels_last)):
        grads = []
        try:
            for n in (1, 2, 2, 3):
                torch.set_num_threads(n)
                grads.append(torch.ops.segkit._roi_align_backward(grad, rois, 0.25, 7, 7, 2, 40, 30,
                                                                  30, 2, True))
        finally:
            torch.set_num_threads(threads)
        for other in grads[1:]:
            assert torch.equal(grads[0], other)
    # the FPN form: the same per-level writers, whatever the level mix
    boxes = torch.cat([torch.zeros(200, 1), _pyramid_boxes(200, 120, 120, gen, torch.float32)], 1)
    per_level = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            per_level.append(torch.ops.segkit._multilevel_roi_align_backward(
                g, boxes, torch.ops.segkit.multilevel_roi_align(
                    [torch.zeros(2, 40, 30, 30), torch.zeros(2, 40, 15, 15)], boxes, [0.25, 0.125],
                    7, 7, 2, True, 224.0, 4)[1], [0.25, 0.125], 7, 7, 2, 40, [30, 15], [30, 15], 2, True))
    finally:
        torch.set_num_threads(threads)
    for other in per_level[1:]:
        assert all(torch.equal(a, b) for a, b in zip(per_level[0], other))


def test_roi_align_gradcheck_and_second_derivative():
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(2, 1, 5, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    rois = torch.tensor([[1, 1.3, 2.2, 10.5, 9.1], [0, -3.0, 4.0, 9.0, 30.0], [0, 5, 5, 5, 5]],
                        dtype=torch.float64)
    for sr, aligned in [(0, True), (2, False)]:
        fn = lambda t: roi_align(t, rois, (3, 2), 0.5, sr, aligned)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (x,))
        # RoIAlign is linear in the features: its backward's backward is RoIAlign again
        assert torch.autograd.gradgradcheck(fn, (x,))


def test_bad_arguments_raise_clear_errors():
    x = torch.randn(2, 3, 8, 8)
    ok = torch.tensor([[0, 1.0, 1.0, 5.0, 5.0]])
    ra = torch.ops.segkit.roi_align
    with pytest.raises(RuntimeError, match=r"rois must have shape \(K, 5\).*\[1, 4\]"):
        ra(x, ok[:, 1:], 1.0, 2, 2, 0, True)
    with pytest.raises(RuntimeError, match="input is Float but rois are Double"):
        ra(x, ok.double(), 1.0, 2, 2, 0, True)
    with pytest.raises(RuntimeError, match=r"input must have shape \(B, C, H, W\)"):
        ra(x[0], ok, 1.0, 2, 2, 0, True)
    with pytest.raises(RuntimeError, match=r"rois\[0\] has batch index 2 but the input has batch size 2"):
        ra(x, torch.tensor([[2, 1.0, 1.0, 5.0, 5.0]]), 1.0, 2, 2, 0, True)
    with pytest.raises(RuntimeError, match=r"rois\[1\] has a non-finite coordinate"):
        ra(x, torch.tensor([[0, 1.0, 1.0, 5.0, 5.0], [1, 1.0, float("nan"), 5.0, 5.0]]), 1.0, 2, 2, 0, True)
    with pytest.raises(RuntimeError, match="output size must be positive"):
        ra(x, ok, 1.0, 0, 2, 0, True)
    with pytest.raises(RuntimeError, match="must be a floating tensor"):
        ra(x.long(), ok.long(), 1.0, 2, 2, 0, True)
    # the Python wrappers check before dispatch
    with pytest.raises(ValueError, match="input is on cpu but rois are on meta"):
        roi_align(x, ok.to("meta"), 2)
    with pytest.raises(ValueError, match=r"output_size must be an int or \(h, w\)"):
        roi_align(x, ok, (2, 2, 2))


# -- multilevel_roi_align ------------------------------------------------------------------

def _pyramid(batch, channels, height, width, gen, dtype=torch.float64):
    return [torch.randn(batch, channels, height // 2 ** k, width // 2 ** k, generator=gen, dtype=dtype)
            for k in range(2, 6)]


def _pyramid_boxes(n, height, width, gen, dtype=torch.float64):
    """Boxes of 8..800 px (log-uniform) so that every FPN level gets some."""
    side = torch.exp(torch.empty(n, 2, dtype=dtype).uniform_(2.0, 6.7, generator=gen))
    xy = torch.rand(n, 2, generator=gen, dtype=dtype) * torch.tensor([width, height], dtype=dtype)
    return torch.cat([xy, xy + side], dim=1)


@pytest.mark.parametrize("sampling_ratio", [0, 2])
@pytest.mark.parametrize("aligned", [False, True])
def test_multilevel_matches_torchvision_multiscale_roialign(sampling_ratio, aligned):
    gen = torch.Generator().manual_seed(7 + sampling_ratio)
    h, w = 256, 320
    feats = _pyramid(2, 3, h, w, gen)
    boxes = [_pyramid_boxes(40, h, w, gen), _pyramid_boxes(30, h, w, gen)]
    boxes[1][:3] = torch.tensor([[30.0, 5.0, 10.0, 25.0],      # inverted in x: no level, zeros
                                 [5.0, 5.0, 5.0, 5.0],         # empty: finest level
                                 [0.0, 0.0, 224.0, 224.0]], dtype=torch.float64)  # exactly k0
    names = ["p2", "p3", "p4", "p5"]
    mra = MultiScaleRoIAlign(names, 7, sampling_ratio)
    if aligned:  # torchvision's module is fixed to aligned=False; swap its op for the check
        mra = _aligned_multiscale(mra)
    tv_feats = [f.detach().requires_grad_() for f in feats]
    sk_feats = [f.detach().requires_grad_() for f in feats]
    ref = mra(dict(zip(names, tv_feats)), boxes, [(h, w), (h, w)])
    rois = torch.cat([torch.cat([torch.full((len(b), 1), float(i), dtype=b.dtype), b], 1)
                      for i, b in enumerate(boxes)])
    out = multilevel_roi_align(sk_feats, rois, 7, [1 / 4, 1 / 8, 1 / 16, 1 / 32], sampling_ratio, aligned)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    assert not out[40].any()  # the inverted box
    g = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    out.backward(g)
    ref.backward(g)
    for a, b in zip(sk_feats, tv_feats):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12)
    levels = torch.ops.segkit.multilevel_roi_align(feats, rois, [1 / 4, 1 / 8, 1 / 16, 1 / 32], 7, 7,
                                                   sampling_ratio, aligned, 224.0, 4)[1]
    assert levels[40].item() == -1 and levels[41].item() == 0 and levels[42].item() == 2
    assert set(levels.tolist()) == {-1, 0, 1, 2, 3}


def _aligned_multiscale(module):
    """torchvision's MultiScaleRoIAlign with aligned=True pooling (its level mapping kept)."""
    import torchvision.ops.poolers as poolers

    class Aligned(torch.nn.Module):
        def forward(self, x, boxes, image_shapes):
            orig = poolers.roi_align

            def aligned_roi_align(*args, **kwargs):
                kwargs["aligned"] = True
                return orig(*args, **kwargs)

            poolers.roi_align = aligned_roi_align
            try:
                return module(x, boxes, image_shapes)
            finally:
                poolers.roi_align = orig

    return Aligned()


def test_multilevel_float32_channels_last_and_gradcheck():
    gen = torch.Generator().manual_seed(8)
    feats = _pyramid(1, 4, 128, 160, gen, dtype=torch.float32)
    rois = torch.cat([torch.zeros(60, 1), _pyramid_boxes(60, 128, 160, gen, torch.float32)], 1)
    scales = [1 / 4, 1 / 8, 1 / 16, 1 / 32]
    ref = ops_module._tv_multilevel_roi_align(feats, rois, (7, 7), scales, 2, True, 224.0, 4)
    cl = [f.contiguous(memory_format=torch.channels_last) for f in feats]
    for fs in (feats, cl):
        torch.testing.assert_close(multilevel_roi_align(fs, rois, 7, scales, 2, True), ref,
                                   rtol=1e-4, atol=5e-5)
    small = [torch.randn(1, 2, s, s, dtype=torch.float64, generator=gen, requires_grad=True)
             for s in (8, 4)]
    r = torch.tensor([[0, 1.0, 2.0, 9.0, 12.0], [0, 0.0, 0.0, 31.0, 30.0], [0, 4, 4, 20, 7]],
                     dtype=torch.float64)
    fn = lambda a, b: multilevel_roi_align([a, b], r, 2, [1 / 4, 1 / 8], 2, True, 16.0, 3)  # noqa: E731
    assert torch.autograd.gradcheck(fn, tuple(small))


def test_multilevel_bad_pyramid_raises():
    f = [torch.randn(1, 2, 8, 8), torch.randn(1, 2, 4, 4)]
    r = torch.tensor([[0, 1.0, 1.0, 5.0, 5.0]])
    with pytest.raises(ValueError, match="not a power of two"):
        multilevel_roi_align(f, r, 2, [1 / 3, 1 / 6])
    with pytest.raises(ValueError, match="consecutive levels"):
        multilevel_roi_align(f, r, 2, [1 / 4, 1 / 16])
    with pytest.raises(ValueError, match="2 feature maps but 1 spatial scales"):
        multilevel_roi_align(f, r, 2, [1 / 4])
    with pytest.raises(RuntimeError, match="same batch size and channels"):
        torch.ops.segkit.multilevel_roi_align([f[0], f[1][:, :1]], r, [0.25, 0.125], 2, 2, 0, True, 224.0, 4)


# -- multicontext_roi_align ----------------------------------------------------------------

def test_multicontext_regions_are_the_foveal_boxes():
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(2, 4, 40, 48, generator=gen, dtype=torch.float64, requires_grad=True)
    rois = torch.tensor([[1, 40.0, 30.0, 80.0, 70.0], [0, 100.0, 20.0, 140.0, 100.0]], dtype=torch.float64)
    out = multicontext_roi_align(x, rois, 7, spatial_scale=0.25, sampling_ratio=2)
    assert out.shape == (2, 4, 4, 7, 7)
    # hand-expanded regions (MultiPathNet: the 1.5x box is (x - 0.25w, y - 0.25h, 1.5w, 1.5h),
    # the 4x box (x - 1.5w, y - 1.5h, 4w, 4h))
    x1, y1, x2, y2 = rois[:, 1], rois[:, 2], rois[:, 3], rois[:, 4]
    w, h = x2 - x1, y2 - y1
    expected = []
    for s in (1.0, 1.5, 2.0, 4.0):
        d = (s - 1) / 2
        region = torch.stack([rois[:, 0], x1 - d * w, y1 - d * h, x2 + d * w, y2 + d * h], 1)
        expected.append(tv_roi_align(x, region, 7, 0.25, 2, True))
    ref = torch.stack(expected, dim=1)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    assert torch.equal(out[:, 0], roi_align(x, rois, 7, 0.25, 2, True))  # 1x is the box itself
    g = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    (ga,) = torch.autograd.grad(out, x, g)
    (gb,) = torch.autograd.grad(ref, x, g)
    torch.testing.assert_close(ga, gb, rtol=1e-10, atol=1e-12)
    small = x.detach()[:, :2, :10, :12].clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda t: multicontext_roi_align(t, rois / 4, 2, (1.0, 2.0), 0.25, 0, False), (small,))
    with pytest.raises(ValueError, match="context_scales must be non-empty and positive"):
        multicontext_roi_align(x, rois, 7, (1.0, 0.0))


# -- tracing -------------------------------------------------------------------------------

def test_ops_pass_opcheck():
    """Schema, autograd registration, fake kernels and AOT dispatch of every pooling op."""
    gen = torch.Generator().manual_seed(10)
    x = torch.randn(2, 3, 10, 12, generator=gen, dtype=torch.float64, requires_grad=True)
    r = torch.tensor([[0, 1.0, 2, 8, 9], [1, 0, 0, 5, 5]], dtype=torch.float64)
    big = torch.cat([r[:, :1], r[:, 1:] * 20], 1)
    ops = torch.ops.segkit
    cl = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    pyramid = [x.detach().clone().requires_grad_(), x.detach()[:, :, ::2, ::2].clone().requires_grad_()]
    cases = [
        (ops.roi_align.default, (x, r, 0.5, 3, 3, 2, True)),
        (ops.roi_align.default, (cl, r, 0.5, 3, 3, 0, False)),
        (ops.multilevel_roi_align.default, (pyramid, big, [0.5, 0.25], 3, 3, 2, True, 224.0, 4)),
        (ops.multicontext_roi_align.default, (x, r, [1.0, 1.5, 2.0], 0.5, 3, 3, 2, True)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_export_traces_multilevel_pooling():
    class Pool(torch.nn.Module):
        def forward(self, p2, p3, rois):
            return multilevel_roi_align([p2, p3], rois, 7, [1 / 4, 1 / 8], 2, True)

    gen = torch.Generator().manual_seed(11)
    p2, p3 = torch.randn(1, 4, 32, 32, generator=gen), torch.randn(1, 4, 16, 16, generator=gen)
    rois = torch.cat([torch.zeros(10, 1), _pyramid_boxes(10, 128, 128, gen, torch.float32)], 1)
    exported = torch.export.export(Pool(), (p2, p3, rois))
    assert any("segkit.multilevel_roi_align" in str(n.target) for n in exported.graph.nodes)
    torch.testing.assert_close(exported.module()(p2, p3, rois), Pool()(p2, p3, rois))
