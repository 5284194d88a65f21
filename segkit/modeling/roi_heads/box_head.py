"""Box head: the per-RoI feature extractor in front of the Fast R-CNN predictor.

FPN (papers.md section 5) replaces the conv5 head of the C4 design with two hidden fully
connected layers of 1024 units + ReLU on the 7x7 pooled RoI features, randomly initialised.
"""
from __future__ import annotations

from typing import List

import torch
from torch import Tensor, nn

from segkit.layers import ShapeSpec
from segkit.registry import HEADS

__all__ = ["FCBoxHead"]


@HEADS.register("fc_box_head")
class FCBoxHead(nn.Module):
    """``num_fc`` fully connected layers with ReLU on flattened pooled RoI features.

    Args:
        input_shape: shape of one pooled RoI feature, ``ShapeSpec(channels, stride, height,
            width)`` (given at build time by the ROI heads; the stride is not used).
        num_fc: number of hidden FC layers (2 in FPN, papers.md section 5).
        fc_dim: width of each FC layer (1024 in FPN).

    Attributes:
        output_size: length of the feature vector produced per RoI.

    Parameters are named ``fc1``, ``fc2``, ... (the checkpoint converters rely on it).
    """

    def __init__(self, input_shape: ShapeSpec, num_fc: int = 2, fc_dim: int = 1024):
        super().__init__()
        if input_shape.height is None or input_shape.width is None:
            raise ValueError(f"fc_box_head: input_shape needs height and width (the pooler "
                             f"resolution), got {input_shape}")
        if num_fc < 1:
            raise ValueError(f"fc_box_head: num_fc must be >= 1, got {num_fc}")
        in_dim = int(input_shape.channels * input_shape.height * input_shape.width)
        self.num_fc = int(num_fc)
        self._fc_names: List[str] = []
        for i in range(self.num_fc):
            fc = nn.Linear(in_dim, fc_dim)
            # "Caffe2 Xavier" fill (uniform, gain 1, zero bias) as in Detectron's FPN heads;
            # PyTorch's default init would shrink the activations by ~sqrt(3) per layer.
            nn.init.kaiming_uniform_(fc.weight, a=1)
            nn.init.zeros_(fc.bias)
            name = f"fc{i + 1}"
            self.add_module(name, fc)
            self._fc_names.append(name)
            in_dim = fc_dim
        self.output_size = int(fc_dim)

    def forward(self, x: Tensor) -> Tensor:
        """Args:
            x: (R, C, h, w) pooled RoI features.

        Returns:
            (R, fc_dim) features.
        """
        x = torch.flatten(x, start_dim=1)
        for name in self._fc_names:
            x = torch.relu_(getattr(self, name)(x))  # in place: linear backward reads its input
        return x
