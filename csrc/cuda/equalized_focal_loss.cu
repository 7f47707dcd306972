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
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

#include <algorithm>

#include "common.h"
#include "cuda/launch.h"
#include "equalized_focal_loss.h"
#include "equalized_focal_loss_math.h"

namespace {

using ltk::efl::grad_z;
using ltk::efl::loss_term;
using ltk::efl::quality_grad_x;
using ltk::efl::quality_loss_term;

constexpr int kThreads = 256;
constexpr int kUnroll = 4;  // columns loaded per thread before the maths: more bytes in flight

struct Params {
  double gamma_b, scale, a_pos, a_neg;
};

template <typename A>
__device__ __forceinline__ void class_weights(const A* __restrict__ pos_neg, int64_t j, const Params& p, A& gamma,
                                              A& w) {
  const A g = static_cast<A>(p.gamma_b) + static_cast<A>(p.scale) * (A(1) - pos_neg[j]);
  gamma = g;
  w = p.scale == 0 ? A(1) : g / static_cast<A>(p.gamma_b);
}

// f(j, pos, z, gamma, aw) for the columns j = threadIdx.x + k * kThreads < c of one row, kUnroll of them loaded
// before any maths (more bytes in flight): pos = (j is the row's positive column jp), z = pos ? x[j] : -x[j],
// gamma = gamma_j, aw = alpha_t * w_j.
template <typename scalar_t, typename A, typename F>
__device__ __forceinline__ void for_each_column(const scalar_t* __restrict__ row, int64_t c, int64_t jp,
                                                const A* __restrict__ pos_neg, const Params& p, F&& f) {
  for (int64_t j0 = threadIdx.x; j0 < c; j0 += kThreads * kUnroll) {
    A v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t j = j0 + u * kThreads;
      v[u] = j < c ? static_cast<A>(row[j]) : A(0);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t j = j0 + u * kThreads;
      if (j < c) {
        A gamma, w;
        class_weights(pos_neg, j, p, gamma, w);
        const bool pos = j == jp;
        f(j, pos, pos ? v[u] : -v[u], gamma, w * static_cast<A>(pos ? p.a_pos : p.a_neg));
      }
    }
  }
}

// The soft target of row i's positive column (EQFL; unused for EFL and for background rows).
template <typename A>
__device__ __forceinline__ A row_quality(const A* __restrict__ quality, int64_t i, int64_t jp) {
  if (quality == nullptr || jp < 0) return A(1);
  const A q = quality[i];
  CUDA_KERNEL_ASSERT(q >= A(0) && q <= A(1) && "quality must lie in [0, 1] on positive rows");
  return q;
}

template <typename scalar_t, typename A>
__global__ void __launch_bounds__(kThreads) efl_forward_kernel(const scalar_t* __restrict__ x,
                                                               const int64_t* __restrict__ labels,
                                                               const A* __restrict__ quality,
                                                               const A* __restrict__ pos_neg, int64_t n, int64_t c,
                                                               Params p, int64_t ignore_index,
                                                               A* __restrict__ partial) {
  A acc = 0;
  for (int64_t i = blockIdx.x; i < n; i += gridDim.x) {
    const int64_t y = labels[i];
    if (y == ignore_index) continue;
    CUDA_KERNEL_ASSERT(y >= 0 && y <= c && "labels must lie in 0..C or be ignore_index");
    const int64_t jp = y - 1;
    const A qi = row_quality(quality, i, jp);
    const scalar_t* row = x + i * c;
    for_each_column(row, c, jp, pos_neg, p, [&](int64_t, bool pos, A z, A gamma, A aw) {
      acc += pos && quality != nullptr ? quality_loss_term<A>(z, qi, gamma, aw) : loss_term<A>(z, gamma, aw);
    });
  }
  // block reduction: warp shuffles, then the warps' sums through shared memory
  for (int off = 16; off > 0; off >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, off);
  LTK_SHARED(A, warp_sums, kThreads / 32);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_sums[warp] = acc;
  __syncthreads();
  if (warp == 0) {
    acc = lane < kThreads / 32 ? warp_sums[lane] : A(0);
    for (int off = 16; off > 0; off >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, off);
    if (lane == 0) partial[blockIdx.x] = acc;
  }
}

// SMEM: per-class accumulators in shared memory (2 * c values); otherwise atomics straight to global memory.
template <typename scalar_t, typename A, bool SMEM>
__global__ void __launch_bounds__(kThreads) efl_backward_kernel(
    const scalar_t* __restrict__ x, const int64_t* __restrict__ labels, const A* __restrict__ quality,
    const A* __restrict__ pos_neg, const A* __restrict__ gscale_ptr, int64_t n, int64_t c, Params p, int64_t ignore_index,
    scalar_t* __restrict__ grad, A* __restrict__ pos_out, A* __restrict__ neg_out, A* __restrict__ partial) {
  LTK_DYNAMIC_SHARED(unsigned char, smem_raw);
  A* s_pos = reinterpret_cast<A*>(smem_raw);
  A* s_neg = s_pos + c;
  if constexpr (SMEM) {
    for (int64_t j = threadIdx.x; j < c; j += kThreads) {
      s_pos[j] = 0;
      s_neg[j] = 0;
    }
    // no __syncthreads needed: every column is only read and written by its owning thread
  }
  const A gscale = *gscale_ptr;  // grad_loss / normalizer
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
    const A qi = row_quality(quality, i, jp);
    for_each_column(row, c, jp, pos_neg, p, [&](int64_t j, bool pos, A z, A gamma, A aw) {
      // positive column: z = x, so d/dz = d/dx
      const A dz = pos && quality != nullptr ? quality_grad_x<A>(z, qi, gamma, aw) : grad_z<A>(z, gamma, aw);
      const A g = (pos ? dz : -dz) * gscale;
      grow[j] = static_cast<scalar_t>(g);
      const A ag = g < A(0) ? -g : g;
      if constexpr (SMEM) {
        if (pos) s_pos[j] += ag; else s_neg[j] += ag;
      } else {
        atomicAdd(pos ? pos_out + j : neg_out + j, ag);
      }
    });
  }
  if constexpr (SMEM) {
    if (partial != nullptr) {  // deterministic: one row of partials per block
      A* prow = partial + static_cast<int64_t>(blockIdx.x) * 2 * c;
      for (int64_t j = threadIdx.x; j < c; j += kThreads) {
        prow[j] = s_pos[j];
        prow[c + j] = s_neg[j];
      }
    } else {
      for (int64_t j = threadIdx.x; j < c; j += kThreads) {
        if (s_pos[j] != A(0)) atomicAdd(pos_out + j, s_pos[j]);
        if (s_neg[j] != A(0)) atomicAdd(neg_out + j, s_neg[j]);
      }
    }
  }
}

// quality: undefined for EFL.
void check_inputs(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& quality,
                  const at::Tensor& pos_neg, const at::Tensor& normalizer, double gamma_b, double scale) {
  LTK_CHECK_CUDA(logits);
  LTK_CHECK_CUDA(labels);
  LTK_CHECK_CUDA(pos_neg);
  LTK_CHECK_CUDA(normalizer);
  for (const at::Tensor* t : {&labels, &pos_neg, &normalizer})
    TORCH_CHECK(t->device() == logits.device(), "all inputs must be on ", logits.device(), ", got ", t->device());
  if (quality.defined()) {
    LTK_CHECK_CUDA(quality);
    TORCH_CHECK(quality.device() == logits.device(), "all inputs must be on ", logits.device(), ", got ",
                quality.device());
    ltk::check_equalized_quality_focal_loss_args(logits, labels, quality, pos_neg, normalizer, gamma_b, scale);
  } else {
    ltk::check_equalized_focal_loss_args(logits, labels, pos_neg, normalizer, gamma_b, scale);
  }
}

Params make_params(double gamma_b, double scale, double alpha) {
  return Params{gamma_b, scale, alpha >= 0 ? alpha : 1.0, alpha >= 0 ? 1.0 - alpha : 1.0};
}

at::ScalarType acc_dtype(const at::Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

int64_t grid_size(int64_t n) {
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return std::max<int64_t>(1, std::min<int64_t>(n, static_cast<int64_t>(sms) * (2048 / kThreads)));
}

at::Tensor forward_cuda(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& quality,
                        const at::Tensor& pos_neg, const at::Tensor& normalizer, double gamma_b, double scale,
                        double alpha, int64_t ignore_index) {
  check_inputs(logits, labels, quality, pos_neg, normalizer, gamma_b, scale);
  c10::cuda::CUDAGuard guard(logits.device());
  const int64_t n = logits.size(0), c = logits.size(1);
  const auto acc = acc_dtype(logits);
  auto norm = normalizer.reshape({}).to(acc);
  if (n == 0 || c == 0) return at::zeros({}, logits.options().dtype(acc)) / norm;
  auto x = logits.contiguous();
  auto lab = labels.to(at::kLong).contiguous();
  auto g = pos_neg.to(acc).contiguous();
  auto q = quality.defined() ? quality.to(acc).contiguous() : at::Tensor();
  const int64_t blocks = grid_size(n);
  auto partial = at::empty({blocks}, logits.options().dtype(acc));
  const Params p = make_params(gamma_b, scale, alpha);
  auto stream = at::cuda::getCurrentCUDAStream();
  LTK_DISPATCH_FLOATING(x.scalar_type(), "equalized_focal_loss_cuda", [&] {
    using A = ltk::acc_t<scalar_t>;
    LTK_LAUNCH(blocks, kThreads, 0, stream, efl_forward_kernel<scalar_t, A>)(
        x.const_data_ptr<scalar_t>(), lab.const_data_ptr<int64_t>(), q.defined() ? q.const_data_ptr<A>() : nullptr,
        g.const_data_ptr<A>(), n, c, p, ignore_index, partial.data_ptr<A>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return partial.sum() / norm;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cuda(const at::Tensor& grad_loss, const at::Tensor& logits,
                                                             const at::Tensor& labels, const at::Tensor& quality,
                                                             const at::Tensor& pos_neg, const at::Tensor& normalizer,
                                                             double gamma_b, double scale, double alpha,
                                                             int64_t ignore_index) {
  check_inputs(logits, labels, quality, pos_neg, normalizer, gamma_b, scale);
  TORCH_CHECK(grad_loss.numel() == 1, "grad_loss must hold one value, got shape ", grad_loss.sizes());
  c10::cuda::CUDAGuard guard(logits.device());
  const int64_t n = logits.size(0), c = logits.size(1);
  const auto acc = acc_dtype(logits);
  auto x = logits.contiguous();
  auto grad = at::empty_like(x, at::MemoryFormat::Contiguous);
  auto pos = at::zeros({c}, logits.options().dtype(acc));
  auto neg = at::zeros({c}, logits.options().dtype(acc));
  if (n == 0 || c == 0) return {grad, pos, neg};
  auto lab = labels.to(at::kLong).contiguous();
  auto g = pos_neg.to(acc).contiguous();
  auto q = quality.defined() ? quality.to(acc).contiguous() : at::Tensor();
  // grad_loss / normalizer as a device scalar: no host sync
  auto gscale = (grad_loss.reshape({}).to(logits.device(), acc) / normalizer.reshape({}).to(acc)).contiguous();
  const int64_t blocks = grid_size(n);
  const Params p = make_params(gamma_b, scale, alpha);
  const bool deterministic = at::globalContext().deterministicAlgorithms();
  auto stream = at::cuda::getCurrentCUDAStream();
  LTK_DISPATCH_FLOATING(x.scalar_type(), "equalized_focal_loss_backward_cuda", [&] {
    using A = ltk::acc_t<scalar_t>;
    const size_t smem = static_cast<size_t>(2 * c) * sizeof(A);
    const bool use_smem = smem <= 48 * 1024;
    // without the shared-memory accumulators the statistics are summed by global atomics in no fixed order
    if (deterministic && !use_smem)
      at::globalContext().alertNotDeterministic("equalized_focal_loss_backward (CUDA, more than 48 KiB of classes)");
    at::Tensor partial;
    if (use_smem && deterministic) partial = at::empty({blocks, 2 * c}, logits.options().dtype(acc));
    A* partial_ptr = partial.defined() ? partial.data_ptr<A>() : nullptr;
    if (use_smem) {
      LTK_LAUNCH(blocks, kThreads, smem, stream, efl_backward_kernel<scalar_t, A, true>)(
          x.const_data_ptr<scalar_t>(), lab.const_data_ptr<int64_t>(), q.defined() ? q.const_data_ptr<A>() : nullptr,
          g.const_data_ptr<A>(), gscale.const_data_ptr<A>(), n, c, p, ignore_index, grad.data_ptr<scalar_t>(), pos.data_ptr<A>(),
          neg.data_ptr<A>(), partial_ptr);
    } else {
      LTK_LAUNCH(blocks, kThreads, 0, stream, efl_backward_kernel<scalar_t, A, false>)(
          x.const_data_ptr<scalar_t>(), lab.const_data_ptr<int64_t>(), q.defined() ? q.const_data_ptr<A>() : nullptr,
          g.const_data_ptr<A>(), gscale.const_data_ptr<A>(), n, c, p, ignore_index, grad.data_ptr<scalar_t>(), pos.data_ptr<A>(),
          neg.data_ptr<A>(), nullptr);
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

at::Tensor efl_forward_cuda(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& pos_neg,
                            const at::Tensor& normalizer, double gamma_b, double scale, double alpha,
                            int64_t ignore_index, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&) {
  return forward_cuda(logits, labels, at::Tensor(), pos_neg, normalizer, gamma_b, scale, alpha, ignore_index);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> efl_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& logits,
                                                                 const at::Tensor& labels, const at::Tensor& pos_neg,
                                                                 const at::Tensor& normalizer, double gamma_b,
                                                                 double scale, double alpha, int64_t ignore_index) {
  return backward_cuda(grad_loss, logits, labels, at::Tensor(), pos_neg, normalizer, gamma_b, scale, alpha,
                       ignore_index);
}

at::Tensor eqfl_forward_cuda(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& quality,
                             const at::Tensor& pos_neg, const at::Tensor& normalizer, double gamma_b, double scale,
                             double alpha, int64_t ignore_index, const std::optional<at::Tensor>&,
                             const std::optional<at::Tensor>&) {
  return forward_cuda(logits, labels, quality, pos_neg, normalizer, gamma_b, scale, alpha, ignore_index);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> eqfl_backward_cuda(const at::Tensor& grad_loss,
                                                                  const at::Tensor& logits, const at::Tensor& labels,
                                                                  const at::Tensor& quality,
                                                                  const at::Tensor& pos_neg,
                                                                  const at::Tensor& normalizer, double gamma_b,
                                                                  double scale, double alpha, int64_t ignore_index) {
  return backward_cuda(grad_loss, logits, labels, quality, pos_neg, normalizer, gamma_b, scale, alpha, ignore_index);
}

}  // namespace

TORCH_LIBRARY_IMPL(ltkernels, CUDA, m) {
  m.impl("equalized_focal_loss", &efl_forward_cuda);
  m.impl("equalized_focal_loss_backward", &efl_backward_cuda);
  m.impl("equalized_quality_focal_loss", &eqfl_forward_cuda);
  m.impl("equalized_quality_focal_loss_backward", &eqfl_backward_cuda);
}
