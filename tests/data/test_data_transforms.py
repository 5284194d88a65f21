"""Transforms: sizes and coordinates against hand-computed values; masks agree with polygons."""
import numpy as np
import pytest

from segkit.data.transforms import (HFlipTransform, RandomFlip, ResizeShortestEdge,
                                    ResizeTransform, TransformList, apply_augmentations)
from segkit.structures import polygons_to_bitmask


@pytest.mark.parametrize("h, w, short, max_size, expected", [
    (480, 640, 800, 1333, (800, 1067)),   # 640 * 800/480 = 1066.67 -> 1067
    (640, 480, 800, 1333, (1067, 800)),
    (200, 1000, 800, 1333, (267, 1333)),  # long side capped: scale 1.333
    (100, 100, 64, 1000, (64, 64)),
    (205, 209, 224, 400, (224, 228)),     # 209 * 224/205 = 228.37
])
def test_resize_shortest_edge_output_shape(h, w, short, max_size, expected):
    assert ResizeShortestEdge.output_shape(h, w, short, max_size) == expected
    t = ResizeShortestEdge([short], max_size).get_transform(h, w, np.random.default_rng(0))
    assert (t.new_h, t.new_w) == expected


def test_resize_shortest_edge_choice_and_range():
    rng = np.random.default_rng(0)
    aug = ResizeShortestEdge([32, 48, 64], 1000)
    sizes = {aug.get_transform(100, 150, rng).new_h for _ in range(60)}
    assert sizes == {32, 48, 64}
    aug = ResizeShortestEdge([32, 40], 1000, sample_style="range")
    sizes = {aug.get_transform(100, 150, rng).new_h for _ in range(200)}
    assert sizes == set(range(32, 41))
    with pytest.raises(ValueError, match="sample_style"):
        ResizeShortestEdge([32], 100, sample_style="nearest")


def test_resize_then_flip_boxes_and_polygons_by_hand():
    t = TransformList([ResizeTransform(40, 60, 20, 30), HFlipTransform(30)])
    assert t.output_size(40, 60) == (20, 30)
    boxes = t.apply_boxes(np.array([[10, 4, 30, 16], [0, 0, 60, 40]], float))
    # scale 0.5 -> [5, 2, 15, 8]; flip x -> 30 - x
    np.testing.assert_allclose(boxes, [[15, 2, 25, 8], [0, 0, 30, 20]])
    (poly,) = t.apply_polygons([np.array([10, 4, 30, 4, 30, 16, 10, 16], float)])
    np.testing.assert_allclose(poly, [25, 2, 15, 2, 15, 8, 25, 8])


def test_image_and_mask_follow_the_same_geometry():
    image = np.zeros((40, 60, 3), np.uint8)
    image[4:16, 10:30] = 255
    mask = image[None, :, :, 0] > 0
    t = TransformList([ResizeTransform(40, 60, 20, 30), HFlipTransform(30)])
    out_img = t.apply_image(image)
    out_mask = t.apply_masks(mask)[0]
    assert out_img.shape == (20, 30, 3) and out_mask.shape == (20, 30)
    # exact 2x down-scale of an even-aligned rectangle: rows 2..7, cols 15..24 after the flip
    expected = np.zeros((20, 30), bool)
    expected[2:8, 15:25] = True
    np.testing.assert_array_equal(out_mask, expected)
    np.testing.assert_array_equal(out_img[..., 0] > 127, expected)


def test_resized_mask_matches_rasterised_resized_polygon():
    """Bilinear+threshold on the mask lands where the resized polygon rasterises (1 px band)."""
    poly = [np.array([5.0, 7.0, 41.0, 3.0, 50.0, 33.0, 12.0, 29.0])]
    mask = polygons_to_bitmask(poly, 40, 60).numpy()[None]
    t = ResizeTransform(40, 60, 52, 78)
    resized = t.apply_masks(mask)[0]
    direct = polygons_to_bitmask(t.apply_polygons(poly), 52, 78).numpy()
    disagree = resized ^ direct
    assert disagree.sum() <= 0.04 * direct.sum()
    iou = (resized & direct).sum() / (resized | direct).sum()
    assert iou > 0.96


def test_flip_of_mask_equals_rasterised_flipped_polygon():
    poly = [np.array([5.0, 7.0, 41.0, 3.0, 50.0, 33.0, 12.0, 29.0])]
    t = HFlipTransform(60)
    flipped_mask = t.apply_masks(polygons_to_bitmask(poly, 40, 60).numpy()[None])[0]
    direct = polygons_to_bitmask(t.apply_polygons(poly), 40, 60).numpy()
    np.testing.assert_array_equal(flipped_mask, direct)


def test_random_flip_probability_and_apply_augmentations():
    rng = np.random.default_rng(0)
    flips = [isinstance(RandomFlip(0.5).get_transform(10, 20, rng), HFlipTransform)
             for _ in range(400)]
    assert 150 < sum(flips) < 250
    assert not any(isinstance(RandomFlip(0.0).get_transform(10, 20, rng), HFlipTransform)
                   for _ in range(20))
    image = np.arange(2 * 4 * 3, dtype=np.uint8).reshape(2, 4, 3)
    out, tfm = apply_augmentations([ResizeShortestEdge([2], 100), RandomFlip(1.0)], image, rng)
    np.testing.assert_array_equal(out, image[:, ::-1])
    np.testing.assert_allclose(tfm.apply_boxes(np.array([[0, 0, 1, 2]])), [[3, 0, 4, 2]])
    with pytest.raises(ValueError, match="prob"):
        RandomFlip(1.5)


def test_flip_of_the_image_is_a_view_and_masks_are_contiguous():
    """The flip adds no copy of the image (the mapper's CHW copy is the only one), while masks
    come back C-contiguous bool, as torch.from_numpy needs."""
    image = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
    flipped = HFlipTransform(6).apply_image(image)
    assert np.shares_memory(flipped, image)
    np.testing.assert_array_equal(flipped, image[:, ::-1])
    resized = ResizeTransform(4, 6, 8, 12).apply_image(flipped)  # works on the strided view
    np.testing.assert_array_equal(resized, ResizeTransform(4, 6, 8, 12).apply_image(
        np.ascontiguousarray(image[:, ::-1])))
    masks = np.zeros((2, 4, 6), np.uint8)
    masks[:, 1:3, :2] = 1
    out = TransformList([HFlipTransform(6), ResizeTransform(4, 6, 4, 6)]).apply_masks(masks)
    assert out.dtype == bool and out.flags.c_contiguous and out[:, 1:3, 4:].all()
    assert out.sum() == 8


def test_masks_with_no_instances_keep_the_output_size():
    t = ResizeTransform(40, 60, 20, 30)
    assert t.apply_masks(np.zeros((0, 40, 60), bool)).shape == (0, 20, 30)
    full = t.apply_masks(np.ones((1, 40, 60), bool))
    assert full.shape == (1, 20, 30) and full.dtype == bool and full.all()
