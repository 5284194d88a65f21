"""paste_masks_in_image: hand cases, torchvision reference, empty and degenerate inputs."""
import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.models.detection.roi_heads import paste_masks_in_image as tv_paste

from segkit.layers import crop_masks, mask_ops, paste_masks_in_image, roi_align


def _smooth_masks(n, m=28, seed=0):
    """Blob-like probabilities: upsampled coarse noise through a sigmoid."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(n, 1, 5, 5, generator=g) * 4
    return torch.sigmoid(F.interpolate(coarse, size=(m, m), mode="bilinear", align_corners=False))[:, 0]


def _random_boxes(n, h, w, seed=0, min_size=6.0):
    """Boxes with sides in [min_size, min_size + half the image side], partly beyond the border."""
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * torch.tensor([w * 0.8, h * 0.8])
    wh = torch.rand(n, 2, generator=g) * torch.tensor([w * 0.5, h * 0.5]) + min_size
    return torch.cat([xy, xy + wh], 1)


def test_ones_mask_gives_exactly_box_pixels():
    boxes = torch.tensor([[2.0, 3.0, 7.0, 9.0], [0.0, 0.0, 12.0, 1.0], [10.0, 8.0, 30.0, 40.0]])
    out = paste_masks_in_image(torch.ones(3, 28, 28), boxes, (12, 14))
    assert out.shape == (3, 12, 14) and out.dtype == torch.bool
    for mask, (x1, y1, x2, y2) in zip(out, boxes.long().tolist()):
        expected = torch.zeros(12, 14, dtype=torch.bool)
        expected[y1:y2, x1:x2] = True  # the last box is clipped by the image border
        assert torch.equal(mask, expected)


def test_threshold_and_half_mask():
    mask = torch.zeros(1, 4, 4)
    mask[0, :, :2] = 1.0  # left half
    out = paste_masks_in_image(mask, torch.tensor([[0.0, 0.0, 8.0, 8.0]]), (8, 8))
    assert out[0].sum() == 32 and out[0, :, :4].all()
    assert not paste_masks_in_image(mask * 0.4, torch.tensor([[0.0, 0.0, 8.0, 8.0]]), (8, 8)).any()


def test_agrees_with_torchvision():
    """Compare with torchvision's paste binarised at 0.5.

    Tolerance: over the pixels inside the union of all boxes, >= 99% agree; inside each mask's
    own box, >= 90% agree (a transposed mask scores ~90% and ~40% on these two measures). The two differ only at mask edges: torchvision truncates each box to
    integers and resizes a one-pixel-padded mask to ``int(x2) - int(x1) + 1`` pixels (a shift of
    up to one pixel), while we sample the mask at every pixel centre.
    """
    h, w = 128, 160
    masks, boxes = _smooth_masks(12), _random_boxes(12, h, w, min_size=32.0)
    ours = paste_masks_in_image(masks, boxes, (h, w))
    ref = tv_paste(masks[:, None], boxes, (h, w))[:, 0] >= 0.5
    union = torch.zeros(h, w, dtype=torch.bool)
    for i, (x1, y1, x2, y2) in enumerate(boxes.tolist()):
        own = (slice(int(y1), int(y2) + 1), slice(int(x1), int(x2) + 1))
        union[own] = True
        assert (ours[i][own] == ref[i][own]).float().mean() >= 0.90, i
    agree = (ours == ref)[:, union].float().mean().item()
    assert agree >= 0.99, agree
    assert ours.any(dim=(1, 2)).all()


def test_interior_matches_bilinear_resize_for_integer_boxes():
    """For integer boxes, away from the ring of pixels within half a mask cell of the box border
    (where the mask is blended with zero padding), pasting equals resizing the mask to the box size with
    ``F.interpolate(mode="bilinear", align_corners=False)``, an independent reference."""
    h, w = 96, 112
    masks = _smooth_masks(6, seed=7)
    boxes = torch.tensor([[10, 12, 60, 70], [0, 0, 40, 30], [50, 40, 111, 95],
                          [30, 20, 58, 48], [5, 60, 100, 90], [70, 5, 90, 80]], dtype=torch.float32)
    out = paste_masks_in_image(masks, boxes, (h, w))
    for i, (x1, y1, x2, y2) in enumerate(boxes.long().tolist()):
        resized = F.interpolate(masks[i][None, None], size=(y2 - y1, x2 - x1), mode="bilinear",
                                align_corners=False)[0, 0] >= 0.5
        # Border ring: pixel centres within half a mask cell of the box edge.
        rx, ry = math.ceil(0.5 * (x2 - x1) / 28), math.ceil(0.5 * (y2 - y1) / 28)
        assert torch.equal(out[i, y1 + ry:y2 - ry, x1 + rx:x2 - rx], resized[ry:-ry, rx:-rx]), i
        outside = out[i].clone()
        outside[y1:y2, x1:x2] = False
        assert not outside.any()


def test_chunking_does_not_change_result(monkeypatch):
    h, w = 64, 80
    masks, boxes = _smooth_masks(12, seed=3), _random_boxes(12, h, w, seed=3)
    ref = paste_masks_in_image(masks, boxes, (h, w), 0.3)  # compiled kernel, one box at a time
    assert torch.equal(mask_ops._paste_grid_sample(masks, boxes, (h, w), 0.3), ref)
    monkeypatch.setattr(mask_ops, "_PIXEL_BUDGET", 500)  # forces one mask per chunk
    assert len(mask_ops._chunks(mask_ops._pixel_extents(boxes, h, w))) == 12
    assert torch.equal(mask_ops._paste_grid_sample(masks, boxes, (h, w), 0.3), ref)


def test_chunks_budget_and_waste():
    """Groups are consecutive, cover every item once, and respect both limits."""
    extents = torch.tensor([[0, 0, 10, 10], [2, 2, 12, 12], [100, 100, 110, 110],
                            [101, 99, 111, 109], [0, 0, 0, 0]])
    # 5 x 111 x 110 pixels fit the default budget: one group
    assert mask_ops._chunks(extents) == [(0, 5, [0, 0, 111, 110])]
    # max_waste=2: items 0+1 cost 2 x 144 <= 2 x 200; adding item 2 would cost 3 x 110 x 110
    assert mask_ops._chunks(extents, max_waste=2.0) == [
        (0, 2, [0, 0, 12, 12]), (2, 4, [100, 99, 111, 110]), (4, 5, [0, 0, 0, 0])]
    # a budget of 150 pixels holds one 10 x 10 item but not two
    assert [g[:2] for g in mask_ops._chunks(extents, budget=150)] == [
        (0, 1), (1, 2), (2, 3), (3, 4), (4, 5)]


def test_crop_masks_equals_full_image_roi_align(monkeypatch):
    """Cropping each group of boxes to its region changes nothing, boxes beyond the image
    border (where RoIAlign clamps or reads zeros), inverted and tiny boxes included."""
    g = torch.Generator().manual_seed(0)
    h, w = 90, 120
    masks = F.interpolate(torch.rand(40, 1, 6, 8, generator=g), size=(h, w), mode="bilinear")
    masks = masks[:, 0] > 0.5
    masks[1:5] = True  # full masks, so that the out-of-image boxes below test the borders
    xy = torch.rand(40, 2, generator=g) * torch.tensor([w + 20.0, h + 20.0]) - 10
    boxes = torch.cat([xy, xy + torch.rand(40, 2, generator=g) * 60 + 0.3], dim=1)
    boxes[0] = torch.tensor([50.0, 40.0, 20.0, 10.0])       # inverted
    boxes[1] = torch.tensor([-30.0, -20.0, -2.4, -1.0])     # entirely left of / above the image
    boxes[2] = torch.tensor([w - 0.4, 10.0, w + 9.0, 30.0])  # first samples clamp to column w-1
    boxes[3] = torch.tensor([w + 0.3, 10.0, w + 9.0, 30.0])  # every sample beyond the border
    boxes[4] = torch.tensor([-0.2, h - 3.0, 15.0, h + 4.0])  # straddles two borders
    rois = torch.cat([torch.arange(40, dtype=torch.float32)[:, None], boxes], dim=1)
    ref = roi_align(masks[:, None].float(), rois, (14, 14), 1.0, 0, True)[:, 0]
    # the border cases are live: RoIAlign clamps in (-1, 0] and [w - 1, w], zero beyond
    assert ref[1].sum() == 0 and ref[2, :, 0].min() == 1 and ref[2, :, 1:].sum() == 0
    assert ref[3].sum() == 0 and 0 < ref[4].mean() < 1
    for waste in (2.0, 1.0, float("inf")):  # default, about one group per box, one group
        monkeypatch.setattr(mask_ops, "_CROP_MAX_WASTE", waste)
        torch.testing.assert_close(crop_masks(masks, boxes, 14), ref, atol=1e-5, rtol=0)
    assert crop_masks(masks[:0], boxes[:0], 14).shape == (0, 14, 14)


def test_empty_degenerate_and_outside_boxes():
    assert paste_masks_in_image(torch.zeros(0, 28, 28), torch.zeros(0, 4), (20, 30)).shape == (0, 20, 30)
    boxes = torch.tensor([[5.0, 5.0, 5.0, 9.0], [40.0, 40.0, 50.0, 50.0], [-10.0, -10.0, 3.0, 2.0]])
    out = paste_masks_in_image(torch.ones(3, 1, 14, 14), boxes, (20, 30))
    assert not out[0].any() and not out[1].any()
    assert out[2].sum() == 3 * 2 and out[2, :2, :3].all()
    with pytest.raises(ValueError, match=r"boxes must have shape \(3, 4\)"):
        paste_masks_in_image(torch.ones(3, 14, 14), torch.zeros(2, 4), (20, 30))


@pytest.mark.slow
def test_full_size_image_many_masks():
    """100 masks at 800 x 1333 (COCO test size) paste in bounded chunks."""
    h, w = 800, 1333
    masks, boxes = _smooth_masks(100, seed=5), _random_boxes(100, h, w, seed=5)
    out = paste_masks_in_image(masks, boxes, (h, w))
    assert out.shape == (100, h, w)
    extents = mask_ops._pixel_extents(boxes, h, w)
    for start, end, (x0, y0, x1, y1) in mask_ops._chunks(extents):
        assert (end - start) * (x1 - x0) * (y1 - y0) <= mask_ops._PIXEL_BUDGET or end - start == 1
    x1, y1, x2, y2 = extents[0].tolist()
    outside = out[0].clone()
    outside[y1:y2, x1:x2] = False
    assert not outside.any()


@pytest.mark.gpu
def test_cuda_matches_cpu():
    h, w = 64, 80
    masks, boxes = _smooth_masks(8, seed=9), _random_boxes(8, h, w, seed=9)
    ref = paste_masks_in_image(masks, boxes, (h, w))
    out = paste_masks_in_image(masks.cuda(), boxes.cuda(), (h, w))
    assert out.device.type == "cuda"
    # Allow a handful of pixels whose value sits within float rounding of the threshold.
    assert (out.cpu() != ref).sum() <= 5
