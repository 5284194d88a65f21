"""End-to-end parity with torchvision's Faster / Mask R-CNN (ResNet-50-FPN v1).

A torchvision model with random (but non-trivial) weights is converted with
``convert_torchvision_detection`` and loaded into segkit's model built from the experiment
configs ``{mask,faster}_rcnn_r50_fpn_torchvision``; both run the same image in eval mode.

Tolerances and why:
* boxes: atol 1e-2 px. Both sides compute the same float32 graph but with different op order
  (FPN, box decoding), so values differ in the last bits (observed max ~5e-3 px).
* scores: atol 1e-4 (observed ~3e-5), classes: equal after the id mapping (segkit c = tv c - 1).
* masks before pasting: the (N, 28, 28) probabilities of the predicted class, atol 1e-4.
* pasted masks: torchvision pastes with box corners truncated to integers and enlarged by one
  pixel (maskrcnn-benchmark's legacy paste); segkit pastes with sub-pixel geometry (pixel
  centres, ``segkit.layers.paste_masks_in_image``, detectron2's way). A boundary thus moves by
  ~1 px and a short box is stretched by up to one pixel, so the brief's ">= 99% per box" is out
  of reach for boxes of 15-40 px (observed 87.5-99.5% per box, 97% overall). We check instead:
  (a) torchvision's own paste applied to segkit's 28x28 probabilities and boxes reproduces
  torchvision's masks (>= 99.9% of in-box pixels; observed 100%: a box corner within 5e-3 px of
  an integer could flip one row), so any difference comes from the paste geometry alone;
  (b) segkit's masks agree with torchvision's on >= 95% of in-box pixels (pixel centre inside
  the box, summed over detections), and every disagreeing pixel is explained by the geometry:
  within 2 px of a boundary of torchvision's mask or 1.5 px of the box border, or where
  torchvision's probability is within 0.15 of the 0.5 threshold (bilinear resampling on a
  shifted grid).

The images are 320x512 with min_size=320, max_size=512 so torchvision's resize is the
identity (checked), and both sides are multiples of 64 so that no proposal sits at the per-level
pre-NMS top-k cut with a logit tie: with random weights the 1000th and 1001st objectness logits
of a level can differ by ~3e-6, below the float noise between the two backbones (seen at
320x480), which flips one proposal.
"""
import pytest
import torch
import torch.nn.functional as F
from torchvision.models.detection import fasterrcnn_resnet50_fpn, maskrcnn_resnet50_fpn
from torchvision.models.detection.roi_heads import paste_masks_in_image as tv_paste_masks
from torchvision.ops.misc import FrozenBatchNorm2d

from segkit.checkpoint.torchvision import convert_torchvision_detection
from segkit.config import compose
from segkit.engine.defaults import build_model
from segkit.modeling.postprocess import postprocess_batch
from synthetic_images import rectangles_on

H, W = 320, 512


@torch.no_grad()
def _randomize(model, gen):
    """Random FrozenBN statistics and head weights scaled so that scores spread over (0.05, 1)
    without saturating (saturated scores would tie and make the order arbitrary)."""
    for m in model.modules():
        if isinstance(m, FrozenBatchNorm2d):
            n = m.weight.numel()
            m.weight.copy_(torch.empty(n).uniform_(0.3, 0.7, generator=gen))
            m.bias.copy_(torch.randn(n, generator=gen) * 0.1)
            m.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
            m.running_var.copy_(torch.empty(n).uniform_(0.5, 2.0, generator=gen))
    rh = model.roi_heads
    for layer, std in ((rh.box_predictor.cls_score, 0.015), (rh.box_predictor.bbox_pred, 0.005),
                       (model.rpn.head.cls_logits, 0.015), (model.rpn.head.bbox_pred, 0.0005)):
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen) * std)
        layer.bias.copy_(torch.randn(layer.bias.shape, generator=gen) * std)
    if rh.mask_head is not None:
        # Smoothing convs (identity/9 per channel + noise) and a near-identity deconv give masks
        # with long, clean boundaries, like real object masks (random convs give speckle).
        for block in rh.mask_head:
            w = torch.randn(block[0].weight.shape, generator=gen) * 0.002
            idx = torch.arange(w.shape[0])
            w[idx, idx] += 1.0 / 9
            block[0].weight.copy_(w)
            block[0].bias.zero_()
        deconv = rh.mask_predictor.conv5_mask
        w = torch.randn(deconv.weight.shape, generator=gen) * 0.002
        w[idx, idx] += 1.0
        deconv.weight.copy_(w)
        deconv.bias.zero_()
        # logit = mean over channels - t: the zero padding of the smoothing convs makes the
        # features ~2.7x weaker at the RoI border than at its centre, so masks are blobs whose
        # extent depends on the image content (neither empty nor full boxes)
        logits = rh.mask_predictor.mask_fcn_logits
        n = logits.weight.shape[1]
        logits.weight.copy_(1.0 / n + torch.randn(logits.weight.shape, generator=gen) * 0.2 / n)
        logits.bias.copy_(-torch.empty(logits.bias.shape).uniform_(7.0, 12.0, generator=gen))


def _image(gen):
    """(3, H, W) float RGB 0-255: flat coloured rectangles plus noise, integer valued."""
    return rectangles_on(torch.full((3, H, W), 90.0), gen)


def _unexplained_mask_pixels(tv_probs, tv_masks, ours, boxes):
    """Disagreeing pixels not explained by the paste geometry (see the module docstring)."""
    f = tv_masks[:, None].float()
    edge = (F.max_pool2d(f, 3, 1, 1) > 0) & ~(-F.max_pool2d(-f, 3, 1, 1) > 0)
    near_edge = F.max_pool2d(edge.float(), 5, 1, 2)[:, 0] > 0
    ys = torch.arange(H, dtype=torch.float32)[None, :, None] + 0.5
    xs = torch.arange(W, dtype=torch.float32)[None, None, :] + 0.5
    b = boxes[:, :, None, None]
    dist = torch.minimum(torch.minimum((xs - b[:, 0]).abs(), (xs - b[:, 2]).abs()),
                         torch.minimum((ys - b[:, 1]).abs(), (ys - b[:, 3]).abs()))
    explained = near_edge | (dist <= 1.5) | ((tv_probs - 0.5).abs() < 0.15)
    return (tv_masks != ours) & ~explained


def _run_both(tv_builder, experiment, seed):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    tv = tv_builder(weights=None, weights_backbone=None, num_classes=91, min_size=H, max_size=W)
    tv.eval()
    _randomize(tv, gen)
    img = _image(gen)
    captured = {}
    if tv.roi_heads.mask_predictor is not None:
        tv.roi_heads.mask_predictor.register_forward_hook(
            lambda mod, inp, out: captured.__setitem__("mask_logits", out))
    with torch.no_grad():
        batch, _ = tv.transform([img / 255.0])
        assert batch.image_sizes == [(H, W)] and batch.tensors.shape[-2:] == (H, W)
        mean = torch.tensor(tv.transform.image_mean)[:, None, None]
        std = torch.tensor(tv.transform.image_std)[:, None, None]
        assert torch.allclose(batch.tensors[0], (img / 255.0 - mean) / std, atol=1e-5)  # no resize
        ref = tv([img / 255.0])[0]

    state, info = convert_torchvision_detection(tv.state_dict())
    assert info["experiment"] == experiment and info["num_classes"] == 90
    model = build_model(compose([f"experiment={experiment}"])).eval()
    model.load_state_dict(state, strict=True)
    inputs = [{"image": img.to(torch.uint8), "height": H, "width": W}]
    with torch.no_grad():
        raw = model.inference(inputs, do_postprocess=False)
    out = postprocess_batch(raw, inputs, [(H, W)])[0]["instances"]
    return ref, raw[0], out, captured


def _check_boxes(ref, out):
    assert len(ref["boxes"]) >= 10 and (ref["scores"] > 0.05).all()
    assert len(out) == len(ref["boxes"])
    assert torch.allclose(out.pred_boxes.tensor, ref["boxes"], atol=1e-2)
    assert torch.allclose(out.scores, ref["scores"], atol=1e-4)
    assert torch.equal(out.pred_classes, ref["labels"] - 1)
    assert out.image_size == (H, W)


@pytest.mark.slow
def test_maskrcnn_resnet50_fpn_parity():
    ref, raw, out, captured = _run_both(maskrcnn_resnet50_fpn, "mask_rcnn_r50_fpn_torchvision", 0)
    _check_boxes(ref, out)
    n = len(out)
    tv_small = captured["mask_logits"][torch.arange(n), ref["labels"]].sigmoid()
    assert raw.pred_masks.shape == (n, 28, 28)
    assert torch.allclose(raw.pred_masks, tv_small, atol=1e-4)

    tv_probs = ref["masks"][:, 0]
    tv_masks = tv_probs > 0.5
    assert out.pred_masks.shape == (n, H, W) and out.pred_masks.dtype == torch.bool
    ys = torch.arange(H, dtype=torch.float32)[None, :, None] + 0.5
    xs = torch.arange(W, dtype=torch.float32)[None, None, :] + 0.5
    b = ref["boxes"][:, :, None, None]
    in_box = (xs > b[:, 0]) & (xs < b[:, 2]) & (ys > b[:, 1]) & (ys < b[:, 3])  # pixel centres
    fg = (tv_masks & in_box).flatten(1).sum(1) / in_box.flatten(1).sum(1).clamp(min=1)
    assert ((fg > 0.05) & (fg < 0.95)).sum() >= 10  # real boundaries inside boxes: not vacuous
    tv_paste = tv_paste_masks(raw.pred_masks[:, None], raw.pred_boxes.tensor, (H, W))[:, 0] > 0.5
    same = ((tv_paste == tv_masks) & in_box).sum() / in_box.sum()
    assert same >= 0.999, f"torchvision's paste of segkit's masks: only {same:.5f} agree"
    agree = ((tv_masks == out.pred_masks) & in_box).sum() / in_box.sum()
    assert agree >= 0.95, f"only {agree:.4f} of in-box pixels agree"
    bad = _unexplained_mask_pixels(tv_probs, tv_masks, out.pred_masks, ref["boxes"])
    assert bad.sum() == 0, f"{int(bad.sum())} mask pixels disagree away from any boundary"


@pytest.mark.slow
def test_fasterrcnn_resnet50_fpn_parity():
    ref, raw, out, _ = _run_both(fasterrcnn_resnet50_fpn, "faster_rcnn_r50_fpn_torchvision", 0)
    _check_boxes(ref, out)
    assert not out.has("pred_masks")
