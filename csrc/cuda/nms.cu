// Greedy non-maximum suppression on CUDA, in two kernels:
//  1. suppression bitmask: with boxes sorted by decreasing score, bit j of mask[i][j / 64] says
//     "box i overlaps box j > i by more than the threshold". One 64-thread block compares a
//     64-box row tile with a 64-box column tile staged in shared memory; tiles below the
//     diagonal are skipped (a box only ever suppresses lower-scored ones).
//  2. greedy scan on the device: one block walks the 64-box column blocks in score order,
//     decides within a block serially (only the diagonal mask word matters there) and then
//     ORs the rows of the kept boxes into the "removed" words of all later blocks in parallel.
//     This keeps the O(N^2 / 64) mask on the device (torchvision copies it to the host).
// The IoU arithmetic and keep decisions match torchvision.ops.nms on CUDA; equal scores are
// ordered by index (stable sort), where torchvision's order of ties is unspecified.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "cuda_helpers.cuh"
#include "segkit_ops.h"

namespace segkit {
namespace cuda {
namespace {

constexpr int kBoxesPerWord = 64;  // one bit per box in an unsigned 64-bit word
constexpr int kScanThreads = 512;  // >= kBoxesPerWord (the scan loads one diagonal word per box)

// IoU(a, b) > threshold with torchvision's rounding points (intersection sides in the boxes'
// dtype, products and ratio in at::acc_type, threshold as float), so that the kept set is
// identical to torchvision's for every dtype, half included. For float/double the casts to T
// are no-ops.
template <typename T>
C10_HOST_DEVICE inline bool iou_above(const T* a, const T* b, float threshold) {
  using acc_t = at::acc_type<T, true>;
  // fmax/fmin as CUDA's max/min on floats: a NaN coordinate yields the other operand.
  const acc_t left = std::fmax(static_cast<acc_t>(a[0]), static_cast<acc_t>(b[0]));
  const acc_t right = std::fmin(static_cast<acc_t>(a[2]), static_cast<acc_t>(b[2]));
  const acc_t top = std::fmax(static_cast<acc_t>(a[1]), static_cast<acc_t>(b[1]));
  const acc_t bottom = std::fmin(static_cast<acc_t>(a[3]), static_cast<acc_t>(b[3]));
  const acc_t width = std::fmax(static_cast<acc_t>(static_cast<T>(right - left)), acc_t(0));
  const acc_t height = std::fmax(static_cast<acc_t>(static_cast<T>(bottom - top)), acc_t(0));
  const acc_t inter = width * height;
  // The heights are rounded to T before the product (torchvision's half quirk).
  const acc_t ha =
      static_cast<acc_t>(static_cast<T>(static_cast<acc_t>(a[3]) - static_cast<acc_t>(a[1])));
  const acc_t hb =
      static_cast<acc_t>(static_cast<T>(static_cast<acc_t>(b[3]) - static_cast<acc_t>(b[1])));
  const acc_t area_a = (static_cast<acc_t>(a[2]) - static_cast<acc_t>(a[0])) * ha;
  const acc_t area_b = (static_cast<acc_t>(b[2]) - static_cast<acc_t>(b[0])) * hb;
  return inter / (area_a + area_b - inter) > threshold;
}

// Bits j in [first, count) set where box `cur` suppresses column box j of `cols`.
template <typename T>
C10_HOST_DEVICE inline unsigned long long overlap_bits(const T* cur, const T* cols, int first,
                                                       int count, float threshold) {
  unsigned long long bits = 0;
  for (int j = first; j < count; ++j) {
    if (iou_above(cur, cols + j * 4, threshold)) bits |= 1ULL << j;
  }
  return bits;
}

C10_HOST_DEVICE inline int lowest_set_bit(unsigned long long x) {
#ifdef __CUDA_ARCH__
  return __ffsll(static_cast<long long>(x)) - 1;
#else
  return __builtin_ctzll(x);
#endif
}

// Greedy decisions within one 64-box block, given the boxes already removed by earlier blocks
// (`gone`) and the block's diagonal mask words: box i survives unless a kept, higher-scored
// box removed it. Returns the kept boxes as a bit set.
C10_HOST_DEVICE inline unsigned long long decide_block(unsigned long long gone,
                                                       const unsigned long long* diag, int rows) {
  unsigned long long kept = 0;
  for (int i = 0; i < rows; ++i) {
    if (!((gone >> i) & 1ULL)) {
      kept |= 1ULL << i;
      gone |= diag[i];
    }
  }
  return kept;
}

// `removed` word of a later block j after the kept boxes of block `blk` removed their overlaps.
C10_HOST_DEVICE inline unsigned long long propagate(unsigned long long word,
                                                    unsigned long long kept,
                                                    const unsigned long long* mask, int64_t blk,
                                                    int64_t col_blocks, int64_t j) {
  for (unsigned long long bits = kept; bits != 0; bits &= bits - 1) {
    const int64_t i = blk * kBoxesPerWord + lowest_set_bit(bits);
    word |= mask[i * col_blocks + j];
  }
  return word;
}

template <typename T>
__global__ void __launch_bounds__(kBoxesPerWord)
    nms_mask_kernel(int64_t n, int64_t col_blocks, const T* __restrict__ boxes, float threshold,
                    unsigned long long* __restrict__ mask) {
  const int64_t row_block = blockIdx.y;
  const int64_t col_block = blockIdx.x;
  if (row_block > col_block) return;
  const int rows = static_cast<int>(imin(n - row_block * kBoxesPerWord, int64_t(kBoxesPerWord)));
  const int cols = static_cast<int>(imin(n - col_block * kBoxesPerWord, int64_t(kBoxesPerWord)));
  const int tid = static_cast<int>(threadIdx.x);

  __shared__ T tile[kBoxesPerWord * 4];
  if (tid < cols) {
    const T* src = boxes + (col_block * kBoxesPerWord + tid) * 4;
#pragma unroll
    for (int k = 0; k < 4; ++k) tile[tid * 4 + k] = src[k];
  }
  __syncthreads();

  if (tid < rows) {
    const int64_t i = row_block * kBoxesPerWord + tid;
    T cur[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) cur[k] = boxes[i * 4 + k];
    const int first = row_block == col_block ? tid + 1 : 0;
    mask[i * col_blocks + col_block] = overlap_bits(cur, tile, first, cols, threshold);
  }
}

// Single-block greedy scan. `removed` (col_blocks words, zeroed) and `keep` (n, zeroed) live in
// global memory; __syncthreads() orders every thread's writes before the next block reads them.
__global__ void __launch_bounds__(kScanThreads)
    nms_scan_kernel(int64_t n, int64_t col_blocks, const unsigned long long* __restrict__ mask,
                    unsigned long long* __restrict__ removed, bool* __restrict__ keep) {
  __shared__ unsigned long long diag[kBoxesPerWord];
  const int tid = static_cast<int>(threadIdx.x);
  for (int64_t blk = 0; blk < col_blocks; ++blk) {
    const int64_t base = blk * kBoxesPerWord;
    const int rows = static_cast<int>(imin(n - base, int64_t(kBoxesPerWord)));
    if (tid < rows) diag[tid] = mask[(base + tid) * col_blocks + blk];
    __syncthreads();  // diag is loaded and removed[blk] holds every earlier block's verdicts
    // Every thread computes the same `kept` (64 steps on shared memory), saving a broadcast.
    const unsigned long long kept = decide_block(removed[blk], diag, rows);
    for (int i = tid; i < rows; i += blockDim.x) keep[base + i] = (kept >> i) & 1ULL;
    for (int64_t j = blk + 1 + tid; j < col_blocks; j += blockDim.x) {
      removed[j] = propagate(removed[j], kept, mask, blk, col_blocks, j);
    }
    __syncthreads();  // removed[] updated, diag free to be overwritten
  }
}

// Fills mask[i * col_blocks + cb] for every row i and column block cb >= i's block.
template <typename T>
void compute_mask(int64_t n, int64_t col_blocks, const T* boxes, float threshold,
                  unsigned long long* mask, cudaStream_t stream) {
#ifdef SEGKIT_HOST_EMULATION
  (void)stream;
  for (int64_t rb = 0; rb < col_blocks; ++rb) {
    for (int64_t cb = rb; cb < col_blocks; ++cb) {
      const int rows = static_cast<int>(std::min<int64_t>(n - rb * kBoxesPerWord, kBoxesPerWord));
      const int cols = static_cast<int>(std::min<int64_t>(n - cb * kBoxesPerWord, kBoxesPerWord));
      for (int t = 0; t < rows; ++t) {
        const int64_t i = rb * kBoxesPerWord + t;
        mask[i * col_blocks + cb] = overlap_bits(boxes + i * 4, boxes + cb * kBoxesPerWord * 4,
                                                 rb == cb ? t + 1 : 0, cols, threshold);
      }
    }
  }
#else
  const dim3 grid(static_cast<unsigned int>(col_blocks), static_cast<unsigned int>(col_blocks));
  nms_mask_kernel<T><<<grid, kBoxesPerWord, 0, stream>>>(n, col_blocks, boxes, threshold, mask);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
#endif
}

void greedy_scan(int64_t n, int64_t col_blocks, const unsigned long long* mask,
                 unsigned long long* removed, bool* keep, cudaStream_t stream) {
#ifdef SEGKIT_HOST_EMULATION
  (void)stream;
  for (int64_t blk = 0; blk < col_blocks; ++blk) {
    const int64_t base = blk * kBoxesPerWord;
    const int rows = static_cast<int>(std::min<int64_t>(n - base, kBoxesPerWord));
    unsigned long long diag[kBoxesPerWord];
    for (int t = 0; t < rows; ++t) diag[t] = mask[(base + t) * col_blocks + blk];
    const unsigned long long kept = decide_block(removed[blk], diag, rows);
    for (int i = 0; i < rows; ++i) keep[base + i] = (kept >> i) & 1ULL;
    for (int64_t j = blk + 1; j < col_blocks; ++j) {
      removed[j] = propagate(removed[j], kept, mask, blk, col_blocks, j);
    }
  }
#else
  nms_scan_kernel<<<1, kScanThreads, 0, stream>>>(n, col_blocks, mask, removed, keep);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
#endif
}

void check_boxes_scores(const char* op, const at::Tensor& boxes, const at::Tensor& scores) {
  TORCH_CHECK(boxes.dim() == 2 && boxes.size(1) == 4, op,
              ": boxes must have shape (N, 4) XYXY, got ", shape_str(boxes));
  TORCH_CHECK(scores.dim() == 1 && scores.size(0) == boxes.size(0), op,
              ": scores must have shape (", boxes.size(0), "), got ", shape_str(scores));
  TORCH_CHECK(at::isFloatingType(boxes.scalar_type()), op,
              ": boxes must be a floating tensor, got ", boxes.scalar_type());
  TORCH_CHECK(boxes.device() == scores.device(), op, ": boxes are on ", boxes.device(),
              " but scores are on ", scores.device(), "; expected the same device");
  TORCH_CHECK(boxes.scalar_type() == scores.scalar_type(), op, ": boxes are ",
              boxes.scalar_type(), " but scores are ", scores.scalar_type(),
              "; expected the same dtype");
  check_device(op, boxes, "boxes");
}

// NMS of checked, non-empty CUDA inputs; `scores` only sets the order.
at::Tensor nms_impl(const char* op, const at::Tensor& boxes, const at::Tensor& scores,
                    double iou_threshold) {
  const int64_t n = boxes.size(0);
  const int64_t col_blocks = (n + kBoxesPerWord - 1) / kBoxesPerWord;
  TORCH_CHECK(col_blocks <= 65535, op, ": at most ", int64_t(65535) * kBoxesPerWord,
              " boxes are supported on CUDA, got ", n);
  // Stable descending sort: equal scores keep their input order (lower index first).
  const at::Tensor order =
      std::get<1>(scores.sort(/*stable=*/true, /*dim=*/0, /*descending=*/true));
  const at::Tensor sorted = boxes.index_select(0, order).contiguous();
  at::Tensor mask = at::empty({n * col_blocks}, boxes.options().dtype(at::kLong));
  at::Tensor removed = at::zeros({col_blocks}, boxes.options().dtype(at::kLong));
  at::Tensor keep = at::zeros({n}, boxes.options().dtype(at::kBool));
  cudaStream_t stream = current_stream();
  auto* mask_ptr = reinterpret_cast<unsigned long long*>(mask.mutable_data_ptr<int64_t>());
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, sorted.scalar_type(), "segkit_nms_cuda", [&] {
    compute_mask<scalar_t>(n, col_blocks, sorted.const_data_ptr<scalar_t>(),
                           static_cast<float>(iou_threshold), mask_ptr, stream);
  });
  greedy_scan(n, col_blocks, mask_ptr,
              reinterpret_cast<unsigned long long*>(removed.mutable_data_ptr<int64_t>()),
              keep.mutable_data_ptr<bool>(), stream);
  // `order` is already by decreasing score, so the kept indices come out in that order.
  return order.masked_select(keep);
}

at::Tensor nms_cuda(const at::Tensor& boxes, const at::Tensor& scores, double iou_threshold) {
  constexpr const char* op = "segkit::nms";
  check_boxes_scores(op, boxes, scores);
  DeviceGuard guard(boxes.device());
  if (boxes.size(0) == 0) return at::empty({0}, boxes.options().dtype(at::kLong));
  return nms_impl(op, boxes, scores, iou_threshold);
}

// Per-category NMS in a single pass (torchvision's coordinate trick): shifting every category
// by idx * (max_coordinate + 1) puts different categories' boxes in disjoint regions, so they
// never overlap and one plain NMS suffices.
at::Tensor batched_nms_cuda(const at::Tensor& boxes, const at::Tensor& scores,
                            const at::Tensor& idxs, double iou_threshold) {
  constexpr const char* op = "segkit::batched_nms";
  check_boxes_scores(op, boxes, scores);
  TORCH_CHECK(idxs.dim() == 1 && idxs.size(0) == boxes.size(0), op,
              ": idxs must have shape (", boxes.size(0), "), got ", shape_str(idxs));
  TORCH_CHECK(at::isIntegralType(idxs.scalar_type(), /*includeBool=*/false), op,
              ": idxs must be an integer tensor, got ", idxs.scalar_type());
  TORCH_CHECK(idxs.device() == boxes.device(), op, ": idxs are on ", idxs.device(),
              " but boxes are on ", boxes.device(), "; expected the same device");
  DeviceGuard guard(boxes.device());
  if (boxes.size(0) == 0) return at::empty({0}, boxes.options().dtype(at::kLong));

  // float16 would overflow (65504) and bfloat16 would round the shifted coordinates to
  // multiples of up to 2^k: shift in float32 instead.
  const bool low_precision =
      boxes.scalar_type() == at::kHalf || boxes.scalar_type() == at::kBFloat16;
  const at::Tensor b = low_precision ? boxes.to(at::kFloat) : boxes;
  // torchvision's trick assumes coordinates >= 0 (max + 1 is then a spacing wider than any
  // box). Translating by min(min_coordinate, 0) first makes that hold for any boxes; for the
  // usual non-negative boxes it subtracts 0 and the result is bit-identical to torchvision.
  // All on the device: no host synchronisation here.
  const at::Tensor shifted = b - at::clamp_max(b.min(), 0);
  const at::Tensor offsets = idxs.to(b.scalar_type()) * (shifted.max() + 1);
  const at::Tensor boxes_for_nms = shifted + offsets.unsqueeze(1);
  return nms_impl(op, boxes_for_nms, scores, iou_threshold);
}

}  // namespace
}  // namespace cuda
}  // namespace segkit

TORCH_LIBRARY_IMPL(segkit, SEGKIT_DISPATCH_KEY, m) {
  m.impl("nms", &segkit::cuda::nms_cuda);
  m.impl("batched_nms", &segkit::cuda::batched_nms_cuda);
}
