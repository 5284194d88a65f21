"""Layers and ops: RoIAlign / NMS dispatch, frozen batch norm, conv wrappers, mask crop/paste."""
from .batch_norm import FrozenBatchNorm2d, convert_frozen_batchnorm, get_norm
from .mask_ops import crop_masks, paste_masks_in_image
from .ops import ROIAlign, batched_nms, get_backend, nms, register_backend, roi_align
from .shape_spec import ShapeSpec
from .wrappers import Conv2d, cat

__all__ = [
    "ShapeSpec", "FrozenBatchNorm2d", "convert_frozen_batchnorm", "get_norm",
    "Conv2d", "cat", "roi_align", "ROIAlign", "nms", "batched_nms",
    "register_backend", "get_backend", "crop_masks", "paste_masks_in_image",
]
