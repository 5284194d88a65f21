// Schemas of segkit's compiled ops and the Python module segkit._C.
//
// The kernels register themselves per device (cpu/*.cpp, cuda/*.cu). Autograd formulas and
// fake (meta) kernels are registered from Python (segkit/layers/_compiled.py) with
// torch.library, so torch.compile and torch.export can trace every op.
#include <Python.h>
#include <torch/extension.h>

#include <cmath>

#include "segkit_ops.h"


namespace segkit {

int64_t check_pyramid_scales(const char* op, at::ArrayRef<double> scales) {
  TORCH_CHECK(!scales.empty(), op, ": spatial_scales is empty; expected one scale per level");
  int64_t first = 0;
  for (size_t i = 0; i < scales.size(); ++i) {
    TORCH_CHECK(scales[i] > 0, op, ": spatial_scales[", i, "] = ", scales[i], " must be positive");
    const double lvl = -std::log2(scales[i]);
    TORCH_CHECK(std::abs(lvl - std::round(lvl)) < 1e-6, op, ": spatial_scales[", i, "] = ",
                scales[i], " is not a power of two (1/stride)");
    const int64_t k = static_cast<int64_t>(std::llround(lvl));
    if (i == 0) first = k;
    TORCH_CHECK(k == first + static_cast<int64_t>(i), op,
                ": spatial_scales must be consecutive pyramid levels, finest first; level ", i,
                " has scale ", scales[i]);
  }
  return first;
}

}  // namespace segkit

TORCH_LIBRARY(segkit, m) {
  m.def("roi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
        "SymInt pooled_width, int sampling_ratio, bool aligned) -> Tensor");
  m.def("_roi_align_backward(Tensor grad, Tensor rois, float spatial_scale, SymInt pooled_height, "
        "SymInt pooled_width, SymInt batch_size, SymInt channels, SymInt height, SymInt width, "
        "int sampling_ratio, bool aligned) -> Tensor");
  m.def("roi_pool(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
        "SymInt pooled_width) -> (Tensor, Tensor)");
  m.def("_roi_pool_backward(Tensor grad, Tensor rois, Tensor argmax, float spatial_scale, "
        "SymInt pooled_height, SymInt pooled_width, SymInt batch_size, SymInt channels, "
        "SymInt height, SymInt width) -> Tensor");
  m.def("multilevel_roi_align(Tensor[] features, Tensor rois, float[] spatial_scales, "
        "SymInt pooled_height, SymInt pooled_width, int sampling_ratio, bool aligned, "
        "float canonical_box_size, int canonical_level) -> (Tensor, Tensor)");
  m.def("_multilevel_roi_align_backward(Tensor grad, Tensor rois, Tensor levels, "
        "float[] spatial_scales, SymInt pooled_height, SymInt pooled_width, SymInt batch_size, "
        "SymInt channels, SymInt[] heights, SymInt[] widths, int sampling_ratio, bool aligned) "
        "-> Tensor[]");
  m.def("multicontext_roi_align(Tensor input, Tensor rois, float[] context_scales, "
        "float spatial_scale, SymInt pooled_height, SymInt pooled_width, int sampling_ratio, "
        "bool aligned) -> Tensor");
  m.def("_multicontext_roi_align_backward(Tensor grad, Tensor rois, float[] context_scales, "
        "float spatial_scale, SymInt pooled_height, SymInt pooled_width, SymInt batch_size, "
        "SymInt channels, SymInt height, SymInt width, int sampling_ratio, bool aligned) -> Tensor");
  m.def("paste_masks(Tensor masks, Tensor boxes, SymInt height, SymInt width, float threshold) "
        "-> Tensor");
  m.def("nms(Tensor boxes, Tensor scores, float iou_threshold) -> Tensor");
  m.def("batched_nms(Tensor boxes, Tensor scores, Tensor idxs, float iou_threshold) -> Tensor");
}

#ifndef SEGKIT_TORCH_VERSION
#define SEGKIT_TORCH_VERSION "unknown"
#endif

// What this build contains, for segkit.collect_env() and the import-time version check.
static py::dict build_info() {
  py::dict info;
  info["torch_version"] = SEGKIT_TORCH_VERSION;
#ifdef WITH_CUDA
  info["devices"] = py::make_tuple("cpu", "cuda");
  info["cuda_version"] = segkit::cuda_build_version();
#else
  info["devices"] = py::make_tuple("cpu");
#endif
  info["parallel"] = at::get_parallel_info();
  return info;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "segkit compiled ops; the ops themselves are torch.ops.segkit.*";
  m.def("build_info", &build_info, "Torch version, devices and parallel backend of this build");
}
