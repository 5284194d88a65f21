"""Proposal files: exact round trip, weights_only, atomic write, clear errors; box mapping."""
import os

import numpy as np
import pytest
import torch

from segkit.data import HFlipTransform, ResizeTransform, TransformList
from segkit.data.proposals import (FORMAT, ProposalFileError, image_id_key, load_proposals,
                                   save_proposals, transform_proposals)


def _proposals():
    gen = torch.Generator().manual_seed(0)
    xy = torch.rand(5, 2, generator=gen) * 50
    boxes = {7: torch.cat([xy, xy + 10], 1), np.int64(3): torch.zeros(0, 4),
             "img_a": xy.repeat(1, 2)[:2] + torch.tensor([0, 0, 1, 2])}
    scores = {7: torch.tensor([0.1, 0.9, 0.5, 0.5, 0.3]), np.int64(3): torch.zeros(0),
              "img_a": torch.tensor([0.2, 0.8])}
    return boxes, scores


def test_round_trip_is_exact_and_sorted_by_score(tmp_path):
    boxes, scores = _proposals()
    path = str(tmp_path / "props.pth")
    assert save_proposals(path, boxes, scores, {7: (60, 80), 3: (10, 20), "img_a": (64, 64)},
                          meta={"experiment": "rpn"}) == path
    # a plain weights_only load works: tensors and plain containers only
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == FORMAT and raw["version"] == 1 and set(raw["boxes"]) == {7, 3, "img_a"}
    loaded = load_proposals(path)
    assert len(loaded) == 3 and 3 in loaded and np.int32(7) in loaded and 5 not in loaded
    order = torch.tensor([1, 2, 3, 4, 0])  # decreasing score, ties (0.5, 0.5) in file order
    assert torch.equal(loaded.scores[7], scores[7][order])
    assert torch.equal(loaded.boxes[7], boxes[7][order])
    assert loaded.boxes[7].dtype == torch.float32
    assert torch.equal(loaded.boxes["img_a"], boxes["img_a"][[1, 0]])
    assert loaded.boxes[3].shape == (0, 4) and loaded.scores[3].shape == (0,)
    assert loaded.image_sizes == {7: (60, 80), 3: (10, 20), "img_a": (64, 64)}
    assert loaded.meta == {"experiment": "rpn"} and loaded.path == path


def test_atomic_write_leaves_no_temp_file_and_replaces(tmp_path):
    path = str(tmp_path / "sub" / "props.pth")
    save_proposals(path, {1: torch.ones(1, 4)}, {1: torch.ones(1)})
    save_proposals(path, {2: torch.ones(2, 4)}, {2: torch.ones(2)})
    assert os.listdir(tmp_path / "sub") == ["props.pth"]
    assert set(load_proposals(path).boxes) == {2}


def test_save_rejects_bad_shapes_and_ids(tmp_path):
    path = str(tmp_path / "p.pth")
    with pytest.raises(ValueError, match="same image ids"):
        save_proposals(path, {1: torch.ones(1, 4)}, {2: torch.ones(1)})
    with pytest.raises(ValueError, match=r"boxes of image_id 1 must be an \(N, 4\)"):
        save_proposals(path, {1: torch.ones(3)}, {1: torch.ones(3)})
    with pytest.raises(ValueError, match=r"scores of image_id 1 must be a \(2,\)"):
        save_proposals(path, {1: torch.ones(2, 4)}, {1: torch.ones(3)})
    with pytest.raises(TypeError, match="image_id must be an int or a str"):
        image_id_key(1.5)
    assert not os.path.exists(path)


def test_load_errors_name_the_file(tmp_path):
    missing = str(tmp_path / "nope.pth")
    with pytest.raises(ProposalFileError, match="nope.pth' does not exist"):
        load_proposals(missing)

    ckpt = str(tmp_path / "model.pth")
    torch.save({"model": {"w": torch.ones(1)}, "meta": {}}, ckpt)
    with pytest.raises(ProposalFileError, match=r"model.pth' is not a segkit proposal file"):
        load_proposals(ckpt)

    good = str(tmp_path / "good.pth")
    save_proposals(good, {i: torch.rand(100, 4) for i in range(20)},
                   {i: torch.rand(100) for i in range(20)})
    data = open(good, "rb").read()
    truncated = str(tmp_path / "truncated.pth")
    with open(truncated, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(ProposalFileError, match="truncated.pth.*truncated or corrupt"):
        load_proposals(truncated)

    newer = str(tmp_path / "newer.pth")
    torch.save({"format": FORMAT, "version": 99, "boxes": {}, "scores": {}}, newer)
    with pytest.raises(ProposalFileError, match="version 99"):
        load_proposals(newer)

    bad = str(tmp_path / "bad.pth")
    torch.save({"format": FORMAT, "version": 1, "boxes": {1: torch.ones(2, 4)},
                "scores": {1: torch.ones(3)}}, bad)
    with pytest.raises(ProposalFileError, match="bad.pth'.*scores of image_id 1"):
        load_proposals(bad)


def test_transform_proposals_resize_and_flip_by_hand():
    boxes = torch.tensor([[10.0, 20.0, 60.0, 80.0], [0.0, 0.0, 200.0, 100.0]])
    # original 100 x 200 (h x w) -> input 50 x 100: scale 0.5
    resized = [[5.0, 10.0, 30.0, 40.0], [0.0, 0.0, 100.0, 50.0]]
    assert transform_proposals(boxes, (100, 200), (50, 100)).tolist() == resized
    tfm = TransformList([ResizeTransform(100, 200, 50, 100), HFlipTransform(100)])
    # flip of width 100: x -> 100 - x, sides swapped
    assert transform_proposals(boxes, (100, 200), (50, 100), tfm).tolist() == [
        [70.0, 10.0, 95.0, 40.0], [0.0, 0.0, 100.0, 50.0]]
    # anisotropic resize (rounded sizes): x and y scale separately
    out = transform_proposals(boxes, (100, 200), (33, 67))
    torch.testing.assert_close(out[0], torch.tensor([10 * 67 / 200, 20 * 0.33, 60 * 67 / 200,
                                                     80 * 0.33]))
