"""BitMasks / PolygonMasks against pycocotools and against each other."""
import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch

from segkit.layers import crop_masks, roi_align
from segkit.structures import (BitMasks, Boxes, PolygonMasks, pairwise_iou, polygons_to_bitmask,
                               rle_to_bitmask, rles_to_bitmasks, xywh_to_xyxy)

H, W = 64, 80


def _circle(cx, cy, r, k=24):
    t = np.linspace(0, 2 * np.pi, k, endpoint=False)
    return np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], 1).reshape(-1)


SHAPES = [
    [np.array([10.0, 12.0, 40.0, 12.0, 40.0, 30.0, 10.0, 30.0])],            # rectangle
    [np.array([5.0, 50.0, 30.0, 8.0, 55.0, 50.0])],                          # triangle
    [np.array([20.0, 10, 60, 10, 60, 20, 32, 20, 32, 55, 20, 55])],         # L shape
    [_circle(50, 35, 14), np.array([5.0, 5.0, 15.0, 5.0, 15.0, 15.0])],     # two parts
]


def _coco_mask(polys):
    rle = mask_util.merge(mask_util.frPyObjects([p.tolist() for p in polys], H, W))
    return mask_util.decode(rle).astype(bool)


def test_polygons_to_bitmask_matches_pycocotools():
    for polys in SHAPES:
        mask = polygons_to_bitmask(polys, H, W)
        assert mask.dtype == torch.bool and mask.shape == (H, W)
        assert np.array_equal(mask.numpy(), _coco_mask(polys))
    assert not polygons_to_bitmask([], H, W).any()


def test_area_matches_pycocotools():
    bit = BitMasks.from_polygon_masks(PolygonMasks(SHAPES), H, W)
    rles = mask_util.encode(np.asfortranarray(bit.tensor.numpy().transpose(1, 2, 0).astype(np.uint8)))
    assert bit.area().tolist() == mask_util.area(rles).tolist()
    poly_area = PolygonMasks(SHAPES).area()
    assert poly_area[0] == 30 * 18 and poly_area[1] == pytest.approx(0.5 * 50 * 42)
    # Geometric vs rasterised area: differ by at most about half the perimeter in pixels.
    for polys, a_poly, a_bit in zip(SHAPES, poly_area.tolist(), bit.area().tolist()):
        closed = [np.vstack([p.reshape(-1, 2), p[:2]]) for p in polys]
        perimeter = sum(np.linalg.norm(np.diff(c, axis=0), axis=1).sum() for c in closed)
        assert abs(a_poly - a_bit) <= 0.5 * perimeter, (a_poly, a_bit)


def test_bounding_boxes():
    mask = torch.zeros(2, 10, 12, dtype=torch.bool)
    mask[0, 2:5, 3:8] = True  # rows 2..4, cols 3..7
    boxes = BitMasks(mask).get_bounding_boxes()
    assert boxes.tensor.tolist() == [[3, 2, 8, 5], [0, 0, 0, 0]]
    # Same as pycocotools' pixel-extent boxes (XYWH) for real shapes.
    bit = BitMasks.from_polygon_masks(SHAPES, H, W)
    rles = mask_util.encode(np.asfortranarray(bit.tensor.numpy().transpose(1, 2, 0).astype(np.uint8)))
    ref = xywh_to_xyxy(torch.tensor(mask_util.toBbox(rles), dtype=torch.float32))
    torch.testing.assert_close(bit.get_bounding_boxes().tensor, ref)
    poly_boxes = PolygonMasks(SHAPES).get_bounding_boxes().tensor
    assert poly_boxes[0].tolist() == [10, 12, 40, 30] and poly_boxes[3, :2].tolist() == [5, 5]


def _mask_iou(a, b):
    a, b = a.bool(), b.bool()
    return (a & b).sum().item() / max((a | b).sum().item(), 1)


def test_crop_and_resize_bitmask_and_polygon_agree():
    """Rasterise-then-RoIAlign and crop-then-rasterise give the same mask target (IoU > 0.9)."""
    polys = PolygonMasks(SHAPES)
    bit = BitMasks.from_polygon_masks(polys, H, W)
    tight = polys.get_bounding_boxes().tensor
    for boxes in (tight, tight + torch.tensor([-3.0, -2.0, 4.0, 3.5]), tight + torch.tensor([4.0, 3.0, 4.0, 3.0])):
        a = bit.crop_and_resize(boxes, 28)
        b = polys.crop_and_resize(boxes, 28)
        assert a.shape == b.shape == (4, 28, 28) and a.dtype == b.dtype == torch.float32
        assert 0 <= a.min() and a.max() <= 1
        for i in range(4):
            assert _mask_iou(a[i] >= 0.5, b[i] >= 0.5) > 0.9, (i, boxes[i])


def _full_roi_align(masks, boxes, m):
    """Reference: aligned RoIAlign over the whole float masks, one roi per mask."""
    rois = torch.cat([torch.arange(len(boxes), dtype=torch.float32)[:, None], boxes], dim=1)
    return roi_align(masks[:, None].float(), rois, (m, m), 1.0, 0, True)[:, 0]


def test_bitmask_targets_are_the_thresholded_roi_align():
    g = torch.Generator().manual_seed(0)
    masks = torch.rand(12, 9, 12, generator=g)
    masks = torch.nn.functional.interpolate(masks[:, None], size=(H, W), mode="bilinear")[:, 0] > 0.5
    xy = torch.rand(12, 2, generator=g) * torch.tensor([W - 10.0, H - 10.0])
    boxes = torch.cat([xy, xy + torch.rand(12, 2, generator=g) * 40 + 2], dim=1)
    ref = _full_roi_align(masks, boxes, 14)
    hard = BitMasks(masks).crop_and_resize(Boxes(boxes), 14)
    clear = (ref - 0.5).abs() > 1e-4  # float rounding may tip values that sit at 0.5
    assert clear.float().mean() > 0.9
    assert torch.equal(hard[clear], (ref >= 0.5).float()[clear])
    assert set(hard.unique().tolist()) == {0.0, 1.0}


def test_crop_and_resize_targets_are_binary_for_both_types():
    """A batch may mix PolygonMasks and BitMasks (an image with RLE masks gives BitMasks): both
    give 0/1 targets, so the mask loss sees the same kind of target whatever the type."""
    polys = PolygonMasks(SHAPES)
    bit = BitMasks.from_polygon_masks(polys, H, W)
    boxes = polys.get_bounding_boxes().tensor + torch.tensor([-2.3, -1.7, 3.1, 2.9])
    for masks in (polys, bit):
        out = masks.crop_and_resize(boxes, 28)
        assert out.dtype == torch.float32 and set(out.unique().tolist()) == {0.0, 1.0}
    soft = _full_roi_align(bit.tensor, boxes, 28)
    assert ((soft > 0) & (soft < 1)).any()  # the binarisation is not a no-op on these shapes


def test_crop_and_resize_with_mask_indices_equals_indexing_first():
    """mask_indices (the GT matched to each RoI) gives what indexing the masks first gives,
    without the full-size copies."""
    polys = PolygonMasks(SHAPES)
    bit = BitMasks.from_polygon_masks(polys, H, W)
    idx = torch.tensor([2, 0, 2, 3, 3, 1, 0])
    boxes = polys.get_bounding_boxes().tensor[idx] + torch.randn(7, 4, generator=torch.Generator(
    ).manual_seed(0))
    for masks in (polys, bit):
        out = masks.crop_and_resize(boxes, 14, mask_indices=idx)
        assert out.shape == (7, 14, 14)
        assert torch.equal(out, masks[idx].crop_and_resize(boxes, 14))
        with pytest.raises(ValueError, match=r"boxes must have shape \(7, 4\) XYXY, one per "
                                             r"mask index, got \(4, 4\)"):
            masks.crop_and_resize(boxes[:4], 14, mask_indices=idx)
        with pytest.raises(ValueError, match="mask_indices must be a .* into the 4 masks"):
            masks.crop_and_resize(boxes[:1], 14, mask_indices=torch.tensor([4]))
    assert bit.crop_and_resize(torch.zeros(0, 4), 14, mask_indices=idx[:0]).shape == (0, 14, 14)


def test_crop_and_resize_hand_case():
    mask = torch.zeros(1, 20, 20, dtype=torch.bool)
    mask[0, 4:12, 4:8] = True  # left half of the box [4, 4, 12, 12]
    out = BitMasks(mask).crop_and_resize(torch.tensor([[4.0, 4.0, 12.0, 12.0]]), 4)
    torch.testing.assert_close(out[0], torch.tensor([[1.0, 1, 0, 0]]).repeat(4, 1))
    poly = PolygonMasks([[np.array([4.0, 4, 8, 4, 8, 12, 4, 12])]])
    torch.testing.assert_close(poly.crop_and_resize(torch.tensor([[4.0, 4.0, 12.0, 12.0]]), 4), out)


def test_empty_masks():
    for masks in (BitMasks(torch.zeros(0, H, W, dtype=torch.bool)), PolygonMasks([])):
        assert masks.crop_and_resize(torch.zeros(0, 4), 14).shape == (0, 14, 14)
        assert masks.area().shape == (0,)
        assert masks.get_bounding_boxes().tensor.shape == (0, 4)
        assert len(masks[torch.zeros(0, dtype=torch.long)]) == 0
    assert BitMasks.from_polygon_masks([], H, W).tensor.shape == (0, H, W)


def test_indexing_and_cat():
    polys = PolygonMasks(SHAPES)
    bit = BitMasks.from_polygon_masks(polys, H, W)
    sel = torch.tensor([True, False, True, False])
    for masks in (polys, bit):
        assert len(masks[1]) == 1 and len(masks[1:3]) == 2
        assert len(masks[sel]) == 2 and len(masks[torch.tensor([3, 0, 0])]) == 3
        assert len(type(masks).cat([masks, masks[sel]])) == 6
    assert polys[sel].polygons[1][0].tolist() == SHAPES[2][0].tolist()
    assert torch.equal(bit[torch.tensor([3, 0])].tensor, bit.tensor[[3, 0]])
    assert polys.polygons[0][0].dtype == np.float64


def test_polygon_validation():
    with pytest.raises(ValueError, match="instance 0 polygon 1 has 5 coordinates"):
        PolygonMasks([[[0, 0, 1, 0, 1, 1], [0, 0, 1, 1, 2]]])
    with pytest.raises(TypeError, match="instance 0 must be a list"):
        PolygonMasks([np.zeros(6)])
    # pycocotools would rasterise a 4-number "polygon" as an XYWH box
    with pytest.raises(ValueError, match="polygon 0 has 4 coordinates"):
        polygons_to_bitmask([[1.0, 1.0, 5.0, 5.0]], 10, 10)
    with pytest.raises(ValueError, match="polygon 1 has 7 coordinates"):
        polygons_to_bitmask([[1.0, 1, 5, 1, 5, 5], [1.0, 1, 5, 1, 5, 5, 2]], 10, 10)


def test_cat_rejects_mixed_types_and_sizes():
    polys = PolygonMasks(SHAPES)
    bit = BitMasks.from_polygon_masks(polys, H, W)
    with pytest.raises(TypeError, match=r"BitMasks.cat: every element must be BitMasks, got "
                                        r"PolygonMasks.*from_polygon_masks"):
        BitMasks.cat([bit, polys])
    with pytest.raises(TypeError, match="PolygonMasks.cat: every element must be PolygonMasks"):
        PolygonMasks.cat([polys, bit])
    with pytest.raises(ValueError, match=r"different image sizes \[\(32, 40\), \(64, 80\)\]"):
        BitMasks.cat([bit, BitMasks(torch.zeros(1, 32, 40, dtype=torch.bool))])
    assert len(PolygonMasks.cat([])) == 0


def test_rle_decoding():
    mask = np.zeros((6, 5), dtype=np.uint8)
    mask[1:4, 2:5] = 1
    compressed = mask_util.encode(np.asfortranarray(mask))
    assert np.array_equal(rle_to_bitmask(compressed).numpy(), mask.astype(bool))
    as_str = {"size": compressed["size"], "counts": compressed["counts"].decode("ascii")}
    assert np.array_equal(rle_to_bitmask(as_str, 6, 5).numpy(), mask.astype(bool))
    # Uncompressed RLE (COCO iscrowd format): run lengths in column-major order, zeros first.
    flat = mask.flatten(order="F")
    changes = np.flatnonzero(np.diff(flat)) + 1
    counts = np.diff(np.concatenate([[0], changes, [flat.size]])).tolist()
    assert flat[0] == 0
    uncompressed = {"size": [6, 5], "counts": counts}
    assert np.array_equal(rle_to_bitmask(uncompressed).numpy(), mask.astype(bool))
    both = BitMasks.from_rles([compressed, uncompressed], 6, 5)
    assert both.tensor.shape == (2, 6, 5) and both.area().tolist() == [9, 9]
    assert both.tensor.is_contiguous() and torch.equal(both.tensor[1], torch.from_numpy(mask > 0))
    many = rles_to_bitmasks([as_str, uncompressed, compressed], 6, 5)
    assert many.dtype == torch.bool and torch.equal(many, torch.from_numpy(mask > 0).expand(3, 6, 5))
    assert rles_to_bitmasks([], 6, 5).shape == (0, 6, 5)
    with pytest.raises(ValueError, match="differs"):
        rle_to_bitmask(compressed, 7, 5)
    with pytest.raises(ValueError, match=r"rles_to_bitmasks: RLE size \[6, 5\] differs"):
        rles_to_bitmasks([compressed], 5, 6)


def test_bitmask_boxes_iou_with_polygon_boxes():
    """Pixel-extent boxes of the rasterised masks stay within a pixel of the polygon extents."""
    polys = PolygonMasks(SHAPES)
    bit = BitMasks.from_polygon_masks(polys, H, W)
    iou = pairwise_iou(bit.get_bounding_boxes(), polys.get_bounding_boxes()).diag()
    assert (iou > 0.85).all()
    assert ((bit.get_bounding_boxes().tensor - polys.get_bounding_boxes().tensor).abs() <= 1.0).all()
    assert isinstance(bit.get_bounding_boxes(), Boxes)


@pytest.mark.gpu
def test_crop_and_resize_on_cuda():
    polys = PolygonMasks(SHAPES)
    bit = BitMasks.from_polygon_masks(polys, H, W)
    boxes = polys.get_bounding_boxes().tensor
    ref = bit.crop_and_resize(boxes, 14)
    out = bit.to("cuda").crop_and_resize(boxes.cuda(), 14)
    assert out.device.type == "cuda"
    # the soft RoIAlign values agree; the 0/1 targets may differ only where they sit at 0.5
    soft = crop_masks(bit.tensor.cuda(), boxes.cuda(), 14)
    torch.testing.assert_close(soft.cpu(), crop_masks(bit.tensor, boxes, 14), atol=1e-5, rtol=0)
    tie = (soft.cpu() - 0.5).abs() <= 1e-5
    assert torch.equal(out.cpu()[~tie], ref[~tie])
    assert polys.crop_and_resize(boxes.cuda(), 14).device.type == "cuda"
