"""Full-image inference geometry (papers.md 2.4): where a window lands in the original image,
the bilinear resize of its mask, the 0.2 threshold, clipping, and the ranking over scales.

The dense outputs are replaced by hand-made ones, so every expected value is computed here
from the definition, independently of the implementation."""
import math

import pytest
import torch
import torch.nn.functional as F

from segkit_deepmask.modeling import (InferenceSettings, full_image_inference,
                                      paste_window_masks, window_boxes)

from deepmask_testing import image_input, tiny

LOGIT_02 = math.log(0.2 / 0.8)


@pytest.fixture(scope="module")
def model():
    return tiny("deepmask")


def _fake_dense(model, monkeypatch, marked, pattern, seen=None):
    """Dense outputs scoring -5 everywhere except ``marked`` = {(i, j): score logit}; the
    marked windows get the mask ``pattern`` (56 x 56 logits), the others -20 everywhere.
    With ``seen`` (a list), scores are random instead and every score map is appended."""
    def forward_dense(images, masks=True, skips=True):
        h, w = images.shape[-2] // 16 - 9, images.shape[-1] // 16 - 9  # 10 x 10 windows
        scores = torch.full((1, h, w), -5.0) if seen is None else torch.randn(1, h, w)
        emb = torch.zeros(1, 2, h, w)
        for (i, j), score in marked.items():
            scores[0, i, j], emb[0, 0, i, j] = score, 1.0
        if seen is not None:
            seen.append(scores[0].clone())
        return {"scores": scores, "embeddings": emb}

    monkeypatch.setattr(model, "forward_dense", forward_dense)
    monkeypatch.setattr(model, "coarse_mask_logits", lambda v: torch.where(
        v[:, :1, None] > 0, pattern, torch.full_like(pattern, -20.0)))


def _settings(log2_scale, **kw):
    return InferenceSettings(log2_scale_min=log2_scale, log2_scale_max=log2_scale, **kw)


def test_window_boxes_follow_papers_2_4():
    # 0-based (i, j): top-left ((16 j - 80) / s, (16 i - 80) / s), side 160 / s, per axis
    boxes = window_boxes(torch.tensor([2, 0]), torch.tensor([3, 5]), 160, 16, (0.25, 0.4))
    want = [[(48 - 80) / 0.25, (32 - 80) / 0.4, (48 + 80) / 0.25, (32 + 80) / 0.4],
            [0.0, -80 / 0.4, 160 / 0.25, 80 / 0.4]]
    assert torch.allclose(boxes, torch.tensor(want))


def test_a_window_lands_where_the_hand_computation_puts_it(model, monkeypatch):
    """Scale 1/2, window (i, j) = (3, 5): top-left ((16 * 5 - 80) * 2, (16 * 3 - 80) * 2) =
    (0, -64), side 320. The image is 200 x 300, so the window leaves it at the top, right and
    bottom: the pasted mask is the 56 -> 320 bilinear resize, cut to the image."""
    yy, xx = torch.meshgrid(torch.arange(56.0), torch.arange(56.0), indexing="ij")
    pattern = 4.0 - ((yy - 30) ** 2 + (xx - 20) ** 2) / 60.0  # a blob, logits 4 .. -50
    _fake_dense(model, monkeypatch, {(3, 5): 3.0}, pattern)
    inp = image_input(100, 150, height=200, width=300)  # the mapper halved the image
    inst = full_image_inference(model, [inp], _settings(-1.0, max_proposals=3))[0]
    assert inst.image_size == (200, 300) and len(inst) == 3
    assert torch.allclose(inst.scores[0], torch.sigmoid(torch.tensor(3.0)))
    assert inst.window_boxes.tensor[0].tolist() == [0.0, -64.0, 320.0, 256.0]
    assert inst.log2_scales.tolist() == [-1.0] * 3 and inst.pred_classes.tolist() == [0] * 3

    up = F.interpolate(pattern[None, None], size=(320, 320), mode="bilinear",
                       align_corners=False)[0, 0]
    want = torch.zeros(200, 300, dtype=torch.bool)
    want[:, :] = (up > LOGIT_02)[64:264, 0:300]  # rows -64.. of the window are cut off
    near = torch.zeros(200, 300, dtype=torch.bool)
    near[:, :] = ((up - LOGIT_02).abs() < 1e-4)[64:264, 0:300]
    got = inst.pred_masks[0]
    assert int(near.sum()) < 20 and want.sum() > 1000
    assert got.dtype == torch.bool and torch.equal(got[~near], want[~near])
    ys, xs = torch.nonzero(want, as_tuple=True)
    assert inst.pred_boxes.tensor[0].tolist() == [xs.min().item(), ys.min().item(),
                                                  xs.max().item() + 1, ys.max().item() + 1]
    # the other windows score -5 and have empty masks: their box is the clipped window
    assert not inst.pred_masks[1:].any()
    clipped = inst.window_boxes.tensor[1:].clone()
    clipped[:, 0::2] = clipped[:, 0::2].clamp(0, 300)
    clipped[:, 1::2] = clipped[:, 1::2].clamp(0, 200)
    assert torch.equal(inst.pred_boxes.tensor[1:], clipped)


@pytest.mark.parametrize("threshold", [0.2, 0.5])
def test_threshold_is_a_probability_on_the_logits(threshold):
    logit = math.log(threshold / (1 - threshold))
    windows = torch.tensor([[10.0, 20.0, 50.0, 60.0]] * 2)
    logits = torch.stack([torch.full((56, 56), logit + 0.01), torch.full((56, 56), logit - 0.01)])
    boxes, masks = paste_window_masks(logits, windows, (40, 30), threshold)
    assert masks[0].sum() == (30 - 10) * (40 - 20) and not masks[1].any()  # clipped at 30, 40
    assert masks[0, 20:40, 10:30].all()
    assert boxes.tolist() == [[10.0, 20.0, 30.0, 40.0]] * 2  # tight box; empty: clipped window
    with pytest.raises(ValueError, match="probability"):
        paste_window_masks(logits, windows, (40, 30), 1.5)


def test_paste_equals_interpolate_on_whole_pixels_and_handles_fractions():
    torch.manual_seed(0)
    logits = torch.randn(3, 56, 56) * 3
    windows = torch.tensor([[5.0, 7.0, 165.0, 167.0], [-40.0, -10.0, 40.0, 70.0],
                            [10.3, 4.6, 100.9, 95.2]])
    _, masks = paste_window_masks(logits, windows, (120, 150))
    for k, (x0, y0, size) in enumerate([(5, 7, 160), (-40, -10, 80)]):
        up = F.interpolate(logits[k][None, None], size=(size, size), mode="bilinear",
                           align_corners=False)[0, 0]
        full = torch.zeros(120 + 2 * size, 150 + 2 * size)  # room for the window anywhere
        full[size + y0:2 * size + y0, size + x0:2 * size + x0] = up - LOGIT_02
        window = full[size:size + 120, size:size + 150]
        inside = torch.zeros_like(window, dtype=torch.bool)
        inside[max(y0, 0):y0 + size, max(x0, 0):x0 + size] = True
        sure = window.abs() > 1e-4
        assert torch.equal(masks[k][sure], (inside & (window > 0))[sure])
    # fractional window: pixels whose centre is inside [10.3, 100.9) x [4.6, 95.2)
    cols = torch.nonzero(masks[2].any(0)).flatten()
    rows = torch.nonzero(masks[2].any(1)).flatten()
    assert cols.min() >= 10 and cols.max() <= 100 and rows.min() >= 5 and rows.max() <= 94


def test_windows_of_all_scales_are_ranked_together(model, monkeypatch):
    seen = []
    torch.manual_seed(0)
    _fake_dense(model, monkeypatch, {}, torch.zeros(56, 56), seen)
    settings = InferenceSettings(max_proposals=40, zoom=1)
    inst = full_image_inference(model, [image_input(30, 40)], settings)[0]
    assert len(seen) == 8 and settings.log2_scales()[-1] == 1.5  # 7 scales + one zoom step
    every = torch.cat([s.flatten() for s in seen])
    assert torch.allclose(inst.score_logits, every.sort(descending=True).values[:40])
    assert torch.all(inst.scores[:-1] >= inst.scores[1:])
    level = {round(v, 3) for v in inst.log2_scales.tolist()}
    assert len(level) > 1 and level <= set(settings.log2_scales())


def test_grouping_windows_by_size_changes_nothing(monkeypatch):
    import segkit_deepmask.modeling.windows as windows_module

    torch.manual_seed(0)
    logits = torch.randn(50, 56, 56) * 3
    x0, y0, side = torch.rand(50) * 100 - 40, torch.rand(50) * 80 - 40, torch.rand(50) * 120 + 20
    windows = torch.stack([x0, y0, x0 + side, y0 + side], 1)
    boxes, masks = paste_window_masks(logits, windows, (60, 90))
    monkeypatch.setattr(windows_module, "_PIXEL_BUDGET", 5000)  # many small groups
    again = paste_window_masks(logits, windows, (60, 90))
    assert torch.equal(boxes, again[0]) and torch.equal(masks, again[1])
    only_boxes, none = paste_window_masks(logits, windows, (60, 90), with_masks=False)
    assert none is None and torch.equal(only_boxes, boxes)
