// Seesaw loss (docs/spec.md §9): CPU kernel. One pass per row computes its loss and its gradient row: the class
// log-sum-exp, the seesaw logits z (kept in the gradient row), their softmax, and the objectness pair. float32/16/bf16
// rows run in float (half/bf16 rows widened into a per-thread row) with the vectorisable ltk::exp_nonpos, compiled for
// AVX2+FMA and the baseline ISA; float64 rows in double with std::exp. Row losses are summed per fixed block of rows
// in a fixed order: the loss does not depend on the thread count.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "common.h"
#include "cpu/flush_denormals.h"
#include "cpu/output_slot.h"
#include "fast_math.h"
#include "seesaw_loss.h"
#include "seesaw_loss_math.h"

namespace {

using ltk::seesaw_loss::objectness;
using ltk::seesaw_loss::seesaw_logit;

LTK_ALWAYS_INLINE float exp_acc(float x) { return ltk::exp_nonpos(x); }  // x <= 0 here: x - a row max
LTK_ALWAYS_INLINE double exp_acc(double x) { return std::exp(x); }

template <typename T>
LTK_ALWAYS_INLINE T row_max(const T* __restrict x, int64_t n) {
  T m = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n; ++j) m = x[j] > m ? x[j] : m;
  return m;
}

// Sum of exp(v[j] - m); when `store`, v[j] becomes exp(v[j] - m).
template <typename T, bool store>
LTK_ALWAYS_INLINE T sum_exp(T* __restrict v, int64_t n, T m) {
  T s = T(0);
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < n; ++j) {
    const T e = exp_acc(v[j] - m);
    if constexpr (store) v[j] = e;
    s += e;
  }
  return s;
}

// The class part of a positive row of class column l: writes g[0..c) = gscale * (softmax(z) - onehot_l) and returns
// -log softmax(z)_l. x is only read (g is the scratch row).
template <typename T>
LTK_ALWAYS_INLINE T class_row_t(const T* __restrict x, T* __restrict g, int64_t c, int64_t l, const T* __restrict logn,
                                T p, T q, T log_eps, T gscale) {
  const T m = row_max(x, c);
  T s = T(0);
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < c; ++j) s += exp_acc(x[j] - m);
  const T lse = m + std::log(s);
  const T xl = x[l];
  const T ls = std::max(xl - lse, log_eps);
  const T logn_l = logn[l];
  T mz = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : mz)
  for (int64_t j = 0; j < c; ++j) {
    const T z = seesaw_logit(x[j], logn[j], logn_l, lse, ls, p, q);
    g[j] = z;
    mz = z > mz ? z : mz;
  }
  const T sz = sum_exp<T, true>(g, c, mz);
  const T f = gscale / sz;
#pragma omp simd
  for (int64_t j = 0; j < c; ++j) g[j] *= f;
  g[l] -= gscale;
  return mz + std::log(sz) - xl;
}

// FP exceptions are never inspected: without -ftrapping-math GCC may if-convert and vectorise the loops above.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC optimize("no-trapping-math")
#endif
LTK_CPU_CLONES float class_row(const float* __restrict x, float* __restrict g, int64_t c, int64_t l,
                               const float* __restrict logn, float p, float q, float log_eps, float gscale) {
  return class_row_t(x, g, c, l, logn, p, q, log_eps, gscale);
}
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif
double class_row(const double* x, double* g, int64_t c, int64_t l, const double* logn, double p, double q,
                 double log_eps, double gscale) {
  return class_row_t(x, g, c, l, logn, p, q, log_eps, gscale);
}

struct Params {
  double p, q, log_eps;
};

// Row i of x [N, C + 2] (already in acc) into its gradient row g; returns the row's loss (times 1, not gscale).
template <typename acc>
acc seesaw_row(const acc* x, acc* g, int64_t c, int64_t y, const acc* logn, const Params& pr, acc gscale) {
  acc loss = 0;
  if (y > 0) {
    loss = class_row(x, g, c, y - 1, logn, static_cast<acc>(pr.p), static_cast<acc>(pr.q), static_cast<acc>(pr.log_eps),
                     gscale);
  } else {
    std::fill(g, g + c, acc(0));
  }
  const auto o = objectness<acc>(x[c], x[c + 1], y == 0);
  g[c] = o.grad_a * gscale;
  g[c + 1] = -o.grad_a * gscale;
  return loss + o.loss;
}

template <typename scalar_t>
double seesaw_kernel(const scalar_t* x, const int64_t* lab, scalar_t* grad, int64_t n, int64_t k, const double* logn_d,
                     const Params& pr, int64_t ignore_index, double inv_norm) {
  using acc = ltk::acc_t<scalar_t>;
  constexpr bool kWiden = !std::is_same_v<scalar_t, acc>;
  const int64_t c = k - 2;
  std::vector<acc> logn(logn_d, logn_d + c);
  constexpr int64_t kRows = 32;  // fixed blocks of rows: the summation order does not depend on the thread count
  const int64_t nblocks = ltk::ceil_div(n, kRows);
  std::vector<double> partial(nblocks, 0.0);
  const acc gscale = static_cast<acc>(inv_norm);
  at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    const ltk::cpu::FlushDenormalsIf<std::is_same_v<acc, float>> flush;
    std::vector<acc> xs(kWiden ? k : 0), gs(kWiden ? k : 0);
    for (int64_t b = b0; b < b1; ++b) {
      double sum = 0.0;
      for (int64_t i = b * kRows; i < std::min(n, (b + 1) * kRows); ++i) {
        const int64_t y = lab[i];
        scalar_t* gi = grad + i * k;
        if (y == ignore_index) {
          std::fill(gi, gi + k, scalar_t(0));
          continue;
        }
        ltk::check_label(y, c, ignore_index);
        const scalar_t* xi = x + i * k;
        if constexpr (kWiden) {
          for (int64_t j = 0; j < k; ++j) xs[j] = static_cast<acc>(xi[j]);
          sum += static_cast<double>(seesaw_row<acc>(xs.data(), gs.data(), c, y, logn.data(), pr, gscale));
          for (int64_t j = 0; j < k; ++j) gi[j] = static_cast<scalar_t>(gs[j]);
        } else {
          sum += static_cast<double>(seesaw_row<acc>(xi, gi, c, y, logn.data(), pr, gscale));
        }
      }
      partial[b] = sum;
    }
  });
  double total = 0.0;
  for (double v : partial) total += v;
  return total * inv_norm;
}

std::tuple<at::Tensor, at::Tensor> seesaw_loss_cpu(const at::Tensor& logits, const at::Tensor& labels,
                                                   const at::Tensor& cum_samples, const at::Tensor& normalizer,
                                                   double p, double q, double eps, int64_t ignore_index) {
  ltk::seesaw_loss::check_inputs(logits, labels, cum_samples, normalizer, p, q, eps, at::kCPU);
  const int64_t n = logits.size(0), k = logits.size(1);
  auto x = logits.contiguous();
  auto lab = labels.to(at::kLong).contiguous();
  auto logn = ltk::seesaw_loss::log_counts(cum_samples, at::kDouble);
  const double norm = normalizer.to(at::kDouble).item<double>();
  static ltk::cpu::OutputSlot grad_slot;  // the gradient of the previous step, once autograd has dropped it
  auto grad = grad_slot.take(x.sizes(), x.scalar_type());
  double total = 0.0;
  LTK_DISPATCH_FLOATING(x.scalar_type(), "seesaw_loss_cpu", [&] {
    total = seesaw_kernel<scalar_t>(x.const_data_ptr<scalar_t>(), lab.const_data_ptr<int64_t>(),
                                    grad.data_ptr<scalar_t>(), n, k, logn.const_data_ptr<double>(),
                                    Params{p, q, std::log(eps)}, ignore_index, 1.0 / norm);
  });
  return {at::scalar_tensor(total, logits.options().dtype(ltk::acc_type(logits.scalar_type()))), grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(ltkernels, CPU, m) { m.impl("seesaw_loss", &seesaw_loss_cpu); }
