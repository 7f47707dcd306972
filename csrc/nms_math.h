// IoU arithmetic of the NMS kernels, shared by csrc/cpu/nms.cpp and csrc/cuda/nms.cu so that they agree bit for bit
// (docs/spec.md §4). It is torchvision's CPU expression order in the accumulation type `acc` (float or double):
//   area = (x2 - x1) * (y2 - y1), w = max(0, min(x2) - max(x1)), h likewise, inter = w * h,
//   iou = inter / (area_a + area_b - inter).
// On the device every operation is a correctly rounded intrinsic (__fadd_rn, ...), which nvcc never contracts into
// an FMA; on the host they are plain operators, exact as long as the caller is built without FMA contraction (no
// -march flags, no LTK_CPU_CLONES).
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
template <typename acc>
LTK_NMS_HD acc add_rn(acc a, acc b) {
  return a + b;
}
template <typename acc>
LTK_NMS_HD acc sub_rn(acc a, acc b) {
  return a - b;
}
template <typename acc>
LTK_NMS_HD acc mul_rn(acc a, acc b) {
  return a * b;
}
template <typename acc>
LTK_NMS_HD acc div_rn(acc a, acc b) {
  return a / b;
}
#endif

// std::max / std::min spelled out (the same expressions): argument order matters only for signed zeros, and GCC
// vectorises this form exactly (maxps / minps).
template <typename acc>
LTK_NMS_HD acc max_(acc a, acc b) {
  return (a < b) ? b : a;
}
template <typename acc>
LTK_NMS_HD acc min_(acc a, acc b) {
  return (b < a) ? b : a;
}

template <typename acc>
LTK_NMS_HD acc box_area(acc x1, acc y1, acc x2, acc y2) {
  return mul_rn(sub_rn(x2, x1), sub_rn(y2, y1));
}

// IoU(a, b) > thr, with a the earlier (higher-scored, kept) box and b the later one.
template <typename acc>
LTK_NMS_HD bool iou_above(acc ax1, acc ay1, acc ax2, acc ay2, acc aarea, acc bx1, acc by1, acc bx2, acc by2, acc barea,
                          acc thr) {
  const acc w = max_(acc(0), sub_rn(min_(ax2, bx2), max_(ax1, bx1)));
  const acc h = max_(acc(0), sub_rn(min_(ay2, by2), max_(ay1, by1)));
  const acc inter = mul_rn(w, h);
  return div_rn(inter, sub_rn(add_rn(aarea, barea), inter)) > thr;
}

// Host only: the largest acc value <= thr: for an acc value v, v > thr (compared in double, as torchvision does) iff
// v > threshold_below<acc>(thr), so the kernels compare in acc.
template <typename acc>
inline acc threshold_below(double thr) {
  if constexpr (std::is_same_v<acc, double>) {
    return thr;
  } else {
    acc t = static_cast<acc>(thr);
    if (static_cast<double>(t) > thr) t = std::nextafter(t, -std::numeric_limits<acc>::infinity());
    return t;
  }
}

}  // namespace ltk::nms
