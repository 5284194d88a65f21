"""Data loaders: records + mapper -> batches (``list[dict]``) for training and inference.

Training batches depend only on the seed (and ``start_iter``), not on ``num_workers``: the
batch sampler fixes the composition of every batch and gives every sample a key from which the
mapper's augmentation generator is seeded. Worker processes are still seeded (numpy, random,
torch from ``seed + worker id``) for any other randomness a custom mapper might use.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import pickle
import random
from typing import Any, Callable, Dict, List, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from segkit.data.samplers import (GroupedBatchSampler, InferenceSampler, TrainingSampler,
                                  aspect_ratio_group_ids)

__all__ = ["build_train_loader", "build_test_loader", "MapDataset", "SerializedList",
           "filter_empty_records",
           "trivial_batch_collator", "worker_init_fn"]

logger = logging.getLogger(__name__)


class SerializedList:
    """Records pickled into one flat uint8 tensor.

    Loader workers read records from it without copying the record list: forked workers touching
    millions of small Python objects would copy their pages (reference counts are writes), and
    spawned/forkserver workers (Python 3.14's default) receive tensors through shared memory
    rather than as pickled bytes.
    """

    def __init__(self, items: Sequence[Any]):
        blobs = [np.frombuffer(pickle.dumps(x, protocol=pickle.HIGHEST_PROTOCOL), dtype=np.uint8)
                 for x in items]
        self._ends = torch.from_numpy(np.cumsum([len(b) for b in blobs], dtype=np.int64))
        self._buf = torch.from_numpy(np.concatenate(blobs) if blobs else np.zeros(0, np.uint8))

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, i: int) -> Any:
        start = 0 if i == 0 else int(self._ends[i - 1])
        return pickle.loads(memoryview(self._buf[start:int(self._ends[i])].numpy()))


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def _seeded_global_rngs(seed: int):
    """Seed the global RNGs for a mapper without an ``rng`` argument, then restore them, so
    the main process's own random streams (e.g. with ``num_workers=0``) are left untouched."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        _seed_everything(seed)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


class MapDataset(Dataset):
    """Map-style dataset applying ``mapper`` to records on access.

    Indexed with a dataset index (inference) or with the ``(index, key)`` pairs of
    :class:`GroupedBatchSampler`, where ``key`` seeds the sample's augmentation.
    """

    def __init__(self, records: Sequence[dict], mapper: Callable[..., Dict[str, Any]]):
        self._records = SerializedList(records)
        self.mapper = mapper
        try:
            self._takes_rng = "rng" in inspect.signature(mapper).parameters
        except (TypeError, ValueError):  # builtins without a signature
            self._takes_rng = False

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, item):
        idx, key = item if isinstance(item, tuple) else (item, (int(item),))
        record = self._records[idx]
        if self._takes_rng:
            return self.mapper(record, rng=np.random.default_rng(list(key)))
        with _seeded_global_rngs(int(np.random.SeedSequence(list(key)).generate_state(1)[0])):
            return self.mapper(record)


def trivial_batch_collator(batch: List[dict]) -> List[dict]:
    """Batches stay lists of dicts: images differ in size until the model pads them."""
    return batch


def worker_init_fn(worker_id: int, seed: int = 0, rank: int = 0) -> None:
    """Seed python, numpy and torch in a loader worker from the base seed and its id."""
    _seed_everything(seed + 1000 * rank + worker_id)


def _own_generator(seed: int) -> torch.Generator:
    # DataLoader draws a base seed for its workers on every iter(); from its own generator it
    # leaves the trainer's global torch RNG alone (a resumed run replays the same stream).
    return torch.Generator().manual_seed(seed)


def _has_instance(record: dict) -> bool:
    return any(not a.get("iscrowd", 0) for a in record.get("annotations", []))


def filter_empty_records(records: Sequence[dict]) -> List[dict]:
    """Records with at least one non-crowd annotation (training needs a positive)."""
    kept = [r for r in records if _has_instance(r)]
    if len(kept) < len(records):
        logger.info("removed %d of %d images without (non-crowd) annotations from training, "
                    "e.g. %s", len(records) - len(kept), len(records), _some_files(records))
    return kept


def _some_files(records: Sequence[dict], k: int = 3) -> str:
    """A few file names of the records without (non-crowd) annotations, for messages."""
    names = [str(r.get("file_name", r.get("image_id"))) for r in records if not _has_instance(r)]
    return ", ".join(names[:k]) + (" ..." if len(names) > k else "")


def build_train_loader(records: Sequence[dict], mapper: Callable[..., Dict[str, Any]],
                       batch_size: int, num_workers: int = 0, aspect_ratio_grouping: bool = True,
                       seed: int = 0, filter_empty: bool = True, rank: int = 0,
                       world_size: int = 1, start_iter: int = 0) -> DataLoader:
    """Infinite training loader.

    Args:
        records: dataset records (see ``segkit.data.coco``).
        mapper: ``mapper(record[, rng]) -> dict`` (e.g. a training ``DatasetMapper``).
        batch_size: images per batch of this process (the total batch / world_size).
        num_workers: loader processes (0 = load in the main process).
        aspect_ratio_grouping: batch landscape and portrait images separately.
        seed: seed of the sample order and the augmentations.
        filter_empty: drop images without non-crowd annotations.
        rank, world_size: shard of a distributed job.
        start_iter: batches to skip (resuming continues the same stream).

    Returns:
        A ``DataLoader`` whose iteration never ends, yielding ``list[dict]`` of mapped
        samples. An image that cannot be read stops it with ``ImageReadError`` naming the file.
    """
    if not records:
        raise ValueError("build_train_loader: the training dataset has no images")
    kept = filter_empty_records(records) if filter_empty else records
    if not kept:
        raise ValueError(
            f"build_train_loader: none of the {len(records)} training images has a non-crowd "
            f"annotation (e.g. {_some_files(records)}), and images without one are skipped "
            f"(filter_empty=True); check that the annotations' image_id values match the "
            f"images' ids")
    records = kept
    sampler = TrainingSampler(len(records), shuffle=True, seed=seed, rank=rank,
                              world_size=world_size)
    group_ids = aspect_ratio_group_ids(records) if aspect_ratio_grouping else None
    batch_sampler = GroupedBatchSampler(sampler, batch_size, group_ids, seed=seed, rank=rank,
                                        start_batch=start_iter, world_size=world_size)
    return DataLoader(MapDataset(records, mapper), batch_sampler=batch_sampler,
                      num_workers=num_workers, collate_fn=trivial_batch_collator,
                      worker_init_fn=functools.partial(worker_init_fn, seed=seed, rank=rank),
                      generator=_own_generator(seed))


def build_test_loader(records: Sequence[dict], mapper: Callable[..., Dict[str, Any]],
                      num_workers: int = 0, rank: int = 0, world_size: int = 1) -> DataLoader:
    """Inference loader: batches of one image in dataset order, every image once.

    Returns:
        A ``DataLoader`` of length ``len(records)`` (of this rank's shard) yielding
        ``[dict]``.
    """
    return DataLoader(MapDataset(records, mapper), batch_size=1,
                      sampler=InferenceSampler(len(records), rank, world_size),
                      num_workers=num_workers, collate_fn=trivial_batch_collator,
                      worker_init_fn=functools.partial(worker_init_fn, rank=rank),
                      generator=_own_generator(0))
