// RoI max pooling (Fast R-CNN, Girshick 2015, section 2.1) on CPU.
//
// Each RoI is snapped to the feature-map grid (its corners rounded after scaling), cut into a
// pooled_height x pooled_width grid of bins whose integer borders are floor / ceil of the exact
// bin edges, and every bin takes the maximum of its cells. The arithmetic follows
// torchvision.ops.roi_pool step by step, so float32 / float64 results (values, argmax and the
// gradient) equal torchvision's bit for bit:
//   * corners: round(x * spatial_scale) (half away from zero), computed in the input's type;
//   * a malformed RoI (end < start) still covers one cell: size = max(end - start + 1, 1);
//   * bins are clamped to the map; a bin left empty pools to 0 with argmax -1 (no gradient);
//   * the maximum is strict ('>') scanning rows then columns, so the first maximal cell wins,
//     and NaN cells never win.
// float16 / bfloat16 compute the geometry in float (at::opmath_type) and compare in float,
// which is exact for their values; the result equals the float32 op on the upcast tensors.
// Any input strides are read in place (NCHW, channels-last, views); output and argmax are
// contiguous NCHW. The backward pass is deterministic (see roi_pool_backward_impl).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "segkit_ops.h"

namespace segkit {
namespace {

constexpr const char* kForwardOp = "segkit::roi_pool";
constexpr const char* kBackwardOp = "segkit::_roi_pool_backward";

// Rounded RoI corners are clamped to +-2^40 before the integer conversion: any RoI that far
// off the map only has empty bins anyway, and the bound keeps every later int64 sum exact
// (torchvision converts to int32 and overflows there).
constexpr double kCoordLimit = 1099511627776.0;  // 2^40

// Batch index of every RoI, validated on the host: the index addresses the feature map, so a
// bad one would read (forward) or write (backward) out of bounds. It must be an integer in
// [0, batch_size); when `check_coords`, the four coordinates must be finite (a NaN corner has
// no grid cell to round to).
template <typename acc_t, typename scalar_t>
std::vector<int64_t> roi_batch_indices(const char* op, const scalar_t* rois, int64_t num_rois,
                                       int64_t batch_size, bool check_coords) {
  std::vector<int64_t> batch(num_rois);
  for (int64_t n = 0; n < num_rois; ++n) {
    const acc_t b = static_cast<acc_t>(rois[n * 5]);
    TORCH_CHECK(std::isfinite(b) && b == std::floor(b) && b >= 0 &&
                    b < static_cast<acc_t>(batch_size),
                op, ": rois[", n, ", 0] (batch index) is ", b, "; expected an integer in [0, ",
                batch_size, ")");
    batch[n] = static_cast<int64_t>(b);
    if (check_coords) {
      for (int k = 1; k < 5; ++k) {
        const acc_t v = static_cast<acc_t>(rois[n * 5 + k]);
        TORCH_CHECK(std::isfinite(v), op, ": rois[", n, ", ", k, "] is ", v,
                    "; RoI coordinates must be finite");
      }
    }
  }
  return batch;
}

// Integer bin borders of every RoI along one axis: bins [begin[n*P + p], end[n*P + p]) in
// feature-map cells, already clamped to [0, extent]. Rows and columns are independent, so each
// axis is computed once per RoI rather than once per bin.
template <typename acc_t, typename scalar_t>
void bin_borders(const scalar_t* rois, int64_t num_rois, int lo_col, int hi_col, acc_t scale,
                 int64_t pooled, int64_t extent, std::vector<int64_t>& begin,
                 std::vector<int64_t>& end) {
  begin.resize(num_rois * pooled);
  end.resize(num_rois * pooled);
  const acc_t limit = static_cast<acc_t>(kCoordLimit);
  for (int64_t n = 0; n < num_rois; ++n) {
    // The product is rounded in acc_t before std::round, as torchvision does in T.
    const acc_t lo_scaled = static_cast<acc_t>(rois[n * 5 + lo_col]) * scale;
    const acc_t hi_scaled = static_cast<acc_t>(rois[n * 5 + hi_col]) * scale;
    const int64_t start = static_cast<int64_t>(std::clamp(std::round(lo_scaled), -limit, limit));
    const int64_t stop = static_cast<int64_t>(std::clamp(std::round(hi_scaled), -limit, limit));
    // Both corners are inclusive cells; a RoI whose end precedes its start is forced to 1 cell.
    const int64_t size = std::max<int64_t>(stop - start + 1, 1);
    const acc_t bin = static_cast<acc_t>(size) / static_cast<acc_t>(pooled);
    for (int64_t p = 0; p < pooled; ++p) {
      const int64_t b = static_cast<int64_t>(std::floor(static_cast<acc_t>(p) * bin)) + start;
      const int64_t e = static_cast<int64_t>(std::ceil(static_cast<acc_t>(p + 1) * bin)) + start;
      begin[n * pooled + p] = std::clamp<int64_t>(b, 0, extent);
      end[n * pooled + p] = std::clamp<int64_t>(e, 0, extent);
    }
  }
}

// Start value of a non-empty bin's maximum: torchvision starts from -FLT_MAX in every type, so
// a bin whose cells are all -inf (or NaN) keeps -FLT_MAX (-inf once stored as float16) with
// argmax -1.
template <typename acc_t>
constexpr acc_t max_start() {
  return static_cast<acc_t>(-FLT_MAX);
}

// Max over one bin for a block of `count` channels whose values lie `channel_stride` elements
// apart: best[k] / best_idx[k] get channel k's maximum and the flat index h * W + w of the
// first cell holding it (strict '>' in row-major order; NaN never wins).
//
// The channel loop is innermost: each channel's running maximum is an independent, branch-free
// dependency chain, so the CPU overlaps them and the compiler vectorizes across channels
// (contiguous loads for channels-last, gathers for NCHW). Scanning one channel at a time
// instead mispredicts the "new maximum" branch about every other cell of these small windows,
// or serializes on one max chain when branch-free; both measured 2-3x slower.
template <bool kUnitChannelStride, typename scalar_t, typename acc_t>
inline void bin_max(const scalar_t* __restrict first_channel, int64_t channel_stride,
                    int64_t count, int64_t h0, int64_t h1, int64_t w0, int64_t w1, int64_t sh,
                    int64_t sw, int64_t width, acc_t* __restrict best,
                    int64_t* __restrict best_idx) {
  const int64_t stride = kUnitChannelStride ? 1 : channel_stride;
  for (int64_t k = 0; k < count; ++k) {
    best[k] = max_start<acc_t>();
    best_idx[k] = -1;
  }
  for (int64_t h = h0; h < h1; ++h) {
    for (int64_t w = w0; w < w1; ++w) {
      const scalar_t* cell = first_channel + h * sh + w * sw;
      const int64_t flat = h * width + w;
      for (int64_t k = 0; k < count; ++k) {
        const acc_t v = static_cast<acc_t>(cell[k * stride]);
        const bool greater = v > best[k];
        best_idx[k] = greater ? flat : best_idx[k];
        best[k] = greater ? v : best[k];
      }
    }
  }
}

template <typename scalar_t>
void roi_pool_forward_impl(const at::Tensor& input, const at::Tensor& rois, double spatial_scale,
                           int64_t pooled_h, int64_t pooled_w, at::Tensor& output,
                           at::Tensor& argmax) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t num_rois = rois.size(0);
  const int64_t channels = input.size(1);
  const int64_t height = input.size(2);
  const int64_t width = input.size(3);

  const at::Tensor rois_c = rois.contiguous();
  const scalar_t* rois_ptr = rois_c.const_data_ptr<scalar_t>();
  const std::vector<int64_t> batch =
      roi_batch_indices<acc_t>(kForwardOp, rois_ptr, num_rois, input.size(0), true);
  std::vector<int64_t> h_begin, h_end, w_begin, w_end;
  const acc_t scale = static_cast<acc_t>(spatial_scale);
  bin_borders<acc_t>(rois_ptr, num_rois, 2, 4, scale, pooled_h, height, h_begin, h_end);
  bin_borders<acc_t>(rois_ptr, num_rois, 1, 3, scale, pooled_w, width, w_begin, w_end);

  // The input is read in place through its strides (NCHW, channels-last or any view); unit
  // channel stride (channels-last) gets a contiguous-load specialization.
  const scalar_t* in = input.const_data_ptr<scalar_t>();
  const int64_t sb = input.stride(0), sc = input.stride(1), sh = input.stride(2),
                sw = input.stride(3);
  const bool unit_channel_stride = sc == 1;
  scalar_t* out = output.mutable_data_ptr<scalar_t>();
  int64_t* arg = argmax.mutable_data_ptr<int64_t>();
  const int64_t bins = pooled_h * pooled_w;

  // Work items are (RoI, block of channels): parallel even for a single RoI, and a block's
  // running maxima stay in L1.
  constexpr int64_t kChannelBlock = 64;
  const int64_t blocks = (channels + kChannelBlock - 1) / kChannelBlock;
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / (bins * kChannelBlock));
  at::parallel_for(0, num_rois * blocks, grain, [&](int64_t begin, int64_t end) {
    acc_t best[kChannelBlock];
    int64_t best_idx[kChannelBlock];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / blocks;
      const int64_t c0 = (item % blocks) * kChannelBlock;
      const int64_t nc = std::min(channels - c0, kChannelBlock);
      const scalar_t* image = in + batch[n] * sb + c0 * sc;
      scalar_t* out_roi = out + (n * channels + c0) * bins;
      int64_t* arg_roi = arg + (n * channels + c0) * bins;
      for (int64_t ph = 0; ph < pooled_h; ++ph) {
        const int64_t h0 = h_begin[n * pooled_h + ph], h1 = h_end[n * pooled_h + ph];
        for (int64_t pw = 0; pw < pooled_w; ++pw) {
          const int64_t w0 = w_begin[n * pooled_w + pw], w1 = w_end[n * pooled_w + pw];
          const int64_t bin = ph * pooled_w + pw;
          if (h1 <= h0 || w1 <= w0) {
            for (int64_t k = 0; k < nc; ++k) {  // an empty bin pools to 0, gradient nowhere
              out_roi[k * bins + bin] = static_cast<scalar_t>(0);
              arg_roi[k * bins + bin] = -1;
            }
            continue;
          }
          if (unit_channel_stride) {
            bin_max<true>(image, 1, nc, h0, h1, w0, w1, sh, sw, width, best, best_idx);
          } else {
            bin_max<false>(image, sc, nc, h0, h1, w0, w1, sh, sw, width, best, best_idx);
          }
          for (int64_t k = 0; k < nc; ++k) {
            out_roi[k * bins + bin] = static_cast<scalar_t>(best[k]);
            arg_roi[k * bins + bin] = best_idx[k];
          }
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> roi_pool_forward_cpu(const at::Tensor& input,
                                                        const at::Tensor& rois,
                                                        double spatial_scale, int64_t pooled_h,
                                                        int64_t pooled_w) {
  check_feature_and_rois(kForwardOp, input, rois);
  check_pooled_size(kForwardOp, pooled_h, pooled_w);
  TORCH_CHECK(input.is_cpu(), kForwardOp, ": the CPU kernel got input on ", input.device());
  TORCH_CHECK(std::isfinite(spatial_scale) && spatial_scale > 0, kForwardOp,
              ": spatial_scale must be positive and finite, got ", spatial_scale);

  // Output and argmax are contiguous NCHW whatever the input's memory format; argmax indexes
  // the (H, W) plane of the RoI's image and channel (h * W + w), -1 for an empty bin.
  const std::vector<int64_t> shape{rois.size(0), input.size(1), pooled_h, pooled_w};
  at::Tensor output = at::empty(shape, input.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor argmax = at::empty(shape, input.options().dtype(at::kLong)
                                           .memory_format(at::MemoryFormat::Contiguous));
  if (output.numel() == 0) {
    // Still validate the RoIs so a bad batch index fails the same way with zero channels.
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), kForwardOp, [&] {
      const at::Tensor rois_c = rois.contiguous();
      roi_batch_indices<at::opmath_type<scalar_t>>(kForwardOp, rois_c.const_data_ptr<scalar_t>(),
                                                   rois.size(0), input.size(0), true);
    });
    return {output, argmax};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), kForwardOp, [&] {
    roi_pool_forward_impl<scalar_t>(input, rois, spatial_scale, pooled_h, pooled_w, output,
                                    argmax);
  });
  return {output, argmax};
}

// Gradient of max pooling: each pooled value's gradient goes to the one input cell that won
// its bin (argmax); cells that won several bins (overlapping RoIs or bins) sum them.
//
// Deterministic without atomics: threads own disjoint channel ranges, and within a channel the
// contributions are summed in a fixed order (RoI, then bin row, then bin column), the order of
// torchvision's serial loop. The sum for a cell is therefore the same for any thread count and
// equal to torchvision's in float32 / float64. float16 / bfloat16 accumulate in float and round
// once at the end.
template <typename scalar_t>
at::Tensor roi_pool_backward_impl(const at::Tensor& grad, const at::Tensor& rois,
                                  const at::Tensor& argmax, int64_t batch_size, int64_t channels,
                                  int64_t height, int64_t width) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t num_rois = rois.size(0);
  const int64_t pooled_h = grad.size(2), pooled_w = grad.size(3);
  const at::Tensor rois_c = rois.contiguous();
  // Coordinates play no part in the backward pass; the batch index does (it picks the plane).
  const std::vector<int64_t> batch = roi_batch_indices<acc_t>(
      kBackwardOp, rois_c.const_data_ptr<scalar_t>(), num_rois, batch_size, false);

  constexpr bool reduced = !std::is_same_v<acc_t, scalar_t>;
  at::Tensor grad_input = at::zeros({batch_size, channels, height, width},
                                    grad.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  const at::Tensor argmax_c = argmax.contiguous();
  const int64_t* arg = argmax_c.const_data_ptr<int64_t>();
  const scalar_t* g = grad.const_data_ptr<scalar_t>();
  const int64_t gn = grad.stride(0), gc = grad.stride(1), gh = grad.stride(2), gw = grad.stride(3);
  acc_t* gi = grad_input.mutable_data_ptr<acc_t>();
  const int64_t plane = height * width;
  const int64_t bins = pooled_h * pooled_w;

  const int64_t grain =
      std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, num_rois * bins));
  // An argmax outside the plane (not produced by roi_pool) would write out of bounds: it is
  // skipped in the loop and reported after it, keeping the error path out of the hot loop.
  std::atomic<bool> bad_argmax{false};
  at::parallel_for(0, channels, grain, [&](int64_t c_begin, int64_t c_end) {
    bool bad = false;
    for (int64_t n = 0; n < num_rois; ++n) {
      for (int64_t c = c_begin; c < c_end; ++c) {
        acc_t* target = gi + (batch[n] * channels + c) * plane;
        const int64_t* arg_bins = arg + (n * channels + c) * bins;
        const scalar_t* g_bins = g + n * gn + c * gc;
        for (int64_t ph = 0; ph < pooled_h; ++ph) {
          for (int64_t pw = 0; pw < pooled_w; ++pw) {
            const int64_t a = arg_bins[ph * pooled_w + pw];
            if (static_cast<uint64_t>(a) < static_cast<uint64_t>(plane)) {
              target[a] += static_cast<acc_t>(g_bins[ph * gh + pw * gw]);
            } else {
              bad |= a != -1;  // -1: an empty bin, nothing was pooled
            }
          }
        }
      }
    }
    if (bad) bad_argmax = true;
  });
  if (bad_argmax) {
    for (int64_t i = 0; i < argmax_c.numel(); ++i) {
      TORCH_CHECK(arg[i] >= -1 && arg[i] < plane, kBackwardOp, ": argmax[",
                  i / (channels * bins), ", ", (i / bins) % channels, ", ",
                  (i % bins) / pooled_w, ", ", i % pooled_w, "] = ", arg[i],
                  " is outside the ", height, "x", width, " input plane");
    }
  }
  if constexpr (reduced) {
    return grad_input.to(grad.scalar_type());
  } else {
    return grad_input;
  }
}

at::Tensor roi_pool_backward_cpu(const at::Tensor& grad, const at::Tensor& rois,
                                 const at::Tensor& argmax, double spatial_scale, int64_t pooled_h,
                                 int64_t pooled_w, int64_t batch_size, int64_t channels,
                                 int64_t height, int64_t width) {
  (void)spatial_scale;  // the winning cells are already recorded in argmax
  check_pooled_grad(kBackwardOp, grad, rois, pooled_h, pooled_w, batch_size, channels);
  check_pool_argmax(kBackwardOp, argmax, grad);
  TORCH_CHECK(height >= 0 && width >= 0, kBackwardOp, ": height and width must be >= 0, got (",
              height, ", ", width, ")");
  TORCH_CHECK(grad.is_cpu(), kBackwardOp, ": the CPU kernel got grad on ", grad.device());

  at::Tensor result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), kBackwardOp, [&] {
    result = roi_pool_backward_impl<scalar_t>(grad, rois, argmax, batch_size, channels, height,
                                              width);
  });
  return result;
}

}  // namespace
}  // namespace segkit

TORCH_LIBRARY_IMPL(segkit, CPU, m) {
  m.impl("roi_pool", &segkit::roi_pool_forward_cpu);
  m.impl("_roi_pool_backward", &segkit::roi_pool_backward_cpu);
}
