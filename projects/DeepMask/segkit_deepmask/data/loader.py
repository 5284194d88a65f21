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

:func:`build_train_patch_loader` is the same loader built from a composed config and
registered as the core trainer's ``dataloader.name=deepmask.patches``
(``segkit.registry.TRAIN_LOADERS``), so ``segkit-train experiment=deepmask_r50_coco`` trains
on patches through the core :class:`segkit.engine.Trainer`.
"""
from __future__ import annotations

import functools
import itertools
from typing import Any, Dict, Iterator, List, Mapping, Tuple

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset, Sampler

from segkit.data import trivial_batch_collator, worker_init_fn
from segkit.registry import TRAIN_LOADERS

from .sampler import PatchSampler

__all__ = ["PatchBatchSampler", "PatchDataset", "build_patch_loader", "build_train_patch_loader",
           "check_recipe", "KIND_STREAM"]

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


# -- config entry point of the core trainer ---------------------------------------------------

# the model keys that the patches must match, and the sampler geometry that gives each
_MODEL_GEOMETRY = (("input_size", "input_size"), ("window_size", "window"),
                   ("label_size", "label_size"))


@TRAIN_LOADERS.register("patches", scope="deepmask")
def build_train_patch_loader(cfg: DictConfig, records: List[dict], *, batch_size: int,
                             rank: int = 0, world_size: int = 1, start_iter: int = 0
                             ) -> DataLoader:
    """The training loader of ``dataloader.name=deepmask.patches`` (called by the core's
    ``segkit.engine.defaults.build_train_loader``, which passes this process's share of
    ``dataloader.batch_size`` and its rank).

    Keys read: ``dataloader.preset`` (geometry of :data:`PRESETS`: ``deepmask``,
    ``sharpmask``, ``deepmask_nips``), ``dataloader.sampler`` (further :class:`PatchSampler`
    arguments on top of the preset: ``window``, ``context``, ``label_size``, ``max_shift``...),
    ``dataloader.score_rule`` and ``dataloader.object_sampling`` (paper or released code,
    papers.md 10.2), ``dataloader.hfreq``, ``dataloader.num_workers``, ``train.seed``; and,
    for :func:`check_recipe`, ``model.*`` and ``train.init_weights``.

    Args:
        cfg: the composed config.
        records: the training split's dataset records (COCO-style, with masks).
        batch_size: patches per iteration of this process.
        rank, world_size: this process's shard of every batch.
        start_iter: first batch (a resumed run continues the same stream).

    Returns:
        The infinite loader of :func:`build_patch_loader`.

    Raises:
        ValueError: an inconsistent recipe (:func:`check_recipe`) or unusable records.
    """
    dl = cfg.dataloader
    extra = dl.get("sampler")
    overrides: Dict[str, Any] = ({} if extra is None else
                                 dict(OmegaConf.to_container(extra, resolve=True)))
    for key in ("score_rule", "object_sampling"):
        if dl.get(key) is not None:
            overrides.setdefault(key, str(dl[key]))
    overrides.setdefault("dataset_name",
                         str(OmegaConf.select(cfg, "dataset.train.name", default="dataset")))
    sampler = PatchSampler.from_preset(str(dl.preset), records, **overrides)
    check_recipe(cfg, sampler, start_iter)
    return build_patch_loader(sampler, batch_size=batch_size, hfreq=float(dl.hfreq),
                              seed=int(cfg.train.seed), num_workers=int(dl.num_workers),
                              rank=rank, world_size=world_size, start_iter=start_iter)


def check_recipe(cfg: DictConfig, sampler: PatchSampler, start_iter: int = 0) -> None:
    """Fail before the first batch when the data, the model and the stage disagree.

    * The patches must have the model's sizes (``model.input_size``, ``window_size``,
      ``label_size``); the model would reject the first batch otherwise.
    * SharpMask's second stage (``model.train_refinement_only``, papers.md 3.3) trains the
      refinement on top of a trained, frozen DeepMask: it samples mask batches only
      (``hfreq = 0``) and, in a new run, needs the stage-1 weights in ``train.init_weights``.

    Raises:
        ValueError: naming the keys to set.
    """
    model: Mapping[str, Any] = cfg.get("model") or {}
    geometry = sampler.geometry
    for model_key, sampler_key in _MODEL_GEOMETRY:
        expected, got = model.get(model_key), getattr(geometry, sampler_key)
        if expected is not None and int(expected) != int(got):
            raise ValueError(
                f"dataloader: the patches have {sampler_key} {got} (preset "
                f"'{cfg.dataloader.preset}') but model.{model_key} is {expected}; pick the "
                f"model's preset (dataloader.preset=deepmask | sharpmask | deepmask_nips) or set "
                f"+dataloader.sampler.{sampler_key}={expected}")
    if not model.get("train_refinement_only"):
        return
    if float(cfg.dataloader.hfreq) > 0:
        raise ValueError(
            f"dataloader.hfreq={cfg.dataloader.hfreq}, but model.train_refinement_only freezes "
            f"the score head: SharpMask's second stage trains on mask batches only "
            f"(papers.md 3.3); set dataloader.hfreq=0")
    if start_iter == 0 and not cfg.train.get("init_weights"):
        raise ValueError(
            "SharpMask's second stage (model.train_refinement_only=true, papers.md 3.3) trains "
            "only the refinement on a trained DeepMask whose trunk and heads stay frozen, so "
            "it must start from a stage-1 checkpoint: pass train.init_weights=<stage-1 run "
            "folder>/model_final.pth (e.g. of experiment=deepmask_r50_coco), or train end to "
            "end with model.train_refinement_only=false")
