// CUDA kernels of the Equalized Focal Loss (docs/spec.md §2) and of the Equalized Quality Focal Loss (the same
// kernels with a soft target on the positive column: `quality` non-null).
// Both kernels: one block per row at a time (grid-stride over rows), threads along the classes (coalesced), each
// thread owning the columns j = threadIdx.x + k * blockDim.x.
// Forward: per-thread partial sums -> block reduction -> one partial per block -> at::sum (deterministic).
// Backward: writes dL/dlogits and adds |dL/dx| into the block's per-class accumulators in shared memory (each
// column only ever touched by its owning thread: no shared atomics); at the end one atomicAdd per (block, class)
// into the [C] step statistics (or, in deterministic mode, one partial row per block summed by at::sum).
// No host sync: the normalizer and the upstream gradient are read on the device.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "common.h"
#include "cuda/launch.h"
#include "equalized_focal_loss.h"
#include "equalized_focal_loss_math.h"

namespace {

using ltk::equalized_focal_loss::grad_z;
using ltk::equalized_focal_loss::loss_term;
using ltk::equalized_focal_loss::quality_grad_x;
using ltk::equalized_focal_loss::quality_loss_term;

constexpr int kThreads = 256;
constexpr int kUnroll = 4;  // columns loaded per thread before the maths: more bytes in flight

struct Params {
  double gamma_b, scale, a_pos, a_neg;
};

template <typename acc>
__device__ __forceinline__ void class_weights(const acc* __restrict__ pos_neg, int64_t j, const Params& p, acc& gamma,
                                              acc& w) {
  const acc g = static_cast<acc>(p.gamma_b) + static_cast<acc>(p.scale) * (acc(1) - pos_neg[j]);
  gamma = g;
  w = p.scale == 0 ? acc(1) : g / static_cast<acc>(p.gamma_b);
}

// f(j, pos, z, gamma, aw) for the columns j = threadIdx.x + k * kThreads < c of one row, kUnroll of them loaded
// before any maths (more bytes in flight): pos = (j is the row's positive column jp), z = pos ? x[j] : -x[j],
// gamma = gamma_j, aw = alpha_t * w_j.
template <typename scalar_t, typename acc, typename F>
__device__ __forceinline__ void for_each_column(const scalar_t* __restrict__ row, int64_t c, int64_t jp,
                                                const acc* __restrict__ pos_neg, const Params& p, F&& f) {
  for (int64_t j0 = threadIdx.x; j0 < c; j0 += kThreads * kUnroll) {
    acc v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t j = j0 + u * kThreads;
      v[u] = j < c ? static_cast<acc>(row[j]) : acc(0);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t j = j0 + u * kThreads;
      if (j < c) {
        acc gamma, w;
        class_weights(pos_neg, j, p, gamma, w);
        const bool pos = j == jp;
        f(j, pos, pos ? v[u] : -v[u], gamma, w * static_cast<acc>(pos ? p.a_pos : p.a_neg));
      }
    }
  }
}

// The soft target of row i's positive column (EQFL; unused for EFL and for background rows).
template <typename acc>
__device__ __forceinline__ acc row_quality(const acc* __restrict__ quality, int64_t i, int64_t jp) {
  if (quality == nullptr || jp < 0) return acc(1);
  const acc q = quality[i];
  CUDA_KERNEL_ASSERT(q >= acc(0) && q <= acc(1) && "quality must lie in [0, 1] on positive rows");
  return q;
}

template <typename scalar_t, typename acc>
__global__ void __launch_bounds__(kThreads)
    efl_forward_kernel(const scalar_t* __restrict__ x, const int64_t* __restrict__ labels,
                       const acc* __restrict__ quality, const acc* __restrict__ pos_neg, int64_t n, int64_t c, Params p,
                       int64_t ignore_index, acc* __restrict__ partial) {
  acc sum = 0;
  for (int64_t i = blockIdx.x; i < n; i += gridDim.x) {
    const int64_t y = labels[i];
    if (y == ignore_index) continue;
    CUDA_KERNEL_ASSERT(y >= 0 && y <= c && "labels must lie in 0..C or be ignore_index");
    const int64_t jp = y - 1;
    const acc qi = row_quality(quality, i, jp);
    const scalar_t* row = x + i * c;
    for_each_column(row, c, jp, pos_neg, p, [&](int64_t, bool pos, acc z, acc gamma, acc aw) {
      sum += pos && quality != nullptr ? quality_loss_term<acc>(z, qi, gamma, aw) : loss_term<acc>(z, gamma, aw);
    });
  }
  // block reduction: warp shuffles, then the warps' sums through shared memory
  for (int off = 16; off > 0; off >>= 1) sum += __shfl_down_sync(0xffffffffu, sum, off);
  LTK_SHARED(acc, warp_sums, kThreads / 32);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_sums[warp] = sum;
  __syncthreads();
  if (warp == 0) {
    sum = lane < kThreads / 32 ? warp_sums[lane] : acc(0);
    for (int off = 16; off > 0; off >>= 1) sum += __shfl_down_sync(0xffffffffu, sum, off);
    if (lane == 0) partial[blockIdx.x] = sum;
  }
}

// SMEM: per-class accumulators in shared memory (2 * c values); otherwise atomics straight to global memory.
template <typename scalar_t, typename acc, bool SMEM>
__global__ void __launch_bounds__(kThreads)
    efl_backward_kernel(const scalar_t* __restrict__ x, const int64_t* __restrict__ labels,
                        const acc* __restrict__ quality, const acc* __restrict__ pos_neg,
                        const acc* __restrict__ gscale_ptr, int64_t n, int64_t c, Params p, int64_t ignore_index,
                        scalar_t* __restrict__ grad, acc* __restrict__ pos_out, acc* __restrict__ neg_out,
                        acc* __restrict__ partial) {
  LTK_DYNAMIC_SHARED(unsigned char, smem_raw);
  acc* s_pos = reinterpret_cast<acc*>(smem_raw);
  acc* s_neg = s_pos + c;
  if constexpr (SMEM) {
    for (int64_t j = threadIdx.x; j < c; j += kThreads) {
      s_pos[j] = 0;
      s_neg[j] = 0;
    }
    // no __syncthreads needed: every column is only read and written by its owning thread
  }
  const acc gscale = *gscale_ptr;  // grad_loss / normalizer
  for (int64_t i = blockIdx.x; i < n; i += gridDim.x) {
    const int64_t y = labels[i];
    const scalar_t* row = x + i * c;
    scalar_t* grow = grad + i * c;
    if (y == ignore_index) {
      for (int64_t j = threadIdx.x; j < c; j += kThreads) grow[j] = scalar_t(0);
      continue;
    }
    CUDA_KERNEL_ASSERT(y >= 0 && y <= c && "labels must lie in 0..C or be ignore_index");
    const int64_t jp = y - 1;
    const acc qi = row_quality(quality, i, jp);
    for_each_column(row, c, jp, pos_neg, p, [&](int64_t j, bool pos, acc z, acc gamma, acc aw) {
      // positive column: z = x, so d/dz = d/dx
      const acc dz = pos && quality != nullptr ? quality_grad_x<acc>(z, qi, gamma, aw) : grad_z<acc>(z, gamma, aw);
      const acc g = (pos ? dz : -dz) * gscale;
      grow[j] = static_cast<scalar_t>(g);
      const acc ag = g < acc(0) ? -g : g;
      if constexpr (SMEM) {
        if (pos)
          s_pos[j] += ag;
        else
          s_neg[j] += ag;
      } else {
        atomicAdd(pos ? pos_out + j : neg_out + j, ag);
      }
    });
  }
  if constexpr (SMEM) {
    if (partial != nullptr) {  // deterministic: one row of partials per block
      acc* prow = partial + static_cast<int64_t>(blockIdx.x) * 2 * c;
      for (int64_t j = threadIdx.x; j < c; j += kThreads) {
        prow[j] = s_pos[j];
        prow[c + j] = s_neg[j];
      }
    } else {
      for (int64_t j = threadIdx.x; j < c; j += kThreads) {
        if (s_pos[j] != acc(0)) atomicAdd(pos_out + j, s_pos[j]);
        if (s_neg[j] != acc(0)) atomicAdd(neg_out + j, s_neg[j]);
      }
    }
  }
}

Params make_params(double gamma_b, double scale, double alpha) {
  return Params{gamma_b, scale, alpha >= 0 ? alpha : 1.0, alpha >= 0 ? 1.0 - alpha : 1.0};
}

int64_t grid_size(int64_t n) {
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return std::max<int64_t>(1, std::min<int64_t>(n, static_cast<int64_t>(sms) * (2048 / kThreads)));
}

at::Tensor forward_cuda(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& quality,
                        const at::Tensor& pos_neg, const at::Tensor& normalizer, double gamma_b, double scale,
                        double alpha, int64_t ignore_index) {
  ltk::equalized_focal_loss::check_inputs(logits, labels, quality, pos_neg, normalizer, gamma_b, scale,
                                          LTK_CUDA_DEVICE);
  c10::cuda::CUDAGuard guard(logits.device());
  const int64_t n = logits.size(0), c = logits.size(1);
  const auto acc_type = ltk::acc_type(logits.scalar_type());
  auto norm = normalizer.reshape({}).to(acc_type);
  if (n == 0 || c == 0) return at::zeros({}, logits.options().dtype(acc_type)) / norm;
  auto x = logits.contiguous();
  auto lab = labels.to(at::kLong).contiguous();
  auto g = pos_neg.to(acc_type).contiguous();
  auto q = quality.defined() ? quality.to(acc_type).contiguous() : at::Tensor();
  const int64_t blocks = grid_size(n);
  auto partial = at::empty({blocks}, logits.options().dtype(acc_type));
  const Params p = make_params(gamma_b, scale, alpha);
  auto stream = at::cuda::getCurrentCUDAStream();
  LTK_DISPATCH_FLOATING(x.scalar_type(), "equalized_focal_loss_cuda", [&] {
    using acc = ltk::acc_t<scalar_t>;
    LTK_LAUNCH(blocks, kThreads, 0, stream, efl_forward_kernel<scalar_t, acc>)
    (x.const_data_ptr<scalar_t>(), lab.const_data_ptr<int64_t>(), q.defined() ? q.const_data_ptr<acc>() : nullptr,
     g.const_data_ptr<acc>(), n, c, p, ignore_index, partial.data_ptr<acc>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return partial.sum() / norm;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cuda(const at::Tensor& grad_loss, const at::Tensor& logits,
                                                             const at::Tensor& labels, const at::Tensor& quality,
                                                             const at::Tensor& pos_neg, const at::Tensor& normalizer,
                                                             double gamma_b, double scale, double alpha,
                                                             int64_t ignore_index) {
  ltk::equalized_focal_loss::check_inputs(logits, labels, quality, pos_neg, normalizer, gamma_b, scale,
                                          LTK_CUDA_DEVICE);
  TORCH_CHECK(grad_loss.numel() == 1, "grad_loss must hold one value, got shape ", grad_loss.sizes());
  c10::cuda::CUDAGuard guard(logits.device());
  const int64_t n = logits.size(0), c = logits.size(1);
  const auto acc_type = ltk::acc_type(logits.scalar_type());
  auto x = logits.contiguous();
  auto grad = at::empty_like(x, at::MemoryFormat::Contiguous);
  auto pos = at::zeros({c}, logits.options().dtype(acc_type));
  auto neg = at::zeros({c}, logits.options().dtype(acc_type));
  if (n == 0 || c == 0) return {grad, pos, neg};
  auto lab = labels.to(at::kLong).contiguous();
  auto g = pos_neg.to(acc_type).contiguous();
  auto q = quality.defined() ? quality.to(acc_type).contiguous() : at::Tensor();
  // grad_loss / normalizer as a device scalar: no host sync
  auto gscale =
      (grad_loss.reshape({}).to(logits.device(), acc_type) / normalizer.reshape({}).to(acc_type)).contiguous();
  const int64_t blocks = grid_size(n);
  const Params p = make_params(gamma_b, scale, alpha);
  const bool deterministic = at::globalContext().deterministicAlgorithms();
  auto stream = at::cuda::getCurrentCUDAStream();
  LTK_DISPATCH_FLOATING(x.scalar_type(), "_equalized_focal_loss_backward_cuda", [&] {
    using acc = ltk::acc_t<scalar_t>;
    const size_t smem = static_cast<size_t>(2 * c) * sizeof(acc);
    const bool use_smem = smem <= 48 * 1024;
    // without the shared-memory accumulators the statistics are summed by global atomics in no fixed order
    if (deterministic && !use_smem)
      at::globalContext().alertNotDeterministic("_equalized_focal_loss_backward (CUDA, more than 48 KiB of classes)");
    at::Tensor partial;
    if (use_smem && deterministic) partial = at::empty({blocks, 2 * c}, logits.options().dtype(acc_type));
    acc* partial_ptr = partial.defined() ? partial.data_ptr<acc>() : nullptr;
    if (use_smem) {
      LTK_LAUNCH(blocks, kThreads, smem, stream, efl_backward_kernel<scalar_t, acc, true>)
      (x.const_data_ptr<scalar_t>(), lab.const_data_ptr<int64_t>(), q.defined() ? q.const_data_ptr<acc>() : nullptr,
       g.const_data_ptr<acc>(), gscale.const_data_ptr<acc>(), n, c, p, ignore_index, grad.data_ptr<scalar_t>(),
       pos.data_ptr<acc>(), neg.data_ptr<acc>(), partial_ptr);
    } else {
      LTK_LAUNCH(blocks, kThreads, 0, stream, efl_backward_kernel<scalar_t, acc, false>)
      (x.const_data_ptr<scalar_t>(), lab.const_data_ptr<int64_t>(), q.defined() ? q.const_data_ptr<acc>() : nullptr,
       g.const_data_ptr<acc>(), gscale.const_data_ptr<acc>(), n, c, p, ignore_index, grad.data_ptr<scalar_t>(),
       pos.data_ptr<acc>(), neg.data_ptr<acc>(), nullptr);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (partial.defined()) {
      auto sums = partial.view({blocks, 2, c}).sum(0);
      pos.copy_(sums[0]);
      neg.copy_(sums[1]);
    }
  });
  return {grad, pos, neg};
}

}  // namespace

TORCH_LIBRARY_IMPL(ltkernels, CUDA, m) {
  ltk::equalized_focal_loss::register_kernels<&forward_cuda, &backward_cuda>(m);
}
