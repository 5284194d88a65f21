"""Compiled mask pasting against the grid_sample implementation it replaces."""
import pytest
import torch

from segkit.layers import get_backend, paste_masks_in_image
from segkit.layers.mask_ops import _paste_grid_sample


def test_compiled_paste_is_the_backend():
    assert get_backend()["paste_masks"] == "segkit._C"


@pytest.mark.parametrize("mask_size", [(28, 28), (14, 20)])
def test_paste_equals_grid_sample_on_random_and_edge_boxes(mask_size):
    gen = torch.Generator().manual_seed(mask_size[1])
    n, h, w = 60, 90, 130
    masks = torch.rand((n,) + mask_size, generator=gen)
    centre = torch.rand(n, 2, generator=gen) * torch.tensor([w * 1.2, h * 1.2]) - 10
    size = torch.exp(torch.empty(n, 2).uniform_(0.0, 5.0, generator=gen))
    boxes = torch.cat([centre - size / 2, centre + size / 2], dim=1)
    boxes[:6] = torch.tensor([
        [-40.0, -30.0, -5.0, -2.0],    # outside the image
        [10.0, 10.0, 10.0, 30.0],      # zero width: empty mask
        [50.0, 40.0, 20.0, 60.0],      # inverted: empty mask
        [-500.0, -400.0, 900.0, 800.0],  # much larger than the image
        [0.0, 0.0, float(w), float(h)],  # the whole image
        [3.3, 4.6, 4.1, 5.2],          # smaller than a pixel
    ])
    for threshold in (0.5, 0.2):
        out = paste_masks_in_image(masks, boxes, (h, w), threshold)
        ref = _paste_grid_sample(masks, boxes, (h, w), threshold)
        assert out.dtype == torch.bool and out.shape == (n, h, w)
        # the same float arithmetic as grid_sample: equal pixel for pixel
        assert torch.equal(out, ref)
    assert not out[:3].any() and out[3].any()


def test_paste_hand_case_and_errors():
    # a 2x2 mask with one "on" cell pasted into a 4x4 box at (2, 2): bilinear falls to
    # exactly 0.5 on the cell border, so the pixels whose centre lies in that quarter are on
    mask = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    out = paste_masks_in_image(mask, torch.tensor([[2.0, 2.0, 6.0, 6.0]]), (8, 8))
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[2:4, 2:4] = True
    assert torch.equal(out[0], expected)
    with pytest.raises(RuntimeError, match=r"boxes must have shape \(1, 4\) XYXY"):
        torch.ops.segkit.paste_masks(mask, torch.zeros(2, 4), 8, 8, 0.5)
    with pytest.raises(RuntimeError, match=r"masks must have shape \(N, M, M\)"):
        torch.ops.segkit.paste_masks(mask[0], torch.zeros(1, 4), 8, 8, 0.5)
    empty = paste_masks_in_image(torch.zeros(0, 28, 28), torch.zeros(0, 4), (5, 7))
    assert empty.shape == (0, 5, 7)
    torch.library.opcheck(torch.ops.segkit.paste_masks.default,
                          (torch.rand(3, 7, 7), torch.tensor([[1.0, 1, 5, 6]] * 3), 9, 11, 0.5))
