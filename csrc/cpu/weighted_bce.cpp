// Class-weighted sigmoid cross-entropy (EQL v2, federated loss; docs/spec.md §10, §11): CPU kernel. One pass over
// the logits writes dL/dlogits, the rows' losses (summed in row order at the end: independent of the thread count)
// and, for EQL v2, the per-class sums of w * |p - t| into per-chunk [2, K] partials (double) merged in chunk order.
// float32 rows use the vectorisable exp / log1p of fast_math.h (compiled for AVX2+FMA and the baseline ISA; a few
// ulp, checked against float64 in the tests), float16/bfloat16 rows are widened into float rows, float64 rows take
// the exact <math.h> path.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "common.h"
#include "cpu/flush_denormals.h"
#include "cpu/output_slot.h"
#include "fast_math.h"
#include "weighted_bce.h"
#include "weighted_bce_math.h"

namespace {

using ltk::weighted_bce::bce;

// FP exceptions are never inspected: without -ftrapping-math GCC may if-convert and vectorise these loops.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC optimize("no-trapping-math")
#endif

// Columns x[0..m) as negatives (z = -x) with weights w: g = gscale * w * p, sums += w * p (when non-null);
// returns the sum of w * -log(1 - p).
LTK_CPU_CLONES float negatives_f32(const float* __restrict x, const float* __restrict w, int64_t m, float gscale,
                                   float* __restrict g, double* __restrict sums) {
  float s = 0.0f;
  if (sums != nullptr) {
#pragma omp simd reduction(+ : s)
    for (int64_t j = 0; j < m; ++j) {
      const float z = -x[j];
      const float e = ltk::exp_nonpos(z < 0.0f ? z : -z);
      const float r = 1.0f / (1.0f + e);
      const float wq = w[j] * (z >= 0.0f ? e * r : r);
      s += w[j] * ((z < 0.0f ? -z : 0.0f) + ltk::log1p_unit(e));
      g[j] = wq * gscale;
      sums[j] += static_cast<double>(wq);
    }
  } else {
#pragma omp simd reduction(+ : s)
    for (int64_t j = 0; j < m; ++j) {
      const float z = -x[j];
      const float e = ltk::exp_nonpos(z < 0.0f ? z : -z);
      const float r = 1.0f / (1.0f + e);
      s += w[j] * ((z < 0.0f ? -z : 0.0f) + ltk::log1p_unit(e));
      g[j] = w[j] * (z >= 0.0f ? e * r : r) * gscale;
    }
  }
  return s;
}
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif

template <typename acc>
acc negatives(const acc* x, const acc* w, int64_t m, acc gscale, acc* g, double* sums) {
  if constexpr (std::is_same_v<acc, float>) {
    return negatives_f32(x, w, m, gscale, g, sums);
  } else {
    acc s = 0;
    for (int64_t j = 0; j < m; ++j) {
      const auto b = bce<acc>(-x[j]);
      s += w[j] * b.loss;
      g[j] = w[j] * b.q * gscale;
      if (sums != nullptr) sums[j] += static_cast<double>(w[j] * b.q);
    }
    return s;
  }
}

// One row (in acc) into its gradient row; jp: the target column or -1. Returns the row's weighted BCE sum.
template <typename acc>
acc bce_row(const acc* x, acc* g, int64_t k, int64_t jp, const acc* pw, const acc* nw, acc gscale, double* pos,
            double* neg) {
  if (jp < 0) return negatives(x, nw, k, gscale, g, neg);
  acc s = negatives(x, nw, jp, gscale, g, neg);
  const auto b = bce<acc>(x[jp]);
  s += pw[jp] * b.loss;
  g[jp] = -pw[jp] * b.q * gscale;
  if (pos != nullptr) pos[jp] += static_cast<double>(pw[jp] * b.q);
  return s + negatives(x + jp + 1, nw + jp + 1, k - jp - 1, gscale, g + jp + 1, neg ? neg + jp + 1 : nullptr);
}

template <typename scalar_t>
double bce_kernel(const scalar_t* x, const int64_t* lab, scalar_t* grad, int64_t n, int64_t k, const double* wd,
                  bool background_column, int64_t ignore_index, double inv_norm, double* pos_out, double* neg_out) {
  using acc = ltk::acc_t<scalar_t>;
  constexpr bool kWiden = !std::is_same_v<scalar_t, acc>;
  const int64_t c = k - (background_column ? 1 : 0);
  std::vector<acc> w(wd, wd + 2 * k);
  const acc* pw = w.data();
  const acc* nw = pw + k;
  const bool stats = pos_out != nullptr;
  const acc gscale = static_cast<acc>(inv_norm);
  // Fixed chunking (one chunk per thread at most): the statistics are reproducible for a given thread count.
  const int64_t nchunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), ltk::ceil_div(n, 64)));
  std::vector<double> part(stats ? static_cast<size_t>(nchunks) * 2 * k : 0, 0.0);
  std::vector<double> row_loss(n, 0.0);
  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    const ltk::cpu::FlushDenormalsIf<std::is_same_v<acc, float>> flush;
    std::vector<acc> xs(kWiden ? k : 0), gs(kWiden ? k : 0);
    for (int64_t ch = c0; ch < c1; ++ch) {
      double* pos = stats ? part.data() + ch * 2 * k : nullptr;
      double* neg = stats ? pos + k : nullptr;
      for (int64_t i = n * ch / nchunks; i < n * (ch + 1) / nchunks; ++i) {
        const int64_t y = lab[i];
        scalar_t* gi = grad + i * k;
        if (y == ignore_index) {
          std::fill(gi, gi + k, scalar_t(0));
          continue;
        }
        ltk::check_label(y, c, ignore_index);
        const int64_t jp = y > 0 ? y - 1 : (background_column ? k - 1 : -1);
        const scalar_t* xi = x + i * k;
        if constexpr (kWiden) {
          for (int64_t j = 0; j < k; ++j) xs[j] = static_cast<acc>(xi[j]);
          row_loss[i] = bce_row<acc>(xs.data(), gs.data(), k, jp, pw, nw, gscale, pos, neg);
          for (int64_t j = 0; j < k; ++j) gi[j] = static_cast<scalar_t>(gs[j]);
        } else {
          row_loss[i] = bce_row<acc>(xi, gi, k, jp, pw, nw, gscale, pos, neg);
        }
      }
    }
  });
  if (stats) {
    for (int64_t j = 0; j < k; ++j) {
      double p = 0, q = 0;
      for (int64_t ch = 0; ch < nchunks; ++ch) {
        p += part[ch * 2 * k + j];
        q += part[ch * 2 * k + k + j];
      }
      pos_out[j] = p;
      neg_out[j] = q;
    }
  }
  double total = 0.0;
  for (double v : row_loss) total += v;
  return total * inv_norm;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> weighted_bce_cpu(
    const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& weights, const at::Tensor& normalizer,
    bool background_column, int64_t ignore_index, bool statistics) {
  const int64_t n = logits.size(0), k = logits.size(1);
  const auto acc_type = ltk::acc_type(logits.scalar_type());
  auto x = logits.contiguous();
  auto lab = labels.to(at::kLong).contiguous();
  auto w = weights.to(at::kDouble).contiguous();
  const double norm = normalizer.to(at::kDouble).item<double>();
  static ltk::cpu::OutputSlot grad_slot;  // the gradient of the previous step, once autograd has dropped it
  auto grad = grad_slot.take(x.sizes(), x.scalar_type());
  auto steps = at::zeros({2, statistics ? k : 0}, logits.options().dtype(at::kDouble));
  double total = 0.0;
  LTK_DISPATCH_FLOATING(x.scalar_type(), "weighted_bce_cpu", [&] {
    total = bce_kernel<scalar_t>(x.const_data_ptr<scalar_t>(), lab.const_data_ptr<int64_t>(), grad.data_ptr<scalar_t>(),
                                 n, k, w.const_data_ptr<double>(), background_column, ignore_index, 1.0 / norm,
                                 statistics ? steps.data_ptr<double>() : nullptr,
                                 statistics ? steps.data_ptr<double>() + k : nullptr);
  });
  // two tensors of their own (an op's outputs must not alias each other)
  return {at::scalar_tensor(total, logits.options().dtype(acc_type)), grad, steps[0].to(acc_type, false, true),
          steps[1].to(acc_type, false, true)};
}

}  // namespace

TORCH_LIBRARY_IMPL(ltkernels, CPU, m) { ltk::weighted_bce::register_kernels<&weighted_bce_cpu, at::kCPU>(m); }
