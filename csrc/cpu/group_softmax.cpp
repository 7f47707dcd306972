// Balanced Group Softmax: CPU kernels.
//
// group_softmax_loss: one pass per row. For every group (a contiguous column range) the row's max, the exponentials
// (kept in the gradient row, so exp runs once per element), their sum, the loss term weight * (lse - x[target]) and
// the gradient weight * (softmax - onehot); a (row, group) with weight 0 gets a zero gradient and no exp at all.
// group_softmax_scores: the same per-group softmax into a scratch row, then the [C + 1] output row gathered from it.
// One row template serves every dtype: float32/16/bf16 rows run in float (half/bf16 rows widened into a per-thread
// row), with the vectorisable ltk::exp_nonpos (fast_math.h, <= 1 ulp), compiled for AVX2+FMA as well as the baseline
// ISA and picked at load time (GCC function multi-versioning); float64 rows run in double with std::exp.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "common.h"
#include "cpu/flush_denormals.h"
#include "cpu/output_slot.h"
#include "cpu/prefetch.h"
#include "fast_math.h"
#include "group_softmax.h"

namespace {

LTK_ALWAYS_INLINE float exp_acc(float x) { return ltk::exp_nonpos(x); }  // x <= 0 here: x - max of its group
LTK_ALWAYS_INLINE double exp_acc(double x) { return std::exp(x); }

// The softmax pieces of one group's logits x[0..n): returns their max m, writes e[j] = exp(x[j] - m) and their sum
// (float: 8 or 4 lanes, summed lane-wise; double: std::exp keeps the loop scalar, the sum sequential).
template <typename T>
LTK_ALWAYS_INLINE T group_exp(const T* __restrict x, T* __restrict e, int64_t n, T& sum) {
  T m = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n; ++j) m = x[j] > m ? x[j] : m;
  T s = T(0);
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < n; ++j) {
    const T v = exp_acc(x[j] - m);
    e[j] = v;
    s += v;
  }
  sum = s;
  return m;
}

// One row of the loss: x [K] logits, g [K] gradient out; returns the row's loss.
// tgt: the row's targets in every group; sel points at the row's flag of group 0 (group k's is sel[k * N]).
template <typename T>
LTK_ALWAYS_INLINE T loss_row_t(const T* __restrict x, T* __restrict g, int64_t G1, const int64_t* __restrict off,
                               const int64_t* __restrict tgt, const bool* __restrict sel, int64_t N,
                               const T* __restrict scale) {
  T loss = T(0);
  for (int64_t k = 0; k < G1; ++k) {
    const int64_t s = off[k], n = off[k + 1] - off[k];
    const T wk = sel[k * N] ? scale[k] : T(0);
    T* gg = g + s;
    if (wk == T(0)) {
      for (int64_t j = 0; j < n; ++j) gg[j] = T(0);
      continue;
    }
    T sum;
    const T m = group_exp(x + s, gg, n, sum);
    const T f = wk / sum;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) gg[j] *= f;
    const int64_t t = tgt[k];
    loss += wk * (m + std::log(sum) - x[s + t]);
    gg[t] -= wk;
  }
  return loss;
}

// One row of the scores: x [K] logits, p [K] scratch (in-group probabilities), out [C + 1].
template <typename T>
LTK_ALWAYS_INLINE void scores_row_t(const T* __restrict x, T* __restrict p, T* __restrict out, int64_t G1,
                                    const int64_t* __restrict off, int64_t C1, const int64_t* __restrict score_column) {
  for (int64_t k = 0; k < G1; ++k) {
    const int64_t s = off[k], n = off[k + 1] - off[k];
    T sum;
    group_exp(x + s, p + s, n, sum);
    if constexpr (std::is_same_v<T, double>) {  // float64, the reference dtype: a correctly rounded division
      for (int64_t j = 0; j < n; ++j) p[s + j] /= sum;
    } else {
      const T inv = T(1) / sum;
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) p[s + j] *= inv;
    }
  }
  const T fg = p[1];
  out[0] = p[0];
  for (int64_t c = 1; c < C1; ++c) out[c] = p[score_column[c]] * fg;
}

// float rows (float32, and float16/bfloat16 widened): compiled for AVX2+FMA and the baseline ISA.
LTK_CPU_CLONES float loss_row(const float* __restrict x, float* __restrict g, int64_t G1, const int64_t* __restrict off,
                              const int64_t* __restrict tgt, const bool* __restrict sel, int64_t N,
                              const float* __restrict scale) {
  return loss_row_t(x, g, G1, off, tgt, sel, N, scale);
}
LTK_CPU_CLONES void scores_row(const float* __restrict x, float* __restrict p, float* __restrict out, int64_t G1,
                               const int64_t* __restrict off, int64_t C1, const int64_t* __restrict score_column) {
  scores_row_t(x, p, out, G1, off, C1, score_column);
}
// float64 rows (the reference dtype): std::exp, scalar.
double loss_row(const double* x, double* g, int64_t G1, const int64_t* off, const int64_t* tgt, const bool* sel,
                int64_t N, const double* scale) {
  return loss_row_t(x, g, G1, off, tgt, sel, N, scale);
}
void scores_row(const double* x, double* p, double* out, int64_t G1, const int64_t* off, int64_t C1,
                const int64_t* score_column) {
  scores_row_t(x, p, out, G1, off, C1, score_column);
}

// fn(i, x_i, out_i, scratch) for the rows i of x [N, K] in parallel, on rows of the accumulation type acc: float32
// and float64 rows in place, float16/bfloat16 rows widened into a per-thread float row, with the [W] output row
// narrowed back into out [N, W]. scratch: a per-thread [K] row of acc. Each row prefetches the next one's logits.
template <typename scalar_t, typename F>
void for_each_row(const scalar_t* x, scalar_t* out, int64_t N, int64_t K, int64_t W, const F& fn) {
  using acc = ltk::acc_t<scalar_t>;
  constexpr bool kWiden = !std::is_same_v<scalar_t, acc>;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(K, 1));
  at::parallel_for(0, N, grain, [&](int64_t b, int64_t e) {
    const ltk::cpu::FlushDenormalsIf<std::is_same_v<acc, float>> flush;
    std::vector<acc> scratch(K), xs(kWiden ? K : 0), os(kWiden ? W : 0);
    for (int64_t i = b; i < e; ++i) {
      const scalar_t* xi = x + i * K;
      scalar_t* oi = out + i * W;
      if (i + 1 < e) ltk::cpu::prefetch_row(xi + K, K);
      if constexpr (kWiden) {
        for (int64_t j = 0; j < K; ++j) xs[j] = static_cast<acc>(xi[j]);
        fn(i, xs.data(), os.data(), scratch.data());
        for (int64_t j = 0; j < W; ++j) oi[j] = static_cast<scalar_t>(os[j]);
      } else {
        fn(i, xi, oi, scratch.data());
      }
    }
  });
}

// The values of group_offsets (its shape is checked first).
void check_offsets(const at::Tensor& group_offsets, int64_t K) {
  const int64_t* off = group_offsets.data_ptr<int64_t>();
  const int64_t G1 = group_offsets.size(0) - 1;
  TORCH_CHECK(off[0] == 0 && off[G1] == K, "group_offsets must run from 0 to the number of logits (", K, "), got ",
              off[0], "..", off[G1]);
  for (int64_t k = 0; k < G1; ++k) TORCH_CHECK(off[k + 1] > off[k], "group_offsets must be strictly increasing");
}

// The loss's gradient: the previous step's, once autograd has dropped it.
at::Tensor step_grad(const at::Tensor& logits) {
  static ltk::cpu::OutputSlot slot;
  return slot.take(logits.sizes(), logits.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> group_softmax_loss_cpu(const at::Tensor& logits_, const at::Tensor& labels_,
                                                          const at::Tensor& selected_, const at::Tensor& scale_,
                                                          const at::Tensor& label_targets_,
                                                          const at::Tensor& group_offsets_) {
  LTK_CHECK_DEVICES(at::kCPU, logits_, labels_, selected_, scale_, label_targets_, group_offsets_);
  const ltk::group_softmax::LossArgs a(logits_, labels_, selected_, scale_, label_targets_, group_offsets_, &step_grad);
  check_offsets(a.group_offsets, a.K);
  const int64_t N = a.N, K = a.K, G1 = a.G1;
  if (N == 0) return a.loss_result();

  const int64_t* off = a.group_offsets.data_ptr<int64_t>();
  const int64_t C1 = a.label_targets.size(0);
  const int64_t* tt = a.label_targets.data_ptr<int64_t>();
  for (int64_t c = 0; c < C1; ++c)
    for (int64_t k = 0; k < G1; ++k)
      TORCH_CHECK(tt[c * G1 + k] >= 0 && tt[c * G1 + k] < off[k + 1] - off[k], "label_targets[", c, ", ", k,
                  "] is outside group ", k);
  const int64_t* lab = a.labels.data_ptr<int64_t>();
  for (int64_t i = 0; i < N; ++i)
    TORCH_CHECK(lab[i] >= 0 && lab[i] < C1, "labels[", i, "] = ", lab[i], " is not in 0..", C1 - 1);
  const bool* sel = a.selected.data_ptr<bool>();
  LTK_DISPATCH_FLOATING(a.logits.scalar_type(), "group_softmax_loss_cpu", [&] {
    using acc = ltk::acc_t<scalar_t>;
    const acc* sc = a.scale.data_ptr<acc>();
    acc* rl = a.row_loss.data_ptr<acc>();
    for_each_row(a.logits.data_ptr<scalar_t>(), a.grad.data_ptr<scalar_t>(), N, K, K,
                 [&](int64_t i, const acc* xi, acc* gi, acc*) {
                   rl[i] = loss_row(xi, gi, G1, off, tt + lab[i] * G1, sel + i, N, sc);
                 });
  });
  return a.loss_result();
}

at::Tensor group_softmax_scores_cpu(const at::Tensor& logits_, const at::Tensor& group_offsets_,
                                    const at::Tensor& label_group_, const at::Tensor& score_column_) {
  LTK_CHECK_DEVICES(at::kCPU, logits_, group_offsets_, label_group_, score_column_);
  ltk::group_softmax::check_scores_args(logits_, group_offsets_, label_group_, score_column_);
  const int64_t N = logits_.size(0), K = logits_.size(1);
  const auto group_offsets = group_offsets_.contiguous();
  check_offsets(group_offsets, K);
  const int64_t G1 = group_offsets.size(0) - 1;
  TORCH_CHECK(G1 >= 1 && group_offsets.data_ptr<int64_t>()[1] == 2, "group 0 must have 2 columns (bg, fg)");
  const auto score_column = score_column_.contiguous();
  const int64_t C1 = score_column.size(0);
  const int64_t* sc = score_column.data_ptr<int64_t>();
  for (int64_t c = 0; c < C1; ++c)
    TORCH_CHECK(sc[c] >= 0 && sc[c] < K, "score_column[", c, "] = ", sc[c], " is not a column of the logits");
  const auto logits = logits_.contiguous();
  // The caller keeps the scores until the next call has returned: the output before last is reused.
  static ltk::cpu::OutputSlot slot(2);
  auto out = slot.take({N, C1}, logits.scalar_type());
  if (N == 0) return out;
  const int64_t* off = group_offsets.data_ptr<int64_t>();
  LTK_DISPATCH_FLOATING(logits.scalar_type(), "group_softmax_scores_cpu", [&] {
    for_each_row(logits.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), N, K, C1,
                 [&](int64_t, const auto* xi, auto* oi, auto* p) { scores_row(xi, p, oi, G1, off, C1, sc); });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(ltkernels, CPU, m) {
  m.impl("group_softmax_loss", &group_softmax_loss_cpu);
  m.impl("group_softmax_scores", &group_softmax_scores_cpu);
}
