"""Score samples of the DeepMask/SharpMask patch sampler: the paper's and the released code's
positive/negative rules checked against every object, balance, and the dataset errors."""
import math

import numpy as np
import pytest

from segkit.data import load_coco_json
from segkit_deepmask.data import PatchSampler, build_patch_loader, square, write_coco_dataset

CANONICAL = 92  # ceil(160 * 128 / 224)


def _records(root, images):
    return load_coco_json(*write_coco_dataset(str(root), images))[0]


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    """Objects of several sizes (a crowd region and a tiny one too) and two empty images."""
    objects = [{"polygon": square(20, 30, 90)}, {"polygon": square(150, 40, 30), "category": 2},
               {"polygon": square(60, 150, 50)}, {"polygon": square(200, 160, 60), "iscrowd": 1},
               {"polygon": square(180, 120, 4)}]
    return _records(tmp_path_factory.mktemp("scene"), [
        {"height": 240, "width": 280, "objects": objects},
        {"height": 120, "width": 100, "objects": [{"polygon": square(30, 30, 40)}]},
        {"height": 90, "width": 70}, {"height": 300, "width": 200}])


def _window(s):
    """Centre (x, y) and scale f (image px per patch px) of a sample's 160 window."""
    x0, y0, x1, y1 = s["window"].tolist()
    return (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 160


def _objects(records, image_id):
    """(centre x, centre y, canonical log2 f) of every annotation of the image, crowd and
    tiny ones included, computed here from the records independently of the sampler."""
    rec = next(r for r in records if r["image_id"] == image_id)
    return [(x + w / 2, y + h / 2, math.log2(max(w, h) / CANONICAL), a["id"])
            for a in rec["annotations"] for x, y, w, h in [a["bbox"]]]


def _draw(sampler, n, positive=None):
    return [sampler.score_sample(np.random.default_rng([7, i]), positive) for i in range(n)]


def test_paper_negatives_are_far_or_off_scale_from_every_object(scene):
    negatives = _draw(PatchSampler(scene), 300, positive=False)
    for s in negatives:
        assert s["label"].item() == -1 and s["ann_id"] is None and s["kind"] == "score"
        cx, cy, f = _window(s)
        for ox, oy, log2_fo, _ in _objects(scene, s["image_id"]):
            shift = max(abs(cx - ox), abs(cy - oy)) / f
            assert shift >= 32 or abs(math.log2(f) - log2_fo) >= 1
    # empty images are used for negatives, and some negatives are near objects in scale
    assert {3, 4} <= {s["image_id"] for s in negatives}


def test_paper_positives_within_jitter_of_their_object(scene):
    positives = _draw(PatchSampler(scene), 200, positive=True)
    for s in positives:
        assert s["label"].item() == 1
        cx, cy, f = _window(s)
        ox, oy, log2_fo, _ = next(o for o in _objects(scene, s["image_id"]) if o[3] == s["ann_id"])
        assert max(abs(cx - ox), abs(cy - oy)) / f <= 16 + 1e-6
        assert abs(math.log2(f) - log2_fo) <= 0.25 + 1e-9
    # never the crowd region (id 4) or the 4 px object (id 5)
    assert {s["ann_id"] for s in positives} == {1, 2, 3, 6}


def test_released_rule(scene):
    sampler = PatchSampler(scene, score_rule="released")
    for s in _draw(sampler, 100, positive=True):
        cx, cy, f = _window(s)
        ox, oy, log2_fo, _ = next(o for o in _objects(scene, s["image_id"]) if o[3] == s["ann_id"])
        assert (abs(cx - ox), abs(cy - oy)) < (1e-3, 1e-3)  # exactly centred
        assert abs(4 * math.log2(f) - round(4 * math.log2(f))) < 1e-5  # quarter-octave grid
        size = CANONICAL * 2 ** (log2_fo - math.log2(f))  # object's max side in the patch
        assert CANONICAL - 1e-6 < size <= CANONICAL * 2 ** 0.25 + 1e-6
    for s in _draw(sampler, 200, positive=False):
        cx, cy, f = _window(s)
        assert s["image_id"] in (1, 2)  # images with objects only
        assert abs(-4 * math.log2(f) - round(-4 * math.log2(f))) < 1e-5
        assert -3 - 1e-6 <= -math.log2(f) <= 2 + 1e-6
        for ox, oy, log2_fo, _ in _objects(scene, s["image_id"]):
            bucket = math.ceil(4 * log2_fo - 1 - 1e-9) / 4
            if abs(math.log2(f) - bucket) <= 2.5:
                assert math.hypot(cx - ox, cy - oy) / f >= 48


def test_positives_and_negatives_balance(scene):
    for rule in ("paper", "released"):
        labels = [s["label"].item() for s in _draw(PatchSampler(scene, score_rule=rule), 400)]
        assert 0.42 < labels.count(1.0) / len(labels) < 0.58


def test_box_only_dataset(tmp_path):
    box_only = {"polygon": square(20, 20, 40), "segmentation": None}
    json_file, image_root = write_coco_dataset(
        str(tmp_path), [{"height": 100, "width": 100, "objects": [box_only]}], name="boxes_only")
    node = {"name": "coco_json", "json": json_file, "images": image_root}
    with pytest.raises(ValueError, match=r"(?s)boxes_only: annotation id 1 .*0001.png.* no "
                                         r"'segmentation'.*mask training needs.*hfreq=1"):
        PatchSampler.from_dataset(node)
    assert PatchSampler.from_dataset(node, score_only=True).name == "boxes_only"
    sampler = PatchSampler(load_coco_json(json_file, image_root)[0], score_only=True)
    assert {s["label"].item() for s in _draw(sampler, 20)} == {-1.0, 1.0}
    with pytest.raises(ValueError, match="score_only"):
        sampler.mask_sample(np.random.default_rng(0))
    with pytest.raises(ValueError, match="hfreq=1"):
        build_patch_loader(sampler, hfreq=0.5)
    batch = next(iter(build_patch_loader(sampler, batch_size=4, hfreq=1.0)))
    assert [s["kind"] for s in batch] == ["score"] * 4


def test_dataset_without_usable_object(tmp_path):
    records = _records(tmp_path, [{"height": 80, "width": 80, "objects": [
        {"polygon": square(10, 10, 30), "iscrowd": 1}, {"polygon": square(50, 50, 4)}]},
        {"height": 50, "width": 50}])
    for score_only in (False, True):
        with pytest.raises(ValueError, match=r"tiny: no usable object .* 2 image\(s\) with 2 "
                                             r"annotation\(s\): 1 crowd, 1 with area < 100"):
            PatchSampler(records, dataset_name="tiny", score_only=score_only)
    with pytest.raises(ValueError, match="no images"):
        PatchSampler([])
    with pytest.raises(ValueError, match="score_rule"):
        PatchSampler(records, score_rule="paper2")
    with pytest.raises(ValueError, match=r"'flip_prob' must be in \[0, 1\], got 2"):
        PatchSampler(records, flip_prob=2)
