"""SharpMask top-down refinement (papers.md 3.1-3.2).

The shared vector is expanded into a multi-channel mask encoding M1 (k x s x s, s = 10); each
refinement module R_i merges M_i with the trunk features F_i of the same resolution and
doubles the resolution, until a final 3x3 conv gives one 160 x 160 logit map for the window.
"""
from __future__ import annotations

from typing import List, Mapping, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from segkit.layers import ShapeSpec
from segkit.registry import HEADS

from ..layers import convert_padding

__all__ = ["RefinementModule", "SharpMaskRefinement"]

UPSAMPLE_MODES = ("bilinear", "nearest")


def _conv3x3(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, padding=1)


class RefinementModule(nn.Module):
    """One R_i: ``M_{i+1} = up2(ReLU(H(F_i) + V(M_i)))`` (papers.md 3.1, Fig. 3b form).

    Adding a 3x3 conv of each path equals one 3x3 conv over their concatenation (the paper's
    refactoring, as released). The horizontal (skip) path uses two convs before the merge
    conv because one conv from k_f >> k_s channels trained poorly (papers.md 3.1 item 1).

    Args:
        skip_channels: channels k_f of the trunk features F_i.
        skip_hidden: width of the first horizontal conv (64, or 32 on conv1).
        channels: k_m^i = k_s^i; the module outputs ``channels // 2``.
        upsample: "bilinear" or "nearest".
    """

    def __init__(self, skip_channels: int, skip_hidden: int, channels: int, upsample: str):
        super().__init__()
        out = channels // 2
        self.horizontal = nn.Sequential(
            _conv3x3(skip_channels, skip_hidden), nn.ReLU(inplace=True),
            _conv3x3(skip_hidden, channels), nn.ReLU(inplace=True),
            _conv3x3(channels, out))
        self.vertical = nn.Sequential(
            _conv3x3(channels, channels), nn.ReLU(inplace=True),
            _conv3x3(channels, out))
        self.upsample = upsample

    def merge(self, m: Tensor, skip: Tensor) -> Tensor:
        """Args: m (N, k, h, w) mask encoding; skip (N, k/2, h, w) = ``horizontal(F_i)``.
        Returns (N, k/2, 2h, 2w)."""
        x = F.relu(skip + self.vertical(m))
        align = False if self.upsample == "bilinear" else None
        return F.interpolate(x, scale_factor=2, mode=self.upsample, align_corners=align)

    def forward(self, m: Tensor, features: Tensor) -> Tensor:
        """Args: m (N, k, h, w); features (N, k_f, h, w). Returns (N, k/2, 2h, 2w)."""
        return self.merge(m, self.horizontal(features))


@HEADS.register("sharpmask_refinement", scope="deepmask")
class SharpMaskRefinement(nn.Module):
    """R0 (Linear -> M1) followed by one refinement module per skip feature and a final conv.

    With k = 32 on ResNet-50 at a 192 input (papers.md 3.2): M1 32x10x10; R1 on res4
    1024x10x10 -> 16x20x20; R2 on res3 512x20x20 -> 8x40x40; R3 on res2 256x40x40 -> 4x80x80;
    R4 on conv1 64x80x80 -> 2x160x160; conv 2 -> 1: 1x160x160 logits. Channels halve at every
    module (k_m^i = k_s^i = k / 2^(i-1), papers.md 3.1: as accurate as constant k, faster).

    Args:
        input_shape: the trunk's ``output_shape()``; gives the skip channels and strides.
        in_dim: size of the shared vector (512).
        feature_size: side s of M1 = side of the coarsest window feature map (10).
        in_features: skip features, coarsest first; each has half the stride of the one
            before (res4, res3, res2, conv1).
        k: channels of M1 (32); must be divisible by 2^len(in_features).
        skip_hidden: width of the first horizontal conv of each module (64, 64, 64, 32 as
            released, papers.md 3.2).
        upsample: "bilinear" (paper, default) or "nearest" (released code), papers.md 10.4.
        padding: padding of the 3x3 convs: "symmetric" (released code), "reflect", "zeros".
    """

    def __init__(self, input_shape: Mapping[str, ShapeSpec], in_dim: int, feature_size: int,
                 in_features: Sequence[str] = ("res4", "res3", "res2", "conv1"), k: int = 32,
                 skip_hidden: Sequence[int] = (64, 64, 64, 32), upsample: str = "bilinear",
                 padding: str = "symmetric"):
        super().__init__()
        in_features, skip_hidden = list(in_features), list(skip_hidden)
        missing = [f for f in in_features if f not in input_shape]
        if missing or not in_features:
            raise ValueError(f"sharpmask_refinement: in_features {in_features} must be "
                             f"non-empty and among the trunk's features {sorted(input_shape)}")
        strides = [input_shape[f].stride for f in in_features]
        if any(b * 2 != a for a, b in zip(strides, strides[1:])):
            raise ValueError(f"sharpmask_refinement: each skip feature must have half the "
                             f"stride of the previous one (x2 up-sampling per module); "
                             f"{in_features} have strides {strides}")
        if len(skip_hidden) != len(in_features):
            raise ValueError(f"sharpmask_refinement: skip_hidden {skip_hidden} needs one width "
                             f"per in_feature {in_features}")
        if k % 2 ** len(in_features):
            raise ValueError(f"sharpmask_refinement: k={k} must be divisible by "
                             f"2^{len(in_features)} (channels halve at every module)")
        if upsample not in UPSAMPLE_MODES:
            raise ValueError(f"sharpmask_refinement: upsample must be one of {UPSAMPLE_MODES}, "
                             f"got {upsample!r}")
        self.in_features, self.k, self.feature_size = in_features, k, feature_size
        self.output_size = feature_size * 2 ** len(in_features)
        self.expand = nn.Linear(in_dim, k * feature_size * feature_size)  # R0 -> M1
        self.refinements = nn.ModuleList(
            RefinementModule(input_shape[f].channels, hidden, k // 2 ** i, upsample)
            for i, (f, hidden) in enumerate(zip(in_features, skip_hidden)))
        self.predictor = _conv3x3(k // 2 ** len(in_features), 1)
        convert_padding(self, padding)

    def horizontal(self, features: Mapping[str, Tensor]) -> List[Tensor]:
        """Skip maps S_i of the horizontal paths, coarsest first.

        Patch form on window features; dense form on whole-image features (the skip maps are
        shared by all windows, papers.md 3.4). The two agree except within 3 px of the
        window's border, where the patch form sees padding and the dense form sees context.

        Args:
            features: {name: (N, k_f, h_i, w_i)} for every ``in_features`` name.

        Returns:
            [(N, k / 2^(i+1), h_i, w_i)] for i = 0 .. len(in_features) - 1.
        """
        return [r.horizontal(features[f]) for r, f in zip(self.refinements, self.in_features)]

    def decode(self, vectors: Tensor, skips: Sequence[Tensor]) -> Tensor:
        """Top-down pass from the shared vectors and the windows' skip maps.

        Args:
            vectors: (N, in_dim) shared vectors.
            skips: window crops of :meth:`horizontal`'s maps, i-th of side s * 2^i.

        Returns:
            (N, 1, output_size, output_size) mask logits.
        """
        s = self.feature_size
        m = self.expand(vectors).view(-1, self.k, s, s)
        for i, (refine, skip) in enumerate(zip(self.refinements, skips)):
            if skip.shape[-2:] != m.shape[-2:]:
                raise ValueError(f"sharpmask_refinement: skip feature "
                                 f"'{self.in_features[i]}' is {tuple(skip.shape[-2:])} but "
                                 f"module R{i + 1} works at {tuple(m.shape[-2:])}")
            m = refine.merge(m, skip)
        return self.predictor(m)

    def forward(self, vectors: Tensor, features: Mapping[str, Tensor]) -> Tensor:
        """Args: vectors (N, in_dim); features {name: (N, k_f, s * 2^i, s * 2^i)} window
        features (context cropped). Returns (N, 1, output_size, output_size) logits."""
        return self.decode(vectors, self.horizontal(features))
