"""proposal_only meta-architecture, and two_stage on proposals precomputed by it."""
import numpy as np
import pytest
import torch
from PIL import Image

import segkit.modeling  # noqa: F401  (registration)
from segkit.config import compose
from segkit.data import DatasetMapper
from segkit.data.proposals import load_proposals, save_proposals
from segkit.engine.defaults import build_model
from segkit.engine.save_proposals import save_dataset_proposals
from segkit.modeling.meta_arch import ProposalOnlyDetector
from segkit.registry import META_ARCHS, build
from segkit.structures import Boxes, Instances

MEAN, STD = [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]
TINY_BACKBONE = {"name": "fpn", "out_channels": 16, "bottom_up": {
    "name": "resnet", "depth": 18, "base_channels": 16, "norm": "bn", "freeze_at": 0}}


def _rpn_model(post_nms_topk_test=50):
    torch.manual_seed(0)
    return build({"name": "proposal_only", "pixel_mean": MEAN, "pixel_std": STD,
                  "backbone": TINY_BACKBONE,
                  "proposal_generator": {"name": "rpn",
                                         "anchor_sizes": [[16], [32], [64], [128], [256]],
                                         "pre_nms_topk_test": 200,
                                         "post_nms_topk_test": post_nms_topk_test}},
                 META_ARCHS, path="model")


def _image(h, w, seed=0):
    return torch.randint(0, 256, (3, h, w), generator=torch.Generator().manual_seed(seed),
                         dtype=torch.uint8)


@pytest.mark.parametrize("experiment", ["rpn_r18_fpn_embedded", "rpn_r50_fpn_1x_coco"])
def test_builds_from_experiment_and_proposes_at_original_resolution(experiment):
    cfg = compose([f"experiment={experiment}", "train.device=cpu"])
    assert cfg.model.name == "proposal_only" and "roi_heads" not in cfg.model
    with torch.no_grad():
        model = build_model(cfg).eval()
        assert isinstance(model, ProposalOnlyDetector)
        # network input 64 x 96 of an original 128 x 192 image (the mapper halved it)
        inputs = [{"image": _image(64, 96), "height": 128, "width": 192}]
        out = model(inputs)[0]["instances"]
        raw = model.inference(inputs, do_postprocess=False)[0]
    assert out.image_size == (128, 192) and raw.image_size == (64, 96)
    assert set(out.get_fields()) == {"pred_boxes", "scores", "pred_classes"}
    assert 0 < len(out) <= cfg.model.proposal_generator.post_nms_topk_test
    assert (out.pred_classes == 0).all()
    assert ((out.scores >= 0) & (out.scores <= 1)).all()
    assert (out.scores[:-1] >= out.scores[1:]).all()  # sorted by decreasing score
    torch.testing.assert_close(out.pred_boxes.tensor, raw.pred_boxes.tensor * 2)
    b = out.pred_boxes.tensor
    assert (b[:, 0] >= 0).all() and (b[:, 2] <= 192).all() and (b[:, 3] <= 128).all()


def test_outputs_are_the_rpn_proposals():
    model = _rpn_model(post_nms_topk_test=30).eval()
    inputs = [{"image": _image(64, 96)}, {"image": _image(48, 80, seed=1)}]
    with torch.no_grad():
        out = model(inputs)
        images = model.preprocess_image(inputs)
        props, _ = model.proposal_generator(images, model.backbone(images.tensor))
    for o, p in zip(out, props):
        inst = o["instances"]
        assert len(inst) == len(p) == 30
        torch.testing.assert_close(inst.pred_boxes.tensor, p.proposal_boxes.tensor)
        torch.testing.assert_close(inst.scores, torch.sigmoid(p.objectness_logits))


def test_training_returns_rpn_losses_with_and_without_gt():
    model = _rpn_model().train()
    gt = Instances((64, 96), gt_boxes=Boxes(torch.tensor([[10.0, 12.0, 50.0, 60.0]])),
                   gt_classes=torch.tensor([2]))
    empty = Instances((48, 80), gt_boxes=Boxes(torch.zeros(0, 4)),
                      gt_classes=torch.zeros(0, dtype=torch.int64))
    losses = model([{"image": _image(64, 96), "instances": gt},
                    {"image": _image(48, 80), "instances": empty}])
    assert set(losses) == {"loss_rpn_cls", "loss_rpn_loc"}
    assert all(torch.isfinite(v) and v.dim() == 0 for v in losses.values())
    assert losses["loss_rpn_loc"] > 0
    sum(losses.values()).backward()
    assert model.backbone.bottom_up.stem.conv1.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"training inputs \[0\] have no 'instances'"):
        model([{"image": _image(64, 96)}])


@pytest.fixture
def two_images(tmp_path):
    """Two PNG images of different sizes as dataset records (original sizes 80x120, 100x72)."""
    records = []
    for i, (h, w) in enumerate([(80, 120), (100, 72)]):
        path = str(tmp_path / f"{i}.png")
        Image.fromarray(_image(h, w, seed=i).permute(1, 2, 0).numpy()).save(path)
        records.append({"file_name": path, "image_id": 10 + i, "height": h, "width": w,
                        "annotations": [{"bbox": [8, 10, 40, 30], "category_id": i,
                                         "iscrowd": 0}]})
    return records


def _fast_rcnn(file, test_file=None):
    overrides = ["experiment=faster_rcnn_r50_fpn_1x_coco", "train.device=cpu",
                 "model/proposal_generator=precomputed", f"model.proposal_generator.file={file}",
                 "model/backbone=resnet18_fpn", "model.backbone.bottom_up.base_channels=16",
                 "model.backbone.bottom_up.norm=bn", "model.backbone.bottom_up.freeze_at=0",
                 "model.backbone.out_channels=16", "model.roi_heads.box_head.fc_dim=32",
                 "model.roi_heads.batch_size_per_image=32", "dataset.num_classes=3"]
    if test_file:
        overrides.append(f"model.proposal_generator.test_file={test_file}")
    torch.manual_seed(0)
    return build_model(compose(overrides))


def test_two_stage_trains_and_infers_on_saved_proposals(two_images, tmp_path):
    rpn = _rpn_model(post_nms_topk_test=40)
    test_mapper = DatasetMapper(False, 64, 1000)
    test_inputs = [test_mapper(r) for r in two_images]  # resized: 64x96 and 88x64 (h x w)
    path = str(tmp_path / "props.pth")
    save_dataset_proposals(rpn, [test_inputs], path, meta={"split": "test"})
    saved = load_proposals(path)
    assert set(saved.boxes) == {10, 11} and saved.image_sizes == {10: (80, 120), 11: (100, 72)}
    with torch.no_grad():
        raw = rpn.eval().inference(test_inputs, do_postprocess=False)

    model = _fast_rcnn(path)
    assert type(model.proposal_generator).__name__ == "PrecomputedProposals"
    # eval: the file's proposals come back at the network input where the RPN made them
    model.eval()
    with torch.no_grad():
        images = model.preprocess_image(test_inputs)
        props, losses = model.proposal_generator(images, {}, None, batched_inputs=test_inputs)
    assert losses == {}
    for p, r in zip(props, raw):
        torch.testing.assert_close(p.proposal_boxes.tensor, r.pred_boxes.tensor,
                                   atol=1e-4, rtol=0)
        torch.testing.assert_close(torch.sigmoid(p.objectness_logits), r.scores)

    # training with a forced flip: boxes are scaled, then mirrored like the image
    model.train()
    train_mapper = DatasetMapper(True, [40], 1000, flip_prob=1.0, use_masks=False)
    train_inputs = [train_mapper(r, rng=np.random.default_rng(0)) for r in two_images]
    images = model.preprocess_image(train_inputs)
    props, _ = model.proposal_generator(images, {}, None, batched_inputs=train_inputs)
    h, w = images.image_sizes[0]  # 40 x 60 from 80 x 120: scale 0.5
    assert (h, w) == (40, 60)
    b = saved.boxes[10] * 0.5
    expected = torch.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], 1).clamp(min=0)
    expected[:, 3] = expected[:, 3].clamp(max=h)
    keep = (expected[:, 2] > expected[:, 0]) & (expected[:, 3] > expected[:, 1])
    torch.testing.assert_close(props[0].proposal_boxes.tensor, expected[keep], atol=1e-4, rtol=0)

    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    losses = model(train_inputs)
    assert set(losses) == {"loss_cls", "loss_box_reg"}  # no RPN losses: nothing to learn there
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    opt.step()
    model.eval()
    with torch.no_grad():
        out = model(test_inputs)
    assert [o["instances"].image_size for o in out] == [(80, 120), (100, 72)]


def test_precomputed_errors(two_images, tmp_path):
    path = str(tmp_path / "props.pth")
    save_proposals(path, {10: torch.tensor([[1.0, 2, 30, 40]])}, {10: torch.tensor([0.9])},
                   {10: (80, 120)})
    other = str(tmp_path / "val.pth")
    save_proposals(other, {11: torch.zeros(0, 4)}, {11: torch.zeros(0)}, {11: (99, 72)})
    model = _fast_rcnn(path, test_file=other)
    mapper = DatasetMapper(False, 64, 1000)
    inputs = [mapper(r) for r in two_images]
    gen = model.proposal_generator
    images = model.preprocess_image(inputs)
    # training mode reads `file`, which lacks image 11
    with pytest.raises(KeyError, match=r"proposal file '.*props.pth' has no proposals for "
                                       r"image_id 11"):
        gen(images, {}, None, batched_inputs=inputs)
    gen.eval()  # eval mode reads `test_file`: image 11 had another size there
    with pytest.raises(ValueError, match=r"val.pth': image_id 11 was \(99, 72\).*\(100, 72\)"):
        gen(model.preprocess_image(inputs[1:]), {}, None, batched_inputs=inputs[1:])
    with pytest.raises(ValueError, match="need the model inputs"):
        gen(images, {}, None)
    with pytest.raises(Exception, match=r"'file' is not set.*model.proposal_generator.file"):
        build_model(compose(["experiment=faster_rcnn_r50_fpn_1x_coco", "train.device=cpu",
                             "model/proposal_generator=precomputed", "dataset.num_classes=3"]))
    # an image whose file entry is empty gets no proposals; training still works (GT boxes)
    model.train()
    empty_ok = _fast_rcnn(other)
    train_inputs = [DatasetMapper(True, [50], 1000, flip_prob=0.0, use_masks=False)(
        dict(two_images[1], height=100), rng=np.random.default_rng(0))]
    empty_ok.proposal_generator.train_proposals.image_sizes.clear()  # size check off
    props, _ = empty_ok.proposal_generator(empty_ok.preprocess_image(train_inputs), {}, None,
                                           batched_inputs=train_inputs)
    assert len(props[0]) == 0
    losses = empty_ok.train()(train_inputs)
    assert all(torch.isfinite(v) for v in losses.values())
