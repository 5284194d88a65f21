"""DefaultAnchorGenerator vs torchvision's AnchorGenerator and hand-computed anchors."""
import math

import pytest
import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList as TVImageList

from segkit.modeling.anchors import DefaultAnchorGenerator

SIZES = [[32], [64], [128], [256], [512]]
RATIOS = [[0.5, 1.0, 2.0]]


def _features(h, w, levels=range(2, 7)):
    return [torch.zeros(2, 1, math.ceil(h / 2 ** k), math.ceil(w / 2 ** k)) for k in levels]


@pytest.mark.parametrize("hw", [(128, 192), (160, 224)])
def test_exactly_matches_torchvision_in_round_mode(hw):
    h, w = hw
    feats = _features(h, w)
    tv = AnchorGenerator(tuple(tuple(s) for s in SIZES), ((0.5, 1.0, 2.0),) * 5)
    ref = tv(TVImageList(torch.zeros(2, 3, h, w), [(h, w), (h - 10, w - 20)]), feats)[0]
    # strides=None: derived from the padded image like torchvision (P6 of 224 px -> 56, not 64)
    ours = DefaultAnchorGenerator(SIZES, RATIOS, strides=None, round_base=True)(feats, (h, w))
    assert torch.equal(torch.cat(ours), ref)
    if h % 64 == 0 and w % 64 == 0:  # nominal strides give the same grid when sizes divide
        nominal = DefaultAnchorGenerator(SIZES, RATIOS, strides=[4, 8, 16, 32, 64],
                                         round_base=True)(feats)
        assert torch.equal(torch.cat(nominal), ref)


def test_multiple_sizes_per_level_follow_torchvision_order():
    sizes, ratios = [[32, 40, 50]], [[0.5, 1.0, 2.0]]
    feats = [torch.zeros(1, 1, 4, 6)]
    ref = AnchorGenerator(((32, 40, 50),), ((0.5, 1.0, 2.0),))(
        TVImageList(torch.zeros(1, 3, 32, 48), [(32, 48)]), feats)[0]
    ours = DefaultAnchorGenerator(sizes, ratios, strides=[8], round_base=True)(feats)
    assert torch.equal(ours[0], ref)


def test_unrounded_anchors_hand_computed():
    gen = DefaultAnchorGenerator([[32]], [[0.5, 1.0, 2.0]], strides=[16], offset=0.5)
    (anchors,) = gen([torch.zeros(1, 1, 2, 3)])
    assert anchors.shape == (2 * 3 * 3, 4)
    # ratio 0.5 = h/w: w = 32 / sqrt(0.5), h = 32 * sqrt(0.5); area stays 32^2
    w, h = 32 / math.sqrt(0.5), 32 * math.sqrt(0.5)
    expected = torch.tensor([8 - w / 2, 8 - h / 2, 8 + w / 2, 8 + h / 2])
    torch.testing.assert_close(anchors[0], expected)
    areas = (anchors[:, 2] - anchors[:, 0]) * (anchors[:, 3] - anchors[:, 1])
    torch.testing.assert_close(areas, torch.full((18,), 1024.0))
    # (H, W, A) order: anchor 3 is location (y=0, x=1), anchor 9 is (y=1, x=0)
    centers = (anchors[:, :2] + anchors[:, 2:]) / 2
    torch.testing.assert_close(centers[3], torch.tensor([24.0, 8.0]))
    torch.testing.assert_close(centers[9], torch.tensor([8.0, 24.0]))
    assert gen.num_anchors_per_location == [3]


def test_broadcasting_and_errors():
    gen = DefaultAnchorGenerator([[32]], [[1.0]], strides=[4, 8])
    assert gen.sizes == [[32], [32]] and gen.num_levels == 2
    with pytest.raises(ValueError, match="sizes has 3 entries"):
        DefaultAnchorGenerator([[1], [2], [3]], [[1.0]], strides=[4, 8])
    with pytest.raises(ValueError, match="needs image_size"):
        DefaultAnchorGenerator([[32]], [[1.0]])([torch.zeros(1, 1, 2, 2)])
    with pytest.raises(ValueError, match="2 levels"):
        gen([torch.zeros(1, 1, 2, 2)])
    with pytest.raises(ValueError, match="> 0"):
        DefaultAnchorGenerator([[0]], [[1.0]], strides=[4])
    assert "cell_anchors_0" not in gen.state_dict()  # not saved in checkpoints
