"""Backbones: ResNet bottom-up trunks and the FPN built on them (registered in BACKBONES)."""
from .fpn import FPN, LastLevelMaxPool, LastLevelP6P7, convert_torchvision_fpn
from .resnet import (BasicBlock, BasicStem, BottleneckBlock, ResNet,
                     convert_torchvision_resnet)

__all__ = [
    "ResNet", "BasicStem", "BasicBlock", "BottleneckBlock", "convert_torchvision_resnet",
    "FPN", "LastLevelMaxPool", "LastLevelP6P7", "convert_torchvision_fpn",
]
