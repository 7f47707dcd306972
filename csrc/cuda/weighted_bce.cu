// Class-weighted sigmoid cross-entropy (EQL v2, federated loss; docs/spec.md §10, §11): CUDA kernel. One block per
// row at a time (grid-stride over rows), threads along the classes (coalesced), each thread owning the columns
// j = threadIdx.x + k * blockDim.x. It writes dL/dlogits, sums the block's loss (one partial per block, summed by
// at::sum: deterministic) and, with statistics, adds w * |p - t| into the block's per-class accumulators in shared
// memory (each column only touched by its owning thread: no shared atomics); at the end one atomicAdd per (block,
// class), or in deterministic mode one partial row per block summed by at::sum. No host sync.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "common.h"
#include "cuda/launch.h"
#include "weighted_bce.h"
#include "weighted_bce_math.h"

namespace {

using ltk::weighted_bce::bce;

constexpr int kThreads = 256;

// STATS: with statistics; SMEM: their accumulators in shared memory (2 * k values), else atomics to global memory.
template <typename scalar_t, typename acc, bool STATS, bool SMEM>
__global__ void __launch_bounds__(kThreads)
    weighted_bce_kernel(const scalar_t* __restrict__ x, const int64_t* __restrict__ labels,
                        const acc* __restrict__ weights, const acc* __restrict__ gscale_ptr, int64_t n, int64_t k,
                        bool background_column, int64_t ignore_index, scalar_t* __restrict__ grad,
                        acc* __restrict__ loss_partial, acc* __restrict__ pos_out, acc* __restrict__ neg_out,
                        acc* __restrict__ stat_partial) {
  LTK_DYNAMIC_SHARED(unsigned char, smem_raw);
  acc* s_pos = reinterpret_cast<acc*>(smem_raw);
  acc* s_neg = s_pos + k;
  if constexpr (STATS && SMEM) {
    for (int64_t j = threadIdx.x; j < k; j += kThreads) {
      s_pos[j] = 0;
      s_neg[j] = 0;
    }
  }
  const acc* pw = weights;
  const acc* nw = weights + k;
  const acc gscale = *gscale_ptr;  // 1 / normalizer
  const int64_t c = k - (background_column ? 1 : 0);
  acc sum = 0;
  for (int64_t i = blockIdx.x; i < n; i += gridDim.x) {
    const int64_t y = labels[i];
    const scalar_t* row = x + i * k;
    scalar_t* grow = grad + i * k;
    if (y == ignore_index) {
      for (int64_t j = threadIdx.x; j < k; j += kThreads) grow[j] = scalar_t(0);
      continue;
    }
    CUDA_KERNEL_ASSERT(y >= 0 && y <= c && "labels must lie in 0..C or be ignore_index");
    const int64_t jp = y > 0 ? y - 1 : (background_column ? k - 1 : -1);
    for (int64_t j = threadIdx.x; j < k; j += kThreads) {
      const bool pos = j == jp;
      const acc v = static_cast<acc>(row[j]);
      const auto b = bce<acc>(pos ? v : -v);
      const acc w = pos ? pw[j] : nw[j];
      sum += w * b.loss;
      const acc wq = w * b.q;
      grow[j] = static_cast<scalar_t>((pos ? -wq : wq) * gscale);
      if constexpr (STATS) {
        if constexpr (SMEM) {
          if (pos)
            s_pos[j] += wq;
          else
            s_neg[j] += wq;
        } else {
          atomicAdd(pos ? pos_out + j : neg_out + j, wq);
        }
      }
    }
  }
  // block reduction of the loss: warp shuffles, then the warps' sums through shared memory
  for (int off = 16; off > 0; off >>= 1) sum += __shfl_down_sync(0xffffffffu, sum, off);
  LTK_SHARED(acc, warp_sums, kThreads / 32);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_sums[warp] = sum;
  __syncthreads();
  if (warp == 0) {
    sum = lane < kThreads / 32 ? warp_sums[lane] : acc(0);
    for (int off = 16; off > 0; off >>= 1) sum += __shfl_down_sync(0xffffffffu, sum, off);
    if (lane == 0) loss_partial[blockIdx.x] = sum;
  }
  if constexpr (STATS && SMEM) {
    if (stat_partial != nullptr) {  // deterministic: one row of partials per block
      acc* prow = stat_partial + static_cast<int64_t>(blockIdx.x) * 2 * k;
      for (int64_t j = threadIdx.x; j < k; j += kThreads) {
        prow[j] = s_pos[j];
        prow[k + j] = s_neg[j];
      }
    } else {
      for (int64_t j = threadIdx.x; j < k; j += kThreads) {
        if (s_pos[j] != acc(0)) atomicAdd(pos_out + j, s_pos[j]);
        if (s_neg[j] != acc(0)) atomicAdd(neg_out + j, s_neg[j]);
      }
    }
  }
}

int64_t grid_size(int64_t n) {
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return std::max<int64_t>(1, std::min<int64_t>(n, static_cast<int64_t>(sms) * (2048 / kThreads)));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> weighted_bce_cuda(
    const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& weights, const at::Tensor& normalizer,
    bool background_column, int64_t ignore_index, bool statistics) {
  c10::cuda::CUDAGuard guard(logits.device());
  const int64_t n = logits.size(0), k = logits.size(1);
  const auto acc_type = ltk::acc_type(logits.scalar_type());
  auto x = logits.contiguous();
  auto grad = at::empty_like(x, at::MemoryFormat::Contiguous);
  auto norm = normalizer.reshape({}).to(acc_type);
  auto pos = at::zeros({statistics ? k : 0}, logits.options().dtype(acc_type));
  auto neg = at::zeros({statistics ? k : 0}, logits.options().dtype(acc_type));
  if (n == 0 || k == 0) return {at::zeros({}, logits.options().dtype(acc_type)) / norm, grad, pos, neg};
  auto lab = labels.to(at::kLong).contiguous();
  auto w = weights.to(acc_type).contiguous();
  auto gscale = (1 / norm).contiguous();  // on the device: no host sync
  const int64_t blocks = grid_size(n);
  auto loss_partial = at::empty({blocks}, logits.options().dtype(acc_type));
  const bool deterministic = at::globalContext().deterministicAlgorithms();
  auto stream = at::cuda::getCurrentCUDAStream();
  LTK_DISPATCH_FLOATING(x.scalar_type(), "weighted_bce_cuda", [&] {
    using acc = ltk::acc_t<scalar_t>;
    const size_t smem = static_cast<size_t>(2 * k) * sizeof(acc);
    const bool use_smem = smem <= 48 * 1024;
    at::Tensor stat_partial;
    if (statistics && use_smem && deterministic) stat_partial = at::empty({blocks, 2 * k}, w.options());
    if (statistics && deterministic && !use_smem)
      at::globalContext().alertNotDeterministic("eqlv2_loss (CUDA, more than 48 KiB of classes)");
    auto args = [&](auto kernel, size_t shared) {
      LTK_LAUNCH(blocks, kThreads, shared, stream, kernel)
      (x.const_data_ptr<scalar_t>(), lab.const_data_ptr<int64_t>(), w.const_data_ptr<acc>(),
       gscale.const_data_ptr<acc>(), n, k, background_column, ignore_index, grad.data_ptr<scalar_t>(),
       loss_partial.data_ptr<acc>(), statistics ? pos.data_ptr<acc>() : nullptr,
       statistics ? neg.data_ptr<acc>() : nullptr, stat_partial.defined() ? stat_partial.data_ptr<acc>() : nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (!statistics)
      args(weighted_bce_kernel<scalar_t, acc, false, false>, 0);
    else if (use_smem)
      args(weighted_bce_kernel<scalar_t, acc, true, true>, smem);
    else
      args(weighted_bce_kernel<scalar_t, acc, true, false>, 0);
    if (stat_partial.defined()) {
      auto sums = stat_partial.view({blocks, 2, k}).sum(0);
      pos.copy_(sums[0]);
      neg.copy_(sums[1]);
    }
  });
  return {loss_partial.sum() * gscale, grad, pos, neg};
}

}  // namespace

TORCH_LIBRARY_IMPL(ltkernels, CUDA, m) { ltk::weighted_bce::register_kernels<&weighted_bce_cuda, LTK_CUDA_DEVICE>(m); }
