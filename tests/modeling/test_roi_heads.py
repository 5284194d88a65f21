"""ROI heads: FPN pooler, box head + Fast R-CNN predictor, mask head, standard ROI heads.

References: torchvision's MultiScaleRoIAlign, fastrcnn_loss and RoIHeads.postprocess_detections
(with the background column moved from first to last), and hand-computed values.
"""
import math

import pytest
import torch
from torchvision.models.detection import _utils as tv_det_utils
from torchvision.models.detection.roi_heads import RoIHeads, fastrcnn_loss
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops import roi_align as tv_roi_align

import segkit.modeling  # noqa: F401  (registration)
from segkit.layers import ShapeSpec
from segkit.modeling.box_coder import Box2BoxTransform
from segkit.modeling.postprocess import detector_postprocess
from segkit.modeling.roi_heads import (FCBoxHead, FastRCNNOutputLayers, MaskRCNNConvUpsampleHead,
                                       ROIPooler, StandardROIHeads, assign_boxes_to_levels,
                                       fast_rcnn_inference, fast_rcnn_losses, mask_rcnn_loss)
from segkit.registry import ROI_HEADS, BuildError, build
from segkit.structures import BitMasks, Boxes, ImageList, Instances

SHAPES = {f"p{k}": ShapeSpec(8, 2 ** k) for k in range(2, 7)}
K = 3


def _random_boxes(n, h, w, gen, min_side=2.0):
    xy = torch.rand(n, 2, generator=gen) * torch.tensor([w * 0.8, h * 0.8])
    wh = min_side + torch.rand(n, 2, generator=gen) * torch.tensor([w * 0.9, h * 0.9])
    return torch.cat([xy, torch.minimum(xy + wh, torch.tensor([float(w), float(h)]))], dim=1)


def _multiscale_boxes(n, h, w, gen):
    """Boxes with log-uniform sides from 8 px to the image size (every FPN level gets some)."""
    side = torch.exp(torch.empty(n, 2).uniform_(math.log(8), math.log(min(h, w)), generator=gen))
    xy = torch.rand(n, 2, generator=gen) * (torch.tensor([float(w), float(h)]) - side)
    return torch.cat([xy, xy + side], dim=1)


def _features(batch, h, w, gen, channels=8):
    return {f"p{k}": torch.randn(batch, channels, h // 2 ** k, w // 2 ** k, generator=gen)
            for k in range(2, 7)}


def test_level_assignment_hand_computed():
    # sqrt(area) 224 -> k0 = 4; 112 -> 3; just below 112 -> 2; 448 -> 5; huge/tiny clamped
    sides = [224.0, 112.0, 111.9, 448.0, 2000.0, 4.0, 447.0]
    boxes = torch.tensor([[10.0, 10.0, 10.0 + s, 10.0 + s] for s in sides])
    levels = assign_boxes_to_levels([boxes], 2, 5)
    assert levels.tolist() == [2, 1, 0, 3, 3, 0, 2]
    # non-square: 56 x 896 has sqrt(area) = 224
    assert assign_boxes_to_levels([Boxes(torch.tensor([[0.0, 0.0, 56.0, 896.0]]))], 2, 5).tolist() == [2]


@pytest.mark.parametrize("sampling_ratio", [2, 0])
def test_pooler_matches_torchvision_multiscale_roialign(sampling_ratio):
    gen = torch.Generator().manual_seed(0)
    h, w = 512, 640
    feats = _features(2, h, w, gen, channels=2)
    boxes = [_multiscale_boxes(40, h, w, gen), _multiscale_boxes(25, h, w, gen)]
    boxes[1][:2] = torch.tensor([[0.0, 0.0, 600.0, 500.0], [20.5, 10.25, 500.0, 480.0]])  # P5
    names = ["p2", "p3", "p4", "p5"]
    ref = MultiScaleRoIAlign(names, 7, sampling_ratio)({n: feats[n] for n in names}, boxes,
                                                       [(h, w), (h, w)])
    pooler = ROIPooler(7, [1 / 4, 1 / 8, 1 / 16, 1 / 32], sampling_ratio, aligned=False)
    out = pooler([feats[n] for n in names], [Boxes(boxes[0]), boxes[1]])
    assert out.shape == (65, 2, 7, 7)
    # the compiled kernel sums the same samples in another order: float32 rounding only (each
    # side is within ~2e-5 of the float64 result on these unit-variance maps)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=5e-5)
    # boxes spread over all levels, so the comparison exercises the level routing
    assert set(assign_boxes_to_levels(boxes, 2, 5).tolist()) == {0, 1, 2, 3}


def test_pooler_aligned_single_level_and_empty():
    gen = torch.Generator().manual_seed(1)
    feat = torch.randn(1, 4, 16, 16, generator=gen)
    boxes = _random_boxes(5, 64, 64, gen)
    rois = torch.cat([torch.zeros(5, 1), boxes], dim=1)
    out = ROIPooler(5, [1 / 4], 0, aligned=True)([feat], [boxes])
    torch.testing.assert_close(out, tv_roi_align(feat, rois, 5, 0.25, 0, aligned=True),
                               rtol=1e-4, atol=5e-5)
    empty = ROIPooler(7, [1 / 4, 1 / 8], 2)([feat, feat[:, :, ::2, ::2]], [torch.zeros(0, 4)])
    assert empty.shape == (0, 4, 7, 7)
    with pytest.raises(ValueError, match="power of two"):
        ROIPooler(7, [1 / 3], 2)


def test_box_head_and_predictor_shapes_and_init():
    torch.manual_seed(0)
    head = FCBoxHead(ShapeSpec(16, 0, 7, 7), num_fc=2, fc_dim=64)
    assert head.fc1.in_features == 16 * 49 and head.output_size == 64
    out = head(torch.randn(5, 16, 7, 7))
    assert out.shape == (5, 64) and (out >= 0).all()
    pred = FastRCNNOutputLayers(1024, 80)
    assert pred.cls_score.out_features == 81 and pred.bbox_pred.out_features == 320
    assert abs(pred.cls_score.weight.std().item() - 0.01) < 1e-3
    assert abs(pred.bbox_pred.weight.std().item() - 0.001) < 1e-4
    with pytest.raises(ValueError, match="height and width"):
        FCBoxHead(ShapeSpec(16, 4))


def _to_torchvision_layout(scores, deltas):
    """segkit (background last) -> torchvision (background first) logits and deltas."""
    k = scores.shape[1] - 1
    tv_scores = torch.cat([scores[:, k:], scores[:, :k]], dim=1)
    tv_deltas = torch.cat([torch.zeros(len(deltas), 4), deltas], dim=1)
    return tv_scores, tv_deltas


def test_fast_rcnn_losses_match_torchvision():
    gen = torch.Generator().manual_seed(2)
    r = 30
    proposals = _random_boxes(r, 100, 120, gen, min_side=5)
    gt = proposals + torch.randn(r, 4, generator=gen) * 2
    gt[:, 2:] = torch.maximum(gt[:, 2:], gt[:, :2] + 1)
    classes = torch.randint(0, K + 1, (r,), generator=gen)  # K = background
    scores = torch.randn(r, K + 1, generator=gen)
    deltas = torch.randn(r, K * 4, generator=gen)
    transform = Box2BoxTransform((10, 10, 5, 5))
    ours = fast_rcnn_losses(scores, deltas, proposals, gt, classes, transform, smooth_l1_beta=1 / 9)
    tv_scores, tv_deltas = _to_torchvision_layout(scores, deltas)
    targets = tv_det_utils.BoxCoder((10.0, 10.0, 5.0, 5.0)).encode_single(gt, proposals)
    ref_cls, ref_box = fastrcnn_loss(tv_scores, tv_deltas, [(classes + 1) % (K + 1)], [targets])
    assert torch.allclose(ours["loss_cls"], ref_cls, atol=1e-6)
    assert torch.allclose(ours["loss_box_reg"], ref_box, atol=1e-5)
    # beta = 0 is plain L1 on the GT class's deltas, normalised by all sampled RoIs
    l1 = fast_rcnn_losses(scores, deltas, proposals, gt, classes, transform)["loss_box_reg"]
    fg = classes < K
    pred = deltas.view(r, K, 4)[fg.nonzero()[:, 0], classes[fg]]
    assert torch.allclose(l1, (pred - targets[fg]).abs().sum() / r, atol=1e-5)


def test_fast_rcnn_inference_matches_torchvision_postprocess():
    gen = torch.Generator().manual_seed(3)
    sizes = [(90, 120), (70, 64)]
    props = [_random_boxes(60, 120, 140, gen, min_side=0.5), _random_boxes(40, 80, 70, gen)]
    props[0][:3, 2:] = props[0][:3, :2] + 0.004  # degenerate proposals -> tiny boxes removed
    n = sum(len(p) for p in props)
    scores = torch.randn(n, K + 1, generator=gen) * 3
    deltas = torch.randn(n, K * 4, generator=gen) * 2
    transform = Box2BoxTransform((10, 10, 5, 5))
    ours = fast_rcnn_inference(scores, deltas, props, sizes, transform, 0.05, 0.5, 20, 1e-2)
    tv = RoIHeads(None, None, None, 0.5, 0.5, 512, 0.25, None, 0.05, 0.5, 20)
    tv_scores, tv_deltas = _to_torchvision_layout(scores, deltas)
    boxes, probs, labels = tv.postprocess_detections(tv_scores, tv_deltas, props, sizes)
    for det, b, s, lab, size in zip(ours, boxes, probs, labels, sizes):
        assert det.image_size == size and len(det) == len(b) > 5
        assert torch.allclose(det.pred_boxes.tensor, b, atol=1e-4)
        assert torch.allclose(det.scores, s, atol=1e-6)
        assert torch.equal(det.pred_classes, lab - 1)
    assert len(ours[0]) == 20  # capped at detections_per_image


def test_mask_head_shapes_init_and_loss_hand_computed():
    torch.manual_seed(0)
    head = MaskRCNNConvUpsampleHead(ShapeSpec(8, 0, 14, 14), num_classes=K, num_conv=2, conv_dim=16)
    assert [n for n, _ in head.named_children()] == ["mask_fcn1", "mask_fcn2", "deconv", "predictor"]
    fan_out = head.mask_fcn2.out_channels * 9
    assert abs(head.mask_fcn2.weight.std().item() - math.sqrt(2 / fan_out)) < 0.1 * math.sqrt(2 / fan_out)
    x = torch.randn(4, 8, 14, 14, requires_grad=True)
    logits = head(x)
    assert logits.shape == (4, K, 28, 28)
    agnostic = MaskRCNNConvUpsampleHead(ShapeSpec(8, 0, 14, 14), K, 1, 16, cls_agnostic=True)
    assert agnostic(x).shape == (4, 1, 28, 28)

    logits = torch.randn(4, K, 28, 28, requires_grad=True)
    classes = torch.tensor([0, 2, 2, 1])
    targets = (torch.rand(4, 28, 28) > 0.5).float()
    loss = mask_rcnn_loss(logits, classes, targets)
    p = logits[torch.arange(4), classes].sigmoid()
    ref = -(targets * p.log() + (1 - targets) * (1 - p).log()).mean()
    assert torch.allclose(loss, ref, atol=1e-5)
    loss.backward()
    other = torch.ones(4, K, dtype=torch.bool)
    other[torch.arange(4), classes] = False
    assert logits.grad[other].abs().max() == 0  # no competition among classes
    empty = mask_rcnn_loss(logits[:0], classes[:0], targets[:0])
    assert empty.item() == 0.0 and empty.requires_grad


def _roi_heads(with_mask=True, **kw):
    node = {"name": "standard", "num_classes": K, "batch_size_per_image": 32,
            "box_head": {"name": "fc_box_head", "fc_dim": 32},
            "mask_head": {"name": "mask_rcnn_conv_upsample", "num_conv": 1, "conv_dim": 8}
            if with_mask else None, **kw}
    return build(node, ROI_HEADS, input_shape=SHAPES)


def _gt(size, boxes, classes):
    h, w = size
    masks = torch.zeros(len(boxes), h, w, dtype=torch.bool)
    for i, b in enumerate(boxes.long().tolist()):
        masks[i, b[1]:b[3], b[0]:b[2]] = True
    return Instances(size, gt_boxes=Boxes(boxes), gt_classes=classes, gt_masks=BitMasks(masks))


def test_build_from_config_and_errors():
    heads = _roi_heads(cls_agnostic_mask=True, pooler_aligned=False, box_pooler_sampling_ratio=2)
    assert isinstance(heads, StandardROIHeads)
    assert heads.box_head.fc1.in_features == 8 * 7 * 7
    assert heads.mask_head.predictor.out_channels == 1 and heads.mask_pooler.sampling_ratio == 2
    assert heads.box_predictor.cls_score.out_features == K + 1
    assert _roi_heads(with_mask=False).mask_head is None
    with pytest.raises(BuildError, match="did you mean 'iou_threshold'"):
        _roi_heads(iou_treshold=0.5)
    with pytest.raises(ValueError, match="not produced by the backbone"):
        _roi_heads(in_features=["p2", "p9"])


def test_label_and_sample_proposals():
    torch.manual_seed(0)
    heads = _roi_heads().train()
    gt = _gt((64, 64), torch.tensor([[4.0, 4.0, 30.0, 30.0], [30.0, 20.0, 60.0, 50.0]]),
             torch.tensor([2, 0]))
    props = Instances((64, 64), proposal_boxes=Boxes(torch.tensor(
        [[4.0, 4.0, 29.0, 31.0], [40.0, 40.0, 60.0, 60.0], [0.0, 0.0, 8.0, 8.0]] + [[1.0, 1.0, 9.0, 9.0]] * 60)))
    sampled = heads.label_and_sample_proposals([props], [gt])[0]
    assert len(sampled) == 32
    fg = sampled.gt_classes < K
    assert fg.sum() == 3  # proposal 0 + the two appended GT boxes
    assert sorted(sampled.gt_classes[fg].tolist()) == [0, 2, 2]
    assert torch.equal(sampled.gt_boxes.tensor[fg], gt.gt_boxes.tensor[sampled.gt_index[fg]])
    empty = heads.label_and_sample_proposals([props], [_gt((64, 64), torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64))])[0]
    assert (empty.gt_classes == K).all() and len(empty) == 32


def test_standard_roi_heads_train_with_and_without_gt():
    torch.manual_seed(0)
    heads = _roi_heads().train()
    gen = torch.Generator().manual_seed(4)
    sizes = [(64, 96), (64, 80)]
    feats = _features(2, 64, 96, gen)
    images = ImageList(torch.zeros(2, 3, 64, 96), sizes)
    props = [Instances(s, proposal_boxes=Boxes(_random_boxes(50, s[0], s[1], gen)),
                       objectness_logits=torch.randn(50, generator=gen)) for s in sizes]
    gt = [_gt(sizes[0], torch.tensor([[10.0, 8.0, 40.0, 50.0]]), torch.tensor([1])),
          _gt(sizes[1], torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64))]
    _, losses = heads(images, feats, props, gt)
    assert set(losses) == {"loss_cls", "loss_box_reg", "loss_mask"}
    assert all(torch.isfinite(v) and v.dim() == 0 for v in losses.values())
    assert losses["loss_mask"] > 0 and losses["loss_box_reg"] > 0
    sum(losses.values()).backward()
    assert heads.mask_head.predictor.weight.grad.abs().sum() > 0
    assert heads.box_head.fc1.weight.grad.abs().sum() > 0
    # only images without GT: every RoI is background, no mask loss, still finite
    heads.zero_grad()
    _, losses = heads(images, feats, props, [gt[1], gt[1]])
    assert losses["loss_mask"].item() == 0.0 and losses["loss_box_reg"].item() == 0.0
    assert torch.isfinite(losses["loss_cls"]) and losses["loss_cls"] > 0
    sum(losses.values()).backward()


def test_standard_roi_heads_eval_and_postprocess():
    torch.manual_seed(0)
    heads = _roi_heads(score_thresh_test=0.0, detections_per_image=7).eval()
    gen = torch.Generator().manual_seed(5)
    sizes = [(64, 96), (48, 64)]
    feats = _features(2, 64, 96, gen)
    props = [Instances(s, proposal_boxes=Boxes(_random_boxes(20, s[0], s[1], gen, min_side=4))) for s in sizes]
    with torch.no_grad():
        dets, losses = heads(ImageList(torch.zeros(2, 3, 64, 96), sizes), feats, props)
    assert losses == {}
    for det, size in zip(dets, sizes):
        assert det.image_size == size and len(det) == 7
        assert det.pred_masks.shape == (7, 28, 28)
        assert ((det.pred_masks > 0) & (det.pred_masks < 1)).all()
        b = det.pred_boxes.tensor
        assert (b[:, 0] >= 0).all() and (b[:, 2] <= size[1]).all() and (b[:, 3] <= size[0]).all()
        assert (det.scores[:-1] >= det.scores[1:]).all()

    det = dets[0]
    det.pred_masks = torch.zeros(7, 28, 28)
    det.pred_masks[:, 7:21, 7:21] = 1.0  # central half of each box
    out = detector_postprocess(det, 128, 192)  # 2x the network-input size
    assert out.image_size == (128, 192) and out.pred_masks.shape == (7, 128, 192)
    assert out.pred_masks.dtype == torch.bool
    assert torch.allclose(out.pred_boxes.tensor, det.pred_boxes.tensor * 2)
    b = out.pred_boxes.tensor[0]
    cx, cy = int((b[0] + b[2]) / 2), int((b[1] + b[3]) / 2)
    assert out.pred_masks[0, cy, cx] and out.pred_masks[0].sum() > 0
    area = ((b[2] - b[0]) * (b[3] - b[1])).item() / 4
    assert abs(out.pred_masks[0].sum().item() - area) <= 2 * (b[2] - b[0] + b[3] - b[1]).item() / 2 + 4
    assert torch.equal(det.pred_boxes.tensor, dets[0].pred_boxes.tensor)  # input untouched


def test_mask_branch_trains_on_sampled_foreground_only():
    # Mask R-CNN section 3: L_mask is defined on positive RoIs only, on the GT class channel.
    torch.manual_seed(0)
    heads = _roi_heads().train()
    gen = torch.Generator().manual_seed(6)
    size = (64, 96)
    gt = _gt(size, torch.tensor([[10.0, 8.0, 40.0, 50.0], [50.0, 10.0, 90.0, 40.0]]),
             torch.tensor([1, 2]))
    props = [Instances(size, proposal_boxes=Boxes(_random_boxes(60, 64, 96, gen)))]
    seen = []
    heads.mask_head.register_forward_hook(lambda mod, inp, out: seen.append(out))
    sampled, losses = heads(ImageList(torch.zeros(1, 3, 64, 96), [size]),
                            _features(1, 64, 96, gen), props, [gt])
    fg = sampled[0].gt_classes < K
    assert 0 < fg.sum() < len(sampled[0]) and len(seen) == 1
    logits = seen[0]
    assert logits.shape[0] == fg.sum()  # background RoIs never reach the mask head
    targets = gt.gt_masks[sampled[0].gt_index[fg]].crop_and_resize(
        sampled[0].proposal_boxes.tensor[fg], 28)
    expected = mask_rcnn_loss(logits, sampled[0].gt_classes[fg], targets)
    assert torch.allclose(losses["loss_mask"], expected)


def test_eval_with_an_image_without_proposals():
    torch.manual_seed(0)
    heads = _roi_heads(score_thresh_test=0.0).eval()
    gen = torch.Generator().manual_seed(7)
    sizes = [(64, 96), (48, 64)]
    props = [Instances(sizes[0], proposal_boxes=Boxes(torch.zeros(0, 4))),
             Instances(sizes[1], proposal_boxes=Boxes(_random_boxes(10, 48, 64, gen, 4)))]
    with torch.no_grad():
        dets, _ = heads(ImageList(torch.zeros(2, 3, 64, 96), sizes), _features(2, 64, 96, gen),
                        props)
    assert len(dets[0]) == 0 and dets[0].pred_masks.shape == (0, 28, 28)
    assert len(dets[1]) > 0 and dets[1].pred_masks.shape == (len(dets[1]), 28, 28)
    with torch.no_grad():  # no proposal in the whole batch
        dets, _ = heads(ImageList(torch.zeros(1, 3, 64, 96), sizes[:1]),
                        _features(1, 64, 96, gen), props[:1])
    assert len(dets[0]) == 0 and dets[0].pred_boxes.tensor.shape == (0, 4)
