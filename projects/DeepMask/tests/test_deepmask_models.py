"""Trunks, heads and refinement: shapes, parameter counts, dense forms (papers.md 1-3)."""
import pytest
import torch

from segkit.layers import ShapeSpec
from segkit.modeling.backbone import ResNet
from segkit_deepmask.modeling import (MaskHead, NipsMaskHead, NipsScoreHead, ResNetTrunk,
                                      ScoreHead, SharedHead, SharpMaskRefinement, VGGTrunk)

from deepmask_testing import build


def _params(module):
    return sum(p.numel() for p in module.parameters())


def test_deepmask_ours_shapes_and_params(deepmask_r50):
    model = deepmask_r50.eval()
    images = torch.rand(2, 3, 192, 192)
    features = model.backbone(images)
    assert {k: tuple(v.shape[1:]) for k, v in features.items()} == {
        "conv1": (64, 96, 96), "res2": (256, 48, 48), "res3": (512, 24, 24),
        "res4": (1024, 12, 12)}
    window = model.window_features(images)
    assert tuple(window["res4"].shape) == (2, 1024, 10, 10)  # 1 px crop (papers.md 2.1)
    with torch.no_grad():
        vec = model.embed(window)
        assert tuple(vec.shape) == (2, 512)
        assert tuple(model.coarse_mask_logits(vec).shape) == (2, 56, 56)
        assert tuple(model.mask_logits(window, vec).shape) == (2, 112, 112)
        assert tuple(model.score_head(vec).shape) == (2,)
    # papers.md 2.1: ~17M (8.5M trunk + 0.13M + 6.55M + 1.6M + 0.5M)
    assert 16.5e6 < _params(model) < 18.0e6
    assert 8.3e6 < _params(model.backbone) < 8.8e6
    assert model.backbone.resnet.res4[0].conv2.mirror_padding == "symmetric"
    assert model.backbone.resnet.stem.conv1.mirror_padding == "symmetric"


def test_nips_deepmask_shapes_and_params():
    model = build("model=deepmask_vgg").eval()
    # papers.md 1.1: ~75M (51.4M low-rank + 1.6M + 12.8M score FC + ~9M trunk)
    assert 74e6 < _params(model) < 77e6
    assert 9.0e6 < _params(model.backbone) < 9.5e6
    batch = [{"image": torch.randint(0, 256, (3, 224, 224), dtype=torch.uint8)}]
    with torch.no_grad():
        patch = model.predict_patches(batch)[0]
        dense = model.forward_dense(model.preprocess_image(batch).tensor)
    assert tuple(patch["mask_logits"].shape) == (224, 224)  # 56 x 56 up-sampled to the patch
    # the whole patch is one window: a 1 x 1 dense grid
    assert tuple(dense["scores"].shape) == (1, 1, 1)
    assert torch.allclose(dense["scores"][0, 0, 0], patch["score_logit"], atol=1e-4)
    assert tuple(dense["masks"].shape) == (1, 56 * 56, 1, 1)


def test_vgg_trunk_is_vgg_a_at_stride_16():
    trunk = VGGTrunk(out_features=["conv3", "conv5"])
    convs = [m for m in trunk.features if isinstance(m, torch.nn.Conv2d)]
    pools = [m for m in trunk.features if isinstance(m, torch.nn.MaxPool2d)]
    assert len(convs) == 8 and len(pools) == 4  # the fifth pool is removed (papers.md 1.1)
    assert trunk.output_shape() == {"conv3": ShapeSpec(channels=256, stride=4),
                                    "conv5": ShapeSpec(channels=512, stride=16)}
    out = trunk(torch.rand(1, 3, 64, 64))
    assert tuple(out["conv3"].shape) == (1, 256, 16, 16)
    assert tuple(out["conv5"].shape) == (1, 512, 4, 4)
    # layer indices of torchvision's vgg11().features, so its ImageNet weights load
    assert [k for k in trunk.state_dict() if k.endswith("weight")][:3] == [
        "features.0.weight", "features.3.weight", "features.6.weight"]


def test_sharpmask_shapes_match_the_table(sharpmask_r50):
    """papers.md 3.2: M1 32x10x10 -> 16x20x20 -> 8x40x40 -> 4x80x80 -> 2x160x160 -> 1."""
    model = sharpmask_r50.eval()
    ref = model.refinement
    seen = {}

    def record(k):
        def hook(module, inputs, output):
            seen[k] = tuple(tuple(t.shape[1:]) for t in (*inputs, output))
        return hook

    hooks = [r.register_forward_hook(record(k)) for k, r in enumerate(ref.refinements, 1)]
    # forward() goes through horizontal() + decode(); call the modules' own forward too
    window = model.window_features(torch.rand(1, 3, 192, 192))
    with torch.no_grad():
        vec = model.embed(window)
        m = ref.expand(vec).view(1, 32, 10, 10)
        for r, name in zip(ref.refinements, ref.in_features):
            m = r(m, window[name])
        out = ref.predictor(m)
        assert torch.allclose(out, ref(vec, window), atol=1e-5)
    for h in hooks:
        h.remove()
    assert seen == {
        1: ((32, 10, 10), (1024, 10, 10), (16, 20, 20)),
        2: ((16, 20, 20), (512, 20, 20), (8, 40, 40)),
        3: ((8, 40, 40), (256, 40, 40), (4, 80, 80)),
        4: ((4, 80, 80), (64, 80, 80), (2, 160, 160))}
    assert tuple(out.shape) == (1, 1, 160, 160)
    convs = {k: [(c.in_channels, c.out_channels) for c in r.horizontal
                 if isinstance(c, torch.nn.Conv2d)] for k, r in enumerate(ref.refinements, 1)}
    assert convs == {1: [(1024, 64), (64, 32), (32, 16)], 2: [(512, 64), (64, 16), (16, 8)],
                     3: [(256, 64), (64, 8), (8, 4)], 4: [(64, 32), (32, 4), (4, 2)]}
    vertical = [[(c.in_channels, c.out_channels) for c in r.vertical
                 if isinstance(c, torch.nn.Conv2d)] for r in ref.refinements]
    assert vertical == [[(32, 32), (32, 16)], [(16, 16), (16, 8)], [(8, 8), (8, 4)],
                        [(4, 4), (4, 2)]]
    # papers.md 3.2: < 3M (1.64M for R0 + ~1.1M convs)
    assert 2.5e6 < _params(ref) < 3.0e6


@pytest.mark.parametrize("upsample", ["bilinear", "nearest"])
def test_sharpmask_on_a_resnet18_trunk(upsample):
    model = build("model=sharpmask", "model/backbone=deepmask_resnet18",
                  f"model.refinement.upsample={upsample}")
    assert model.backbone.resnet.depth == 18
    assert model.shared_head.reduce.in_channels == 256  # ResNet-18 res4
    assert [r.horizontal[0].in_channels for r in model.refinement.refinements] == [
        256, 128, 64, 64]
    model.eval()
    out = model.predict_patches([{"image": torch.rand(3, 192, 192) * 255}])
    assert tuple(out[0]["mask_logits"].shape) == (160, 160)


def test_refinement_rejects_skips_that_do_not_halve_the_stride():
    shapes = {"res4": ShapeSpec(channels=8, stride=16), "res2": ShapeSpec(channels=8, stride=4)}
    with pytest.raises(ValueError, match="half the stride"):
        SharpMaskRefinement(shapes, 16, 10, in_features=["res4", "res2"], skip_hidden=[8, 8])
    with pytest.raises(ValueError, match="divisible"):
        SharpMaskRefinement(shapes, 16, 10, in_features=["res4"], k=3, skip_hidden=[8])


def test_resnet_trunk_padding_options():
    for padding in ("zeros", "reflect", "symmetric"):
        resnet = ResNet(depth=18, out_features=["res2"], freeze_at=0)
        trunk = ResNetTrunk(resnet, padding=padding)
        out = trunk(torch.rand(1, 3, 32, 32))
        assert tuple(out["conv1"].shape) == (1, 64, 16, 16)
        assert tuple(out["res2"].shape) == (1, 64, 8, 8)
    with pytest.raises(TypeError, match="segkit's ResNet"):
        ResNetTrunk(torch.nn.Conv2d(3, 3, 1))


# ---------------------------------------------------------------- dense == patch
def _windows(x, s):
    h, w = x.shape[-2] - s + 1, x.shape[-1] - s + 1
    return [(i, j, x[..., i:i + s, j:j + s]) for i in range(h) for j in range(w)]


def test_head_c_mask_and_score_heads_dense_equal_patch():
    torch.manual_seed(0)
    shared = SharedHead(in_channels=6, feature_size=4, hidden_channels=5, out_dim=7)
    mask, score = MaskHead(7, mask_size=3), ScoreHead(7, hidden_dim=9).eval()
    x = torch.randn(2, 6, 7, 6)
    emb = shared.forward_dense(x)
    masks, scores = mask.forward_dense(emb), score.forward_dense(emb)
    assert tuple(emb.shape) == (2, 7, 4, 3) and tuple(masks.shape) == (2, 9, 4, 3)
    assert tuple(scores.shape) == (2, 4, 3)
    for i, j, window in _windows(x, 4):
        vec = shared(window)
        assert torch.allclose(emb[:, :, i, j], vec, atol=1e-5)
        assert torch.allclose(masks[:, :, i, j].view(2, 3, 3), mask(vec), atol=1e-5)
        assert torch.allclose(scores[:, i, j], score(vec), atol=1e-5)


def test_nips_heads_dense_equal_patch_at_stride_16():
    """The score branch's fine-stride pooling gives one score per feature position
    (papers.md 1.5), not one per 2 x 2 pooled cell."""
    torch.manual_seed(0)
    mask = NipsMaskHead(6, feature_size=4, hidden_channels=5, rank=7, mask_size=3)
    score = NipsScoreHead(6, feature_size=4, hidden_dims=(8, 9)).eval()
    x = torch.randn(1, 6, 8, 7)
    masks, scores = mask.forward_dense(x), score.forward_dense(x)
    assert tuple(masks.shape) == (1, 9, 5, 4) and tuple(scores.shape) == (1, 5, 4)
    for i, j, window in _windows(x, 4):
        assert torch.allclose(masks[:, :, i, j].view(1, 3, 3), mask(window), atol=1e-5)
        assert torch.allclose(scores[:, i, j], score(window), atol=1e-5)


def test_model_dense_equals_patch_at_the_central_window(deepmask_r50):
    """On a 192 input the dense grid is 3 x 3 and its centre is the patch (1 px crop)."""
    model = deepmask_r50.eval()
    batch = [{"image": torch.rand(3, 192, 192) * 255}]
    with torch.no_grad():
        images = model.preprocess_image(batch).tensor
        dense = model.forward_dense(images)
        window = model.window_features(images)
        vec = model.embed(window)
        patch = model.predict_patches(batch)
    assert tuple(dense["scores"].shape) == (1, 3, 3)
    assert tuple(dense["masks"].shape) == (1, 56 * 56, 3, 3)
    scores = torch.stack([p["score_logit"] for p in patch])
    assert torch.allclose(dense["scores"][:, 1, 1], scores, atol=1e-4)
    assert torch.allclose(dense["masks"][:, :, 1, 1].view(1, 56, 56),
                          model.coarse_mask_logits(vec), atol=1e-4)


def test_refinement_skips_dense_equal_patch_inside_the_window():
    """Horizontal nets run once on the whole image (papers.md 3.4); they match the patch
    form except within 3 px (three 3x3 convs) of the window border."""
    torch.manual_seed(0)
    shapes = {"a": ShapeSpec(channels=4, stride=16), "b": ShapeSpec(channels=3, stride=8)}
    ref = SharpMaskRefinement(shapes, in_dim=6, feature_size=8, in_features=["a", "b"], k=8,
                              skip_hidden=[5, 5]).eval()
    full = {"a": torch.randn(1, 4, 14, 14), "b": torch.randn(1, 3, 28, 28)}
    dense = ref.horizontal(full)
    top, left = 3, 5  # window origin on the coarsest map
    window = {"a": full["a"][..., top:top + 8, left:left + 8],
              "b": full["b"][..., 2 * top:2 * top + 16, 2 * left:2 * left + 16]}
    patch = ref.horizontal(window)
    crops = []
    for level, (d, p) in enumerate(zip(dense, patch)):
        s, t, l = p.shape[-1], top * 2 ** level, left * 2 ** level
        crops.append(d[..., t:t + s, l:l + s])
        assert torch.allclose(crops[-1][..., 3:-3, 3:-3], p[..., 3:-3, 3:-3], atol=1e-5)
    vec = torch.randn(1, 6)
    assert tuple(ref.decode(vec, crops).shape) == (1, 1, 32, 32)


def test_resnet_trunk_loads_core_backbone_checkpoints():
    """A core FPN backbone's ResNet (``backbone.bottom_up.*``: the zoo's converted ImageNet
    ResNet-50, a Mask R-CNN checkpoint) initialises the trunk (``backbone.resnet.*``); the
    stage the trunk does not build is reported as unexpected."""
    from segkit.checkpoint import load_state_dict_report
    from segkit.config import compose
    from segkit.engine.defaults import build_model

    core = build_model(compose(["dataset.num_classes=2", "train.device=cpu",
                                "model.backbone.bottom_up.depth=18",
                                "model.backbone.bottom_up.base_channels=64"]))
    state = {k: v for k, v in core.state_dict().items() if k.startswith("backbone.bottom_up.")}
    model = build("model=deepmask", "model/backbone=deepmask_resnet18")
    report = load_state_dict_report(model, state, source="core")
    loaded = model.state_dict()
    for key, value in state.items():
        name = "backbone.resnet." + key[len("backbone.bottom_up."):]
        if name in loaded:
            assert torch.equal(loaded[name], value), name
    assert any(k.startswith("backbone.resnet.res5.") for k in report.unexpected)
    assert not [k for k in report.missing if k.startswith("backbone.")]
    assert not report.shape_mismatch
