// Greedy non-maximum suppression on CPU: nms and batched_nms.
//
// Greedy NMS as used at test time by R-CNN / Fast R-CNN and by the Faster R-CNN RPN: visit the
// boxes by decreasing score, keep a box unless a kept box overlaps it with IoU > threshold.
// The IoU arithmetic is torchvision.ops.nms's, operation for operation:
//   area  = (x2 - x1) * (y2 - y1)
//   inter = max(0, min(x2) - max(x1)) * max(0, min(y2) - max(y1))
//   iou   = inter / (area_i + area_j - inter),      suppressed when iou > threshold,
// and the visiting order is torch's stable descending sort of the scores (ties: lower index
// first; NaN scores sort first, as torch.sort does), computed here by a radix sort. float32 /
// float64 results therefore equal torchvision's index for index. float16 / bfloat16 boxes are
// computed in float, which equals torchvision on the upcast tensors.
//
// Speed: the boxes are copied once into score-ordered structure-of-arrays buffers, so the inner
// loop over lower-scored boxes is unit-stride and branch-free (suppression flags are OR-ed,
// never tested) and the compiler vectorizes it; suppressed boxes are skipped in the outer loop
// only. batched_nms runs the independent per-class problems in parallel.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "segkit_ops.h"

namespace segkit {
namespace {

constexpr const char* kNmsOp = "segkit::nms";
constexpr const char* kBatchedNmsOp = "segkit::batched_nms";

// The threshold as the compute type would compare it. torchvision compares the float IoU with
// the double threshold (`float > double` promotes to double). For float the same decision is
// `iou > t` with t = the largest float <= threshold: no float lies strictly between t and the
// threshold, so the comparison stays in float (full vector width) and decides identically.
template <typename acc_t>
acc_t compare_threshold(double threshold) {
  if constexpr (std::is_same_v<acc_t, double>) {
    return threshold;
  } else {
    acc_t t = static_cast<acc_t>(threshold);
    if (static_cast<double>(t) > threshold) {
      t = std::nextafter(t, -std::numeric_limits<acc_t>::infinity());
    }
    return t;
  }
}

// Boxes of one or more NMS problems in visiting order, one array per coordinate.
template <typename acc_t>
struct BoxArrays {
  std::vector<acc_t> x1, y1, x2, y2, area;
  explicit BoxArrays(int64_t n) : x1(n), y1(n), x2(n), y2(n), area(n) {}
};

// Copies boxes[source[t]] into slot t (any strides, any float type) and computes its area.
template <typename scalar_t, typename acc_t>
void gather_boxes(const at::Tensor& boxes, const std::vector<int64_t>& source,
                  BoxArrays<acc_t>& out) {
  const auto box = boxes.accessor<const scalar_t, 2>();
  const int64_t n = static_cast<int64_t>(source.size());
  for (int64_t t = 0; t < n; ++t) {
    const auto row = box[source[t]];
    const acc_t x1 = static_cast<acc_t>(row[0]), y1 = static_cast<acc_t>(row[1]);
    const acc_t x2 = static_cast<acc_t>(row[2]), y2 = static_cast<acc_t>(row[3]);
    out.x1[t] = x1;
    out.y1[t] = y1;
    out.x2[t] = x2;
    out.y2[t] = y2;
    out.area[t] = (x2 - x1) * (y2 - y1);
  }
}

// Marks every box j in [0, count) whose IoU with box i exceeds the threshold. Written without
// branches so that it vectorizes; std::max / std::min with torchvision's argument order keep its
// NaN behaviour. `union - inter` must not become a fused multiply-add (one rounding fewer than
// torchvision): `inter` is a separate statement and also the division's numerator, which keeps
// GCC's -ffp-contract=fast from fusing it (no FMA in the -march=native build's loop).
template <typename acc_t>
void suppress_overlaps(acc_t ix1, acc_t iy1, acc_t ix2, acc_t iy2, acc_t iarea,
                       const acc_t* __restrict x1, const acc_t* __restrict y1,
                       const acc_t* __restrict x2, const acc_t* __restrict y2,
                       const acc_t* __restrict area, int64_t count, acc_t threshold,
                       uint8_t* __restrict removed) {
  for (int64_t j = 0; j < count; ++j) {
    const acc_t w = std::max(acc_t(0), std::min(ix2, x2[j]) - std::max(ix1, x1[j]));
    const acc_t h = std::max(acc_t(0), std::min(iy2, y2[j]) - std::max(iy1, y1[j]));
    const acc_t inter = w * h;
    const acc_t iou = inter / (iarea + area[j] - inter);
    removed[j] |= static_cast<uint8_t>(iou > threshold);
  }
}

// Greedy NMS of slots [begin, end) of `boxes` (already in visiting order); sets removed[t] for
// every suppressed slot. A removed box suppresses nothing, so it is skipped as a candidate.
template <typename acc_t>
void greedy_nms(const BoxArrays<acc_t>& boxes, int64_t begin, int64_t end, acc_t threshold,
                uint8_t* removed) {
  const acc_t* x1 = boxes.x1.data();
  const acc_t* y1 = boxes.y1.data();
  const acc_t* x2 = boxes.x2.data();
  const acc_t* y2 = boxes.y2.data();
  const acc_t* area = boxes.area.data();
  for (int64_t i = begin; i < end; ++i) {
    if (removed[i]) continue;
    const int64_t next = i + 1;
    suppress_overlaps(x1[i], y1[i], x2[i], y2[i], area[i], x1 + next, y1 + next, x2 + next,
                      y2 + next, area + next, end - next, threshold, removed + next);
  }
}

void check_boxes_and_scores(const char* op, const at::Tensor& boxes, const at::Tensor& scores) {
  TORCH_CHECK(boxes.dim() == 2 && boxes.size(1) == 4, op,
              ": boxes must have shape (N, 4) [x1, y1, x2, y2], got ", shape_str(boxes));
  TORCH_CHECK(scores.dim() == 1 && scores.size(0) == boxes.size(0), op,
              ": scores must have shape (N,) = (", boxes.size(0), ",) like boxes, got ",
              shape_str(scores));
  TORCH_CHECK(at::isFloatingType(boxes.scalar_type()), op,
              ": boxes must be a floating tensor, got ", boxes.scalar_type());
  TORCH_CHECK(scores.scalar_type() == boxes.scalar_type(), op, ": scores are ",
              scores.scalar_type(), " but boxes are ", boxes.scalar_type(),
              "; expected the same dtype");
  TORCH_CHECK(boxes.device() == scores.device(), op, ": boxes are on ", boxes.device(),
              " but scores are on ", scores.device(), "; expected the same device");
  TORCH_CHECK(boxes.is_cpu(), op, ": the CPU kernel got boxes on ", boxes.device());
}

// Radix key of a score: ascending keys = torch.sort(descending=True) order of the scores, so
// NaN first (torch ranks NaN above +inf), then +inf ... -inf, with -0.0 tied to +0.0.
template <typename bits_t, typename value_t>
bits_t descending_key(value_t v) {
  constexpr bits_t sign = bits_t(1) << (8 * sizeof(bits_t) - 1);
  if (std::isnan(v)) return 0;
  if (v == 0) v = 0;  // -0.0 == +0.0 in torch's comparison: same key, so index order decides
  bits_t u;
  std::memcpy(&u, &v, sizeof(u));
  u = (u & sign) ? ~u : (u | sign);  // IEEE bits -> unsigned in increasing value order
  return ~u;                         // reversed; no number maps to 0 (that is a NaN pattern)
}

// Stable LSD radix sort (one byte per pass) of slot indices 0..n-1 by key: ties keep index
// order, which is torch's stable sort. Linear time: torch.sort of the scores took longer than
// the suppression itself on box-head inputs (~0.4 ms of ~0.6 ms for 8000 boxes). Passes in
// which every key has the same byte are skipped (scores in [0, 1] share their top bytes).
template <typename bits_t>
std::vector<int64_t> radix_argsort(std::vector<bits_t>& keys) {
  constexpr int kPasses = sizeof(bits_t);
  const int64_t n = static_cast<int64_t>(keys.size());
  std::vector<std::array<int64_t, 256>> count(kPasses);
  for (auto& c : count) c.fill(0);
  for (const bits_t k : keys) {
    for (int p = 0; p < kPasses; ++p) ++count[p][(k >> (8 * p)) & 0xff];
  }
  std::vector<int64_t> index(n), index_next(n);
  for (int64_t i = 0; i < n; ++i) index[i] = i;
  std::vector<bits_t> keys_next(n);
  for (int p = 0; p < kPasses; ++p) {
    const auto& c = count[p];
    if (*std::max_element(c.begin(), c.end()) == n) continue;  // this byte is constant
    std::array<int64_t, 256> next;
    int64_t sum = 0;
    for (int d = 0; d < 256; ++d) {
      next[d] = sum;
      sum += c[d];
    }
    for (int64_t i = 0; i < n; ++i) {
      const int64_t to = next[(keys[i] >> (8 * p)) & 0xff]++;
      keys_next[to] = keys[i];
      index_next[to] = index[i];
    }
    keys.swap(keys_next);
    index.swap(index_next);
  }
  return index;
}

// Slot order of the greedy pass: indices of `scores` by decreasing score, stable, exactly as
// torch.sort(scores, stable=True, descending=True) (torchvision's order).
std::vector<int64_t> visiting_order(const at::Tensor& scores) {
  std::vector<int64_t> order;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "segkit::nms",
                                  [&] {
    // Half types sort by their exact float value; float / double by their own bits.
    using key_float_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    using bits_t = std::conditional_t<std::is_same_v<scalar_t, double>, uint64_t, uint32_t>;
    const auto score = scores.accessor<const scalar_t, 1>();
    std::vector<bits_t> keys(scores.size(0));
    for (int64_t i = 0; i < scores.size(0); ++i) {
      keys[i] = descending_key<bits_t>(static_cast<key_float_t>(score[i]));
    }
    order = radix_argsort(keys);
  });
  return order;
}

at::Tensor nms_cpu(const at::Tensor& boxes, const at::Tensor& scores, double iou_threshold) {
  check_boxes_and_scores(kNmsOp, boxes, scores);
  const int64_t n = boxes.size(0);
  if (n == 0) return at::empty({0}, boxes.options().dtype(at::kLong));

  const std::vector<int64_t> order = visiting_order(scores);
  std::vector<uint8_t> removed(n, 0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, boxes.scalar_type(), kNmsOp, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    BoxArrays<acc_t> sorted(n);
    gather_boxes<scalar_t>(boxes, order, sorted);
    greedy_nms(sorted, 0, n, compare_threshold<acc_t>(iou_threshold), removed.data());
  });

  const int64_t kept = n - std::count(removed.begin(), removed.end(), uint8_t(1));
  at::Tensor keep = at::empty({kept}, boxes.options().dtype(at::kLong));
  int64_t* out = keep.mutable_data_ptr<int64_t>();
  for (int64_t t = 0; t < n; ++t) {
    if (!removed[t]) *out++ = order[t];
  }
  return keep;
}

// Groups slots by class without losing score order: on return slots_by_class lists the slots
// of class group g at [group_start[g], group_start[g + 1]), each group in increasing slot
// (= decreasing score) order. `cls` is the class of every slot.
void group_slots(const std::vector<int64_t>& cls, std::vector<int64_t>& slots_by_class,
                 std::vector<int64_t>& group_start) {
  const int64_t n = static_cast<int64_t>(cls.size());
  const auto [lo_it, hi_it] = std::minmax_element(cls.begin(), cls.end());
  const int64_t lo = *lo_it;
  // Span computed in unsigned arithmetic: class ids may be any int64 values.
  const uint64_t span = static_cast<uint64_t>(*hi_it) - static_cast<uint64_t>(lo);
  slots_by_class.resize(n);
  group_start.clear();
  if (span < static_cast<uint64_t>(2 * n + 1024)) {
    // Dense ids (classes, levels, images): a stable counting sort, O(n + span).
    std::vector<int64_t> offset(span + 2, 0);
    for (int64_t t = 0; t < n; ++t) ++offset[cls[t] - lo + 1];
    for (uint64_t k = 0; k <= span; ++k) {
      if (offset[k + 1] > 0) group_start.push_back(offset[k]);
      offset[k + 1] += offset[k];
    }
    for (int64_t t = 0; t < n; ++t) slots_by_class[offset[cls[t] - lo]++] = t;
  } else {
    for (int64_t t = 0; t < n; ++t) slots_by_class[t] = t;
    std::stable_sort(slots_by_class.begin(), slots_by_class.end(),
                     [&](int64_t a, int64_t b) { return cls[a] < cls[b]; });
    for (int64_t t = 0; t < n; ++t) {
      if (t == 0 || cls[slots_by_class[t]] != cls[slots_by_class[t - 1]]) group_start.push_back(t);
    }
  }
  group_start.push_back(n);
}

at::Tensor batched_nms_cpu(const at::Tensor& boxes, const at::Tensor& scores,
                           const at::Tensor& idxs, double iou_threshold) {
  check_boxes_and_scores(kBatchedNmsOp, boxes, scores);
  TORCH_CHECK(idxs.dim() == 1 && idxs.size(0) == boxes.size(0), kBatchedNmsOp,
              ": idxs must have shape (N,) = (", boxes.size(0), ",) like boxes, got ",
              shape_str(idxs));
  TORCH_CHECK(at::isIntegralType(idxs.scalar_type(), /*includeBool=*/false), kBatchedNmsOp,
              ": idxs must be an integer tensor (class / level / image ids), got ",
              idxs.scalar_type());
  TORCH_CHECK(idxs.device() == boxes.device(), kBatchedNmsOp, ": idxs are on ", idxs.device(),
              " but boxes are on ", boxes.device(), "; expected the same device");
  const int64_t n = boxes.size(0);
  if (n == 0) return at::empty({0}, boxes.options().dtype(at::kLong));

  // One global stable sort gives every box its slot; classes are then formed from the slots,
  // so each class is already in visiting order and the kept slots, read in slot order, are the
  // output order (decreasing score, ties by index) with no second sort.
  const std::vector<int64_t> order = visiting_order(scores);
  const at::Tensor ids = idxs.to(at::kLong).contiguous();
  const int64_t* id = ids.const_data_ptr<int64_t>();
  std::vector<int64_t> cls(n);
  for (int64_t t = 0; t < n; ++t) cls[t] = id[order[t]];
  std::vector<int64_t> slots_by_class, group_start;
  group_slots(cls, slots_by_class, group_start);
  const int64_t groups = static_cast<int64_t>(group_start.size()) - 1;

  // Boxes laid out class after class (position p holds slot slots_by_class[p]).
  std::vector<int64_t> source(n);
  for (int64_t p = 0; p < n; ++p) source[p] = order[slots_by_class[p]];
  std::vector<uint8_t> removed(n, 0);

  // Largest classes first, handed out one at a time to whichever thread is free: the cost of a
  // class grows like its size squared, so a static split could leave one thread with most of
  // the work. Classes are independent, so the result does not depend on the schedule.
  std::vector<int64_t> schedule(groups);
  for (int64_t g = 0; g < groups; ++g) schedule[g] = g;
  auto size_of = [&](int64_t g) { return group_start[g + 1] - group_start[g]; };
  std::stable_sort(schedule.begin(), schedule.end(),
                   [&](int64_t a, int64_t b) { return size_of(a) > size_of(b); });
  double pair_work = 0;
  for (int64_t g = 0; g < groups; ++g) pair_work += 0.5 * double(size_of(g)) * double(size_of(g));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, boxes.scalar_type(), kBatchedNmsOp,
                                  [&] {
    using acc_t = at::opmath_type<scalar_t>;
    BoxArrays<acc_t> grouped(n);
    gather_boxes<scalar_t>(boxes, source, grouped);
    const acc_t threshold = compare_threshold<acc_t>(iou_threshold);
    std::atomic<int64_t> next_group{0};
    auto drain = [&](int64_t /*begin*/, int64_t /*end*/) {
      for (int64_t k = next_group.fetch_add(1); k < groups; k = next_group.fetch_add(1)) {
        const int64_t g = schedule[k];
        greedy_nms(grouped, group_start[g], group_start[g + 1], threshold, removed.data());
      }
    };
    // A pair costs well under a nanosecond in the vectorized loop, so below ~1M pairs (at most
    // a few hundred microseconds) waking a thread team costs more than it can save.
    const int64_t workers =
        pair_work < 1e6 ? 1 : std::min<int64_t>(groups, at::get_num_threads());
    if (workers <= 1) {
      drain(0, 1);
    } else {
      at::parallel_for(0, workers, 1, drain);
    }
  });

  std::vector<uint8_t> kept_slot(n, 0);
  int64_t kept = 0;
  for (int64_t p = 0; p < n; ++p) {
    kept_slot[slots_by_class[p]] = !removed[p];
    kept += !removed[p];
  }
  at::Tensor keep = at::empty({kept}, boxes.options().dtype(at::kLong));
  int64_t* out = keep.mutable_data_ptr<int64_t>();
  for (int64_t t = 0; t < n; ++t) {
    if (kept_slot[t]) *out++ = order[t];
  }
  return keep;
}

}  // namespace
}  // namespace segkit

TORCH_LIBRARY_IMPL(segkit, CPU, m) {
  m.impl("nms", &segkit::nms_cpu);
  m.impl("batched_nms", &segkit::batched_nms_cpu);
}
