"""Samplers: an infinite seeded training stream, sharded inference order, aspect-ratio batches.

Training is iteration-based (Mask R-CNN trains for a fixed number of iterations, not epochs),
so :class:`TrainingSampler` never ends: it concatenates seeded permutations of the dataset.
Every process of a distributed job draws the same permutations and keeps every
``world_size``-th index starting at its ``rank``, so the shards are disjoint without any
communication.

:class:`GroupedBatchSampler` cuts that stream into batches and tags every sample with a key
``(seed, position in the whole stream)``. The loader seeds the sample's augmentation from that
key, which is why a batch is the same whatever the number of loader workers, and why N
processes with batches of B see exactly the samples, augmentations included, that one process
with batches of N*B sees (without aspect-ratio grouping, which regroups per process).
"""
from __future__ import annotations

import itertools
from typing import Iterator, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import Sampler

__all__ = ["TrainingSampler", "InferenceSampler", "GroupedBatchSampler", "aspect_ratio_group_ids"]

SampleKey = Tuple[int, Tuple[int, int]]  # (dataset index, (seed, global stream position))


def _check_shard(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")


class TrainingSampler(Sampler[int]):
    """Infinite stream of dataset indices.

    Args:
        size: dataset length (> 0).
        shuffle: draw a new seeded permutation for every pass; otherwise 0..size-1 repeated.
        seed: seed of the permutations; the same seed gives the same stream.
        rank, world_size: this process keeps positions ``rank, rank + world_size, ...``.
    """

    def __init__(self, size: int, shuffle: bool = True, seed: int = 0, rank: int = 0,
                 world_size: int = 1):
        if size <= 0:
            raise ValueError(f"TrainingSampler needs a non-empty dataset, got size={size}")
        _check_shard(rank, world_size)
        self.size, self.shuffle, self.seed = int(size), shuffle, int(seed)
        self.rank, self.world_size = rank, world_size

    def _all_ranks(self) -> Iterator[int]:
        g = torch.Generator()
        g.manual_seed(self.seed)
        while True:
            if self.shuffle:
                yield from torch.randperm(self.size, generator=g).tolist()
            else:
                yield from range(self.size)

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(self._all_ranks(), self.rank, None, self.world_size)


class InferenceSampler(Sampler[int]):
    """Each index exactly once, in dataset order; rank ``r`` gets the r-th contiguous shard.

    Shard sizes differ by at most one, so no image is duplicated (duplicates would count twice
    in the evaluation).
    """

    def __init__(self, size: int, rank: int = 0, world_size: int = 1):
        _check_shard(rank, world_size)
        self.begin = size * rank // world_size
        self.end = size * (rank + 1) // world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.begin, self.end))

    def __len__(self) -> int:
        return self.end - self.begin


def aspect_ratio_group_ids(records: Sequence[dict]) -> List[int]:
    """0 for landscape images (width > height), 1 otherwise, from the records' sizes.

    The mapper's resize keeps the orientation, so batching by group keeps the zero padding of
    a batch (to the largest image in it) small.
    """
    return [0 if r["width"] > r["height"] else 1 for r in records]


class GroupedBatchSampler(Sampler[List[SampleKey]]):
    """Batches of ``batch_size`` keys from an index stream, optionally one group per batch.

    Args:
        sampler: index stream (typically an infinite :class:`TrainingSampler`).
        batch_size: samples per batch.
        group_ids: group of each dataset index (see :func:`aspect_ratio_group_ids`); ``None``
            batches in stream order. Samples wait in a per-group bucket until it is full.
        seed: first entry of each sample's key.
        rank, world_size: the shard of ``sampler`` (a :class:`TrainingSampler` keeps positions
            ``rank, rank + world_size, ...`` of the whole stream); they turn this shard's
            positions back into positions of the whole stream for the keys.
        start_batch: skip this many batches first (index bookkeeping only, no image is read),
            so a resumed run continues the same stream.

    Yields:
        Lists of ``(index, (seed, position))``, position counting the whole stream.
    """

    def __init__(self, sampler: Sampler[int], batch_size: int,
                 group_ids: Optional[Sequence[int]] = None, seed: int = 0, rank: int = 0,
                 start_batch: int = 0, world_size: int = 1):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        _check_shard(rank, world_size)
        self.sampler, self.batch_size = sampler, int(batch_size)
        self.group_ids = None if group_ids is None else list(group_ids)
        self.seed, self.rank, self.start_batch = int(seed), int(rank), int(start_batch)
        self.world_size = int(world_size)

    def _batches(self) -> Iterator[List[SampleKey]]:
        buckets: dict = {}
        for pos, idx in enumerate(self.sampler):
            group = 0 if self.group_ids is None else self.group_ids[idx]
            bucket = buckets.setdefault(group, [])
            bucket.append((int(idx), (self.seed, self.rank + self.world_size * pos)))
            if len(bucket) == self.batch_size:
                yield bucket
                buckets[group] = []
        # a finite sampler: flush what is left, groups in order
        for group in sorted(buckets):
            if buckets[group]:
                yield buckets[group]

    def __iter__(self) -> Iterator[List[SampleKey]]:
        return itertools.islice(self._batches(), self.start_batch, None)
