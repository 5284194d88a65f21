"""DeepMask / SharpMask proposals in the core pipelines: as the proposal generator of a
two_stage Fast R-CNN, saved to a proposal file and read back by ``precomputed``, and scored by
the core proposal evaluator (box and mask AR)."""
import numpy as np
import pytest
import torch

from segkit.checkpoint import save_checkpoint
from segkit.config import compose
from segkit.data import DatasetMapper, build_test_loader, load_coco_json
from segkit.engine.defaults import build_datasets, build_model, checkpoint_meta
from segkit.engine.save_proposals import main as save_proposals_main
from segkit.evaluation import inference_on_dataset
from segkit.registry import PROPOSAL_GENERATORS, build as build_node
from segkit.structures import Boxes, ImageList, Instances
from segkit_deepmask.data import square, write_coco_dataset
from segkit_deepmask.modeling import DeepMaskProposals, SharpMaskProposals

from deepmask_testing import THIN_R18, image_input, tiny

BASE = ["~experiment", "train.device=cpu", "dataloader.num_workers=0"]
# the generator's model: thin ResNet-18, one scale, few windows
INNER = ["model.proposal_generator.model.backbone.resnet.depth=18",
         "model.proposal_generator.model.backbone.resnet.base_channels=8",
         "model.proposal_generator.model.inference.max_proposals=30",
         "model.proposal_generator.model.inference.log2_scale_min=0.0",
         "model.proposal_generator.model.inference.log2_scale_max=0.0"]
FAST_RCNN = [*BASE, "model=faster_rcnn", "model/backbone=resnet18_fpn",
             "model.backbone.bottom_up.base_channels=8", "model.backbone.out_channels=16",
             "model.roi_heads.box_head.fc_dim=32", "model.roi_heads.batch_size_per_image=32",
             "dataset.num_classes=3"]


def _gt(size, boxes, classes):
    return Instances(size, gt_boxes=Boxes(torch.tensor(boxes, dtype=torch.float32).view(-1, 4)),
                     gt_classes=torch.tensor(classes, dtype=torch.int64))


def test_fast_rcnn_trains_and_infers_on_frozen_deepmask_proposals(tmp_path):
    torch.manual_seed(0)
    weights = tiny("deepmask")  # a "trained" DeepMask: its weights go through a file
    path = str(tmp_path / "deepmask.pth")
    save_checkpoint(path, weights.state_dict())
    model = build_model(compose([*FAST_RCNN, "model/proposal_generator=deepmask", *INNER,
                                 f"model.proposal_generator.weights={path}"]))
    generator = model.proposal_generator
    assert isinstance(generator, DeepMaskProposals) and generator.uses_batched_inputs
    for (name, p), q in zip(generator.model.named_parameters(), weights.parameters()):
        assert torch.equal(p, q) and not p.requires_grad, name
    # the mapper enlarged 40 x 60 and 32 x 48 originals by 1.5
    inputs = [dict(image_input(60, 90, seed=1), height=40, width=60,
                   instances=_gt((60, 90), [[10.0, 12.0, 50.0, 60.0]], [2])),
              dict(image_input(48, 72, seed=2), height=32, width=48,
                   instances=_gt((48, 72), [], []))]
    model.train()
    assert not generator.model.training  # frozen in eval mode
    losses = model(inputs)
    assert set(losses) == {"loss_cls", "loss_box_reg"}
    sum(losses.values()).backward()
    assert all(p.grad is None for p in generator.parameters())
    assert model.roi_heads.box_predictor.cls_score.weight.grad is not None

    model.eval()
    images = ImageList.from_tensors([x["image"].float() for x in inputs], 32)
    with torch.no_grad():
        proposals, extra = generator(images, {}, None, batched_inputs=inputs)
        out = model(inputs)
    assert extra == {} and [p.image_size for p in proposals] == [(60, 90), (48, 72)]
    # proposals: the generator model's boxes at the original size, scaled by 1.5
    direct = generator.model.eval()([inputs[0]])[0]["instances"]
    assert torch.allclose(proposals[0].proposal_boxes.tensor, direct.pred_boxes.tensor * 1.5)
    assert torch.allclose(proposals[0].objectness_logits, direct.score_logits)
    assert len(out) == 2 and out[0]["instances"].image_size == (40, 60)
    with pytest.raises(ValueError, match="batched_inputs"):
        generator(images, {}, None)


def test_sharpmask_generator_needs_a_refinement_and_weights_must_fit(tmp_path):
    cfg = compose([*FAST_RCNN, "model/proposal_generator=sharpmask", *INNER])
    node = cfg.model.proposal_generator
    assert node.name == "deepmask.sharpmask" and node.model.name == "deepmask.sharpmask"
    assert isinstance(build_node(node, PROPOSAL_GENERATORS), SharpMaskProposals)
    with pytest.raises(ValueError, match="needs a model with a refinement"):
        SharpMaskProposals(tiny("deepmask"))
    path = str(tmp_path / "other.pth")
    save_checkpoint(path, tiny("deepmask").state_dict())
    with pytest.raises(ValueError, match="do not fit"):
        SharpMaskProposals(tiny("sharpmask"), weights=path)


def test_proposals_saved_to_a_file_feed_the_precomputed_generator(tmp_path):
    cfg = compose([*BASE, "model=deepmask", *THIN_R18, "model.inference.max_proposals=20",
                   "model.inference.log2_scale_min=0.0", "model.inference.log2_scale_max=0.0",
                   "model.inference.paste_masks=false"])
    build_datasets(cfg, splits=("val",))
    torch.manual_seed(0)
    ckpt = str(tmp_path / "deepmask.pth")
    save_checkpoint(ckpt, build_model(cfg).state_dict(), meta=checkpoint_meta(cfg, ["a"]))
    out = str(tmp_path / "val.pth")
    assert save_proposals_main(["--checkpoint", ckpt, "--output", out, "--max-images", "2",
                                "dataloader.min_size_test=64",
                                "dataloader.max_size_test=96"]) == 0
    records, _ = build_datasets(cfg, splits=("val",))["val"]
    generator = build_node({"name": "precomputed", "file": out}, PROPOSAL_GENERATORS).eval()
    mapper = DatasetMapper(False, 64, 96)
    inputs = [mapper(r) for r in records[:2]]
    images = ImageList.from_tensors([x["image"].float() for x in inputs])
    proposals, _ = generator(images, {}, None, batched_inputs=inputs)
    for p, x in zip(proposals, inputs):
        assert 0 < len(p) <= 20 and p.image_size == tuple(x["image"].shape[1:])
        assert (p.proposal_boxes.tensor[:, 2:] <= torch.tensor(p.image_size[::-1])).all()


def test_proposal_evaluator_gets_masks_and_boxes_in_place(tmp_path, monkeypatch):
    """One object, the square [40, 24, 120, 104] of a 200 x 300 image. A DeepMask whose only
    scoring window at scale 2 is (i, j) = (8, 10), i.e. [8 * 10 - 40, 8 * 8 - 40] + 80 px
    (papers.md 2.4), with a full mask: box and mask AR are 100 %. The mapper halves the image:
    the model maps back with height / width."""
    from segkit.evaluation import ProposalEvaluator

    json_file, root = write_coco_dataset(str(tmp_path), [
        {"height": 200, "width": 300, "objects": [{"polygon": square(40, 24, 80)}]}])
    records, metadata = load_coco_json(json_file, root)
    model = tiny("deepmask", "model.inference.log2_scale_min=1.0",
                 "model.inference.log2_scale_max=1.0", "model.inference.max_proposals=5")

    def forward_dense(images, masks=True, skips=True):
        h, w = images.shape[-2] // 16 - 9, images.shape[-1] // 16 - 9
        scores, emb = torch.full((1, h, w), -4.0), torch.zeros(1, 1, h, w)
        scores[0, 8, 10], emb[0, 0, 8, 10] = 2.0, 1.0
        return {"scores": scores, "embeddings": emb}

    monkeypatch.setattr(model, "forward_dense", forward_dense)
    monkeypatch.setattr(model, "coarse_mask_logits",
                        lambda v: (v[:, :1, None] * 40 - 20).expand(-1, 56, 56))
    loader = build_test_loader(records, DatasetMapper(False, 100, 150), num_workers=0)
    evaluator = ProposalEvaluator(records, metadata, iou_types=("bbox", "segm"),
                                  max_dets=(1, 5, 10))
    results = inference_on_dataset(model, loader, evaluator)
    assert results["bbox"]["AR@1"] == pytest.approx(100.0)
    assert results["segm"]["AR@1"] == pytest.approx(100.0)
    inst = model([DatasetMapper(False, 100, 150)(records[0])])[0]["instances"]
    assert inst.pred_boxes.tensor[0].tolist() == [40.0, 24.0, 120.0, 104.0]
    assert int(inst.pred_masks[0].sum()) == 80 * 80 and np.isclose(float(inst.scores[0]),
                                                                   1 / (1 + np.exp(-2.0)))
