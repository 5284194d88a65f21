"""Visualizer: mask blending where (and only where) the mask is, boxes, side-by-side layout."""
import numpy as np
import pytest
import torch
from PIL import Image

from segkit.structures import BitMasks, Boxes, Instances, PolygonMasks
from segkit.utils.visualizer import (
    TITLE_HEIGHT, class_color, draw_gt_and_predictions, draw_instances, save_png,
)

# pycocotools' Cython decode trips numpy 2's __array__(copy=) deprecation; not ours
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

H, W = 40, 56
NAMES = ["dog", "cat"]


def _image():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(H, W, 3), dtype=np.uint8)


def _pred(scores=(0.9, 0.3)):
    masks = torch.zeros(2, H, W, dtype=torch.bool)
    masks[0, 5:15, 4:20] = True
    masks[1, 20:35, 30:50] = True
    boxes = Boxes(torch.tensor([[4., 5., 20., 15.], [30., 20., 50., 35.]]))
    return Instances((H, W), pred_boxes=boxes,
                     scores=torch.tensor(scores), pred_classes=torch.tensor([1, 0]),
                     pred_masks=masks)


def test_mask_changes_only_pixels_inside_and_blends_with_class_colour():
    img = _image()
    pred = _pred()
    out = draw_instances(img, pred, NAMES, show_boxes=False, alpha=0.5)
    assert out.shape == img.shape and out.dtype == np.uint8
    assert img is not out and np.array_equal(img, _image())  # input untouched
    union = pred.pred_masks.any(0).numpy()
    assert np.array_equal(out[~union], img[~union])
    inside = pred.pred_masks[0].numpy()
    expected = 0.5 * img[inside].astype(float) + 0.5 * np.array(class_color(1), dtype=float)
    assert np.abs(out[inside].astype(float) - expected).max() <= 1.0  # uint8 rounding
    assert (out[inside] != img[inside]).any(axis=1).mean() > 0.95


def test_score_threshold_drops_low_scores():
    img = _image()
    pred = _pred(scores=(0.9, 0.3))
    out = draw_instances(img, pred, NAMES, score_thresh=0.5, show_boxes=False)
    second = pred.pred_masks[1].numpy()
    assert np.array_equal(out[second], img[second])  # score 0.3 < 0.5: not drawn
    assert not np.array_equal(out[pred.pred_masks[0].numpy()], img[pred.pred_masks[0].numpy()])


def test_boxes_draw_outline_in_class_colour():
    img = np.zeros((H, W, 3), dtype=np.uint8)
    out = draw_instances(img, _pred(), NAMES, show_masks=False, show_labels=False, box_width=1)
    assert tuple(out[10, 4]) == class_color(1)  # left edge of box 0 (class "cat")
    assert tuple(out[25, 50]) == class_color(0)  # right edge of box 1
    assert (out[7:13, 7:17] == 0).all()  # box interior untouched (fill off)
    with_labels = draw_instances(img, _pred(), NAMES, show_masks=False)
    assert (with_labels != out).any()  # the "cat 0.90" label adds pixels


def test_class_colours_are_deterministic_and_distinct():
    cols = [class_color(i) for i in range(80)]
    assert cols == [class_color(i) for i in range(80)]
    assert len(set(cols)) == 80


def test_polygon_gt_and_empty_instances():
    img = _image()
    poly = PolygonMasks([[np.array([4., 5., 20., 5., 20., 15., 4., 15.])]])
    gt = Instances((H, W), gt_boxes=Boxes(torch.tensor([[4., 5., 20., 15.]])),
                   gt_classes=torch.tensor([0]), gt_masks=poly)
    out = draw_instances(img, gt, NAMES, show_boxes=False)
    raster = BitMasks.from_polygon_masks(poly, H, W).tensor[0].numpy()
    assert np.array_equal(out[~raster], img[~raster]) and (out[raster] != img[raster]).any()
    assert np.array_equal(draw_instances(img, Instances((H, W)), NAMES), img)


def test_side_by_side_layout_and_titles():
    img = _image()
    anns = [{"bbox": [4, 5, 16, 10], "bbox_mode": "xywh", "category_id": 1, "iscrowd": 0,
             "segmentation": [[4, 5, 20, 5, 20, 15, 4, 15]]}]
    out = draw_gt_and_predictions(img, anns, _pred(), NAMES, score_thresh=0.5, show_boxes=False)
    assert out.shape == (H + TITLE_HEIGHT, 2 * W, 3) and out.dtype == np.uint8
    left, right = out[TITLE_HEIGHT:, :W], out[TITLE_HEIGHT:, W:]
    gt_mask = np.zeros((H, W), bool)
    gt_mask[5:15, 4:20] = True
    assert np.array_equal(left[~gt_mask], img[~gt_mask]) and (left[gt_mask] != img[gt_mask]).any()
    assert np.array_equal(right, draw_instances(img, _pred(), NAMES, 0.5, show_boxes=False))
    title = out[:TITLE_HEIGHT]
    assert (title == 32).mean() > 0.5 and (title > 160).all(axis=2).any()  # dark bar, white text


def test_save_png_round_trip_and_bad_input(tmp_path):
    img = _image()
    path = save_png(img, tmp_path / "sub" / "x.png")
    assert np.array_equal(np.asarray(Image.open(path)), img)
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        draw_instances(img.astype(np.float32), _pred(), NAMES)
    wrong = Instances((H, W), pred_masks=torch.zeros(1, 8, 8, dtype=torch.bool),
                      pred_classes=torch.tensor([0]))
    with pytest.raises(ValueError, match="original resolution"):
        draw_instances(img, wrong, NAMES)
