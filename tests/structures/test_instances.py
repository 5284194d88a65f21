"""Instances: field bookkeeping, length checks, indexing and concatenation."""
import numpy as np
import pytest
import torch

from segkit.structures import Boxes, Instances, PolygonMasks


def _square(x):
    return [np.array([x, x, x + 2, x, x + 2, x + 2, x, x + 2], dtype=np.float64)]


def _make(n, offset=0):
    inst = Instances((30, 40))
    inst.gt_boxes = Boxes(torch.arange(4 * n, dtype=torch.float32).view(n, 4) + offset)
    inst.gt_classes = torch.arange(n) + offset
    inst.names = [f"obj{i + offset}" for i in range(n)]
    inst.gt_masks = PolygonMasks([_square(i + offset) for i in range(n)])
    return inst


def test_fields_set_get_has_remove():
    inst = Instances((30, 40), scores=torch.tensor([0.5, 0.2]))
    assert inst.image_size == (30, 40) and len(inst) == 2
    inst.set("labels", torch.tensor([1, 0]))
    assert inst.get("labels").tolist() == [1, 0] and inst.has("labels")
    assert set(inst.get_fields()) == {"scores", "labels"}
    inst.remove("labels")
    assert not inst.has("labels")
    with pytest.raises(AttributeError, match="no field 'labels'"):
        inst.labels
    with pytest.raises(KeyError, match="no field 'labels'"):
        inst.remove("labels")


def test_length_mismatch_error_names_field():
    inst = Instances((10, 10), gt_boxes=Boxes(torch.zeros(4, 4)))
    with pytest.raises(ValueError, match="field 'gt_classes' has length 3 but Instances has 4"):
        inst.gt_classes = torch.zeros(3)
    # Replacing the only field may change the length.
    inst.gt_boxes = Boxes(torch.zeros(2, 4))
    assert len(inst) == 2
    assert len(Instances((10, 10))) == 0
    with pytest.raises(AttributeError, match="'image_size' is a read-only"):
        inst.image_size = (5, 5)
    with pytest.raises(TypeError, match="field 'score' must have a length"):
        inst.score = 0.5


@pytest.mark.parametrize("index, expected", [
    (1, [1]), (-1, [2]), (slice(0, 2), [0, 1]),
    (torch.tensor([True, False, True]), [0, 2]), (torch.tensor([2, 0]), [2, 0]),
])
def test_indexing_indexes_every_field(index, expected):
    sub = _make(3)[index]
    assert sub.gt_classes.tolist() == expected
    assert sub.gt_boxes.tensor[:, 0].tolist() == [4 * i for i in expected]
    assert sub.names == [f"obj{i}" for i in expected]
    assert [p[0][0] for p in sub.gt_masks.polygons] == expected
    assert sub.image_size == (30, 40)


def test_index_out_of_range():
    with pytest.raises(IndexError):
        _make(3)[3]


def test_cat_concatenates_every_field():
    out = Instances.cat([_make(2), _make(0), _make(3, offset=10)])
    assert len(out) == 5
    assert out.gt_classes.tolist() == [0, 1, 10, 11, 12]
    assert isinstance(out.gt_boxes, Boxes) and len(out.gt_boxes) == 5
    assert out.names[2] == "obj10" and len(out.gt_masks) == 5
    with pytest.raises(ValueError, match="image sizes differ"):
        Instances.cat([_make(1), Instances((5, 5), **_make(1).get_fields())])


def test_to_moves_fields():
    inst = _make(2)
    out = inst.to("meta")  # a real move without a GPU: tensors and Boxes go, the rest stays
    assert out.gt_boxes.device.type == "meta" and out.gt_classes.device.type == "meta"
    assert inst.gt_boxes.device.type == "cpu"  # a new Instances; the original is unchanged
    assert out.names == ["obj0", "obj1"] and out.gt_masks is inst.gt_masks
    assert out.image_size == (30, 40) and "num_instances=2" in repr(out)


def test_pickle_and_deepcopy_roundtrip():
    """DataLoader workers pickle Instances; attribute lookup must not recurse on a bare object."""
    import copy
    import pickle

    inst = _make(2)
    for clone in (pickle.loads(pickle.dumps(inst)), copy.deepcopy(inst)):
        assert clone.image_size == (30, 40) and clone.gt_classes.tolist() == [0, 1]
        assert clone.gt_masks.polygons[1][0].tolist() == inst.gt_masks.polygons[1][0].tolist()
