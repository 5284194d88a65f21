"""Anchor boxes tiled over every feature-map location of every pyramid level.

FPN section 5 uses one anchor size per level (32^2 ... 512^2 on P2-P6) and three aspect
ratios {1:2, 1:1, 2:1}; RetinaNet (section 6) uses 3 sizes x 3 ratios per level. Anchors of
one level are ordered (H, W, A): row-major over locations, then the A anchors of a location,
which is the order in which the heads' (N, A*C, H, W) outputs are flattened.
"""
from __future__ import annotations

from typing import Any, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

__all__ = ["DefaultAnchorGenerator", "flatten_anchor_outputs", "shared_head_anchors"]


def _broadcast_levels(values: Sequence, num_levels: int, name: str) -> List[List[float]]:
    """``[[a, b]]`` -> same list for every level; ``[[a], [b], ...]`` must have one per level."""
    values = [list(v) if isinstance(v, (list, tuple)) else [v] for v in values]
    if len(values) == 1:
        return values * num_levels
    if len(values) != num_levels:
        raise ValueError(
            f"DefaultAnchorGenerator: {name} has {len(values)} entries but there are {num_levels} "
            f"levels; give one list per level or a single list shared by all"
        )
    return values


class DefaultAnchorGenerator(nn.Module):
    """Generates per-level anchors (XYXY absolute pixels) for a batch of feature maps.

    The cell anchors of a level are all (ratio, size) pairs, ratio-major then size (the
    torchvision order; identical to Detectron's when a level has a single size), centred on 0:
    for size s and ratio r = h / w, ``w = s / sqrt(r)``, ``h = s * sqrt(r)``, so the area is s^2.
    The anchor of location (y, x) is the cell anchor shifted by
    ``((x + offset) * stride, (y + offset) * stride)``.

    Args:
        sizes: anchor sizes (sqrt of the area, in input pixels) per level, e.g.
            ``[[32], [64], [128], [256], [512]]``; a single list is shared by all levels.
        aspect_ratios: height / width ratios per level, or a single list shared by all levels.
        strides: stride of each level in input pixels (e.g. ``[4, 8, 16, 32, 64]``). None
            derives every level's stride from the padded image size as
            ``image_size // feature_size`` per axis, which is what torchvision does; it differs
            from the nominal stride on levels whose size was rounded up (a 160-px image gives
            a 3-px P6 and stride 53, not 64).
        offset: location of the anchor centre inside a cell, in [0, 1); 0.0 puts it at the
            cell's top-left corner (torchvision and Detectron), 0.5 at the cell centre.
        round_base: round the cell anchors' coordinates to integers, as torchvision does
            (``round([-w, -h, w, h] / 2)``); needed to reproduce torchvision exactly.
        num_levels: number of pyramid levels; None = ``len(strides)``, or ``len(sizes)`` when
            ``strides`` is None. Needed to share one size list across levels of inferred stride.
    """

    def __init__(self, sizes: Sequence[Sequence[float]], aspect_ratios: Sequence[Sequence[float]],
                 strides: Optional[Sequence[int]] = None, offset: float = 0.0,
                 round_base: bool = False, num_levels: Optional[int] = None):
        super().__init__()
        if not 0.0 <= offset < 1.0:
            raise ValueError(f"DefaultAnchorGenerator: offset must be in [0, 1), got {offset}")
        if num_levels is None:
            num_levels = len(strides) if strides is not None else len(sizes)
        elif strides is not None and len(strides) != num_levels:
            raise ValueError(f"DefaultAnchorGenerator: {len(strides)} strides for num_levels="
                             f"{num_levels}")
        self.sizes = _broadcast_levels(sizes, num_levels, "sizes")
        self.aspect_ratios = _broadcast_levels(aspect_ratios, num_levels, "aspect_ratios")
        self.strides = None if strides is None else [int(s) for s in strides]
        self.offset = float(offset)
        self.round_base = bool(round_base)
        self.num_levels = num_levels
        cells = [self._cell_anchors(s, r) for s, r in zip(self.sizes, self.aspect_ratios)]
        # Non-persistent buffers: they follow .to(device) but stay out of checkpoints.
        for i, cell in enumerate(cells):
            self.register_buffer(f"cell_anchors_{i}", cell, persistent=False)

    def _cell_anchors(self, sizes: List[float], ratios: List[float]) -> Tensor:
        """(A, 4) zero-centred XYXY anchors of one level, A = len(ratios) * len(sizes)."""
        for value in list(sizes) + list(ratios):
            if not value > 0:
                raise ValueError(f"DefaultAnchorGenerator: sizes and aspect ratios must be > 0, "
                                 f"got sizes={sizes} aspect_ratios={ratios}")
        size_t = torch.as_tensor(sizes, dtype=torch.float32)
        h_ratios = torch.sqrt(torch.as_tensor(ratios, dtype=torch.float32))
        w_ratios = 1 / h_ratios  # same arithmetic as torchvision, so unrounded anchors match too
        ws = (w_ratios[:, None] * size_t[None, :]).reshape(-1)
        hs = (h_ratios[:, None] * size_t[None, :]).reshape(-1)
        cell = torch.stack([-ws, -hs, ws, hs], dim=1) / 2
        return cell.round() if self.round_base else cell

    @property
    def cell_anchors(self) -> List[Tensor]:
        """Per level, (A, 4) zero-centred anchors."""
        return [getattr(self, f"cell_anchors_{i}") for i in range(self.num_levels)]

    @property
    def num_anchors_per_location(self) -> List[int]:
        """A for every level."""
        return [len(s) * len(r) for s, r in zip(self.sizes, self.aspect_ratios)]

    def _level_strides(self, grid_sizes: List[Tuple[int, int]],
                       image_size: Optional[Tuple[int, int]]) -> List[Tuple[int, int]]:
        if self.strides is not None:
            return [(s, s) for s in self.strides]
        if image_size is None:
            raise ValueError("DefaultAnchorGenerator: strides=None infers strides from the "
                             "image, so forward() needs image_size (padded H, W)")
        return [(int(image_size[0]) // h, int(image_size[1]) // w) for h, w in grid_sizes]

    def forward(self, features: Sequence[Tensor],
                image_size: Optional[Tuple[int, int]] = None) -> List[Tensor]:
        """Anchors for each level (shared by all images of the batch).

        Args:
            features: per level a (N, C, H_l, W_l) feature map; only shape/device are used.
            image_size: padded input size (H, W) of the batch (``ImageList.tensor.shape[-2:]``);
                required only when ``strides`` is None.

        Returns:
            Per level, a (H_l * W_l * A_l, 4) float32 tensor of XYXY anchors in (H, W, A) order.
        """
        if len(features) != self.num_levels:
            raise ValueError(f"DefaultAnchorGenerator: built for {self.num_levels} levels, got "
                             f"{len(features)} feature maps")
        grid_sizes = [(int(f.shape[-2]), int(f.shape[-1])) for f in features]
        strides = self._level_strides(grid_sizes, image_size)
        anchors = []
        for (grid_h, grid_w), (stride_y, stride_x), cell in zip(grid_sizes, strides,
                                                              self.cell_anchors):
            device = features[0].device
            shift_x = (torch.arange(grid_w, dtype=torch.float32, device=device)
                       + self.offset) * stride_x
            shift_y = (torch.arange(grid_h, dtype=torch.float32, device=device)
                       + self.offset) * stride_y
            shift_y, shift_x = torch.meshgrid(shift_y, shift_x, indexing="ij")
            shift_x, shift_y = shift_x.reshape(-1), shift_y.reshape(-1)
            shifts = torch.stack((shift_x, shift_y, shift_x, shift_y), dim=1)
            anchors.append((shifts[:, None, :] + cell.to(device)[None, :, :]).reshape(-1, 4))
        return anchors

    def extra_repr(self) -> str:
        return (f"sizes={self.sizes}, aspect_ratios={self.aspect_ratios}, strides={self.strides}, "
                f"offset={self.offset}, round_base={self.round_base}")


def shared_head_anchors(owner: str, input_shape: Mapping[str, Any], in_features: Sequence[str],
                        sizes: Sequence[Sequence[float]], aspect_ratios: Sequence[Sequence[float]],
                        offset: float = 0.0, round_base: bool = False,
                        stride_from_image: bool = False
                        ) -> Tuple[DefaultAnchorGenerator, int, int]:
    """Check the levels of a head shared across the pyramid (RPN, RetinaNet) and build its anchors.

    A shared head needs every level in the backbone's outputs, one channel count for all of them
    and the same number of anchors per location on each.

    Args:
        owner: the head's registry name, for error messages ("rpn", "retinanet").
        input_shape: backbone ``output_shape()``: name -> ``ShapeSpec``.
        in_features: the levels the head runs on, finest first.
        sizes: anchor sizes per level (or one list shared by all levels).
        aspect_ratios, offset, round_base: as :class:`DefaultAnchorGenerator`.
        stride_from_image: take strides from the image/feature sizes at run time
            (torchvision) instead of the backbone's nominal strides.

    Returns:
        (anchor generator, input channels, anchors per location).
    """
    in_features = list(in_features)
    missing = [f for f in in_features if f not in input_shape]
    if missing or not in_features:
        raise ValueError(f"{owner}: in_features {in_features} must be non-empty and present in "
                         f"the backbone outputs {sorted(input_shape)}")
    channels = {f: input_shape[f].channels for f in in_features}
    if len(set(channels.values())) != 1:
        raise ValueError(f"{owner}: the head is shared across levels, so in_features must have "
                         f"equal channels; got {channels}")
    if len(sizes) not in (1, len(in_features)):
        raise ValueError(f"{owner}: anchor_sizes has {len(sizes)} levels but in_features "
                         f"{in_features} has {len(in_features)}; give one list per level "
                         f"(or a single list shared by all)")
    strides = None if stride_from_image else [input_shape[f].stride for f in in_features]
    generator = DefaultAnchorGenerator(sizes, aspect_ratios, strides=strides, offset=offset,
                                       round_base=round_base, num_levels=len(in_features))
    num_anchors = generator.num_anchors_per_location
    if len(set(num_anchors)) != 1:
        raise ValueError(f"{owner}: every level needs the same number of anchors per location "
                         f"for the shared head; got {num_anchors}")
    return generator, channels[in_features[0]], num_anchors[0]


def flatten_anchor_outputs(x: Tensor, k: int) -> Tensor:
    """A dense head's (N, A*k, H, W) output -> (N, H*W*A, k), in the anchors' (H, W, A) order."""
    n, _, h, w = x.shape
    return x.view(n, -1, k, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, k)
