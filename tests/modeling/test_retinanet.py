"""RetinaNet (papers.md section 6): head shapes and init, anchor assignment, loss normalisation,
inference caps, an end-to-end forward/backward, the torchvision converter and parity with
torchvision's ``retinanet_resnet50_fpn``.

Parity tolerances: boxes 1e-2 px, scores 1e-4 (same float32 graph, different op order; observed
~6e-5 px and ~3e-7). Detections are matched as sets (same class, score and box within the
tolerances) because random weights give near-equal scores (differences ~1e-7) whose order,
and so the order of the output, can flip between the two implementations; counts, the sorted
scores and the classes must agree exactly otherwise.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection import retinanet_resnet50_fpn
from torchvision.ops import sigmoid_focal_loss
from torchvision.ops.misc import FrozenBatchNorm2d

from segkit.checkpoint.convert import main
from segkit.checkpoint.io import load_checkpoint
from segkit.checkpoint.torchvision import UnsupportedCheckpointError, convert_torchvision_detection
from segkit.config import compose
from segkit.engine.defaults import build_model
from segkit.layers import ShapeSpec
from segkit.modeling.dense_heads import RetinaNetHead
from segkit.modeling.losses import GIoULoss, SigmoidFocalLoss, SmoothL1Loss
from segkit.registry import HEADS, build
from segkit.structures import Boxes, Instances
from synthetic_images import rectangles_on

K = 3
SHAPES = {f"p{i}": ShapeSpec(16, 2 ** i) for i in range(3, 8)}


def _head(**kw):
    torch.manual_seed(0)
    return RetinaNetHead(SHAPES, num_classes=K, **kw)


def _features(n=2, h=64, w=96):
    return {f"p{i}": torch.randn(n, 16, math.ceil(h / 2 ** i), math.ceil(w / 2 ** i))
            for i in range(3, 8)}


def _gt(boxes, classes, size=(64, 96)):
    return Instances(size, gt_boxes=Boxes(torch.tensor(boxes, dtype=torch.float32).view(-1, 4)),
                     gt_classes=torch.tensor(classes, dtype=torch.int64))


def test_shapes_anchor_count_and_prior_init():
    head = _head()
    assert head.num_anchors == 9  # 3 scales x 3 ratios per location
    feats = _features()
    logits, deltas = head.predict([feats[f] for f in head.in_features])
    anchors = head.anchor_generator([feats[f] for f in head.in_features])
    for f, lg, dl, an in zip(head.in_features, logits, deltas, anchors):
        hw = feats[f].shape[-2] * feats[f].shape[-1]
        assert lg.shape == (2, hw * 9, K) and dl.shape == (2, hw * 9, 4) and an.shape == (hw * 9, 4)
    # P3 anchors at location 0: sizes 32 * 2^(i/3), areas preserved for every ratio
    areas = (anchors[0][:9, 2] - anchors[0][:9, 0]) * (anchors[0][:9, 3] - anchors[0][:9, 1])
    expected = torch.tensor([32.0, 32 * 2 ** (1 / 3), 32 * 2 ** (2 / 3)]).repeat(3) ** 2
    assert torch.allclose(areas, expected, rtol=1e-5)
    assert len(head.cls_subnet) == 4 and len(head.bbox_subnet) == 4
    prior = -math.log((1 - 0.01) / 0.01)
    assert torch.allclose(head.cls_score.bias, torch.full((9 * K,), prior))
    assert abs(prior + 4.59512) < 1e-4
    assert torch.equal(head.bbox_pred.bias, torch.zeros(36))
    for conv in [*head.cls_subnet, *head.bbox_subnet, head.cls_score, head.bbox_pred]:
        assert abs(conv.weight.std().item() - 0.01) < 0.002
    # every anchor starts at foreground probability ~pi when the features are zero
    zero = [torch.zeros(1, 16, 4, 4)] * 5
    assert torch.allclose(head.predict(zero)[0][0].sigmoid(), torch.tensor(0.01), atol=1e-6)


def test_assignment_thresholds_hand_checked():
    head = _head()
    gt = _gt([[0, 0, 10, 10], [50, 50, 60, 60]], [2, 1])
    # IoU with GT 0: 100 / (100 + 100 - inter); boxes sliding right by d have IoU (10-d)/(10+d)
    anchors = torch.tensor([
        [0, 0, 10, 10],    # 1.0   -> fg, class 2
        [2, 0, 12, 10],    # 8/12 = 0.667 -> fg
        [3, 0, 13, 10],    # 7/13 = 0.538 -> fg
        [4, 0, 14, 10],    # 6/14 = 0.429 -> ignored
        [3.4, 0, 13.4, 10],  # 6.6/13.4 = 0.4925 -> ignored (just below 0.5)
        [5, 0, 15, 10],    # 5/15 = 0.333 -> bg
        [30, 30, 40, 40],  # 0     -> bg
        [54, 50, 64, 60],  # 6/14 = 0.429 with GT 1, its best anchor -> fg (low-quality match)
    ], dtype=torch.float32)
    labels, matched = head.label_anchors(anchors, [gt])
    assert labels[0].tolist() == [2, 2, 2, -1, -1, K, K, 1]
    assert torch.equal(matched[0, 7], gt.gt_boxes.tensor[1])
    strict = _head(allow_low_quality_matches=False)
    assert strict.label_anchors(anchors, [gt])[0][0, 7].item() == -1
    # no GT: everything is background
    labels, matched = head.label_anchors(anchors, [_gt([], [])])
    assert (labels == K).all() and (matched == 0).all()


def test_loss_normalised_by_number_of_foreground_anchors():
    head = _head()
    torch.manual_seed(1)
    anchors = [torch.tensor([[0, 0, 10, 10], [3, 0, 13, 10], [4, 0, 14, 10], [30, 30, 50, 50],
                             [60, 0, 80, 20]], dtype=torch.float32)]
    gt = _gt([[0, 0, 10, 10], [31, 31, 50, 52]], [0, 2])
    logits = [torch.randn(1, 5, K, requires_grad=True)]
    deltas = [torch.randn(1, 5, 4) * 0.1]
    losses = head.losses(anchors, logits, deltas, [gt])
    # labels: fg 0, fg 0, ignored, fg 2, bg -> 3 foreground anchors, anchor 2 excluded
    targets = torch.zeros(5, K)
    targets[0, 0] = targets[1, 0] = targets[3, 2] = 1
    valid = torch.tensor([0, 1, 3, 4])
    ref_cls = sigmoid_focal_loss(logits[0][0, valid], targets[valid], 0.25, 2.0, "sum") / 3
    assert torch.allclose(losses["loss_cls"], ref_cls, rtol=1e-5)
    fg = torch.tensor([0, 1, 3])
    tgt = head.box2box_transform.get_deltas(anchors[0][fg], gt.gt_boxes.tensor[[0, 0, 1]])
    ref_box = F.smooth_l1_loss(deltas[0][0, fg], tgt, beta=0.1, reduction="sum") / 3
    assert torch.allclose(losses["loss_box_reg"], ref_box, rtol=1e-5)
    # the normaliser is the batch's foreground count: two copies give the same loss
    twice = head.losses(anchors, [logits[0].repeat(2, 1, 1)], [deltas[0].repeat(2, 1, 1)],
                        [gt, gt])
    assert torch.allclose(twice["loss_cls"], 2 * ref_cls * 3 / 6, rtol=1e-5)
    # an image without GT: background-only focal loss over max(1, 0) = 1, zero box loss
    empty = head.losses(anchors, logits, deltas, [_gt([], [])])
    ref_empty = sigmoid_focal_loss(logits[0][0], torch.zeros(5, K), 0.25, 2.0, "sum")
    assert torch.allclose(empty["loss_cls"], ref_empty, rtol=1e-5)
    assert empty["loss_box_reg"].item() == 0
    # the gamma = 0, alpha = 0.75 ablation is alpha-balanced BCE
    ce_head = _head(cls_loss=SigmoidFocalLoss(alpha=0.75, gamma=0.0))
    ce = ce_head.losses(anchors, logits, deltas, [gt])
    bce = F.binary_cross_entropy_with_logits(logits[0][0, valid], targets[valid], reduction="none")
    weights = torch.where(targets[valid] > 0, 0.75, 0.25)
    assert torch.allclose(ce["loss_cls"], (weights * bce).sum() / 3, rtol=1e-5)


def test_giou_box_loss_and_reduction_check():
    head = _head(box_loss=GIoULoss())
    anchors = [torch.tensor([[0, 0, 10, 10], [30, 30, 50, 50]], dtype=torch.float32)]
    gt = _gt([[1, 1, 11, 12]], [1])
    deltas = [torch.zeros(1, 2, 4, requires_grad=True)]
    losses = head.losses(anchors, [torch.zeros(1, 2, K)], deltas, [gt])
    # anchor 0 (IoU 81 / 129 = 0.63) is the only foreground; its zero deltas decode to itself
    union, enclose = 100 + 110 - 81, 11 * 12
    giou = 81 / union - (enclose - union) / enclose
    assert torch.allclose(losses["loss_box_reg"], torch.tensor(1 - giou))
    losses["loss_box_reg"].backward()
    assert deltas[0].grad[0, 0].abs().sum() > 0 and deltas[0].grad[0, 1].abs().sum() == 0
    with pytest.raises(ValueError, match="reduction 'sum'"):
        _head(box_loss=SmoothL1Loss(reduction="mean"))


def test_inference_threshold_topk_nms_and_detection_caps():
    head = _head(topk_candidates_test=4, detections_per_image=5)
    # one level, 10 well separated anchors, 3 classes
    anchors = [torch.tensor([[20.0 * i, 0, 20.0 * i + 10, 10] for i in range(10)])]
    probs = torch.full((1, 10, K), 0.01)
    probs[0, :6, 0] = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.04])  # 5 above 0.05, top-4 kept
    probs[0, 0, 1] = 0.85  # same box, other class: class-wise NMS keeps it
    logits = [torch.logit(probs)]
    deltas = [torch.zeros(1, 10, 4)]
    res = head.inference(anchors, logits, deltas, [(20, 200)])[0]
    assert res.scores.tolist() == pytest.approx([0.9, 0.85, 0.8, 0.7])
    assert res.pred_classes.tolist() == [0, 1, 0, 0]
    assert torch.equal(res.pred_boxes.tensor[1], anchors[0][0])
    # same class, overlapping boxes: NMS 0.5 removes the lower one
    anchors2 = [torch.tensor([[0.0, 0, 10, 10], [1, 0, 11, 10]] + [[100, 100, 110, 110]] * 8)]
    res = head.inference(anchors2, logits, deltas, [(200, 200)])[0]
    assert 0.8 not in [round(s, 4) for s in res.scores.tolist()] and len(res) <= 5
    # detections_per_image caps the output: 30 distinct (box, class) pairs above threshold
    many = _head(num_convs=0, detections_per_image=3)
    half = [torch.logit(torch.full((1, 10, K), 0.5))]
    res = many.inference(anchors, half, deltas, [(20, 200)])[0]
    assert len(res) == 3
    # per-level top-k is per level: two levels give up to 2 x topk candidates
    res = head.inference(anchors * 2, logits * 2, deltas * 2, [(20, 200)])[0]
    assert len(res) == 4  # identical levels: NMS merges the duplicates


def test_registered_and_built_from_config_with_loss_nodes():
    head = build({"name": "retinanet", "num_classes": 5,
                  "cls_loss": {"name": "focal", "alpha": 0.75, "gamma": 0.0},
                  "box_loss": {"name": "smooth_l1", "beta": 0.1}},
                 HEADS, input_shape=SHAPES)
    assert isinstance(head.cls_loss, SigmoidFocalLoss) and head.cls_loss.gamma == 0.0
    assert head.cls_loss.alpha == 0.75 and head.box_loss.beta == 0.1
    cfg = compose(["experiment=retinanet_r18_fpn_embedded", "model.head.cls_loss.gamma=0",
                   "model.head.cls_loss.alpha=0.75", "dataset.num_classes=4"])
    assert cfg.model.head.num_classes == 4
    assert cfg.model.head.cls_loss.gamma == 0 and cfg.model.head.box_loss.name == "smooth_l1"
    with pytest.raises(ValueError, match="in_features"):
        RetinaNetHead(SHAPES, 3, in_features=["p2"])


def test_one_stage_forward_backward_with_empty_image():
    cfg = compose(["experiment=retinanet_r18_fpn_embedded", "dataset.num_classes=3"])
    torch.manual_seed(0)
    model = build_model(cfg).train()
    imgs = [torch.randint(0, 255, (3, 96, 128), dtype=torch.uint8) for _ in range(2)]
    inputs = [{"image": imgs[0], "instances": _gt([[10, 10, 60, 50], [70, 20, 120, 90]], [0, 2],
                                                  (96, 128))},
              {"image": imgs[1], "instances": _gt([], [], (96, 128))}]
    losses = model(inputs)
    assert set(losses) == {"loss_cls", "loss_box_reg"}
    assert all(torch.isfinite(v) for v in losses.values()) and losses["loss_box_reg"] > 0
    sum(losses.values()).backward()
    grads = [p.grad for p in model.head.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.backbone.bottom_up.stem.conv1.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        out = model([{"image": imgs[0], "height": 192, "width": 256}])
    inst = out[0]["instances"]
    assert inst.image_size == (192, 256) and len(inst) <= 100
    assert set(inst.get_fields()) == {"pred_boxes", "scores", "pred_classes"}
    with pytest.raises(ValueError, match="no 'instances'"):
        model.train()([{"image": imgs[0]}])


# ---------------------------------------------------------------- torchvision conversion / parity
H, W = 320, 512


@pytest.fixture(scope="module")
def tv_model():
    """torchvision RetinaNet with random weights whose scores spread over (0.05, 0.3)."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    tv = retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91,
                                min_size=H, max_size=W).eval()
    with torch.no_grad():
        for m in tv.modules():
            if isinstance(m, (FrozenBatchNorm2d, nn.BatchNorm2d)):
                n = m.weight.numel()
                m.weight.copy_(torch.empty(n).uniform_(0.3, 0.7, generator=gen))
                m.bias.copy_(torch.randn(n, generator=gen) * 0.1)
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
                m.running_var.copy_(torch.empty(n).uniform_(0.5, 2.0, generator=gen))
        cls, reg = tv.head.classification_head, tv.head.regression_head
        # subnet convs strong enough to carry the image (std 0.01 would flatten every score)
        for block in [*cls.conv, *reg.conv]:
            block[0].weight.copy_(torch.randn(block[0].weight.shape, generator=gen) * 0.03)
            block[0].bias.copy_(torch.randn(block[0].bias.shape, generator=gen) * 0.01)
        cls.cls_logits.weight.copy_(torch.randn(cls.cls_logits.weight.shape, generator=gen) * 0.03)
        bias = cls.cls_logits.bias.view(9, 91)
        bias.copy_(-4 + torch.randn(bias.shape, generator=gen) * 0.5)
        bias[:, 0] = -30  # torchvision's label 0 (background) is never positive in COCO weights
        reg.bbox_reg.weight.copy_(torch.randn(reg.bbox_reg.weight.shape, generator=gen) * 0.002)
    return tv


def _image(seed):
    """(3, H, W) RGB 0-255: smooth random colour field, flat rectangles, pixel noise."""
    gen = torch.Generator().manual_seed(seed)
    img = 128 + 60 * F.interpolate(torch.randn(1, 3, H // 16, W // 16, generator=gen), size=(H, W),
                                   mode="bilinear", align_corners=False)[0]
    return rectangles_on(img, gen)


def test_converter_mapping_drops_label_zero(tv_model):
    tv_state = tv_model.state_dict()
    out, info = convert_torchvision_detection(tv_state)
    assert info == {"arch": "retinanet_resnet50_fpn", "depth": 50, "num_classes": 90,
                    "has_mask": False, "experiment": "retinanet_r50_fpn_torchvision"}
    w = tv_state["head.classification_head.cls_logits.weight"]  # (9 * 91, 256, 3, 3)
    assert out["head.cls_score.weight"].shape == (9 * 90, 256, 3, 3)
    # anchor 4, segkit class 6 = torchvision channel 4 * 91 + 7
    assert torch.equal(out["head.cls_score.weight"][4 * 90 + 6], w[4 * 91 + 7])
    assert torch.equal(out["head.cls_score.bias"][4 * 90 + 6],
                       tv_state["head.classification_head.cls_logits.bias"][4 * 91 + 7])
    for ours, theirs in (("head.bbox_subnet.3.weight", "head.regression_head.conv.3.0.weight"),
                         ("head.bbox_pred.bias", "head.regression_head.bbox_reg.bias"),
                         ("backbone.fpn_lateral3.weight", "backbone.fpn.inner_blocks.0.0.weight"),
                         ("backbone.top_block.p7.bias", "backbone.fpn.extra_blocks.p7.bias")):
        assert torch.equal(out[ours], tv_state[theirs])
    # pre-0.13 names (conv.{2i}) give the same result
    old = {k.replace(".conv.2.0.", ".conv.4.").replace(".conv.1.0.", ".conv.2.")
           .replace(".conv.3.0.", ".conv.6.").replace(".conv.0.0.", ".conv.0."): v
           for k, v in tv_state.items()}
    old_out, _ = convert_torchvision_detection({"model": old})
    assert old_out.keys() == out.keys() and all(torch.equal(old_out[k], out[k]) for k in out)
    v2 = dict(tv_state, **{"head.classification_head.conv.0.1.weight": torch.ones(256)})
    with pytest.raises(UnsupportedCheckpointError, match=r"conv\.0\.1\.weight.*retinanet"):
        convert_torchvision_detection(v2)


def test_cli_round_trip(tv_model, tmp_path, capsys):
    src, dst = str(tmp_path / "tv.pth"), str(tmp_path / "retina.pth")
    torch.save(tv_model.state_dict(), src)
    assert main(["--from", "torchvision", src, dst]) == 0
    assert "retinanet_resnet50_fpn with 90 classes" in capsys.readouterr().out
    ckpt = load_checkpoint(dst)
    assert ckpt["meta"]["experiment"] == "retinanet_r50_fpn_torchvision"
    assert len(ckpt["meta"]["classes"]) == 90 and ckpt["meta"]["classes"][0] == "person"
    model = build_model(compose(["experiment=retinanet_r50_fpn_torchvision"]))
    model.load_state_dict(ckpt["model"], strict=True)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 2])
def test_retinanet_resnet50_fpn_parity(tv_model, seed):
    img = _image(seed)
    with torch.no_grad():
        batch, _ = tv_model.transform([img / 255.0])
        assert batch.image_sizes == [(H, W)] and batch.tensors.shape[-2:] == (H, W)  # no resize
        ref = tv_model([img / 255.0])[0]
    state, _ = convert_torchvision_detection(tv_model.state_dict())
    model = build_model(compose(["experiment=retinanet_r50_fpn_torchvision"])).eval()
    model.load_state_dict(state, strict=True)
    with torch.no_grad():
        out = model([{"image": img.to(torch.uint8), "height": H, "width": W}])[0]["instances"]
    # not vacuous: the 300-detection cap and per-level top-1000 cut are both in play
    assert len(ref["boxes"]) == 300 and ref["scores"].min() > 0.05
    assert len(out) == len(ref["boxes"]) and out.image_size == (H, W)
    assert torch.allclose(out.scores, ref["scores"], atol=1e-4)
    rb, ob = ref["boxes"], out.pred_boxes.tensor
    close = (((rb[:, None] - ob[None]).abs().amax(-1) < 1e-2)
             & ((ref["scores"][:, None] - out.scores[None]).abs() < 1e-4)
             & ((ref["labels"][:, None] - 1) == out.pred_classes[None]))
    assert close.any(1).all() and close.any(0).all()
