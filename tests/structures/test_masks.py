"""BitMasks / PolygonMasks against pycocotools and against each other."""
import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch

from segkit.structures import (BitMasks, Boxes, PolygonMasks, pairwise_iou, polygons_to_bitmask,
                               rle_to_bitmask, xywh_to_xyxy)

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
    with pytest.raises(ValueError, match="differs"):
        rle_to_bitmask(compressed, 7, 5)


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
    torch.testing.assert_close(out.cpu(), ref, atol=1e-5, rtol=0)
    assert polys.crop_and_resize(boxes.cuda(), 14).device.type == "cuda"
