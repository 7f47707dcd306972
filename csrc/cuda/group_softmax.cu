// Balanced Group Softmax: CUDA kernels.
//
// group_softmax_loss: one block per row. For every group (a contiguous column range) each thread keeps an online
// (max, sum of exp) pair over its strided columns, one block reduction merges the pairs, and a second sweep over the
// group's columns (L1/L2-resident by then) writes weight * (softmax - onehot). A (row, group) with weight 0 only
// writes zeros. The per-row loss goes to a [N] buffer summed afterwards (deterministic). The logits are read from
// global memory once and the gradient written once; nothing is synchronised with the host.
// group_softmax_scores: one block per row; the per-group log-sum-exps go to shared memory, then the [C + 1] output
// row is written coalesced, gathering each label's column.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>

#include "common.h"
#include "cuda/launch.h"
#include "cuda/online_softmax.h"
#include "group_softmax.h"

namespace {

constexpr int kThreads = 128;  // multiple of 32; the block reductions below assume it

template <typename scalar_t, typename acc>
__global__ void __launch_bounds__(kThreads)
    group_softmax_loss_kernel(const scalar_t* __restrict__ x, const int64_t* __restrict__ labels,
                              const bool* __restrict__ selected, const acc* __restrict__ scale,
                              const int64_t* __restrict__ label_targets, const int64_t* __restrict__ offsets, int64_t N,
                              int64_t K, int G1, int64_t C1, scalar_t* __restrict__ grad, acc* __restrict__ row_loss) {
  LTK_SHARED(ltk::cuda::MaxSum<acc>, shared, 33);
  const int64_t i = blockIdx.x;
  CUDA_KERNEL_ASSERT(labels[i] >= 0 && labels[i] < C1 && "labels must lie in 0..C (ignored rows mapped to 0)");
  const scalar_t* xi = x + i * K;
  scalar_t* gi = grad + i * K;
  const int64_t* tgt = label_targets + labels[i] * G1;
  acc loss = acc(0);
  for (int k = 0; k < G1; ++k) {
    const int64_t s = offsets[k], e = offsets[k + 1];
    const acc wk = selected[k * N + i] ? scale[k] : acc(0);  // the same for the whole block: uniform branch
    if (wk == acc(0)) {
      for (int64_t j = s + threadIdx.x; j < e; j += blockDim.x) gi[j] = static_cast<scalar_t>(0);
      continue;
    }
    ltk::cuda::MaxSum<acc> v{-std::numeric_limits<acc>::infinity(), acc(0)};
    for (int64_t j = s + threadIdx.x; j < e; j += blockDim.x) v = ltk::cuda::push(v, static_cast<acc>(xi[j]));
    v = ltk::cuda::block_merge(v, shared);
    const acc scale = wk / v.s;
    const int64_t t = s + tgt[k];
    for (int64_t j = s + threadIdx.x; j < e; j += blockDim.x) {
      acc p = ltk::ex(static_cast<acc>(xi[j]) - v.m) * scale;
      if (j == t) p -= wk;
      gi[j] = static_cast<scalar_t>(p);
    }
    if (threadIdx.x == 0) loss += wk * (v.m + ltk::lg(v.s) - static_cast<acc>(xi[t]));
  }
  if (threadIdx.x == 0) row_loss[i] = loss;
}

template <typename scalar_t, typename acc>
__global__ void __launch_bounds__(kThreads)
    group_softmax_scores_kernel(const scalar_t* __restrict__ x, const int64_t* __restrict__ offsets,
                                const int64_t* __restrict__ label_group, const int64_t* __restrict__ score_column,
                                int64_t K, int G1, int64_t C1, scalar_t* __restrict__ out) {
  LTK_SHARED(ltk::cuda::MaxSum<acc>, shared, 33);
  LTK_DYNAMIC_SHARED(unsigned char, lse_raw);
  acc* lse = reinterpret_cast<acc*>(lse_raw);  // [G1]
  const int64_t i = blockIdx.x;
  const scalar_t* xi = x + i * K;
  for (int k = 0; k < G1; ++k) {
    ltk::cuda::MaxSum<acc> v{-std::numeric_limits<acc>::infinity(), acc(0)};
    for (int64_t j = offsets[k] + threadIdx.x; j < offsets[k + 1]; j += blockDim.x)
      v = ltk::cuda::push(v, static_cast<acc>(xi[j]));
    v = ltk::cuda::block_merge(v, shared);
    if (threadIdx.x == 0) lse[k] = v.m + ltk::lg(v.s);
  }
  __syncthreads();
  const acc fg = ltk::ex(static_cast<acc>(xi[1]) - lse[0]);
  scalar_t* oi = out + i * C1;
  for (int64_t c = threadIdx.x; c < C1; c += blockDim.x) {
    const acc p = ltk::ex(static_cast<acc>(xi[score_column[c]]) - lse[label_group[c]]);
    oi[c] = static_cast<scalar_t>(c == 0 ? p : p * fg);
  }
}

// The kernels' launch limits: a block per row, the groups' log-sum-exps in shared memory.
void check_limits(const at::Tensor& logits, const at::Tensor& group_offsets) {
  TORCH_CHECK(logits.size(0) <= std::numeric_limits<int32_t>::max(), "too many rows: ", logits.size(0));
  TORCH_CHECK(group_offsets.size(0) <= 4096, "too many groups: ", group_offsets.size(0) - 1);
}

std::tuple<at::Tensor, at::Tensor> group_softmax_loss_cuda(const at::Tensor& logits_, const at::Tensor& labels_,
                                                           const at::Tensor& selected_, const at::Tensor& scale_,
                                                           const at::Tensor& label_targets_,
                                                           const at::Tensor& group_offsets_) {
  LTK_CHECK_DEVICES(LTK_CUDA_DEVICE, logits_, labels_, selected_, scale_, label_targets_, group_offsets_);
  c10::cuda::CUDAGuard guard(logits_.device());
  // Label ranges and the layout are validated by the Python caller (no host sync here).
  const ltk::group_softmax::LossArgs a(logits_, labels_, selected_, scale_, label_targets_, group_offsets_);
  check_limits(a.logits, a.group_offsets);
  const int64_t N = a.N, K = a.K, G1 = a.G1;
  if (N > 0 && K > 0) {
    auto stream = at::cuda::getCurrentCUDAStream();
    LTK_DISPATCH_FLOATING(a.logits.scalar_type(), "group_softmax_loss_cuda", [&] {
      using acc = ltk::acc_t<scalar_t>;
      LTK_LAUNCH(static_cast<unsigned>(N), kThreads, 0, stream, group_softmax_loss_kernel<scalar_t, acc>)
      (a.logits.data_ptr<scalar_t>(), a.labels.data_ptr<int64_t>(), a.selected.data_ptr<bool>(),
       a.scale.data_ptr<acc>(), a.label_targets.data_ptr<int64_t>(), a.group_offsets.data_ptr<int64_t>(), N, K,
       static_cast<int>(G1), a.label_targets.size(0), a.grad.data_ptr<scalar_t>(), a.row_loss.data_ptr<acc>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return a.loss_result();
}

at::Tensor group_softmax_scores_cuda(const at::Tensor& logits_, const at::Tensor& group_offsets_,
                                     const at::Tensor& label_group_, const at::Tensor& score_column_) {
  LTK_CHECK_DEVICES(LTK_CUDA_DEVICE, logits_, group_offsets_, label_group_, score_column_);
  ltk::group_softmax::check_scores_args(logits_, group_offsets_, label_group_, score_column_);
  check_limits(logits_, group_offsets_);
  c10::cuda::CUDAGuard guard(logits_.device());
  const int64_t N = logits_.size(0), K = logits_.size(1), C1 = score_column_.size(0);
  const int64_t G1 = group_offsets_.size(0) - 1;
  const auto logits = logits_.contiguous();
  const auto offsets = group_offsets_.contiguous();
  const auto label_group = label_group_.contiguous();
  const auto score_column = score_column_.contiguous();
  auto out = at::empty({N, C1}, logits.options());
  if (N > 0 && K > 0 && C1 > 0) {
    auto stream = at::cuda::getCurrentCUDAStream();
    LTK_DISPATCH_FLOATING(logits.scalar_type(), "group_softmax_scores_cuda", [&] {
      using acc = ltk::acc_t<scalar_t>;
      LTK_LAUNCH(static_cast<unsigned>(N), kThreads, G1 * sizeof(acc), stream,
                 group_softmax_scores_kernel<scalar_t, acc>)
      (logits.data_ptr<scalar_t>(), offsets.data_ptr<int64_t>(), label_group.data_ptr<int64_t>(),
       score_column.data_ptr<int64_t>(), K, static_cast<int>(G1), C1, out.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(ltkernels, CUDA, m) {
  m.impl("group_softmax_loss", &group_softmax_loss_cuda);
  m.impl("group_softmax_scores", &group_softmax_scores_cuda);
}
