"""two_stage meta-architecture: a tiny Mask R-CNN / Faster R-CNN trained and run on CPU."""
import numpy as np
import pytest
import torch

import segkit.modeling  # noqa: F401  (registration)
from segkit.modeling import TwoStageDetector
from segkit.registry import META_ARCHS, build
from segkit.structures import Boxes, Instances, PolygonMasks

K = 3
MEAN, STD = [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]


def _config(mask=True, **roi):
    return {
        "name": "two_stage", "pixel_mean": MEAN, "pixel_std": STD,
        "backbone": {"name": "fpn", "out_channels": 16, "bottom_up": {
            "name": "resnet", "depth": 18, "base_channels": 16, "norm": "bn", "freeze_at": 0}},
        "proposal_generator": {"name": "rpn", "anchor_sizes": [[16], [32], [64], [128], [256]],
                               "pre_nms_topk_train": 200, "post_nms_topk_train": 100,
                               "pre_nms_topk_test": 200, "post_nms_topk_test": 50},
        "roi_heads": {"name": "standard", "num_classes": K, "batch_size_per_image": 64,
                      "box_head": {"name": "fc_box_head", "fc_dim": 32},
                      "mask_head": {"name": "mask_rcnn_conv_upsample", "num_conv": 2, "conv_dim": 16}
                      if mask else None, **roi},
    }


def _model(mask=True, **roi):
    torch.manual_seed(0)
    return build(_config(mask, **roi), META_ARCHS, path="model")


def _square(x0, y0, x1, y1):
    return [np.array([x0, y0, x1, y0, x1, y1, x0, y1], dtype=np.float64)]


def _inputs():
    gen = torch.Generator().manual_seed(0)
    img1 = torch.randint(0, 256, (3, 64, 96), generator=gen, dtype=torch.uint8)
    img2 = torch.randint(0, 256, (3, 56, 72), generator=gen, dtype=torch.uint8)
    gt1 = Instances((64, 96), gt_boxes=Boxes(torch.tensor([[10.0, 12.0, 50.0, 60.0], [60.0, 20.0, 90.0, 40.0]])),
                    gt_classes=torch.tensor([0, 2]),
                    gt_masks=PolygonMasks([_square(10, 12, 50, 60), _square(60, 20, 90, 40)]))
    empty = Instances((56, 72), gt_boxes=Boxes(torch.zeros(0, 4)),
                      gt_classes=torch.zeros(0, dtype=torch.int64), gt_masks=PolygonMasks([]))
    return [{"image": img1, "instances": gt1, "height": 64, "width": 96},
            {"image": img2, "instances": empty, "height": 56, "width": 72}]


def test_train_forward_backward_with_and_without_gt():
    model = _model().train()
    inputs = _inputs()
    losses = model(inputs)
    assert set(losses) == {"loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg", "loss_mask"}
    assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values())
    assert losses["loss_mask"] > 0 and losses["loss_cls"] > 0
    sum(losses.values()).backward()
    for name in ("backbone.bottom_up.stem.conv1.weight", "proposal_generator.rpn_head.conv.weight",
                 "roi_heads.box_head.fc1.weight", "roi_heads.mask_head.predictor.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name

    model.zero_grad()
    losses = model([inputs[1], inputs[1]])  # only images without objects
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_mask"].item() == 0.0 and losses["loss_box_reg"].item() == 0.0
    sum(losses.values()).backward()
    assert model.roi_heads.box_predictor.cls_score.weight.grad.abs().sum() > 0


def test_one_sgd_step_lowers_the_loss():
    model = _model().train()
    inputs = _inputs()[:1]
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    torch.manual_seed(1)
    before = sum(model(inputs).values())
    before.backward()
    opt.step()
    torch.manual_seed(1)  # same RPN/ROI sampling
    with torch.no_grad():
        after = sum(model(inputs).values())
    assert after < before


def test_eval_outputs_at_original_resolution():
    model = _model(score_thresh_test=0.0).eval()
    inputs = [{"image": x["image"]} for x in _inputs()]
    inputs[0].update(height=128, width=192)  # the mapper had halved this image
    with torch.no_grad():
        outputs = model(inputs)
        raw = model.inference(inputs, do_postprocess=False)
    assert len(outputs) == 2
    for out, r, size in zip(outputs, raw, [(128, 192), (56, 72)]):
        inst = out["instances"]
        assert inst.image_size == size and 0 < len(inst) <= 100
        assert set(inst.get_fields()) == {"pred_boxes", "scores", "pred_classes", "pred_masks"}
        assert inst.pred_masks.shape == (len(inst),) + size and inst.pred_masks.dtype == torch.bool
        assert inst.pred_classes.dtype == torch.int64 and inst.pred_classes.max() < K
        assert inst.scores.dtype == torch.float32 and (inst.scores[:-1] >= inst.scores[1:]).all()
        scale = size[0] / r.image_size[0]
        assert torch.allclose(inst.pred_boxes.tensor, r.pred_boxes.tensor * scale, atol=1e-4)
        assert r.pred_masks.shape == (len(r), 28, 28)
        b = inst.pred_boxes.tensor
        assert (b >= 0).all() and (b[:, 2] <= size[1]).all() and (b[:, 3] <= size[0]).all()
        # masks only inside their (non-degenerate) boxes
        keep = (b[:, 2] - b[:, 0] > 2) & (b[:, 3] - b[:, 1] > 2)
        for m, box in zip(inst.pred_masks[keep], b[keep]):
            ys, xs = torch.nonzero(m, as_tuple=True)
            if len(ys):
                assert xs.min() >= box[0] - 1 and xs.max() <= box[2] and ys.max() <= box[3]


def test_faster_rcnn_has_no_masks():
    model = _model(mask=False, score_thresh_test=0.0).eval()
    with torch.no_grad():
        inst = model([{"image": _inputs()[0]["image"]}])[0]["instances"]
    assert len(inst) > 0 and not inst.has("pred_masks")
    losses = model.train()(_inputs())
    assert "loss_mask" not in losses and len(losses) == 4


def test_preprocess_normalises_pads_and_flips_bgr():
    model = _model()
    inputs = _inputs()
    images = model.preprocess_image(inputs)
    assert images.tensor.shape == (2, 3, 64, 96) and images.image_sizes == [(64, 96), (56, 72)]
    x = inputs[1]["image"].float()
    expected = (x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
    assert torch.allclose(images.tensor[1, :, :56, :72], expected, atol=1e-5)
    assert (images.tensor[1, :, 56:] == 0).all()
    bgr = TwoStageDetector(model.backbone, model.proposal_generator, model.roi_heads,
                           MEAN[::-1], STD[::-1], input_format="BGR")
    flipped = bgr.preprocess_image(inputs[1:])
    assert torch.allclose(flipped.tensor[0, :, :56, :72], expected.flip(0), atol=1e-5)
    assert "pixel_mean" not in model.state_dict()  # config values, not weights


def test_clear_errors():
    model = _model().train()
    with pytest.raises(ValueError, match=r"training inputs \[0\] have no 'instances'"):
        model([{"image": torch.zeros(3, 64, 64)}])
    with pytest.raises(ValueError, match=r"batched_inputs\[0\]\['image'\] must be a \(3, H, W\)"):
        model.eval()([{"image": torch.zeros(64, 64)}])
    with pytest.raises(ValueError, match="input_format"):
        TwoStageDetector(model.backbone, model.proposal_generator, model.roi_heads, MEAN, STD, "YUV")


@pytest.mark.gpu
def test_cuda_train_and_eval():
    model = _model(score_thresh_test=0.0).cuda().train()
    losses = model(_inputs())  # GT stays on the CPU; the model moves it
    assert all(v.is_cuda and torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    with torch.no_grad():
        inst = model.eval()([{"image": _inputs()[0]["image"]}])[0]["instances"]
    assert inst.pred_masks.is_cuda and inst.pred_masks.shape[1:] == (64, 96) and len(inst) > 0
