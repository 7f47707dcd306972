// CPU kernels of the NMS family (schemas in csrc/nms.cpp).
//
// Exactness: the IoU of two boxes is computed exactly as torchvision's CPU kernel does it (csrc/nms_math.h, shared
// with the CUDA kernels), in the input's type (float32 / float64; float16 / bfloat16 are upcast to float32 and then
// behave like float32 inputs); suppressed iff (double)iou > iou_threshold, compared in the compute type against
// threshold_below(iou_threshold). The file is built without FMA contraction (no -march flags), like torchvision's
// wheels.
//
// Order: candidates are walked in decreasing score, ties broken by the lower index (a stable descending sort).
// Greedy NMS keeps a box iff no earlier kept box of its class overlaps it, so a walk in that order that tests each
// candidate against the kept boxes of its class gives the same keep set as torchvision's suppression loop.
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <mutex>
#include <type_traits>
#include <numeric>
#include <vector>

#include <ATen/Parallel.h>

#include "common.h"
#include "fast_math.h"
#include "nms.h"
#include "nms_math.h"

namespace {

// The IoU is computed in the accumulation type ltk::acc_t<T>: the input's own type for float/double (as
// torchvision's CPU kernel), float for half/bfloat16.
using ltk::nms::threshold_below;

template <typename acc>
struct KeptBoxes {  // structure of arrays of the boxes kept so far (of one class)
  std::vector<acc> x1, y1, x2, y2, area;
  void push(acc a, acc b, acc c, acc d, acc ar) {
    x1.push_back(a), y1.push_back(b), x2.push_back(c), y2.push_back(d), area.push_back(ar);
  }
  size_t size() const { return x1.size(); }
  void clear() { x1.clear(), y1.clear(), x2.clear(), y2.clear(), area.clear(); }
};

// Whether the box (bx1, by1, bx2, by2, barea) overlaps any kept box with IoU > threshold.
template <typename acc>
inline bool overlaps_any(const KeptBoxes<acc>& kept, acc bx1, acc by1, acc bx2, acc by2, acc barea, acc thr) {
  const size_t n = kept.size();
  const acc* __restrict__ kx1 = kept.x1.data();
  const acc* __restrict__ ky1 = kept.y1.data();
  const acc* __restrict__ kx2 = kept.x2.data();
  const acc* __restrict__ ky2 = kept.y2.data();
  const acc* __restrict__ ka = kept.area.data();
  constexpr size_t kBlock = 16;  // branch-free blocks the compiler vectorises, an early exit between blocks
  size_t k = 0;
  for (; k + kBlock <= n; k += kBlock) {
    int hit = 0;
    for (size_t u = 0; u < kBlock; ++u) {
      const size_t j = k + u;
      hit |= ltk::nms::iou_above(kx1[j], ky1[j], kx2[j], ky2[j], ka[j], bx1, by1, bx2, by2, barea, thr) ? 1 : 0;
    }
    if (hit) return true;
  }
  for (; k < n; ++k) {
    if (ltk::nms::iou_above(kx1[k], ky1[k], kx2[k], ky2[k], ka[k], bx1, by1, bx2, by2, barea, thr)) return true;
  }
  return false;
}

// Greedy step: keeps the box bx (4 values of T) unless a kept box overlaps it; returns whether it was kept.
template <typename T, typename acc>
inline bool keep_unless_overlapping(KeptBoxes<acc>& kept, const T* bx, acc thr) {
  const acc x1 = static_cast<acc>(bx[0]), y1 = static_cast<acc>(bx[1]);
  const acc x2 = static_cast<acc>(bx[2]), y2 = static_cast<acc>(bx[3]);
  const acc area = ltk::nms::box_area(x1, y1, x2, y2);
  if (overlaps_any(kept, x1, y1, x2, y2, area, thr)) return false;
  kept.push(x1, y1, x2, y2, area);
  return true;
}

// Non-finite boxes or NaN scores are rejected (ValueError in Python), in one parallel pass.
// Opening a parallel region costs more than a small job: waking the other threads is microseconds on an idle machine
// and a scheduler time slice (milliseconds) on a busy one. Scans of fewer values than this, and NMS jobs of fewer
// boxes / candidates than kParallelWork, run on the calling thread.
constexpr int64_t kCheckGrain = int64_t{1} << 22;  // ~1 ms of scanning per thread
constexpr int64_t kParallelWork = int64_t{1} << 16;

// Whether any of p[0..n) is non-finite (allow_inf: NaN): on the exponent bits, an integer reduction the compiler
// vectorises (a float compare per element does not vectorise under -ftrapping-math); half / bfloat16 via float.
template <typename T>
LTK_ALWAYS_INLINE bool any_bad(const T* p, int64_t n, bool allow_inf) {
  using U = std::conditional_t<std::is_same_v<T, double>, uint64_t, uint32_t>;
  using F = std::conditional_t<std::is_same_v<T, double>, double, float>;
  constexpr U kInf = std::is_same_v<T, double> ? U(0x7FF0000000000000ull) : U(0x7F800000u);
  U worst = 0;  // the largest |p[i]| as bits: inf is kInf (all exponent bits, zero mantissa), NaN anything above
  for (int64_t i = 0; i < n; ++i) {
    const U a = ltk::bits_as<U>(static_cast<F>(p[i])) & (~U{0} >> 1);
    worst = a > worst ? a : worst;
  }
  return allow_inf ? worst > kInf : worst >= kInf;
}
LTK_CPU_CLONES bool any_bad_f32(const float* p, int64_t n, bool allow_inf) { return any_bad(p, n, allow_inf); }
LTK_CPU_CLONES bool any_bad_f64(const double* p, int64_t n, bool allow_inf) { return any_bad(p, n, allow_inf); }

template <typename T>
void check_values(const T* p, int64_t n, bool allow_inf, const char* what) {
  std::atomic<bool> bad{false};
  at::parallel_for(0, n, kCheckGrain, [&](int64_t begin, int64_t end) {
    bool b;
    if constexpr (std::is_same_v<T, float>)
      b = any_bad_f32(p + begin, end - begin, allow_inf);
    else if constexpr (std::is_same_v<T, double>)
      b = any_bad_f64(p + begin, end - begin, allow_inf);
    else
      b = any_bad(p + begin, end - begin, allow_inf);
    if (b) bad = true;
  });
  TORCH_CHECK_VALUE(!bad.load(), what, allow_inf ? " contains NaN values" : " contains NaN or infinite values");
}

// Greedy NMS of the candidates `order` (already in walk order) of one class; appends kept ones to `out`.
template <typename T>
void greedy(const T* b, const int64_t* order, int64_t n, ltk::acc_t<T> thr, KeptBoxes<ltk::acc_t<T>>& kept,
            std::vector<int64_t>& out) {
  kept.clear();
  for (int64_t t = 0; t < n; ++t) {
    const int64_t i = order[t];
    if (keep_unless_overlapping(kept, b + 4 * i, thr)) out.push_back(i);
  }
}

at::Tensor nms_cpu(const at::Tensor& boxes_in, const at::Tensor& scores_in, double iou_threshold) {
  ltk::nms::check_boxes_scores(boxes_in, scores_in, at::kCPU);
  const int64_t n = boxes_in.size(0);
  if (n == 0) return at::empty({0}, boxes_in.options().dtype(at::kLong));
  const auto boxes = boxes_in.contiguous();
  const auto scores = scores_in.contiguous();
  std::vector<int64_t> keep;
  LTK_DISPATCH_FLOATING(boxes.scalar_type(), "ltkernels_nms_cpu", [&] {
    const scalar_t* s = scores.data_ptr<scalar_t>();
    check_values(boxes.data_ptr<scalar_t>(), 4 * n, false, "boxes");
    check_values(s, n, true, "scores");
    std::vector<int64_t> order(n);
    std::iota(order.begin(), order.end(), int64_t(0));
    std::stable_sort(order.begin(), order.end(), [s](int64_t a, int64_t b) { return s[a] > s[b]; });
    KeptBoxes<ltk::acc_t<scalar_t>> kept;
    greedy<scalar_t>(boxes.data_ptr<scalar_t>(), order.data(), n, threshold_below<ltk::acc_t<scalar_t>>(iou_threshold),
                     kept, keep);
  });
  auto out = at::empty({static_cast<int64_t>(keep.size())}, boxes_in.options().dtype(at::kLong));
  std::copy(keep.begin(), keep.end(), out.data_ptr<int64_t>());
  return out;
}

at::Tensor batched_nms_cpu(const at::Tensor& boxes_in, const at::Tensor& scores_in, const at::Tensor& idxs_in,
                           double iou_threshold) {
  ltk::nms::check_boxes_scores(boxes_in, scores_in, at::kCPU);
  ltk::nms::check_idxs(idxs_in, boxes_in, at::kCPU);
  const int64_t n = boxes_in.size(0);
  if (n == 0) return at::empty({0}, boxes_in.options().dtype(at::kLong));
  const auto boxes = boxes_in.contiguous();
  const auto scores = scores_in.contiguous();
  const auto idxs_t = idxs_in.to(at::kLong).contiguous();
  const int64_t* idxs = idxs_t.data_ptr<int64_t>();
  auto keep_flag = std::vector<uint8_t>(n, 0);
  int64_t num_kept = 0;
  auto out_full = at::empty({n}, boxes_in.options().dtype(at::kLong));
  LTK_DISPATCH_FLOATING(boxes.scalar_type(), "ltkernels_batched_nms_cpu", [&] {
    const scalar_t* s = scores.data_ptr<scalar_t>();
    const scalar_t* b = boxes.data_ptr<scalar_t>();
    check_values(b, 4 * n, false, "boxes");
    check_values(s, n, true, "scores");
    // Global walk order: decreasing score, ties by lower index.
    std::vector<int64_t> order(n);
    std::iota(order.begin(), order.end(), int64_t(0));
    std::stable_sort(order.begin(), order.end(), [s](int64_t a, int64_t c) { return s[a] > s[c]; });
    // Segment by class keeping the walk order inside each class: a stable sort of the walk order by class.
    std::vector<int64_t> by_class(order);
    std::stable_sort(by_class.begin(), by_class.end(), [idxs](int64_t a, int64_t c) { return idxs[a] < idxs[c]; });
    std::vector<int64_t> seg_start{0};
    for (int64_t t = 1; t < n; ++t)
      if (idxs[by_class[t]] != idxs[by_class[t - 1]]) seg_start.push_back(t);
    seg_start.push_back(n);
    const int64_t num_seg = static_cast<int64_t>(seg_start.size()) - 1;
    const auto thr = threshold_below<ltk::acc_t<scalar_t>>(iou_threshold);
    // Classes are independent: greedy NMS per segment in parallel.
    at::parallel_for(0, num_seg, n >= kParallelWork ? 1 : num_seg, [&](int64_t begin, int64_t end) {
      KeptBoxes<ltk::acc_t<scalar_t>> kept;
      std::vector<int64_t> local;
      for (int64_t g = begin; g < end; ++g) {
        local.clear();
        greedy<scalar_t>(b, by_class.data() + seg_start[g], seg_start[g + 1] - seg_start[g], thr, kept, local);
        for (int64_t i : local) keep_flag[i] = 1;
      }
    });
    int64_t* o = out_full.data_ptr<int64_t>();
    for (int64_t t = 0; t < n; ++t)
      if (keep_flag[order[t]]) o[num_kept++] = order[t];
  });
  return out_full.narrow(0, 0, num_kept).clone();
}

// ---- multi-class NMS ---------------------------------------------------------------------------------------

template <typename T>
struct Detection {  // a kept candidate
  int64_t flat;
  T score;
};

// Candidates are never gathered all at once (an LVIS image has ~300k of them and the walk needs a few hundred to a few
// thousand): a histogram of a sample of the scores by bin picks a band of the highest bins expected to hold about
// twice `chunk` candidates; only those are gathered (exactly) and sorted, and the next band only if the walk needs
// it. The sample decides the bands, never the result: every band is gathered in full, and the last one reaches the
// lowest bin.
constexpr int kBinBits = 11;
constexpr int kBins = 1 << kBinBits;
constexpr int64_t kSampleStride = 16;  // one score in 16 (images of fewer than kParallelWork scores: all of them)

// An order key of a score: unsigned order is the float order (NaN is rejected before; -0 is made +0: equal scores
// must have one key). The top kBinBits of the key are the score's bin: higher bins hold higher scores, and ties never
// straddle bands. half / bfloat16 via float (exact).
LTK_ALWAYS_INLINE uint32_t order_key(float v) {
  const uint32_t u = ltk::bits_as<uint32_t>(v + 0.0f);
  return (u >> 31) ? ~u : u | 0x80000000u;
}
LTK_ALWAYS_INLINE uint64_t order_key(double v) {
  const uint64_t u = ltk::bits_as<uint64_t>(v + 0.0);
  return (u >> 63) ? ~u : u | (uint64_t{1} << 63);
}
template <typename T>
LTK_ALWAYS_INLINE uint32_t order_key(T v) {
  return order_key(static_cast<float>(v));
}
template <typename T>
using key_t = decltype(order_key(T{}));
template <typename T>
constexpr int kKeyShift = 8 * sizeof(key_t<T>) - kBinBits;

template <typename T>
struct Candidate {
  T score;
  int64_t flat;  // row * C + class
};

// Appends the scores of one row whose key k has k - a <= span (unsigned) to `out`: branch-free blocks that the
// compiler vectorises, the rare block with a hit walked again.
template <typename T>
LTK_ALWAYS_INLINE void gather_row(const T* srow, int64_t C, int64_t base, key_t<T> a, key_t<T> span,
                                  std::vector<Candidate<T>>& out) {
  constexpr int64_t kBlock = 16;
  int64_t c = 0;
  for (; c + kBlock <= C; c += kBlock) {
    int hit = 0;
    for (int64_t u = 0; u < kBlock; ++u) hit |= (order_key(srow[c + u]) - a <= span) ? 1 : 0;
    if (!hit) continue;
    for (int64_t u = c; u < c + kBlock; ++u)
      if (order_key(srow[u]) - a <= span) out.push_back({srow[u], base + u});
  }
  for (; c < C; ++c)
    if (order_key(srow[c]) - a <= span) out.push_back({srow[c], base + c});
}
LTK_CPU_CLONES void gather_row_f32(const float* srow, int64_t C, int64_t base, uint32_t a, uint32_t span,
                                   std::vector<Candidate<float>>& out) {
  gather_row(srow, C, base, a, span, out);
}

// One image: the candidates (row, class) with score > score_thr among `rows`, walked in decreasing score (ties by
// lower flat index row * C + class, i.e. the reference's candidate order) with per-class kept lists, stopping at
// max_per_image kept. Large images scan their rows in parallel (inline when called inside a parallel region).
template <typename T>
void multiclass_image(const T* boxes, bool class_specific, const T* scores, int64_t C, const std::vector<int64_t>& rows,
                      T score_thr, ltk::acc_t<T> iou_thr, int64_t max_per_image, std::vector<Detection<T>>& out) {
  using acc = ltk::acc_t<T>;
  const int64_t nrows = static_cast<int64_t>(rows.size());
  const int64_t grain = std::max<int64_t>(1, kParallelWork * 4 / std::max<int64_t>(C, 1));
  const int64_t stride = nrows * C >= kParallelWork ? kSampleStride : 1;
  using K = key_t<T>;
  constexpr int shift = kKeyShift<T>;
  const K first = order_key(score_thr) + 1;  // candidates: key >= first (score > score_thr); none if it wrapped
  if (first == 0) return;
  std::vector<int64_t> hist(kBins, 0);  // sampled candidates per bin
  for (int64_t t = 0; t < nrows; ++t) {
    const T* srow = scores + rows[t] * C;
    for (int64_t c = (t * 7) % stride; c < C; c += stride) {
      const K k = order_key(srow[c]);
      hist[k >> shift] += k >= first;
    }
  }
  std::mutex merge;
  const auto better = [](const Candidate<T>& a, const Candidate<T>& b) {
    return a.score > b.score || (!(b.score > a.score) && a.flat < b.flat);
  };
  std::vector<KeptBoxes<acc>> kept(C);
  std::vector<Candidate<T>> band;
  const int64_t limit = max_per_image < 0 ? std::numeric_limits<int64_t>::max() : max_per_image;
  int64_t chunk = std::max<int64_t>(1024, 4 * std::min<int64_t>(limit, int64_t(1) << 20));
  int64_t num_kept = 0;
  for (uint32_t top = kBins; top > 0 && num_kept < limit; chunk *= 2) {  // bands [lo, top), highest first
    uint32_t lo = top;
    int64_t expected = 0;
    while (lo > 0 && expected < 2 * chunk) expected += hist[--lo] * stride;
    if (expected == 0) {  // none left in the sample: the rest in one band (in an exact histogram: none left)
      if (stride == 1) break;
      lo = 0;
    }
    const K a = std::max<K>(first, static_cast<K>(lo) << shift);  // keys of the band: [a, a + span]
    const K last = static_cast<K>((static_cast<K>(top - 1) << shift) | ((K{1} << shift) - 1));
    if (last < a) break;  // the band lies at or below score_thr, as every later one
    const K span = last - a;
    band.clear();
    at::parallel_for(0, nrows, grain, [&](int64_t begin, int64_t end) {
      std::vector<Candidate<T>> local;
      for (int64_t t = begin; t < end; ++t) {
        const int64_t r = rows[t];
        if constexpr (std::is_same_v<T, float>)
          gather_row_f32(scores + r * C, C, r * C, a, span, local);
        else
          gather_row(scores + r * C, C, r * C, a, span, local);
      }
      std::lock_guard<std::mutex> lock(merge);
      band.insert(band.end(), local.begin(), local.end());
    });
    std::sort(band.begin(), band.end(), better);
    for (size_t t = 0; t < band.size() && num_kept < limit; ++t) {
      const int64_t flat = band[t].flat;
      const int64_t r = flat / C, c = flat - r * C;
      const T* bx = class_specific ? boxes + flat * 4 : boxes + r * 4;
      if (keep_unless_overlapping(kept[c], bx, iou_thr)) {
        out.push_back({flat, band[t].score});
        ++num_kept;
      }
    }
    top = lo;
  }
}

template <typename T>
struct ImageRows {  // one image of a multiclass_nms call: where its boxes and scores lie, and its rows there
  const T* boxes;
  const T* scores;
  std::vector<int64_t> rows;
};

// multiclass_nms of every image, parallel over the images (an image's work is its candidates, up to rows x C
// scores); outputs as the schema says, row_index being the row relative to the image's own pointers.
template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> multiclass_images(
    const std::vector<ImageRows<T>>& images, int64_t C, bool class_specific, double score_threshold,
    double iou_threshold, int64_t max_per_image, const at::TensorOptions& options) {
  const int64_t num_images = static_cast<int64_t>(images.size());
  int64_t n = 0;
  for (const auto& im : images) n += static_cast<int64_t>(im.rows.size());
  std::vector<std::vector<Detection<T>>> dets(num_images);
  // The reference compares scores > score_threshold in the scores' dtype (torch casts the Python float).
  const T sthr = static_cast<T>(score_threshold);
  const auto ithr = threshold_below<ltk::acc_t<T>>(iou_threshold);
  const int64_t grain = n * C >= kParallelWork * 4 ? 1 : std::max<int64_t>(num_images, 1);
  at::parallel_for(0, num_images, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const auto& im = images[i];
      multiclass_image<T>(im.boxes, class_specific, im.scores, C, im.rows, sthr, ithr, max_per_image, dets[i]);
    }
  });
  std::vector<int64_t> offset(num_images + 1, 0);
  for (int64_t i = 0; i < num_images; ++i) offset[i + 1] = offset[i] + static_cast<int64_t>(dets[i].size());
  const int64_t total = offset[num_images];
  const auto long_opts = options.dtype(at::kLong);
  auto out_boxes = at::empty({total, 4}, options), out_scores = at::empty({total}, options);
  auto out_labels = at::empty({total}, long_opts), out_rows = at::empty({total}, long_opts);
  auto out_images = at::empty({total}, long_opts);
  T* ob = out_boxes.data_ptr<T>();
  T* os = out_scores.data_ptr<T>();
  int64_t* ol = out_labels.data_ptr<int64_t>();
  int64_t* orow = out_rows.data_ptr<int64_t>();
  int64_t* oimg = out_images.data_ptr<int64_t>();
  for (int64_t i = 0; i < num_images; ++i) {
    for (int64_t k = 0; k < static_cast<int64_t>(dets[i].size()); ++k) {
      const int64_t o = offset[i] + k;
      const int64_t flat = dets[i][k].flat;
      const int64_t r = flat / C;
      const T* bx = class_specific ? images[i].boxes + flat * 4 : images[i].boxes + r * 4;
      for (int q = 0; q < 4; ++q) ob[4 * o + q] = bx[q];
      os[o] = dets[i][k].score;
      ol[o] = flat - r * C + 1;
      orow[o] = r;
      oimg[o] = i;
    }
  }
  return {out_boxes, out_scores, out_labels, out_rows, out_images};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> multiclass_nms_cpu(
    const at::Tensor& boxes_in, const at::Tensor& scores_in, const at::Tensor& image_index_in, int64_t num_images,
    double score_threshold, double iou_threshold, int64_t max_per_image) {
  ltk::nms::check_multiclass_args(boxes_in, scores_in, image_index_in, num_images, at::kCPU);
  const int64_t n = scores_in.size(0), C = scores_in.size(1);
  const auto boxes = boxes_in.contiguous();
  const auto scores = scores_in.contiguous();
  const auto image_index = image_index_in.contiguous();
  const int64_t* img = image_index.data_ptr<int64_t>();
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> out;
  LTK_DISPATCH_FLOATING(scores.scalar_type(), "ltkernels_multiclass_nms_cpu", [&] {
    const scalar_t* b = boxes.data_ptr<scalar_t>();
    const scalar_t* s = scores.data_ptr<scalar_t>();
    std::vector<ImageRows<scalar_t>> images(num_images, ImageRows<scalar_t>{b, s, {}});
    for (int64_t r = 0; r < n; ++r) {  // the rows of each image, in increasing row order
      TORCH_CHECK(img[r] >= 0 && img[r] < num_images, "image_index must lie in [0, num_images), got ", img[r]);
      images[img[r]].rows.push_back(r);
    }
    check_values(b, boxes.numel(), false, "boxes");
    check_values(s, scores.numel(), true, "scores");
    out =
        multiclass_images(images, C, boxes.dim() == 3, score_threshold, iou_threshold, max_per_image, scores.options());
  });
  return out;
}

// The per-image form, read where each image lies (no concatenated copy of the inputs).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> multiclass_nms_images_cpu(
    at::TensorList boxes_in, at::TensorList scores_in, double score_threshold, double iou_threshold,
    int64_t max_per_image) {
  ltk::nms::check_multiclass_images_args(boxes_in, scores_in);
  const int64_t num_images = static_cast<int64_t>(scores_in.size()), C = scores_in[0].size(1);
  TORCH_CHECK(scores_in[0].device().type() == at::kCPU, "scores must be CPU tensors");
  std::vector<at::Tensor> boxes(num_images), scores(num_images);
  for (int64_t i = 0; i < num_images; ++i) boxes[i] = boxes_in[i].contiguous(), scores[i] = scores_in[i].contiguous();
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> out;
  LTK_DISPATCH_FLOATING(scores[0].scalar_type(), "ltkernels_multiclass_nms_images_cpu", [&] {
    std::vector<ImageRows<scalar_t>> images(num_images);
    for (int64_t i = 0; i < num_images; ++i) {
      const scalar_t* b = boxes[i].data_ptr<scalar_t>();
      const scalar_t* s = scores[i].data_ptr<scalar_t>();
      check_values(b, boxes[i].numel(), false, "boxes");
      check_values(s, scores[i].numel(), true, "scores");
      images[i] = {b, s, std::vector<int64_t>(scores[i].size(0))};
      std::iota(images[i].rows.begin(), images[i].rows.end(), int64_t(0));
    }
    out = multiclass_images(images, C, boxes[0].dim() == 3, score_threshold, iou_threshold, max_per_image,
                            scores[0].options());
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(ltkernels, CPU, m) {
  m.impl("nms", &nms_cpu);
  m.impl("batched_nms", &batched_nms_cpu);
  m.impl("multiclass_nms", &multiclass_nms_cpu);
  m.impl("multiclass_nms_images", &multiclass_nms_images_cpu);
}
