"""Box2BoxTransform vs torchvision's BoxCoder, round trips and clamping."""
import math

import pytest
import torch
from torchvision.models.detection._utils import BoxCoder

from segkit.modeling.box_coder import Box2BoxTransform


def _random_boxes(n, gen):
    xy = torch.rand(n, 2, generator=gen) * 200
    wh = torch.rand(n, 2, generator=gen) * 100 + 1
    return torch.cat([xy, xy + wh], dim=1)


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)])
def test_matches_torchvision_boxcoder(weights):
    gen = torch.Generator().manual_seed(0)
    src, tgt = _random_boxes(50, gen), _random_boxes(50, gen)
    ours, tv = Box2BoxTransform(weights), BoxCoder(weights)
    deltas = ours.get_deltas(src, tgt)
    torch.testing.assert_close(deltas, tv.encode_single(tgt, src))
    # class-specific deltas (N, K*4), with some large dw to exercise the clamp
    many = torch.randn(50, 12, generator=gen) * 3
    torch.testing.assert_close(ours.apply_deltas(many, src),
                               tv.decode_single(many, src).reshape(50, 12))


def test_round_trip_and_identity():
    gen = torch.Generator().manual_seed(1)
    src, tgt = _random_boxes(100, gen), _random_boxes(100, gen)
    coder = Box2BoxTransform((10.0, 10.0, 5.0, 5.0))
    torch.testing.assert_close(coder.apply_deltas(coder.get_deltas(src, tgt), src), tgt,
                               atol=1e-3, rtol=1e-5)
    torch.testing.assert_close(coder.apply_deltas(torch.zeros(100, 4), src), src)
    assert torch.count_nonzero(coder.get_deltas(src, src)) == 0


def test_hand_computed_and_clamp():
    coder = Box2BoxTransform((1.0, 1.0, 1.0, 1.0))
    src = torch.tensor([[0.0, 0.0, 10.0, 20.0]])
    tgt = torch.tensor([[5.0, 10.0, 25.0, 30.0]])  # centre (15, 20) vs (5, 10); size 20x20
    expected = torch.tensor([[1.0, 0.5, math.log(2.0), 0.0]])
    torch.testing.assert_close(coder.get_deltas(src, tgt), expected)
    huge = coder.apply_deltas(torch.tensor([[0.0, 0.0, 50.0, 50.0]]), src)
    assert torch.isfinite(huge).all()
    torch.testing.assert_close(huge[0, 2] - huge[0, 0], torch.tensor(10 * 1000 / 16))


def test_bad_inputs():
    with pytest.raises(ValueError, match="4 positive"):
        Box2BoxTransform((1.0, 1.0, 1.0))
    coder = Box2BoxTransform((1.0, 1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match=r"\(N, K\*4\)"):
        coder.apply_deltas(torch.zeros(3, 5), torch.zeros(3, 4))
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        coder.get_deltas(torch.zeros(3, 4), torch.zeros(2, 4))
