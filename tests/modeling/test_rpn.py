"""RPN: proposals and losses vs torchvision's RegionProposalNetwork, training, empty GT, build."""
import math

import pytest
import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList as TVImageList
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead

from segkit.layers import ShapeSpec
from segkit.modeling.proposal_generator import RPN, convert_torchvision_rpn_head
from segkit.registry import BACKBONES, PROPOSAL_GENERATORS, build
from segkit.structures import Boxes, ImageList, Instances

C = 16
SHAPES = {f"p{k}": ShapeSpec(C, 2 ** k) for k in range(2, 7)}
SIZES = ((32,), (64,), (128,), (256,), (512,))
H, W = 160, 224  # padded batch size; 224 is not a multiple of 64, so P6's stride is 56
IMAGE_SIZES = [(150, 200), (160, 224)]


def _features(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {f"p{k}": torch.randn(2, C, math.ceil(H / 2 ** k), math.ceil(W / 2 ** k), generator=gen)
            for k in range(2, 7)}


def _pair(pre=(2000, 300), post=(2000, 200), head_std=None):
    """torchvision RPN and a segkit RPN configured like it, with identical head weights."""
    head = RPNHead(C, 3)
    if head_std is not None:  # spread the logits so top-k/NMS order is free of ties
        for p in head.parameters():
            torch.nn.init.normal_(p, std=head_std)
    tv = RegionProposalNetwork(AnchorGenerator(SIZES, ((0.5, 1.0, 2.0),) * 5), head, 0.7, 0.3, 256,
                               0.5, dict(training=pre[0], testing=pre[1]),
                               dict(training=post[0], testing=post[1]), 0.7)
    ours = RPN(SHAPES, anchor_round_base=True, anchor_stride_from_image=True, min_box_size=1e-3,
               pre_nms_topk_train=pre[0], pre_nms_topk_test=pre[1], post_nms_topk_train=post[0],
               post_nms_topk_test=post[1], smooth_l1_beta=1 / 9)
    ours.load_state_dict(convert_torchvision_rpn_head(tv.state_dict(), prefix=""), strict=True)
    return tv, ours


def _gt():
    return [torch.tensor([[10.0, 20, 80, 90], [50, 40, 190, 140]]),
            torch.tensor([[0.0, 0, 30, 40]])]


def test_eval_proposals_match_torchvision():
    torch.manual_seed(0)
    tv, ours = _pair(head_std=0.3)
    tv.eval(), ours.eval()
    feats = _features()
    images = ImageList(torch.zeros(2, 3, H, W), IMAGE_SIZES)
    with torch.no_grad():
        ref, _ = tv(TVImageList(images.tensor, IMAGE_SIZES), feats)
        props, losses = ours(images, feats)
    assert losses == {}
    for p, r, size in zip(props, ref, IMAGE_SIZES):
        assert p.image_size == size and len(p) == len(r) == 200
        torch.testing.assert_close(p.proposal_boxes.tensor, r, atol=1e-3, rtol=0)
        assert (p.objectness_logits[:-1] >= p.objectness_logits[1:]).all()  # sorted by score
        assert p.proposal_boxes.tensor[:, 2].max() <= size[1]


def test_eval_proposals_match_torchvision_without_post_topk_cut():
    # post top-k larger than what survives NMS: the whole filtered set must agree.
    torch.manual_seed(1)
    tv, ours = _pair(pre=(2000, 100), post=(2000, 5000), head_std=0.3)
    tv.eval(), ours.eval()
    feats = _features(1)
    images = ImageList(torch.zeros(2, 3, H, W), IMAGE_SIZES)
    with torch.no_grad():
        ref, _ = tv(TVImageList(images.tensor, IMAGE_SIZES), feats)
        props, _ = ours(images, feats)
    for p, r in zip(props, ref):
        assert len(p) == len(r) < 500
        torch.testing.assert_close(p.proposal_boxes.tensor, r, atol=1e-3, rtol=0)


def test_training_losses_match_torchvision_and_gradients_flow():
    torch.manual_seed(0)
    tv, ours = _pair()
    tv.train(), ours.train()
    feats = _features()
    images = ImageList(torch.zeros(2, 3, H, W), IMAGE_SIZES)
    gt = _gt()
    torch.manual_seed(5)  # same seed -> the same randperm draws -> the same sampled anchors
    _, ref = tv(TVImageList(images.tensor, IMAGE_SIZES), feats, [{"boxes": g} for g in gt])
    torch.manual_seed(5)
    props, losses = ours(images, feats, [Instances(s, gt_boxes=Boxes(g))
                                         for s, g in zip(IMAGE_SIZES, gt)])
    assert set(losses) == {"loss_rpn_cls", "loss_rpn_loc"}
    torch.testing.assert_close(losses["loss_rpn_cls"], ref["loss_objectness"])
    torch.testing.assert_close(losses["loss_rpn_loc"], ref["loss_rpn_box_reg"])
    assert losses["loss_rpn_loc"] > 0
    (losses["loss_rpn_cls"] + losses["loss_rpn_loc"]).backward()
    for p in ours.rpn_head.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    for p in props:
        assert not p.proposal_boxes.tensor.requires_grad
        assert not p.objectness_logits.requires_grad and len(p) <= 2000


def test_image_without_gt_gives_finite_losses():
    ours = RPN(SHAPES).train()
    feats = {k: v.requires_grad_() for k, v in _features().items()}
    images = ImageList(torch.zeros(2, 3, H, W), IMAGE_SIZES)
    gt = [Instances(IMAGE_SIZES[0], gt_boxes=Boxes(torch.zeros(0, 4))),
          Instances(IMAGE_SIZES[1], gt_boxes=Boxes(_gt()[1]))]
    props, losses = ours(images, feats, gt)
    assert all(torch.isfinite(v) for v in losses.values())
    (losses["loss_rpn_cls"] + losses["loss_rpn_loc"]).backward()
    assert torch.isfinite(feats["p2"].grad).all()
    # all-empty batch: only negatives are sampled, the box loss is exactly zero
    ours.zero_grad()
    _, losses = ours(images, feats, [Instances(s, gt_boxes=Boxes(torch.zeros(0, 4)))
                                     for s in IMAGE_SIZES])
    assert losses["loss_rpn_loc"].item() == 0.0
    # 256 negatives per image, logits ~0 at init -> BCE close to log(2) per sampled anchor
    assert abs(losses["loss_rpn_cls"].item() - math.log(2)) < 0.05
    losses["loss_rpn_cls"].backward()
    assert torch.isfinite(ours.rpn_head.conv.weight.grad).all()


def test_label_anchors_sampling_and_loss_options():
    ours = RPN(SHAPES, batch_size_per_image=64, positive_fraction=0.25, box_reg_loss="l1",
               loss_weight_loc=2.0)
    anchors = torch.cat(ours.anchor_generator([v for v in _features().values()]))
    gt = [Instances(IMAGE_SIZES[0], gt_boxes=Boxes(_gt()[0]))]
    labels, matched = ours.label_anchors(anchors, gt)
    assert labels.shape == (1, anchors.shape[0]) and matched.shape == (1, anchors.shape[0], 4)
    assert (labels == 1).sum() <= 16 and (labels >= 0).sum() == 64
    # the weights scale the losses; "l1" means beta 0 whatever smooth_l1_beta says
    plain = RPN(SHAPES, batch_size_per_image=64, positive_fraction=0.25, smooth_l1_beta=0.0)
    plain.load_state_dict(ours.state_dict())
    images = ImageList(torch.zeros(2, 3, H, W), IMAGE_SIZES)
    gt = [Instances(s, gt_boxes=Boxes(g)) for s, g in zip(IMAGE_SIZES, _gt())]
    torch.manual_seed(0)
    _, weighted = ours.train()(images, _features(), gt)
    torch.manual_seed(0)
    _, ref = plain.train()(images, _features(), gt)
    torch.testing.assert_close(weighted["loss_rpn_loc"], 2 * ref["loss_rpn_loc"])
    torch.testing.assert_close(weighted["loss_rpn_cls"], ref["loss_rpn_cls"])
    assert RPN(SHAPES, box_reg_loss="l1", smooth_l1_beta=0.5).smooth_l1_beta == 0.0


def test_train_mode_requires_gt():
    with pytest.raises(ValueError, match="gt_instances"):
        RPN(SHAPES).train()(ImageList(torch.zeros(2, 3, H, W), IMAGE_SIZES), _features())


def test_bad_configuration_errors():
    with pytest.raises(ValueError, match="in_features"):
        RPN(SHAPES, in_features=["p2", "p9"])
    with pytest.raises(ValueError, match="equal channels"):
        RPN({"p2": ShapeSpec(8, 4), "p3": ShapeSpec(16, 8)}, in_features=["p2", "p3"],
            anchor_sizes=[[32], [64]])
    with pytest.raises(ValueError, match="anchor_sizes has 2 levels"):
        RPN(SHAPES, anchor_sizes=[[32], [64]])
    with pytest.raises(ValueError, match="box_reg_loss"):
        RPN(SHAPES, box_reg_loss="giou")


def test_build_backbone_and_rpn_from_config_and_run():
    backbone = build({"name": "fpn", "out_channels": 16, "bottom_up": {
        "name": "resnet", "depth": 18, "base_channels": 8, "norm": "bn", "freeze_at": 0}},
        BACKBONES)
    rpn = build({"name": "rpn", "in_features": ["p2", "p3", "p4", "p5", "p6"],
                 "anchor_sizes": [[16], [32], [64], [128], [256]],
                 "aspect_ratios": [[0.5, 1.0, 2.0]], "iou_thresholds": [0.3, 0.7],
                 "pre_nms_topk_train": 500, "post_nms_topk_train": 100,
                 "pre_nms_topk_test": 300, "post_nms_topk_test": 50, "nms_thresh": 0.7},
                PROPOSAL_GENERATORS, input_shape=backbone.output_shape())
    images = ImageList.from_tensors([torch.rand(3, 90, 120) * 255, torch.rand(3, 64, 64) * 255],
                                    size_divisibility=backbone.size_divisibility)
    feats = backbone(images.tensor)
    gt = [Instances((90, 120), gt_boxes=Boxes(torch.tensor([[10.0, 10, 60, 70]]))),
          Instances((64, 64), gt_boxes=Boxes(torch.zeros(0, 4)))]
    props, losses = rpn.train()(images, feats, gt)
    total = sum(losses.values())
    total.backward()
    assert torch.isfinite(total) and backbone.bottom_up.stem.conv1.weight.grad is not None
    assert all(len(p) <= 100 for p in props)
    with torch.no_grad():
        props, _ = rpn.eval()(images, backbone(images.tensor))
    assert [p.image_size for p in props] == [(90, 120), (64, 64)]
    assert all(0 < len(p) <= 50 for p in props)


def test_rpn_head_converter_rejects_unknown_keys():
    with pytest.raises(ValueError, match="unexpected key"):
        convert_torchvision_rpn_head({"rpn.head.conv.1.0.weight": torch.zeros(1)})
    out = convert_torchvision_rpn_head({"rpn.head.conv.weight": torch.zeros(1),
                                        "backbone.x": torch.zeros(1)})
    assert list(out) == ["rpn_head.conv.weight"]


@pytest.mark.gpu
def test_cuda_matches_cpu():
    torch.manual_seed(0)
    _, ours = _pair(head_std=0.3)
    ours.eval()
    feats = _features()
    images = ImageList(torch.zeros(2, 3, H, W), IMAGE_SIZES)
    with torch.no_grad():
        cpu, _ = ours(images, feats)
        gpu, _ = ours.cuda()(images.to("cuda"), {k: v.cuda() for k, v in feats.items()})
    for c, g in zip(cpu, gpu):
        assert g.proposal_boxes.device.type == "cuda" and len(c) == len(g)
        torch.testing.assert_close(g.proposal_boxes.tensor.cpu(), c.proposal_boxes.tensor,
                                   atol=1e-3, rtol=0)
    ours.train()
    gt = [Instances(s, gt_boxes=Boxes(g.cuda())) for s, g in zip(IMAGE_SIZES, _gt())]
    _, losses = ours(images.to("cuda"), {k: v.cuda() for k, v in feats.items()}, gt)
    assert all(torch.isfinite(v) and v.device.type == "cuda" for v in losses.values())
