"""ResNet bottom-up backbone (stages C2-C5 used by FPN, papers.md section 5).

Module names follow Detectron's layout (``stem.conv1``, ``res2.0.conv1``, ``res2.0.shortcut``
with the norm inside each conv as ``.norm``) so that Detectron-style checkpoints map one to one;
:func:`convert_torchvision_resnet` renames torchvision keys into this layout.
"""
from __future__ import annotations

import re
from typing import Dict, List, Optional, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from segkit.layers import Conv2d, FrozenBatchNorm2d, ShapeSpec, get_norm
from segkit.registry import BACKBONES

__all__ = ["ResNet", "BasicStem", "BasicBlock", "BottleneckBlock",
           "convert_torchvision_resnet"]

_STAGE_BLOCKS = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3], 50: [3, 4, 6, 3], 101: [3, 4, 23, 3],
                 152: [3, 8, 36, 3]}
_STAGES = ["res2", "res3", "res4", "res5"]
_NORMS = ("frozen_bn", "bn", "gn", "sync_bn")


def _init_conv(conv: nn.Conv2d) -> None:
    # MSRA fill (He et al.), as in Detectron and torchvision: fan_out, ReLU gain.
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


def _conv(cin: int, cout: int, k: int, stride: int, norm: str, groups: int = 1,
          relu: bool = False) -> Conv2d:
    # In-place ReLU on the norm's output (as torchvision's ResNet does): no norm's backward
    # reads its output, and one fewer full-size temporary per layer lowers peak training memory.
    conv = Conv2d(cin, cout, kernel_size=k, stride=stride, padding=k // 2, groups=groups,
                  bias=False, norm=get_norm(norm, cout), activation=F.relu_ if relu else None)
    _init_conv(conv)
    return conv


class BasicStem(nn.Module):
    """7x7/2 conv + norm + ReLU + 3x3/2 max-pool: (N, 3, H, W) -> (N, C, H/4, W/4)."""

    def __init__(self, in_channels: int = 3, out_channels: int = 64, norm: str = "frozen_bn"):
        super().__init__()
        self.conv1 = _conv(in_channels, out_channels, 7, 2, norm, relu=True)
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> Tensor:
        """Args: x (N, C_in, H, W). Returns (N, C, ceil(H / 4), ceil(W / 4))."""
        return F.max_pool2d(self.conv1(x), kernel_size=3, stride=2, padding=1)


class BasicBlock(nn.Module):
    """Two 3x3 convs with an identity (or 1x1 projection) shortcut; ResNet-18/34."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, norm: str):
        super().__init__()
        self.conv1 = _conv(in_channels, out_channels, 3, stride, norm, relu=True)
        self.conv2 = _conv(out_channels, out_channels, 3, 1, norm)
        needs_proj = stride != 1 or in_channels != out_channels
        self.shortcut = _conv(in_channels, out_channels, 1, stride, norm) if needs_proj else None

    def forward(self, x: Tensor) -> Tensor:
        """Args: x (N, C_in, H, W). Returns (N, C_out, H / stride, W / stride)."""
        identity = x if self.shortcut is None else self.shortcut(x)
        out = self.conv2(self.conv1(x))
        out += identity  # in place: ``out`` is the norm's fresh output, never saved for backward
        return F.relu_(out)


class BottleneckBlock(nn.Module):
    """1x1 reduce, 3x3 (grouped), 1x1 expand, plus shortcut; ResNet-50/101/152 (ResNeXt).

    ``stride_in_1x1`` puts the stride on the first 1x1 conv (original MSRA / Caffe2 models, used
    by Detectron's ImageNet weights); otherwise it is on the 3x3 conv (torchvision weights).
    The two placements give different networks, so it must match the pretrained weights.
    """

    def __init__(self, in_channels: int, out_channels: int, bottleneck_channels: int,
                 stride: int, norm: str, num_groups: int = 1, stride_in_1x1: bool = False):
        super().__init__()
        s1x1, s3x3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = _conv(in_channels, bottleneck_channels, 1, s1x1, norm, relu=True)
        self.conv2 = _conv(bottleneck_channels, bottleneck_channels, 3, s3x3, norm,
                           groups=num_groups, relu=True)
        self.conv3 = _conv(bottleneck_channels, out_channels, 1, 1, norm)
        needs_proj = stride != 1 or in_channels != out_channels
        self.shortcut = _conv(in_channels, out_channels, 1, stride, norm) if needs_proj else None

    def forward(self, x: Tensor) -> Tensor:
        """Args: x (N, C_in, H, W). Returns (N, C_out, H / stride, W / stride)."""
        identity = x if self.shortcut is None else self.shortcut(x)
        out = self.conv3(self.conv2(self.conv1(x)))
        out += identity  # in place: ``out`` is the norm's fresh output, never saved for backward
        return F.relu_(out)


@BACKBONES.register("resnet")
class ResNet(nn.Module):
    """ResNet trunk returning a dict of stage outputs.

    Args:
        depth: 18 or 34 (basic blocks), 50, 101 or 152 (bottleneck blocks).
        norm: "frozen_bn" (default: detection batches are too small for batch statistics,
            papers.md section 5/7 fine-tune with frozen BN), "bn", "sync_bn" or "gn".
        freeze_at: number of leading stages frozen (parameters ``requires_grad=False`` and
            BatchNorm turned into FrozenBatchNorm2d): 0 none, 1 stem, 2 stem + res2, ... 5 all.
        stride_in_1x1: bottleneck stride placement (see :class:`BottleneckBlock`).
        out_features: stages to return, a subset of stem, res2, res3, res4, res5. Stages after
            the last requested one are not built.
        base_channels: stem width; res2 outputs ``base_channels`` (basic) or
            ``4 * base_channels`` (bottleneck) channels, doubling every stage. 64 is standard;
            smaller values give a thin network for CPU training.
        num_groups: groups of the 3x3 bottleneck conv (ResNeXt); 1 for ResNet.
        width_per_group: bottleneck width of res2 per group; None = ``base_channels``.
        in_channels: input image channels.

    Input (N, in_channels, H, W) -> ``{name: (N, C_name, H / stride, W / stride)}``.
    """

    def __init__(self, depth: int = 50, norm: str = "frozen_bn", freeze_at: int = 2,
                 stride_in_1x1: bool = False,
                 out_features: Sequence[str] = ("res2", "res3", "res4", "res5"),
                 base_channels: int = 64, num_groups: int = 1,
                 width_per_group: Optional[int] = None, in_channels: int = 3):
        super().__init__()
        if depth not in _STAGE_BLOCKS:
            raise ValueError(f"resnet: depth must be one of {sorted(_STAGE_BLOCKS)}, got {depth}")
        if norm not in _NORMS:
            raise ValueError(f"resnet: norm must be one of {_NORMS}, got {norm!r}")
        if not 0 <= freeze_at <= 5:
            raise ValueError(f"resnet: freeze_at must be in 0..5, got {freeze_at}")
        names = ["stem"] + _STAGES
        out_features = list(out_features)
        bad = [f for f in out_features if f not in names]
        if bad or not out_features:
            raise ValueError(f"resnet: out_features must be a non-empty subset of {names}, "
                             f"got {out_features}")
        basic = depth < 50
        if basic and (num_groups != 1 or width_per_group not in (None, base_channels)):
            raise ValueError(f"resnet: depth {depth} uses basic blocks, which do not support "
                             f"num_groups={num_groups} / width_per_group={width_per_group}")
        self.depth, self.out_features, self.size_divisibility = depth, out_features, 0

        self.stem = BasicStem(in_channels, base_channels, norm)
        shapes = {"stem": ShapeSpec(channels=base_channels, stride=4)}
        width = num_groups * (width_per_group or base_channels)
        cin, cout, stride = base_channels, base_channels * (1 if basic else 4), 4
        self.stage_names: List[str] = []
        last = max(names.index(f) for f in out_features)
        for idx, (name, num_blocks) in enumerate(zip(_STAGES, _STAGE_BLOCKS[depth]), start=1):
            if idx > last:
                break
            first_stride = 1 if name == "res2" else 2  # res2 follows the stem's max-pool
            blocks = []
            for b in range(num_blocks):
                s = first_stride if b == 0 else 1
                if basic:
                    blocks.append(BasicBlock(cin, cout, s, norm))
                else:
                    blocks.append(BottleneckBlock(cin, cout, width, s, norm, num_groups,
                                                  stride_in_1x1))
                cin = cout
            stride *= first_stride
            self.add_module(name, nn.Sequential(*blocks))
            self.stage_names.append(name)
            shapes[name] = ShapeSpec(channels=cout, stride=stride)
            cout, width = cout * 2, width * 2
        self._shapes = {f: shapes[f] for f in out_features}
        self.freeze(freeze_at)

    def freeze(self, freeze_at: int) -> "ResNet":
        """Freeze the first ``freeze_at`` stages (stem = 1): no gradients, frozen BN."""
        stages = [self.stem] + [getattr(self, n) for n in self.stage_names]
        for stage in stages[:freeze_at]:
            for p in stage.parameters():
                p.requires_grad_(False)
            FrozenBatchNorm2d.convert_frozen_batchnorm(stage)
        self.freeze_at = freeze_at
        return self

    def output_shape(self) -> Dict[str, ShapeSpec]:
        """Channels and stride of every returned feature."""
        return dict(self._shapes)

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        """Args: x (N, C, H, W) float image batch. Returns {name: (N, C_l, H_l, W_l)}."""
        if x.dim() != 4:
            raise ValueError(f"resnet: expected input (N, C, H, W), got {tuple(x.shape)}")
        outputs = {}
        x = self.stem(x)
        if "stem" in self._shapes:
            outputs["stem"] = x
        for name in self.stage_names:
            x = getattr(self, name)(x)
            if name in self._shapes:
                outputs[name] = x
        return outputs


_TV_BLOCK_KEY = re.compile(r"^layer([1-4])\.(\d+)\.(conv|bn)([1-3])\.(.+)$")
_TV_DOWN_KEY = re.compile(r"^layer([1-4])\.(\d+)\.downsample\.([01])\.(.+)$")


def convert_torchvision_resnet(state_dict: Dict[str, Tensor],
                               prefix: str = "") -> Dict[str, Tensor]:
    """Rename a torchvision ResNet state dict into :class:`ResNet`'s key layout.

    ``conv1``/``bn1`` -> ``stem.conv1``/``stem.conv1.norm``; ``layer{i}.{j}.conv{k}`` /
    ``bn{k}`` -> ``res{i+1}.{j}.conv{k}`` / ``.conv{k}.norm``; ``downsample.0``/``.1`` ->
    ``shortcut`` / ``shortcut.norm``. The classifier (``fc``) and BatchNorm's
    ``num_batches_tracked`` counters are dropped.

    Args:
        state_dict: torchvision ``resnet*`` (or ``IntermediateLayerGetter``) weights.
        prefix: only keys starting with ``prefix`` (e.g. ``"backbone.body."``) are read, with
            the prefix removed; other keys are ignored.

    Returns:
        New dict with keys relative to a :class:`ResNet` module (same tensors).

    Raises:
        ValueError: a key under ``prefix`` that is not part of a torchvision ResNet.
    """
    out: Dict[str, Tensor] = {}
    for full_key, value in state_dict.items():
        if not full_key.startswith(prefix):
            continue
        key = full_key[len(prefix):]
        if key.endswith("num_batches_tracked") or key.startswith("fc."):
            continue
        if key.startswith("conv1."):
            new = "stem.conv1." + key[len("conv1."):]
        elif key.startswith("bn1."):
            new = "stem.conv1.norm." + key[len("bn1."):]
        elif (m := _TV_BLOCK_KEY.match(key)) is not None:
            layer, block, kind, k, rest = m.groups()
            norm = ".norm" if kind == "bn" else ""
            new = f"res{int(layer) + 1}.{block}.conv{k}{norm}.{rest}"
        elif (m := _TV_DOWN_KEY.match(key)) is not None:
            layer, block, part, rest = m.groups()
            norm = ".norm" if part == "1" else ""
            new = f"res{int(layer) + 1}.{block}.shortcut{norm}.{rest}"
        else:
            raise ValueError(f"convert_torchvision_resnet: unexpected key {full_key!r}; expected "
                             f"torchvision ResNet keys (conv1, bn1, layer1..4, fc) under "
                             f"prefix {prefix!r}")
        out[new] = value
    return out
