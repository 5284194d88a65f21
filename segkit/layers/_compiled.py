"""The compiled ops of ``segkit._C`` (built from ``csrc/``): loading, autograd and fake kernels.

``segkit._C`` registers the ops ``torch.ops.segkit.*`` with ``TORCH_LIBRARY`` and their CPU
(and, when built with CUDA, CUDA) kernels. This module adds, with ``torch.library``:

* autograd formulas, so gradients flow through every pooling op (RoIAlign and its multi-level
  and multi-context forms are linear in the features, so their backward ops have a backward
  too and second derivatives work);
* fake (meta) kernels, so ``torch.compile`` and ``torch.export`` trace the ops without running
  them (NMS returns a data-dependent number of indices).

Nothing here is called directly by models: ``segkit.layers.ops`` routes its public functions
to these ops when :func:`available` is true, and to torchvision's otherwise.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor

__all__ = ["available", "load_error", "build_info", "supports"]

_C = None
_LOAD_ERROR: Optional[str] = None


def _major_minor(version: str) -> str:
    return ".".join(version.split("+")[0].split(".")[:2])


try:
    from segkit import _C  # noqa: F811  (the compiled extension)
except ImportError as e:  # not built, or built against another torch (undefined symbols)
    _LOAD_ERROR = f"import segkit._C failed: {e}"
else:
    _built_with = _C.build_info().get("torch_version", "unknown")
    if _major_minor(_built_with) != _major_minor(torch.__version__):
        _LOAD_ERROR = (f"segkit._C was built against torch {_built_with} but torch "
                       f"{torch.__version__} is running")
        _C = None


def available() -> bool:
    """Whether ``segkit._C`` loaded (and matches the running torch)."""
    return _C is not None


def load_error() -> Optional[str]:
    """Why ``segkit._C`` is not available (None when it is)."""
    return _LOAD_ERROR


def build_info() -> Dict[str, object]:
    """``{"torch_version", "devices", "parallel"}`` of the build; empty when not available."""
    return dict(_C.build_info()) if _C is not None else {}


_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}
_SUPPORTED: Dict[tuple, bool] = {}


def supports(device: torch.device, op: str) -> bool:
    """Whether ``segkit._C`` has a kernel of ``op`` for ``device``.

    CPU kernels exist for every op; CUDA kernels when the build had CUDA, except for ops that
    only have a CPU kernel (mask pasting), which then take the fallback on CUDA tensors.
    """
    key = (device.type, op)
    if key not in _SUPPORTED:
        dispatch_key = _DISPATCH_KEYS.get(device.type)
        _SUPPORTED[key] = bool(
            _C is not None and dispatch_key is not None
            and torch._C._dispatch_has_kernel_for_dispatch_key(f"segkit::{op}", dispatch_key))
    return _SUPPORTED[key]


def _format_of(t: Tensor) -> torch.memory_format:
    """The memory format the kernels keep: channels-last only when the tensor is exactly that."""
    if (t.dim() == 4 and t.shape[1] > 1 and t.is_contiguous(memory_format=torch.channels_last)
            and not t.is_contiguous()):
        return torch.channels_last
    return torch.contiguous_format


def _empty(like: Tensor, shape, memory_format=torch.contiguous_format, dtype=None) -> Tensor:
    """``like.new_empty(shape)`` in a given memory format (``new_empty`` has no such argument)."""
    return torch.empty(shape, dtype=dtype or like.dtype, device=like.device,
                       memory_format=memory_format)


def _register() -> None:
    """Autograd formulas and fake kernels of every op (called once, after ``segkit._C`` loads)."""
    ops = torch.ops.segkit
    lib = torch.library

    # -- roi_align --------------------------------------------------------------------------
    @lib.register_fake("segkit::roi_align")
    def _roi_align_fake(input, rois, spatial_scale, pooled_height, pooled_width,
                        sampling_ratio, aligned):
        torch._check(rois.dim() == 2 and rois.shape[1] == 5,
                     lambda: f"segkit::roi_align: rois must have shape (K, 5), got {tuple(rois.shape)}")
        return _empty(input, (rois.shape[0], input.shape[1], pooled_height, pooled_width),
                      _format_of(input))

    @lib.register_fake("segkit::_roi_align_backward")
    def _roi_align_backward_fake(grad, rois, spatial_scale, pooled_height, pooled_width,
                                 batch_size, channels, height, width, sampling_ratio, aligned):
        return _empty(grad, (batch_size, channels, height, width), _format_of(grad))

    def _roi_align_setup(ctx, inputs, output):
        input, rois, *args = inputs
        ctx.save_for_backward(rois)
        ctx.shape = tuple(input.shape)
        ctx.args = args  # spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned

    def _roi_align_bwd(ctx, grad):
        (rois,) = ctx.saved_tensors
        scale, ph, pw, sr, aligned = ctx.args
        gi = ops._roi_align_backward(grad, rois, scale, ph, pw, *ctx.shape, sr, aligned)
        return (gi, None) + (None,) * 5

    lib.register_autograd("segkit::roi_align", _roi_align_bwd, setup_context=_roi_align_setup)

    def _roi_align_backward_setup(ctx, inputs, output):
        grad, rois, scale, ph, pw, b, c, h, w, sr, aligned = inputs
        ctx.save_for_backward(rois)
        ctx.args = (scale, ph, pw, sr, aligned)

    def _roi_align_backward_bwd(ctx, gg):
        # the backward is linear in grad; its adjoint is RoIAlign itself
        (rois,) = ctx.saved_tensors
        scale, ph, pw, sr, aligned = ctx.args
        return (ops.roi_align(gg, rois, scale, ph, pw, sr, aligned),) + (None,) * 10

    lib.register_autograd("segkit::_roi_align_backward", _roi_align_backward_bwd,
                          setup_context=_roi_align_backward_setup)

    # -- multilevel_roi_align ---------------------------------------------------------------
    @lib.register_fake("segkit::multilevel_roi_align")
    def _multilevel_fake(features, rois, spatial_scales, pooled_height, pooled_width,
                         sampling_ratio, aligned, canonical_box_size, canonical_level):
        torch._check(len(features) == len(spatial_scales),
                     lambda: "segkit::multilevel_roi_align: one spatial scale per feature map")
        f = features[0]
        out = _empty(f, (rois.shape[0], f.shape[1], pooled_height, pooled_width), _format_of(f))
        return out, rois.new_empty((rois.shape[0],), dtype=torch.int64)

    @lib.register_fake("segkit::_multilevel_roi_align_backward")
    def _multilevel_backward_fake(grad, rois, levels, spatial_scales, pooled_height,
                                  pooled_width, batch_size, channels, heights, widths,
                                  sampling_ratio, aligned):
        fmt = _format_of(grad)
        return [_empty(grad, (batch_size, channels, h, w), fmt) for h, w in zip(heights, widths)]

    def _multilevel_setup(ctx, inputs, output):
        features, rois, scales, ph, pw, sr, aligned, _, _ = inputs
        ctx.save_for_backward(rois, output[1])
        ctx.sizes = ([f.shape[2] for f in features], [f.shape[3] for f in features])
        ctx.bc = tuple(features[0].shape[:2])
        ctx.args = (scales, ph, pw, sr, aligned)
        ctx.mark_non_differentiable(output[1])

    def _multilevel_bwd(ctx, grad, _grad_levels):
        rois, levels = ctx.saved_tensors
        scales, ph, pw, sr, aligned = ctx.args
        grads = ops._multilevel_roi_align_backward(grad, rois, levels, scales, ph, pw, *ctx.bc,
                                                   ctx.sizes[0], ctx.sizes[1], sr, aligned)
        return (list(grads),) + (None,) * 8

    lib.register_autograd("segkit::multilevel_roi_align", _multilevel_bwd,
                          setup_context=_multilevel_setup)

    # -- multicontext_roi_align -------------------------------------------------------------
    @lib.register_fake("segkit::multicontext_roi_align")
    def _multicontext_fake(input, rois, context_scales, spatial_scale, pooled_height,
                           pooled_width, sampling_ratio, aligned):
        return input.new_empty((rois.shape[0], len(context_scales), input.shape[1],
                                pooled_height, pooled_width))

    @lib.register_fake("segkit::_multicontext_roi_align_backward")
    def _multicontext_backward_fake(grad, rois, context_scales, spatial_scale, pooled_height,
                                    pooled_width, batch_size, channels, height, width,
                                    sampling_ratio, aligned):
        return grad.new_empty((batch_size, channels, height, width))

    def _multicontext_setup(ctx, inputs, output):
        input, rois, context_scales, *args = inputs
        ctx.save_for_backward(rois)
        ctx.shape = tuple(input.shape)
        ctx.args = (context_scales, *args)

    def _multicontext_bwd(ctx, grad):
        (rois,) = ctx.saved_tensors
        context_scales, scale, ph, pw, sr, aligned = ctx.args
        gi = ops._multicontext_roi_align_backward(grad.contiguous(), rois, context_scales, scale,
                                                  ph, pw, *ctx.shape, sr, aligned)
        return (gi,) + (None,) * 7

    lib.register_autograd("segkit::multicontext_roi_align", _multicontext_bwd,
                          setup_context=_multicontext_setup)

    # -- roi_pool ---------------------------------------------------------------------------
    @lib.register_fake("segkit::roi_pool")
    def _roi_pool_fake(input, rois, spatial_scale, pooled_height, pooled_width):
        shape = (rois.shape[0], input.shape[1], pooled_height, pooled_width)
        return input.new_empty(shape), input.new_empty(shape, dtype=torch.int64)

    @lib.register_fake("segkit::_roi_pool_backward")
    def _roi_pool_backward_fake(grad, rois, argmax, spatial_scale, pooled_height, pooled_width,
                                batch_size, channels, height, width):
        return grad.new_empty((batch_size, channels, height, width))

    def _roi_pool_setup(ctx, inputs, output):
        input, rois, scale, ph, pw = inputs
        ctx.save_for_backward(rois, output[1])
        ctx.shape = tuple(input.shape)
        ctx.args = (scale, ph, pw)
        ctx.mark_non_differentiable(output[1])

    def _roi_pool_bwd(ctx, grad, _grad_argmax):
        rois, argmax = ctx.saved_tensors
        scale, ph, pw = ctx.args
        gi = ops._roi_pool_backward(grad, rois, argmax, scale, ph, pw, *ctx.shape)
        return gi, None, None, None, None

    lib.register_autograd("segkit::roi_pool", _roi_pool_bwd, setup_context=_roi_pool_setup)

    # -- nms --------------------------------------------------------------------------------
    def _nms_fake(boxes, scores, *args):
        # the number of kept boxes depends on the data
        n = torch.library.get_ctx().new_dynamic_size()
        return boxes.new_empty((n,), dtype=torch.int64)

    lib.register_fake("segkit::nms", _nms_fake)
    lib.register_fake("segkit::batched_nms", _nms_fake)

    @lib.register_fake("segkit::paste_masks")
    def _paste_masks_fake(masks, boxes, height, width, threshold):
        return masks.new_empty((masks.shape[0], height, width), dtype=torch.bool)


if _C is not None:
    _register()


# -- the functions segkit.layers.ops dispatches to (torchvision.ops signatures) -------------

def roi_align(input: Tensor, rois: Tensor, output_size: Sequence[int], spatial_scale: float,
              sampling_ratio: int, aligned: bool) -> Tensor:
    return torch.ops.segkit.roi_align(input, rois, spatial_scale, output_size[0], output_size[1],
                                      sampling_ratio, aligned)


def roi_pool(input: Tensor, rois: Tensor, output_size: Sequence[int], spatial_scale: float) -> Tensor:
    return torch.ops.segkit.roi_pool(input, rois, spatial_scale, output_size[0], output_size[1])[0]


def multilevel_roi_align(features: List[Tensor], rois: Tensor, output_size: Sequence[int],
                         spatial_scales: Sequence[float], sampling_ratio: int, aligned: bool,
                         canonical_box_size: float, canonical_level: int) -> Tensor:
    return torch.ops.segkit.multilevel_roi_align(
        features, rois, list(spatial_scales), output_size[0], output_size[1], sampling_ratio,
        aligned, canonical_box_size, canonical_level)[0]


def multicontext_roi_align(input: Tensor, rois: Tensor, output_size: Sequence[int],
                           context_scales: Sequence[float], spatial_scale: float,
                           sampling_ratio: int, aligned: bool) -> Tensor:
    return torch.ops.segkit.multicontext_roi_align(
        input, rois, list(context_scales), spatial_scale, output_size[0], output_size[1],
        sampling_ratio, aligned)


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    return torch.ops.segkit.nms(boxes, scores, iou_threshold)


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    return torch.ops.segkit.batched_nms(boxes, scores, idxs, iou_threshold)


def paste_masks(masks: Tensor, boxes: Tensor, image_size: Sequence[int], threshold: float) -> Tensor:
    return torch.ops.segkit.paste_masks(masks, boxes, image_size[0], image_size[1], threshold)
