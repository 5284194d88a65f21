// RoIAlign (Mask R-CNN, section 3) and its FPN form (one call over all pyramid levels, FPN Eq. 1)
// on CPU.
//
// Semantics are torchvision.ops.roi_align's: each of the PH x PW bins of a RoI averages
// grid_h x grid_w bilinear samples; a sample more than one pixel outside the map is zero, one
// within a pixel of the border is clamped onto it. `aligned` shifts the box by -0.5 px so
// that pixel centres line up; without it boxes are forced to at least 1x1.
//
// How it is computed. A bilinear weight is a product w_y(y) * w_x(x), and a bin's sample grid
// is a product of row positions and column positions, so the average over a bin factorises:
//
//   out[ph, pw] = sum_y sum_x A_y[ph, y] * A_x[pw, x] * F[y, x]
//
// where A_y[ph, .] holds the (few) rows that the bin's samples touch, with their averaged
// weights ("taps"), and A_x likewise for columns. The kernel first contracts every needed row
// along x (T[r, pw] = sum_x A_x[pw, x] F[row_r, x], contiguous reads of a row), then along y.
// That is O(grid) work per bin and axis instead of O(grid^2) per bin, and it lets the taps be
// computed once per RoI and shared by all channels.
//
// Layout: when the samples outnumber the map pixels (Mask R-CNN's heads), the forward reads
// the maps in channels-last so the inner loops run over contiguous channel vectors; otherwise
// it reads NCHW planes in place. The backward always accumulates channel vectors, band by band.
//
// Parallelism (at::parallel_for, every core): the forward splits (channel block x RoI chunk)
// or (channel x RoI chunk); the backward splits the gradient maps into bands of rows, each
// thread accumulating every RoI's share of its bands in RoI order, so it needs no atomics and
// gives the same bits for any thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <vector>

#include "segkit_ops.h"

namespace segkit {
namespace {

// Channels per work item in channels-last: one 64-byte cache line of floats per pixel, one
// AVX-512 register of accumulators.
constexpr int64_t kChannelBlock = 16;
// Rows per thread-owned band of a gradient map in the channels-last backward: 2 rows of P2
// (336 px x 256 channels) are ~700 KB, which stay in a core's L2 cache.
constexpr int64_t kBandRows = 2;
// RoIs per forward work item.
constexpr int64_t kRoiChunk = 256;

// The separable sampling pattern of one RoI on one feature map.
template <typename acc_t>
struct RoiTaps {
  int64_t batch = 0;
  int64_t level = 0;    // index into the list of feature maps (0 for single-map roi_align)
  bool empty = true;    // no sample of this RoI touches the map: output stays zero
  // y taps of bin ph: entries [y_off[ph], y_off[ph + 1]) of (y_slot, y_w); y_slot indexes `rows`.
  std::vector<int32_t> y_off, y_slot;
  std::vector<acc_t> y_w;
  // x taps of bin pw: entries [x_off[pw], x_off[pw + 1]) of (x_idx = column, x_w).
  std::vector<int32_t> x_off, x_idx;
  std::vector<acc_t> x_w;
  std::vector<int32_t> rows;  // distinct feature rows read by this RoI
};

// Taps of one axis: for each of `pooled` bins, the merged (index, weight) list of its
// `grid` samples' linear interpolation, each weight already divided by `grid`.
// Follows torchvision's sample placement and border rules exactly.
template <typename acc_t>
void axis_taps(acc_t start, acc_t bin, int64_t grid, int64_t pooled, int64_t length,
               std::vector<int32_t>& off, std::vector<int32_t>& idx, std::vector<acc_t>& w) {
  off.assign(pooled + 1, 0);
  idx.clear();
  w.clear();
  const acc_t inv_grid = grid > 0 ? acc_t(1) / static_cast<acc_t>(grid) : acc_t(0);
  for (int64_t p = 0; p < pooled; ++p) {
    off[p] = static_cast<int32_t>(idx.size());
    const size_t first = idx.size();
    auto add = [&](int32_t i, acc_t weight) {
      if (weight == acc_t(0)) return;
      if (idx.size() > first && idx.back() == i) {
        w.back() += weight;  // consecutive samples share a row/column: one tap
      } else {
        idx.push_back(i);
        w.push_back(weight);
      }
    };
    for (int64_t g = 0; g < grid; ++g) {
      acc_t v = start + static_cast<acc_t>(p) * bin +
                static_cast<acc_t>(g + .5f) * bin / static_cast<acc_t>(grid);
      if (v < acc_t(-1) || v > static_cast<acc_t>(length)) continue;  // outside: zero sample
      if (v <= 0) v = 0;
      int64_t lo = static_cast<int64_t>(v);
      int64_t hi;
      if (lo >= length - 1) {
        hi = lo = length - 1;
        v = static_cast<acc_t>(lo);
      } else {
        hi = lo + 1;
      }
      const acc_t l = v - static_cast<acc_t>(lo);
      add(static_cast<int32_t>(lo), (acc_t(1) - l) * inv_grid);
      add(static_cast<int32_t>(hi), l * inv_grid);
    }
  }
  off[pooled] = static_cast<int32_t>(idx.size());
}

struct AlignParams {
  int64_t pooled_height, pooled_width, sampling_ratio;
  bool aligned;
};

// Checks one RoI row and returns its batch index; `row` is printed in the error.
template <typename acc_t>
int64_t roi_batch_index(const char* op, const acc_t* r, int64_t row, int64_t batch_size) {
  for (int i = 1; i < 5; ++i) {
    TORCH_CHECK(std::isfinite(static_cast<double>(r[i])), op, ": rois[", row,
                "] has a non-finite coordinate (", r[1], ", ", r[2], ", ", r[3], ", ", r[4], ")");
  }
  const double b = static_cast<double>(r[0]);
  TORCH_CHECK(std::isfinite(b) && b > -1 && static_cast<int64_t>(b) < batch_size, op, ": rois[",
              row, "] has batch index ", b, " but the input has batch size ", batch_size);
  return static_cast<int64_t>(b);
}

// Fills `t` for one RoI pooled from a (height x width) map at `scale`.
template <typename acc_t>
void roi_taps(const acc_t* r, double scale, int64_t height, int64_t width, const AlignParams& p,
              RoiTaps<acc_t>& t, std::vector<int32_t>& slot_of_row) {
  const acc_t offset = p.aligned ? acc_t(0.5) : acc_t(0);
  const acc_t s = static_cast<acc_t>(scale);
  const acc_t x0 = r[1] * s - offset, y0 = r[2] * s - offset;
  acc_t rw = r[3] * s - offset - x0, rh = r[4] * s - offset - y0;
  if (!p.aligned) {  // torchvision: malformed RoIs are forced to 1x1 in the legacy mode
    rw = std::max(rw, acc_t(1));
    rh = std::max(rh, acc_t(1));
  }
  const acc_t bin_h = rh / static_cast<acc_t>(p.pooled_height);
  const acc_t bin_w = rw / static_cast<acc_t>(p.pooled_width);
  const int64_t grid_h = p.sampling_ratio > 0 ? p.sampling_ratio
                                              : static_cast<int64_t>(std::ceil(rh / p.pooled_height));
  const int64_t grid_w = p.sampling_ratio > 0 ? p.sampling_ratio
                                              : static_cast<int64_t>(std::ceil(rw / p.pooled_width));
  t.empty = true;
  t.rows.clear();
  if (grid_h <= 0 || grid_w <= 0 || height <= 0 || width <= 0) return;
  std::vector<int32_t> y_idx;  // rows of the y taps, turned into slots below
  axis_taps<acc_t>(y0, bin_h, grid_h, p.pooled_height, height, t.y_off, y_idx, t.y_w);
  axis_taps<acc_t>(x0, bin_w, grid_w, p.pooled_width, width, t.x_off, t.x_idx, t.x_w);
  if (y_idx.empty() || t.x_idx.empty()) return;
  t.empty = false;
  // Distinct rows in first-use order; `slot_of_row` is a per-thread scratch map sized to the map.
  slot_of_row.assign(height, -1);
  t.y_slot.resize(y_idx.size());
  for (size_t i = 0; i < y_idx.size(); ++i) {
    int32_t& slot = slot_of_row[y_idx[i]];
    if (slot < 0) {
      slot = static_cast<int32_t>(t.rows.size());
      t.rows.push_back(y_idx[i]);
    }
    t.y_slot[i] = slot;
  }
}

// One feature map as the kernels see it: base pointer, sizes and strides (elements).
template <typename scalar_t>
struct MapView {
  scalar_t* data;
  int64_t batch, height, width;
  int64_t s_n, s_c, s_h, s_w;
};

template <typename scalar_t>
MapView<scalar_t> view_of(const at::Tensor& t) {
  return {t.data_ptr<scalar_t>(), t.size(0), t.size(2), t.size(3), t.stride(0), t.stride(1),
          t.stride(2), t.stride(3)};
}

// Forward of RoI `t` for the CB channels from c0 of a channels-last map. The CB accumulators
// live in registers across a bin's taps (CB = 64 floats is four AVX-512 registers), and T is
// (rows, PW, CB): each needed row contracted along x, then the bins contract T along y.
template <int CB, typename scalar_t, typename acc_t>
void pool_cl(const RoiTaps<acc_t>& t, const MapView<const scalar_t>& in, int64_t c0, int64_t ph_n,
             int64_t pw_n, scalar_t* out, int64_t o_c, int64_t o_h, int64_t o_w,
             std::vector<acc_t>& T) {
  const int64_t nrows = static_cast<int64_t>(t.rows.size());
  T.resize(nrows * pw_n * CB);
  for (int64_t r = 0; r < nrows; ++r) {
    const scalar_t* row = in.data + t.batch * in.s_n + t.rows[r] * in.s_h + c0;
    for (int64_t pw = 0; pw < pw_n; ++pw) {
      acc_t v[CB] = {};
      for (int32_t e = t.x_off[pw]; e < t.x_off[pw + 1]; ++e) {
        const scalar_t* src = row + t.x_idx[e] * in.s_w;
        const acc_t w = t.x_w[e];
        for (int c = 0; c < CB; ++c) v[c] += w * static_cast<acc_t>(src[c]);
      }
      std::copy(v, v + CB, T.data() + (r * pw_n + pw) * CB);
    }
  }
  for (int64_t ph = 0; ph < ph_n; ++ph) {
    for (int64_t pw = 0; pw < pw_n; ++pw) {
      acc_t v[CB] = {};
      for (int32_t e = t.y_off[ph]; e < t.y_off[ph + 1]; ++e) {
        const acc_t* src = T.data() + (t.y_slot[e] * pw_n + pw) * CB;
        const acc_t w = t.y_w[e];
        for (int c = 0; c < CB; ++c) v[c] += w * src[c];
      }
      scalar_t* dst = out + ph * o_h + pw * o_w + c0 * o_c;
      for (int c = 0; c < CB; ++c) dst[c * o_c] = static_cast<scalar_t>(v[c]);
    }
  }
}

// Forward of RoIs [k] for channels [c0, c1) (any strides; the loop order suits NCHW, where a
// row of one channel is contiguous, and channels-last, where channels are).
template <typename scalar_t, typename acc_t>
void pool_one(const RoiTaps<acc_t>& t, const MapView<const scalar_t>& in, int64_t c0, int64_t c1,
              int64_t ph_n, int64_t pw_n, scalar_t* out, int64_t o_c, int64_t o_h, int64_t o_w,
              std::vector<acc_t>& T, std::vector<acc_t>& acc) {
  const int64_t nrows = static_cast<int64_t>(t.rows.size());
  if (in.s_c == 1) {  // channels-last: contiguous channel vectors, fixed-width kernels
    int64_t c = c0;
    for (; c + 64 <= c1; c += 64) pool_cl<64, scalar_t, acc_t>(t, in, c, ph_n, pw_n, out, o_c, o_h, o_w, T);
    for (; c + 16 <= c1; c += 16) pool_cl<16, scalar_t, acc_t>(t, in, c, ph_n, pw_n, out, o_c, o_h, o_w, T);
    for (; c < c1; ++c) pool_cl<1, scalar_t, acc_t>(t, in, c, ph_n, pw_n, out, o_c, o_h, o_w, T);
    return;
  }
  T.resize(nrows * pw_n);
  acc.resize(pw_n);
  for (int64_t c = c0; c < c1; ++c) {
    const scalar_t* plane = in.data + t.batch * in.s_n + c * in.s_c;
    for (int64_t r = 0; r < nrows; ++r) {
      const scalar_t* row = plane + t.rows[r] * in.s_h;
      acc_t* dst = T.data() + r * pw_n;
      for (int64_t pw = 0; pw < pw_n; ++pw) {
        acc_t v = 0;
        for (int32_t e = t.x_off[pw]; e < t.x_off[pw + 1]; ++e) {
          v += t.x_w[e] * static_cast<acc_t>(row[t.x_idx[e] * in.s_w]);
        }
        dst[pw] = v;
      }
    }
    scalar_t* oc = out + c * o_c;
    for (int64_t ph = 0; ph < ph_n; ++ph) {
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int32_t e = t.y_off[ph]; e < t.y_off[ph + 1]; ++e) {
        const acc_t* src = T.data() + t.y_slot[e] * pw_n;
        const acc_t w = t.y_w[e];
        for (int64_t pw = 0; pw < pw_n; ++pw) acc[pw] += w * src[pw];
      }
      for (int64_t pw = 0; pw < pw_n; ++pw) oc[ph * o_h + pw * o_w] = static_cast<scalar_t>(acc[pw]);
    }
  }
}

// Channels-last backward. The gradient maps are split into bands of kBandRows rows (per level
// and image); a thread owns a band, accumulates into a band buffer in channels-last (whole
// channel vectors in the inner loops) every RoI's contribution to those rows in RoI order, then
// writes the band once into the output map in its own layout and dtype. Each element has one
// writer and a fixed order of sums (deterministic, no atomics), the band buffer (a few hundred
// KB) stays in cache while all the RoIs that cover it are added, and the output is written
// once, with no full-size accumulation buffer or transposition.
template <typename scalar_t, typename acc_t>
void unpool_bands(const std::vector<RoiTaps<acc_t>>& taps, const at::Tensor& grad,
                  const std::vector<MapView<scalar_t>>& outs, int64_t C, const AlignParams& p) {
  const int64_t K = static_cast<int64_t>(taps.size());
  const int64_t ph_n = p.pooled_height, pw_n = p.pooled_width;
  // each RoI's row range, to skip the bands it does not reach
  std::vector<int32_t> rmin(K, 0), rmax(K, -1);
  for (int64_t k = 0; k < K; ++k) {
    if (taps[k].empty) continue;
    const auto& rows = taps[k].rows;
    rmin[k] = *std::min_element(rows.begin(), rows.end());
    rmax[k] = *std::max_element(rows.begin(), rows.end());
  }
  struct Band { int64_t level, batch, r0, r1; };
  std::vector<Band> bands;
  for (size_t l = 0; l < outs.size(); ++l) {
    for (int64_t b = 0; b < outs[l].batch; ++b) {
      for (int64_t r0 = 0; r0 < outs[l].height; r0 += kBandRows) {
        bands.push_back({static_cast<int64_t>(l), b, r0, std::min(outs[l].height, r0 + kBandRows)});
      }
    }
  }
  const scalar_t* g = grad.data_ptr<scalar_t>();  // channels-last: channel stride 1
  const int64_t g_n = grad.stride(0), g_h = grad.stride(2), g_w = grad.stride(3);
  at::parallel_for(0, static_cast<int64_t>(bands.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buf;  // (band rows, W, C): the band's gradient
    std::vector<acc_t> dT;   // (band rows, PW, C): one RoI's rows contracted along y
    std::vector<char> touched;
    for (int64_t i = begin; i < end; ++i) {
      const Band& band = bands[i];
      const MapView<scalar_t>& out = outs[band.level];
      const int64_t nr = band.r1 - band.r0, W = out.width;
      buf.assign(nr * W * C, acc_t(0));
      for (int64_t k = 0; k < K; ++k) {  // RoI order fixed: deterministic sums
        const RoiTaps<acc_t>& t = taps[k];
        if (t.empty || t.level != band.level || t.batch != band.batch || rmax[k] < band.r0 ||
            rmin[k] >= band.r1) {
          continue;
        }
        dT.assign(nr * pw_n * C, acc_t(0));
        touched.assign(nr, 0);
        const scalar_t* gk = g + k * g_n;
        for (int64_t ph = 0; ph < ph_n; ++ph) {
          for (int32_t e = t.y_off[ph]; e < t.y_off[ph + 1]; ++e) {
            const int64_t lr = t.rows[t.y_slot[e]] - band.r0;
            if (lr < 0 || lr >= nr) continue;
            touched[lr] = 1;
            const acc_t w = t.y_w[e];
            for (int64_t pw = 0; pw < pw_n; ++pw) {
              const scalar_t* src = gk + ph * g_h + pw * g_w;
              acc_t* dst = dT.data() + (lr * pw_n + pw) * C;
              for (int64_t c = 0; c < C; ++c) dst[c] += w * static_cast<acc_t>(src[c]);
            }
          }
        }
        for (int64_t lr = 0; lr < nr; ++lr) {
          if (!touched[lr]) continue;
          acc_t* row = buf.data() + lr * W * C;
          for (int64_t pw = 0; pw < pw_n; ++pw) {
            const acc_t* v = dT.data() + (lr * pw_n + pw) * C;
            for (int32_t e = t.x_off[pw]; e < t.x_off[pw + 1]; ++e) {
              acc_t* dst = row + t.x_idx[e] * C;
              const acc_t w = t.x_w[e];
              for (int64_t c = 0; c < C; ++c) dst[c] += w * v[c];
            }
          }
        }
      }
      // write the band out in the output's layout (NCHW: one contiguous run per channel row)
      scalar_t* base = out.data + band.batch * out.s_n + band.r0 * out.s_h;
      for (int64_t lr = 0; lr < nr; ++lr) {
        const acc_t* src = buf.data() + lr * W * C;
        scalar_t* dst = base + lr * out.s_h;
        if (out.s_c == 1) {
          for (int64_t x = 0; x < W; ++x) {
            for (int64_t c = 0; c < C; ++c) dst[x * out.s_w + c] = static_cast<scalar_t>(src[x * C + c]);
          }
        } else {
          for (int64_t c = 0; c < C; ++c) {
            for (int64_t x = 0; x < W; ++x) dst[c * out.s_c + x * out.s_w] = static_cast<scalar_t>(src[x * C + c]);
          }
        }
      }
    }
  });
}

// Taps of every RoI, in parallel. `level_of(k, r)` returns the map index of RoI k (or -1: no
// map, output zero); `maps` gives each map's (height, width, scale).
template <typename acc_t, typename LevelFn>
std::vector<RoiTaps<acc_t>> all_taps(const char* op, const at::Tensor& rois_acc, int64_t batch_size,
                                     const std::vector<std::array<double, 3>>& maps,
                                     const AlignParams& p, LevelFn level_of) {
  const int64_t K = rois_acc.size(0);
  std::vector<RoiTaps<acc_t>> taps(K);
  const acc_t* r = rois_acc.data_ptr<acc_t>();
  at::parallel_for(0, K, 16, [&](int64_t begin, int64_t end) {
    std::vector<int32_t> scratch;
    for (int64_t k = begin; k < end; ++k) {
      const acc_t* row = r + k * 5;
      RoiTaps<acc_t>& t = taps[k];
      t.batch = roi_batch_index<acc_t>(op, row, k, batch_size);
      const int64_t lvl = level_of(k, row);
      t.level = lvl;
      if (lvl < 0) {
        t.empty = true;
        continue;
      }
      const auto& m = maps[lvl];
      roi_taps<acc_t>(row, m[2], static_cast<int64_t>(m[0]), static_cast<int64_t>(m[1]), p, t, scratch);
    }
  });
  return taps;
}

bool is_channels_last(const at::Tensor& t) {
  return t.dim() == 4 && t.size(1) > 1 && t.is_contiguous(at::MemoryFormat::ChannelsLast) &&
         !t.is_contiguous();
}

at::MemoryFormat format_of(const at::Tensor& t) {
  return is_channels_last(t) ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

// Whether to compute in channels-last even for NCHW maps. In channels-last the inner loops run
// over contiguous channel vectors (SIMD) and each RoI reads compact pixel rows, which is several
// times faster per sample; the price is one transposed copy of the maps (and, backward, of the
// gradient maps). Worth it once the samples outnumber the map pixels, as for Mask R-CNN's
// 1000 proposals x 7x7 or 100 detections x 14x14 on any FPN level.
bool compute_channels_last(int64_t K, const AlignParams& p, const std::vector<std::array<double, 3>>& geo) {
  double pixels = 0;
  for (const auto& g : geo) pixels += g[0] * g[1];
  return 4.0 * static_cast<double>(K) * p.pooled_height * p.pooled_width >= pixels;
}

// Shared forward over L maps of equal (B, C), dtype and memory format.
template <typename scalar_t, typename LevelFn>
at::Tensor pool_forward(const char* op, const std::vector<at::Tensor>& maps_in, const at::Tensor& rois,
                        const std::vector<double>& scales, const AlignParams& p, LevelFn level_of) {
  using acc_t = at::opmath_type<scalar_t>;
  const at::MemoryFormat fmt = format_of(maps_in[0]);  // the output's format
  std::vector<std::array<double, 3>> geo;
  for (size_t l = 0; l < maps_in.size(); ++l) {
    geo.push_back({static_cast<double>(maps_in[l].size(2)), static_cast<double>(maps_in[l].size(3)), scales[l]});
  }
  const bool cl = fmt == at::MemoryFormat::ChannelsLast || compute_channels_last(rois.size(0), p, geo);
  std::vector<at::Tensor> maps;
  for (const auto& m : maps_in) {
    maps.push_back(m.contiguous(cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous));
  }
  const int64_t K = rois.size(0), B = maps[0].size(0), C = maps[0].size(1);
  at::Tensor rois_acc = rois.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
  auto taps = all_taps<acc_t>(op, rois_acc, B, geo, p, level_of);
  // (at::zeros ignores a memory format in its options; at::empty takes it as an argument)
  at::Tensor out = at::empty({K, C, p.pooled_height, p.pooled_width}, maps[0].options(), fmt).zero_();
  if (K == 0 || C == 0) return out;
  std::vector<MapView<const scalar_t>> views;
  for (auto& m : maps) {
    auto v = view_of<scalar_t>(m);
    views.push_back({v.data, v.batch, v.height, v.width, v.s_n, v.s_c, v.s_h, v.s_w});
  }
  scalar_t* o = out.data_ptr<scalar_t>();
  const int64_t o_n = out.stride(0), o_c = out.stride(1), o_h = out.stride(2), o_w = out.stride(3);
  if (cl) {
    // Channels-last: work items are (block of channels, RoI chunk), block-major. A block's
    // slice of the maps (16 channels: one cache line per pixel, a quarter of P2-P5 is ~6 MB)
    // stays in cache while every RoI reads it: RoIs overlap, so each pixel is read many times.
    const int64_t nblocks = (C + kChannelBlock - 1) / kChannelBlock;
    const int64_t nchunks = (K + kRoiChunk - 1) / kRoiChunk;
    at::parallel_for(0, nblocks * nchunks, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> T, acc;  // per-thread scratch, reused across RoIs
      for (int64_t item = begin; item < end; ++item) {
        const int64_t c0 = (item / nchunks) * kChannelBlock, chunk = item % nchunks;
        for (int64_t k = chunk * kRoiChunk; k < std::min(K, (chunk + 1) * kRoiChunk); ++k) {
          const RoiTaps<acc_t>& t = taps[k];
          if (t.empty) continue;
          pool_one<scalar_t, acc_t>(t, views[t.level], c0, std::min(C, c0 + kChannelBlock),
                                    p.pooled_height, p.pooled_width, o + k * o_n, o_c, o_h, o_w, T, acc);
        }
      }
    });
  } else {
    // NCHW (few samples): work items are (channel, RoI chunk), channel-major, so a thread sweeps
    // all RoIs of a channel while its plane stays in cache.
    const int64_t nchunks = (K + kRoiChunk - 1) / kRoiChunk;
    at::parallel_for(0, C * nchunks, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> T, acc;
      for (int64_t item = begin; item < end; ++item) {
        const int64_t c = item / nchunks, chunk = item % nchunks;
        for (int64_t k = chunk * kRoiChunk; k < std::min(K, (chunk + 1) * kRoiChunk); ++k) {
          const RoiTaps<acc_t>& t = taps[k];
          if (t.empty) continue;
          pool_one<scalar_t, acc_t>(t, views[t.level], c, c + 1, p.pooled_height, p.pooled_width,
                                    o + k * o_n, o_c, o_h, o_w, T, acc);
        }
      }
    });
  }
  return out;
}

// Shared backward: one grad map per level, (B, C, H_l, W_l), in grad's memory format.
template <typename scalar_t, typename LevelFn>
std::vector<at::Tensor> pool_backward(const char* op, const at::Tensor& grad_in, const at::Tensor& rois,
                                      const std::vector<double>& scales, int64_t B, int64_t C,
                                      const std::vector<int64_t>& heights, const std::vector<int64_t>& widths,
                                      const AlignParams& p, LevelFn level_of) {
  using acc_t = at::opmath_type<scalar_t>;
  const at::MemoryFormat fmt = format_of(grad_in);  // the format of the returned gradients
  std::vector<std::array<double, 3>> geo;
  for (size_t l = 0; l < heights.size(); ++l) {
    geo.push_back({static_cast<double>(heights[l]), static_cast<double>(widths[l]), scales[l]});
  }
  at::Tensor rois_acc = rois.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
  auto taps = all_taps<acc_t>(op, rois_acc, B, geo, p, level_of);
  // Always banded: it writes each gradient element once, in the output's own layout, so it
  // costs no more than zero-filling NCHW maps would, and its inner loops are vectorised.
  std::vector<at::Tensor> outs;
  std::vector<MapView<scalar_t>> views;
  for (size_t l = 0; l < heights.size(); ++l) {
    outs.push_back(at::empty({B, C, heights[l], widths[l]}, grad_in.options(), fmt));
    views.push_back(view_of<scalar_t>(outs.back()));
  }
  if (C > 0) {
    unpool_bands<scalar_t, acc_t>(taps, grad_in.contiguous(at::MemoryFormat::ChannelsLast), views, C, p);
  }
  return outs;
}

// ---------------------------------------------------------------------------------------------
// Ops

at::Tensor roi_align_cpu(const at::Tensor& input, const at::Tensor& rois, double spatial_scale,
                         int64_t pooled_height, int64_t pooled_width, int64_t sampling_ratio,
                         bool aligned) {
  constexpr const char* op = "segkit::roi_align";
  check_feature_and_rois(op, input, rois);
  check_pooled_size(op, pooled_height, pooled_width);
  const AlignParams p{pooled_height, pooled_width, sampling_ratio, aligned};
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "roi_align_cpu", [&] {
    out = pool_forward<scalar_t>(op, {input}, rois, {spatial_scale}, p,
                                 [](int64_t, const void*) -> int64_t { return 0; });
  });
  return out;
}

at::Tensor roi_align_backward_cpu(const at::Tensor& grad, const at::Tensor& rois, double spatial_scale,
                                  int64_t pooled_height, int64_t pooled_width, int64_t batch_size,
                                  int64_t channels, int64_t height, int64_t width,
                                  int64_t sampling_ratio, bool aligned) {
  constexpr const char* op = "segkit::_roi_align_backward";
  check_pooled_grad(op, grad, rois, pooled_height, pooled_width, batch_size, channels);
  const AlignParams p{pooled_height, pooled_width, sampling_ratio, aligned};
  at::Tensor gin;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "roi_align_backward_cpu", [&] {
    gin = pool_backward<scalar_t>(op, grad, rois, {spatial_scale}, batch_size, channels, {height},
                                  {width}, p, [](int64_t, const void*) -> int64_t { return 0; })[0];
  });
  return gin;
}

void check_pyramid(const char* op, const std::vector<at::Tensor>& features, const at::Tensor& rois,
                   at::ArrayRef<double> scales) {
  TORCH_CHECK(!features.empty(), op, ": features is empty; expected one map per pyramid level");
  TORCH_CHECK(features.size() == scales.size(), op, ": got ", features.size(),
              " feature maps but ", scales.size(), " spatial_scales");
  for (size_t l = 0; l < features.size(); ++l) {
    check_feature_and_rois(op, features[l], rois);
    TORCH_CHECK(features[l].size(0) == features[0].size(0) && features[l].size(1) == features[0].size(1),
                op, ": every level must have the same batch size and channels; level 0 is ",
                shape_str(features[0]), ", level ", l, " is ", shape_str(features[l]));
  }
}

// FPN level of RoI row r (image coordinates) relative to min_level; -1 for an inverted box.
template <typename acc_t>
struct LevelOf {
  double canonical_box_size;
  int64_t canonical_level, min_level, max_level;
  int64_t* out;  // levels tensor data, written as a side effect
  int64_t operator()(int64_t k, const acc_t* r) const {
    // the formula runs in at least float (double for double RoIs), as torchvision's LevelMapper
    const int64_t lvl = fpn_level<acc_t>(r[1], r[2], r[3], r[4], canonical_box_size,
                                         canonical_level, min_level, max_level);
    if (out) out[k] = lvl;
    return lvl;
  }
};

std::tuple<at::Tensor, at::Tensor> multilevel_roi_align_cpu(
    at::TensorList features_in, const at::Tensor& rois, at::ArrayRef<double> spatial_scales,
    int64_t pooled_height, int64_t pooled_width, int64_t sampling_ratio, bool aligned,
    double canonical_box_size, int64_t canonical_level) {
  constexpr const char* op = "segkit::multilevel_roi_align";
  std::vector<at::Tensor> features(features_in.begin(), features_in.end());
  check_pyramid(op, features, rois, spatial_scales);
  check_pooled_size(op, pooled_height, pooled_width);
  const int64_t min_level = check_pyramid_scales(op, spatial_scales);
  const int64_t max_level = min_level + static_cast<int64_t>(spatial_scales.size()) - 1;
  const AlignParams p{pooled_height, pooled_width, sampling_ratio, aligned};
  at::Tensor levels = at::empty({rois.size(0)}, rois.options().dtype(at::kLong));
  at::Tensor out;
  std::vector<double> scales(spatial_scales.begin(), spatial_scales.end());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rois.scalar_type(), "multilevel_roi_align_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    LevelOf<acc_t> level_of{canonical_box_size, canonical_level, min_level, max_level,
                            levels.data_ptr<int64_t>()};
    out = pool_forward<scalar_t>(op, features, rois, scales, p, level_of);
  });
  return {out, levels};
}

std::vector<at::Tensor> multilevel_roi_align_backward_cpu(
    const at::Tensor& grad, const at::Tensor& rois, const at::Tensor& levels,
    at::ArrayRef<double> spatial_scales, int64_t pooled_height, int64_t pooled_width,
    int64_t batch_size, int64_t channels, at::IntArrayRef heights, at::IntArrayRef widths,
    int64_t sampling_ratio, bool aligned) {
  constexpr const char* op = "segkit::_multilevel_roi_align_backward";
  check_pooled_grad(op, grad, rois, pooled_height, pooled_width, batch_size, channels);
  TORCH_CHECK(levels.dim() == 1 && levels.size(0) == rois.size(0) && levels.scalar_type() == at::kLong,
              op, ": levels must be int64 of shape (", rois.size(0), "), got ", shape_str(levels));
  TORCH_CHECK(heights.size() == spatial_scales.size() && widths.size() == spatial_scales.size(), op,
              ": heights, widths and spatial_scales must have one entry per level");
  const AlignParams p{pooled_height, pooled_width, sampling_ratio, aligned};
  const at::Tensor lv = levels.contiguous();
  const int64_t* lp = lv.data_ptr<int64_t>();
  const int64_t L = static_cast<int64_t>(heights.size());
  for (int64_t k = 0; k < lv.size(0); ++k) {
    TORCH_CHECK(lp[k] >= -1 && lp[k] < L, op, ": levels[", k, "] = ", lp[k], " is not in [-1, ", L, ")");
  }
  std::vector<at::Tensor> grads;
  std::vector<double> scales(spatial_scales.begin(), spatial_scales.end());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "multilevel_roi_align_backward_cpu", [&] {
    grads = pool_backward<scalar_t>(op, grad, rois, scales, batch_size, channels, heights.vec(),
                                    widths.vec(), p,
                                    [lp](int64_t k, const void*) -> int64_t { return lp[k]; });
  });
  return grads;
}

}  // namespace

TORCH_LIBRARY_IMPL(segkit, CPU, m) {
  m.impl("roi_align", &roi_align_cpu);
  m.impl("_roi_align_backward", &roi_align_backward_cpu);
  m.impl("multilevel_roi_align", &multilevel_roi_align_cpu);
  m.impl("_multilevel_roi_align_backward", &multilevel_roi_align_backward_cpu);
}

}  // namespace segkit
