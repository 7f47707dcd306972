// Mask-pasting geometry shared by csrc/cpu/paste_masks.cpp and csrc/cuda/paste_masks.cu: torchvision's
// `paste_masks_in_image` spelled per output pixel (docs/spec.md §8).
//  * The M x M mask is padded with one pixel of zeros (P = M + 2) and its box widened about its centre by P / M, in
//    the box's dtype (`expand_boxes`), then truncated toward zero to int64 (`.to(torch.int64)`).
//  * The padded mask is resized to w x h = (x1 - x0 + 1) x (y1 - y0 + 1) (at least 1) with `F.interpolate(...,
//    mode="bilinear", align_corners=False)`; image pixel (y, x) inside [y0, y1] x [x0, x1] takes the resized pixel
//    (y - y0, x - x0), every other pixel 0. The result is value > threshold.
//  * The interpolation follows ATen's (area_pixel_compute_source_index, guard_index_and_lambda, the copy when the
//    sizes are equal), in `acc` (float, or double for float64 masks): row-interpolated values first, then the
//    column blend, in ATen's order.
// One difference, by design: for some boxes that lie wholly outside the image torchvision's slices turn negative
// (it raises, or pastes into the wrong columns); here a box outside the image pastes nothing. Integer box coordinates
// are clamped to +-2^40 (torchvision would have to allocate a mask of the box's size).
#pragma once

#include <math.h>
#include <stdint.h>

#include "common.h"

#if defined(__CUDACC__)
#define LTK_PASTE_HD __host__ __device__ __forceinline__
#else
#define LTK_PASTE_HD LTK_ALWAYS_INLINE
#endif

namespace ltk::paste_masks {

struct IntBox {
  int64_t x0, y0, x1, y1;  // inclusive pixel bounds of the resized mask
  int64_t w, h;            // the size the padded mask is resized to
};

LTK_PASTE_HD int64_t to_int64(double v) {
  constexpr double kLimit = 1099511627776.0;  // 2^40
  v = v < -kLimit ? -kLimit : (v > kLimit ? kLimit : v);
  return static_cast<int64_t>(v);  // truncation toward zero, as Tensor.to(torch.int64)
}

// `scale` is (M + 2) / M rounded to B, as torchvision's `w_half *= scale` rounds its Python float.
template <typename B>
LTK_PASTE_HD IntBox expand_box(const B* box, B scale) {
  B w_half = (box[2] - box[0]) * B(0.5);
  B h_half = (box[3] - box[1]) * B(0.5);
  const B x_c = (box[2] + box[0]) * B(0.5);
  const B y_c = (box[3] + box[1]) * B(0.5);
  w_half *= scale;
  h_half *= scale;
  IntBox b;
  b.x0 = to_int64(static_cast<double>(x_c - w_half));
  b.x1 = to_int64(static_cast<double>(x_c + w_half));
  b.y0 = to_int64(static_cast<double>(y_c - h_half));
  b.y1 = to_int64(static_cast<double>(y_c + h_half));
  b.w = b.x1 - b.x0 + 1 > 1 ? b.x1 - b.x0 + 1 : 1;
  b.h = b.y1 - b.y0 + 1 > 1 ? b.y1 - b.y0 + 1 : 1;
  return b;
}

LTK_PASTE_HD float floor_(float v) { return ::floorf(v); }
LTK_PASTE_HD double floor_(double v) { return ::floor(v); }

// Source taps of output index d (0 <= d < n) when resizing `in` samples to `n` (ATen's linear interpolation,
// align_corners=False).
template <typename acc>
struct Taps {
  int64_t i0, i1;
  acc l0, l1;
};

template <typename acc>
LTK_PASTE_HD Taps<acc> taps(int64_t in, int64_t n, int64_t d) {
  Taps<acc> t;
  if (n == in) {
    t.i0 = t.i1 = d;
    t.l0 = acc(1);
    t.l1 = acc(0);
    return t;
  }
  const acc ratio = static_cast<acc>(in) / static_cast<acc>(n);
  acc real = ratio * (static_cast<acc>(d) + acc(0.5)) - acc(0.5);
  if (real < acc(0)) real = acc(0);
  const int64_t f = static_cast<int64_t>(floor_(real));
  t.i0 = f < in - 1 ? f : in - 1;
  acc l = real - static_cast<acc>(t.i0);
  l = l < acc(0) ? acc(0) : (l > acc(1) ? acc(1) : l);
  t.i1 = t.i0 + (t.i0 < in - 1 ? 1 : 0);
  t.l1 = l;
  t.l0 = acc(1) - l;
  return t;
}

// Pixel (i, j) of the zero-padded (M + 2) x (M + 2) mask.
template <typename T, typename acc>
LTK_PASTE_HD acc padded(const T* mask, int64_t M, int64_t i, int64_t j) {
  return (i >= 1 && i <= M && j >= 1 && j <= M) ? static_cast<acc>(mask[(i - 1) * M + (j - 1)]) : acc(0);
}

template <typename T, typename acc>
LTK_PASTE_HD acc value(const T* mask, int64_t M, const Taps<acc>& ty, const Taps<acc>& tx) {
  const acc r0 = padded<T, acc>(mask, M, ty.i0, tx.i0) * tx.l0 + padded<T, acc>(mask, M, ty.i0, tx.i1) * tx.l1;
  const acc r1 = padded<T, acc>(mask, M, ty.i1, tx.i0) * tx.l0 + padded<T, acc>(mask, M, ty.i1, tx.i1) * tx.l1;
  return r0 * ty.l0 + r1 * ty.l1;
}

}  // namespace ltk::paste_masks
