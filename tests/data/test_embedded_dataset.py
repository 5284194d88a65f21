"""The embedded shapes dataset: byte-identical regeneration, caching, content statistics."""
import hashlib
import json
import os

import numpy as np
import pycocotools.mask as mask_util
import pytest
from PIL import Image

from segkit.data import embedded as emb
from segkit.data import get_dataset
from segkit.data.shapes import CLASSES, MIN_PIXELS

SMALL = {"num_train_images": 6, "num_val_images": 3, "image_size": 96}


def _tree_hashes(root):
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            path = os.path.join(dirpath, f)
            out[os.path.relpath(path, root)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return out


def _decode(ann):
    seg = ann["segmentation"]
    return mask_util.decode({"size": seg["size"], "counts": seg["counts"].encode()}).astype(bool)


def test_generation_is_byte_identical(tmp_path):
    a = emb.ensure_embedded(str(tmp_path / "a"), **SMALL)
    b = emb.ensure_embedded(str(tmp_path / "b"), **SMALL)
    ha, hb = _tree_hashes(a), _tree_hashes(b)
    assert len(ha) == 6 + 3 + 2 + 1  # images, two jsons, manifest
    assert ha == hb
    # no temporary folder is left beside the dataset
    assert sorted(os.listdir(tmp_path)) == ["a", "b"]


def test_cached_dataset_is_reused_and_regenerated_when_params_change(tmp_path):
    root = str(tmp_path / "emb")
    emb.ensure_embedded(root, **SMALL)
    stamp = os.stat(os.path.join(root, "manifest.json")).st_mtime_ns
    emb.ensure_embedded(root, **SMALL)
    assert os.stat(os.path.join(root, "manifest.json")).st_mtime_ns == stamp  # reused
    emb.ensure_embedded(root, **dict(SMALL, num_val_images=4))
    manifest = json.load(open(os.path.join(root, "manifest.json")))
    assert manifest["params"]["num_val_images"] == 4 and manifest["version"] == emb.VERSION
    assert len(os.listdir(os.path.join(root, "val"))) == 4
    os.remove(os.path.join(root, "train", "000001.png"))  # damaged copy -> regenerated
    emb.ensure_embedded(root, **dict(SMALL, num_val_images=4))
    assert len(os.listdir(os.path.join(root, "train"))) == 6
    assert sorted(os.listdir(tmp_path)) == ["emb"]


def test_aborted_generation_leaves_nothing(tmp_path, monkeypatch):
    calls = []

    def failing_write(folder, split, num_images, image_size):
        calls.append(split)
        os.makedirs(os.path.join(folder, split))
        raise KeyboardInterrupt  # as if the user pressed Ctrl-C half way

    monkeypatch.setattr(emb, "_write_split", failing_write)
    with pytest.raises(KeyboardInterrupt):
        emb.ensure_embedded(str(tmp_path / "emb"), **SMALL)
    assert calls == ["train"] and os.listdir(tmp_path) == []


def test_concurrent_run_moving_the_stale_copy_first(tmp_path, monkeypatch):
    """Two runs replace the same stale dataset: the one that finds it already moved aside
    still puts a complete dataset in place instead of failing."""
    root = str(tmp_path / "emb")
    emb.ensure_embedded(root, **SMALL)
    manifest = os.path.join(root, "manifest.json")
    stale = dict(json.load(open(manifest)), version=emb.VERSION - 1)
    json.dump(stale, open(manifest, "w"))
    real_replace = os.replace

    def racing_replace(src, dst):
        if src == root and dst.endswith(".stale"):  # the other run got there first
            real_replace(root, str(tmp_path / "moved-by-the-other-run"))
        return real_replace(src, dst)

    monkeypatch.setattr(emb.os, "replace", racing_replace)
    assert emb.ensure_embedded(root, **SMALL) == root
    monkeypatch.undo()
    assert json.load(open(manifest))["version"] == emb.VERSION
    assert emb._manifest_ok(root, dict(SMALL, num_train_images=6))
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".emb")]


def test_refuses_to_replace_a_foreign_folder(tmp_path):
    (tmp_path / "mine.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="not a segkit embedded dataset"):
        emb.ensure_embedded(str(tmp_path), **SMALL)
    assert (tmp_path / "mine.txt").read_text() == "user data"


def test_bad_split_and_params(tmp_path):
    with pytest.raises(ValueError, match=r"'train' or 'val'.*'dataset.train.split'"):
        get_dataset({"name": "embedded", "split": "test", "root": str(tmp_path)},
                    path="dataset.train")
    with pytest.raises(ValueError, match="image_size"):
        emb.ensure_embedded(str(tmp_path / "x"), image_size=8)


def test_visible_masks_are_disjoint_and_match_records(tmp_path):
    records, meta = get_dataset({"name": "embedded", "split": "train", "root": str(tmp_path / "e"),
                                 "num_train_images": 24, "num_val_images": 2, "image_size": 160})
    assert meta["thing_classes"] == list(CLASSES) and meta["name"] == "embedded_train"
    touching = 0
    for rec in records:
        img = Image.open(rec["file_name"])
        assert img.mode == "RGB" and img.size == (rec["width"], rec["height"])
        masks = np.stack([_decode(a) for a in rec["annotations"]])
        # occluded objects keep only their visible part: no pixel belongs to two objects
        assert masks.sum(0).max() <= 1, rec["file_name"]
        for a, m in zip(rec["annotations"], masks):
            assert a["area"] == m.sum() >= MIN_PIXELS and a["iscrowd"] == 0
            ys, xs = np.nonzero(m)
            x0, y0 = xs.min(), ys.min()
            assert a["bbox"] == [x0, y0, xs.max() + 1 - x0, ys.max() + 1 - y0]
        # objects whose masks touch: one was drawn over the other (or they abut)
        grown = masks | np.roll(masks, 1, 1) | np.roll(masks, -1, 1) | np.roll(masks, 1, 2)
        inter = (grown[:, None] & masks[None]).reshape(len(masks), len(masks), -1).any(-1)
        touching += int(np.triu(inter | inter.T, 1).sum())
    assert touching >= 10  # occlusion happens routinely


def test_default_dataset_statistics():
    """The default train split (the main job's data): sizes, orientations, classes, areas."""
    records, meta = get_dataset({"name": "embedded", "split": "train"})
    val, _ = get_dataset({"name": "embedded", "split": "val"})
    assert len(records) == 400 and len(val) == 50
    assert os.path.dirname(meta["json_file"]).startswith(emb.embedded_root())
    sizes = np.array([(r["height"], r["width"]) for r in records])
    assert sizes.min() >= 160 and sizes.max() <= 256
    landscape = (sizes[:, 1] > sizes[:, 0]).mean()
    assert 0.3 < landscape < 0.7  # both orientations for aspect-ratio grouping
    anns = [a for r in records for a in r["annotations"]]
    assert 3 <= len(anns) / len(records) <= 7
    counts = np.bincount([a["category_id"] for a in anns], minlength=len(CLASSES))
    assert counts.min() > 0.1 * len(anns)  # every class well represented
    areas = np.array([a["area"] for a in anns])
    small, large = (areas < 32 ** 2).mean(), (areas >= 96 ** 2).mean()
    medium = 1 - small - large
    assert small > 0.2 and medium > 0.2 and large > 0.01, (small, medium, large)
    assert min(r["width"] * r["height"] for r in val) >= 160 ** 2
    assert {a["category_id"] for r in val for a in r["annotations"]} == set(range(len(CLASSES)))
