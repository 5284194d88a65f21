// Shared declarations of segkit's compiled ops (segkit._C).
//
// Conventions (see segkit/layers/ops.py for the Python view):
//   boxes are XYXY absolute pixel coordinates; RoI rows are [batch_idx, x1, y1, x2, y2];
//   feature maps are (B, C, H, W) in NCHW or channels-last memory format.
// Every kernel file registers its implementations with TORCH_LIBRARY_IMPL(segkit, <key>, m);
// the schemas live in ops.cpp.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <string>
#include <vector>

namespace segkit {

// "[3, 4]" for error messages.
inline std::string shape_str(const at::Tensor& t) {
  std::string s = "[";
  for (int64_t i = 0; i < t.dim(); ++i) {
    if (i) s += ", ";
    s += std::to_string(t.size(i));
  }
  return s + "]";
}

// Argument checks shared by every RoI op; `op` names the op in the message
// ("segkit::roi_align: rois must have shape (K, 5), got [3, 4]").
inline void check_feature_and_rois(const char* op, const at::Tensor& input, const at::Tensor& rois) {
  TORCH_CHECK(input.dim() == 4, op, ": input must have shape (B, C, H, W), got ", shape_str(input));
  TORCH_CHECK(rois.dim() == 2 && rois.size(1) == 5, op,
              ": rois must have shape (K, 5) [batch_idx, x1, y1, x2, y2], got ", shape_str(rois));
  TORCH_CHECK(at::isFloatingType(input.scalar_type()), op,
              ": input must be a floating tensor, got ", input.scalar_type());
  TORCH_CHECK(input.device() == rois.device(), op, ": input is on ", input.device(),
              " but rois are on ", rois.device(), "; expected the same device");
  TORCH_CHECK(input.scalar_type() == rois.scalar_type(), op, ": input is ", input.scalar_type(),
              " but rois are ", rois.scalar_type(), "; expected the same dtype");
}

inline void check_pooled_size(const char* op, int64_t pooled_height, int64_t pooled_width) {
  TORCH_CHECK(pooled_height > 0 && pooled_width > 0, op,
              ": output size must be positive, got (", pooled_height, ", ", pooled_width, ")");
}

// Arguments of a pooling op's backward: grad must be (K, C, PH, PW) for the K rois, floating,
// on the rois' device and of their dtype.
inline void check_pooled_grad(const char* op, const at::Tensor& grad, const at::Tensor& rois,
                              int64_t pooled_height, int64_t pooled_width, int64_t batch_size,
                              int64_t channels) {
  TORCH_CHECK(rois.dim() == 2 && rois.size(1) == 5, op,
              ": rois must have shape (K, 5) [batch_idx, x1, y1, x2, y2], got ", shape_str(rois));
  check_pooled_size(op, pooled_height, pooled_width);
  TORCH_CHECK(batch_size >= 0 && channels >= 0, op, ": batch_size and channels must be >= 0");
  TORCH_CHECK(grad.dim() == 4 && grad.size(0) == rois.size(0) && grad.size(1) == channels &&
                  grad.size(2) == pooled_height && grad.size(3) == pooled_width,
              op, ": grad must have shape (K, C, PH, PW) = (", rois.size(0), ", ", channels, ", ",
              pooled_height, ", ", pooled_width, "), got ", shape_str(grad));
  TORCH_CHECK(at::isFloatingType(grad.scalar_type()), op,
              ": grad must be a floating tensor, got ", grad.scalar_type());
  TORCH_CHECK(grad.device() == rois.device(), op, ": grad is on ", grad.device(),
              " but rois are on ", rois.device(), "; expected the same device");
  TORCH_CHECK(grad.scalar_type() == rois.scalar_type(), op, ": grad is ", grad.scalar_type(),
              " but rois are ", rois.scalar_type(), "; expected the same dtype");
}

// RoIPool's backward also takes the forward's argmax: int64, grad's shape and device.
inline void check_pool_argmax(const char* op, const at::Tensor& argmax, const at::Tensor& grad) {
  TORCH_CHECK(argmax.sizes() == grad.sizes(), op, ": argmax must have the shape of grad ",
              shape_str(grad), ", got ", shape_str(argmax));
  TORCH_CHECK(argmax.scalar_type() == at::kLong, op, ": argmax must be int64, got ",
              argmax.scalar_type());
  TORCH_CHECK(argmax.device() == grad.device(), op, ": argmax is on ", argmax.device(),
              " but grad is on ", grad.device(), "; expected the same device");
}

// FPN Eq. 1 (papers.md section 5): pyramid level of a box of area w*h, relative to min_level.
// The 1e-6 keeps boxes of exactly 112, 224, ... px on the coarser level despite log2 rounding;
// computed in `acc_t` (float for float/half/bfloat16 rois) as torchvision's MultiScaleRoIAlign.
// C10_HOST_DEVICE: the CUDA multilevel kernel (cuda/roi_align.cu) calls this on the device so
// that CPU and CUDA assign levels with the same code (CUDA provides the std:: math overloads).
template <typename acc_t>
C10_HOST_DEVICE inline int64_t fpn_level(acc_t x1, acc_t y1, acc_t x2, acc_t y2,
                                         double canonical_box_size, int64_t canonical_level,
                                         int64_t min_level, int64_t max_level) {
  const acc_t area = (x2 - x1) * (y2 - y1);
  const acc_t size = std::sqrt(area);
  acc_t lvl = std::floor(static_cast<acc_t>(canonical_level) +
                         std::log2(size / static_cast<acc_t>(canonical_box_size)) +
                         static_cast<acc_t>(1e-6));
  // An inverted box (negative area) gives NaN: it belongs to no level (-1) and pools to zeros,
  // as in torchvision's MultiScaleRoIAlign. An empty box (-inf) goes to the finest level.
  if (std::isnan(lvl)) return -1;
  if (lvl < static_cast<acc_t>(min_level)) return 0;
  if (lvl > static_cast<acc_t>(max_level)) return max_level - min_level;
  return static_cast<int64_t>(lvl) - min_level;
}

#ifdef WITH_CUDA
// CUDART_VERSION the CUDA kernels were compiled with (csrc/cuda/info.cu: the CUDA headers are
// only on nvcc's include path).
int cuda_build_version();
#endif

// min_level of a list of scales 1/stride (checked to be consecutive powers of two).
int64_t check_pyramid_scales(const char* op, at::ArrayRef<double> scales);

}  // namespace segkit
