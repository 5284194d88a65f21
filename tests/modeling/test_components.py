"""Every component that ``segkit.modeling`` registers, built by name and trained one CPU step.

Each test builds its component from a config node through the registry (as Hydra configs do),
runs forward + backward in training mode and checks that every trainable parameter receives a
finite gradient. Components that consume ground truth also get an image without any (the case
of a COCO image whose annotations are all crowd); the two backbones do not see ground truth.
The last test fails when a new component is registered without a test here.
"""
import numpy as np
import torch

import segkit.modeling  # noqa: F401  (registration)
from segkit.layers import ShapeSpec
from segkit.modeling.roi_heads import mask_rcnn_loss
from segkit.registry import (BACKBONES, HEADS, META_ARCHS, PROPOSAL_GENERATORS, ROI_HEADS,
                             build)
from segkit.structures import BitMasks, Boxes, ImageList, Instances, PolygonMasks

K = 3
TESTED = {"backbone": {"resnet", "fpn"}, "proposal_generator": {"rpn", "precomputed"},
          "roi_heads": {"standard"},
          "head": {"fc_box_head", "mask_rcnn_conv_upsample", "retinanet"},
          "meta_arch": {"two_stage", "one_stage", "proposal_only"}}
RESNET = {"name": "resnet", "depth": 18, "base_channels": 8, "norm": "frozen_bn", "freeze_at": 1}
FPN = {"name": "fpn", "out_channels": 8, "bottom_up": RESNET}
SHAPES = {f"p{k}": ShapeSpec(8, 2 ** k) for k in range(2, 7)}


def _two_images():
    """Model inputs: a 64x96 image with one object and a 48x64 image without ground truth."""
    gen = torch.Generator().manual_seed(0)
    return [{"image": torch.randint(0, 256, (3, 64, 96), generator=gen, dtype=torch.uint8),
             "instances": _gt((64, 96), [[10.0, 12.0, 50.0, 60.0]], [2])},
            {"image": torch.randint(0, 256, (3, 48, 64), generator=gen, dtype=torch.uint8),
             "instances": _gt((48, 64), torch.zeros(0, 4), [])}]


def _assert_trainable_grads(module, expect_nonzero=True):
    params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    assert params
    for name, p in params:
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if expect_nonzero:
            assert p.grad.abs().sum() > 0, name


def _gt(size, boxes, classes, mask_type=BitMasks):
    h, w = size
    bits = torch.zeros(len(boxes), h, w, dtype=torch.bool)
    polys = []
    for i, (x0, y0, x1, y1) in enumerate(torch.as_tensor(boxes).long().tolist()):
        bits[i, y0:y1, x0:x1] = True
        polys.append([np.array([x0, y0, x1, y0, x1, y1, x0, y1], dtype=np.float64)])
    masks = BitMasks(bits) if mask_type is BitMasks else PolygonMasks(polys)
    return Instances(size, gt_boxes=Boxes(torch.as_tensor(boxes, dtype=torch.float32).view(-1, 4)),
                     gt_classes=torch.as_tensor(classes, dtype=torch.int64), gt_masks=masks)


def _features(seed=0, batch=2, h=64, w=96):
    gen = torch.Generator().manual_seed(seed)
    return {f"p{k}": torch.randn(batch, 8, -(-h // 2 ** k), -(-w // 2 ** k), generator=gen)
            .requires_grad_() for k in range(2, 7)}


def _train_step(model, inputs, expect_nonzero=True):
    """One training forward/backward of a meta-architecture: every loss finite, every
    trainable parameter reached by a gradient. Returns the loss dict."""
    losses = model(inputs)
    assert all(torch.isfinite(v) for v in losses.values()), losses
    sum(losses.values()).backward()
    _assert_trainable_grads(model, expect_nonzero=expect_nonzero)
    return losses


def test_resnet():
    torch.manual_seed(0)
    model = build(RESNET, BACKBONES).train()
    out = model(torch.randn(2, 3, 64, 96))
    assert [tuple(v.shape) for v in out.values()] == [(2, 8, 16, 24), (2, 16, 8, 12),
                                                       (2, 32, 4, 6), (2, 64, 2, 3)]
    sum(v.square().mean() for v in out.values()).backward()
    _assert_trainable_grads(model)
    assert all(p.grad is None for p in model.stem.parameters())  # freeze_at=1


def test_fpn():
    torch.manual_seed(0)
    model = build(FPN, BACKBONES).train()
    out = model(torch.randn(2, 3, 64, 96))
    assert list(out) == ["p2", "p3", "p4", "p5", "p6"]
    sum(v.square().mean() for v in out.values()).backward()
    _assert_trainable_grads(model)


def test_rpn_with_and_without_gt():
    torch.manual_seed(0)
    rpn = build({"name": "rpn", "anchor_sizes": [[16], [32], [64], [128], [256]],
                 "pre_nms_topk_train": 300, "post_nms_topk_train": 100},
                PROPOSAL_GENERATORS, input_shape=SHAPES).train()
    feats = _features()
    sizes = [(64, 96), (60, 80)]
    gt = [_gt(sizes[0], [[8.0, 8.0, 40.0, 50.0]], [1]), _gt(sizes[1], torch.zeros(0, 4), [])]
    proposals, losses = rpn(ImageList(torch.zeros(2, 3, 64, 96), sizes), feats, gt)
    assert set(losses) == {"loss_rpn_cls", "loss_rpn_loc"} and len(proposals) == 2
    sum(losses.values()).backward()
    _assert_trainable_grads(rpn)
    assert all(torch.isfinite(f.grad).all() for f in feats.values())


def _roi_heads():
    return build({"name": "standard", "num_classes": K, "batch_size_per_image": 32,
                  "box_head": {"name": "fc_box_head", "fc_dim": 16},
                  "mask_head": {"name": "mask_rcnn_conv_upsample", "num_conv": 1, "conv_dim": 8}},
                 ROI_HEADS, input_shape=SHAPES)


def test_standard_roi_heads_with_and_without_gt():
    torch.manual_seed(0)
    heads = _roi_heads().train()
    sizes = [(64, 96), (60, 80)]
    gen = torch.Generator().manual_seed(1)
    props = [Instances(s, proposal_boxes=Boxes(torch.tensor([[2.0, 2.0, 30.0, 30.0]])
                                               + torch.rand(20, 4, generator=gen) * 30))
             for s in sizes]
    gt = [_gt(sizes[0], [[4.0, 4.0, 34.0, 36.0]], [2], PolygonMasks),
          _gt(sizes[1], torch.zeros(0, 4), [], PolygonMasks)]
    feats = _features()
    _, losses = heads(ImageList(torch.zeros(2, 3, 64, 96), sizes), feats, props, gt)
    assert set(losses) == {"loss_cls", "loss_box_reg", "loss_mask"}
    sum(losses.values()).backward()
    _assert_trainable_grads(heads)
    # a batch whose images have no ground truth at all: finite losses, zero box/mask terms
    heads.zero_grad()
    _, losses = heads(ImageList(torch.zeros(2, 3, 64, 96), sizes), feats, props, [gt[1], gt[1]])
    assert losses["loss_box_reg"].item() == 0.0 and losses["loss_mask"].item() == 0.0
    sum(losses.values()).backward()
    _assert_trainable_grads(heads, expect_nonzero=False)  # every parameter still in the graph


def test_fc_box_head_including_no_rois():
    torch.manual_seed(0)
    head = build({"name": "fc_box_head", "num_fc": 2, "fc_dim": 16}, HEADS,
                 input_shape=ShapeSpec(8, 0, 7, 7)).train()
    x = torch.randn(5, 8, 7, 7, requires_grad=True)
    out = head(x)
    assert out.shape == (5, 16) and (out >= 0).all()
    out.square().sum().backward()
    _assert_trainable_grads(head)
    assert torch.isfinite(x.grad).all()
    assert head(torch.zeros(0, 8, 7, 7)).shape == (0, 16)  # an image whose RoIs were all dropped


def test_mask_rcnn_conv_upsample_including_no_positives():
    torch.manual_seed(0)
    head = build({"name": "mask_rcnn_conv_upsample", "num_conv": 2, "conv_dim": 8}, HEADS,
                 input_shape=ShapeSpec(8, 0, 14, 14), num_classes=K).train()
    logits = head(torch.randn(4, 8, 14, 14))
    assert logits.shape == (4, K, 28, 28)
    targets = (torch.rand(4, 28, 28) > 0.5).float()
    mask_rcnn_loss(logits, torch.tensor([0, 1, 2, 1]), targets).backward()
    _assert_trainable_grads(head)
    # no positive RoI (an image without ground truth): zero loss, still attached to the head
    head.zero_grad()
    empty = mask_rcnn_loss(head(torch.zeros(0, 8, 14, 14)), torch.zeros(0, dtype=torch.int64),
                           torch.zeros(0, 28, 28))
    assert empty.item() == 0.0
    empty.backward()
    _assert_trainable_grads(head, expect_nonzero=False)


def test_two_stage_with_and_without_gt():
    torch.manual_seed(0)
    model = build({
        "name": "two_stage", "pixel_mean": [120.0, 115.0, 100.0], "pixel_std": [58.0, 57.0, 57.0],
        "backbone": FPN,
        "proposal_generator": {"name": "rpn", "anchor_sizes": [[16], [32], [64], [128], [256]],
                               "pre_nms_topk_train": 200, "post_nms_topk_train": 50},
        "roi_heads": {"name": "standard", "num_classes": K, "batch_size_per_image": 32,
                      "box_head": {"name": "fc_box_head", "fc_dim": 16},
                      "mask_head": {"name": "mask_rcnn_conv_upsample", "num_conv": 1,
                                    "conv_dim": 8}},
    }, META_ARCHS, path="model").train()
    inputs = _two_images()
    assert len(_train_step(model, inputs)) == 5


def test_retinanet_head_with_and_without_gt():
    torch.manual_seed(0)
    shapes = {f"p{k}": ShapeSpec(8, 2 ** k) for k in range(3, 8)}
    head = build({"name": "retinanet", "num_classes": K, "conv_dim": 8, "norm": "gn",
                  "anchor_sizes": [[16], [32], [64], [128], [256]],
                  "cls_loss": {"name": "focal"}, "box_loss": {"name": "smooth_l1", "beta": 0.1}},
                 HEADS, input_shape=shapes).train()
    gen = torch.Generator().manual_seed(0)
    features = {f"p{k}": torch.randn(2, 8, -(-64 // 2 ** k), -(-96 // 2 ** k), generator=gen)
                .requires_grad_() for k in range(3, 8)}
    images = ImageList(torch.zeros(2, 3, 64, 96), [(64, 96), (48, 64)])
    gt = [_gt((64, 96), [[10.0, 12.0, 50.0, 60.0]], [2]), _gt((48, 64), torch.zeros(0, 4), [])]
    _, losses = head(images, features, gt)
    assert set(losses) == {"loss_cls", "loss_box_reg"}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    _assert_trainable_grads(head)
    assert features["p3"].grad is not None


def test_one_stage_with_and_without_gt():
    torch.manual_seed(0)
    model = build({
        "name": "one_stage", "pixel_mean": [120.0, 115.0, 100.0], "pixel_std": [58.0, 57.0, 57.0],
        "backbone": dict(FPN, in_features=["res3", "res4", "res5"], top_block="p6p7",
                         bottom_up=dict(RESNET, out_features=["res3", "res4", "res5"])),
        "head": {"name": "retinanet", "num_classes": K,
                 "anchor_sizes": [[16], [32], [64], [128], [256]]},
    }, META_ARCHS, path="model").train()
    inputs = _two_images()
    assert len(_train_step(model, inputs)) == 2


def test_every_registered_modeling_component_is_tested_here():
    registries = {"backbone": BACKBONES, "proposal_generator": PROPOSAL_GENERATORS,
                  "roi_heads": ROI_HEADS, "head": HEADS, "meta_arch": META_ARCHS}
    for kind, registry in registries.items():
        ours = {k for k in registry.keys()
                if registry.entry(k).obj.__module__.startswith("segkit.modeling.")}
        assert ours == TESTED[kind], f"{kind}: registered {sorted(ours)}, tested here " \
                                     f"{sorted(TESTED[kind])}"


def test_precomputed_proposals_follow_the_resize(tmp_path):
    from segkit.data.proposals import save_proposals

    path = save_proposals(str(tmp_path / "p.pth"),
                          boxes={7: torch.tensor([[10.0, 20.0, 30.0, 40.0], [0.0, 0.0, 5.0, 5.0]])},
                          scores={7: torch.tensor([0.2, 0.9])}, image_sizes={7: (100, 200)})
    gen = build({"name": "precomputed", "file": path}, PROPOSAL_GENERATORS).eval()
    images = ImageList(torch.zeros(1, 3, 50, 100), [(50, 100)])  # the image at half size
    (props,), losses = gen(images, {}, None, batched_inputs=[
        {"image_id": 7, "height": 100, "width": 200}])
    assert losses == {}
    # sorted by score, scaled by 1/2 with the image, scores kept as logits
    torch.testing.assert_close(props.proposal_boxes.tensor,
                               torch.tensor([[0.0, 0.0, 2.5, 2.5], [5.0, 10.0, 15.0, 20.0]]))
    torch.testing.assert_close(torch.sigmoid(props.objectness_logits), torch.tensor([0.9, 0.2]))


def test_proposal_only_with_and_without_gt():
    torch.manual_seed(0)
    model = build({
        "name": "proposal_only", "pixel_mean": [120.0, 115.0, 100.0], "pixel_std": [58.0, 57.0, 57.0],
        "backbone": FPN,
        "proposal_generator": {"name": "rpn", "in_features": ["p2", "p3", "p4", "p5", "p6"],
                               "anchor_sizes": [[16], [32], [64], [128], [256]],
                               "post_nms_topk_test": 20},
    }, META_ARCHS, path="model").train()
    inputs = _two_images()
    losses = _train_step(model, inputs, expect_nonzero=False)
    assert set(losses) == {"loss_rpn_cls", "loss_rpn_loc"}
    model.eval()
    with torch.no_grad():
        out = model([{"image": inputs[0]["image"], "height": 128, "width": 192}])
    inst = out[0]["instances"]
    assert inst.image_size == (128, 192) and 0 < len(inst) <= 20
    assert (inst.pred_classes == 0).all() and (inst.scores[:-1] >= inst.scores[1:]).all()
