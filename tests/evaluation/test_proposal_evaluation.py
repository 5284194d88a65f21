"""ProposalEvaluator: class-agnostic AR vs a direct pycocotools run, and a hand-computed case."""
import json
import math
import os

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from omegaconf import OmegaConf
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from segkit.evaluation import ProposalEvaluator
from segkit.registry import EVALUATORS, build
from segkit.structures import Boxes, Instances

# pycocotools' Cython decode trips numpy 2's __array__(copy=) deprecation; not ours
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "evaluation",
                      "proposals.yaml")
H, W = 160, 200
MAPPING = {0: 1, 1: 2, 2: 7}  # contiguous -> dataset category ids
META = {"name": "synthetic", "thing_classes": ["a", "b", "c"],
        "contiguous_to_category_id": MAPPING}


def _rle(mask: np.ndarray) -> dict:
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def _rect(x1, y1, x2, y2, notch=False) -> np.ndarray:
    m = np.zeros((H, W), dtype=bool)
    m[y1:y2, x1:x2] = True
    if notch:  # cut a corner so mask and box areas differ
        m[y1:y1 + max(1, (y2 - y1) // 3), x1:x1 + max(1, (x2 - x1) // 3)] = False
    return m


def _synthetic(num_images=3, num_gt=130, num_props=1100, seed=0):
    """Records with > 100 GT per image (all sizes, some crowd) and > 1000 proposals each."""
    rng = np.random.default_rng(seed)
    records, proposals = [], []
    ann_id = 1
    for img in range(num_images):
        anns, gt_boxes = [], []
        for k in range(num_gt):
            side = rng.choice([rng.integers(4, 30), rng.integers(33, 95), rng.integers(98, 140)],
                              p=[0.5, 0.35, 0.15])
            w = int(np.clip(side * rng.uniform(0.7, 1.3), 2, W - 1))
            h = int(np.clip(side * rng.uniform(0.7, 1.3), 2, H - 1))
            x1, y1 = int(rng.integers(0, W - w)), int(rng.integers(0, H - h))
            mask = _rect(x1, y1, x1 + w, y1 + h, notch=True)
            crowd = int(k % 25 == 7)
            anns.append({"bbox": [float(x1), float(y1), float(w), float(h)], "bbox_mode": "xywh",
                         "category_id": int(k % 3), "segmentation": _rle(mask),
                         "area": float(mask.sum()), "iscrowd": crowd, "id": ann_id})
            ann_id += 1
            gt_boxes.append((x1, y1, x1 + w, y1 + h))
        records.append({"file_name": f"{img}.jpg", "image_id": 10 + img, "height": H,
                        "width": W, "annotations": anns})
        boxes = []
        for n in range(num_props):
            if n < 2 * num_gt:  # jittered GT: a spread of IoUs around the thresholds
                x1, y1, x2, y2 = gt_boxes[n % num_gt]
                j = rng.integers(-4, 5, size=4) * (1 + (n >= num_gt) * 2)
                x1, y1 = np.clip([x1 + j[0], y1 + j[1]], 0, [W - 2, H - 2])
                x2, y2 = max(x1 + 1, min(W, x2 + j[2])), max(y1 + 1, min(H, y2 + j[3]))
            else:
                x1, y1 = int(rng.integers(0, W - 2)), int(rng.integers(0, H - 2))
                x2, y2 = int(rng.integers(x1 + 1, W + 1)), int(rng.integers(y1 + 1, H + 1))
            boxes.append((int(x1), int(y1), int(x2), int(y2)))
        scores = rng.random(num_props).astype(np.float32)
        proposals.append((np.array(boxes, dtype=np.float32), scores))
    return records, proposals


def _instances(boxes, scores, masks=False, classes=None):
    inst = Instances((H, W), pred_boxes=Boxes(torch.as_tensor(boxes, dtype=torch.float32)),
                     scores=torch.as_tensor(scores, dtype=torch.float32))
    inst.pred_classes = (torch.as_tensor(classes) if classes is not None
                         else torch.zeros(len(boxes), dtype=torch.int64))
    if masks:
        inst.pred_masks = torch.from_numpy(np.stack([_rect(*map(int, b)) for b in boxes]))
    return inst


def _gt_json(records):
    """The ground truth written by hand in COCO format (independent of convert_to_coco_dict)."""
    return {"images": [{"id": r["image_id"], "height": H, "width": W} for r in records],
            "annotations": [{"id": a["id"], "image_id": r["image_id"], "bbox": a["bbox"],
                             "category_id": MAPPING[a["category_id"]], "area": a["area"],
                             "iscrowd": a["iscrowd"], "segmentation": a["segmentation"]}
                            for r in records for a in r["annotations"]],
            "categories": [{"id": c} for c in MAPPING.values()]}


def _reference(records, proposals, iou_type, max_dets=(10, 100, 1000)):
    """pycocotools on json data: COCOeval(useCats=0, maxDets) and its summarize() stats."""
    coco_gt = COCO()
    coco_gt.dataset = _gt_json(records)
    coco_gt.createIndex()
    results = []
    for rec, (boxes, scores) in zip(records, proposals):
        for b, s in zip(boxes.tolist(), scores.tolist()):
            res = {"image_id": rec["image_id"], "category_id": 2, "score": s}
            if iou_type == "bbox":
                res["bbox"] = [b[0], b[1], b[2] - b[0], b[3] - b[1]]
            else:
                res["segmentation"] = _rle(_rect(*map(int, b)))
            results.append(res)
    coco_eval = COCOeval(coco_gt, coco_gt.loadRes(results), iou_type)
    coco_eval.params.useCats = 0
    coco_eval.params.maxDets = list(max_dets)
    coco_eval.evaluate()
    coco_eval.accumulate()
    coco_eval.summarize()
    return coco_eval.stats


def _run(evaluator, records, proposals, masks=False):
    evaluator.reset()
    for rec, (boxes, scores) in zip(records, proposals):
        classes = torch.arange(len(boxes)) % 3  # ignored: class-agnostic
        evaluator.process([{"image_id": rec["image_id"]}],
                          [{"instances": _instances(boxes, scores, masks, classes)}])
    return evaluator.evaluate()


def _check_against_pycocotools(out, ref_top, ref_100):
    # summarize() with maxDets [10, 100, 1000]: stats[6:9] AR at the three limits,
    # stats[9:12] small/medium/large at the largest; with [1, 10, 100] stats[9:12] are @100.
    expected = {"AR@10": ref_top[6], "AR@100": ref_top[7], "AR@1000": ref_top[8],
                "ARs@1000": ref_top[9], "ARm@1000": ref_top[10], "ARl@1000": ref_top[11],
                "ARs@100": ref_100[9], "ARm@100": ref_100[10], "ARl@100": ref_100[11]}
    assert set(out) == set(expected)
    for k, v in expected.items():
        assert out[k] == pytest.approx(100 * v, abs=1e-9), k
    assert 0 < out["AR@10"] < out["AR@100"] < out["AR@1000"] < 100


@pytest.fixture(scope="module")
def data():
    return _synthetic(num_images=2, num_gt=105, num_props=1010)


@pytest.fixture(scope="module")
def bbox_reference(data):
    records, proposals = data
    return (_reference(records, proposals, "bbox"),
            _reference(records, proposals, "bbox", (1, 10, 100)))


def test_bbox_matches_pycocotools(data, bbox_reference, tmp_path):
    records, proposals = data
    assert all(len(r["annotations"]) > 100 for r in records)
    assert all(len(b) > 1000 for b, _ in proposals)
    ev = ProposalEvaluator(records, META, iou_types=("bbox", "segm"), output_dir=str(tmp_path))
    out = _run(ev, records, proposals)
    assert set(out) == {"bbox"}  # no masks predicted: segm skipped
    _check_against_pycocotools(out["bbox"], *bbox_reference)
    written = json.load(open(tmp_path / "coco_proposals_results.json"))
    assert len(written) == 1000 * len(records)  # only the top 1000 per image are kept


def test_bbox_from_json_file_ground_truth(data, bbox_reference, tmp_path):
    records, proposals = data
    gt_file = tmp_path / "gt.json"
    gt_file.write_text(json.dumps(_gt_json(records)))
    ev = ProposalEvaluator([], {**META, "json_file": str(gt_file)}, iou_types=["bbox"])
    out = _run(ev, records, proposals)
    _check_against_pycocotools(out["bbox"], *bbox_reference)


def test_segm_matches_pycocotools():
    records, proposals = _synthetic(num_images=1, num_gt=104, num_props=1005, seed=1)
    ev = ProposalEvaluator(records, META)
    out = _run(ev, records, proposals, masks=True)
    assert set(out) == {"bbox", "segm"}
    _check_against_pycocotools(out["segm"], _reference(records, proposals, "segm"),
                               _reference(records, proposals, "segm", (1, 10, 100)))
    # notched GT masks vs rectangular proposals: mask recall differs from box recall
    assert out["segm"]["AR@1000"] != pytest.approx(out["bbox"]["AR@1000"])


def _tiny():
    """2 GT (small A, large B) + a crowd region; 12 proposals with known matches."""
    anns = [{"bbox": [0.0, 0.0, 20.0, 20.0], "category_id": 0, "iscrowd": 0, "id": 1},
            {"bbox": [100.0, 100.0, 100.0, 100.0], "category_id": 1, "iscrowd": 0, "id": 2},
            {"bbox": [250.0, 250.0, 60.0, 60.0], "category_id": 0, "iscrowd": 1, "id": 3}]
    rec = {"file_name": "t.jpg", "image_id": 1, "height": 320, "width": 320, "annotations": anns}
    boxes = [[0, 0, 20, 20]]  # == A, score 0.9, rank 1
    boxes += [[250, 250, 310, 310]]  # == the crowd region: ignored, not a hit
    boxes += [[220 + 2 * i, 30, 240 + 2 * i, 50] for i in range(9)]  # junk, IoU 0 with A and B
    boxes += [[100, 100, 200, 172]]  # IoU 0.72 with B, rank 12
    scores = [0.9] + [0.8 - 0.04 * i for i in range(10)] + [0.1]
    return rec, np.array(boxes, dtype=np.float32), np.array(scores, dtype=np.float32)


def test_hand_computed_tiny_case():
    rec, boxes, scores = _tiny()
    ev = ProposalEvaluator([rec], {"name": "tiny", "thing_classes": ["a", "b"]},
                           iou_types=["bbox"])
    ev.process([{"image_id": 1}], [{"instances": _instances(boxes, scores,
                                                            classes=[5] * len(boxes))}])
    out = ev.evaluate()["bbox"]
    # top 10: A found at every IoU threshold, B never -> recall 1/2 at each of the 10 thresholds
    assert out["AR@10"] == pytest.approx(50.0)
    # top 100: B is also found at IoU 0.72, i.e. for thresholds 0.50..0.70 (5 of 10)
    # -> mean over thresholds of (1 + 1)/2 (x5) and (1 + 0)/2 (x5) = 0.75
    assert out["AR@100"] == pytest.approx(75.0)
    assert out["AR@1000"] == pytest.approx(75.0)
    assert out["ARs@100"] == pytest.approx(100.0)  # A: 20x20 = 400 < 32^2
    assert out["ARl@100"] == pytest.approx(50.0)  # B: 100x100 >= 96^2
    assert out["ARl@1000"] == pytest.approx(50.0)
    assert math.isnan(out["ARm@100"]) and math.isnan(out["ARm@1000"])  # no medium GT


def test_tiny_case_other_limits_and_no_proposals():
    rec, boxes, scores = _tiny()
    meta = {"name": "tiny", "thing_classes": ["a", "b"]}
    ev = ProposalEvaluator([rec], meta, iou_types=["bbox"], max_dets=(1, 11, 12),
                           area_max_dets=[11])
    ev.process([{"image_id": 1}], [{"instances": _instances(boxes, scores)}])
    out = ev.evaluate()["bbox"]
    # with 11 proposals the crowd-matched one (rank 2) does not help; B needs rank 12
    assert out == pytest.approx({"AR@1": 50.0, "AR@11": 50.0, "AR@12": 75.0, "ARs@11": 100.0,
                                 "ARm@11": math.nan, "ARl@11": 0.0}, nan_ok=True)
    ev.reset()
    ev.process([{"image_id": 1}], [{"instances": _instances(np.zeros((0, 4)), [])}])
    empty = ev.evaluate()["bbox"]
    assert empty["AR@12"] == 0.0 and math.isnan(empty["ARm@11"])


def test_built_from_config(data):
    node = OmegaConf.load(CONFIG)
    assert node.name == "proposals" and list(node.max_dets) == [10, 100, 1000]
    kwargs = {k: v for k, v in OmegaConf.to_container(node).items() if k != "max_images"}
    records, _ = data
    ev = build(kwargs, EVALUATORS, "evaluation", records=records, metadata=META)
    assert isinstance(ev, ProposalEvaluator)
    assert ev.iou_types == ("bbox", "segm") and ev.max_dets == (10, 100, 1000)
    assert ev.area_max_dets == (100, 1000)


def test_bad_arguments():
    with pytest.raises(ValueError, match="area_max_dets"):
        ProposalEvaluator([], META, max_dets=(10, 100, 1000), area_max_dets=[300])
    with pytest.raises(ValueError, match="max_dets must be 3 ascending"):
        ProposalEvaluator([], META, max_dets=(100, 10, 1000))
    ev = ProposalEvaluator([], META)
    with pytest.raises(KeyError, match="image_id"):
        ev.process([{}], [{"instances": _instances(np.zeros((0, 4)), [])}])
