"""DeepMask heads, each with a patch form and a dense (fully convolutional) form.

Patch form: the heads see the trunk features of one window (``feature_size`` = window / 16
on a side). Dense form: the same weights applied as convolutions over a whole feature map,
one output per stride-16 window position; position ``(i, j)`` of the dense output equals the
patch form on the features ``[i:i + s, j:j + s]`` (papers.md 1.5 and 2.4: a Linear over an
s x s map is an s x s convolution, a Linear on a vector is a 1x1 convolution).

Weights use PyTorch's default init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)): the paper's uniform
init of non-pretrained layers (papers.md 1.4), which is also Torch7's default ``reset()``.
"""
from __future__ import annotations

from typing import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from segkit.registry import HEADS

__all__ = ["SharedHead", "MaskHead", "ScoreHead", "NipsMaskHead", "NipsScoreHead",
           "linear_as_conv"]


def linear_as_conv(x: Tensor, linear: nn.Linear, size: int = 1, dilation: int = 1) -> Tensor:
    """Apply ``linear`` to every ``size`` x ``size`` window of ``x`` (a convolution).

    The Linear must read its input flattened in (C, size, size) order, as ``Tensor.flatten``
    of an (N, C, size, size) map does.

    Args:
        x: (N, C, H, W).
        linear: ``nn.Linear`` with ``in_features == C * size * size``.
        size: window side.
        dilation: spacing of the window's taps (2 for the fine-stride trick, papers.md 1.5).

    Returns:
        (N, out_features, H - dilation * (size - 1), W - dilation * (size - 1)).
    """
    c = linear.in_features // (size * size)
    if c * size * size != linear.in_features or x.shape[1] != c:
        raise ValueError(f"linear_as_conv: a Linear with {linear.in_features} inputs cannot "
                         f"read {size}x{size} windows of a {x.shape[1]}-channel map")
    weight = linear.weight.view(linear.out_features, c, size, size)
    return F.conv2d(x, weight, linear.bias, dilation=dilation)


@HEADS.register("head_c", scope="deepmask")
class SharedHead(nn.Module):
    """Head C of DeepMask-ours: one compact vector from which mask and score are predicted
    (papers.md 2.1 item 4, SharpMask section 4.2).

    1x1 conv ``in_channels`` -> ``hidden_channels`` + ReLU, flatten, Linear -> ``out_dim``
    (no non-linearity after it: the mask path stays low-rank linear, as in papers.md 1.1).
    With ``hidden_channels=512`` on VGG-A features it is also the first half of the NIPS
    segmentation branch (:class:`NipsMaskHead`).

    Args:
        in_channels: trunk channels (1024 for ResNet-50 res4, 256 for ResNet-18).
        feature_size: side s of the window's feature map (160 / 16 = 10).
        hidden_channels: channels after the 1x1 reduction (128, the "F128" of the trunk name).
        out_dim: size of the shared vector (512).
    """

    def __init__(self, in_channels: int, feature_size: int, hidden_channels: int = 128,
                 out_dim: int = 512):
        super().__init__()
        self.feature_size, self.out_dim = feature_size, out_dim
        self.reduce = nn.Conv2d(in_channels, hidden_channels, kernel_size=1)
        self.fc = nn.Linear(hidden_channels * feature_size * feature_size, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        """Args: x (N, C, s, s) window features. Returns (N, out_dim)."""
        if x.shape[-2:] != (self.feature_size, self.feature_size):
            raise ValueError(f"head_c: expected ({self.feature_size}, {self.feature_size}) "
                             f"window features, got {tuple(x.shape[-2:])}")
        return self.fc(F.relu(self.reduce(x)).flatten(1))

    def forward_dense(self, x: Tensor) -> Tensor:
        """Args: x (N, C, H, W). Returns (N, out_dim, H - s + 1, W - s + 1)."""
        return linear_as_conv(F.relu(self.reduce(x)), self.fc, self.feature_size)


@HEADS.register("mask_head", scope="deepmask")
class MaskHead(nn.Module):
    """Coarse mask logits from the shared vector: Linear ``in_dim`` -> ``mask_size``^2
    (papers.md 2.1, "Mask head"; the second low-rank factor of papers.md 1.1).

    Args:
        in_dim: size of the shared vector (512).
        mask_size: side of the predicted mask (56).
    """

    def __init__(self, in_dim: int, mask_size: int = 56):
        super().__init__()
        self.mask_size = mask_size
        self.fc = nn.Linear(in_dim, mask_size * mask_size)

    def forward(self, x: Tensor) -> Tensor:
        """Args: x (N, in_dim). Returns (N, mask_size, mask_size) logits."""
        return self.fc(x).view(-1, self.mask_size, self.mask_size)

    def forward_dense(self, x: Tensor) -> Tensor:
        """Args: x (N, in_dim, h, w). Returns (N, mask_size^2, h, w) logits, the mask of each
        position flattened row-major."""
        return linear_as_conv(x, self.fc)


@HEADS.register("score_head", scope="deepmask")
class ScoreHead(nn.Module):
    """Objectness logit from a vector: dropout, Linear -> ``hidden_dim``, ReLU, dropout,
    Linear -> 1 (papers.md 2.1, "Score head"; the tail of the NIPS score branch, 1.1).

    Args:
        in_dim: input vector size (512).
        hidden_dim: hidden width (1024).
        dropout: drop probability of both dropouts (0.5).
        input_dropout: whether the first dropout is applied (DeepMask-ours: yes; in the NIPS
            branch the input comes out of a dropout already).
    """

    def __init__(self, in_dim: int, hidden_dim: int = 1024, dropout: float = 0.5,
                 input_dropout: bool = True):
        super().__init__()
        self.drop_in = nn.Dropout(dropout) if input_dropout else nn.Identity()
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden_dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        """Args: x (N, in_dim). Returns (N,) logits."""
        x = self.drop(F.relu(self.fc1(self.drop_in(x))))
        return self.fc2(x).squeeze(1)

    def forward_dense(self, x: Tensor) -> Tensor:
        """Args: x (N, in_dim, h, w). Returns (N, h, w) logits.

        Element-wise dropout on the map is per-position dropout of each window's vector, so
        the dense form trains like the patch form too.
        """
        x = F.relu(linear_as_conv(self.drop_in(x), self.fc1))
        return linear_as_conv(self.drop(x), self.fc2).squeeze(1)


@HEADS.register("nips_mask_head", scope="deepmask")
class NipsMaskHead(nn.Module):
    """Segmentation branch of the NIPS DeepMask (papers.md 1.1): 1x1 conv 512 + ReLU, then
    the low-rank pixel classifier Linear(512 * 14 * 14 -> 512), Linear(512 -> 56 * 56) with no
    non-linearity in between. It is head C (width 512) followed by the mask head.

    Args:
        in_channels: trunk channels (512 for VGG-A).
        feature_size: side of the window's feature map (224 / 16 = 14).
        hidden_channels: channels of the 1x1 conv (512).
        rank: width of the low-rank factorisation (512).
        mask_size: side of the predicted mask (56).
    """

    def __init__(self, in_channels: int, feature_size: int, hidden_channels: int = 512,
                 rank: int = 512, mask_size: int = 56):
        super().__init__()
        self.encode = SharedHead(in_channels, feature_size, hidden_channels, rank)
        self.decode = MaskHead(rank, mask_size)
        self.mask_size = mask_size

    def forward(self, x: Tensor) -> Tensor:
        """Args: x (N, C, s, s) window features. Returns (N, mask_size, mask_size) logits."""
        return self.decode(self.encode(x))

    def forward_dense(self, x: Tensor) -> Tensor:
        """Args: x (N, C, H, W). Returns (N, mask_size^2, H - s + 1, W - s + 1) logits."""
        return self.decode.forward_dense(self.encode.forward_dense(x))


@HEADS.register("nips_score_head", scope="deepmask")
class NipsScoreHead(nn.Module):
    """Score branch of the NIPS DeepMask (papers.md 1.1): 2x2 max-pool, FC 512 + ReLU +
    dropout, FC 1024 + ReLU + dropout, FC 1.

    Args:
        in_channels: trunk channels (512 for VGG-A).
        feature_size: side of the window's feature map (14; must be even).
        hidden_dims: widths of the two hidden FCs (512, 1024).
        dropout: drop probability (0.5).
    """

    def __init__(self, in_channels: int, feature_size: int,
                 hidden_dims: Sequence[int] = (512, 1024), dropout: float = 0.5):
        super().__init__()
        if feature_size % 2:
            raise ValueError(f"nips_score_head: feature_size must be even for the 2x2 pool, "
                             f"got {feature_size}")
        first, second = hidden_dims
        self.pooled_size = feature_size // 2
        self.fc = nn.Linear(in_channels * self.pooled_size ** 2, first)
        self.drop = nn.Dropout(dropout)
        self.mlp = ScoreHead(first, second, dropout, input_dropout=False)

    def forward(self, x: Tensor) -> Tensor:
        """Args: x (N, C, s, s) window features. Returns (N,) logits."""
        x = F.max_pool2d(x, kernel_size=2, stride=2)
        if x.shape[-1] != self.pooled_size or x.shape[-2] != self.pooled_size:
            raise ValueError(f"nips_score_head: expected {2 * self.pooled_size}x"
                             f"{2 * self.pooled_size} window features, got "
                             f"{tuple(x.shape[-2:])} after pooling")
        return self.mlp(self.drop(F.relu(self.fc(x.flatten(1)))))

    def forward_dense(self, x: Tensor) -> Tensor:
        """Dense scores at the trunk's stride 16, not the pooled stride 32.

        The "fine-stride max-pool" trick (papers.md 1.5): pooling with stride 1 keeps every
        pooling phase, and the FC then reads every second pooled value (a 2-dilated conv), so
        position (i, j) sees exactly the pooled map of the window starting at (i, j).

        Args: x (N, C, H, W). Returns (N, H - s + 1, W - s + 1) logits.
        """
        pooled = F.max_pool2d(x, kernel_size=2, stride=1)
        x = F.relu(linear_as_conv(pooled, self.fc, self.pooled_size, dilation=2))
        return self.mlp.forward_dense(self.drop(x))
