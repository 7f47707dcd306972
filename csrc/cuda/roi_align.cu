// RoIAlign CUDA kernels: forward (one thread per output element), atomic backward (one thread per gradient element,
// gpuAtomicAdd into grad_input) and a deterministic backward used when `deterministic` is true.
//
// The deterministic backward is a gather: one thread per grad_input element (n, c, y, x) walks the RoIs of image n
// (RoIs grouped by image with a stable sort, offsets per image by searchsorted; no host sync), skips those whose
// samples cannot reach (y, x), and for the others visits only the bins whose samples can touch row y / column x.
// A bin's contribution factorises over the axes (the sample grid is a tensor product and the out-of-map rule and
// the clamps act per axis): grad[k, c, ph, pw] / count * Wy(ph, y) * Wx(pw, x), where Wy sums the bilinear row
// weights that the bin's samples give pixel row y. The order of the sum is fixed, so the result is bitwise
// reproducible; extra memory is O(K).
// Geometry follows torchvision's kernels (csrc/roi_align_math.h, shared with the CPU kernels; computed in float, or
// double for float64 input).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>
#include <ATen/cuda/Atomic.cuh>

#include <algorithm>

#include "common.h"
#include "cuda/launch.h"
#include "roi_align.h"
#include "roi_align_math.h"

namespace {

constexpr int kThreads = 256;

int64_t num_blocks(int64_t total) { return std::min<int64_t>(ltk::ceil_div(total, kThreads), int64_t{1} << 16); }

using ltk::roi_align::axis_taps;
using ltk::roi_align::sample_pos;

// One RoI's bins and samples, plus what the device kernels need beside them.
template <typename acc>
struct Geometry : ltk::roi_align::Box<acc, int> {
  int64_t batch;  // -1 when the batch index is out of range: the RoI pools zeros and gets no gradient
  acc count;      // samples per bin (at least 1): the divisor of the bin mean
};

template <typename acc>
__device__ __forceinline__ Geometry<acc> geometry(const acc* roi, acc scale, int64_t n_images, int PH, int PW,
                                                  int sampling_ratio, bool aligned) {
  const auto box = ltk::roi_align::box(roi, scale, PH, PW, sampling_ratio, aligned, 1 << 20);
  const acc b = roi[0];
  const int64_t batch = (b > acc(-1) && b < static_cast<acc>(n_images)) ? static_cast<int64_t>(b) : -1;
  const int64_t count = static_cast<int64_t>(box.grid_h) * box.grid_w;
  return {box, batch, static_cast<acc>(count > 1 ? count : 1)};
}

// Element `index` of a [K, C, PH, PW] tensor (the output, or its gradient): RoI k, channel c, bin (ph, pw).
struct BinIndex {
  int64_t k, c;
  int ph, pw;
};

__device__ __forceinline__ BinIndex bin_index(int64_t index, int64_t C, int PH, int PW) {
  BinIndex i;
  i.pw = static_cast<int>(index % PW);
  i.ph = static_cast<int>((index / PW) % PH);
  i.c = (index / (PW * PH)) % C;
  i.k = index / (static_cast<int64_t>(PW) * PH * C);
  return i;
}

// Calls f(y0, y1, x0, x1, fy, fx) for each sample of bin (ph, pw) that lies on the H x W map, in row-major sample
// order: its bilinear taps are rows y0, y1 (weights 1 - fy, fy) times columns x0, x1 (weights 1 - fx, fx).
template <typename acc, typename F>
__device__ __forceinline__ void for_each_sample(const Geometry<acc>& g, int ph, int pw, int H, int W, F&& f) {
  for (int iy = 0; iy < g.grid_h; ++iy) {
    int y0, y1;
    acc fy;
    if (!axis_taps(sample_pos(g.start_h, ph, g.bin_h, iy, g.grid_h), H, y0, y1, fy)) continue;
    for (int ix = 0; ix < g.grid_w; ++ix) {
      int x0, x1;
      acc fx;
      if (!axis_taps(sample_pos(g.start_w, pw, g.bin_w, ix, g.grid_w), W, x0, x1, fx)) continue;
      f(y0, y1, x0, x1, fy, fx);
    }
  }
}

// ---- forward ------------------------------------------------------------------------------------------------
template <typename T, typename acc>
__global__ void roi_align_forward_kernel(int64_t total, const T* __restrict__ input, const acc* __restrict__ rois,
                                         acc scale, int64_t N, int64_t C, int H, int W, int PH, int PW,
                                         int sampling_ratio, bool aligned, T* __restrict__ out) {
  for (int64_t index = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; index < total;
       index += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const BinIndex bin = bin_index(index, C, PH, PW);
    const auto g = geometry(rois + 5 * bin.k, scale, N, PH, PW, sampling_ratio, aligned);
    acc sum = 0;
    if (g.batch >= 0) {
      const T* plane = input + (g.batch * C + bin.c) * H * W;
      for_each_sample(g, bin.ph, bin.pw, H, W, [&](int y0, int y1, int x0, int x1, acc fy, acc fx) {
        const acc v00 = static_cast<acc>(plane[static_cast<int64_t>(y0) * W + x0]);
        const acc v01 = static_cast<acc>(plane[static_cast<int64_t>(y0) * W + x1]);
        const acc v10 = static_cast<acc>(plane[static_cast<int64_t>(y1) * W + x0]);
        const acc v11 = static_cast<acc>(plane[static_cast<int64_t>(y1) * W + x1]);
        const acc hy = acc(1) - fy, hx = acc(1) - fx;
        sum += hy * hx * v00 + hy * fx * v01 + fy * hx * v10 + fy * fx * v11;
      });
      sum /= g.count;
    }
    out[index] = static_cast<T>(sum);
  }
}

// ---- atomic backward --------------------------------------------------------------------------------------------
template <typename T, typename acc>
__global__ void roi_align_backward_atomic_kernel(int64_t total, const T* __restrict__ grad,
                                                 const acc* __restrict__ rois, acc scale, int64_t N, int64_t C, int H,
                                                 int W, int PH, int PW, int sampling_ratio, bool aligned,
                                                 acc* __restrict__ grad_input) {
  for (int64_t index = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; index < total;
       index += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const BinIndex bin = bin_index(index, C, PH, PW);
    const auto g = geometry(rois + 5 * bin.k, scale, N, PH, PW, sampling_ratio, aligned);
    if (g.batch < 0) continue;
    const acc gv = static_cast<acc>(grad[index]) / g.count;
    acc* plane = grad_input + (g.batch * C + bin.c) * H * W;
    for_each_sample(g, bin.ph, bin.pw, H, W, [&](int y0, int y1, int x0, int x1, acc fy, acc fx) {
      const acc hy = acc(1) - fy, hx = acc(1) - fx;
      gpuAtomicAdd(plane + static_cast<int64_t>(y0) * W + x0, gv * hy * hx);
      gpuAtomicAdd(plane + static_cast<int64_t>(y0) * W + x1, gv * hy * fx);
      gpuAtomicAdd(plane + static_cast<int64_t>(y1) * W + x0, gv * fy * hx);
      gpuAtomicAdd(plane + static_cast<int64_t>(y1) * W + x1, gv * fy * fx);
    });
  }
}

// ---- deterministic (gather) backward ----------------------------------------------------------------------------
// Summed weight that the samples of bin p (along one axis) give pixel `pixel`.
template <typename acc>
__device__ __forceinline__ acc axis_weight(acc start, acc bin, int p, int grid, int size, int pixel) {
  acc w = 0;
  for (int i = 0; i < grid; ++i) {
    int lo, hi;
    acc frac;
    if (!axis_taps(sample_pos(start, p, bin, i, grid), size, lo, hi, frac)) continue;
    if (lo == pixel) w += acc(1) - frac;
    if (hi == pixel) w += frac;
  }
  return w;
}

// Bins [b0, b1] whose samples can touch `pixel`: a sample reaches pixels floor(v) and floor(v) + 1 (after the
// clamps), so it lies within (pixel - 1, pixel + 1), widened to [-1, ...] on the first and [..., size] on the
// last pixel; one bin of slack on either side absorbs rounding. Returns b0 > b1 when no bin can.
template <typename acc>
__device__ __forceinline__ void bin_range(acc start, acc bin, int pooled, int size, int pixel, int& b0, int& b1) {
  const acc lo_v = pixel == 0 ? acc(-1) : static_cast<acc>(pixel - 1);
  const acc hi_v = pixel == size - 1 ? static_cast<acc>(size) : static_cast<acc>(pixel + 1);
  const acc t1 = (lo_v - start) / bin, t2 = (hi_v - start) / bin;
  if (!(t1 == t1 && t2 == t2 && fabs(t1) < acc(1e9) && fabs(t2) < acc(1e9))) {  // bin == 0, NaN, huge
    b0 = 0;
    b1 = pooled - 1;
    return;
  }
  const acc tl = floor(t1 < t2 ? t1 : t2) - 1, th = floor(t1 < t2 ? t2 : t1) + 1;
  b0 = tl <= 0 ? 0 : static_cast<int>(tl);
  b1 = th >= static_cast<acc>(pooled - 1) ? pooled - 1 : static_cast<int>(th);
}

// Conservative range [lo, hi] of the pixels that the samples of a RoI can touch along one axis (lo > hi: none).
// The samples run monotonically from the first of bin 0 to the last of bin pooled - 1; each touches floor(v) and
// floor(v) + 1 after the clamps; one pixel of slack on either side absorbs rounding.
template <typename acc>
__device__ __forceinline__ void touched_range(acc start, acc bin, int pooled, int grid, int size, int& lo, int& hi) {
  lo = 0;
  hi = -1;
  if (grid <= 0 || size <= 0) return;
  const acc a = sample_pos(start, 0, bin, 0, grid);
  const acc b = sample_pos(start, pooled - 1, bin, grid - 1, grid);
  if (!(a == a && b == b)) {  // NaN geometry: keep every pixel, the exact test decides
    hi = size - 1;
    return;
  }
  const acc vmin = a < b ? a : b, vmax = a < b ? b : a;
  if (vmax < acc(-2) || vmin > static_cast<acc>(size + 1)) return;  // every sample off the map
  lo = vmin <= acc(1) ? 0 : static_cast<int>(floor(vmin)) - 1;
  hi = vmax >= static_cast<acc>(size - 2) ? size - 1 : static_cast<int>(floor(vmax > 0 ? vmax : acc(0))) + 2;
}

// Per RoI, in image-grouped order: the rectangle of grad_input its samples can touch (y0, y1, x0, x1).
template <typename acc>
__global__ void roi_bounds_kernel(int64_t K, const acc* __restrict__ rois, const int64_t* __restrict__ order, acc scale,
                                  int64_t N, int H, int W, int PH, int PW, int sampling_ratio, bool aligned,
                                  int4* __restrict__ bounds) {
  for (int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; j < K;
       j += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const auto g = geometry(rois + 5 * order[j], scale, N, PH, PW, sampling_ratio, aligned);
    int4 box = make_int4(0, -1, 0, -1);
    if (g.batch >= 0) {
      touched_range(g.start_h, g.bin_h, PH, g.grid_h, H, box.x, box.y);
      touched_range(g.start_w, g.bin_w, PW, g.grid_w, W, box.z, box.w);
    }
    bounds[j] = box;
  }
}

template <typename T, typename acc>
__global__ void roi_align_backward_gather_kernel(int64_t total, const T* __restrict__ grad,
                                                 const acc* __restrict__ rois, const int64_t* __restrict__ order,
                                                 const int4* __restrict__ bounds,
                                                 const int64_t* __restrict__ image_begin, acc scale, int64_t N,
                                                 int64_t C, int H, int W, int PH, int PW, int sampling_ratio,
                                                 bool aligned, T* __restrict__ grad_input) {
  for (int64_t index = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; index < total;
       index += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int x = static_cast<int>(index % W);
    const int y = static_cast<int>((index / W) % H);
    const int64_t c = (index / (static_cast<int64_t>(W) * H)) % C;
    const int64_t n = index / (static_cast<int64_t>(W) * H * C);
    acc sum = 0;
    const int64_t j_end = image_begin[n + 1];
    for (int64_t j = image_begin[n]; j < j_end; ++j) {
      const int4 box = bounds[j];
      if (y < box.x || y > box.y || x < box.z || x > box.w) continue;
      const int64_t k = order[j];
      const auto g = geometry(rois + 5 * k, scale, N, PH, PW, sampling_ratio, aligned);
      if (g.batch != n || g.grid_h <= 0 || g.grid_w <= 0) continue;
      int ph0, ph1, pw0, pw1;
      bin_range(g.start_h, g.bin_h, PH, H, y, ph0, ph1);
      if (ph0 > ph1) continue;
      bin_range(g.start_w, g.bin_w, PW, W, x, pw0, pw1);
      if (pw0 > pw1) continue;
      const T* gk = grad + (k * C + c) * PH * PW;
      acc roi_sum = 0;
      for (int ph = ph0; ph <= ph1; ++ph) {
        const acc wy = axis_weight(g.start_h, g.bin_h, ph, g.grid_h, H, y);
        if (wy == acc(0)) continue;
        for (int pw = pw0; pw <= pw1; ++pw) {
          const acc wx = axis_weight(g.start_w, g.bin_w, pw, g.grid_w, W, x);
          if (wx == acc(0)) continue;
          roi_sum += static_cast<acc>(gk[ph * PW + pw]) * wy * wx;
        }
      }
      sum += roi_sum / g.count;
    }
    grad_input[index] = static_cast<T>(sum);
  }
}

// ---- host wrappers ------------------------------------------------------------------------------------------------
// The kernels index with int: the sizes must fit.
void check_int_sizes(int64_t PH, int64_t PW, int64_t H, int64_t W) {
  TORCH_CHECK(H < (int64_t{1} << 30) && W < (int64_t{1} << 30) && PH < (int64_t{1} << 30) && PW < (int64_t{1} << 30) &&
                  PH * PW < (int64_t{1} << 31),
              "roi_align: sizes too large");
}

at::Tensor roi_align_forward_cuda(const at::Tensor& input, const at::Tensor& rois, double spatial_scale,
                                  int64_t pooled_height, int64_t pooled_width, int64_t sampling_ratio, bool aligned) {
  ltk::roi_align::check_args(input, "input", rois, pooled_height, pooled_width, LTK_CUDA_DEVICE);
  const int64_t K = rois.size(0), N = input.size(0), C = input.size(1), H = input.size(2), W = input.size(3);
  check_int_sizes(pooled_height, pooled_width, H, W);
  c10::cuda::CUDAGuard guard(input.device());
  at::Tensor out = at::empty({K, C, pooled_height, pooled_width}, input.options());
  const int64_t total = out.numel();
  if (total == 0) return out;
  if (H == 0 || W == 0) return out.zero_();
  const at::Tensor in = input.contiguous();
  auto stream = at::cuda::getCurrentCUDAStream();
  LTK_DISPATCH_FLOATING(input.scalar_type(), "roi_align_forward_cuda", [&] {
    using acc = ltk::acc_t<scalar_t>;
    const at::Tensor r = rois.to(c10::CppTypeToScalarType<acc>::value).contiguous();
    LTK_LAUNCH(num_blocks(total), kThreads, 0, stream, roi_align_forward_kernel<scalar_t, acc>)
    (total, in.const_data_ptr<scalar_t>(), r.const_data_ptr<acc>(), static_cast<acc>(spatial_scale), N, C,
     static_cast<int>(H), static_cast<int>(W), static_cast<int>(pooled_height), static_cast<int>(pooled_width),
     static_cast<int>(sampling_ratio), aligned, out.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor roi_align_backward_cuda(const at::Tensor& grad, const at::Tensor& rois, double spatial_scale,
                                   int64_t pooled_height, int64_t pooled_width, int64_t batch_size, int64_t channels,
                                   int64_t height, int64_t width, int64_t sampling_ratio, bool aligned,
                                   bool deterministic) {
  ltk::roi_align::check_args(grad, "grad", rois, pooled_height, pooled_width, LTK_CUDA_DEVICE);
  ltk::roi_align::check_backward_sizes(grad, rois, pooled_height, pooled_width, batch_size, channels, height, width);
  check_int_sizes(pooled_height, pooled_width, height, width);
  const int64_t K = rois.size(0);
  c10::cuda::CUDAGuard guard(grad.device());
  const int64_t N = batch_size, C = channels;
  const int H = static_cast<int>(height), W = static_cast<int>(width);
  const int PH = static_cast<int>(pooled_height), PW = static_cast<int>(pooled_width);
  const int sr = static_cast<int>(sampling_ratio);
  auto stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor g = grad.contiguous();
  if (grad.numel() == 0 || N * C * H * W == 0) return at::zeros({N, C, height, width}, grad.options());

  at::Tensor grad_input;
  LTK_DISPATCH_FLOATING(grad.scalar_type(), "roi_align_backward_cuda", [&] {
    using acc = ltk::acc_t<scalar_t>;
    const auto acc_type = c10::CppTypeToScalarType<acc>::value;
    const at::Tensor r = rois.to(acc_type).contiguous();
    const acc scale = static_cast<acc>(spatial_scale);
    if (deterministic) {
      // RoIs grouped by image (stable: ties keep their order), and where each image's group starts.
      const at::Tensor image = r.select(1, 0).to(at::kLong);
      auto sorted = at::sort(image, /*stable=*/true, /*dim=*/0, /*descending=*/false);
      const at::Tensor keys = std::get<0>(sorted).contiguous();
      const at::Tensor order = std::get<1>(sorted).contiguous();
      const at::Tensor begin =
          at::searchsorted(keys, at::arange(N + 1, image.options()), /*out_int32=*/false, /*right=*/false).contiguous();
      at::Tensor bounds = at::empty({K, 4}, image.options().dtype(at::kInt));
      if (K > 0) {
        LTK_LAUNCH(num_blocks(K), kThreads, 0, stream, roi_bounds_kernel<acc>)
        (K, r.const_data_ptr<acc>(), order.const_data_ptr<int64_t>(), scale, N, H, W, PH, PW, sr, aligned,
         reinterpret_cast<int4*>(bounds.mutable_data_ptr<int32_t>()));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      grad_input = at::empty({N, C, height, width}, grad.options());
      const int64_t total = grad_input.numel();
      LTK_LAUNCH(num_blocks(total), kThreads, 0, stream, roi_align_backward_gather_kernel<scalar_t, acc>)
      (total, g.const_data_ptr<scalar_t>(), r.const_data_ptr<acc>(), order.const_data_ptr<int64_t>(),
       reinterpret_cast<const int4*>(bounds.const_data_ptr<int32_t>()), begin.const_data_ptr<int64_t>(), scale, N, C, H,
       W, PH, PW, sr, aligned, grad_input.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      at::Tensor buffer = at::zeros({N, C, height, width}, grad.options().dtype(acc_type));
      const int64_t total = g.numel();
      LTK_LAUNCH(num_blocks(total), kThreads, 0, stream, roi_align_backward_atomic_kernel<scalar_t, acc>)
      (total, g.const_data_ptr<scalar_t>(), r.const_data_ptr<acc>(), scale, N, C, H, W, PH, PW, sr, aligned,
       buffer.mutable_data_ptr<acc>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      grad_input = grad.scalar_type() == acc_type ? buffer : buffer.to(grad.scalar_type());
    }
  });
  return grad_input;
}

}  // namespace

TORCH_LIBRARY_IMPL(ltkernels, CUDA, m) {
  m.impl("roi_align", &roi_align_forward_cuda);
  m.impl("_roi_align_backward", &roi_align_backward_cuda);
}
