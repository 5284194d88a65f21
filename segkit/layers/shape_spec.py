"""``ShapeSpec``: the shape of a feature map passed between modules at build time."""
from __future__ import annotations

from typing import NamedTuple, Optional

__all__ = ["ShapeSpec"]


class ShapeSpec(NamedTuple):
    """Static description of a feature map, so a module can size itself before any forward.

    Attributes:
        channels: number of channels C.
        stride: total stride of the map relative to the input image (e.g. 4 for ``res2``/``p2``).
        height: spatial height if known, else None.
        width: spatial width if known, else None.
    """

    channels: int
    stride: int
    height: Optional[int] = None
    width: Optional[int] = None
