"""Mask samples of the DeepMask/SharpMask patch sampler: canonical geometry checked by hand,
jitter bounds, flip, small images, border objects, RLE labels, images without objects."""
import numpy as np
import pytest
import torch

from segkit.data import load_coco_json
from segkit_deepmask.data import GREY, PatchSampler, square, write_coco_dataset

NO_JITTER = {"max_shift": 0.0, "max_log2_scale": 0.0, "flip_prob": 0.0}
OBJ = (200, 120, 30)  # object colour
BG = 40


def _records(root, images):
    return load_coco_json(*write_coco_dataset(str(root), images))[0]


@pytest.fixture(scope="module")
def one_square(tmp_path_factory):
    """A 300 x 300 image with one 46 px square: canonical scale f = 46 / 92 = 0.5."""
    obj = {"polygon": square(127, 127, 46), "color": OBJ}
    return _records(tmp_path_factory.mktemp("square"), [
        {"height": 300, "width": 300, "objects": [obj]},
        {"height": 300, "width": 300, "objects": [dict(obj, segmentation="rle")]},
        {"height": 50, "width": 60, "objects": []}])


def _mask_box(mask, threshold=0.0):
    """(y0, x0, y1, x1) inclusive extent of the cells above ``threshold`` (+1 in a label)."""
    ys, xs = torch.nonzero(mask > threshold, as_tuple=True)
    return int(ys.min()), int(xs.min()), int(ys.max()), int(xs.max())


def test_canonical_patch_by_hand(one_square):
    # label at window resolution (g = 160): the 92 px canonical object is centred in the
    # 160 window, cells 34..125; the 192 input shows it at 50..141 (16 px of context)
    sampler = PatchSampler(one_square, label_size=160, **NO_JITTER)
    for seed in range(4):
        s = sampler.mask_sample(np.random.default_rng(seed))
        assert s["kind"] == "mask" and s["image"].shape == (3, 192, 192)
        assert s["image"].dtype == torch.uint8 and s["mask"].shape == (160, 160)
        assert set(s["mask"].unique().tolist()) == {-1.0, 1.0}
        assert s["window"].tolist() == [110.0, 110.0, 190.0, 190.0]  # 160 * 0.5 around 150
        assert s["crop"].tolist() == [102.0, 102.0, 198.0, 198.0]
        assert _mask_box(s["mask"]) == (34, 34, 125, 125)
        assert int((s["mask"] > 0).sum()) == 92 * 92
        red = s["image"][0].float()
        lit = torch.nonzero(red[96] > (OBJ[0] + BG) / 2).flatten()
        assert (int(lit.min()), int(lit.max())) == (50, 141)
        assert int(red[10, 10]) == BG and s["ann_id"] in (1, 2)


def test_default_geometry_and_nips_preset(one_square):
    s = PatchSampler(one_square, **NO_JITTER).mask_sample(np.random.default_rng(0))
    assert s["mask"].shape == (112, 112) and s["image"].shape == (3, 192, 192)
    # 92 / 160 of the 112 label = 64.4 cells
    assert abs(int((s["mask"] > 0).sum()) - 64.4 ** 2) < 2 * 65
    nips = PatchSampler.from_preset("deepmask_nips", one_square, **NO_JITTER)
    assert nips.geometry.canonical_size == 128 and nips.geometry.input_size == 224
    s = nips.mask_sample(np.random.default_rng(0))
    assert s["image"].shape == (3, 224, 224) and s["mask"].shape == (224, 224)
    y0, x0, y1, x1 = _mask_box(s["mask"])
    assert (y0, x0, y1, x1) == (48, 48, 175, 175)  # 128 px centred in 224
    assert PatchSampler.from_preset("sharpmask", one_square).geometry.label_size == 160


def test_jitter_stays_within_bounds(one_square):
    sampler = PatchSampler(one_square, label_size=160)
    shifts, scales = [], []
    for seed in range(150):
        s = sampler.mask_sample(np.random.default_rng(seed))
        x0, y0, x1, y1 = s["window"].tolist()
        f = (x1 - x0) / 160  # image pixels per patch pixel
        shifts.append([((x0 + x1) / 2 - 150) / f, ((y0 + y1) / 2 - 150) / f])
        scales.append(np.log2(f / 0.5))
        # label and image show the object at 92 * 2^-s px, its centre moved by -shift
        # (mirrored when flipped); the window is at 16..175 in the 192 input
        side = 92 * 0.5 / f
        dx, dy = (-v for v in shifts[-1])
        dx = -dx if s["flipped"] else dx
        red = s["image"][0, 16:176, 16:176].float()
        for y0, x0, y1, x1 in (_mask_box(s["mask"]), _mask_box(red, (OBJ[0] + BG) / 2)):
            assert abs((x0 + x1 + 1) / 2 - (80 + dx)) <= 1
            assert abs((y0 + y1 + 1) / 2 - (80 + dy)) <= 1
            assert abs((x1 - x0 + 1) - side) <= 1.5 and abs((y1 - y0 + 1) - side) <= 1.5
    shifts, scales = np.abs(shifts), np.abs(scales)
    assert shifts.max() <= 16 + 1e-6 and scales.max() <= 0.25 + 1e-9
    assert shifts.max() > 13 and scales.max() > 0.2  # the jitter is used, not just bounded


def test_flip_mirrors_image_and_mask(tmp_path):
    triangle = {"polygon": [100, 100, 160, 100, 100, 150], "color": OBJ}
    records = _records(tmp_path, [{"height": 260, "width": 260, "objects": [triangle]}])
    plain = PatchSampler(records, flip_prob=0.0).mask_sample(np.random.default_rng(3))
    flipped = PatchSampler(records, flip_prob=1.0).mask_sample(np.random.default_rng(3))
    assert flipped["flipped"] and not plain["flipped"]
    assert torch.equal(plain["window"], flipped["window"])
    assert torch.equal(flipped["image"], plain["image"].flip(-1))
    assert torch.equal(flipped["mask"], plain["mask"].flip(-1))
    assert not torch.equal(plain["mask"], flipped["mask"])  # the triangle is not symmetric


def test_image_smaller_than_window_is_padded_grey(tmp_path):
    records = _records(tmp_path, [{"height": 30, "width": 40,
                                   "objects": [{"polygon": square(12, 8, 16), "color": OBJ}]}])
    s = PatchSampler(records, **NO_JITTER).mask_sample(np.random.default_rng(0))
    # f = 16 / 92: the 192 patch spans 33 image px > 30, so rows at the top/bottom are grey
    img = s["image"]
    assert torch.all(img[:, 0] == GREY) and torch.all(img[:, -1] == GREY)
    assert int(img[0, 96, 96]) == OBJ[0]
    assert int((s["mask"] > 0).sum()) > 60 * 60


def test_border_object_label_cut_at_image_border(tmp_path):
    # the polygon leaves the image on the left; the record's bbox is clipped to x in [0, 30]
    obj = {"polygon": [-20, 20, 30, 20, 30, 60, -20, 60], "color": OBJ}
    records = _records(tmp_path, [{"height": 100, "width": 120, "objects": [obj]},
                                  {"height": 100, "width": 120,
                                   "objects": [dict(obj, segmentation="rle")]}])
    sampler = PatchSampler(records, label_size=160, **NO_JITTER)
    for seed in range(2):
        s = sampler.mask_sample(np.random.default_rng(seed))
        x0, _, x1, _ = s["window"].tolist()
        f = (x1 - x0) / 160
        border = int(round(-x0 / f))  # label column of image x = 0
        assert 0 < border < 80
        assert torch.all(s["mask"][:, :border] == -1)  # outside the image: background
        assert torch.all(s["mask"][80, border:border + 10] == 1)
        crop_left = int(round((0 - float(s["crop"][0])) / f))
        assert torch.all(s["image"][:, :, :crop_left - 1] == GREY)  # grey padding


def test_images_without_objects_give_no_mask_sample(one_square):
    sampler = PatchSampler(one_square)
    seen = {sampler.mask_sample(np.random.default_rng(seed))["image_id"] for seed in range(40)}
    assert seen == {1, 2}  # image 3 has no object


def test_polygon_and_rle_labels_agree(one_square):
    # one record each: the same seed draws the same jitter for the polygon and the RLE copy
    poly = PatchSampler([one_square[0]]).mask_sample(np.random.default_rng(5))
    rle = PatchSampler([one_square[1]]).mask_sample(np.random.default_rng(5))
    assert torch.equal(poly["window"], rle["window"]) and torch.equal(poly["image"], rle["image"])
    assert int((poly["mask"] != rle["mask"]).sum()) <= 2 * 112  # at most the boundary cells


def test_patches_are_uint8_0_255_like_the_core_images(one_square):
    """One pixel convention with the core mapper: uint8 RGB 0-255, grey fill 128 (the
    released 0.5 grey); a fill in the old [0, 1] scale is refused."""
    s = PatchSampler(one_square, fill=100, **NO_JITTER).mask_sample(np.random.default_rng(0))
    assert s["image"].dtype == torch.uint8 and int(s["image"].max()) == OBJ[0]
    assert PatchSampler(one_square).fill == GREY == 128
    with pytest.raises(ValueError, match="'fill' must be an integer grey level"):
        PatchSampler(one_square, fill=0.5)
