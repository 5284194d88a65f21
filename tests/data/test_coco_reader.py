"""COCO-format reader: record format, contiguous ids, imperfect annotations, clear errors."""
import json
import os
import warnings
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_util
import pytest
from coco_samples import tiny_coco_dict
from pycocotools.coco import COCO

from segkit.data import DatasetCatalog, MetadataCatalog, get_dataset, load_coco_json

COCOAPI_JSON = (Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "cocoapi"
                / "instances_val2014_100.json")


def _load(json_path, img_dir, **kw):
    with pytest.warns(UserWarning, match=r"dropped 2 annotation.*2 with an empty box "
                      r"\(w <= 0 or h <= 0\): ids 4, 6$") as rec:
        out = load_coco_json(json_path, img_dir, **kw)
    assert len(rec) == 1  # one summary warning, not one per annotation
    return out


def test_records_and_metadata(tiny_coco):
    json_path, img_dir = tiny_coco
    records, meta = _load(json_path, img_dir)
    # sorted category ids [3, 7] -> contiguous [0, 1]
    assert meta["thing_classes"] == ["three", "seven"]
    assert meta["contiguous_to_category_id"] == {0: 3, 1: 7}
    assert meta["name"] == "ann"
    assert meta["json_file"] == json_path and meta["image_root"] == img_dir
    assert [r["image_id"] for r in records] == [10, 11, 12]  # file order, empty image kept
    r0 = records[0]
    assert r0["file_name"] == os.path.join(img_dir, "a.png")
    assert (r0["height"], r0["width"]) == (40, 60)
    by_id = {a["id"]: a for a in r0["annotations"]}
    assert sorted(by_id) == [1, 2, 3, 5]
    assert by_id[1]["category_id"] == 1 and by_id[2]["category_id"] == 0
    assert by_id[1]["segmentation"] == [[10, 4, 30, 4, 30, 16, 10, 16]]  # polygon kept
    assert by_id[1]["bbox_mode"] == "xywh" and by_id[1]["area"] == 240.0
    assert isinstance(by_id[2]["segmentation"], dict)  # compressed RLE kept as RLE
    assert isinstance(by_id[3]["segmentation"]["counts"], list)  # uncompressed RLE kept
    assert by_id[3]["iscrowd"] == 1
    assert records[1]["annotations"] == []


def test_box_partly_outside_is_clipped(tiny_coco):
    records, _ = _load(*tiny_coco)
    ann5 = next(a for a in records[0]["annotations"] if a["id"] == 5)
    # [50, 30, 20, 20] in a 60x40 image -> x 50..60, y 30..40
    assert ann5["bbox"] == [50.0, 30.0, 10.0, 10.0]


def test_rle_masks_decode_to_the_original(tiny_coco):
    records, _ = _load(*tiny_coco)
    by_id = {a["id"]: a for a in records[0]["annotations"]}
    expected = np.zeros((40, 60), np.uint8)
    expected[4:16, 10:30] = 1
    seg = by_id[2]["segmentation"]
    got = mask_util.decode({"size": seg["size"], "counts": seg["counts"].encode()})
    np.testing.assert_array_equal(got, expected)
    crowd = mask_util.decode(mask_util.frPyObjects(by_id[3]["segmentation"], 40, 60))
    assert crowd.sum() == 150 and crowd[20:30, 40:55].all()


def test_malformed_json_names_the_file(tmp_path, tiny_coco):
    path = tmp_path / "broken.json"
    path.write_text('{"images": [')
    with pytest.raises(ValueError, match=r"malformed JSON in .*broken.json"):
        load_coco_json(str(path), tiny_coco[1])
    path.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")  # an image passed as the json
    with pytest.raises(ValueError, match=r"malformed JSON in .*broken.json"):
        load_coco_json(str(path), tiny_coco[1])
    path.write_text('{"annotations": []}')
    with pytest.raises(ValueError, match=r"broken.json.*'images'"):
        load_coco_json(str(path), tiny_coco[1])


def test_missing_paths_name_the_config_key(tmp_path, tiny_coco):
    json_path, img_dir = tiny_coco
    missing = str(tmp_path / "nope.json")
    with pytest.raises(FileNotFoundError, match=r"nope.json.*'dataset.train.json'"):
        get_dataset({"name": "coco_json", "json": missing, "images": img_dir}, path="dataset.train")
    with pytest.raises(FileNotFoundError, match=r"no_images.*'dataset.val.images'"):
        get_dataset({"name": "coco_json", "json": json_path, "images": str(tmp_path / "no_images")},
                    path="dataset.val")


def test_get_dataset_registers_and_caches(tiny_coco):
    json_path, img_dir = tiny_coco
    node = {"name": "coco_json", "json": json_path, "images": img_dir}
    with pytest.warns(UserWarning):
        records, meta = get_dataset(dict(node), path="dataset.train")
    assert meta["name"] == "ann"
    assert DatasetCatalog.get("ann") is records
    assert MetadataCatalog.get("ann")["thing_classes"] == ["three", "seven"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # cached: the file is not parsed (or warned about) again
        again, _ = get_dataset(dict(node), path="dataset.train")
    assert again is records


def test_coco_2017_missing_explains_layout(tmp_path, monkeypatch):
    monkeypatch.setenv("SEGKIT_DATASETS", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"instances_val2017.json.*SEGKIT_DATASETS"):
        get_dataset({"name": "coco_2017", "split": "val"})
    with pytest.raises(ValueError, match=r"'train' or 'val'"):
        get_dataset({"name": "coco_2017", "split": "test"})


@pytest.mark.skipif(not COCOAPI_JSON.is_file(),
                    reason=f"cocoapi reference annotations not found at {COCOAPI_JSON}")
def test_real_coco_subset_matches_pycocotools(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # real COCO annotations have nothing to drop
        records, meta = load_coco_json(str(COCOAPI_JSON), str(tmp_path))
    coco = COCO(str(COCOAPI_JSON))
    # every image and every annotation of the file is kept, crowd regions included
    assert len(records) == len(coco.imgs) == 100
    assert sum(len(r["annotations"]) for r in records) == len(coco.anns)
    assert sum(a["iscrowd"] for r in records for a in r["annotations"]) == sum(
        a["iscrowd"] for a in coco.anns.values()) > 0
    cat_ids = sorted(coco.getCatIds())
    assert len(meta["thing_classes"]) == len(cat_ids) == 80
    assert meta["thing_classes"] == [coco.cats[c]["name"] for c in cat_ids]
    for r in records:
        ref_ids = sorted(coco.getAnnIds(imgIds=r["image_id"]))
        assert sorted(a["id"] for a in r["annotations"]) == ref_ids
        for a in r["annotations"]:
            ref = coco.anns[a["id"]]
            assert meta["contiguous_to_category_id"][a["category_id"]] == ref["category_id"]
            x, y, w, h = ref["bbox"]
            x2, y2 = min(x + w, r["width"]), min(y + h, r["height"])
            np.testing.assert_allclose(a["bbox"], [x, y, x2 - x, y2 - y])
            assert a["area"] == ref["area"]
            assert isinstance(a["segmentation"], dict) == bool(ref["iscrowd"])


def _write_edited(tmp_path, name, edit):
    """The tiny COCO dict changed by ``edit(dict)``, written to ``tmp_path/name``."""
    data = tiny_coco_dict()
    edit(data)
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["annotations"][4].update(category_id=99), r"annotation id 5.*category_id 99"),
    (lambda d: d["annotations"][0].update(image_id=404),
     r"annotation id 1 refers to image id 404"),
    (lambda d: d["annotations"][1]["segmentation"].update(size=[41, 60]),
     r"annotation id 2 \(image id 10\).*size \[40, 60\]"),
    (lambda d: d["annotations"][0].pop("id"), r"annotations\[0\] lacks id"),
    (lambda d: d["annotations"][1].update(id=1), r"duplicate annotation ids, e.g. \[1\]"),
    (lambda d: d["images"][1].update(id=10), r"duplicate image ids"),
    (lambda d: d["categories"][1].update(id=7), r"duplicate category ids"),
    (lambda d: d["images"][0].update(height=0), r"image id 10 needs positive integer"),
    (lambda d: d["annotations"][0].update(bbox=[1, 2, 3]), r"annotation id 1 .*bbox must be"),
    (lambda d: d["annotations"][0].update(segmentation=[[1, 2, 3, 4, 5, 6, 7]]),
     r"annotation id 1 .*odd number"),
    (lambda d: d["annotations"][0].update(bbox=[1, 2, "3", None]),
     r"annotation id 1 .*bbox \[x, y, w, h\] values must be finite numbers"),
    (lambda d: d["annotations"][6].update(bbox=[2, 20, float("nan"), 20]),
     r"annotation id 7 \(image id 12\).*must be finite numbers"),
    (lambda d: d["annotations"][0].update(segmentation=[[10, 4, 30, 4, "x", 16]]),
     r"annotation id 1 .*polygon coordinates must be finite numbers"),
])
def test_structural_errors_name_file_and_id(tmp_path, tiny_coco, edit, message):
    path = _write_edited(tmp_path, "edited.json", edit)
    with pytest.raises(ValueError, match=r"edited.json.*" + message):
        load_coco_json(str(path), tiny_coco[1])


def test_degenerate_polygons_are_dropped(tmp_path, tiny_coco):
    def edit(d):
        d["annotations"][0]["segmentation"] = [[10, 4, 30, 4], [10, 4, 30, 4, 30, 16]]
        d["annotations"][6]["segmentation"] = [[2, 20, 12, 20]]  # only a 2-point "polygon"

    path = _write_edited(tmp_path, "degenerate.json", edit)
    with pytest.warns(UserWarning, match=r"dropped 3 annotation.*2 with an empty box.*ids 4, 6; "
                      r"1 with only degenerate polygons.*ids 7$"):
        records, _ = load_coco_json(str(path), tiny_coco[1])
    ann1 = next(a for a in records[0]["annotations"] if a["id"] == 1)
    assert ann1["segmentation"] == [[10, 4, 30, 4, 30, 16]]
    assert records[2]["annotations"] == []


def test_dropped_boxes_are_named_by_reason(tmp_path, tiny_coco):
    """Empty boxes, boxes entirely outside the image and degenerate polygons are told apart."""
    def edit(d):
        d["annotations"][6]["bbox"] = [25, 20, 10, 20]  # image 12 is 20 wide: x from 25
        d["annotations"][0]["segmentation"] = [[10, 4, 30, 4]]

    path = _write_edited(tmp_path, "reasons.json", edit)
    with pytest.warns(UserWarning) as rec:
        records, _ = load_coco_json(str(path), tiny_coco[1])
    (message,) = [str(w.message) for w in rec]
    assert message == (f"{path}: dropped 4 annotation(s) that mark no object; "
                       "1 with only degenerate polygons (fewer than 3 points): ids 1; "
                       "2 with an empty box (w <= 0 or h <= 0): ids 4, 6; "
                       "1 with a box entirely outside its image: ids 7")
    assert sorted(a["id"] for r in records for a in r["annotations"]) == [2, 3, 5]


def test_label_map_category_id_keeps_id_gaps(tiny_coco):
    """label_map='category_id': class = category id - 1, gaps named N/A (torchvision's COCO
    labelling), and the mapping back to category ids is the inverse."""
    json_path, img_dir = tiny_coco
    records, meta = _load(json_path, img_dir, label_map="category_id")
    assert meta["thing_classes"] == ["N/A", "N/A", "three", "N/A", "N/A", "N/A", "seven"]
    assert meta["contiguous_to_category_id"][2] == 3 and meta["contiguous_to_category_id"][6] == 7
    used = {a["category_id"] for r in records for a in r["annotations"]}
    assert used <= {2, 6}
    with pytest.raises(ValueError, match="unknown label_map 'bogus'"):
        load_coco_json(json_path, img_dir, label_map="bogus")
