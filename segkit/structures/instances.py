"""``Instances``: per-image collection of equal-length fields (boxes, scores, masks, ...)."""
from __future__ import annotations

from typing import Any, Dict, Iterator, List, Tuple, Union

import torch
from torch import Tensor

__all__ = ["Instances"]


def _index_value(value: Any, item: Any) -> Any:
    """Index one field; plain lists accept bool/int64 tensors like tensors do."""
    if isinstance(value, list):
        if isinstance(item, slice):
            return value[item]
        idx = torch.as_tensor(item)
        if idx.dtype == torch.bool:
            idx = idx.nonzero().view(-1)
        return [value[i] for i in idx.view(-1).tolist()]
    return value[item]


class Instances:
    """Fields describing the N instances of one image, all of length N.

    Fields are read and written as attributes (``inst.gt_boxes = Boxes(...)``) or with
    ``set/get/has/remove``. A field can be any object with ``__len__`` and ``__getitem__``
    (Tensor (N, ...), ``Boxes``, ``BitMasks``, ``PolygonMasks``, list). Indexing an
    ``Instances`` indexes every field; ``Instances.cat`` concatenates per field.

    Args:
        image_size: (h, w) of the image the instances live in.
        **fields: initial fields.
    """

    def __init__(self, image_size: Tuple[int, int], **fields: Any):
        self._image_size = (int(image_size[0]), int(image_size[1]))
        self._fields: Dict[str, Any] = {}
        for name, value in fields.items():
            self.set(name, value)

    @property
    def image_size(self) -> Tuple[int, int]:
        """(h, w)."""
        return self._image_size

    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith("_"):
            super().__setattr__(name, value)
        elif hasattr(type(self), name):
            raise AttributeError(f"Instances: {name!r} is a read-only attribute/method, not a field name")
        else:
            self.set(name, value)

    def __getattr__(self, name: str) -> Any:
        # Only called when normal lookup fails, i.e. for fields.
        fields = self.__dict__.get("_fields")
        if fields is None or name not in fields:
            known = sorted(fields) if fields else []
            raise AttributeError(f"Instances has no field {name!r}; fields are {known}")
        return fields[name]

    def set(self, name: str, value: Any) -> None:
        """Set field ``name``; its length must match the existing fields."""
        try:
            n = len(value)
        except TypeError:
            raise TypeError(f"Instances: field {name!r} must have a length (Tensor, Boxes, masks, "
                            f"list), got {type(value).__name__}") from None
        # Replacing the only field may change the length; otherwise lengths must agree.
        others = [k for k in self._fields if k != name]
        if others:
            expected = len(self._fields[others[0]])
            if n != expected:
                raise ValueError(f"Instances: field {name!r} has length {n} but Instances has {expected}")
        self._fields[name] = value

    def get(self, name: str) -> Any:
        return getattr(self, name)

    def has(self, name: str) -> bool:
        return name in self._fields

    def remove(self, name: str) -> None:
        if name not in self._fields:
            raise KeyError(f"Instances.remove: no field {name!r}; fields are {sorted(self._fields)}")
        del self._fields[name]

    def get_fields(self) -> Dict[str, Any]:
        """The name -> value dict of fields (the live dict, not a copy)."""
        return self._fields

    def to(self, *args: Any, **kwargs: Any) -> "Instances":
        """New ``Instances`` with every field that has ``.to`` moved (device/dtype)."""
        out = Instances(self._image_size)
        for name, value in self._fields.items():
            if hasattr(value, "to"):
                value = value.to(*args, **kwargs)
            out.set(name, value)
        return out

    def __len__(self) -> int:
        """Number of instances; 0 while there are no fields."""
        for value in self._fields.values():
            return len(value)
        return 0

    def __getitem__(self, item: Union[int, slice, Tensor, List[int]]) -> "Instances":
        """Index every field: int (-> 1 instance), slice, bool mask (N,) or int64 indices."""
        if isinstance(item, int):
            n = len(self)
            if item >= n or item < -n:
                raise IndexError(f"Instances index {item} out of range for length {n}")
            item = slice(item, None, n)  # keeps a length-1 leading dimension in every field
        out = Instances(self._image_size)
        for name, value in self._fields.items():
            out.set(name, _index_value(value, item))
        return out

    def __iter__(self) -> Iterator:
        raise NotImplementedError("Instances is not iterable; index it or read its fields")

    @staticmethod
    def cat(instance_lists: List["Instances"]) -> "Instances":
        """Concatenate ``Instances`` of the same image size and field names."""
        if not instance_lists:
            raise ValueError("Instances.cat: got an empty list")
        if len(instance_lists) == 1:
            return instance_lists[0]
        first = instance_lists[0]
        for inst in instance_lists[1:]:
            if inst.image_size != first.image_size:
                raise ValueError(f"Instances.cat: image sizes differ: {first.image_size} vs {inst.image_size}")
            if set(inst._fields) != set(first._fields):
                raise ValueError(f"Instances.cat: fields differ: {sorted(first._fields)} vs "
                                 f"{sorted(inst._fields)}")
        out = Instances(first.image_size)
        for name, v0 in first._fields.items():
            values = [inst._fields[name] for inst in instance_lists]
            if isinstance(v0, Tensor):
                merged = torch.cat(values, dim=0)
            elif isinstance(v0, list):
                merged = [x for v in values for x in v]
            elif hasattr(type(v0), "cat"):
                merged = type(v0).cat(values)
            else:
                raise TypeError(f"Instances.cat: field {name!r} of type {type(v0).__name__} "
                                f"cannot be concatenated")
            out.set(name, merged)
        return out

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}: {type(v).__name__}" for k, v in self._fields.items())
        return (f"Instances(num_instances={len(self)}, image_height={self._image_size[0]}, "
                f"image_width={self._image_size[1]}, fields=[{fields}])")
