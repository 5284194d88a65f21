// Helpers shared by the CUDA kernels in this directory (not part of the public headers).
//
// Every kernel here is written as a functor whose operator()(int64_t index) handles one output
// element (or one RoI / one box) and is C10_HOST_DEVICE; for_each() runs it over [0, total)
// with a grid-stride loop on the current stream.
//
// Test seam: compiled with -DSEGKIT_HOST_EMULATION, for_each() becomes a host loop, the ops
// register for CPU and accept CPU tensors, so the very same per-element code can be checked
// against torchvision's CPU ops on a machine without a GPU (the harness builds the .cu files
// with nvcc as host code). Normal builds never define it.
#pragma once

// Only c10's CUDA headers: ATen/cuda/CUDAContext.h would also pull in the cuBLAS/cuSPARSE
// headers, which not every CUDA toolkit install ships; nothing here needs them.
// c10::cuda::getCurrentCUDAStream is the function at::cuda::getCurrentCUDAStream forwards to.
#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/cuda/Atomic.cuh>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#ifdef SEGKIT_HOST_EMULATION
#define SEGKIT_DISPATCH_KEY CPU
#else
#define SEGKIT_DISPATCH_KEY CUDA
#endif

namespace segkit {
namespace cuda {

// 256 threads: the RoI kernels keep a few dozen registers per thread live (bin geometry, four
// bilinear taps); 256 keeps occupancy high on sm_70..sm_90 without tuning per architecture.
constexpr int kThreads = 256;

#define SEGKIT_CUDA_KERNEL_LOOP(i, n)                                                      \
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < (n); \
       i += static_cast<int64_t>(blockDim.x) * gridDim.x)

template <typename Op>
__global__ void __launch_bounds__(kThreads) for_each_kernel(int64_t total, Op op) {
  SEGKIT_CUDA_KERNEL_LOOP(i, total) { op(i); }
}

#ifdef SEGKIT_HOST_EMULATION
struct DeviceGuard {
  explicit DeviceGuard(at::Device) {}
};
inline cudaStream_t current_stream() { return nullptr; }
inline void check_device(const char*, const at::Tensor&, const char*) {}
template <typename Op>
void for_each(int64_t total, const Op& op, cudaStream_t) {
  for (int64_t i = 0; i < total; ++i) op(i);
}
#else
using DeviceGuard = c10::cuda::CUDAGuard;

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

inline void check_device(const char* op, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got ", t.device());
}

// One thread per item up to 2^28 threads; beyond that threads loop. Loop indices are int64_t,
// so outputs with more than 2^31 elements are handled.
template <typename Op>
void for_each(int64_t total, const Op& op, cudaStream_t stream) {
  if (total <= 0) return;
  const int64_t blocks = std::min<int64_t>((total + kThreads - 1) / kThreads, int64_t(1) << 20);
  for_each_kernel<Op><<<static_cast<unsigned int>(blocks), kThreads, 0, stream>>>(total, op);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
#endif

// *p += v, atomically on the device (several threads may hit the same cell).
template <typename T>
C10_HOST_DEVICE inline void atomic_add(T* p, T v) {
#ifdef __CUDA_ARCH__
  gpuAtomicAddNoReturn(p, v);
#else
  *p += v;
#endif
}

template <typename T>
C10_HOST_DEVICE inline T imax(T a, T b) {
  return a < b ? b : a;
}
template <typename T>
C10_HOST_DEVICE inline T imin(T a, T b) {
  return b < a ? b : a;
}

// Element strides of a (B, C, H, W) map. Kernels address every map through its strides, so
// NCHW and channels-last (and the stride-0 grads autograd sometimes hands back) share code.
struct Strides4 {
  int64_t n, c, h, w;
};

inline Strides4 strides_of(const at::Tensor& t) {
  return Strides4{t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

// Position (n, c, ph, pw) of linear element `index` of a dense (K, C, PH, PW) tensor. Walking
// the elements in memory order makes consecutive threads write (and, for channels-last maps,
// read) consecutive addresses.
C10_HOST_DEVICE inline void unravel(bool channels_last, int64_t index, int64_t C, int64_t PH,
                                    int64_t PW, int64_t& n, int64_t& c, int64_t& ph,
                                    int64_t& pw) {
  if (channels_last) {  // memory order (n, ph, pw, c)
    c = index % C;
    index /= C;
    pw = index % PW;
    index /= PW;
    ph = index % PH;
    n = index / PH;
  } else {  // memory order (n, c, ph, pw)
    pw = index % PW;
    index /= PW;
    ph = index % PH;
    index /= PH;
    c = index % C;
    n = index / C;
  }
}

// Batch index of a RoI row, truncated toward zero like torchvision's (int) cast; -1 when it is
// NaN or outside [0, B). The CUDA kernels cannot raise, so such RoIs pool to zeros and receive
// no gradient instead of reading out of bounds.
template <typename acc_t>
C10_HOST_DEVICE inline int64_t roi_batch_index(acc_t b, int64_t batch_size) {
  return (b > acc_t(-1) && b < static_cast<acc_t>(batch_size)) ? static_cast<int64_t>(b) : -1;
}

template <typename acc_t>
C10_HOST_DEVICE inline bool all_finite(acc_t a, acc_t b, acc_t c, acc_t d) {
  return std::isfinite(a) && std::isfinite(b) && std::isfinite(c) && std::isfinite(d);
}

// A channels-last input gets a channels-last output (the contract's "same memory format");
// anything else is treated as NCHW.
inline at::MemoryFormat format_of(const at::Tensor& t) {
  return t.dim() == 4 && t.suggest_memory_format() == at::MemoryFormat::ChannelsLast
             ? at::MemoryFormat::ChannelsLast
             : at::MemoryFormat::Contiguous;
}

// The backward kernels scatter with atomic adds (summation order varies between runs). Like
// PyTorch's own such kernels they tell torch.use_deterministic_algorithms(True) about it: an
// error, or a warning under warn_only=True (what segkit's train.deterministic sets).
inline void alert_not_deterministic(const char* op) {
  at::globalContext().alertNotDeterministic(op);
}

// Gradients of half/bfloat16 maps are accumulated in float32 (float atomics are native and
// summing many contributions in 16 bits would lose precision), then cast once.
inline at::ScalarType grad_accumulation_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// The zeroed (B, C, H, W) buffer a backward kernel adds into: grad's memory format,
// grad_accumulation_dtype. (at::empty honours the format in the options; at::zeros does not.)
inline at::Tensor zeroed_grad_accumulator(const at::Tensor& grad, int64_t batch_size,
                                          int64_t channels, int64_t height, int64_t width) {
  return at::empty({batch_size, channels, height, width},
                   grad.options()
                       .dtype(grad_accumulation_dtype(grad.scalar_type()))
                       .memory_format(format_of(grad)))
      .zero_();
}

// The accumulated gradient in grad's dtype (.to() keeps the memory format).
inline at::Tensor finish_grad(const at::Tensor& acc, const at::Tensor& grad) {
  return acc.scalar_type() == grad.scalar_type() ? acc : acc.to(grad.scalar_type());
}

}  // namespace cuda
}  // namespace segkit
