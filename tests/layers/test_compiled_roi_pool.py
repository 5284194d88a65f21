"""Compiled RoIPool (segkit._C, csrc/cpu/roi_pool.cpp) against torchvision.ops.roi_pool.

Max pooling picks values, so the forward pass must equal torchvision's exactly; the backward
kernel scatters each bin's gradient to its argmax cell in torchvision's order and must be
deterministic (independent of runs and thread counts).
"""
import pytest
import torch
import torchvision

from segkit.layers import ROIPool, get_backend, roi_pool

ops = torch.ops.segkit


def _rois(batch, height, width, k, g, scale):
    """Random RoIs in image pixels, some partly or wholly off the map, some inverted, batch
    indices in random order."""
    b = torch.randint(0, batch, (k, 1), generator=g).float()
    size = torch.tensor([width, height]) / scale
    xy = (torch.rand(k, 2, generator=g) * 1.4 - 0.2) * size
    wh = (torch.rand(k, 2, generator=g) * 0.8 - 0.1) * size
    return torch.cat([b, xy, xy + wh], 1)


def _assert_matches_torchvision(x, rois, size, scale, grad):
    """segkit's roi_pool equals torchvision's: outputs bit for bit, input gradients closely."""
    out, gx = _pool_and_grad(roi_pool, x, rois, size, scale, grad)
    ref, ref_gx = _pool_and_grad(torchvision.ops.roi_pool, x, rois, size, scale, grad)
    assert torch.equal(out, ref)
    torch.testing.assert_close(gx, ref_gx)


def _pool_and_grad(fn, x, rois, output_size, scale, grad):
    x = x.detach().clone().requires_grad_()
    out = fn(x, rois, output_size, scale)
    out.backward(grad)
    return out.detach(), x.grad


def test_compiled_backend_is_active():
    assert get_backend()["roi_pool"] == "segkit._C"


def test_hand_values_and_empty_bins():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    # RoI covering cells [0, 3] x [0, 3] -> 2x2 bins of 2x2 cells: maxima at the bins' corners.
    out = roi_pool(x, torch.tensor([[0, 0, 0, 3, 3.0]]), 2)
    assert out[0, 0].tolist() == [[5.0, 7.0], [13.0, 15.0]]
    # Entirely off the map: every bin is empty and pools to 0 (no gradient).
    off = torch.tensor([[0, 10, 10, 20, 20.0]])
    assert roi_pool(x, off, 3).abs().sum() == 0
    xg = x.clone().requires_grad_()
    roi_pool(xg, off, 3).sum().backward()
    assert xg.grad.abs().sum() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("seed", range(3))
def test_equals_torchvision_forward_and_backward(dtype, seed):
    g = torch.Generator().manual_seed(seed)
    for trial in range(6):
        channels = int(torch.randint(1, 5, (1,), generator=g))
        height, width = (int(v) for v in torch.randint(1, 16, (2,), generator=g))
        scale = (1.0, 0.5, 0.25, 1 / 3)[trial % 4]
        x = torch.randn(2, channels, height, width, generator=g, dtype=dtype)
        if trial % 3 == 1:
            x = torch.round(x)  # equal values in a bin: the first one (row-major) wins
        rois = _rois(2, height, width, 8, g, scale).to(dtype)
        size = tuple(int(v) for v in torch.randint(1, 8, (2,), generator=g))
        grad = torch.randn((8, channels) + size, generator=g, dtype=dtype)
        _assert_matches_torchvision(x, rois, size, scale, grad)


def test_extreme_rois_and_values():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 10, 12, generator=g)
    x[0, 1, 2:5, 2:5] = float("-inf")  # a bin of -inf keeps torchvision's -FLT_MAX start value
    rois = torch.tensor([
        [0, -1e6, -1e6, 1e6, 1e6],  # huge
        [1, 0, 0, 1e7, 3],
        [0, 3, 3, 3, 3],            # a single cell
        [1, 11, 9, 0, 0],           # inverted: forced to 1x1
        [0, 100, 100, 200, 200],    # off the map
        [1, -50, -50, -10, -10],
        [0, 2, 2, 4.5, 4.5],        # .5 rounds away from zero
        [0, 2.5, 2.5, 5, 5],
    ])
    for size, scale in (((1, 1), 1.0), ((2, 3), 0.5), ((7, 7), 0.3), ((20, 1), 1.0)):
        grad = torch.randn((8, 3) + size, generator=g)
        _assert_matches_torchvision(x, rois, size, scale, grad)


def test_channels_last_and_strided_input():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 6, 11, 13, generator=g)
    rois = _rois(2, 11, 13, 10, g, 0.5)
    grad = torch.randn(10, 6, 3, 4, generator=g)
    ref, ref_gx = _pool_and_grad(torchvision.ops.roi_pool, x, rois, (3, 4), 0.5, grad)
    channels_last = x.to(memory_format=torch.channels_last)
    out, gx = _pool_and_grad(roi_pool, channels_last, rois, (3, 4), 0.5, grad)
    assert torch.equal(out, ref)
    torch.testing.assert_close(gx, ref_gx)
    strided = torch.randn(2, 6, 11, 26, generator=g)[..., ::2]
    assert torch.equal(roi_pool(strided, rois, (3, 4), 0.5),
                       torchvision.ops.roi_pool(strided.contiguous(), rois, (3, 4), 0.5))
    # a non-contiguous incoming gradient (e.g. from a transpose downstream)
    grad_t = grad.transpose(2, 3).contiguous().transpose(2, 3)
    _, gx_t = _pool_and_grad(roi_pool, x, rois, (3, 4), 0.5, grad_t)
    assert torch.equal(gx_t, ref_gx)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reduced_precision_matches_float32_reference(dtype):
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 4, 9, 11, generator=g).to(dtype)
    rois = torch.tensor([[0, 1, 1, 7, 6], [1, 0, 2, 10, 8.5], [1, 3, 3, 2, 2], [0, 2, 2, 8, 8]])
    grad = torch.randn(4, 4, 3, 4, generator=g).to(dtype)
    out, gx = _pool_and_grad(roi_pool, x, rois.to(dtype), (3, 4), 0.5, grad)
    ref, ref_gx = _pool_and_grad(torchvision.ops.roi_pool, x.float(), rois.to(dtype).float(),
                                 (3, 4), 0.5, grad.float())
    assert out.dtype == dtype and gx.dtype == dtype
    assert torch.equal(out.float(), ref)  # the max of exact values is exact
    torch.testing.assert_close(gx.float(), ref_gx, rtol=1e-2, atol=1e-2)
    cl = roi_pool(x.to(memory_format=torch.channels_last), rois.to(dtype), (3, 4), 0.5)
    assert torch.equal(cl, out)


def test_backward_is_deterministic_across_runs_and_threads():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 32, 40, 40, generator=g)
    # many overlapping RoIs, so cells collect gradient from several bins and RoIs
    rois = torch.cat([torch.randint(0, 2, (200, 1), generator=g).float(),
                      torch.rand(200, 2, generator=g) * 20,
                      20 + torch.rand(200, 2, generator=g) * 20], 1)
    grad = torch.randn(200, 32, 7, 7, generator=g)
    _, first = _pool_and_grad(roi_pool, x, rois, 7, 1.0, grad)
    _, second = _pool_and_grad(roi_pool, x, rois, 7, 1.0, grad)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        _, single = _pool_and_grad(roi_pool, x, rois, 7, 1.0, grad)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(first, second) and torch.equal(first, single)
    _, ref = _pool_and_grad(torchvision.ops.roi_pool, x, rois, 7, 1.0, grad)
    torch.testing.assert_close(first, ref)


def test_module_and_empty_rois():
    x = torch.randn(1, 3, 8, 8)
    pool = ROIPool((2, 3), 0.5)
    rois = torch.tensor([[0, 1.0, 2.0, 12.0, 14.0]])
    assert torch.equal(pool(x, rois), torchvision.ops.RoIPool((2, 3), 0.5)(x, rois))
    assert pool(x, torch.zeros(0, 5)).shape == (0, 3, 2, 3)
    out, argmax = ops.roi_pool(x, torch.zeros(0, 5), 0.5, 2, 3)
    assert out.shape == argmax.shape == (0, 3, 2, 3) and argmax.dtype == torch.int64
    grad_in = ops._roi_pool_backward(out, torch.zeros(0, 5), argmax, 0.5, 2, 3, 1, 3, 8, 8)
    assert grad_in.shape == (1, 3, 8, 8) and grad_in.abs().sum() == 0


def test_bad_rois_raise_with_the_row():
    x = torch.randn(2, 3, 10, 12)
    cases = [
        ([[0, 0, 0, 1, 1], [2, 0, 0, 1, 1]], r"rois\[1, 0\] \(batch index\) is 2; expected an integer in \[0, 2\)"),
        ([[0.5, 0, 0, 1, 1]], r"rois\[0, 0\] \(batch index\) is 0.5"),
        ([[-1, 0, 0, 1, 1]], r"rois\[0, 0\] \(batch index\) is -1"),
        ([[0, 0, float("nan"), 1, 1]], r"rois\[0, 2\] is nan; RoI coordinates must be finite"),
        ([[0, 0, 0, float("inf"), 1]], r"rois\[0, 3\] is inf"),
    ]
    for rows, message in cases:
        with pytest.raises(RuntimeError, match="segkit::roi_pool: " + message):
            roi_pool(x, torch.tensor(rows, dtype=torch.float32), 2)


@pytest.mark.parametrize("call, message", [
    (lambda x, r: ops.roi_pool(x, torch.zeros(3, 4), 1.0, 2, 2), r"rois must have shape \(K, 5\)"),
    (lambda x, r: ops.roi_pool(x, r.double(), 1.0, 2, 2), "input is Float but rois are Double"),
    (lambda x, r: ops.roi_pool(x[0], r, 1.0, 2, 2), r"input must have shape \(B, C, H, W\)"),
    (lambda x, r: ops.roi_pool(x, r, 1.0, 0, 2), "output size must be positive"),
    (lambda x, r: ops.roi_pool(x, r, float("nan"), 2, 2), "spatial_scale must be positive"),
    (lambda x, r: ops.roi_pool(x.int(), r.int(), 1.0, 2, 2), "input must be a floating tensor"),
])
def test_forward_bad_arguments(call, message):
    x = torch.randn(2, 3, 10, 12)
    rois = torch.tensor([[0, 1.0, 1, 5, 5]])
    with pytest.raises(RuntimeError, match="segkit::roi_pool: " + message):
        call(x, rois)


def test_backward_bad_arguments():
    x = torch.randn(2, 3, 10, 12)
    rois = torch.tensor([[0, 1.0, 1, 5, 5], [1, 0, 0, 9, 9]])
    out, argmax = ops.roi_pool(x, rois, 1.0, 2, 2)
    bwd = ops._roi_pool_backward
    cases = [
        (lambda: bwd(out, rois, argmax.int(), 1.0, 2, 2, 2, 3, 10, 12), "argmax must be int64"),
        (lambda: bwd(out, rois, argmax[:, :2], 1.0, 2, 2, 2, 3, 10, 12), "argmax must have the shape of grad"),
        (lambda: bwd(out[:, :2], rois, argmax, 1.0, 2, 2, 2, 3, 10, 12), r"grad must have shape \(K, C, PH, PW\)"),
        (lambda: bwd(out, rois, argmax + 1000, 1.0, 2, 2, 2, 3, 10, 12), r"argmax\[0, 0, 0, 0\] = \d+ is outside the 10x12 input plane"),
        (lambda: bwd(out, rois, argmax, 1.0, 2, 2, 1, 3, 10, 12), r"rois\[1, 0\] \(batch index\) is 1"),
    ]
    for call, message in cases:
        with pytest.raises(RuntimeError, match="segkit::_roi_pool_backward: " + message):
            call()
