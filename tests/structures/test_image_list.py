"""ImageList padding: sizes, divisibility, pad value, unpadded views."""
import pytest
import torch

from segkit.structures import ImageList


def test_from_tensors_pads_to_divisible_size():
    a = torch.rand(3, 50, 70)
    b = torch.rand(3, 64, 33)
    images = ImageList.from_tensors([a, b], size_divisibility=32, pad_value=-1.0)
    assert images.tensor.shape == (2, 3, 64, 96)
    assert images.image_sizes == [(50, 70), (64, 33)]
    assert len(images) == 2
    torch.testing.assert_close(images[0], a)
    torch.testing.assert_close(images[1], b)
    assert (images.tensor[0, :, 50:, :] == -1).all() and (images.tensor[1, :, :, 33:] == -1).all()


def test_no_divisibility_uses_max_size():
    images = ImageList.from_tensors([torch.ones(1, 5, 9), torch.ones(1, 7, 2)])
    assert images.tensor.shape == (2, 1, 7, 9)
    assert images.tensor.sum() == 5 * 9 + 7 * 2
    assert images.to(torch.float64).tensor.dtype == torch.float64


def test_bad_inputs():
    with pytest.raises(ValueError, match="non-empty"):
        ImageList.from_tensors([])
    with pytest.raises(ValueError, match="element 1"):
        ImageList.from_tensors([torch.ones(3, 4, 4), torch.ones(1, 4, 4)])
