// RoIAlign geometry shared by csrc/cpu/roi_align.cpp and csrc/cuda/roi_align.cu (docs/spec.md §3): torchvision's
// formulas, in the accumulation type `acc` (float, or double for float64 input). `I` is the integer type of the
// caller's sizes and indices (int64_t on the CPU, int on the device); the integer-to-acc conversions are the
// caller's own, so each kernel rounds exactly as it did with its private copy.
#pragma once

#include <math.h>

#include "common.h"

#if defined(__CUDACC__)
#define LTK_ROI_HD __host__ __device__ __forceinline__
#else
#define LTK_ROI_HD LTK_ALWAYS_INLINE  // called per sample while building the CPU weight tables
#endif

namespace ltk::roi_align {

LTK_ROI_HD float ceil_(float v) { return ::ceilf(v); }
LTK_ROI_HD double ceil_(double v) { return ::ceil(v); }

// One RoI in feature-map coordinates: PH x PW bins of size bin_h x bin_w from (start_h, start_w), each sampled on a
// grid_h x grid_w grid.
template <typename acc, typename I>
struct Box {
  acc start_h, start_w, bin_h, bin_w;
  I grid_h, grid_w;
};

// Adaptive sampling (sampling_ratio <= 0) may take at most this many samples per bin (grid_h * grid_w); the Python
// API raises for a RoI beyond it (ltkernels.MAX_ADAPTIVE_SAMPLES), the CPU kernel too (`adaptive_grid_too_large`).
// A caller's integer cap (>= this) then never truncates a grid that is allowed.
constexpr int64_t kMaxAdaptiveSamples = int64_t{1} << 20;

// Samples per bin along one axis: sampling_ratio, or adaptive ceil(roi_len / pooled) capped at `cap`.
template <typename acc, typename I>
LTK_ROI_HD I grid_size(acc roi_len, I pooled, I sampling_ratio, I cap) {
  if (sampling_ratio > 0) return sampling_ratio;
  const acc g = ceil_(roi_len / static_cast<acc>(pooled));
  if (!(g > 0)) return 0;  // empty, inverted or NaN RoI: no samples
  return g < static_cast<acc>(cap) ? static_cast<I>(g) : cap;
}

// Legacy (aligned=false) mode makes malformed RoIs at least 1x1. A NaN length stays NaN on the host (std::max, as
// torchvision's CPU kernel) but becomes 1 on the device (CUDA max, as torchvision's CUDA kernel); the results
// differ only for non-finite boxes or scale, which the Python checks reject.
template <typename acc>
LTK_ROI_HD acc at_least_one(acc v) {
#if defined(__CUDA_ARCH__)
  return v > acc(1) ? v : acc(1);
#else
  return v < acc(1) ? acc(1) : v;
#endif
}

// Whether the adaptive grid of a RoI of roi_h x roi_w feature pixels exceeds kMaxAdaptiveSamples per bin (computed
// before any cap; an empty axis means no samples at all).
template <typename acc, typename I>
LTK_ROI_HD bool adaptive_grid_too_large(acc roi_h, acc roi_w, I PH, I PW) {
  const acc gh = ceil_(roi_h / static_cast<acc>(PH));
  const acc gw = ceil_(roi_w / static_cast<acc>(PW));
  if (!(gh > 0) || !(gw > 0)) return false;
  return static_cast<double>(gh) * static_cast<double>(gw) > static_cast<double>(kMaxAdaptiveSamples);
}

// roi = (batch, x1, y1, x2, y2) in image coordinates; the batch index is the caller's to check. A RoI whose adaptive
// grid is too large, or has an empty axis, gets no samples (it pools zeros on a device that cannot raise).
template <typename acc, typename I>
LTK_ROI_HD Box<acc, I> box(const acc* roi, acc scale, I PH, I PW, I sampling_ratio, bool aligned, I grid_cap) {
  Box<acc, I> b;
  const acc offset = aligned ? acc(0.5) : acc(0);
  b.start_w = roi[1] * scale - offset;
  b.start_h = roi[2] * scale - offset;
  const acc end_w = roi[3] * scale - offset;
  const acc end_h = roi[4] * scale - offset;
  acc roi_w = end_w - b.start_w;
  acc roi_h = end_h - b.start_h;
  if (!aligned) {
    roi_w = at_least_one(roi_w);
    roi_h = at_least_one(roi_h);
  }
  b.bin_h = roi_h / static_cast<acc>(PH);
  b.bin_w = roi_w / static_cast<acc>(PW);
  b.grid_h = grid_size(roi_h, PH, sampling_ratio, grid_cap);
  b.grid_w = grid_size(roi_w, PW, sampling_ratio, grid_cap);
  if (b.grid_h == 0 || b.grid_w == 0 || (sampling_ratio <= 0 && adaptive_grid_too_large(roi_h, roi_w, PH, PW))) {
    b.grid_h = b.grid_w = 0;
  }
  return b;
}

// Position along one axis of sample i (of `grid`) in bin p.
template <typename acc, typename I>
LTK_ROI_HD acc sample_pos(acc start, I p, acc bin, I i, I grid) {
  return start + p * bin + static_cast<acc>(i + .5f) * bin / static_cast<acc>(grid);
}

// One axis of the bilinear rule: false when the sample at v is off the map (it contributes 0), else the two pixel
// indices and the weight of the upper one (the lower one gets 1 - frac), with torchvision's border clamps.
template <typename acc, typename I>
LTK_ROI_HD bool axis_taps(acc v, I size, I& lo, I& hi, acc& frac) {
  if (!(v >= acc(-1) && v <= static_cast<acc>(size))) return false;  // NaN too
  if (v <= 0) v = 0;
  lo = static_cast<I>(v);
  if (lo >= size - 1) {
    lo = hi = size - 1;
    v = static_cast<acc>(lo);
  } else {
    hi = lo + 1;
  }
  frac = v - static_cast<acc>(lo);
  return true;
}

}  // namespace ltk::roi_align
