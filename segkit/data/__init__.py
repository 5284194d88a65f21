"""Datasets (catalog, COCO-format reader, embedded shapes), transforms, mapper and loaders.

Importing this package registers the ``coco_json``, ``coco_2017`` and ``embedded`` DATASETS
entries.
"""
from segkit.data import coco, embedded  # noqa: F401  (registers the DATASETS entries)
from segkit.data.build import (MapDataset, SerializedList, build_test_loader,
                               build_train_loader, filter_empty_records, trivial_batch_collator,
                               worker_init_fn)
from segkit.data.catalog import DatasetCatalog, MetadataCatalog, get_dataset
from segkit.data.coco import datasets_root, load_coco_json
from segkit.data.embedded import embedded_root, ensure_embedded
from segkit.data.mapper import DatasetMapper, ImageReadError, read_image
from segkit.data.samplers import (GroupedBatchSampler, InferenceSampler, TrainingSampler,
                                  aspect_ratio_group_ids)
from segkit.data.transforms import (HFlipTransform, NoOpTransform, RandomFlip, ResizeShortestEdge,
                                    ResizeTransform, TransformList, apply_augmentations)

__all__ = [
    "DatasetCatalog", "MetadataCatalog", "get_dataset", "load_coco_json", "datasets_root",
    "ensure_embedded", "embedded_root", "DatasetMapper", "ImageReadError", "read_image",
    "TrainingSampler", "InferenceSampler", "GroupedBatchSampler", "aspect_ratio_group_ids",
    "build_train_loader", "build_test_loader", "MapDataset", "SerializedList",
    "filter_empty_records",
    "trivial_batch_collator", "worker_init_fn", "ResizeShortestEdge", "RandomFlip",
    "ResizeTransform", "HFlipTransform", "NoOpTransform", "TransformList", "apply_augmentations",
]
