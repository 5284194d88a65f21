// RoIAlign (Mask R-CNN, He et al. 2017, section 3) on CUDA: the single-map op and the fused
// multi-level op that pools every RoI from its FPN level (FPN, Lin et al. 2017, Eq. 1) in one
// launch instead of one launch per level.
//
// Semantics are torchvision.ops.roi_align's, number for number in float32/float64: the same
// sample positions, bilinear rule and bin averaging, with the arithmetic in the same order.
// float16/bfloat16 maps are read and written in their own dtype but every coordinate, weight
// and sum is a float (at::acc_type), so half results are closer to the float32 ones than
// torchvision's, which computes in half.
//
// Backward scatters with atomic adds, so its result is NOT bitwise deterministic from run to
// run (the order of floating-point additions varies); it is deterministic up to rounding. For
// half and bfloat16 the scatter goes into a float32 buffer that is cast once at the end.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "cuda_helpers.cuh"
#include "segkit_ops.h"

namespace segkit {
namespace cuda {
namespace {

// Sampling grid of one RoI on one feature map.
template <typename acc_t>
struct RoiGrid {
  acc_t start_h, start_w;  // RoI corner in feature-map coordinates (continuous, unquantised)
  acc_t bin_h, bin_w;      // size of one output bin
  int grid_h, grid_w;      // sample points per bin along each axis
};

// Mask R-CNN section 3: the RoI and its bins keep real-valued coordinates (no rounding, unlike
// RoIPool); each bin is the average of grid_h x grid_w bilinear samples at sub-cell centres.
// `aligned` shifts by half a pixel so that the continuous box [x1, x2) covers the pixel centres
// it contains (Detectron2's correction); without it, degenerate RoIs are widened to 1x1 as in
// the original implementation. Returns false for RoIs with non-finite geometry: they pool to
// zero (a NaN or infinite coordinate would otherwise give an unbounded sampling grid).
template <typename scalar_t, typename acc_t>
C10_HOST_DEVICE inline bool make_roi_grid(const scalar_t* roi, acc_t spatial_scale,
                                          int64_t pooled_h, int64_t pooled_w,
                                          int64_t sampling_ratio, bool aligned,
                                          RoiGrid<acc_t>& g) {
  const acc_t x1 = static_cast<acc_t>(roi[1]);
  const acc_t y1 = static_cast<acc_t>(roi[2]);
  const acc_t x2 = static_cast<acc_t>(roi[3]);
  const acc_t y2 = static_cast<acc_t>(roi[4]);
  if (!all_finite(x1, y1, x2, y2)) return false;
  const acc_t offset = aligned ? acc_t(0.5) : acc_t(0);
  g.start_w = x1 * spatial_scale - offset;
  g.start_h = y1 * spatial_scale - offset;
  acc_t roi_w = (x2 * spatial_scale - offset) - g.start_w;
  acc_t roi_h = (y2 * spatial_scale - offset) - g.start_h;
  if (!aligned) {
    roi_w = std::fmax(roi_w, acc_t(1));
    roi_h = std::fmax(roi_h, acc_t(1));
  }
  g.bin_h = roi_h / static_cast<acc_t>(pooled_h);
  g.bin_w = roi_w / static_cast<acc_t>(pooled_w);
  if (!all_finite(g.start_h, g.start_w, g.bin_h, g.bin_w)) return false;  // scale overflowed
  // Adaptive sampling: about one sample per feature cell, ceil(bin size) along each axis.
  g.grid_h = sampling_ratio > 0 ? static_cast<int>(sampling_ratio)
                                : static_cast<int>(std::ceil(roi_h / static_cast<acc_t>(pooled_h)));
  g.grid_w = sampling_ratio > 0 ? static_cast<int>(sampling_ratio)
                                : static_cast<int>(std::ceil(roi_w / static_cast<acc_t>(pooled_w)));
  return true;
}

// y (resp. x) of sample `i` of bin `p`: the centre of the i-th of `grid` equal sub-cells. The
// expression keeps torchvision's operation order so float32 positions are bit-identical.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t sample_pos(acc_t start, int64_t p, acc_t bin, int i, int grid) {
  return start + static_cast<acc_t>(p) * bin +
         static_cast<acc_t>(i + .5f) * bin / static_cast<acc_t>(grid);
}

// The four bilinear taps of the point (y, x) on an H x W plane addressed with strides (sh, sw).
template <typename acc_t>
struct Taps {
  int64_t o1, o2, o3, o4;  // element offsets of (y0,x0) (y0,x1) (y1,x0) (y1,x1)
  acc_t w1, w2, w3, w4;
};

// A point more than one pixel outside the map contributes nothing; one within a pixel of the
// border is clamped onto it (the border value extends outward). Written as !(inside) so that
// NaN positions also take the "nothing" branch. Requires H, W >= 1.
template <typename acc_t>
C10_HOST_DEVICE inline bool bilinear_taps(int64_t H, int64_t W, int64_t sh, int64_t sw, acc_t y,
                                          acc_t x, Taps<acc_t>& t) {
  if (!(y >= acc_t(-1) && y <= static_cast<acc_t>(H) && x >= acc_t(-1) &&
        x <= static_cast<acc_t>(W))) {
    return false;
  }
  if (y <= acc_t(0)) y = 0;
  if (x <= acc_t(0)) x = 0;
  int64_t y0 = static_cast<int64_t>(y);
  int64_t x0 = static_cast<int64_t>(x);
  int64_t y1, x1;
  if (y0 >= H - 1) {
    y0 = y1 = H - 1;
    y = static_cast<acc_t>(y0);
  } else {
    y1 = y0 + 1;
  }
  if (x0 >= W - 1) {
    x0 = x1 = W - 1;
    x = static_cast<acc_t>(x0);
  } else {
    x1 = x0 + 1;
  }
  const acc_t ly = y - static_cast<acc_t>(y0);
  const acc_t lx = x - static_cast<acc_t>(x0);
  const acc_t hy = acc_t(1) - ly;
  const acc_t hx = acc_t(1) - lx;
  t.w1 = hy * hx;
  t.w2 = hy * lx;
  t.w3 = ly * hx;
  t.w4 = ly * lx;
  t.o1 = y0 * sh + x0 * sw;
  t.o2 = y0 * sh + x1 * sw;
  t.o3 = y1 * sh + x0 * sw;
  t.o4 = y1 * sh + x1 * sw;
  return true;
}

// Average of the bilinear samples of bin (ph, pw) on one channel plane.
template <typename scalar_t, typename acc_t>
C10_HOST_DEVICE inline acc_t pool_bin(const scalar_t* __restrict__ plane, int64_t H, int64_t W,
                                      int64_t sh, int64_t sw, const RoiGrid<acc_t>& g,
                                      int64_t ph, int64_t pw) {
  acc_t sum = 0;
  for (int iy = 0; iy < g.grid_h; ++iy) {
    const acc_t y = sample_pos(g.start_h, ph, g.bin_h, iy, g.grid_h);
    for (int ix = 0; ix < g.grid_w; ++ix) {
      const acc_t x = sample_pos(g.start_w, pw, g.bin_w, ix, g.grid_w);
      Taps<acc_t> t;
      if (bilinear_taps(H, W, sh, sw, y, x, t)) {
        const acc_t v1 = static_cast<acc_t>(plane[t.o1]);
        const acc_t v2 = static_cast<acc_t>(plane[t.o2]);
        const acc_t v3 = static_cast<acc_t>(plane[t.o3]);
        const acc_t v4 = static_cast<acc_t>(plane[t.o4]);
        sum += t.w1 * v1 + t.w2 * v2 + t.w3 * v3 + t.w4 * v4;
      }
    }
  }
  // An empty grid (zero-size aligned RoI) averages nothing and yields 0.
  const acc_t count = static_cast<acc_t>(imax(g.grid_h * g.grid_w, 1));
  return sum / count;
}

// Transpose of pool_bin: adds grad * w / count to the four taps of every sample.
template <typename acc_t>
C10_HOST_DEVICE inline void scatter_bin(acc_t* __restrict__ plane, int64_t H, int64_t W,
                                        int64_t sh, int64_t sw, const RoiGrid<acc_t>& g,
                                        int64_t ph, int64_t pw, acc_t grad) {
  const acc_t count = static_cast<acc_t>(g.grid_h * g.grid_w);
  for (int iy = 0; iy < g.grid_h; ++iy) {
    const acc_t y = sample_pos(g.start_h, ph, g.bin_h, iy, g.grid_h);
    for (int ix = 0; ix < g.grid_w; ++ix) {
      const acc_t x = sample_pos(g.start_w, pw, g.bin_w, ix, g.grid_w);
      Taps<acc_t> t;
      if (bilinear_taps(H, W, sh, sw, y, x, t)) {
        atomic_add(plane + t.o1, grad * t.w1 / count);
        atomic_add(plane + t.o2, grad * t.w2 / count);
        atomic_add(plane + t.o3, grad * t.w3 / count);
        atomic_add(plane + t.o4, grad * t.w4 / count);
      }
    }
  }
}

// One feature map of a (possibly multi-level) input: data pointer, spatial size, strides and
// the scale mapping image coordinates onto it.
template <typename T, typename acc_t>
struct Level {
  T* data;
  int64_t height, width;
  Strides4 strides;
  acc_t scale;
};

template <typename T, typename acc_t>
Level<T, acc_t> level_of(const at::Tensor& t, T* data, double scale) {
  return Level<T, acc_t>{data, t.size(2), t.size(3), strides_of(t), static_cast<acc_t>(scale)};
}

// Geometry shared by every RoIAlign functor: rois (K, 5) and the output grid.
template <typename scalar_t>
struct RoiArgs {
  const scalar_t* rois;
  int64_t batch_size, channels, pooled_h, pooled_w, sampling_ratio;
  bool aligned;
};

// Pools output element (n, c, ph, pw) of RoI n from `lvl`; 0 for an invalid RoI or empty map.
template <typename scalar_t, typename acc_t>
C10_HOST_DEVICE inline acc_t pool_element(const RoiArgs<scalar_t>& a,
                                          const Level<const scalar_t, acc_t>& lvl, int64_t n,
                                          int64_t c, int64_t ph, int64_t pw) {
  const scalar_t* roi = a.rois + n * 5;
  const int64_t b = roi_batch_index(static_cast<acc_t>(roi[0]), a.batch_size);
  RoiGrid<acc_t> g;
  if (b < 0 || lvl.height <= 0 || lvl.width <= 0 ||
      !make_roi_grid(roi, lvl.scale, a.pooled_h, a.pooled_w, a.sampling_ratio, a.aligned, g)) {
    return acc_t(0);
  }
  const Strides4& s = lvl.strides;
  return pool_bin(lvl.data + b * s.n + c * s.c, lvl.height, lvl.width, s.h, s.w, g, ph, pw);
}

// Scatters `grad` of output element (n, c, ph, pw) into the gradient map `lvl`.
template <typename scalar_t, typename acc_t>
C10_HOST_DEVICE inline void scatter_element(const RoiArgs<scalar_t>& a,
                                            const Level<acc_t, acc_t>& lvl, int64_t n, int64_t c,
                                            int64_t ph, int64_t pw, acc_t grad) {
  if (grad == acc_t(0)) return;  // adds nothing; common for RoIs masked out of the loss
  const scalar_t* roi = a.rois + n * 5;
  const int64_t b = roi_batch_index(static_cast<acc_t>(roi[0]), a.batch_size);
  RoiGrid<acc_t> g;
  if (b < 0 || lvl.height <= 0 || lvl.width <= 0 ||
      !make_roi_grid(roi, lvl.scale, a.pooled_h, a.pooled_w, a.sampling_ratio, a.aligned, g)) {
    return;
  }
  const Strides4& s = lvl.strides;
  scatter_bin(lvl.data + b * s.n + c * s.c, lvl.height, lvl.width, s.h, s.w, g, ph, pw, grad);
}

// ---------------------------------------------------------------------------------------------
// Single feature map. One functor call per output element, in the output's memory order.

template <typename scalar_t>
struct RoiAlignForward {
  using acc_t = at::acc_type<scalar_t, true>;
  RoiArgs<scalar_t> a;
  Level<const scalar_t, acc_t> input;
  bool channels_last;
  scalar_t* out;

  C10_HOST_DEVICE void operator()(int64_t index) const {
    int64_t n, c, ph, pw;
    unravel(channels_last, index, a.channels, a.pooled_h, a.pooled_w, n, c, ph, pw);
    out[index] = static_cast<scalar_t>(pool_element(a, input, n, c, ph, pw));
  }
};

// One call per element of grad, walked in grad's memory order (grad may be any strides).
template <typename scalar_t>
struct RoiAlignBackward {
  using acc_t = at::acc_type<scalar_t, true>;
  RoiArgs<scalar_t> a;
  const scalar_t* grad;
  Strides4 gs;
  bool channels_last;
  Level<acc_t, acc_t> grad_input;

  C10_HOST_DEVICE void operator()(int64_t index) const {
    int64_t n, c, ph, pw;
    unravel(channels_last, index, a.channels, a.pooled_h, a.pooled_w, n, c, ph, pw);
    const acc_t go = static_cast<acc_t>(grad[n * gs.n + c * gs.c + ph * gs.h + pw * gs.w]);
    scatter_element(a, grad_input, n, c, ph, pw, go);
  }
};

at::Tensor roi_align_forward_cuda(const at::Tensor& input, const at::Tensor& rois,
                                  double spatial_scale, int64_t pooled_height,
                                  int64_t pooled_width, int64_t sampling_ratio, bool aligned) {
  constexpr const char* op = "segkit::roi_align";
  check_feature_and_rois(op, input, rois);
  check_pooled_size(op, pooled_height, pooled_width);
  check_device(op, input, "input");
  DeviceGuard guard(input.device());

  const int64_t K = rois.size(0), B = input.size(0), C = input.size(1);
  const at::MemoryFormat fmt = format_of(input);
  at::Tensor out = at::empty({K, C, pooled_height, pooled_width},
                             input.options().memory_format(fmt));
  if (out.numel() == 0) return out;
  if (input.numel() == 0) return out.zero_();  // B, H or W is 0: every RoI lies off the map

  const at::Tensor in = input.contiguous(fmt);
  const at::Tensor r = rois.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, input.scalar_type(), "segkit_roi_align_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    RoiAlignForward<scalar_t> f{
        RoiArgs<scalar_t>{r.const_data_ptr<scalar_t>(), B, C, pooled_height, pooled_width,
                          sampling_ratio, aligned},
        level_of<const scalar_t, acc_t>(in, in.const_data_ptr<scalar_t>(), spatial_scale),
        fmt == at::MemoryFormat::ChannelsLast, out.mutable_data_ptr<scalar_t>()};
    for_each(out.numel(), f, current_stream());
  });
  return out;
}

// Checks shared by the two backward ops: grad is (K, C, PH, PW) for rois (K, 5).
void check_backward_args(const char* op, const at::Tensor& grad, const at::Tensor& rois,
                         int64_t pooled_height, int64_t pooled_width, int64_t batch_size,
                         int64_t channels) {
  check_pooled_grad(op, grad, rois, pooled_height, pooled_width, batch_size, channels);
  check_device(op, grad, "grad");
}

at::Tensor roi_align_backward_cuda(const at::Tensor& grad, const at::Tensor& rois,
                                   double spatial_scale, int64_t pooled_height,
                                   int64_t pooled_width, int64_t batch_size, int64_t channels,
                                   int64_t height, int64_t width, int64_t sampling_ratio,
                                   bool aligned) {
  constexpr const char* op = "segkit::_roi_align_backward";
  check_backward_args(op, grad, rois, pooled_height, pooled_width, batch_size, channels);
  TORCH_CHECK(height >= 0 && width >= 0, op, ": height and width must be >= 0");
  alert_not_deterministic("segkit::_roi_align_backward (CUDA)");
  DeviceGuard guard(grad.device());

  const at::MemoryFormat fmt = format_of(grad);
  at::Tensor grad_acc = zeroed_grad_accumulator(grad, batch_size, channels, height, width);
  if (grad.numel() > 0 && grad_acc.numel() > 0) {
    const at::Tensor r = rois.contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, grad.scalar_type(), "segkit_roi_align_backward_cuda", [&] {
      using acc_t = at::acc_type<scalar_t, true>;
      RoiAlignBackward<scalar_t> f{
          RoiArgs<scalar_t>{r.const_data_ptr<scalar_t>(), batch_size, channels, pooled_height,
                            pooled_width, sampling_ratio, aligned},
          grad.const_data_ptr<scalar_t>(), strides_of(grad),
          fmt == at::MemoryFormat::ChannelsLast,
          level_of<acc_t, acc_t>(grad_acc, grad_acc.mutable_data_ptr<acc_t>(), spatial_scale)};
      for_each(grad.numel(), f, current_stream());
    });
  }
  return finish_grad(grad_acc, grad);
}

// ---------------------------------------------------------------------------------------------
// Fused multi-level RoIAlign (FPN): one launch pools every RoI from its own level.

constexpr int kMaxLevels = 8;  // P2..P9: more than any FPN in use, and keeps the table small

// Per-level pointers and geometry, passed by value as a kernel argument (about 0.5 KiB, well
// under the 4 KiB parameter limit), so no device-side table is allocated and copied.
template <typename T, typename acc_t>
struct Pyramid {
  Level<T, acc_t> level[kMaxLevels];
  int64_t num_levels;
};

// FPN Eq. 1: k = floor(k0 + log2(sqrt(wh) / 224)), clamped to the pyramid. segkit::fpn_level
// is the function the CPU kernel uses, so both devices route every box to the same level.
// One call per RoI: the level is computed once, not once per output element.
template <typename scalar_t>
struct FpnLevels {
  using acc_t = at::acc_type<scalar_t, true>;
  const scalar_t* rois;
  double canonical_box_size;
  int64_t canonical_level, min_level, max_level;
  int64_t* levels;

  C10_HOST_DEVICE void operator()(int64_t k) const {
    const scalar_t* r = rois + k * 5;
    levels[k] = segkit::fpn_level<acc_t>(
        static_cast<acc_t>(r[1]), static_cast<acc_t>(r[2]), static_cast<acc_t>(r[3]),
        static_cast<acc_t>(r[4]), canonical_box_size, canonical_level, min_level, max_level);
  }
};

template <typename scalar_t>
struct MultilevelForward {
  using acc_t = at::acc_type<scalar_t, true>;
  RoiArgs<scalar_t> a;
  Pyramid<const scalar_t, acc_t> pyr;
  const int64_t* levels;
  bool channels_last;
  scalar_t* out;

  C10_HOST_DEVICE void operator()(int64_t index) const {
    int64_t n, c, ph, pw;
    unravel(channels_last, index, a.channels, a.pooled_h, a.pooled_w, n, c, ph, pw);
    const int64_t l = levels[n];
    // Level -1 (inverted box) belongs to no level and pools to zeros.
    const acc_t v = l >= 0 && l < pyr.num_levels ? pool_element(a, pyr.level[l], n, c, ph, pw)
                                                 : acc_t(0);
    out[index] = static_cast<scalar_t>(v);
  }
};

template <typename scalar_t>
struct MultilevelBackward {
  using acc_t = at::acc_type<scalar_t, true>;
  RoiArgs<scalar_t> a;
  const scalar_t* grad;
  Strides4 gs;
  bool channels_last;
  const int64_t* levels;
  Pyramid<acc_t, acc_t> pyr;

  C10_HOST_DEVICE void operator()(int64_t index) const {
    int64_t n, c, ph, pw;
    unravel(channels_last, index, a.channels, a.pooled_h, a.pooled_w, n, c, ph, pw);
    const int64_t l = levels[n];
    if (l < 0 || l >= pyr.num_levels) return;
    const acc_t go = static_cast<acc_t>(grad[n * gs.n + c * gs.c + ph * gs.h + pw * gs.w]);
    scatter_element(a, pyr.level[l], n, c, ph, pw, go);
  }
};

int64_t check_num_levels(const char* op, size_t num_levels) {
  TORCH_CHECK(num_levels >= 1 && num_levels <= static_cast<size_t>(kMaxLevels), op,
              ": the CUDA kernel supports 1 to ", kMaxLevels, " pyramid levels, got ",
              num_levels);
  return static_cast<int64_t>(num_levels);
}

std::tuple<at::Tensor, at::Tensor> multilevel_roi_align_forward_cuda(
    at::TensorList features, const at::Tensor& rois, at::ArrayRef<double> spatial_scales,
    int64_t pooled_height, int64_t pooled_width, int64_t sampling_ratio, bool aligned,
    double canonical_box_size, int64_t canonical_level) {
  constexpr const char* op = "segkit::multilevel_roi_align";
  const int64_t L = check_num_levels(op, features.size());
  TORCH_CHECK(spatial_scales.size() == features.size(), op, ": got ", features.size(),
              " feature maps but ", spatial_scales.size(), " spatial_scales");
  for (int64_t l = 0; l < L; ++l) {
    check_feature_and_rois(op, features[l], rois);
    TORCH_CHECK(features[l].size(0) == features[0].size(0) &&
                    features[l].size(1) == features[0].size(1),
                op, ": every level must have the same batch size and channels; features[0] is ",
                shape_str(features[0]), ", features[", l, "] is ", shape_str(features[l]));
  }
  check_pooled_size(op, pooled_height, pooled_width);
  TORCH_CHECK(canonical_box_size > 0, op, ": canonical_box_size must be positive, got ",
              canonical_box_size);
  check_device(op, rois, "rois");
  const int64_t min_level = check_pyramid_scales(op, spatial_scales);
  const int64_t max_level = min_level + L - 1;
  DeviceGuard guard(rois.device());

  const int64_t K = rois.size(0), B = features[0].size(0), C = features[0].size(1);
  const at::MemoryFormat fmt = format_of(features[0]);
  at::Tensor out = at::empty({K, C, pooled_height, pooled_width},
                             features[0].options().memory_format(fmt));
  at::Tensor levels = at::empty({K}, rois.options().dtype(at::kLong));
  if (K == 0) return {out, levels};

  const at::Tensor r = rois.contiguous();
  std::vector<at::Tensor> feats;  // keeps any contiguous copies alive until the launch
  feats.reserve(L);
  for (int64_t l = 0; l < L; ++l) {
    feats.push_back(features[l].contiguous(format_of(features[l])));
  }
  cudaStream_t stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, rois.scalar_type(), "segkit_multilevel_roi_align_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    FpnLevels<scalar_t> lv{r.const_data_ptr<scalar_t>(), canonical_box_size, canonical_level,
                           min_level, max_level, levels.mutable_data_ptr<int64_t>()};
    for_each(K, lv, stream);
    Pyramid<const scalar_t, acc_t> pyr{};
    pyr.num_levels = L;
    for (int64_t l = 0; l < L; ++l) {
      pyr.level[l] = level_of<const scalar_t, acc_t>(feats[l], feats[l].const_data_ptr<scalar_t>(),
                                                     spatial_scales[l]);
    }
    MultilevelForward<scalar_t> f{
        RoiArgs<scalar_t>{r.const_data_ptr<scalar_t>(), B, C, pooled_height, pooled_width,
                          sampling_ratio, aligned},
        pyr, levels.const_data_ptr<int64_t>(), fmt == at::MemoryFormat::ChannelsLast,
        out.mutable_data_ptr<scalar_t>()};
    for_each(out.numel(), f, stream);
  });
  return {out, levels};
}

std::vector<at::Tensor> multilevel_roi_align_backward_cuda(
    const at::Tensor& grad, const at::Tensor& rois, const at::Tensor& levels,
    at::ArrayRef<double> spatial_scales, int64_t pooled_height, int64_t pooled_width,
    int64_t batch_size, int64_t channels, at::IntArrayRef heights, at::IntArrayRef widths,
    int64_t sampling_ratio, bool aligned) {
  constexpr const char* op = "segkit::_multilevel_roi_align_backward";
  check_backward_args(op, grad, rois, pooled_height, pooled_width, batch_size, channels);
  const int64_t L = check_num_levels(op, spatial_scales.size());
  TORCH_CHECK(heights.size() == spatial_scales.size() && widths.size() == spatial_scales.size(),
              op, ": spatial_scales, heights and widths must have one entry per level, got ",
              spatial_scales.size(), ", ", heights.size(), " and ", widths.size());
  TORCH_CHECK(levels.dim() == 1 && levels.size(0) == rois.size(0), op,
              ": levels must have shape (", rois.size(0), "), got ", shape_str(levels));
  TORCH_CHECK(levels.scalar_type() == at::kLong, op, ": levels must be int64, got ",
              levels.scalar_type());
  TORCH_CHECK(levels.device() == grad.device(), op, ": levels are on ", levels.device(),
              " but grad is on ", grad.device(), "; expected the same device");
  check_pyramid_scales(op, spatial_scales);
  for (int64_t l = 0; l < L; ++l) {
    TORCH_CHECK(heights[l] >= 0 && widths[l] >= 0, op, ": heights and widths must be >= 0");
  }
  alert_not_deterministic("segkit::_multilevel_roi_align_backward (CUDA)");
  DeviceGuard guard(grad.device());

  const at::MemoryFormat fmt = format_of(grad);
  std::vector<at::Tensor> grads;
  grads.reserve(L);
  for (int64_t l = 0; l < L; ++l) {
    grads.push_back(zeroed_grad_accumulator(grad, batch_size, channels, heights[l], widths[l]));
  }
  if (grad.numel() > 0 && batch_size > 0) {
    const at::Tensor r = rois.contiguous();
    const at::Tensor lv = levels.contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, grad.scalar_type(), "segkit_multilevel_roi_align_bwd_cuda",
        [&] {
      using acc_t = at::acc_type<scalar_t, true>;
      Pyramid<acc_t, acc_t> pyr{};
      pyr.num_levels = L;
      for (int64_t l = 0; l < L; ++l) {
        pyr.level[l] = level_of<acc_t, acc_t>(grads[l], grads[l].mutable_data_ptr<acc_t>(),
                                              spatial_scales[l]);
      }
      MultilevelBackward<scalar_t> f{
          RoiArgs<scalar_t>{r.const_data_ptr<scalar_t>(), batch_size, channels, pooled_height,
                            pooled_width, sampling_ratio, aligned},
          grad.const_data_ptr<scalar_t>(), strides_of(grad),
          fmt == at::MemoryFormat::ChannelsLast, lv.const_data_ptr<int64_t>(), pyr};
      for_each(grad.numel(), f, current_stream());
    });
  }
  for (auto& g : grads) g = finish_grad(g, grad);
  return grads;
}

}  // namespace
}  // namespace cuda
}  // namespace segkit

TORCH_LIBRARY_IMPL(segkit, SEGKIT_DISPATCH_KEY, m) {
  m.impl("roi_align", &segkit::cuda::roi_align_forward_cuda);
  m.impl("_roi_align_backward", &segkit::cuda::roi_align_backward_cuda);
  m.impl("multilevel_roi_align", &segkit::cuda::multilevel_roi_align_forward_cuda);
  m.impl("_multilevel_roi_align_backward", &segkit::cuda::multilevel_roi_align_backward_cuda);
}
