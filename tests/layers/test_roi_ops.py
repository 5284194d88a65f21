"""RoIAlign / NMS wrappers: hand values, torchvision references, empty inputs, dispatch table."""
import pytest
import torch
import torchvision

from segkit.layers import ROIAlign, batched_nms, get_backend, nms, register_backend, roi_align
from segkit.layers import ops as ops_module


def test_roi_align_on_linear_ramp_hand_values():
    """On f(x, y) = x (pixel centres at i + 0.5), aligned RoIAlign returns each bin's centre x."""
    feat = (torch.arange(16, dtype=torch.float32) + 0.5).repeat(1, 1, 16, 1)  # (1, 1, 16, 16)
    rois = torch.tensor([[0, 2.0, 3.0, 10.0, 7.0]])
    out = roi_align(feat, rois, (2, 4), spatial_scale=1.0, sampling_ratio=2, aligned=True)
    expected = torch.tensor([3.0, 5.0, 7.0, 9.0]).repeat(2, 1)
    torch.testing.assert_close(out[0, 0], expected)
    # Module form, stride-2 feature map: scale 1/2 maps the same image box onto it.
    small = (torch.arange(8, dtype=torch.float32) + 0.5).repeat(1, 1, 8, 1) * 2
    torch.testing.assert_close(ROIAlign((2, 4), 0.5, 2)(small, rois)[0, 0], expected)


def test_roi_align_matches_torchvision_and_batches():
    g = torch.Generator().manual_seed(0)
    feat = torch.rand(2, 3, 12, 14, generator=g)
    rois = torch.tensor([[1, 1.5, 2.0, 9.0, 11.0], [0, 0.0, 0.0, 13.0, 11.0]])
    for aligned in (True, False):
        ref = torchvision.ops.roi_align(feat, rois, (5, 5), 1.0, 0, aligned)
        torch.testing.assert_close(roi_align(feat, rois, 5, 1.0, 0, aligned), ref)


def test_roi_align_empty_and_bad_shape():
    out = roi_align(torch.rand(1, 4, 8, 8), torch.zeros(0, 5), 7, 0.25)
    assert out.shape == (0, 4, 7, 7)
    with pytest.raises(ValueError, match=r"\(K, 5\)"):
        roi_align(torch.rand(1, 4, 8, 8), torch.zeros(3, 4), 7)


def test_nms_hand_case():
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 10, 9.0]])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.95])
    # IoU(3, 0) = 0.9 and IoU(3, 1) ~= 0.63: box 3 suppresses both at 0.5.
    assert nms(boxes, scores, 0.5).tolist() == [3, 2]
    assert nms(boxes, scores, 0.95).tolist() == [3, 0, 1, 2]
    assert nms(torch.zeros(0, 4), torch.zeros(0), 0.5).shape == (0,)


def test_batched_nms_keeps_other_classes():
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [0, 0, 10, 10.0]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    idxs = torch.tensor([0, 0, 1])
    assert batched_nms(boxes, scores, idxs, 0.5).tolist() == [0, 2]
    ref = torchvision.ops.batched_nms(boxes, scores, idxs, 0.5)
    assert torch.equal(batched_nms(boxes, scores, idxs, 0.5), ref)
    empty = batched_nms(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long), 0.5)
    assert empty.shape == (0,) and empty.dtype == torch.int64
    with pytest.raises(ValueError, match="scores must have shape"):
        nms(boxes, scores[:2], 0.5)


def test_backend_dispatch(monkeypatch):
    monkeypatch.setattr(ops_module, "_BACKEND", dict(ops_module._BACKEND))
    calls = []

    def fake_nms(boxes, scores, iou):
        calls.append(iou)
        return torch.tensor([0])

    register_backend("nms", fake_nms, "fake")
    assert get_backend()["nms"] == "fake" and get_backend()["roi_align"] == "segkit._C"
    assert nms(torch.tensor([[0, 0, 1, 1.0]]), torch.tensor([1.0]), 0.3).tolist() == [0]
    assert calls == [0.3]
    with pytest.raises(KeyError, match="unknown op 'deform_conv'"):
        register_backend("deform_conv", fake_nms, "fake")


@pytest.mark.gpu
def test_ops_on_cuda_match_cpu():
    g = torch.Generator().manual_seed(1)
    feat = torch.rand(1, 2, 16, 16, generator=g)
    rois = torch.tensor([[0, 1.0, 2.0, 12.0, 9.5]])
    torch.testing.assert_close(roi_align(feat.cuda(), rois.cuda(), 4).cpu(), roi_align(feat, rois, 4))
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30.0]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    assert nms(boxes.cuda(), scores.cuda(), 0.5).tolist() == [0, 2]
    empty = nms(torch.zeros(0, 4, device="cuda"), torch.zeros(0, device="cuda"), 0.5)
    assert empty.device.type == "cuda" and empty.shape == (0,)
