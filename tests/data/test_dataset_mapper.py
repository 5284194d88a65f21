"""DatasetMapper: output format, geometry by hand, mask/box alignment, unreadable images."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from coco_samples import rle_of

from segkit.data import DatasetMapper, ImageReadError, load_coco_json, read_image
from segkit.structures import BitMasks, Boxes, Instances, PolygonMasks, polygons_to_bitmask


@pytest.fixture
def records(tiny_coco):
    with pytest.warns(UserWarning):
        recs, _ = load_coco_json(*tiny_coco)
    return recs


def _by_box(inst):
    """Instances sorted by box so tests do not depend on the annotation order."""
    order = sorted(range(len(inst)), key=lambda i: inst.gt_boxes.tensor[i].tolist())
    return inst[torch.tensor(order, dtype=torch.int64)]


def test_train_output_format_resize_and_flip_by_hand(records):
    mapper = DatasetMapper(True, [20], 1000, flip_prob=1.0, mask_format="polygon")
    out = mapper(records[0], rng=np.random.default_rng(0))
    assert set(out) == {"file_name", "image_id", "height", "width", "image", "instances",
                        "transforms"}
    # the recorded transform maps original coordinates like the image: resize 0.5, then flip
    np.testing.assert_allclose(out["transforms"].apply_boxes(np.array([[10.0, 4, 30, 16]])),
                               [[15.0, 2, 25, 8]])
    assert (out["height"], out["width"], out["image_id"]) == (40, 60, 10)  # original size
    assert out["image"].dtype == torch.uint8 and out["image"].shape == (3, 20, 30)
    # the image really is the flipped, resized file
    ref = np.asarray(Image.open(records[0]["file_name"]).resize((30, 20), Image.BILINEAR))
    np.testing.assert_array_equal(out["image"].permute(1, 2, 0).numpy(), ref[:, ::-1])
    inst = out["instances"]
    assert isinstance(inst, Instances) and inst.image_size == (20, 30)
    # crowd (id 3) dropped; ann 1 polygon [10,4,30,16] -> scale 0.5 -> [5,2,15,8] -> flip
    # [15,2,25,8]; ann 5 box [50,30,60,40] -> [25,15,30,20] -> flip [0,15,5,20]
    # ann 2 is RLE, so the image's masks are BitMasks
    assert isinstance(inst.gt_masks, BitMasks) and inst.gt_classes.dtype == torch.int64
    inst = _by_box(inst)
    torch.testing.assert_close(inst.gt_boxes.tensor, torch.tensor(
        [[0, 15, 5, 20], [15, 2, 25, 8], [15, 2, 25, 8]], dtype=torch.float32))
    torch.testing.assert_close(inst.gt_masks.get_bounding_boxes().tensor, inst.gt_boxes.tensor)


def test_polygon_format_keeps_transformed_polygons(records):
    rec = dict(records[0], annotations=[a for a in records[0]["annotations"] if a["id"] != 2])
    out = DatasetMapper(True, [20], 1000, flip_prob=1.0)(rec, rng=np.random.default_rng(0))
    inst = _by_box(out["instances"])
    assert isinstance(inst.gt_masks, PolygonMasks) and len(inst) == 2
    np.testing.assert_allclose(inst.gt_masks.polygons[1][0], [25, 2, 15, 2, 15, 8, 25, 8])
    np.testing.assert_allclose(inst.gt_masks.polygons[0][0], [5, 15, 0, 15, 0, 20, 5, 20])
    torch.testing.assert_close(inst.gt_masks.get_bounding_boxes().tensor, inst.gt_boxes.tensor)


def test_bitmask_format_without_flip(records):
    mapper = DatasetMapper(True, [80], 1000, flip_prob=0.0, mask_format="bitmask")
    inst = _by_box(mapper(records[2], rng=np.random.default_rng(0))["instances"])
    # image 50x20 -> short side 80: scale 4 -> 200x80; box [2,20,12,40] -> [8,80,48,160]
    assert inst.image_size == (200, 80)
    torch.testing.assert_close(inst.gt_boxes.tensor, torch.tensor([[8.0, 80, 48, 160]]))
    assert inst.gt_masks.tensor.shape == (1, 200, 80)
    mask_box = inst.gt_masks.get_bounding_boxes().tensor
    assert (mask_box - inst.gt_boxes.tensor).abs().max() <= 1.0
    assert inst.gt_classes.tolist() == [1]


def test_boxes_clipped_and_empty_ones_removed(records):
    rec = dict(records[0])
    rec["annotations"] = [
        {"bbox": [50, 30, 20, 20], "bbox_mode": "xywh", "category_id": 0, "iscrowd": 0, "id": 1,
         "segmentation": [[50, 30, 70, 30, 70, 50, 50, 50]], "area": 100.0},
        {"bbox": [70, 45, 5, 5], "bbox_mode": "xywh", "category_id": 1, "iscrowd": 0, "id": 2,
         "segmentation": [[70, 45, 75, 45, 75, 50]], "area": 12.5},  # entirely outside
    ]
    mapper = DatasetMapper(True, [20], 1000, flip_prob=0.0)
    inst = mapper(rec, rng=np.random.default_rng(0))["instances"]
    assert len(inst) == 1 and len(inst.gt_masks) == 1 and inst.gt_classes.tolist() == [0]
    torch.testing.assert_close(inst.gt_boxes.tensor, torch.tensor([[25.0, 15, 30, 20]]))


def test_image_without_annotations_and_box_only(records):
    out = DatasetMapper(True, [20], 1000)(records[1], rng=np.random.default_rng(0))
    assert len(out["instances"]) == 0 and out["instances"].gt_boxes.tensor.shape == (0, 4)
    out = DatasetMapper(True, [20], 1000, use_masks=False)(records[0], rng=np.random.default_rng(0))
    assert not out["instances"].has("gt_masks") and len(out["instances"]) == 3
    boxless = dict(records[2], annotations=[{k: v for k, v in a.items() if k != "segmentation"}
                                            for a in records[2]["annotations"]])
    with pytest.raises(ValueError, match=r"c.png: annotation id 7 has no segmentation"):
        DatasetMapper(True, [20], 1000)(boxless, rng=np.random.default_rng(0))


def test_test_mode_has_no_instances_and_resizes_deterministically(records):
    mapper = DatasetMapper(False, 25, 1000)
    a, b = mapper(records[0]), mapper(records[0])
    assert "instances" not in a and a["image"].shape == (3, 25, 38)  # 60 * 25/40 = 37.5 -> 38
    assert torch.equal(a["image"], b["image"])
    assert records[0]["annotations"][0]["segmentation"] == [[10, 4, 30, 4, 30, 16, 10, 16]]


def test_from_config():
    cfg = {"min_size_train": [192, 224], "max_size_train": 400, "min_size_test": 224,
           "max_size_test": 400, "random_flip": 0.5, "mask_format": "bitmask"}
    train, test = DatasetMapper.from_config(cfg, True), DatasetMapper.from_config(cfg, False)
    assert train.is_train and train.mask_format == "bitmask" and len(train.augmentations) == 2
    assert not test.is_train and len(test.augmentations) == 1
    with pytest.raises(ValueError, match="mask_format"):
        DatasetMapper(True, [10], 100, mask_format="rle")


def test_corrupt_truncated_and_missing_images_name_the_file(tmp_path, records):
    bad = tmp_path / "corrupt.jpg"
    bad.write_bytes(b"this is not an image at all")
    with pytest.raises(ImageReadError, match=r"corrupt.jpg") as err:
        read_image(str(bad))
    assert err.value.path == str(bad) and isinstance(err.value, OSError)
    good = open(records[0]["file_name"], "rb").read()
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good[: len(good) // 2])
    with pytest.raises(ImageReadError, match=r"truncated.png"):
        DatasetMapper(True, [20], 1000)(dict(records[0], file_name=str(truncated)))
    with pytest.raises(ImageReadError, match=r"missing.png: file not found"):
        read_image(str(tmp_path / "missing.png"))


def test_size_mismatch_names_the_file(records):
    rec = dict(records[0], height=41)
    with pytest.raises(ValueError, match=r"a.png: decoded image is 40x60.*says 41x60$"):
        DatasetMapper(False, 20, 1000)(rec)
    # the size of the stored, unrotated pixels: the message points at the EXIF orientation
    rec = dict(records[0], height=60, width=40)
    with pytest.raises(ValueError, match=r"a.png: decoded image is 40x60.*says 60x40; height "
                                         r"and width are swapped.*EXIF orientation"):
        DatasetMapper(False, 20, 1000)(rec)


def test_exif_orientation_and_grayscale(tmp_path):
    pixels = np.zeros((20, 40), np.uint8)  # stored landscape 40 wide x 20 high
    pixels[:, :10] = 255  # bright left strip
    img = Image.fromarray(pixels)
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display": upright it is 20 wide x 40 high
    path = os.path.join(tmp_path, "rotated.jpg")
    img.save(path, exif=exif, quality=95)
    arr = read_image(path)
    assert arr.shape == (40, 20, 3) and arr.dtype == np.uint8
    assert arr[:10].mean() > 200 and arr[-10:].mean() < 50  # left strip is now at the top
    rec = {"file_name": path, "image_id": 1, "height": 40, "width": 20, "annotations": []}
    assert DatasetMapper(False, 20, 1000)(rec)["image"].shape == (3, 40, 20)


def test_polygon_and_rle_images_give_the_same_targets(records):
    """One batch can hold PolygonMasks (a polygon-only image) and BitMasks (an image with RLE):
    the same object gives the same boxes and, up to rasterisation, the same mask targets."""
    rec = records[0]
    poly_ann = next(a for a in rec["annotations"] if a["id"] == 1)  # polygon [10,4,30,16]
    rle_ann = next(a for a in rec["annotations"] if a["id"] == 2)  # the same box as an RLE
    # scale 2: the object's edges stay on pixel edges, so the bit mask holds it exactly and
    # only the crop (RoIAlign + threshold vs. rasterising in the box) can differ
    mapper = DatasetMapper(True, [80], 1000, flip_prob=1.0)
    insts = [mapper(dict(rec, annotations=[a]), rng=np.random.default_rng(0))["instances"]
             for a in (poly_ann, rle_ann)]
    assert isinstance(insts[0].gt_masks, PolygonMasks) and isinstance(insts[1].gt_masks, BitMasks)
    torch.testing.assert_close(insts[0].gt_boxes.tensor, insts[1].gt_boxes.tensor)
    torch.testing.assert_close(insts[0].gt_boxes.tensor, torch.tensor([[60.0, 8, 100, 32]]))
    for shift in ([-2.0, -1.5, 1.0, 2.5], [3.3, 2.7, -4.1, 0.6], [-7.9, 0.2, 9.4, -3.3]):
        box = insts[0].gt_boxes.tensor + torch.tensor(shift)  # a proposal around the object
        targets = [i.gt_masks.crop_and_resize(box, 14) for i in insts]
        for t in targets:
            assert set(t.unique().tolist()) <= {0.0, 1.0}
        assert (targets[0] != targets[1]).sum() <= 2, shift  # rasteriser ties at most


def test_rle_masks_follow_resize_and_flip(records):
    """Several RLE masks decoded together land where the transformed polygons rasterise."""
    rec = dict(records[0], annotations=[
        {"bbox": [10, 4, 20, 12], "category_id": 0, "iscrowd": 0, "id": 1, "area": 1.0,
         "segmentation": rle_of(polygons_to_bitmask([[10, 4, 30, 4, 30, 16]], 40, 60).numpy())},
        {"bbox": [35, 20, 20, 15], "category_id": 1, "iscrowd": 0, "id": 2, "area": 1.0,
         "segmentation": rle_of(polygons_to_bitmask([[35, 20, 55, 20, 45, 35]], 40, 60).numpy())},
    ])
    inst = DatasetMapper(True, [80], 1000, flip_prob=1.0)(rec, rng=np.random.default_rng(0))[
        "instances"]
    assert inst.gt_masks.tensor.shape == (2, 80, 120)
    for mask, poly in zip(inst.gt_masks.tensor, ([[10, 4, 30, 4, 30, 16]], [[35, 20, 55, 20, 45, 35]])):
        flipped = [[120 - 2 * v if k % 2 == 0 else 2 * v for k, v in enumerate(p)] for p in poly]
        direct = polygons_to_bitmask(flipped, 80, 120)
        assert (mask ^ direct).sum() <= 0.1 * direct.sum(), (mask.sum(), direct.sum())


def test_masks_stay_aligned_on_the_embedded_dataset(tmp_path):
    from segkit.data import get_dataset
    records, _ = get_dataset({"name": "embedded", "split": "val", "root": str(tmp_path / "emb"),
                              "num_train_images": 2, "num_val_images": 6, "image_size": 128})
    mapper = DatasetMapper(True, [96, 144], 400, flip_prob=0.5)
    rng = np.random.default_rng(1)
    for rec in records:
        inst = mapper(rec, rng=rng)["instances"]
        assert len(inst) == len(rec["annotations"]) > 0
        assert isinstance(inst.gt_masks, BitMasks)  # RLE -> bit masks even for "polygon"
        assert inst.gt_masks.tensor.shape[1:] == inst.image_size
        diff = (inst.gt_masks.get_bounding_boxes().tensor - inst.gt_boxes.tensor).abs()
        assert diff.max() <= 1.0 + 1e-4, rec["file_name"]
        assert isinstance(inst.gt_boxes, Boxes)
