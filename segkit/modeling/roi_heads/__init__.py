"""ROI heads: FPN RoI pooling, box head + Fast R-CNN predictor, Mask R-CNN mask head.

Importing this package registers ``fc_box_head`` and ``mask_rcnn_conv_upsample`` (HEADS) and
``standard`` (ROI_HEADS).
"""
from .box_head import FCBoxHead
from .fast_rcnn import FastRCNNOutputLayers, fast_rcnn_inference, fast_rcnn_losses
from .mask_head import MaskRCNNConvUpsampleHead, mask_rcnn_inference, mask_rcnn_loss
from .poolers import ROIPooler, assign_boxes_to_levels
from .roi_heads import StandardROIHeads

__all__ = [
    "FCBoxHead", "FastRCNNOutputLayers", "fast_rcnn_inference", "fast_rcnn_losses",
    "MaskRCNNConvUpsampleHead", "mask_rcnn_inference", "mask_rcnn_loss",
    "ROIPooler", "assign_boxes_to_levels", "StandardROIHeads",
]
