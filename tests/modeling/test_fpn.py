"""FPN backbone: shapes, torchvision parity (FeaturePyramidNetwork + LastLevelMaxPool), options."""
import math

import pytest
import torch
import torchvision
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops.feature_pyramid_network import (FeaturePyramidNetwork, LastLevelMaxPool,
                                                     LastLevelP6P7)

from segkit.layers import ShapeSpec
from segkit.modeling.backbone import FPN, ResNet, convert_torchvision_fpn
from segkit.registry import BACKBONES, build


def _thin_resnet(**kw):
    return ResNet(depth=18, base_channels=8, freeze_at=0, **kw)


def test_output_names_shapes_and_size_divisibility():
    fpn = FPN(_thin_resnet(), out_channels=16).eval()
    assert fpn.size_divisibility == 32
    shapes = fpn.output_shape()
    assert list(shapes) == ["p2", "p3", "p4", "p5", "p6"]
    assert all(shapes[f"p{k}"] == ShapeSpec(16, 2 ** k) for k in range(2, 7))
    # 96 x 160 is divisible by 32; P6 = stride-2 subsample of the 3 x 5 P5.
    out = fpn(torch.randn(2, 3, 96, 160))
    for k in range(2, 6):
        assert out[f"p{k}"].shape == (2, 16, 96 // 2 ** k, 160 // 2 ** k)
    assert out["p6"].shape == (2, 16, 2, 3)
    torch.testing.assert_close(out["p6"], out["p5"][:, :, ::2, ::2])


def test_odd_sizes_upsample_to_the_lateral_size():
    fpn = FPN(_thin_resnet(), out_channels=8, top_block=None).eval()
    out = fpn(torch.randn(1, 3, 100, 75))  # not divisible by 32: odd level sizes
    assert list(out) == ["p2", "p3", "p4", "p5"]
    assert out["p2"].shape[-2:] == (25, 19)
    assert out["p5"].shape[-2:] == (4, 3)


def test_init_is_caffe2_xavier_equivalent():
    fpn = FPN(_thin_resnet(), out_channels=64)
    w = fpn.fpn_output3.weight
    bound = math.sqrt(3.0 / (64 * 9))  # kaiming_uniform(a=1): U(-sqrt(3/fan_in), +)
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
    assert torch.count_nonzero(fpn.fpn_lateral2.bias) == 0


def test_matches_torchvision_fpn_with_maxpool():
    torch.manual_seed(0)
    in_channels = [8, 16, 32, 64]
    tv = FeaturePyramidNetwork(in_channels, 16, extra_blocks=LastLevelMaxPool()).eval()
    ours = FPN(_thin_resnet(), out_channels=16, top_block="maxpool").eval()
    missing, unexpected = ours.load_state_dict(convert_torchvision_fpn(tv.state_dict()),
                                               strict=False)
    assert unexpected == [] and all(k.startswith("bottom_up.") for k in missing)
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        c = ours.bottom_up(x)
        ref = tv({k: c[k] for k in ["res2", "res3", "res4", "res5"]})
        out = ours(x)
    assert len(ref) == len(out) == 5
    for (name, o), r in zip(out.items(), ref.values()):
        torch.testing.assert_close(o, r, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.slow
def test_matches_torchvision_backbone_with_fpn_resnet50():
    torch.manual_seed(0)
    tv = BackboneWithFPN(torchvision.models.resnet50(weights=None),
                         {"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"},
                         [256, 512, 1024, 2048], 256, extra_blocks=LastLevelMaxPool()).eval()
    ours = FPN(ResNet(depth=50, stride_in_1x1=False, norm="bn", freeze_at=0)).eval()
    ours.load_state_dict(convert_torchvision_fpn({"backbone." + k: v for k, v in
                                                  tv.state_dict().items()}, prefix="backbone."))
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        ref, out = tv(x), ours(x)
    for o, r in zip(out.values(), ref.values()):
        torch.testing.assert_close(o, r, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("src", ["res5", "p5"])
def test_p6p7_matches_torchvision(src):
    torch.manual_seed(0)
    bottom_up = _thin_resnet(out_features=["res3", "res4", "res5"])
    ours = FPN(bottom_up, in_features=["res3", "res4", "res5"], out_channels=16,
               top_block="p6p7", top_block_in_feature=src).eval()
    tv = FeaturePyramidNetwork([16, 32, 64], 16, extra_blocks=LastLevelP6P7(
        64 if src == "res5" else 16, 16)).eval()
    sd = convert_torchvision_fpn(tv.state_dict(), levels=(3, 4, 5))
    assert {"top_block.p6.weight", "top_block.p7.bias"} <= set(sd)
    ours.load_state_dict(sd, strict=False)
    assert list(ours.output_shape()) == ["p3", "p4", "p5", "p6", "p7"]
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        c = ours.bottom_up(x)
        ref = list(tv({k: c[k] for k in ["res3", "res4", "res5"]}).values())
        out = list(ours(x).values())
    for o, r in zip(out, ref):
        torch.testing.assert_close(o, r, atol=1e-5, rtol=1e-5)


def test_norm_and_gradients_flow_to_bottom_up():
    fpn = FPN(_thin_resnet(norm="bn"), out_channels=16, norm="gn").train()
    assert fpn.fpn_output2.bias is None and fpn.fpn_output2.norm is not None
    out = fpn(torch.randn(2, 3, 64, 64))
    sum(o.mean() for o in out.values()).backward()
    assert fpn.bottom_up.res2[0].conv1.weight.grad is not None
    assert fpn.fpn_lateral5.weight.grad.abs().sum() > 0


def test_build_from_config_dict():
    cfg = {"name": "fpn", "bottom_up": {"name": "resnet", "depth": 18, "base_channels": 8,
                                        "out_features": ["res2", "res3", "res4", "res5"]},
           "in_features": ["res2", "res3", "res4", "res5"], "out_channels": 16,
           "top_block": "maxpool", "fuse_type": "sum", "norm": ""}
    model = build(cfg, BACKBONES)
    assert isinstance(model, FPN) and isinstance(model.bottom_up, ResNet)
    assert model.bottom_up.freeze_at == 2
    assert list(model(torch.randn(1, 3, 64, 64))) == ["p2", "p3", "p4", "p5", "p6"]


def test_bad_config_values_raise_clear_errors():
    with pytest.raises(ValueError, match="in_features"):
        FPN(_thin_resnet(out_features=["res4", "res5"]), in_features=["res3", "res4"])
    with pytest.raises(ValueError, match="top_block"):
        FPN(_thin_resnet(), top_block="p6")
    with pytest.raises(ValueError, match="fuse_type"):
        FPN(_thin_resnet(), fuse_type="concat")
    with pytest.raises(ValueError, match="unexpected key"):
        convert_torchvision_fpn({"fpn.weird.0.weight": torch.zeros(1)})
