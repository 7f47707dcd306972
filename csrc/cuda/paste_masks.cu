// Mask pasting, CUDA kernel (docs/spec.md §8, geometry in csrc/paste_masks_math.h, shared with the CPU kernel).
// The output is bool [K, H, W], written once: each thread of a grid-stride loop computes 4 consecutive bytes of
// one row and stores them as one 32-bit word (rows are split into words only when W % 4 == 0 and the buffer is
// 4-byte aligned; otherwise one byte per thread). A thread reads its mask's box (4 values, cached) and computes the
// integer box, the row taps and the column taps itself: a few dozen flops per pixel against one byte of store, so
// the kernel runs at the speed of the output write. Pixels outside the box are `0 > threshold`.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "common.h"
#include "cuda/launch.h"
#include "paste_masks.h"
#include "paste_masks_math.h"

namespace {

constexpr int kThreads = 256;

using ltk::paste_masks::IntBox;
using ltk::paste_masks::Taps;

template <typename T, typename acc, typename B>
__device__ __forceinline__ bool pixel(const T* mask, int64_t M, const IntBox& b, const Taps<acc>& ty, int64_t x,
                                      acc thr, bool background) {
  if (x < b.x0 || x > b.x1) return background;
  const Taps<acc> tx = ltk::paste_masks::taps<acc>(M + 2, b.w, x - b.x0);
  return ltk::paste_masks::value<T, acc>(mask, M, ty, tx) > thr;
}

// V output bytes per thread (4: one 32-bit store; 1: one byte). `rows` = K * H, `W % V == 0`.
template <typename T, typename acc, typename B, int V>
__global__ void paste_masks_kernel(const T* __restrict__ masks, const B* __restrict__ boxes, int64_t rows, int64_t H,
                                   int64_t W, int64_t M, B scale, acc thr, uint8_t* __restrict__ out) {
  const bool background = acc(0) > thr;
  const int64_t per_row = W / V;
  const int64_t total = rows * per_row;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t r = i / per_row;
    const int64_t x = (i - r * per_row) * V;
    const int64_t k = r / H, y = r - k * H;
    const IntBox b = ltk::paste_masks::expand_box<B>(boxes + 4 * k, scale);
    uint8_t v[V];
    if (y < b.y0 || y > b.y1) {
#pragma unroll
      for (int j = 0; j < V; ++j) v[j] = background;
    } else {
      const Taps<acc> ty = ltk::paste_masks::taps<acc>(M + 2, b.h, y - b.y0);
      const T* mask = masks + k * M * M;
#pragma unroll
      for (int j = 0; j < V; ++j) v[j] = pixel<T, acc, B>(mask, M, b, ty, x + j, thr, background);
    }
    if constexpr (V == 4) {
      const uint32_t word = static_cast<uint32_t>(v[0]) | (static_cast<uint32_t>(v[1]) << 8) |
                            (static_cast<uint32_t>(v[2]) << 16) | (static_cast<uint32_t>(v[3]) << 24);
      reinterpret_cast<uint32_t*>(out + r * W)[x / 4] = word;
    } else {
      out[r * W + x] = v[0];
    }
  }
}

template <typename T, typename acc, typename B, int V>
void launch(const at::Tensor& m, const at::Tensor& b, int64_t H, int64_t W, int64_t M, double threshold,
            const at::Tensor& out) {
  const int64_t rows = m.size(0) * H;
  const int64_t total = rows * (W / V);
  const int64_t blocks = std::min<int64_t>(ltk::ceil_div(total, kThreads), int64_t{1} << 16);
  const B scale = static_cast<B>(static_cast<double>(M + 2) / static_cast<double>(M));
  LTK_LAUNCH(static_cast<unsigned>(blocks), kThreads, 0, at::cuda::getCurrentCUDAStream(),
             paste_masks_kernel<T, acc, B, V>)
  (m.const_data_ptr<T>(), b.const_data_ptr<B>(), rows, H, W, M, scale, static_cast<acc>(threshold),
   reinterpret_cast<uint8_t*>(out.mutable_data_ptr<bool>()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void paste_masks_into_cuda(const at::Tensor& masks, const at::Tensor& boxes, double threshold, const at::Tensor& out) {
  ltk::paste_masks::check_inputs(masks, boxes);
  ltk::paste_masks::check_out(masks, out);
  LTK_CHECK_DEVICES(LTK_CUDA_DEVICE, masks, boxes, out);
  const int64_t M = masks.size(1), H = out.size(1), W = out.size(2);
  if (out.numel() == 0) return;
  c10::cuda::CUDAGuard guard(masks.device());
  const at::Tensor b = ltk::paste_masks::box_tensor(boxes);
  ltk::paste_masks::check_finite(b);  // one host sync on a [K, 4] tensor
  const at::Tensor m = masks.contiguous();
  const bool words = W % 4 == 0 && reinterpret_cast<uintptr_t>(out.const_data_ptr()) % 4 == 0;
  LTK_DISPATCH_FLOATING(m.scalar_type(), "paste_masks_cuda", [&] {
    using acc = ltk::acc_t<scalar_t>;
    if (b.scalar_type() == at::kDouble) {
      if (words)
        launch<scalar_t, acc, double, 4>(m, b, H, W, M, threshold, out);
      else
        launch<scalar_t, acc, double, 1>(m, b, H, W, M, threshold, out);
    } else {
      if (words)
        launch<scalar_t, acc, float, 4>(m, b, H, W, M, threshold, out);
      else
        launch<scalar_t, acc, float, 1>(m, b, H, W, M, threshold, out);
    }
  });
}

at::Tensor paste_masks_cuda(const at::Tensor& masks, const at::Tensor& boxes, int64_t height, int64_t width,
                            double threshold) {
  ltk::paste_masks::check_inputs(masks, boxes);
  ltk::paste_masks::check_size(height, width);
  at::Tensor out = at::empty({masks.size(0), height, width}, masks.options().dtype(at::kBool));
  paste_masks_into_cuda(masks, boxes, threshold, out);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(ltkernels, CUDA, m) {
  m.impl("paste_masks", &paste_masks_cuda);
  m.impl("paste_masks_into", &paste_masks_into_cuda);
}
