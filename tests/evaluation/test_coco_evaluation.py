"""COCOEvaluator / instances_to_coco_json on small hand-made cases with hand-computed AP."""
import json
import logging
import math

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch

from segkit.evaluation import COCOEvaluator, convert_to_coco_dict, instances_to_coco_json
from segkit.registry import EVALUATORS
from segkit.structures import Boxes, Instances

# pycocotools' Cython decode trips numpy 2's __array__(copy=) deprecation; not ours
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

H, W = 48, 64


def _instances(boxes, scores, classes, masks=None):
    inst = Instances((H, W), pred_boxes=Boxes(torch.tensor(boxes, dtype=torch.float32).view(-1, 4)),
                     scores=torch.tensor(scores, dtype=torch.float32),
                     pred_classes=torch.tensor(classes, dtype=torch.int64))
    if masks is not None:
        inst.pred_masks = masks
    return inst


def _box_mask(x1, y1, x2, y2):
    m = torch.zeros(H, W, dtype=torch.bool)
    m[y1:y2, x1:x2] = True
    return m


def _records():
    """Image 1: one 'cat' (category id 17) as a polygon; image 2: no ground truth at all."""
    poly = [[10.0, 6.0, 50.0, 6.0, 50.0, 40.0, 10.0, 40.0]]
    ann = {"bbox": [10.0, 6.0, 40.0, 34.0], "bbox_mode": "xywh", "category_id": 1,
           "segmentation": poly, "iscrowd": 0, "area": 1360.0, "id": 3}
    return [
        {"file_name": "a.jpg", "image_id": 1, "height": H, "width": W, "annotations": [ann]},
        {"file_name": "b.jpg", "image_id": 2, "height": H, "width": W, "annotations": []},
    ]


META = {"name": "tiny", "thing_classes": ["dog", "cat"],
        "contiguous_to_category_id": {0: 5, 1: 17}, "json_file": None}


def test_instances_to_coco_json_round_trip():
    masks = torch.stack([_box_mask(2, 3, 12, 9), _box_mask(20, 10, 41, 30)])
    inst = _instances([[2.5, 3.0, 12.0, 9.5], [20.0, 10.0, 41.0, 30.0]], [0.9, 0.25], [1, 0], masks)
    res = instances_to_coco_json(inst, 42, {"0": 5, "1": 17})  # str keys as after a JSON trip
    res = json.loads(json.dumps(res))  # must be JSON-serialisable as is
    assert [r["image_id"] for r in res] == [42, 42]
    assert [r["category_id"] for r in res] == [17, 5]
    assert res[0]["bbox"] == pytest.approx([2.5, 3.0, 9.5, 6.5])  # XYWH
    assert res[1]["score"] == pytest.approx(0.25)
    for r, m in zip(res, masks):
        assert isinstance(r["segmentation"]["counts"], str)
        assert r["segmentation"]["size"] == [H, W]
        decoded = mask_util.decode(r["segmentation"])
        assert np.array_equal(decoded.astype(bool), m.numpy())
    # boxes only, identity category map
    no_mask = instances_to_coco_json(_instances([[0, 0, 4, 4]], [0.5], [1]), 7, None)
    assert no_mask[0]["category_id"] == 1 and "segmentation" not in no_mask[0]
    assert instances_to_coco_json(Instances((H, W)), 7, None) == []


def test_instances_to_coco_json_unknown_class():
    with pytest.raises(KeyError, match=r"pred_classes \[3\]"):
        instances_to_coco_json(_instances([[0, 0, 4, 4]], [0.5], [3]), 1, {0: 5, 1: 17})


def test_convert_to_coco_dict_maps_categories_and_keeps_crowd():
    recs = _records()
    recs[1]["annotations"] = [{"bbox": [0, 0, 10, 10], "category_id": 0, "iscrowd": 1,
                               "segmentation": mask_util.encode(np.asfortranarray(
                                   _box_mask(0, 0, 10, 10).numpy().astype(np.uint8)))}]
    gt = convert_to_coco_dict(recs, META)
    assert [c["id"] for c in gt["categories"]] == [5, 17]
    cats = [a["category_id"] for a in gt["annotations"]]
    assert cats == [17, 5]
    crowd = gt["annotations"][1]
    assert crowd["iscrowd"] == 1 and crowd["area"] == 100.0  # area computed from the RLE
    assert isinstance(crowd["segmentation"]["counts"], str)
    assert len({a["id"] for a in gt["annotations"]}) == 2


@pytest.mark.parametrize("fp_score, expected_ap", [(0.5, 100.0), (0.95, 50.0)])
def test_false_positive_on_image_without_gt(fp_score, expected_ap, tmp_path):
    """One GT, one exact hit (score 0.9) plus one detection on the GT-free image.

    Ranked below the hit the false positive costs nothing (AP 100); ranked above it, precision
    is 1/2 at every recall level, so AP is exactly 50 (COCO 101-point interpolation).
    """
    ev = COCOEvaluator(_records(), META, iou_types=("bbox", "segm"), output_dir=str(tmp_path))
    gt_mask = _box_mask(10, 6, 50, 40)
    hit = _instances([[10, 6, 50, 40]], [0.9], [1], gt_mask[None])
    fp = _instances([[5, 5, 25, 25]], [fp_score], [1], _box_mask(5, 5, 25, 25)[None])
    ev.process([{"image_id": 1}, {"image_id": 2}], [{"instances": hit}, {"instances": fp}])
    res = ev.evaluate()
    for task in ("bbox", "segm"):
        assert res[task]["AP"] == pytest.approx(expected_ap)
        assert res[task]["AP50"] == pytest.approx(expected_ap)
        assert res[task]["AP-cat"] == pytest.approx(expected_ap)
        assert math.isnan(res[task]["AP-dog"])  # no ground truth of that class
        assert math.isnan(res[task]["APs"]) and math.isnan(res[task]["APl"])  # 1360 px^2 is medium
        # the 400 px^2 false positive is outside the medium range, so APm ignores it
        assert res[task]["APm"] == pytest.approx(100.0)
        assert res[task]["AR100"] == pytest.approx(100.0)
    written = json.loads((tmp_path / "coco_instances_results.json").read_text())
    assert {(r["image_id"], r["category_id"]) for r in written} == {(1, 17), (2, 17)}


def test_empty_predictions_give_zeros_with_warning(caplog):
    """No detections at all: 0 where there is ground truth, NaN where there is none, exactly
    as when there are detections (no small or large objects, no 'dog')."""
    ev = EVALUATORS.get("coco")(_records(), META, iou_types=("bbox", "segm"))
    ev.process([{"image_id": 1}, {"image_id": 2}],
               [{"instances": Instances((H, W))}, {"instances": _instances([], [], [])}])
    with caplog.at_level(logging.WARNING):
        res = ev.evaluate()
    assert "no predictions" in caplog.text
    for task in ("bbox", "segm"):
        for name in ("AP", "AP50", "APm", "AR1", "AR100", "ARm", "AP-cat"):
            assert res[task][name] == 0.0, (task, name)
        for name in ("APs", "APl", "ARs", "ARl", "AP-dog"):
            assert math.isnan(res[task][name]), (task, name)


def test_reset_and_only_processed_images_count():
    """After reset, and evaluating only image 1, the perfect hit gives AP 100."""
    ev = COCOEvaluator(_records(), META, iou_types=("bbox",))
    ev.process([{"image_id": 2}], [{"instances": _instances([[5, 5, 25, 25]], [0.99], [1])}])
    ev.reset()
    ev.process([{"image_id": 1}], [{"instances": _instances([[10, 6, 50, 40]], [0.9], [1])}])
    assert ev.evaluate()["bbox"]["AP"] == pytest.approx(100.0)


def test_segm_skipped_without_masks_and_bad_inputs(caplog):
    ev = COCOEvaluator(_records(), META)
    ev.process([{"image_id": 1}], [{"instances": _instances([[10, 6, 50, 40]], [0.9], [1])}])
    with caplog.at_level(logging.WARNING):
        res = ev.evaluate()
    assert set(res) == {"bbox"} and "skipping 'segm'" in caplog.text
    with pytest.raises(KeyError, match="image_id"):
        ev.process([{"file_name": "x.jpg"}], [{"instances": Instances((H, W))}])
    with pytest.raises(ValueError, match="iou_types"):
        COCOEvaluator(_records(), META, iou_types=("keypoints",))
    ev.reset()
    ev.process([{"image_id": 99}], [{"instances": _instances([[0, 0, 5, 5]], [0.9], [1])}])
    with pytest.raises(ValueError, match=r"not in the ground truth: \[99\]"):
        ev.evaluate()
