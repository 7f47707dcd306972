// CUDA kernels of the NMS family (schemas in csrc/nms.cpp; the CPU twins in csrc/cpu/nms.cpp give the contract).
//
// The IoU is the CPU kernel's (csrc/nms_math.h, torchvision's CPU arithmetic) with correctly rounded intrinsics
// (__fadd_rn, __fmul_rn, ...), which nvcc never contracts into FMAs, so CPU and CUDA agree bit for bit.
// float16/bfloat16 boxes are converted to float32 first; the comparison `iou > threshold` uses the largest value of
// the compute type <= threshold (the host computes it), which equals comparing in float64.
//
// nms: stable descending sort, the 64-bit IoU bitmask over 64x64 tiles, then the greedy reduction on the device
//      (one block walking the tiles), one nonzero for the output size.
// batched_nms / multiclass_nms: candidates sorted by (segment, score desc, index asc), where a segment is a class
//      (of one image); one thread block walks each segment greedily, testing a candidate only against the kept
//      boxes of its own segment, all segments at once; no per-class launches. multiclass_nms then ranks the
//      survivors of each image by score (ties: candidate order) and keeps the first max_per_image.
// Host syncs: the NaN check, the candidate count (multiclass) and the output size — none per class.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <vector>

#include "common.h"
#include "cuda/launch.h"
#include "nms.h"
#include "nms_math.h"

namespace {

constexpr int kTile = 64;  // boxes per bitmask word
constexpr int kReduceThreads = 256;
constexpr int kWalkThreads = 64;  // threads per segment walk

using ltk::nms::box_area;
using ltk::nms::iou_above;
using ltk::nms::threshold_below;

// ---- nms: bitmask ----------------------------------------------------------------------------------------

// mask[i * col_blocks + cb] bit k: box i suppresses box cb * 64 + k (> i). Tiles below the diagonal are skipped.
template <typename acc>
__global__ void nms_mask_kernel(const acc* __restrict__ boxes, int64_t n, int64_t col_blocks, acc thr,
                                unsigned long long* __restrict__ mask) {
  const int64_t row_block = blockIdx.y, col_block = blockIdx.x;
  if (row_block > col_block) return;
  const int row_size = static_cast<int>(min(n - row_block * kTile, static_cast<int64_t>(kTile)));
  const int col_size = static_cast<int>(min(n - col_block * kTile, static_cast<int64_t>(kTile)));
  LTK_SHARED(acc, tile, kTile * 5);
  const int t = threadIdx.x;
  if (t < col_size) {
    const acc* b = boxes + (col_block * kTile + t) * 4;
    tile[t * 5 + 0] = b[0];
    tile[t * 5 + 1] = b[1];
    tile[t * 5 + 2] = b[2];
    tile[t * 5 + 3] = b[3];
    tile[t * 5 + 4] = box_area(b[0], b[1], b[2], b[3]);
  }
  __syncthreads();
  if (t < row_size) {
    const int64_t i = row_block * kTile + t;
    const acc* a = boxes + i * 4;
    const acc ax1 = a[0], ay1 = a[1], ax2 = a[2], ay2 = a[3];
    const acc aarea = box_area(ax1, ay1, ax2, ay2);
    unsigned long long bits = 0;
    for (int k = (row_block == col_block) ? t + 1 : 0; k < col_size; ++k) {
      const acc* c = tile + k * 5;
      if (iou_above(ax1, ay1, ax2, ay2, aarea, c[0], c[1], c[2], c[3], c[4], thr)) bits |= 1ULL << k;
    }
    mask[i * col_blocks + col_block] = bits;
  }
}

// One block: the greedy pass over the tiles. remv (zeroed, col_blocks words) collects the suppressed bits.
__global__ void nms_reduce_kernel(const unsigned long long* __restrict__ mask, int64_t n, int64_t col_blocks,
                                  unsigned long long* __restrict__ remv, bool* __restrict__ keep) {
  LTK_SHARED(unsigned long long, diag, kTile);
  LTK_SHARED(unsigned long long, kept_bits, 1);
  const int t = threadIdx.x;
  for (int64_t b = 0; b < col_blocks; ++b) {
    const int rows = static_cast<int>(min(n - b * kTile, static_cast<int64_t>(kTile)));
    if (t < rows) diag[t] = mask[(b * kTile + t) * col_blocks + b];
    __syncthreads();
    if (t == 0) {
      unsigned long long cur = remv[b], kb = 0;
      for (int k = 0; k < rows; ++k) {
        if (!((cur >> k) & 1ULL)) {
          kb |= 1ULL << k;
          cur |= diag[k];
        }
      }
      kept_bits[0] = kb;
    }
    __syncthreads();
    const unsigned long long kb = kept_bits[0];
    if (t < rows) keep[b * kTile + t] = (kb >> t) & 1ULL;
    for (int64_t j = b + 1 + t; j < col_blocks; j += blockDim.x) {
      unsigned long long acc = 0, bits = kb;
      while (bits) {
        const int k = __ffsll(static_cast<long long>(bits)) - 1;
        bits &= bits - 1;
        acc |= mask[(b * kTile + k) * col_blocks + j];
      }
      remv[j] |= acc;
    }
    __syncthreads();
  }
}

// With image_index (multiclass_nms): also its range [0, num_images), as the CPU kernel checks it, in the same sync
// (a negative index would otherwise reach index_select as a device-side assert).
void check_values(const at::Tensor& boxes, const at::Tensor& scores, const at::Tensor& image_index = {},
                  int64_t num_images = 0) {
  if (boxes.numel() == 0 && scores.numel() == 0) return;
  std::vector<at::Tensor> parts{at::isfinite(boxes).all().logical_not(), at::isnan(scores).any()};
  if (image_index.defined()) parts.push_back(at::logical_or(image_index < 0, image_index >= num_images).any());
  const auto flags = at::stack(parts).cpu();
  const bool* f = flags.data_ptr<bool>();
  TORCH_CHECK_VALUE(!f[0], "boxes contains NaN or infinite values");
  TORCH_CHECK_VALUE(!f[1], "scores contains NaN values");
  TORCH_CHECK(parts.size() < 3 || !f[2], "image_index must lie in [0, num_images), num_images = ", num_images);
}

at::Tensor nms_cuda(const at::Tensor& boxes, const at::Tensor& scores, double iou_threshold) {
  ltk::nms::check_boxes_scores(boxes, scores, LTK_CUDA_DEVICE);
  c10::cuda::CUDAGuard guard(boxes.device());
  const int64_t n = boxes.size(0);
  if (n == 0) return at::empty({0}, boxes.options().dtype(at::kLong));
  check_values(boxes, scores);
  const int64_t col_blocks = ltk::ceil_div(n, kTile);
  TORCH_CHECK(col_blocks <= 65535, "nms on CUDA supports at most ", 65535 * kTile, " boxes, got ", n);
  const auto order = std::get<1>(at::sort(scores, /*stable=*/true, /*dim=*/0, /*descending=*/true));
  const auto sorted = boxes.index_select(0, order).to(ltk::acc_type(boxes.scalar_type())).contiguous();
  auto mask = at::empty({n * col_blocks}, boxes.options().dtype(at::kLong));
  auto remv = at::zeros({col_blocks}, boxes.options().dtype(at::kLong));
  auto keep = at::empty({n}, boxes.options().dtype(at::kBool));
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(sorted.scalar_type(), "ltkernels_nms_cuda", [&] {
    const dim3 grid(static_cast<unsigned>(col_blocks), static_cast<unsigned>(col_blocks));
    LTK_LAUNCH(grid, kTile, 0, stream, nms_mask_kernel<scalar_t>)
    (sorted.data_ptr<scalar_t>(), n, col_blocks, threshold_below<scalar_t>(iou_threshold),
     reinterpret_cast<unsigned long long*>(mask.data_ptr<int64_t>()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  LTK_LAUNCH(1, kReduceThreads, 0, stream, nms_reduce_kernel)
  (reinterpret_cast<const unsigned long long*>(mask.data_ptr<int64_t>()), n, col_blocks,
   reinterpret_cast<unsigned long long*>(remv.data_ptr<int64_t>()), keep.data_ptr<bool>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return order.index_select(0, at::nonzero(keep).view(-1));
}

// ---- segmented greedy walk ----------------------------------------------------------------------------------

// boxes [M, 4] (compute type) and key [M] (sorted ascending) in walk order: candidates of one segment (equal key)
// are contiguous and in decreasing score order. One block per segment start (grid-stride); keep[p] = kept or not.
// scratch [M, 5]: the kept boxes of the segment starting at s live in rows s.. (kept box k is written and read
// only by thread k % blockDim.x, so the walk needs no barrier beyond the vote).
template <typename acc>
__global__ void segment_walk_kernel(const acc* __restrict__ boxes, const int64_t* __restrict__ key, int64_t m, acc thr,
                                    acc* __restrict__ scratch, bool* __restrict__ keep) {
  const int t = threadIdx.x;
  for (int64_t s = blockIdx.x; s < m; s += gridDim.x) {
    const int64_t k_s = key[s];
    if (s > 0 && key[s - 1] == k_s) continue;  // not a segment start (uniform over the block)
    // End of the segment: upper bound of k_s in the sorted keys (every thread computes the same).
    int64_t lo = s + 1, hi = m;
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo) / 2;
      if (key[mid] <= k_s)
        lo = mid + 1;
      else
        hi = mid;
    }
    const int64_t end = lo;
    acc* kept = scratch + s * 5;
    int64_t nk = 0;
    for (int64_t p = s; p < end; ++p) {
      const acc* b = boxes + p * 4;
      const acc bx1 = b[0], by1 = b[1], bx2 = b[2], by2 = b[3];
      const acc barea = box_area(bx1, by1, bx2, by2);
      bool sup = false;
      for (int64_t k = t; k < nk && !sup; k += blockDim.x) {
        const acc* a = kept + k * 5;
        sup = iou_above(a[0], a[1], a[2], a[3], a[4], bx1, by1, bx2, by2, barea, thr);
      }
      const bool any = __syncthreads_or(sup) != 0;
      if (t == 0) keep[p] = !any;
      if (!any) {
        if (nk % blockDim.x == t) {
          acc* a = kept + nk * 5;
          a[0] = bx1, a[1] = by1, a[2] = bx2, a[3] = by2, a[4] = barea;
        }
        ++nk;
      }
    }
  }
}

// keep [M] in walk order for boxes_c [M, 4] (compute type, walk order) and sorted keys [M].
at::Tensor segment_walk(const at::Tensor& boxes_c, const at::Tensor& key, double iou_threshold) {
  const int64_t m = boxes_c.size(0);
  auto keep = at::empty({m}, boxes_c.options().dtype(at::kBool));
  if (m == 0) return keep;
  auto scratch = at::empty({m, 5}, boxes_c.options());
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t grid = std::min<int64_t>(m, static_cast<int64_t>(sms) * 32);
  AT_DISPATCH_FLOATING_TYPES(boxes_c.scalar_type(), "ltkernels_segment_walk", [&] {
    LTK_LAUNCH(static_cast<unsigned>(grid), kWalkThreads, 0, stream, segment_walk_kernel<scalar_t>)
    (boxes_c.data_ptr<scalar_t>(), key.data_ptr<int64_t>(), m, threshold_below<scalar_t>(iou_threshold),
     scratch.data_ptr<scalar_t>(), keep.data_ptr<bool>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return keep;
}

at::Tensor batched_nms_cuda(const at::Tensor& boxes, const at::Tensor& scores, const at::Tensor& idxs,
                            double iou_threshold) {
  ltk::nms::check_boxes_scores(boxes, scores, LTK_CUDA_DEVICE);
  ltk::nms::check_idxs(idxs, boxes, LTK_CUDA_DEVICE);
  c10::cuda::CUDAGuard guard(boxes.device());
  const int64_t n = boxes.size(0);
  if (n == 0) return at::empty({0}, boxes.options().dtype(at::kLong));
  check_values(boxes, scores);
  // Walk order: by class, then decreasing score, then index (two stable sorts).
  const auto by_score = std::get<1>(at::sort(scores, /*stable=*/true, /*dim=*/0, /*descending=*/true));
  const auto cls = idxs.to(at::kLong).index_select(0, by_score);
  auto [key, perm] = at::sort(cls, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const auto order = by_score.index_select(0, perm);
  const auto boxes_c = boxes.index_select(0, order).to(ltk::acc_type(boxes.scalar_type())).contiguous();
  const auto keep = segment_walk(boxes_c, key.contiguous(), iou_threshold);
  // Survivors in decreasing score order (ties: lower index): filter the global score order.
  auto keep_by_box = at::empty({n}, keep.options());
  keep_by_box.index_put_({order}, keep);
  return by_score.index_select(0, at::nonzero(keep_by_box.index_select(0, by_score)).view(-1));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> multiclass_nms_cuda(
    const at::Tensor& boxes, const at::Tensor& scores, const at::Tensor& image_index, int64_t num_images,
    double score_threshold, double iou_threshold, int64_t max_per_image) {
  ltk::nms::check_multiclass_args(boxes, scores, image_index, num_images, LTK_CUDA_DEVICE);
  const int64_t n = scores.size(0), C = scores.size(1);
  const bool class_specific = boxes.dim() == 3;
  c10::cuda::CUDAGuard guard(scores.device());
  const auto long_opts = scores.options().dtype(at::kLong);
  check_values(boxes, scores, image_index, num_images);
  // Candidates in the reference's order (row-major flat index), scores compared in their own dtype.
  const auto flat_scores = scores.reshape({-1});
  const auto flat = at::nonzero(at::gt(flat_scores, score_threshold)).view(-1);  // sync: candidate count
  const int64_t m = flat.size(0);
  if (m == 0) {
    return {at::empty({0, 4}, boxes.options()), at::empty({0}, scores.options()), at::empty({0}, long_opts),
            at::empty({0}, long_opts), at::empty({0}, long_opts)};
  }
  const auto rows = at::div(flat, C, "floor");
  const auto cls = flat - rows * C;
  const auto img = image_index.index_select(0, rows);
  const auto cand_scores = flat_scores.index_select(0, flat);
  // Walk order: by (image, class), then decreasing score, then candidate order.
  const auto by_score = std::get<1>(at::sort(cand_scores, /*stable=*/true, /*dim=*/0, /*descending=*/true));
  const auto seg = (img * C + cls).index_select(0, by_score);
  auto [key, perm] = at::sort(seg, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const auto order = by_score.index_select(0, perm);
  const auto box_rows = class_specific ? flat : rows;
  const auto cand_boxes = boxes.reshape({-1, 4}).index_select(0, box_rows);
  const auto walk_boxes = cand_boxes.index_select(0, order).to(ltk::acc_type(boxes.scalar_type())).contiguous();
  const auto keep = segment_walk(walk_boxes, key.contiguous(), iou_threshold);
  auto keep_c = at::empty({m}, keep.options());
  keep_c.index_put_({order}, keep);
  // Survivors grouped by image, each image in decreasing score (ties: candidate order): a stable sort of the global
  // score order by image, with the suppressed candidates sent past the last image.
  const auto img_key = at::where(keep_c, img, at::full({}, num_images, long_opts)).index_select(0, by_score);
  auto [img_sorted, perm2] = at::sort(img_key, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const auto ranked = by_score.index_select(0, perm2);  // candidate ids
  auto select = img_sorted < num_images;
  if (max_per_image >= 0) {
    const auto first = at::searchsorted(img_sorted, at::arange(num_images + 1, long_opts));
    const auto rank = at::arange(m, long_opts) - first.index_select(0, img_sorted.clamp_max(num_images));
    select = select & (rank < max_per_image);
  }
  const auto final_ids = ranked.index_select(0, at::nonzero(select).view(-1));  // sync: output size
  const auto out_rows = rows.index_select(0, final_ids);
  return {cand_boxes.index_select(0, final_ids), cand_scores.index_select(0, final_ids),
          cls.index_select(0, final_ids) + 1, out_rows, img.index_select(0, final_ids)};
}

}  // namespace

TORCH_LIBRARY_IMPL(ltkernels, CUDA, m) {
  m.impl("nms", &nms_cuda);
  m.impl("batched_nms", &batched_nms_cuda);
  m.impl("multiclass_nms", &multiclass_nms_cuda);
}
