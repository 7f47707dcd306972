// IoU arithmetic of the NMS kernels, shared by csrc/cpu/nms.cpp and csrc/cuda/nms.cu so that they agree bit for bit
// (docs/spec.md §4). It is torchvision's CPU expression order in the compute type C (float or double):
//   area = (x2 - x1) * (y2 - y1), w = max(0, min(x2) - max(x1)), h likewise, inter = w * h,
//   iou = inter / (area_a + area_b - inter).
// On the device every operation is a correctly rounded intrinsic (__fadd_rn, ...), which nvcc never contracts into
// an FMA; on the host they are plain operators, exact as long as the caller is built without FMA contraction (no
// -march flags, no LTK_CPU_CLONES). At the end: the host-only argument checks, the same on both sides.
#pragma once

#include <cmath>
#include <limits>
#include <type_traits>

#include "common.h"

#if defined(__CUDACC__)
#define LTK_NMS_HD __host__ __device__ __forceinline__
#else
#define LTK_NMS_HD LTK_ALWAYS_INLINE  // the CPU loop that calls these must stay vectorised
#endif

namespace ltk::nms {

#if defined(__CUDA_ARCH__)
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ float sub_rn(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ double sub_rn(double a, double b) { return __dsub_rn(a, b); }
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float div_rn(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ double div_rn(double a, double b) { return __ddiv_rn(a, b); }
#else
template <typename C>
LTK_NMS_HD C add_rn(C a, C b) { return a + b; }
template <typename C>
LTK_NMS_HD C sub_rn(C a, C b) { return a - b; }
template <typename C>
LTK_NMS_HD C mul_rn(C a, C b) { return a * b; }
template <typename C>
LTK_NMS_HD C div_rn(C a, C b) { return a / b; }
#endif

// std::max / std::min spelled out (the same expressions): argument order matters only for signed zeros, and GCC
// vectorises this form exactly (maxps / minps).
template <typename C>
LTK_NMS_HD C max_(C a, C b) { return (a < b) ? b : a; }
template <typename C>
LTK_NMS_HD C min_(C a, C b) { return (b < a) ? b : a; }

template <typename C>
LTK_NMS_HD C box_area(C x1, C y1, C x2, C y2) { return mul_rn(sub_rn(x2, x1), sub_rn(y2, y1)); }

// IoU(a, b) > thr, with a the earlier (higher-scored, kept) box and b the later one.
template <typename C>
LTK_NMS_HD bool iou_above(C ax1, C ay1, C ax2, C ay2, C aarea, C bx1, C by1, C bx2, C by2, C barea, C thr) {
  const C w = max_(C(0), sub_rn(min_(ax2, bx2), max_(ax1, bx1)));
  const C h = max_(C(0), sub_rn(min_(ay2, by2), max_(ay1, by1)));
  const C inter = mul_rn(w, h);
  return div_rn(inter, sub_rn(add_rn(aarea, barea), inter)) > thr;
}

// Host only: the largest C value <= thr: for a C value v, v > thr (compared in double, as torchvision does) iff
// v > threshold_below<C>(thr), so the kernels compare in C.
template <typename C>
inline C threshold_below(double thr) {
  if constexpr (std::is_same_v<C, double>) {
    return thr;
  } else {
    C t = static_cast<C>(thr);
    if (static_cast<double>(t) > thr) t = std::nextafter(t, -std::numeric_limits<C>::infinity());
    return t;
  }
}

// Host only: the argument checks of nms and batched_nms on `device` (Python validates first; this is the safety net
// for direct torch.ops calls).
inline void check_boxes_scores(const at::Tensor& boxes, const at::Tensor& scores, c10::DeviceType device) {
  TORCH_CHECK(boxes.device().type() == device, "boxes must be a ", device, " tensor, got ", boxes.device());
  TORCH_CHECK(scores.device().type() == device, "scores must be a ", device, " tensor, got ", scores.device());
  LTK_CHECK_DIM(boxes, 2);
  TORCH_CHECK(boxes.size(1) == 4, "boxes must have shape [N, 4], got ", boxes.sizes());
  LTK_CHECK_DIM(scores, 1);
  TORCH_CHECK(boxes.size(0) == scores.size(0), "boxes and scores must have the same length, got ", boxes.size(0),
              " and ", scores.size(0));
  TORCH_CHECK(boxes.scalar_type() == scores.scalar_type(), "boxes and scores must have the same dtype, got ",
              boxes.scalar_type(), " and ", scores.scalar_type());
  TORCH_CHECK(scores.device() == boxes.device(), "boxes and scores must be on the same device");
  TORCH_CHECK(at::isFloatingType(boxes.scalar_type()), "boxes must be floating point");
}

// Host only: the class index argument of batched_nms.
inline void check_idxs(const at::Tensor& idxs, const at::Tensor& boxes, c10::DeviceType device) {
  TORCH_CHECK(idxs.device().type() == device, "idxs must be a ", device, " tensor, got ", idxs.device());
  LTK_CHECK_DIM(idxs, 1);
  TORCH_CHECK(idxs.size(0) == boxes.size(0), "idxs must have one entry per box, got ", idxs.size(0), " for ",
              boxes.size(0), " boxes");
  TORCH_CHECK(!at::isFloatingType(idxs.scalar_type()) && idxs.scalar_type() != at::kBool,
              "idxs must be an integer tensor, got ", idxs.scalar_type());
}

// The kernels keep per-image bookkeeping: bounding num_images makes a wrong value an error instead of an
// allocation failure (ltkernels.MAX_IMAGES_PER_CALL).
constexpr int64_t kMaxImagesPerCall = int64_t{1} << 24;

// Host only: the arguments of multiclass_nms.
inline void check_multiclass_args(const at::Tensor& boxes, const at::Tensor& scores, const at::Tensor& image_index,
                                  int64_t num_images, c10::DeviceType device) {
  TORCH_CHECK(boxes.device().type() == device, "boxes must be a ", device, " tensor, got ", boxes.device());
  TORCH_CHECK(scores.device().type() == device, "scores must be a ", device, " tensor, got ", scores.device());
  TORCH_CHECK(image_index.device().type() == device, "image_index must be a ", device, " tensor, got ",
              image_index.device());
  LTK_CHECK_DIM(scores, 2);
  TORCH_CHECK(boxes.device() == scores.device() && image_index.device() == scores.device(),
              "boxes, scores and image_index must be on the same device");
  const int64_t n = scores.size(0), C = scores.size(1);
  TORCH_CHECK((boxes.dim() == 2 && boxes.size(0) == n && boxes.size(1) == 4) ||
                  (boxes.dim() == 3 && boxes.size(0) == n && boxes.size(1) == C && boxes.size(2) == 4),
              "boxes must have shape [N, 4] or [N, C, 4] for scores of shape [N, C] = ", scores.sizes(), ", got ",
              boxes.sizes());
  TORCH_CHECK(boxes.scalar_type() == scores.scalar_type(), "boxes and scores must have the same dtype");
  TORCH_CHECK(image_index.scalar_type() == at::kLong && image_index.dim() == 1 && image_index.size(0) == n,
              "image_index must be an int64 tensor of shape [N]");
  TORCH_CHECK(num_images >= 0 && num_images <= kMaxImagesPerCall, "num_images must lie in [0, ", kMaxImagesPerCall,
              "], got ", num_images);
}

}  // namespace ltk::nms
