"""Boxes and pairwise overlaps, checked against torchvision.ops and hand-computed values."""
import math

import pytest
import torch
import torchvision

from segkit.structures import (Boxes, pairwise_intersection, pairwise_ioa, pairwise_iou,
                               xywh_to_xyxy, xyxy_to_xywh)


def _random_boxes(n, size=100.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * size
    wh = torch.rand(n, 2, generator=g) * size / 2 + 1
    return torch.cat([xy, xy + wh], dim=1)


def test_pairwise_iou_matches_torchvision():
    a, b = _random_boxes(17, seed=1), _random_boxes(9, seed=2)
    torch.testing.assert_close(pairwise_iou(Boxes(a), Boxes(b)), torchvision.ops.box_iou(a, b))


def test_pairwise_iou_hand_values():
    a = Boxes([[0, 0, 10, 10]])
    b = Boxes([[5, 5, 15, 15], [0, 0, 10, 10], [20, 20, 30, 30], [0, 0, 5, 10]])
    # overlap 5x5=25, union 100+100-25=175; identical; disjoint; half contained 50/100.
    torch.testing.assert_close(pairwise_iou(a, b), torch.tensor([[25 / 175, 1.0, 0.0, 0.5]]))
    torch.testing.assert_close(pairwise_intersection(a, b), torch.tensor([[25.0, 100.0, 0.0, 50.0]]))
    # ioa divides by the area of the second argument's boxes.
    torch.testing.assert_close(pairwise_ioa(a, b), torch.tensor([[0.25, 1.0, 0.0, 1.0]]))
    torch.testing.assert_close(pairwise_ioa(b, a), torch.tensor([[0.25], [1.0], [0.0], [0.5]]))


def test_zero_area_boxes_give_zero_not_nan():
    zero = Boxes([[3, 3, 3, 3], [5, 5, 5, 9]])
    other = Boxes([[3, 3, 3, 3], [0, 0, 10, 10]])
    iou = pairwise_iou(zero, other)
    ioa = pairwise_ioa(other, zero)
    assert not torch.isnan(iou).any() and not torch.isnan(ioa).any()
    assert (iou == 0).all() and (ioa == 0).all()


def test_empty_pairwise_shapes():
    e, b = Boxes(torch.empty(0, 4)), Boxes(_random_boxes(3))
    assert pairwise_iou(e, b).shape == (0, 3)
    assert pairwise_iou(b, e).shape == (3, 0)
    assert pairwise_ioa(e, e).shape == (0, 0)


def test_boxes_construction_and_indexing():
    boxes = Boxes(torch.tensor([[0, 0, 4, 2], [1, 1, 3, 5], [2, 2, 2, 8]]))
    assert boxes.tensor.dtype == torch.float32 and len(boxes) == 3
    assert Boxes([]).tensor.shape == (0, 4)
    assert Boxes(torch.empty(0)).tensor.shape == (0, 4)
    assert boxes[1].tensor.tolist() == [[1, 1, 3, 5]]
    assert boxes[-1].tensor.tolist() == [[2, 2, 2, 8]]
    assert boxes[1:].tensor.shape == (2, 4)
    assert boxes[torch.tensor([True, False, True])].tensor[:, 0].tolist() == [0, 2]
    assert boxes[torch.tensor([2, 0])].tensor[:, 0].tolist() == [2, 0]
    assert boxes[torch.zeros(3, dtype=torch.bool)].tensor.shape == (0, 4)
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        Boxes(torch.zeros(3, 5))


def test_boxes_geometry():
    boxes = Boxes([[0, 0, 4, 2], [1, 1, 3, 5], [2, 2, 2, 8]])
    assert boxes.area().tolist() == [8, 8, 0]
    assert boxes.centers().tolist() == [[2, 1], [2, 3], [2, 5]]
    assert boxes.nonempty().tolist() == [True, True, False]
    assert boxes.nonempty(threshold=2.5).tolist() == [False, False, False]
    assert boxes.scale(2.0, 0.5) is boxes
    assert boxes.tensor.tolist() == [[0, 0, 8, 1], [2, 0.5, 6, 2.5], [4, 1, 4, 4]]


def test_clip_in_place_and_rejects_nan():
    boxes = Boxes([[-5, -1, 50, 7], [3, 4, 5, 6]])
    assert boxes.clip((6, 20)) is boxes  # (h, w)
    assert boxes.tensor.tolist() == [[0, 0, 20, 6], [3, 4, 5, 6]]
    with pytest.raises(ValueError, match="inf or nan"):
        Boxes([[0, 0, math.nan, 1]]).clip((10, 10))


def test_cat_clone_to():
    a, b = Boxes([[0, 0, 1, 1]]), Boxes([[1, 1, 2, 2], [2, 2, 3, 3]])
    c = Boxes.cat([a, b])
    assert len(c) == 3 and c.tensor[2].tolist() == [2, 2, 3, 3]
    assert len(Boxes.cat([])) == 0
    d = c.clone()
    d.tensor[0, 0] = 7
    assert c.tensor[0, 0] == 0
    assert c.to("cpu").device.type == "cpu"
    assert c.to(torch.float64).tensor.dtype == torch.float64


def test_xywh_conversion():
    xywh = torch.tensor([[10.0, 20.0, 5.0, 7.0]])
    assert xywh_to_xyxy(xywh).tolist() == [[10, 20, 15, 27]]
    torch.testing.assert_close(xyxy_to_xywh(xywh_to_xyxy(xywh)), xywh)
    torch.testing.assert_close(xywh_to_xyxy(xywh), torchvision.ops.box_convert(xywh, "xywh", "xyxy"))
