"""Dense (one-stage) detection heads, registered in HEADS: the RetinaNet head."""
from .retinanet import RetinaNetHead, convert_torchvision_retinanet_head

__all__ = ["RetinaNetHead", "convert_torchvision_retinanet_head"]
