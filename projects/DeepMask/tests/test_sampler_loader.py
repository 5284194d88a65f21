"""Batches of DeepMask/SharpMask patches: one kind per batch by hfreq, determinism for a seed,
independence of the number of workers, resume from an iteration, distributed shards."""
import itertools

import pytest
import torch

from segkit.data import load_coco_json
from segkit_deepmask.data import (PatchBatchSampler, PatchSampler, build_patch_loader, square,
                                  write_coco_dataset)


@pytest.fixture(scope="module")
def sampler(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    images = [{"height": 90 + 10 * i, "width": 120, "objects": [
        {"polygon": square(10 + 7 * i, 20, 30 + 5 * i), "category": 1 + i % 2},
        {"polygon": [70, 10, 110, 30, 80, 60], "segmentation": "rle"}]} for i in range(4)]
    images.append({"height": 64, "width": 64})  # no object
    return PatchSampler(load_coco_json(*write_coco_dataset(str(root), images))[0])


def _batches(loader, n):
    return list(itertools.islice(iter(loader), n))


def _same(a, b):
    """Two batches hold the same samples, tensors and metadata alike."""
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            same = torch.equal(x[k], y[k]) if isinstance(x[k], torch.Tensor) else x[k] == y[k]
            assert same, k


def test_batch_kinds_follow_hfreq():
    kinds = [PatchBatchSampler(hfreq=0.5, seed=3).batch_kind(i) for i in range(400)]
    assert 0.4 < kinds.count("score") / len(kinds) < 0.6
    assert {PatchBatchSampler(hfreq=0.0).batch_kind(i) for i in range(50)} == {"mask"}
    assert {PatchBatchSampler(hfreq=1.0).batch_kind(i) for i in range(50)} == {"score"}
    for bad in ({"hfreq": 1.5}, {"batch_size": 0}, {"rank": 2, "world_size": 2}):
        with pytest.raises(ValueError):
            PatchBatchSampler(**bad)


def test_batches_are_one_kind_and_deterministic(sampler):
    first = _batches(build_patch_loader(sampler, batch_size=4, hfreq=0.5, seed=1), 6)
    again = _batches(build_patch_loader(sampler, batch_size=4, hfreq=0.5, seed=1), 6)
    for a, b in zip(first, again):
        _same(a, b)
    kinds = [{s["kind"] for s in batch} for batch in first]
    assert all(len(k) == 1 for k in kinds) and {"mask", "score"} == set().union(*kinds)
    for batch in first:
        for s in batch:
            assert s["image"].shape == (3, 192, 192)
            if s["kind"] == "mask":
                assert s["mask"].shape == (112, 112)
            else:
                assert s["label"].shape == () and s["label"].item() in (-1.0, 1.0)
    other = _batches(build_patch_loader(sampler, batch_size=4, hfreq=0.5, seed=2), 6)
    assert any(not torch.equal(a[0]["image"], b[0]["image"]) for a, b in zip(first, other))


def test_sharpmask_batches_are_mask_only(sampler):
    for batch in _batches(build_patch_loader(sampler, batch_size=3, hfreq=0.0), 4):
        assert {s["kind"] for s in batch} == {"mask"}


def test_same_batches_with_0_and_2_workers(sampler):
    serial = _batches(build_patch_loader(sampler, batch_size=3, seed=5), 4)
    workers = _batches(build_patch_loader(sampler, batch_size=3, seed=5, num_workers=2), 4)
    for a, b in zip(serial, workers):
        _same(a, b)


def test_resume_continues_the_stream(sampler):
    full = _batches(build_patch_loader(sampler, batch_size=2, seed=4), 5)
    resumed = _batches(build_patch_loader(sampler, batch_size=2, seed=4, start_iter=3), 2)
    _same(full[3], resumed[0])
    _same(full[4], resumed[1])


def test_shards_union_is_the_single_process_batch(sampler):
    single = _batches(build_patch_loader(sampler, batch_size=6, seed=9), 3)
    shards = [_batches(build_patch_loader(sampler, batch_size=2, seed=9, rank=r, world_size=3),
                       3) for r in range(3)]
    for it in range(3):
        # rank r holds positions r, r + 3, ... of the iteration's 6 samples
        merged = [shards[r][it][k] for k in range(2) for r in range(3)]
        _same(single[it], merged)
