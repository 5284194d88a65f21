"""Infinite, seeded batches of DeepMask/SharpMask patches.

Each batch is all mask samples or all score samples: DeepMask alternates the two heads'
updates rather than summing their losses, choosing a score batch with probability ``hfreq``
(0.5 for DeepMask, 0 for SharpMask, which trains masks only; papers.md 1.3, 2.2, 3.3).

Like ``segkit.data.build``, nothing depends on the number of loader workers: batch ``i``'s
kind comes from a generator seeded with ``(seed, KIND_STREAM, i)`` and the sample at position
``p`` of the whole stream from one seeded with ``(seed, p)``. Batch ``i`` of a job with
``world_size`` processes of ``batch_size`` covers positions ``[i * B, (i + 1) * B)`` with
``B = batch_size * world_size``, rank ``r`` taking ``i * B + r + world_size * k``: the union of
the shards is the batch of one process with batch size ``B``, and ``start_iter`` resumes the
same stream without drawing the skipped batches.
"""
from __future__ import annotations

import functools
import itertools
from typing import Any, Dict, Iterator, List, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from segkit.data import trivial_batch_collator, worker_init_fn

from .sampler import PatchSampler

__all__ = ["PatchBatchSampler", "PatchDataset", "build_patch_loader", "KIND_STREAM"]

PatchKey = Tuple[str, Tuple[int, int]]  # (sample kind, (seed, position in the whole stream))
KIND_STREAM = 0x6B696E64  # third seed word of the per-batch kind draws ("kind")


class PatchBatchSampler(Sampler[List[PatchKey]]):
    """Infinite batches of ``(kind, (seed, position))`` keys.

    Args:
        batch_size: samples per batch of this process (the total batch / world_size).
        hfreq: probability that a batch holds score samples (1: score only, 0: mask only).
        seed: seed of the batch kinds and of every sample.
        rank, world_size: this process's shard of each batch.
        start_iter: the first batch index (resuming continues the same stream).
    """

    def __init__(self, batch_size: int = 32, hfreq: float = 0.5, seed: int = 0, rank: int = 0,
                 world_size: int = 1, start_iter: int = 0):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not 0.0 <= hfreq <= 1.0:
            raise ValueError(f"hfreq (probability of a score batch) must be in [0, 1], "
                             f"got {hfreq}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, "
                             f"world_size={world_size}")
        if start_iter < 0:
            raise ValueError(f"start_iter must be >= 0, got {start_iter}")
        self.batch_size, self.hfreq, self.seed = int(batch_size), float(hfreq), int(seed)
        self.rank, self.world_size, self.start_iter = int(rank), int(world_size), int(start_iter)

    def batch_kind(self, iteration: int) -> str:
        """``"score"`` or ``"mask"``: the kind of batch ``iteration``, the same on every rank."""
        draw = np.random.default_rng([self.seed, KIND_STREAM, iteration]).random()
        return "score" if draw < self.hfreq else "mask"

    def batch_keys(self, iteration: int) -> List[PatchKey]:
        """This rank's keys of batch ``iteration``."""
        start = iteration * self.batch_size * self.world_size + self.rank
        kind = self.batch_kind(iteration)
        return [(kind, (self.seed, start + self.world_size * k)) for k in range(self.batch_size)]

    def __iter__(self) -> Iterator[List[PatchKey]]:
        return map(self.batch_keys, itertools.count(self.start_iter))


class PatchDataset(Dataset):
    """Map-style view of a :class:`PatchSampler` indexed by :class:`PatchBatchSampler` keys."""

    def __init__(self, sampler: PatchSampler):
        self.sampler = sampler

    def __getitem__(self, key: PatchKey) -> Dict[str, Any]:
        kind, seed_words = key
        return self.sampler.sample(kind, np.random.default_rng(list(seed_words)))


def build_patch_loader(sampler: PatchSampler, batch_size: int = 32, hfreq: float = 0.5,
                       seed: int = 0, num_workers: int = 0, rank: int = 0, world_size: int = 1,
                       start_iter: int = 0) -> DataLoader:
    """Infinite loader of DeepMask/SharpMask training batches.

    Args:
        sampler: the patch sampler (geometry, jitter and score rule).
        batch_size: samples per batch of this process (32 in the papers, 1.4 and 2.3).
        hfreq: probability of a score batch (0.5 DeepMask, 0 SharpMask, 1 score only).
        seed: seed of the whole stream.
        num_workers: loader processes (0: sample in the main process); the batches are the
            same for any number.
        rank, world_size: shard of a distributed job (see the module docstring).
        start_iter: first batch index, for resuming.

    Returns:
        A ``DataLoader`` yielding ``list[dict]`` batches of one kind (see
        :meth:`PatchSampler.mask_sample` and :meth:`PatchSampler.score_sample`) forever.

    Raises:
        ValueError: ``hfreq < 1`` with a ``score_only`` sampler (no masks to train on).
    """
    if sampler.score_only and hfreq < 1.0:
        raise ValueError(f"{sampler.name}: the PatchSampler is score_only (no masks), so every "
                         f"batch must be a score batch: set hfreq=1 (got hfreq={hfreq})")
    batches = PatchBatchSampler(batch_size, hfreq, seed, rank, world_size, start_iter)
    return DataLoader(PatchDataset(sampler), batch_sampler=batches, num_workers=num_workers,
                      collate_fn=trivial_batch_collator,
                      worker_init_fn=functools.partial(worker_init_fn, seed=seed, rank=rank),
                      generator=torch.Generator().manual_seed(seed))
