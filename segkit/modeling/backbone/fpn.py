"""Feature Pyramid Network on top of a bottom-up backbone (papers.md section 5).

Top-down pathway: a 1x1 lateral conv on each C_k, nearest-neighbour up-sampling of the coarser
merged map to the lateral's exact size, element-wise sum, then a 3x3 output conv "to reduce
the aliasing effect of up-sampling"; every P_k has d channels and no non-linearity. Extra
coarser levels come from a top block: P6 = max-pool(k=1, s=2) of P5 for the RPN (section 5),
or P6/P7 stride-2 convs for RetinaNet (section 6).
"""
from __future__ import annotations

import math
import re
from typing import Dict, List, Optional, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from segkit.layers import Conv2d, ShapeSpec, get_norm
from segkit.registry import BACKBONES

from .resnet import convert_torchvision_resnet

__all__ = ["FPN", "LastLevelMaxPool", "LastLevelP6P7", "convert_torchvision_fpn"]


def _init_fpn_conv(conv: nn.Conv2d) -> None:
    # Detectron's Xavier fill (papers.md section 5: "Xavier init and zero bias") is, in PyTorch,
    # kaiming_uniform with a=1: U(-sqrt(3/fan_in), sqrt(3/fan_in)).
    nn.init.kaiming_uniform_(conv.weight, a=1)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


class LastLevelMaxPool(nn.Module):
    """P6 = max-pool(kernel 1, stride 2) of P5: a plain stride-2 subsample used by the RPN."""

    num_levels = 1
    in_feature = "p5"

    def forward(self, x: Tensor) -> List[Tensor]:
        """Args: x (N, C, H, W) coarsest FPN output. Returns [(N, C, ceil(H/2), ceil(W/2))]."""
        return [F.max_pool2d(x, kernel_size=1, stride=2, padding=0)]


class LastLevelP6P7(nn.Module):
    """RetinaNet's P6 = 3x3/2 conv on C5 (or P5), P7 = 3x3/2 conv on ReLU(P6) (section 6)."""

    num_levels = 2

    def __init__(self, in_channels: int, out_channels: int, in_feature: str = "res5"):
        super().__init__()
        self.in_feature = in_feature
        self.p6 = nn.Conv2d(in_channels, out_channels, 3, 2, 1)
        self.p7 = nn.Conv2d(out_channels, out_channels, 3, 2, 1)
        for conv in (self.p6, self.p7):
            _init_fpn_conv(conv)

    def forward(self, x: Tensor) -> List[Tensor]:
        """Args: x (N, C_in, H, W). Returns [P6 (N, C, H/2, W/2), P7 (N, C, H/4, W/4)]."""
        p6 = self.p6(x)
        return [p6, self.p7(F.relu(p6))]


@BACKBONES.register("fpn", children={"bottom_up": BACKBONES})
class FPN(nn.Module):
    """FPN backbone: ``bottom_up`` features C_k -> pyramid ``p{k}`` (k = log2 stride).

    Args:
        bottom_up: built backbone with ``output_shape()`` (e.g. :class:`ResNet`).
        in_features: bottom-up features used, finest first (e.g. res2..res5 -> p2..p5).
        out_channels: d, channels of every pyramid level (256 in the paper).
        norm: norm after lateral/output convs ("" = none, the paper's choice; "gn", ...).
        top_block: "maxpool" (adds p6 for the RPN), "p6p7" (adds p6, p7 for RetinaNet) or
            None.
        top_block_in_feature: input of the p6p7 block: the last bottom-up feature (C5, the
            RetinaNet paper's choice, default, and torchvision's RetinaNet v2) or the coarsest
            pyramid level ("p5", torchvision's ``retinanet_resnet50_fpn`` v1, whose
            ``LastLevelP6P7(256, 256)`` reads P5). "maxpool" always reads the coarsest level.
        fuse_type: "sum" (paper) or "avg" of the lateral and up-sampled top-down maps.
        size_divisibility: input padding multiple so that every level aligns with the next
            (32 = the stride of C5).

    Input (N, 3, H, W) with H, W divisible by ``size_divisibility`` ->
    ``{"p2": (N, d, H/4, W/4), ..., "p6": (N, d, H/64, W/64)}``.
    """

    def __init__(self, bottom_up: nn.Module,
                 in_features: Sequence[str] = ("res2", "res3", "res4", "res5"),
                 out_channels: int = 256, norm: str = "", top_block: Optional[str] = "maxpool",
                 top_block_in_feature: Optional[str] = None, fuse_type: str = "sum",
                 size_divisibility: int = 32):
        super().__init__()
        if fuse_type not in ("sum", "avg"):
            raise ValueError(f"fpn: fuse_type must be 'sum' or 'avg', got {fuse_type!r}")
        shapes = bottom_up.output_shape()
        in_features = list(in_features)
        missing = [f for f in in_features if f not in shapes]
        if missing or not in_features:
            raise ValueError(f"fpn: in_features {in_features} must be non-empty and produced by "
                             f"the bottom-up backbone, which outputs {sorted(shapes)}")
        strides = [shapes[f].stride for f in in_features]
        if any(b != 2 * a for a, b in zip(strides[:-1], strides[1:])):
            raise ValueError(f"fpn: in_features must have strides doubling level to level, got "
                             f"{dict(zip(in_features, strides))}")
        self.bottom_up, self.in_features, self.fuse_type = bottom_up, in_features, fuse_type
        self.size_divisibility = size_divisibility
        self.stages = [int(math.log2(s)) for s in strides]

        use_bias = not norm
        for f, stage in zip(in_features, self.stages):
            lateral = Conv2d(shapes[f].channels, out_channels, 1, bias=use_bias,
                             norm=get_norm(norm, out_channels))
            output = Conv2d(out_channels, out_channels, 3, padding=1, bias=use_bias,
                            norm=get_norm(norm, out_channels))
            _init_fpn_conv(lateral)
            _init_fpn_conv(output)
            self.add_module(f"fpn_lateral{stage}", lateral)
            self.add_module(f"fpn_output{stage}", output)

        last = self.stages[-1]
        self._shapes = {f"p{s}": ShapeSpec(out_channels, 2 ** s) for s in self.stages}
        if top_block == "maxpool":
            self.top_block: Optional[nn.Module] = LastLevelMaxPool()
        elif top_block == "p6p7":
            src = top_block_in_feature or in_features[-1]
            if src not in (in_features[-1], f"p{last}"):
                raise ValueError(f"fpn: top_block_in_feature must be {in_features[-1]!r} or "
                                 f"'p{last}', got {src!r}")
            cin = shapes[src].channels if src in shapes else out_channels
            self.top_block = LastLevelP6P7(cin, out_channels, in_feature=src)
        elif top_block is None:
            self.top_block = None
        else:
            raise ValueError(f"fpn: top_block must be 'maxpool', 'p6p7' or null, got {top_block!r}")
        if top_block == "maxpool" and top_block_in_feature not in (None, f"p{last}"):
            raise ValueError(f"fpn: the maxpool top block reads p{last}; got "
                             f"top_block_in_feature={top_block_in_feature!r}")
        if self.top_block is not None:
            for k in range(1, self.top_block.num_levels + 1):
                self._shapes[f"p{last + k}"] = ShapeSpec(out_channels, 2 ** (last + k))
        self.out_features = list(self._shapes)

    def output_shape(self) -> Dict[str, ShapeSpec]:
        """Channels and stride of every pyramid level."""
        return dict(self._shapes)

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        """Args: x (N, 3, H, W) padded image batch. Returns {"p{k}": (N, d, H_k, W_k)}."""
        bottom_up = self.bottom_up(x)
        results: List[Tensor] = []
        prev: Optional[Tensor] = None
        for f, stage in zip(reversed(self.in_features), reversed(self.stages)):
            lateral = getattr(self, f"fpn_lateral{stage}")(bottom_up[f])
            if prev is not None:
                # Up-sample to the lateral's exact size: odd sizes make "x2" off by one.
                top_down = F.interpolate(prev, size=lateral.shape[-2:], mode="nearest")
                # In place: the lateral conv's fresh output is not saved by autograd.
                lateral += top_down
                if self.fuse_type == "avg":
                    lateral /= 2
            prev = lateral
            results.insert(0, getattr(self, f"fpn_output{stage}")(prev))
        outputs = {f"p{s}": r for s, r in zip(self.stages, results)}
        if self.top_block is not None:
            src = self.top_block.in_feature
            top_in = bottom_up[src] if src in bottom_up else outputs[src]
            last = self.stages[-1]
            for k, level in enumerate(self.top_block(top_in), start=1):
                outputs[f"p{last + k}"] = level
        return outputs


_TV_FPN_KEY = re.compile(r"^(inner_blocks|layer_blocks)\.(\d+)\.(?:0\.)?(weight|bias)$")


def convert_torchvision_fpn(state_dict: Dict[str, Tensor], levels: Sequence[int] = (2, 3, 4, 5),
                            prefix: str = "") -> Dict[str, Tensor]:
    """Rename torchvision ``BackboneWithFPN`` (or bare ``FeaturePyramidNetwork``) weights.

    ``body.*`` -> ``bottom_up.*`` (via :func:`convert_torchvision_resnet`);
    ``[fpn.]inner_blocks.{i}[.0]`` -> ``fpn_lateral{levels[i]}``;
    ``[fpn.]layer_blocks.{i}[.0]`` -> ``fpn_output{levels[i]}``;
    ``[fpn.]extra_blocks.p6/p7`` -> ``top_block.p6/p7``.

    Args:
        state_dict: torchvision weights, e.g. a detection model's state dict.
        levels: pyramid level (log2 stride) of each torchvision inner block, finest first:
            (2, 3, 4, 5) for Faster/Mask R-CNN, (3, 4, 5) for RetinaNet.
        prefix: only keys starting with it (e.g. ``"backbone."``) are read, prefix removed.

    Returns:
        New dict with keys relative to an :class:`FPN` module.
    """
    out = {}
    body = prefix + "body."
    if any(k.startswith(body) for k in state_dict):
        out.update({"bottom_up." + k: v for k, v in
                    convert_torchvision_resnet(state_dict, prefix=body).items()})
    for full_key, value in state_dict.items():
        if not full_key.startswith(prefix) or full_key.startswith(body):
            continue
        key = full_key[len(prefix):]
        key = key[len("fpn."):] if key.startswith("fpn.") else key
        if key.startswith("extra_blocks."):
            out["top_block." + key[len("extra_blocks."):]] = value
            continue
        m = _TV_FPN_KEY.match(key)
        if m is None:
            raise ValueError(f"convert_torchvision_fpn: unexpected key {full_key!r} under "
                             f"prefix {prefix!r}")
        kind, idx, param = m.groups()
        if int(idx) >= len(levels):
            raise ValueError(f"convert_torchvision_fpn: key {full_key!r} has block index {idx} "
                             f"but levels={list(levels)} has {len(levels)} entries")
        name = "fpn_lateral" if kind == "inner_blocks" else "fpn_output"
        out[f"{name}{levels[int(idx)]}.{param}"] = value
    return out
