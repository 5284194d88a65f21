"""Training forward on sampler batches: losses (papers.md 1.3), input checks, SharpMask's
frozen second stage (3.3), and a forward/backward of every registered component."""
import pytest
import torch
import torch.nn.functional as F

from segkit.layers import ShapeSpec
from segkit.registry import BACKBONES, HEADS, LOSSES, META_ARCHS, build as build_node
from segkit_deepmask.modeling import PatchLogisticLoss

from deepmask_testing import build, make_batch

# thin ResNet-18 trunk: fast, and with trainable BatchNorm to check eval-mode freezing
SMALL = ["model/backbone=deepmask_resnet18", "model.backbone.resnet.base_channels=16",
         "model.backbone.resnet.norm=bn"]


@pytest.fixture(scope="module")
def small_deepmask():
    return build("model=deepmask", *SMALL, "model.score_head.dropout=0")


def test_logistic_loss_matches_a_hand_computation():
    logits = torch.tensor([[[2.0, -1.0], [0.5, 3.0]], [[-2.0, 0.0], [1.0, -0.5]]])
    labels = torch.tensor([[[1.0, -1.0], [-1.0, 1.0]], [[1.0, 1.0], [-1.0, -1.0]]])
    per_pixel = torch.log1p(torch.exp(-labels * logits))
    want = per_pixel.mean(dim=(1, 2)).sum()  # mean over each patch's pixels, sum over patches
    assert torch.allclose(PatchLogisticLoss()(logits, labels), want)
    assert torch.allclose(PatchLogisticLoss(reduction="mean")(logits, labels), want / 2)
    scores, y = torch.tensor([0.3, -2.0, 4.0]), torch.tensor([1.0, 1.0, -1.0])
    assert torch.allclose(PatchLogisticLoss(1 / 32)(scores, y),
                          F.softplus(-y * scores).sum() / 32)
    with pytest.raises(ValueError, match="same shape"):
        PatchLogisticLoss()(scores, y[:2])


def test_mask_and_score_batches_give_the_papers_losses(small_deepmask):
    model = small_deepmask.train()
    batch = make_batch("mask")
    losses = model(batch)
    assert set(losses) == {"loss_mask"}
    with torch.no_grad():
        window = model.window_features(model.preprocess_image(batch).tensor)
        logits = model.mask_logits(window, model.embed(window))
    labels = torch.stack([s["mask"] for s in batch])
    want = F.softplus(-labels * logits).mean(dim=(1, 2)).sum()
    assert torch.allclose(losses["loss_mask"], want, atol=1e-5)
    losses["loss_mask"].backward()

    batch = make_batch("score")
    losses = model(batch)
    assert set(losses) == {"loss_score"}
    with torch.no_grad():
        window = model.window_features(model.preprocess_image(batch).tensor)
        scores = model.score_head(model.embed(window))
    y = torch.stack([s["label"] for s in batch])
    assert torch.allclose(losses["loss_score"], F.softplus(-y * scores).sum() / 32, atol=1e-6)


def test_eval_returns_mask_and_score_logits_per_sample(small_deepmask):
    """Eval mode on the sampler's samples (with ``kind``) gives per-patch predictions; whole
    images (core mapper inputs) get proposals (test_deepmask_inference.py)."""
    batch = make_batch("mask", n=1)
    out = small_deepmask.eval()(batch)
    assert tuple(out[0]["mask_logits"].shape) == (112, 112) and out[0]["score_logit"].dim() == 0
    patch = small_deepmask.predict_patches([{"image": batch[0]["image"]}])
    assert torch.equal(patch[0]["mask_logits"], out[0]["mask_logits"])


def test_clear_errors_on_bad_batches(small_deepmask):
    model = small_deepmask.train()
    mixed = make_batch("mask", n=1) + make_batch("score", n=1)
    with pytest.raises(ValueError, match="all 'mask' or all 'score'"):
        model(mixed)
    with pytest.raises(ValueError, match=r"'image' must be a \(3, 192, 192\) tensor"):
        model(make_batch("mask", size=160))
    with pytest.raises(ValueError, match=r"'mask' has shape \(160, 160\), expected \(112, 112\)"):
        model(make_batch("mask", label_size=160))
    zero_one = make_batch("mask")
    zero_one[0]["mask"] = (zero_one[0]["mask"] > 0).float()
    with pytest.raises(ValueError, match="must be -1 or \\+1"):
        model(zero_one)
    with pytest.raises(ValueError, match="kind"):
        model([{"image": torch.zeros(3, 192, 192, dtype=torch.uint8)}])
    no_label = make_batch("score")
    del no_label[1]["label"]
    with pytest.raises(ValueError, match="score sample 1 has no 'label'"):
        model(no_label)


def test_sharpmask_second_stage_trains_only_the_refinement():
    model = build("model=sharpmask", *SMALL)
    assert model.train_refinement_only
    model.train()
    bn = model.backbone.resnet.res2[0].conv1.norm
    assert isinstance(bn, torch.nn.BatchNorm2d) and not bn.training  # eval-mode norms
    assert not model.score_head.training and model.refinement.training
    stats = bn.running_mean.clone()
    losses = model(make_batch("mask", label_size=160))
    losses["loss_mask"].backward()
    assert torch.equal(bn.running_mean, stats)
    refinement = {id(p) for p in model.refinement.parameters()}
    for name, p in model.named_parameters():
        if id(p) in refinement:
            assert p.requires_grad and p.grad is not None, name
        else:
            assert not p.requires_grad and p.grad is None, name
    with pytest.raises(ValueError, match="score batch"):
        model(make_batch("score"))
    with pytest.raises(ValueError, match="needs a refinement"):
        build("model=deepmask", *SMALL, "model.train_refinement_only=true")


# ---------------------------------------------------------------- every component
TRUNK = {"t": ShapeSpec(channels=6, stride=16), "u": ShapeSpec(channels=4, stride=8)}
COMPONENTS = {
    (BACKBONES, "deepmask.vgg_a"): ({"out_features": ["conv5"]}, lambda: torch.rand(1, 3, 32, 32)),
    (BACKBONES, "deepmask.resnet_trunk"): (
        {"resnet": {"name": "resnet", "depth": 18, "norm": "frozen_bn", "freeze_at": 0,
                    "base_channels": 8, "out_features": ["res2", "res3", "res4"]}},
        lambda: torch.rand(1, 3, 48, 48)),
    (HEADS, "deepmask.head_c"): ({"in_channels": 6, "feature_size": 3, "hidden_channels": 4,
                                  "out_dim": 5}, lambda: torch.randn(2, 6, 3, 3)),
    (HEADS, "deepmask.mask_head"): ({"in_dim": 5, "mask_size": 4}, lambda: torch.randn(2, 5)),
    (HEADS, "deepmask.score_head"): ({"in_dim": 5, "hidden_dim": 7}, lambda: torch.randn(2, 5)),
    (HEADS, "deepmask.nips_mask_head"): ({"in_channels": 6, "feature_size": 4, "rank": 5,
                                          "hidden_channels": 3, "mask_size": 4},
                                         lambda: torch.randn(2, 6, 4, 4)),
    (HEADS, "deepmask.nips_score_head"): ({"in_channels": 6, "feature_size": 4,
                                           "hidden_dims": [5, 7]},
                                          lambda: torch.randn(2, 6, 4, 4)),
    (HEADS, "deepmask.sharpmask_refinement"): (
        {"input_shape": TRUNK, "in_dim": 5, "feature_size": 3, "in_features": ["t", "u"],
         "k": 4, "skip_hidden": [3, 3]},
        lambda: (torch.randn(2, 5), {"t": torch.randn(2, 6, 3, 3), "u": torch.randn(2, 4, 6, 6)})),
    (LOSSES, "deepmask.logistic"): ({}, lambda: (torch.randn(2, 3, 3, requires_grad=True),
                                                 torch.ones(2, 3, 3))),
}


@pytest.mark.parametrize("key", sorted(COMPONENTS, key=lambda k: k[1]), ids=lambda k: k[1])
def test_component_forward_backward(key):
    registry, name = key
    kwargs, make_input = COMPONENTS[key]
    torch.manual_seed(0)
    module = build_node({"name": name, **kwargs}, registry).train()
    inputs = make_input()
    out = module(*inputs) if isinstance(inputs, tuple) else module(inputs)
    total = sum(o.sum() for o in out.values()) if isinstance(out, dict) else out.sum()
    total.backward()
    trainable = [p for p in module.parameters() if p.requires_grad]
    assert all(p.grad is not None for p in trainable)
    if not trainable:  # the loss: the gradient reaches the logits
        assert inputs[0].grad is not None


@pytest.mark.parametrize("arch", ["deepmask.deepmask", "deepmask.sharpmask"])
def test_meta_arch_forward_backward(arch):
    model = build(f"model={arch.split('.')[1]}", *SMALL, "model.train_refinement_only=false")
    assert META_ARCHS.get(arch) is type(model)
    model.train()
    label = 160 if arch.endswith("sharpmask") else 112
    for kind in ("mask", "score"):
        model.zero_grad()
        loss = sum(model(make_batch(kind, label_size=label)).values())
        loss.backward()
        head = model.mask_head if kind == "mask" and arch.endswith("deepmask") else (
            model.refinement if kind == "mask" else model.score_head)
        assert all(p.grad is not None for p in head.parameters())
        # end to end: the trunk and head C learn from both kinds of batch (papers.md 2.3)
        assert model.backbone.resnet.res4[0].conv1.weight.grad is not None
        assert model.shared_head.fc.weight.grad is not None


def test_every_registered_component_is_covered():
    tested = {name for _, name in COMPONENTS} | {"deepmask.deepmask", "deepmask.sharpmask"}
    registered = {k for r in (BACKBONES, HEADS, LOSSES, META_ARCHS) for k in r.keys()
                  if k.startswith("deepmask.")}
    assert registered == tested


def test_nips_deepmask_trains_on_mask_and_score_batches():
    model = build("model=deepmask_vgg").train()
    loss = model(make_batch("mask", n=1, size=224, label_size=224))["loss_mask"]
    loss.backward()
    assert model.mask_head.encode.fc.weight.grad is not None
    assert model.backbone.features[0].weight.grad is not None
    model.zero_grad()
    model(make_batch("score", n=1, size=224))["loss_score"].backward()
    assert model.score_head.fc.weight.grad is not None
    assert model.mask_head.encode.fc.weight.grad is None  # a score batch trains no mask
