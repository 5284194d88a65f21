// RoIPool (Fast R-CNN, Girshick 2015, section 2.1) on CUDA: each RoI is snapped to the feature
// grid and split into PH x PW integer sub-windows, each max-pooled. Semantics and arithmetic
// follow torchvision.ops.roi_pool: corners rounded to the nearest cell, RoIs forced to at
// least 1x1, bins [floor(p * bin), ceil((p + 1) * bin)) clipped to the map, empty bins give 0
// with argmax -1. Max pooling only copies input values, so half/bfloat16 outputs are exact;
// bin geometry is computed in float (at::acc_type).
//
// Backward routes each output gradient to its argmax cell with an atomic add (several bins
// and RoIs can share a cell), so it is not bitwise deterministic run to run; half/bfloat16
// gradients are accumulated in a float32 buffer and cast once.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <cfloat>
#include <tuple>

#include "cuda_helpers.cuh"
#include "segkit_ops.h"

namespace segkit {
namespace cuda {
namespace {

template <typename scalar_t>
struct RoiPoolForward {
  using acc_t = at::acc_type<scalar_t, true>;
  const scalar_t* input;
  int64_t B, C, H, W;
  Strides4 in;
  const scalar_t* rois;
  acc_t spatial_scale;
  int64_t PH, PW;
  bool channels_last;
  scalar_t* out;
  int64_t* argmax;

  C10_HOST_DEVICE void operator()(int64_t index) const {
    int64_t n, c, ph, pw;
    unravel(channels_last, index, C, PH, PW, n, c, ph, pw);
    const scalar_t* roi = rois + n * 5;
    const int64_t b = roi_batch_index(static_cast<acc_t>(roi[0]), B);
    const acc_t x1 = static_cast<acc_t>(roi[1]);
    const acc_t y1 = static_cast<acc_t>(roi[2]);
    const acc_t x2 = static_cast<acc_t>(roi[3]);
    const acc_t y2 = static_cast<acc_t>(roi[4]);
    acc_t best = 0;  // value of an empty bin (or of an invalid RoI)
    int64_t best_idx = -1;
    if (b >= 0 && all_finite(x1, y1, x2, y2)) {
      const int64_t start_w = static_cast<int64_t>(std::round(x1 * spatial_scale));
      const int64_t start_h = static_cast<int64_t>(std::round(y1 * spatial_scale));
      const int64_t end_w = static_cast<int64_t>(std::round(x2 * spatial_scale));
      const int64_t end_h = static_cast<int64_t>(std::round(y2 * spatial_scale));
      // Inclusive integer corners, so a one-cell RoI has width 1; malformed RoIs become 1x1.
      const int64_t roi_w = imax(end_w - start_w + 1, int64_t(1));
      const int64_t roi_h = imax(end_h - start_h + 1, int64_t(1));
      const acc_t bin_h = static_cast<acc_t>(roi_h) / static_cast<acc_t>(PH);
      const acc_t bin_w = static_cast<acc_t>(roi_w) / static_cast<acc_t>(PW);
      int64_t hstart = static_cast<int64_t>(std::floor(static_cast<acc_t>(ph) * bin_h));
      int64_t wstart = static_cast<int64_t>(std::floor(static_cast<acc_t>(pw) * bin_w));
      int64_t hend = static_cast<int64_t>(std::ceil(static_cast<acc_t>(ph + 1) * bin_h));
      int64_t wend = static_cast<int64_t>(std::ceil(static_cast<acc_t>(pw + 1) * bin_w));
      hstart = imin(imax(hstart + start_h, int64_t(0)), H);
      hend = imin(imax(hend + start_h, int64_t(0)), H);
      wstart = imin(imax(wstart + start_w, int64_t(0)), W);
      wend = imin(imax(wend + start_w, int64_t(0)), W);
      if (hend > hstart && wend > wstart) {
        // -FLT_MAX (not -inf) as torchvision: a bin of only NaN/-inf keeps it, with argmax -1.
        best = static_cast<acc_t>(-FLT_MAX);
        const scalar_t* plane = input + b * in.n + c * in.c;
        for (int64_t h = hstart; h < hend; ++h) {
          for (int64_t w = wstart; w < wend; ++w) {
            const acc_t v = static_cast<acc_t>(plane[h * in.h + w * in.w]);
            if (v > best) {  // strict: the first maximum in row-major order wins ties
              best = v;
              best_idx = h * W + w;
            }
          }
        }
      }
    }
    out[index] = static_cast<scalar_t>(best);
    argmax[index] = best_idx;
  }
};

// One call per element of grad (walked in grad's memory order): the gradient goes to the cell
// the forward max came from.
template <typename scalar_t>
struct RoiPoolBackward {
  using acc_t = at::acc_type<scalar_t, true>;
  const scalar_t* grad;
  Strides4 gs;
  const int64_t* argmax;
  Strides4 as;
  int64_t C, PH, PW;
  bool channels_last;
  const scalar_t* rois;
  acc_t* grad_input;
  int64_t B, H, W;
  Strides4 gis;

  C10_HOST_DEVICE void operator()(int64_t index) const {
    int64_t n, c, ph, pw;
    unravel(channels_last, index, C, PH, PW, n, c, ph, pw);
    const int64_t a = argmax[n * as.n + c * as.c + ph * as.h + pw * as.w];
    if (a < 0 || a >= H * W) return;  // empty bin; a corrupt argmax never writes out of bounds
    const int64_t b = roi_batch_index(static_cast<acc_t>(rois[n * 5]), B);
    if (b < 0) return;
    const acc_t go = static_cast<acc_t>(grad[n * gs.n + c * gs.c + ph * gs.h + pw * gs.w]);
    atomic_add(grad_input + b * gis.n + c * gis.c + (a / W) * gis.h + (a % W) * gis.w, go);
  }
};

std::tuple<at::Tensor, at::Tensor> roi_pool_forward_cuda(const at::Tensor& input,
                                                         const at::Tensor& rois,
                                                         double spatial_scale,
                                                         int64_t pooled_height,
                                                         int64_t pooled_width) {
  constexpr const char* op = "segkit::roi_pool";
  check_feature_and_rois(op, input, rois);
  check_pooled_size(op, pooled_height, pooled_width);
  check_device(op, input, "input");
  DeviceGuard guard(input.device());

  const int64_t K = rois.size(0), B = input.size(0), C = input.size(1), H = input.size(2),
                W = input.size(3);
  const at::MemoryFormat fmt = format_of(input);
  at::Tensor out = at::empty({K, C, pooled_height, pooled_width},
                             input.options().memory_format(fmt));
  at::Tensor argmax = at::empty({K, C, pooled_height, pooled_width},
                                input.options().dtype(at::kLong).memory_format(fmt));
  if (out.numel() == 0) return {out, argmax};
  if (input.numel() == 0) {  // B, H or W is 0: every bin is empty
    out.zero_();
    argmax.fill_(-1);
    return {out, argmax};
  }
  const at::Tensor in = input.contiguous(fmt);
  const at::Tensor r = rois.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, input.scalar_type(), "segkit_roi_pool_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    RoiPoolForward<scalar_t> f{in.const_data_ptr<scalar_t>(), B, C, H, W, strides_of(in),
                               r.const_data_ptr<scalar_t>(), static_cast<acc_t>(spatial_scale),
                               pooled_height, pooled_width, fmt == at::MemoryFormat::ChannelsLast,
                               out.mutable_data_ptr<scalar_t>(),
                               argmax.mutable_data_ptr<int64_t>()};
    for_each(out.numel(), f, current_stream());
  });
  return {out, argmax};
}

at::Tensor roi_pool_backward_cuda(const at::Tensor& grad, const at::Tensor& rois,
                                  const at::Tensor& argmax, double /*spatial_scale*/,
                                  int64_t pooled_height, int64_t pooled_width, int64_t batch_size,
                                  int64_t channels, int64_t height, int64_t width) {
  // spatial_scale is part of the schema for symmetry with roi_align; argmax already encodes
  // where every bin's maximum came from.
  constexpr const char* op = "segkit::_roi_pool_backward";
  check_pooled_grad(op, grad, rois, pooled_height, pooled_width, batch_size, channels);
  check_pool_argmax(op, argmax, grad);
  TORCH_CHECK(height >= 0 && width >= 0, op, ": height and width must be >= 0");
  check_device(op, grad, "grad");
  alert_not_deterministic("segkit::_roi_pool_backward (CUDA)");
  DeviceGuard guard(grad.device());

  const at::MemoryFormat fmt = format_of(grad);
  at::Tensor grad_acc = zeroed_grad_accumulator(grad, batch_size, channels, height, width);
  if (grad.numel() > 0 && grad_acc.numel() > 0) {
    const at::Tensor r = rois.contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, grad.scalar_type(), "segkit_roi_pool_backward_cuda", [&] {
      using acc_t = at::acc_type<scalar_t, true>;
      RoiPoolBackward<scalar_t> f{grad.const_data_ptr<scalar_t>(), strides_of(grad),
                                  argmax.const_data_ptr<int64_t>(), strides_of(argmax), channels,
                                  pooled_height, pooled_width,
                                  fmt == at::MemoryFormat::ChannelsLast,
                                  r.const_data_ptr<scalar_t>(), grad_acc.mutable_data_ptr<acc_t>(),
                                  batch_size, height, width, strides_of(grad_acc)};
      for_each(grad.numel(), f, current_stream());
    });
  }
  return finish_grad(grad_acc, grad);
}

}  // namespace
}  // namespace cuda
}  // namespace segkit

TORCH_LIBRARY_IMPL(segkit, SEGKIT_DISPATCH_KEY, m) {
  m.impl("roi_pool", &segkit::cuda::roi_pool_forward_cuda);
  m.impl("_roi_pool_backward", &segkit::cuda::roi_pool_backward_cuda);
}
