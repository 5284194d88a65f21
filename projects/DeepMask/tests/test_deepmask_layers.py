"""Mirror padding (papers.md 2.1 item 5) and the context crop."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from segkit_deepmask.layers import convert_padding, crop_border, pad2d


def test_symmetric_and_reflect_on_a_hand_example():
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]]).view(1, 1, 1, 4)  # a b c d
    sym = pad2d(x, (3, 2, 0, 0), "symmetric")
    ref = pad2d(x, (3, 2, 0, 0), "reflect")
    # symmetric repeats the edge (cba|abcd|dc), reflect does not (dcb|abcd|cb)
    assert sym.flatten().tolist() == [3, 2, 1, 1, 2, 3, 4, 4, 3]
    assert ref.flatten().tolist() == [4, 3, 2, 1, 2, 3, 4, 3, 2]
    # torch's "reflect" is numpy's "reflect"; our "symmetric" is numpy's / Matlab's "symmetric"
    assert torch.equal(ref, F.pad(x, (3, 2, 0, 0), mode="reflect"))
    assert sym.flatten().tolist() == np.pad(np.arange(1, 5), (3, 2), mode="symmetric").tolist()


def test_symmetric_pads_both_axes_like_numpy():
    x = torch.arange(12.0).view(1, 1, 3, 4)
    got = pad2d(x, (1, 2, 2, 1), "symmetric")[0, 0]
    want = np.pad(np.arange(12.0).reshape(3, 4), ((2, 1), (1, 2)), mode="symmetric")
    assert got.tolist() == want.tolist()
    with pytest.raises(ValueError, match="larger than the input"):
        pad2d(x, (0, 0, 4, 0), "symmetric")


@pytest.mark.parametrize("mode", ["symmetric", "reflect"])
def test_converted_conv_pads_its_input_and_keeps_its_weights(mode):
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, kernel_size=3, padding=1)
    x = torch.randn(1, 2, 5, 6, requires_grad=True)
    keys = set(conv.state_dict())
    convert_padding(conv, mode)
    want = F.conv2d(pad2d(x, (1, 1, 1, 1), mode), conv.weight, conv.bias)
    got = conv(x)
    assert got.shape == (1, 3, 5, 6) and torch.allclose(got, want)
    got.sum().backward()  # differentiable through the padding
    assert x.grad is not None and set(conv.state_dict()) == keys
    with pytest.raises(ValueError, match="already pads"):
        convert_padding(conv, mode)


def test_convert_padding_skips_1x1_and_zeros_is_a_no_op():
    net = nn.Sequential(nn.Conv2d(1, 1, 1), nn.Conv2d(1, 1, 7, padding=3))
    convert_padding(net, "zeros")
    assert net[1].padding == (3, 3)
    convert_padding(net, "symmetric")
    assert net[0].padding == (0, 0) and not hasattr(net[0], "mirror_padding")
    assert net[1].padding == (0, 0) and net[1].mirror_padding == "symmetric"
    assert net(torch.randn(1, 1, 9, 9)).shape == (1, 1, 9, 9)
    with pytest.raises(ValueError, match="padding must be one of"):
        convert_padding(net, "mirror")


def test_crop_border():
    x = torch.arange(36.0).view(1, 1, 6, 6)
    assert torch.equal(crop_border(x, 1), x[..., 1:5, 1:5])
    assert crop_border(x, 0) is x
    with pytest.raises(ValueError, match="cannot crop"):
        crop_border(x, 3)
