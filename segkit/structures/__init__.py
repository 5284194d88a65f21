"""Data containers shared by every component: boxes, instances, masks, padded image batches."""
from .boxes import (Boxes, pairwise_intersection, pairwise_ioa, pairwise_iou, xywh_to_xyxy,
                    xyxy_to_xywh)
from .image_list import ImageList
from .instances import Instances
from .masks import BitMasks, PolygonMasks
from .rasterize import polygons_to_bitmask, rle_to_bitmask, rles_to_bitmasks

__all__ = [
    "Boxes", "pairwise_intersection", "pairwise_iou", "pairwise_ioa", "xywh_to_xyxy",
    "xyxy_to_xywh", "Instances", "ImageList", "BitMasks", "PolygonMasks",
    "polygons_to_bitmask", "rle_to_bitmask", "rles_to_bitmasks",
]
