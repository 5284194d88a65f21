"""LOSSES: focal / smooth_l1 / giou / ce vs torchvision, torch and hand-computed values; build."""
import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss

import segkit.modeling  # noqa: F401  (registers LOSSES)
from segkit.modeling.losses import CrossEntropyLoss, GIoULoss, SigmoidFocalLoss, SmoothL1Loss
from segkit.registry import LOSSES, BuildError, build

REDUCTIONS = ("none", "mean", "sum")


def _logits_targets(seed=0, shape=(64, 5)):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(shape, generator=gen) * 3
    targets = (torch.rand(shape, generator=gen) < 0.3).float()
    return logits, targets


def _boxes(n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=gen) * 100
    wh = torch.rand(n, 2, generator=gen) * 50 + 1
    return torch.cat([xy, xy + wh], dim=1)


# ----------------------------------------------------------------------------- focal
@pytest.mark.parametrize("alpha,gamma", [(0.25, 2.0), (0.75, 0.0), (-1.0, 2.0), (-1.0, 0.0),
                                         (0.5, 1.5), (0.0, 3.0)])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_focal_matches_torchvision(alpha, gamma, reduction):
    logits, targets = _logits_targets()
    ours = SigmoidFocalLoss(alpha=alpha, gamma=gamma, reduction=reduction)(logits, targets)
    ref = sigmoid_focal_loss(logits, targets, alpha=alpha, gamma=gamma, reduction=reduction)
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-7)


def test_focal_hand_computed():
    # one positive logit x = 0.5 and one negative logit x = -1.0, alpha 0.25, gamma 2
    p_pos = 1 / (1 + math.exp(-0.5))
    p_neg = 1 / (1 + math.exp(1.0))
    pos = -0.25 * (1 - p_pos) ** 2 * math.log(p_pos)
    neg = -0.75 * p_neg ** 2 * math.log(1 - p_neg)
    loss = SigmoidFocalLoss(0.25, 2.0, "none")(torch.tensor([0.5, -1.0]), torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(loss, torch.tensor([pos, neg]), rtol=1e-6, atol=0)
    # by hand: p = 0.622459, (1-p)^2 = 0.142537, -log p = 0.474077 -> 0.25 * ... = 0.0168934;
    # 1-p_neg = 0.731059, p_neg^2 = 0.072329, -log(1-p_neg) = 0.313262 -> 0.75 * ... = 0.0169935
    assert abs(pos - 0.0168934) < 1e-6 and abs(neg - 0.0169935) < 1e-6
    # vs plain BCE (0.474077, 0.313262) the focusing term shrinks both examples ~20-30x
    total = SigmoidFocalLoss()(torch.tensor([0.5, -1.0]), torch.tensor([1.0, 0.0]))
    assert total.item() == pytest.approx(pos + neg, rel=1e-6)


def test_focal_gamma0_is_alpha_balanced_bce():
    logits, targets = _logits_targets(seed=1)
    alpha = 0.75
    weights = alpha * targets + (1 - alpha) * (1 - targets)
    ref = F.binary_cross_entropy_with_logits(logits, targets, weight=weights, reduction="sum")
    ours = SigmoidFocalLoss(alpha=alpha, gamma=0.0)(logits, targets)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    # alpha < 0 and gamma 0: plain BCE
    plain = SigmoidFocalLoss(alpha=-1, gamma=0.0, reduction="mean")(logits, targets)
    torch.testing.assert_close(plain, F.binary_cross_entropy_with_logits(logits, targets))


def test_focal_bool_targets_and_gradient():
    logits, targets = _logits_targets(seed=2)
    logits.requires_grad_(True)
    loss = SigmoidFocalLoss()(logits, targets.bool())
    loss.backward()
    ref = sigmoid_focal_loss(logits.detach(), targets, reduction="sum")
    torch.testing.assert_close(loss.detach(), ref)
    assert torch.isfinite(logits.grad).all()


def test_focal_bad_args():
    with pytest.raises(ValueError, match="gamma must be >= 0"):
        SigmoidFocalLoss(gamma=-1)
    with pytest.raises(ValueError, match="same shape"):
        SigmoidFocalLoss()(torch.zeros(3, 2), torch.zeros(3))


# ----------------------------------------------------------------------------- smooth_l1
@pytest.mark.parametrize("beta", [0.0, 1 / 9, 0.5, 1.0])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_smooth_l1_matches_torch(beta, reduction):
    gen = torch.Generator().manual_seed(3)
    pred, target = torch.randn(50, 4, generator=gen), torch.randn(50, 4, generator=gen)
    ours = SmoothL1Loss(beta=beta, reduction=reduction)(pred, target)
    if beta == 0:
        ref = F.l1_loss(pred, target, reduction=reduction)
    else:
        ref = F.smooth_l1_loss(pred, target, beta=beta, reduction=reduction)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-7)


def test_smooth_l1_beta0_gradient_is_finite():
    pred = torch.zeros(3, 4, requires_grad=True)
    SmoothL1Loss(beta=0.0)(pred, torch.zeros(3, 4)).backward()
    assert torch.isfinite(pred.grad).all()


def test_smooth_l1_hand_computed():
    loss = SmoothL1Loss(beta=1.0, reduction="none")(torch.tensor([0.5, 3.0]), torch.zeros(2))
    torch.testing.assert_close(loss, torch.tensor([0.125, 2.5]))


# ----------------------------------------------------------------------------- giou
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_giou_matches_torchvision(reduction):
    a, b = _boxes(40, seed=4), _boxes(40, seed=5)
    b[:5] = a[:5]  # identical pairs -> 0
    ours = GIoULoss(reduction=reduction)(a, b)
    ref = generalized_box_iou_loss(a, b, reduction=reduction)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    if reduction == "none":
        assert torch.all(ours[:5].abs() < 1e-6)


def test_giou_hand_computed_and_empty():
    # disjoint unit squares 1 apart: IoU 0, enclosing 3x1 with union 2 -> GIoU = -1/3, loss 4/3
    a, b = torch.tensor([[0.0, 0, 1, 1]]), torch.tensor([[2.0, 0, 3, 1]])
    assert GIoULoss()(a, b).item() == pytest.approx(4 / 3, rel=1e-6)
    # half-overlapping: IoU 1/3, enclosing = union -> loss 2/3
    c = torch.tensor([[0.5, 0, 1.5, 1]])
    assert GIoULoss()(a, c).item() == pytest.approx(2 / 3, rel=1e-6)
    empty = torch.zeros(0, 4)
    assert GIoULoss(reduction="mean")(empty, empty).item() == 0.0
    assert GIoULoss()(empty, empty).item() == 0.0
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        GIoULoss()(torch.zeros(2, 5), torch.zeros(2, 5))


# ----------------------------------------------------------------------------- ce
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_ce_matches_torch(reduction, smoothing):
    gen = torch.Generator().manual_seed(6)
    logits = torch.randn(30, 7, generator=gen)
    labels = torch.randint(0, 7, (30,), generator=gen)
    labels[:3] = -1
    ours = CrossEntropyLoss(reduction, ignore_index=-1, label_smoothing=smoothing)(logits, labels)
    ref = F.cross_entropy(logits, labels, reduction=reduction, ignore_index=-1,
                          label_smoothing=smoothing)
    torch.testing.assert_close(ours, ref)


def test_ce_empty_mean_is_zero():
    logits = torch.zeros(0, 3, requires_grad=True)
    loss = CrossEntropyLoss()(logits, torch.zeros(0, dtype=torch.long))
    assert loss.item() == 0.0
    loss.backward()


# ----------------------------------------------------------------------------- registry / config
@pytest.mark.parametrize("node,cls,attrs", [
    ({"name": "focal", "alpha": 0.75, "gamma": 0.0}, SigmoidFocalLoss,
     {"alpha": 0.75, "gamma": 0.0}),
    ({"name": "focal"}, SigmoidFocalLoss, {"alpha": 0.25, "gamma": 2.0, "reduction": "sum"}),
    ({"name": "smooth_l1", "beta": 0.1}, SmoothL1Loss, {"beta": 0.1, "reduction": "sum"}),
    ({"name": "giou", "reduction": "mean"}, GIoULoss, {"reduction": "mean", "eps": 1e-7}),
    ({"name": "ce", "label_smoothing": 0.1}, CrossEntropyLoss,
     {"reduction": "mean", "ignore_index": -100, "label_smoothing": 0.1}),
])
def test_build_from_config(node, cls, attrs):
    from omegaconf import OmegaConf

    for n in (node, OmegaConf.create(node)):
        loss = build(n, LOSSES, "model.head.cls_loss")
        assert type(loss) is cls
        for k, v in attrs.items():
            assert getattr(loss, k) == v


def test_build_overrides_like_the_gamma_experiment():
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"cls_loss": {"name": "focal", "alpha": 0.25, "gamma": 2.0}})
    cfg.merge_with_dotlist(["cls_loss.gamma=0", "cls_loss.alpha=0.75"])
    loss = build(cfg.cls_loss, LOSSES, "model.head.cls_loss")
    logits, targets = _logits_targets(seed=7)
    weights = 0.75 * targets + 0.25 * (1 - targets)
    ref = F.binary_cross_entropy_with_logits(logits, targets, weight=weights, reduction="sum")
    torch.testing.assert_close(loss(logits, targets), ref, rtol=1e-6, atol=1e-6)


def test_unknown_loss_name_did_you_mean():
    with pytest.raises(BuildError) as e:
        build({"name": "focall"}, LOSSES, "model.head.cls_loss")
    msg = str(e.value)
    assert "unknown loss 'focall'" in msg and "did you mean 'focal'" in msg
    registered = msg.split("registered: ", 1)[1].split(", ")
    assert {"ce", "focal", "giou", "smooth_l1"} <= set(registered)  # projects may add more


def test_unknown_key_did_you_mean():
    with pytest.raises(BuildError, match="unknown key 'gama' at 'model.head.cls_loss'.*"
                                         "did you mean 'gamma'"):
        build({"name": "focal", "gama": 0}, LOSSES, "model.head.cls_loss")


@pytest.mark.parametrize("name", ["focal", "smooth_l1", "giou", "ce"])
def test_bad_reduction(name):
    with pytest.raises(ValueError, match=rf"loss '{name}': reduction must be one of "
                                         r"\['none', 'mean', 'sum'\], got 'avg'"):
        build({"name": name, "reduction": "avg"}, LOSSES, "model.head.box_loss")


# ----------------------------------------------------------------------------- losses in heads
def _rpn_batch():
    from segkit.layers import ShapeSpec
    from segkit.structures import Boxes, ImageList, Instances

    shapes = {f"p{k}": ShapeSpec(8, 2 ** k) for k in range(2, 7)}
    gen = torch.Generator().manual_seed(0)
    feats = {f"p{k}": torch.randn(2, 8, math.ceil(96 / 2 ** k), math.ceil(128 / 2 ** k),
                                  generator=gen) for k in range(2, 7)}
    sizes = [(96, 128), (90, 120)]
    gt = [Instances(sizes[0],
                    gt_boxes=Boxes(torch.tensor([[10.0, 20, 80, 90], [50, 40, 120, 85]]))),
          Instances(sizes[1], gt_boxes=Boxes(torch.tensor([[0.0, 0, 30, 40]])))]
    return shapes, ImageList(torch.zeros(2, 3, 96, 128), sizes), feats, gt


def _rpn_losses(rpn, state, batch, seed=3):
    _, images, feats, gt = batch
    rpn.load_state_dict(state)
    torch.manual_seed(seed)  # same anchor sample for every variant
    return rpn.train()(images, feats, gt)[1]


def test_rpn_losses_from_config_reproduce_the_legacy_args():
    from segkit.registry import PROPOSAL_GENERATORS

    batch = _rpn_batch()
    shapes = batch[0]
    torch.manual_seed(0)
    legacy = build({"name": "rpn", "smooth_l1_beta": 1 / 9}, PROPOSAL_GENERATORS, "rpn",
                   input_shape=shapes)
    state = legacy.state_dict()
    ref = _rpn_losses(legacy, state, batch)
    # defaults need no loss node; the new nodes give bit-identical numbers
    new = build({"name": "rpn", "box_loss": {"name": "smooth_l1", "beta": 1 / 9},
                 "cls_loss": {"name": "focal", "alpha": -1, "gamma": 0}},
                PROPOSAL_GENERATORS, "model.proposal_generator", input_shape=shapes)
    assert isinstance(new.box_loss, SmoothL1Loss) and isinstance(new.cls_loss, SigmoidFocalLoss)
    out = _rpn_losses(new, state, batch)
    assert torch.equal(out["loss_rpn_loc"], ref["loss_rpn_loc"])
    torch.testing.assert_close(out["loss_rpn_cls"], ref["loss_rpn_cls"], rtol=1e-6, atol=0)
    # legacy path still computes the pre-LOSSES formula: sum smooth-L1 / (256 * N)
    l1 = _rpn_losses(build({"name": "rpn", "box_reg_loss": "l1"}, PROPOSAL_GENERATORS,
                           input_shape=shapes), state, batch)
    l1_new = _rpn_losses(build({"name": "rpn", "box_loss": {"name": "smooth_l1"}},
                               PROPOSAL_GENERATORS, input_shape=shapes), state, batch)
    assert torch.equal(l1["loss_rpn_loc"], l1_new["loss_rpn_loc"])
    assert not torch.equal(l1["loss_rpn_loc"], ref["loss_rpn_loc"])


def test_rpn_giou_and_focal_losses_train():
    from segkit.modeling.proposal_generator import RPN

    batch = _rpn_batch()
    shapes, images, feats, gt = batch
    torch.manual_seed(0)
    rpn = RPN(shapes, box_loss=GIoULoss(), cls_loss=SigmoidFocalLoss(0.25, 2.0))
    _, _, _, gt = batch
    torch.manual_seed(3)
    losses = rpn.train()(images, feats, gt)[1]
    # GIoU of decoded boxes: at init deltas ~0, so it is ~ (1 - GIoU(anchor, gt)) per positive
    assert 0 < losses["loss_rpn_loc"] < 2 * 128 / 512 and torch.isfinite(losses["loss_rpn_cls"])
    sum(losses.values()).backward()
    assert rpn.rpn_head.anchor_deltas.weight.grad.abs().sum() > 0


def test_rpn_loss_config_errors():
    from segkit.modeling.proposal_generator import RPN
    from segkit.registry import PROPOSAL_GENERATORS

    shapes = _rpn_batch()[0]
    with pytest.raises(ValueError, match=r"model.proposal_generator.box_loss.reduction must be "
                                         r"'sum'"):
        RPN(shapes, box_loss=SmoothL1Loss(reduction="mean"))
    with pytest.raises(ValueError, match="either box_loss or the legacy"):
        RPN(shapes, box_loss=GIoULoss(), smooth_l1_beta=0.1)
    with pytest.raises(BuildError, match="unknown loss 'gio'; did you mean 'giou'"):
        build({"name": "rpn", "box_loss": {"name": "gio"}}, PROPOSAL_GENERATORS,
              "model.proposal_generator", input_shape=shapes)


def _fast_rcnn_inputs(seed=2, r=40, k=4):
    from segkit.modeling.box_coder import Box2BoxTransform

    gen = torch.Generator().manual_seed(seed)
    proposals = _boxes(r, seed)
    gt = proposals + torch.randn(r, 4, generator=gen) * 3
    gt[:, 2:] = torch.maximum(gt[:, 2:], gt[:, :2] + 1)
    classes = torch.randint(0, k + 1, (r,), generator=gen)
    return (torch.randn(r, k + 1, generator=gen), torch.randn(r, k * 4, generator=gen) * 0.3,
            proposals, gt, classes, Box2BoxTransform((10, 10, 5, 5)))


def test_fast_rcnn_losses_from_loss_modules():
    from segkit.modeling.roi_heads import fast_rcnn_losses

    scores, deltas, props, gt, classes, transform = _fast_rcnn_inputs()
    ref = fast_rcnn_losses(scores, deltas, props, gt, classes, transform, smooth_l1_beta=0.5)
    out = fast_rcnn_losses(scores, deltas, props, gt, classes, transform,
                           cls_loss=CrossEntropyLoss(), box_loss=SmoothL1Loss(0.5))
    assert torch.equal(out["loss_cls"], ref["loss_cls"])
    torch.testing.assert_close(out["loss_box_reg"], ref["loss_box_reg"], rtol=1e-6, atol=0)
    summed = fast_rcnn_losses(scores, deltas, props, gt, classes, transform,
                              cls_loss=CrossEntropyLoss(reduction="sum"))
    torch.testing.assert_close(summed["loss_cls"], ref["loss_cls"])
    # GIoU on the decoded boxes of the GT class, summed over foreground / all sampled RoIs
    giou = fast_rcnn_losses(scores, deltas, props, gt, classes, transform, box_loss=GIoULoss())
    fg = classes < 4
    pred = deltas.view(len(deltas), -1, 4)[fg, classes[fg]]
    decoded = transform.apply_deltas(pred, props[fg])
    expected = generalized_box_iou_loss(decoded, gt[fg], reduction="sum") / len(scores)
    torch.testing.assert_close(giou["loss_box_reg"], expected, rtol=1e-5, atol=1e-6)


def test_roi_heads_losses_from_config():
    from segkit.layers import ShapeSpec
    from segkit.registry import ROI_HEADS

    shapes = {f"p{k}": ShapeSpec(8, 2 ** k) for k in range(2, 6)}
    node = {"name": "standard", "num_classes": 3,
            "box_head": {"name": "fc_box_head", "fc_dim": 16},
            "cls_loss": {"name": "ce", "label_smoothing": 0.1}, "box_loss": {"name": "giou"}}
    heads = build(node, ROI_HEADS, "model.roi_heads", input_shape=shapes)
    assert heads.cls_loss.label_smoothing == 0.1 and isinstance(heads.box_loss, GIoULoss)
    assert build({**node, "cls_loss": None, "box_loss": None}, ROI_HEADS,
                 input_shape=shapes).box_loss is None
    with pytest.raises(ValueError, match=r"model.roi_heads.box_loss.reduction must be 'sum'"):
        build({**node, "box_loss": {"name": "giou", "reduction": "mean"}}, ROI_HEADS,
              input_shape=shapes)
    with pytest.raises(ValueError, match="either box_loss or the legacy smooth_l1_beta"):
        build({**node, "smooth_l1_beta": 0.1}, ROI_HEADS, input_shape=shapes)
