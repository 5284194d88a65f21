"""Layers and ops: RoIAlign family / RoIPool / NMS dispatch (compiled segkit._C or torchvision), frozen batch norm, conv wrappers, mask crop/paste."""
from .batch_norm import FrozenBatchNorm2d, convert_frozen_batchnorm, get_norm
from .mask_ops import crop_masks, paste_masks_in_image
from .ops import (ROIAlign, ROIPool, batched_nms, fpn_levels, get_backend, multicontext_roi_align,
                  multilevel_roi_align, nms, register_backend, roi_align, roi_pool)
from .shape_spec import ShapeSpec
from .wrappers import Conv2d, cat

__all__ = [
    "ShapeSpec", "FrozenBatchNorm2d", "convert_frozen_batchnorm", "get_norm",
    "Conv2d", "cat", "roi_align", "ROIAlign", "roi_pool", "ROIPool", "multilevel_roi_align",
    "multicontext_roi_align", "fpn_levels", "nms", "batched_nms",
    "register_backend", "get_backend", "crop_masks", "paste_masks_in_image",
]
