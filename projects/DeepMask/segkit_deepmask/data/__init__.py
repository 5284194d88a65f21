"""DeepMask/SharpMask training data: patch samples from any COCO-format dataset.

``PatchSampler`` draws mask samples (a jittered, centred object and its {-1, +1} mask) and
score samples (+1 / -1 objectness patches); ``build_patch_loader`` batches them forever, one
kind per batch, seeded, resumable and sharded; ``build_train_patch_loader`` builds it from a
composed config for the core trainer (``dataloader.name=deepmask.patches``). See papers.md
1.2, 2.2 and 3.3.
"""
from .loader import (KIND_STREAM, PatchBatchSampler, PatchDataset, build_patch_loader,
                     build_train_patch_loader)
from .objects import ObjectTable
from .patches import GREY, PatchGeometry, crop_patch, mask_label, square_box
from .sampler import PRESETS, PatchSampler
from .synthetic import square, write_coco_dataset

__all__ = [
    "PatchSampler", "PRESETS", "PatchGeometry", "ObjectTable", "PatchBatchSampler",
    "PatchDataset", "build_patch_loader", "build_train_patch_loader", "KIND_STREAM",
    "crop_patch", "mask_label", "square_box", "write_coco_dataset", "square",
]
