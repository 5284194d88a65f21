// Pasting M x M mask probabilities into full-image binary masks (Mask R-CNN inference,
// section 3: "the m x m floating-number mask output is then resized to the RoI size, and
// binarized at a threshold of 0.5").
//
// Each mask is a continuous image stretched over its box. The full-image pixel with centre
// (x + 0.5, y + 0.5) takes the bilinear value of the mask at that point with zero outside the
// mask (grid_sample's bilinear / zeros / align_corners=False, the same arithmetic), and is set
// where the value is >= threshold. Only the box's pixel extent (half a mask cell and one pixel
// of slack each side) is visited, so the cost follows the box areas instead of N x H x W; masks are pasted in
// parallel, one per work item.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "segkit_ops.h"

namespace segkit {
namespace {

// One axis: for output pixels [lo, hi), the two mask cells each reads and their weights
// (zero for a cell outside the mask, as grid_sample's zero padding).
struct AxisSamples {
  std::vector<int32_t> i0;
  std::vector<float> w0, w1;  // weight of cell i0 and of cell i0 + 1
};

void axis_samples(int64_t lo, int64_t hi, float b0, float extent, int64_t m, AxisSamples& s) {
  const int64_t n = hi - lo;
  s.i0.resize(n);
  s.w0.resize(n);
  s.w1.resize(n);
  for (int64_t i = 0; i < n; ++i) {
    // grid_sample: normalise to [-1, 1] over the box, then unnormalise to mask cells
    const float centre = static_cast<float>(lo + i) + 0.5f;
    const float g = (centre - b0) / extent * 2.f - 1.f;
    const float src = ((g + 1.f) * static_cast<float>(m) - 1.f) / 2.f;
    const float f = std::floor(src);
    const int64_t c0 = static_cast<int64_t>(f);
    const float t = src - f;
    s.i0[i] = static_cast<int32_t>(std::clamp<int64_t>(c0, -1, m));
    s.w0[i] = (c0 >= 0 && c0 < m) ? 1.f - t : 0.f;
    s.w1[i] = (c0 + 1 >= 0 && c0 + 1 < m) ? t : 0.f;
  }
}

at::Tensor paste_masks_cpu(const at::Tensor& masks_in, const at::Tensor& boxes_in, int64_t height,
                           int64_t width, double threshold) {
  constexpr const char* op = "segkit::paste_masks";
  TORCH_CHECK(masks_in.dim() == 3, op, ": masks must have shape (N, M, M), got ", shape_str(masks_in));
  TORCH_CHECK(boxes_in.dim() == 2 && boxes_in.size(1) == 4 && boxes_in.size(0) == masks_in.size(0),
              op, ": boxes must have shape (", masks_in.size(0), ", 4) XYXY, got ", shape_str(boxes_in));
  TORCH_CHECK(masks_in.device() == boxes_in.device(), op, ": masks are on ", masks_in.device(),
              " but boxes are on ", boxes_in.device());
  TORCH_CHECK(height >= 0 && width >= 0, op, ": image size must be non-negative, got (", height,
              ", ", width, ")");
  const at::Tensor masks = masks_in.to(at::kFloat).contiguous();
  const at::Tensor boxes = boxes_in.to(at::kFloat).contiguous();
  const int64_t N = masks.size(0), mh = masks.size(1), mw = masks.size(2);
  at::Tensor out = at::zeros({N, height, width}, masks.options().dtype(at::kBool));
  if (N == 0 || height == 0 || width == 0 || mh == 0 || mw == 0) return out;
  const float* mp = masks.data_ptr<float>();
  const float* bp = boxes.data_ptr<float>();
  bool* op_ = out.data_ptr<bool>();
  const float thr = static_cast<float>(threshold);
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    AxisSamples xs, ys;
    std::vector<float> row_lo, row_hi;  // the mask interpolated along x on its two rows
    for (int64_t n = begin; n < end; ++n) {
      const float x0 = bp[n * 4], y0 = bp[n * 4 + 1], x1 = bp[n * 4 + 2], y1 = bp[n * 4 + 3];
      if (!(x1 > x0 && y1 > y0)) continue;  // degenerate (or NaN) box: no interior pixel
      // Zero-padded bilinear sampling reaches half a mask cell past the box edge (for
      // thresholds below 0.5 such pixels can be on): visit the box grown by half a cell plus
      // one pixel of slack, clipped to the image.
      const double hw = (static_cast<double>(x1) - x0) / (2.0 * mw);
      const double hh = (static_cast<double>(y1) - y0) / (2.0 * mh);
      const int64_t px0 = static_cast<int64_t>(std::clamp<double>(std::floor(x0 - hw) - 1, 0, width));
      const int64_t py0 = static_cast<int64_t>(std::clamp<double>(std::floor(y0 - hh) - 1, 0, height));
      const int64_t px1 = static_cast<int64_t>(std::clamp<double>(std::ceil(x1 + hw) + 1, 0, width));
      const int64_t py1 = static_cast<int64_t>(std::clamp<double>(std::ceil(y1 + hh) + 1, 0, height));
      if (px1 <= px0 || py1 <= py0) continue;
      const float bw = std::max(x1 - x0, 1e-6f), bh = std::max(y1 - y0, 1e-6f);
      axis_samples(px0, px1, x0, bw, mw, xs);
      axis_samples(py0, py1, y0, bh, mh, ys);
      const float* m = mp + n * mh * mw;
      const int64_t nx = px1 - px0;
      for (int64_t j = 0; j < py1 - py0; ++j) {
        const float wy0 = ys.w0[j], wy1 = ys.w1[j];
        if (wy0 == 0.f && wy1 == 0.f) continue;
        const int32_t r0 = ys.i0[j];
        const float* m0 = m + std::clamp<int64_t>(r0, 0, mh - 1) * mw;
        const float* m1 = m + std::clamp<int64_t>(r0 + 1, 0, mh - 1) * mw;
        bool* dst = op_ + (n * height + py0 + j) * width + px0;
        for (int64_t i = 0; i < nx; ++i) {
          const int32_t c0 = xs.i0[i];
          const int64_t a = std::clamp<int64_t>(c0, 0, mw - 1), b = std::clamp<int64_t>(c0 + 1, 0, mw - 1);
          const float wx0 = xs.w0[i], wx1 = xs.w1[i];
          // grid_sample's corner weights: nw, ne, sw, se
          const float v = (wy0 * wx0) * m0[a] + (wy0 * wx1) * m0[b] + (wy1 * wx0) * m1[a] +
                          (wy1 * wx1) * m1[b];
          dst[i] = v >= thr;
        }
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(segkit, CPU, m) {
  m.impl("paste_masks", &paste_masks_cpu);
}

}  // namespace segkit
