"""Samplers, loaders and catalogs: determinism, sharding, aspect grouping, errors."""
import itertools
import pickle

import numpy as np
import pytest
import torch

from segkit.data import (DatasetCatalog, DatasetMapper, GroupedBatchSampler, ImageReadError,
                         InferenceSampler, MetadataCatalog, TrainingSampler, build_test_loader,
                         build_train_loader, get_dataset)


def _take(iterable, n):
    return list(itertools.islice(iterable, n))


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("loaders") / "emb"
    records, _ = get_dataset({"name": "embedded", "split": "train", "root": str(root),
                              "num_train_images": 12, "num_val_images": 3, "image_size": 96})
    return records


def test_training_sampler_is_seeded_infinite_and_covers_each_pass():
    a = _take(TrainingSampler(10, seed=3), 50)
    assert a == _take(TrainingSampler(10, seed=3), 50)
    assert a != _take(TrainingSampler(10, seed=4), 50)
    for k in range(5):  # every pass is a permutation
        assert sorted(a[10 * k:10 * k + 10]) == list(range(10))
    assert _take(TrainingSampler(4, shuffle=False), 9) == [0, 1, 2, 3, 0, 1, 2, 3, 0]


def test_training_sampler_shards_are_disjoint_interleavings():
    full = _take(TrainingSampler(10, seed=1), 40)
    shards = [_take(TrainingSampler(10, seed=1, rank=r, world_size=2), 20) for r in (0, 1)]
    assert shards[0] == full[0::2] and shards[1] == full[1::2]
    with pytest.raises(ValueError, match="rank"):
        TrainingSampler(10, rank=2, world_size=2)
    with pytest.raises(ValueError, match="non-empty"):
        TrainingSampler(0)


def test_inference_sampler_shards_cover_each_index_once():
    shards = [list(InferenceSampler(10, r, 3)) for r in range(3)]
    assert sum(shards, []) == list(range(10))
    assert sorted(len(s) for s in shards) == [3, 3, 4]


def test_grouped_batches_hold_one_orientation():
    group_ids = [0, 1, 1, 0, 1, 0, 0, 1, 1, 1]
    batches = _take(GroupedBatchSampler(TrainingSampler(10, seed=0), 3, group_ids, seed=5), 30)
    keys = [k for b in batches for _, k in b]
    assert len(set(keys)) == len(keys)  # every sample has its own seed key
    for batch in batches:
        assert len(batch) == 3 and len({group_ids[i] for i, _ in batch}) == 1
        assert all(k[0] == 5 for _, k in batch)
    # without grouping, batches are the stream cut in order
    plain = _take(GroupedBatchSampler(TrainingSampler(10, seed=0), 3), 2)
    assert [i for b in plain for i, _ in b] == _take(TrainingSampler(10, seed=0), 6)
    resumed = _take(GroupedBatchSampler(TrainingSampler(10, seed=0), 3, group_ids, seed=5,
                                        start_batch=4), 3)
    assert resumed == batches[4:7]


def test_sharded_batches_are_the_single_process_batch_split():
    """N processes with batches of B take, at every iteration, exactly the samples (and the
    augmentation keys) of one process with batches of N*B: distributed training sees the same
    data as one process with the same total batch."""
    def batches(rank, world, batch_size):
        sampler = TrainingSampler(7, seed=3, rank=rank, world_size=world)
        return _take(GroupedBatchSampler(sampler, batch_size, seed=3, rank=rank,
                                         world_size=world, start_batch=2), 5)

    single = batches(0, 1, 4)
    shards = [batches(r, 2, 2) for r in range(2)]
    for it in range(5):
        assert sorted(shards[0][it] + shards[1][it]) == sorted(single[it])
    with pytest.raises(ValueError, match="rank=2, world_size=2"):
        GroupedBatchSampler(TrainingSampler(7), 2, rank=2, world_size=2)


def _summary(batch):
    return [(d["image_id"], tuple(d["image"].shape), d["image"].float().sum().item(),
             d["instances"].gt_boxes.tensor.tolist()) for d in batch]


def test_train_loader_is_deterministic_regardless_of_workers(shapes):
    mapper = DatasetMapper(True, [64, 80, 96], 200, flip_prob=0.5)
    runs = [[_summary(b) for b in _take(iter(build_train_loader(shapes, mapper, 2, num_workers=w,
                                                                seed=7)), 6)]
            for w in (0, 2)]
    assert runs[0] == runs[1]
    other = [_summary(b) for b in _take(iter(build_train_loader(shapes, mapper, 2, seed=8)), 6)]
    assert other != runs[0]
    # the augmentation really varies: over two passes, images come at different sizes/flips
    seen = {}
    for batch in _take(iter(build_train_loader(shapes, mapper, 2, seed=7)), 12):
        for image_id, shape, total, _ in _summary(batch):
            seen.setdefault(image_id, set()).add((shape, total))
    assert sum(len(v) > 1 for v in seen.values()) >= 3


def test_train_loader_groups_orientations(shapes):
    mapper = DatasetMapper(True, [64], 200, flip_prob=0.0, use_masks=False)
    loader = build_train_loader(shapes, mapper, 3, aspect_ratio_grouping=True, seed=0)
    for batch in _take(iter(loader), 8):
        assert len(batch) == 3
        assert len({d["image"].shape[2] > d["image"].shape[1] for d in batch}) == 1


def test_train_loader_filters_empty_and_raises_on_bad_images(shapes, tmp_path):
    empty = dict(shapes[0], image_id=999, annotations=[])
    crowd_only = dict(shapes[1], image_id=998,
                      annotations=[dict(shapes[1]["annotations"][0], iscrowd=1)])
    mapper = DatasetMapper(True, [64], 200, use_masks=False)
    loader = build_train_loader([empty, crowd_only] + shapes[2:4], mapper, 2, seed=0,
                                aspect_ratio_grouping=False)
    ids = {d["image_id"] for b in _take(iter(loader), 6) for d in b}
    assert ids == {shapes[2]["image_id"], shapes[3]["image_id"]}
    with pytest.raises(ValueError, match=r"none of the 2 training images has a non-crowd "
                                         r"annotation \(e.g. .*png, .*png\).*filter_empty=True"):
        build_train_loader([empty, crowd_only], mapper, 1)
    with pytest.raises(ValueError, match="has no images"):
        build_train_loader([], mapper, 1)
    broken = dict(shapes[0], file_name=str(tmp_path / "gone.png"))
    for workers in (0, 1):  # a worker's error reaches the main process with its type
        it = iter(build_train_loader([broken], mapper, 1, num_workers=workers))
        with pytest.raises(ImageReadError, match=r"gone.png"):
            next(it)
        # stop the worker now: left to the garbage collector (the traceback holds the
        # iterator in a cycle) torch's shutdown waits out a 5 s timeout
        getattr(it, "_shutdown_workers", lambda: None)()


def test_records_reach_workers_through_shared_memory(shapes):
    """Workers get the records as one shared tensor, not as a pickled copy of the list: under
    spawn/forkserver the dataset is pickled per worker (torch's reductions share tensors)."""
    import io
    from multiprocessing.reduction import ForkingPickler

    from segkit.data import MapDataset

    records = [dict(shapes[i % len(shapes)], image_id=i) for i in range(2000)]
    dataset = MapDataset(records, DatasetMapper(False, 64, 200))
    plain = len(pickle.dumps(records))
    buf = io.BytesIO()
    ForkingPickler(buf).dump(dataset)
    assert len(buf.getvalue()) < plain / 50, (len(buf.getvalue()), plain)
    clone = pickle.loads(buf.getvalue())
    assert clone._records[1999] == records[1999] and len(clone) == 2000


def test_test_loader_keeps_dataset_order(shapes):
    loader = build_test_loader(shapes[:5], DatasetMapper(False, 64, 200), num_workers=0)
    batches = list(loader)
    assert len(loader) == 5 and all(len(b) == 1 for b in batches)
    assert [b[0]["image_id"] for b in batches] == [r["image_id"] for r in shapes[:5]]
    assert all("instances" not in b[0] and min(b[0]["image"].shape[1:]) == 64 for b in batches)


def test_mapper_without_rng_argument_gets_seeded_globals_and_main_state_is_kept(shapes):
    def mapper(record):
        return {"image_id": record["image_id"], "r": np.random.rand(), "t": torch.rand(()).item()}

    state = torch.get_rng_state()
    np_state = np.random.get_state()[1].copy()
    draw = [[d["r"] for b in _take(iter(build_train_loader(shapes, mapper, 2, num_workers=w)), 3)
             for d in b] for w in (0, 2)]
    assert draw[0] == draw[1]
    assert len(set(draw[0])) == len(draw[0])  # seeded per sample, not one seed for all
    assert torch.equal(torch.get_rng_state(), state)
    np.testing.assert_array_equal(np.random.get_state()[1], np_state)


def test_dataset_catalog_is_lazy_and_cached():
    calls = []

    def loader():
        calls.append(1)
        return [{"image_id": 1}]

    DatasetCatalog.register("lazy_test", loader)
    assert calls == [] and "lazy_test" in DatasetCatalog.list()
    assert DatasetCatalog.get("lazy_test") is DatasetCatalog.get("lazy_test")
    assert calls == [1]
    with pytest.raises(KeyError, match="already registered"):
        DatasetCatalog.register("lazy_test", lambda: [])
    with pytest.raises(KeyError, match="not registered.*lazy_test"):
        DatasetCatalog.get("lazy_tset")
    DatasetCatalog.remove("lazy_test")
    MetadataCatalog.set("meta_test", {"thing_classes": ["a"]})
    assert MetadataCatalog.get("meta_test") == {"thing_classes": ["a"], "name": "meta_test"}
    with pytest.raises(KeyError, match="no metadata for dataset 'nothing'"):
        MetadataCatalog.get("nothing")


def test_serialized_list_round_trip():
    """The records' compact store (also used by projects' samplers) gives every item back."""
    from segkit.data import SerializedList

    items = [{"file_name": "a.png", "ann": [1, 2]}, None, "x" * 1000, {}]
    stored = SerializedList(items)
    assert len(stored) == 4 and [stored[i] for i in range(4)] == items
    assert len(SerializedList([])) == 0
