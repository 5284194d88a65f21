"""ResNet backbone: shapes, freezing, and exact parity with torchvision's ResNet-50."""
import pytest
import torch
import torchvision
from torch import nn
from torchvision.models._utils import IntermediateLayerGetter

from segkit.layers import Conv2d, FrozenBatchNorm2d, ShapeSpec
from segkit.modeling.backbone import ResNet, convert_torchvision_resnet
from segkit.registry import BACKBONES, build

ALL = ["stem", "res2", "res3", "res4", "res5"]


@pytest.mark.parametrize("depth,expansion", [(18, 1), (34, 1), (50, 4), (101, 4)])
def test_output_shapes_all_depths(depth, expansion):
    base = 8
    model = ResNet(depth=depth, base_channels=base, out_features=ALL, freeze_at=0).eval()
    shapes = model.output_shape()
    assert shapes["stem"] == ShapeSpec(channels=base, stride=4)
    for i, name in enumerate(ALL[1:]):
        assert shapes[name] == ShapeSpec(channels=base * expansion * 2 ** i, stride=4 * 2 ** i)
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        out = model(x)
    assert list(out) == ALL
    for name, t in out.items():
        s = shapes[name]
        assert t.shape == (2, s.channels, 64 // s.stride, 96 // s.stride)
    assert model.size_divisibility == 0


def test_block_counts_match_torchvision_depths():
    # Conv count (excluding shortcuts) + 1 fc = the depth in the network's name.
    for depth in (18, 34, 50, 101):
        model = ResNet(depth=depth, base_channels=4, out_features=["res5"], freeze_at=0)
        convs = [n for n, m in model.named_modules()
                 if isinstance(m, nn.Conv2d) and "shortcut" not in n]
        assert len(convs) + 1 == depth


def test_stages_after_last_out_feature_are_not_built():
    model = ResNet(depth=18, base_channels=8, out_features=["res3"], freeze_at=0)
    assert not hasattr(model, "res4") and not hasattr(model, "res5")
    assert list(model.output_shape()) == ["res3"]


@pytest.mark.parametrize("freeze_at", [0, 1, 2, 3, 5])
def test_freeze_at_leaves_the_right_parameters_trainable(freeze_at):
    model = ResNet(depth=18, norm="bn", base_channels=8, freeze_at=freeze_at)
    stages = ["stem", "res2", "res3", "res4", "res5"]
    for name, p in model.named_parameters():
        stage_idx = stages.index(name.split(".")[0])
        assert p.requires_grad == (stage_idx >= freeze_at), name
    for name, m in model.named_modules():
        if not name or "norm" not in name.split(".")[-1]:
            continue
        stage_idx = stages.index(name.split(".")[0])
        expected = FrozenBatchNorm2d if stage_idx < freeze_at else nn.BatchNorm2d
        assert type(m) is expected, name


def test_frozen_stage_has_no_gradient_and_fixed_stats_in_train_mode():
    model = ResNet(depth=18, norm="bn", base_channels=8, freeze_at=2).train()
    before = {k: v.clone() for k, v in model.state_dict().items() if "res2" in k}
    out = model(torch.randn(2, 3, 64, 64))
    sum(v.sum() for v in out.values()).backward()
    assert all(p.grad is None for n, p in model.named_parameters() if n.startswith("res2"))
    assert model.res3[0].conv1.weight.grad is not None
    for k, v in model.state_dict().items():
        if k in before:
            assert torch.equal(before[k], v), k  # BN statistics of frozen stages did not move


@pytest.mark.parametrize("norm", ["frozen_bn", "gn"])
def test_norm_choices(norm):
    model = ResNet(depth=18, norm=norm, base_channels=8, freeze_at=0)
    kinds = {type(m) for m in model.modules()}
    assert (FrozenBatchNorm2d if norm == "frozen_bn" else nn.GroupNorm) in kinds
    assert nn.BatchNorm2d not in kinds


def test_stride_placement():
    msra = ResNet(depth=50, base_channels=8, stride_in_1x1=True, freeze_at=0)
    tv = ResNet(depth=50, base_channels=8, stride_in_1x1=False, freeze_at=0)
    assert msra.res3[0].conv1.stride == (2, 2) and msra.res3[0].conv2.stride == (1, 1)
    assert tv.res3[0].conv1.stride == (1, 1) and tv.res3[0].conv2.stride == (2, 2)


def test_resnext_groups():
    model = ResNet(depth=50, base_channels=64, num_groups=32, width_per_group=4,
                   out_features=["res2"], freeze_at=0)
    assert model.res2[0].conv2.groups == 32 and model.res2[0].conv2.out_channels == 128
    assert model.output_shape()["res2"].channels == 256


def _randomize_bn(module):
    gen = torch.Generator().manual_seed(1)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=gen) * 0.2 - 0.1)
            m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=gen) * 0.5 + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=gen) * 0.2 - 0.1)


def test_matches_torchvision_resnet50():
    torch.manual_seed(0)
    tv = torchvision.models.resnet50(weights=None)
    _randomize_bn(tv)  # non-trivial statistics, so the BN mapping is really checked
    tv.eval()
    ours = ResNet(depth=50, norm="frozen_bn", stride_in_1x1=False, freeze_at=2).eval()
    ours.load_state_dict(convert_torchvision_resnet(tv.state_dict()), strict=True)
    body = IntermediateLayerGetter(
        tv, {"layer1": "res2", "layer2": "res3", "layer3": "res4", "layer4": "res5"})
    x = torch.randn(1, 3, 128, 160)
    with torch.no_grad():
        ref, out = body(x), ours(x)
    assert list(out) == list(ref)
    for name in ref:
        assert out[name].shape == ref[name].shape
        torch.testing.assert_close(out[name], ref[name], atol=1e-4, rtol=1e-4)


def test_converter_prefix_and_errors():
    sd = {"backbone.body.conv1.weight": torch.zeros(1), "backbone.body.layer1.0.bn2.bias":
          torch.ones(1), "backbone.body.layer4.2.downsample.1.running_var": torch.ones(1),
          "backbone.body.bn1.num_batches_tracked": torch.tensor(3), "rpn.head.x": torch.ones(1)}
    out = convert_torchvision_resnet(sd, prefix="backbone.body.")
    assert set(out) == {"stem.conv1.weight", "res2.0.conv2.norm.bias",
                        "res5.2.shortcut.norm.running_var"}
    with pytest.raises(ValueError, match="unexpected key 'layer9.0.conv1.weight'"):
        convert_torchvision_resnet({"layer9.0.conv1.weight": torch.zeros(1)})


def test_build_from_config_and_bad_values():
    model = build({"name": "resnet", "depth": 18, "base_channels": 8, "freeze_at": 1,
                   "out_features": ["res4", "res5"], "norm": "bn"}, BACKBONES)
    assert isinstance(model, ResNet) and list(model.output_shape()) == ["res4", "res5"]
    with pytest.raises(ValueError, match="depth must be one of"):
        ResNet(depth=42)
    with pytest.raises(ValueError, match="out_features"):
        ResNet(depth=18, out_features=["res6"])
    with pytest.raises(ValueError, match="freeze_at"):
        ResNet(depth=18, freeze_at=6)
    with pytest.raises(ValueError, match="norm"):
        ResNet(depth=18, norm="batchnorm")


def _random_frozen_bn(channels, gen):
    bn = FrozenBatchNorm2d(channels)
    bn.weight.copy_(torch.rand(channels, generator=gen) + 0.5)
    bn.bias.copy_(torch.randn(channels, generator=gen))
    bn.running_mean.copy_(torch.randn(channels, generator=gen))
    bn.running_var.copy_(torch.rand(channels, generator=gen) + 0.1)
    return bn


def test_inplace_frozen_bn_conv_is_bitwise_conv_then_norm():
    # segkit.layers.Conv2d writes a frozen norm into the conv output: it must compute exactly
    # what conv -> FrozenBatchNorm2d -> ReLU out of place does, forward and backward, and must
    # really run in place (that is where the memory goes).
    gen = torch.Generator().manual_seed(0)
    ours = Conv2d(4, 6, 3, padding=1, bias=False, norm=_random_frozen_bn(6, gen),
                  activation=torch.nn.functional.relu_)
    x = torch.randn(2, 4, 9, 11, generator=gen, requires_grad=True)
    out = ours(x)
    expected = torch.nn.functional.relu(
        ours.norm(torch.nn.functional.conv2d(x, ours.weight, padding=1)))
    assert torch.equal(out, expected)
    assert out._version > 0 and expected._version == 0
    grad = torch.randn(out.shape, generator=gen)
    gx, gw = torch.autograd.grad(out, (x, ours.weight), grad)
    rx, rw = torch.autograd.grad(expected, (x, ours.weight), grad)
    assert torch.equal(gx, rx) and torch.equal(gw, rw)


@pytest.mark.parametrize("norm", ["frozen_bn", "bn", "gn"])
def test_train_step_with_every_norm(norm):
    # the in-place ReLU / residual add / frozen affine must leave autograd intact for each norm
    torch.manual_seed(0)
    model = ResNet(depth=50, norm=norm, base_channels=8, freeze_at=1).train()
    out = model(torch.randn(2, 3, 64, 64))
    sum(v.square().mean() for v in out.values()).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    with torch.no_grad():
        again = model.eval()(torch.randn(1, 3, 64, 64))
    assert all(torch.isfinite(v).all() for v in again.values())
