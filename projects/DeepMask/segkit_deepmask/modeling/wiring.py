"""Build-time wiring of the DeepMask / SharpMask meta-architecture: the heads get their input
sizes from the trunk (and the shared head) built before them."""
from __future__ import annotations

from typing import Dict

from segkit.registry import BACKBONES, HEADS, LOSSES, Child

__all__ = ["DEFAULT_IN_FEATURE", "DEFAULT_WINDOW", "meta_arch_children"]

DEFAULT_IN_FEATURE = "res4"  # the trunk feature the heads read (ResNet res4, stride 16)
DEFAULT_WINDOW = 160  # window side W of DeepMask-ours / SharpMask (papers.md 2.1)


def _head_inputs(built: dict, kwargs: dict, runtime: dict) -> dict:
    """Build-time arguments of the heads, from the trunk and the shared head built before
    them: a head takes those of these names that its constructor accepts.

    ``in_channels`` and ``feature_size`` describe the window's feature map (channels of
    ``in_feature``, side = window / stride: 10 for a 160 window at stride 16), ``in_dim`` the
    shared vector, ``input_shape`` every trunk feature (for the refinement's skips). So the
    heads follow the trunk: a ResNet-18 trunk gives head C 256 input channels.
    """
    in_feature = kwargs.get("in_feature", DEFAULT_IN_FEATURE)
    window = kwargs.get("window_size", DEFAULT_WINDOW)
    shapes = built["backbone"].output_shape()
    if in_feature not in shapes:
        raise ValueError(f"deepmask: in_feature '{in_feature}' is not a trunk feature; the "
                         f"trunk returns {sorted(shapes)}")
    spec = shapes[in_feature]
    if window % spec.stride:
        raise ValueError(f"deepmask: window_size {window} is not a multiple of the stride "
                         f"{spec.stride} of '{in_feature}'")
    out = {"input_shape": shapes, "in_channels": spec.channels,
           "feature_size": window // spec.stride}
    if built.get("shared_head") is not None:
        out["in_dim"] = built["shared_head"].out_dim
    return out


def meta_arch_children(refinement_optional: bool) -> Dict[str, Child]:
    """The ``children`` of the ``deepmask`` / ``sharpmask`` registry entries (the refinement
    is optional for the first, required for the second)."""
    head = Child(HEADS, runtime=_head_inputs)
    return {"backbone": Child(BACKBONES),
            "shared_head": Child(HEADS, runtime=_head_inputs, optional=True),
            "mask_head": head, "score_head": head,
            "refinement": Child(HEADS, runtime=_head_inputs, optional=refinement_optional),
            "mask_loss": Child(LOSSES), "score_loss": Child(LOSSES)}
