"""End-to-end check against pycocotools 2.0.11 on real COCO data (shared reference pair).

The cocoapi sample results are turned into segkit model outputs (``Instances`` with XYXY
boxes, bool masks, contiguous classes) per image, pushed through ``COCOEvaluator`` (result
writer, category mapping back to COCO ids, crowd ground truth) and the 12 summary stats are
compared with the numbers the README of the shared data lists.
"""
import json
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch

from segkit.evaluation import COCOEvaluator, evaluate_coco_json, stat_names
from segkit.structures import Boxes, Instances

REPO_ROOT = Path(__file__).resolve().parents[2]
DATA = (REPO_ROOT / "../shared/data/cocoapi").resolve()
GT_JSON = DATA / "instances_val2014_100.json"
RESULTS = {"bbox": DATA / "instances_val2014_fakebbox100_results.json",
           "segm": DATA / "instances_val2014_fakesegm100_results.json"}

pytestmark = [
    pytest.mark.skipif(not GT_JSON.is_file(), reason=f"cocoapi reference data not found at {DATA}"),
    # pycocotools' Cython decode trips numpy 2's __array__(copy=) deprecation; not ours
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
]


def _readme_stats():
    """The 12 stats per IoU type from the README table of the shared data."""
    stats = {}
    for line in (DATA / "README.md").read_text().splitlines():
        m = re.match(r"\|\s*(bbox|segm)\s*\|(.*)\|", line)
        if m:
            stats[m.group(1)] = [float(v) for v in m.group(2).split(",")]
    assert set(stats) == {"bbox", "segm"} and all(len(v) == 12 for v in stats.values())
    return stats


@pytest.fixture(scope="module")
def dataset():
    """(records, metadata) from segkit's ``coco_json`` reader (contiguous ids, crowd kept)."""
    import segkit.data  # noqa: F401  (registers the readers)
    from segkit.registry import DATASETS

    return DATASETS.get("coco_json")(json=str(GT_JSON), images=str(DATA))


def _to_instances(dets, record, to_contig, iou_type):
    """COCO results of one image -> model-output ``Instances`` at the original resolution."""
    h, w = record["height"], record["width"]
    if not dets:
        return Instances((h, w))
    inst = Instances((h, w), scores=torch.tensor([d["score"] for d in dets], dtype=torch.float32),
                     pred_classes=torch.tensor([to_contig[d["category_id"]] for d in dets]))
    if iou_type == "bbox":
        xywh = torch.tensor([d["bbox"] for d in dets], dtype=torch.float32)
        inst.pred_boxes = Boxes(torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1))
    else:
        rles = [d["segmentation"] for d in dets]
        masks = mask_util.decode(rles).astype(bool)  # (H, W, N)
        inst.pred_masks = torch.from_numpy(masks).permute(2, 0, 1).contiguous()
        xywh = torch.tensor(mask_util.toBbox(rles), dtype=torch.float32)
        inst.pred_boxes = Boxes(torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1))
    return inst


def _run_evaluator(records, meta, iou_type, output_dir):
    results = json.loads(RESULTS[iou_type].read_text())
    to_contig = {int(c): int(k) for k, c in meta["contiguous_to_category_id"].items()}
    by_image = defaultdict(list)  # file order kept: it breaks score ties inside COCOeval
    for r in results:
        by_image[r["image_id"]].append(r)
    ev = COCOEvaluator(records, meta, iou_types=(iou_type,), output_dir=str(output_dir))
    batch = 4
    for start in range(0, len(records), batch):  # every image, also the one with no results
        recs = records[start:start + batch]
        ev.process([{"image_id": r["image_id"], "file_name": r["file_name"]} for r in recs],
                   [{"instances": _to_instances(by_image[r["image_id"]], r, to_contig, iou_type)}
                    for r in recs])
    return ev.evaluate()[iou_type], results


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
@pytest.mark.parametrize("gt_source", ["json_file", "records"])
def test_coco_evaluator_matches_pycocotools(dataset, iou_type, gt_source, tmp_path):
    records, meta = dataset
    assert len(records) == 100
    assert sum(a.get("iscrowd", 0) for r in records for a in r["annotations"]) == 9
    if gt_source == "records":  # ground truth rebuilt by convert_to_coco_dict
        meta = {**meta, "json_file": None}
    else:
        assert Path(meta["json_file"]).resolve() == GT_JSON
    metrics, original = _run_evaluator(records, meta, iou_type, tmp_path)
    expected = _readme_stats()[iou_type]
    got = [metrics[n] / 100.0 for n in stat_names((1, 10, 100))]
    assert got == pytest.approx(expected, abs=1e-4), list(zip(stat_names(), got, expected))
    # per-class AP: a class without ground truth in these 100 images is NaN, the rest finite
    per_class = {k: v for k, v in metrics.items() if k.startswith("AP-")}
    assert len(per_class) == 80 and sum(np.isfinite(v) for v in per_class.values()) == 70

    # the written results round-trip: same ids, RLE strings and boxes; scores up to float32
    written = json.loads((tmp_path / "coco_instances_results.json").read_text())
    key = lambda r: (r["image_id"], r["category_id"])  # noqa: E731
    assert sorted(map(key, written)) == sorted(map(key, original))
    by_orig = defaultdict(list)
    for r in original:
        by_orig[r["image_id"]].append(r)
    for w_img in {r["image_id"] for r in written}:
        mine = [r for r in written if r["image_id"] == w_img]
        theirs = by_orig[w_img]
        assert [r["category_id"] for r in mine] == [r["category_id"] for r in theirs]
        assert [r["score"] for r in mine] == pytest.approx([r["score"] for r in theirs], abs=1e-6)
        if iou_type == "bbox":
            assert [r["bbox"] for r in mine] == [r["bbox"] for r in theirs]
        else:
            assert [r["segmentation"] for r in mine] == [r["segmentation"] for r in theirs]


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_evaluate_coco_json_matches_readme(iou_type):
    stats = evaluate_coco_json(GT_JSON, RESULTS[iou_type], iou_type)
    assert list(stats) == stat_names()
    assert list(stats.values()) == pytest.approx(_readme_stats()[iou_type], abs=1e-12)
