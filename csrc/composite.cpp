// Multi-context ("foveal") RoIAlign for MultiPathNet (papers.md section 4.1): every box is
// pooled at several context scales about its centre (1x, 1.5x, 2x, 4x by default) in one call.
//
// The op is device-agnostic: it builds the K x S expanded boxes with tensor ops and runs the
// registered roi_align kernels of the input's device, so the CPU and CUDA builds share it.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "segkit_ops.h"

namespace segkit {
namespace {

// (K, 5) RoIs -> (K * S, 5): box k at context scale s is row k * S + i. The box grows by
// (s - 1) / 2 of its size on each side, so s = 1 returns the box bit for bit, and s = 1.5 gives
// (x - 0.25 w, y - 0.25 h, 1.5 w, 1.5 h) as in MultiPathNet.
at::Tensor expand_rois(const at::Tensor& rois, at::ArrayRef<double> context_scales) {
  const int64_t K = rois.size(0), S = static_cast<int64_t>(context_scales.size());
  at::Tensor s = at::tensor(std::vector<double>(context_scales.begin(), context_scales.end()),
                            rois.options().dtype(at::kDouble)).to(rois.scalar_type());
  at::Tensor half_grow = ((s - 1) * 0.5).view({1, S});                 // (1, S)
  at::Tensor w = (rois.select(1, 3) - rois.select(1, 1)).view({K, 1});  // (K, 1)
  at::Tensor h = (rois.select(1, 4) - rois.select(1, 2)).view({K, 1});
  at::Tensor dx = w * half_grow, dy = h * half_grow;                    // (K, S)
  at::Tensor b = rois.select(1, 0).view({K, 1}).expand({K, S});
  at::Tensor out = at::stack({b, rois.select(1, 1).view({K, 1}) - dx, rois.select(1, 2).view({K, 1}) - dy,
                              rois.select(1, 3).view({K, 1}) + dx, rois.select(1, 4).view({K, 1}) + dy},
                             2);  // (K, S, 5)
  return out.reshape({K * S, 5});
}

void check_context_scales(const char* op, at::ArrayRef<double> context_scales) {
  TORCH_CHECK(!context_scales.empty(), op, ": context_scales is empty; expected e.g. [1, 1.5, 2, 4]");
  for (size_t i = 0; i < context_scales.size(); ++i) {
    TORCH_CHECK(context_scales[i] > 0, op, ": context_scales[", i, "] = ", context_scales[i],
                " must be positive");
  }
}

at::Tensor multicontext_roi_align(const at::Tensor& input, const at::Tensor& rois,
                                  at::ArrayRef<double> context_scales, double spatial_scale,
                                  int64_t pooled_height, int64_t pooled_width,
                                  int64_t sampling_ratio, bool aligned) {
  constexpr const char* op = "segkit::multicontext_roi_align";
  check_feature_and_rois(op, input, rois);
  check_context_scales(op, context_scales);
  static auto roi_align = c10::Dispatcher::singleton()
                              .findSchemaOrThrow("segkit::roi_align", "")
                              .typed<at::Tensor(const at::Tensor&, const at::Tensor&, double, int64_t,
                                                int64_t, int64_t, bool)>();
  const int64_t K = rois.size(0), S = static_cast<int64_t>(context_scales.size());
  at::Tensor pooled = roi_align.call(input, expand_rois(rois, context_scales), spatial_scale,
                                     pooled_height, pooled_width, sampling_ratio, aligned);
  // (K * S, C, PH, PW) -> (K, S, C, PH, PW); a view for NCHW, a copy for channels-last
  return pooled.reshape({K, S, input.size(1), pooled_height, pooled_width});
}

at::Tensor multicontext_roi_align_backward(const at::Tensor& grad, const at::Tensor& rois,
                                           at::ArrayRef<double> context_scales, double spatial_scale,
                                           int64_t pooled_height, int64_t pooled_width,
                                           int64_t batch_size, int64_t channels, int64_t height,
                                           int64_t width, int64_t sampling_ratio, bool aligned) {
  constexpr const char* op = "segkit::_multicontext_roi_align_backward";
  check_context_scales(op, context_scales);
  const int64_t K = rois.size(0), S = static_cast<int64_t>(context_scales.size());
  TORCH_CHECK(grad.dim() == 5 && grad.size(0) == K && grad.size(1) == S, op,
              ": grad must have shape (", K, ", ", S, ", C, PH, PW), got ", shape_str(grad));
  static auto backward = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("segkit::_roi_align_backward", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, double, int64_t,
                                               int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                                               bool)>();
  return backward.call(grad.reshape({K * S, channels, pooled_height, pooled_width}),
                       expand_rois(rois, context_scales), spatial_scale, pooled_height,
                       pooled_width, batch_size, channels, height, width, sampling_ratio, aligned);
}

}  // namespace

TORCH_LIBRARY_IMPL(segkit, CPU, m) {
  m.impl("multicontext_roi_align", &multicontext_roi_align);
  m.impl("_multicontext_roi_align_backward", &multicontext_roi_align_backward);
}

#ifdef WITH_CUDA
TORCH_LIBRARY_IMPL(segkit, CUDA, m) {
  m.impl("multicontext_roi_align", &multicontext_roi_align);
  m.impl("_multicontext_roi_align_backward", &multicontext_roi_align_backward);
}
#endif

}  // namespace segkit
