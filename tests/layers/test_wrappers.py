"""Conv2d with norm/activation, cat, ShapeSpec."""
import torch
import torch.nn.functional as F
from torch import nn

from segkit.layers import Conv2d, ShapeSpec, cat, get_norm


def test_conv2d_applies_norm_then_activation():
    torch.manual_seed(0)
    conv = Conv2d(3, 8, 3, padding=1, bias=False, norm=get_norm("gn", 8), activation=F.relu)
    x = torch.randn(2, 3, 9, 9)
    ref = F.relu(conv.norm(F.conv2d(x, conv.weight, None, 1, 1)))
    torch.testing.assert_close(conv(x), ref)
    assert "norm.weight" in conv.state_dict()
    assert conv(torch.zeros(0, 3, 9, 9)).shape == (0, 8, 9, 9)
    plain = Conv2d(3, 8, 1)
    torch.testing.assert_close(plain(x), nn.functional.conv2d(x, plain.weight, plain.bias))


def test_cat():
    a = torch.ones(2, 3)
    assert cat([a]) is a
    assert cat([a, torch.zeros(1, 3)]).shape == (3, 3)
    assert cat((a, a), dim=1).shape == (2, 6)


def test_shape_spec():
    s = ShapeSpec(channels=256, stride=4)
    assert s.channels == 256 and s.stride == 4 and s.height is None
    assert s._replace(stride=8) == ShapeSpec(256, 8)
