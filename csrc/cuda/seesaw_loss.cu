// Seesaw loss (docs/spec.md §9): CUDA kernel. One block per row; threads along the columns (coalesced). Pass 1: an
// online (max, sum of exp) over the class logits gives their log-sum-exp; pass 2: the same over the seesaw logits z
// (computed on the fly from the row, L1/L2-resident by then); pass 3 writes gscale * (softmax(z) - onehot) and the
// objectness pair. The row's loss goes to a [N] buffer summed afterwards (deterministic). No host sync: the
// normalizer is read on the device.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

#include "common.h"
#include "cuda/launch.h"
#include "cuda/online_softmax.h"
#include "seesaw_loss.h"
#include "seesaw_loss_math.h"

namespace {

using ltk::cuda::MaxSum;
using ltk::seesaw_loss::objectness;
using ltk::seesaw_loss::seesaw_logit;

constexpr int kThreads = 128;  // multiple of 32; block_merge assumes it

struct Params {
  double p, q, log_eps;
};

template <typename scalar_t, typename acc>
__global__ void __launch_bounds__(kThreads)
    seesaw_loss_kernel(const scalar_t* __restrict__ x, const int64_t* __restrict__ labels, const acc* __restrict__ logn,
                       const acc* __restrict__ gscale_ptr, int64_t k, Params pr, int64_t ignore_index,
                       scalar_t* __restrict__ grad, acc* __restrict__ row_loss) {
  LTK_SHARED(MaxSum<acc>, shared, 33);
  const int64_t i = blockIdx.x, c = k - 2;
  const scalar_t* xi = x + i * k;
  scalar_t* gi = grad + i * k;
  const int64_t y = labels[i];
  if (y == ignore_index) {
    for (int64_t j = threadIdx.x; j < k; j += blockDim.x) gi[j] = scalar_t(0);
    if (threadIdx.x == 0) row_loss[i] = acc(0);
    return;
  }
  CUDA_KERNEL_ASSERT(y >= 0 && y <= c && "labels must lie in 0..C or be ignore_index");
  const acc gscale = *gscale_ptr;
  acc loss = acc(0);
  if (y > 0) {  // uniform across the block
    const int64_t l = y - 1;
    const acc p = static_cast<acc>(pr.p), q = static_cast<acc>(pr.q);
    MaxSum<acc> v{-std::numeric_limits<acc>::infinity(), acc(0)};
    for (int64_t j = threadIdx.x; j < c; j += blockDim.x) v = ltk::cuda::push(v, static_cast<acc>(xi[j]));
    v = ltk::cuda::block_merge(v, shared);
    const acc lse = v.m + ltk::lg(v.s);
    const acc xl = static_cast<acc>(xi[l]);
    const acc ls = xl - lse > static_cast<acc>(pr.log_eps) ? xl - lse : static_cast<acc>(pr.log_eps);
    const acc logn_l = logn[l];
    MaxSum<acc> w{-std::numeric_limits<acc>::infinity(), acc(0)};
    for (int64_t j = threadIdx.x; j < c; j += blockDim.x)
      w = ltk::cuda::push(w, seesaw_logit(static_cast<acc>(xi[j]), logn[j], logn_l, lse, ls, p, q));
    w = ltk::cuda::block_merge(w, shared);
    const acc f = gscale / w.s;
    for (int64_t j = threadIdx.x; j < c; j += blockDim.x) {
      acc g = ltk::ex(seesaw_logit(static_cast<acc>(xi[j]), logn[j], logn_l, lse, ls, p, q) - w.m) * f;
      if (j == l) g -= gscale;
      gi[j] = static_cast<scalar_t>(g);
    }
    loss = w.m + ltk::lg(w.s) - xl;
  } else {
    for (int64_t j = threadIdx.x; j < c; j += blockDim.x) gi[j] = scalar_t(0);
  }
  if (threadIdx.x == 0) {
    const auto o = objectness<acc>(static_cast<acc>(xi[c]), static_cast<acc>(xi[c + 1]), y == 0);
    gi[c] = static_cast<scalar_t>(o.grad_a * gscale);
    gi[c + 1] = static_cast<scalar_t>(-o.grad_a * gscale);
    row_loss[i] = loss + o.loss;
  }
}

std::tuple<at::Tensor, at::Tensor> seesaw_loss_cuda(const at::Tensor& logits, const at::Tensor& labels,
                                                    const at::Tensor& cum_samples, const at::Tensor& normalizer,
                                                    double p, double q, double eps, int64_t ignore_index) {
  ltk::seesaw_loss::check_inputs(logits, labels, cum_samples, normalizer, p, q, eps, LTK_CUDA_DEVICE);
  TORCH_CHECK(logits.size(0) <= std::numeric_limits<int32_t>::max(), "too many rows: ", logits.size(0));
  c10::cuda::CUDAGuard guard(logits.device());
  const int64_t n = logits.size(0), k = logits.size(1);
  const auto acc_type = ltk::acc_type(logits.scalar_type());
  auto x = logits.contiguous();
  auto grad = at::empty_like(x, at::MemoryFormat::Contiguous);
  auto norm = normalizer.reshape({}).to(acc_type);
  if (n == 0) return {at::zeros({}, logits.options().dtype(acc_type)) / norm, grad};
  auto lab = labels.to(at::kLong).contiguous();
  auto logn = ltk::seesaw_loss::log_counts(cum_samples, acc_type);
  auto gscale = (1 / norm).contiguous();  // on the device: no host sync
  auto row_loss = at::empty({n}, logits.options().dtype(acc_type));
  auto stream = at::cuda::getCurrentCUDAStream();
  LTK_DISPATCH_FLOATING(x.scalar_type(), "seesaw_loss_cuda", [&] {
    using acc = ltk::acc_t<scalar_t>;
    LTK_LAUNCH(static_cast<unsigned>(n), kThreads, 0, stream, seesaw_loss_kernel<scalar_t, acc>)
    (x.const_data_ptr<scalar_t>(), lab.const_data_ptr<int64_t>(), logn.const_data_ptr<acc>(),
     gscale.const_data_ptr<acc>(), k, Params{p, q, std::log(eps)}, ignore_index, grad.data_ptr<scalar_t>(),
     row_loss.data_ptr<acc>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {row_loss.sum() * gscale, grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(ltkernels, CUDA, m) { m.impl("seesaw_loss", &seesaw_loss_cuda); }
