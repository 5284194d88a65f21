"""Trunks: the VGG-A trunk of the NIPS DeepMask and the mirror-padded ResNet of DeepMask-ours.

Both return ``{name: (N, C, H / stride, W / stride)}`` and describe it with ``output_shape()``,
like the core backbones, so heads get their channel counts from the trunk at build time.
"""
from __future__ import annotations

from typing import Dict, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from segkit.layers import ShapeSpec
from segkit.registry import BACKBONES

from ..layers import convert_padding

__all__ = ["VGGTrunk", "ResNetTrunk"]

# VGG-A ("configuration A" of Simonyan & Zisserman, torchvision's vgg11): conv widths per
# block, a 2x2 max-pool between blocks. The fifth pool and the FC layers are dropped (papers.md
# 1.1), leaving 8 convs and 4 pools: 512 x H/16 x W/16.
_VGG_A = ((64,), (128,), (256, 256), (512, 512), (512, 512))
_VGG_STAGES = ("conv1", "conv2", "conv3", "conv4", "conv5")


@BACKBONES.register("vgg_a", scope="deepmask")
class VGGTrunk(nn.Module):
    """VGG-A convolutional trunk of the original DeepMask (papers.md 1.1).

    ``features`` has the layer indices of torchvision's ``vgg11().features`` (conv, ReLU,
    pool, ...) without its last pool, so its ``features.*`` ImageNet weights load as they are.

    Args:
        out_features: stages to return, a subset of conv1..conv5 (the last ReLU of each
            block, strides 1, 2, 4, 8, 16). The DeepMask heads read ``conv5``.
        padding: padding of the 3x3 convs: "zeros" (VGG's own, the NIPS model), "symmetric" or
            "reflect" (see :mod:`segkit_deepmask.layers`).
        in_channels: image channels.

    Input (N, in_channels, H, W) -> ``{name: (N, C, H / stride, W / stride)}``; 512 x 14 x 14
    at ``conv5`` for a 224 patch.
    """

    def __init__(self, out_features: Sequence[str] = ("conv5",), padding: str = "zeros",
                 in_channels: int = 3):
        super().__init__()
        out_features = list(out_features)
        bad = [f for f in out_features if f not in _VGG_STAGES]
        if bad or not out_features:
            raise ValueError(f"vgg_a: out_features must be a non-empty subset of "
                             f"{list(_VGG_STAGES)}, got {out_features}")
        layers, shapes, cin = [], {}, in_channels
        self._stage_end: Dict[int, str] = {}  # index of a block's last ReLU -> stage name
        for i, (name, widths) in enumerate(zip(_VGG_STAGES, _VGG_A)):
            if i > 0:
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            for width in widths:
                conv = nn.Conv2d(cin, width, kernel_size=3, padding=1)
                nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(conv.bias)
                layers += [conv, nn.ReLU(inplace=True)]
                cin = width
            self._stage_end[len(layers) - 1] = name
            shapes[name] = ShapeSpec(channels=cin, stride=2 ** i)
        self.features = nn.Sequential(*layers)
        convert_padding(self.features, padding)
        # layers after the last requested stage are not run
        self._num_layers = 1 + max(i for i, n in self._stage_end.items() if n in out_features)
        self.out_features, self.size_divisibility = out_features, 0
        self._shapes = {f: shapes[f] for f in out_features}

    def output_shape(self) -> Dict[str, ShapeSpec]:
        """Channels and stride of every returned feature."""
        return dict(self._shapes)

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        """Args: x (N, C, H, W) normalised images. Returns {name: (N, C_l, H_l, W_l)}."""
        out = {}
        for i in range(self._num_layers):
            x = self.features[i](x)
            name = self._stage_end.get(i)
            if name in self._shapes:
                out[name] = x
        return out


def _core_resnet_names(state_dict, prefix, *args) -> None:
    """Accept the core FPN backbone's name for the same ResNet (``<prefix>bottom_up.``, e.g.
    the model zoo's converted ImageNet ResNet-50 or a Mask R-CNN checkpoint) as this trunk's
    ``<prefix>resnet.``, so those files initialise the trunk (``train.init_weights``); stages
    the trunk does not build (res5) stay unexpected keys in the load report."""
    core = prefix + "bottom_up."
    if any(k.startswith(prefix + "resnet.") for k in state_dict):
        return
    for key in [k for k in state_dict if k.startswith(core)]:
        state_dict[prefix + "resnet." + key[len(core):]] = state_dict.pop(key)


@BACKBONES.register("resnet_trunk", scope="deepmask", children={"resnet": BACKBONES})
class ResNetTrunk(nn.Module):
    """The DeepMask-ours trunk: a core ResNet cut after its last built stage, mirror-padded,
    that also returns ``conv1`` (papers.md 2.1 "W160-P4-D39", 3.2's skip features).

    The cut comes from the core ResNet's ``out_features`` (it builds no stage after the last
    one requested): ``[res2, res3, res4]`` keeps ResNet-50 up to res4, 1024 channels at stride
    16. Fixed-affine BatchNorm (``BNtoFixed`` in the released code) is the core's
    ``norm: frozen_bn``; the convolutions stay trainable (``freeze_at: 0``).

    Args:
        resnet: a built :class:`segkit.modeling.backbone.ResNet` (any depth; ResNet-18 gives
            64/64/128/256 channels at conv1/res2/res3/res4).
        padding: "symmetric" (default, the released code), "reflect" or "zeros" for the 3x3
            and 7x7 convolutions (see :mod:`segkit_deepmask.layers`).

    Input (N, 3, H, W) -> ``{"conv1": (N, 64, H/2, W/2), <resnet out_features>}``, e.g.
    conv1 64x96x96, res2 256x48x48, res3 512x24x24, res4 1024x12x12 for ResNet-50 at 192.
    """

    def __init__(self, resnet: nn.Module, padding: str = "symmetric"):
        super().__init__()
        if not (hasattr(resnet, "stem") and hasattr(resnet, "stage_names")):
            raise TypeError(f"resnet_trunk: 'resnet' must be segkit's ResNet backbone (with "
                            f"'stem' and 'stage_names'), got {type(resnet).__name__}")
        self.resnet = convert_padding(resnet, padding)
        self.padding = padding
        self.size_divisibility = 0
        # conv1 is the stem convolution + norm + ReLU, before the stem's max-pool (the
        # released code's module 3, the input of SharpMask's last refinement, papers.md 3.2)
        self._shapes = {"conv1": ShapeSpec(channels=resnet.stem.out_channels, stride=2),
                        **resnet.output_shape()}
        self._register_load_state_dict_pre_hook(_core_resnet_names)

    def output_shape(self) -> Dict[str, ShapeSpec]:
        """Channels and stride of every returned feature."""
        return dict(self._shapes)

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        """Args: x (N, 3, H, W) normalised images. Returns {name: (N, C_l, H_l, W_l)}."""
        if x.dim() != 4:
            raise ValueError(f"resnet_trunk: expected input (N, C, H, W), got {tuple(x.shape)}")
        x = self.resnet.stem.conv1(x)
        out = {"conv1": x}
        # the rest of the core stem (BasicStem.forward) after its conv
        x = F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
        for name in self.resnet.stage_names:
            x = getattr(self.resnet, name)(x)
            if name in self._shapes:
                out[name] = x
        return out
