"""A tiny COCO-format dataset (as a dict) and an RLE helper, shared by the data tests."""
import numpy as np
import pycocotools.mask as mask_util


def rle_of(mask: np.ndarray, compressed: bool = True) -> dict:
    """COCO RLE of a (h, w) bool mask, compressed (str counts) or uncompressed (list counts)."""
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    if compressed:
        return {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}
    # uncompressed counts: run lengths of 0s and 1s in column-major order, starting with 0s
    flat = mask.astype(np.uint8).flatten(order="F")
    bounds = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], bounds, [flat.size]])).tolist()
    return {"size": list(mask.shape), "counts": ([0] + runs) if flat[0] else runs}


def tiny_coco_dict() -> dict:
    """Three images (40x60, 30x30, 50x20) with polygons, RLE, crowd and imperfect boxes.

    Category ids are 7 and 3 (non-contiguous, unsorted) to exercise the contiguous mapping.
    """
    box_mask = np.zeros((40, 60), bool)
    box_mask[4:16, 10:30] = True
    crowd = np.zeros((40, 60), bool)
    crowd[20:30, 40:55] = True
    anns = [
        {"id": 1, "image_id": 10, "category_id": 7, "bbox": [10, 4, 20, 12], "area": 240.0,
         "segmentation": [[10, 4, 30, 4, 30, 16, 10, 16]], "iscrowd": 0},
        {"id": 2, "image_id": 10, "category_id": 3, "bbox": [10, 4, 20, 12], "area": 240.0,
         "segmentation": rle_of(box_mask), "iscrowd": 0},
        {"id": 3, "image_id": 10, "category_id": 3, "bbox": [40, 20, 15, 10], "area": 150.0,
         "segmentation": rle_of(crowd, compressed=False), "iscrowd": 1},
        {"id": 4, "image_id": 10, "category_id": 7, "bbox": [5, 5, 0, 10], "area": 0.0,
         "segmentation": [[5, 5, 5, 15, 5, 10]], "iscrowd": 0},  # zero width: dropped
        {"id": 5, "image_id": 10, "category_id": 7, "bbox": [50, 30, 20, 20], "area": 100.0,
         "segmentation": [[50, 30, 60, 30, 60, 40, 50, 40]], "iscrowd": 0},  # clipped
        {"id": 6, "image_id": 12, "category_id": 3, "bbox": [1, 2, 10, -3], "area": 0.0,
         "segmentation": [[1, 2, 11, 2, 11, 3]], "iscrowd": 0},  # negative height: dropped
        {"id": 7, "image_id": 12, "category_id": 7, "bbox": [2, 20, 10, 20], "area": 200.0,
         "segmentation": [[2, 20, 12, 20, 12, 40, 2, 40]], "iscrowd": 0},
    ]
    return {
        "images": [{"id": 10, "file_name": "a.png", "height": 40, "width": 60},
                   {"id": 11, "file_name": "b.png", "height": 30, "width": 30},  # no annotations
                   {"id": 12, "file_name": "c.png", "height": 50, "width": 20}],
        "annotations": anns,
        "categories": [{"id": 7, "name": "seven"}, {"id": 3, "name": "three"}],
    }
