// CPU kernels of the Equalized Focal Loss (docs/spec.md §2) and of the Equalized Quality Focal Loss (the same
// kernels with a soft target on the positive column: `quality` non-null). Forward: one pass over the logits, partial
// sums per fixed block of rows, summed in a fixed order (deterministic). Backward: one pass that writes dL/dlogits and
// accumulates sum |dL/dx| per class into per-chunk [C] partials (double), merged in chunk order. The training step
// (`_equalized_focal_loss_fused`) is that backward pass with grad_loss = 1 that also sums the loss, so a step
// evaluates the maths once. No [N, C] temporary besides the gradient, no one-hot matrix.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "common.h"
#include "cpu/flush_denormals.h"
#include "cpu/output_slot.h"
#include "equalized_focal_loss.h"
#include "equalized_focal_loss_math.h"
#include "fast_math.h"

namespace {

using ltk::equalized_focal_loss::grad_z;
using ltk::equalized_focal_loss::loss_term;
using ltk::equalized_focal_loss::quality_grad_x;
using ltk::equalized_focal_loss::quality_loss_term;

// ---- float32 fast path ----------------------------------------------------------------------------------------
// Branch-free float maths that the compiler vectorises (the loops below are compiled twice, for AVX2+FMA and for
// the baseline ISA, and picked at load time). Accuracy: a few ulp, checked against float64 in the tests. float64
// logits take the exact <math.h> path above.

// FP exceptions are never inspected: without -ftrapping-math GCC may if-convert and vectorise these loops.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC optimize("no-trapping-math")
#endif

struct LossGrad {
  float loss, grad;  // the loss term and dL/dz
};

// The loss term and its gradient together: they share the exp, the log1p and the power (a caller that needs the
// loss only lets the compiler drop the rest).
LTK_ALWAYS_INLINE LossGrad fast_loss_grad_z(float z, float gamma, float aw) {
  const float e = ltk::exp_nonpos(z < 0.0f ? z : -z);
  const float l1 = ltk::log1p_unit(e);
  const float nlog_pt = (z < 0.0f ? -z : 0.0f) + l1;
  const float nlog_qt = (z > 0.0f ? z : 0.0f) + l1;
  const float r = 1.0f / (1.0f + e);
  const float er = e * r;
  const bool nonneg = z >= 0.0f;
  const float pt = nonneg ? r : er;
  const float qt = nonneg ? er : r;
  const float wq = aw * ltk::exp_nonpos(-gamma * nlog_qt);
  return {wq * nlog_pt, -wq * (gamma * pt * nlog_pt + qt)};
}

// The rows are evaluated whole, every column as a negative, and the caller then puts the positive column's values in
// place: one vector loop per row with a single remainder, where splitting the row at its positive column would run
// two loops with two scalar remainders (a tenth of the row at C = 1203).

// The loss terms of x[0..m) as negatives (z = -x) into loss.
LTK_CPU_CLONES void neg_loss_f32(const float* __restrict__ x, const float* __restrict__ gamma,
                                 const float* __restrict__ aw, int64_t m, float* __restrict__ loss) {
#pragma omp simd
  for (int64_t j = 0; j < m; ++j) loss[j] = fast_loss_grad_z(-x[j], gamma[j], aw[j]).loss;
}

// dL/dx of x[0..m) as negatives (dz/dx = -1), times gscale, into g; |g| added to sums (float partials of a few rows,
// which the caller adds into double ones: 8 lanes, no conversion per element); the loss terms into loss.
LTK_CPU_CLONES void neg_grad_f32(const float* __restrict__ x, const float* __restrict__ gamma,
                                 const float* __restrict__ aw, int64_t m, float gscale, float* __restrict__ g,
                                 float* __restrict__ sums, float* __restrict__ loss) {
#pragma omp simd
  for (int64_t j = 0; j < m; ++j) {
    const LossGrad t = fast_loss_grad_z(-x[j], gamma[j], aw[j]);
    const float v = -t.grad * gscale;
    g[j] = v;
    sums[j] += __builtin_fabsf(v);
    loss[j] = t.loss;
  }
}

// The row's loss: its terms summed in a fixed order (lanes, then across them).
LTK_CPU_CLONES float sum_f32(const float* __restrict__ v, int64_t m) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < m; ++j) s += v[j];
  return s;
}
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif

// gamma_j and alpha_t * w_j for a positive and a negative target, per class.
template <typename acc>
struct ClassWeights {
  std::vector<acc> gamma, aw_pos, aw_neg;
  ClassWeights(const at::Tensor& pos_neg, double gamma_b, double scale, double alpha) {
    const int64_t c = pos_neg.size(0);
    auto g = pos_neg.to(at::kDouble).contiguous();
    const double* gp = g.data_ptr<double>();
    const double a_pos = alpha >= 0 ? alpha : 1.0, a_neg = alpha >= 0 ? 1.0 - alpha : 1.0;
    gamma.resize(c);
    aw_pos.resize(c);
    aw_neg.resize(c);
    for (int64_t j = 0; j < c; ++j) {
      const double gam = gamma_b + scale * (1.0 - gp[j]);
      const double w = scale == 0 ? 1.0 : gam / gamma_b;
      gamma[j] = static_cast<acc>(gam);
      aw_pos[j] = static_cast<acc>(a_pos * w);
      aw_neg[j] = static_cast<acc>(a_neg * w);
    }
  }
};

// The positive column's soft target of row i (EQFL), checked on the rows that use it.
template <typename acc>
acc row_quality(const acc* quality, int64_t i) {
  const acc q = quality[i];
  TORCH_CHECK(q >= acc(0) && q <= acc(1), "quality must lie in [0, 1] on positive rows, found ", q, " at row ", i);
  return q;
}

// The positive column's loss term and dL/dx (EFL's, or EQFL's with the row's soft target: quality non-null).
template <typename acc>
acc positive_loss(acc xp, const acc* quality, int64_t i, acc gamma, acc aw) {
  return quality ? quality_loss_term<acc>(xp, row_quality(quality, i), gamma, aw) : loss_term<acc>(xp, gamma, aw);
}

template <typename acc>
acc positive_grad(acc xp, const acc* quality, int64_t i, acc gamma, acc aw) {
  return quality ? quality_grad_x<acc>(xp, row_quality(quality, i), gamma, aw) : grad_z<acc>(xp, gamma, aw);
}

// quality: nullptr for EFL, else [N] soft targets of the positive columns (EQFL).
template <typename scalar_t, typename acc>
double forward_kernel(const scalar_t* x, const int64_t* lab, const acc* quality, int64_t n, int64_t c,
                      const ClassWeights<acc>& cw, int64_t ignore_index) {
  constexpr int64_t kRows = 32;  // fixed blocks of rows: the summation order does not depend on the thread count
  const int64_t nblocks = ltk::ceil_div(n, kRows);
  std::vector<double> partial(nblocks, 0.0);
  const acc* gamma = cw.gamma.data();
  const acc* awn = cw.aw_neg.data();
  at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    constexpr bool kFloat = std::is_same_v<acc, float>;
    const ltk::cpu::FlushDenormalsIf<kFloat> flush;
    std::vector<float> xbuf(kFloat && !std::is_same_v<scalar_t, float> ? c : 0), lbuf(kFloat ? c : 0);
    for (int64_t b = b0; b < b1; ++b) {
      double sum = 0.0;
      for (int64_t i = b * kRows; i < std::min(n, (b + 1) * kRows); ++i) {
        const int64_t y = lab[i];
        if (y == ignore_index) continue;
        ltk::check_label(y, c, ignore_index);
        const scalar_t* row = x + i * c;
        const int64_t jp = y - 1;  // the positive column, -1 for background
        acc s = 0;
        if constexpr (kFloat) {
          const float* xr;
          if constexpr (std::is_same_v<scalar_t, float>) {
            xr = row;
          } else {  // float16/bfloat16: widen the row first
            for (int64_t j = 0; j < c; ++j) xbuf[j] = static_cast<float>(row[j]);
            xr = xbuf.data();
          }
          neg_loss_f32(xr, gamma, awn, c, lbuf.data());
          if (jp >= 0) lbuf[jp] = positive_loss<acc>(xr[jp], quality, i, gamma[jp], cw.aw_pos[jp]);
          s = sum_f32(lbuf.data(), c);
        } else {
          for (int64_t j = 0; j < c; ++j)
            s += j == jp ? positive_loss<acc>(static_cast<acc>(row[j]), quality, i, gamma[j], cw.aw_pos[j])
                         : loss_term<acc>(-static_cast<acc>(row[j]), gamma[j], awn[j]);
        }
        sum += static_cast<double>(s);
      }
      partial[b] = sum;
    }
  });
  double total = 0.0;
  for (double p : partial) total += p;
  return total;
}

// Adds the float partials f[0..c) into d and clears them.
LTK_CPU_CLONES void flush_partials(float* __restrict__ f, double* __restrict__ d, int64_t c) {
  for (int64_t j = 0; j < c; ++j) {
    d[j] += static_cast<double>(f[j]);
    f[j] = 0.0f;
  }
}

// row_loss: nullptr, or [n] that receives each row's loss (unnormalised; the one-pass training step).
template <typename scalar_t, typename acc>
void backward_kernel(const scalar_t* x, const int64_t* lab, const acc* quality, scalar_t* gx, int64_t n, int64_t c,
                     const ClassWeights<acc>& cw, int64_t ignore_index, acc gscale, acc* pos_out, acc* neg_out,
                     double* row_loss) {
  // Fixed chunking (one chunk per thread at most): each chunk sums its rows in order into its own [2, C] partials,
  // merged in chunk order, so the statistics are reproducible for a given thread count.
  const int64_t nchunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), ltk::ceil_div(n, 64)));
  std::vector<double> part(static_cast<size_t>(nchunks) * 2 * c, 0.0);
  const acc* gamma = cw.gamma.data();
  const acc* awn = cw.aw_neg.data();
  constexpr int64_t kFlushRows = 32;  // rows whose |g| are summed in float before they join the double partials
  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    constexpr bool kFloat = std::is_same_v<acc, float>, kNarrow = kFloat && !std::is_same_v<scalar_t, float>;
    const ltk::cpu::FlushDenormalsIf<kFloat> flush;
    std::vector<float> xbuf(kNarrow ? c : 0), gbuf(kNarrow ? c : 0), lbuf(kFloat ? c : 0);
    std::vector<float> negf(kFloat ? c : 0, 0.0f);
    for (int64_t k = c0; k < c1; ++k) {
      double* pos = part.data() + k * 2 * c;
      double* neg = pos + c;
      const int64_t i0 = n * k / nchunks, i1 = n * (k + 1) / nchunks;
      for (int64_t i = i0; i < i1; ++i) {
        if (kFloat && (i - i0) % kFlushRows == 0 && i > i0) flush_partials(negf.data(), neg, c);
        const int64_t y = lab[i];
        scalar_t* grow = gx + i * c;
        if (y == ignore_index) {
          std::fill(grow, grow + c, scalar_t(0));
          if (row_loss) row_loss[i] = 0.0;
          continue;
        }
        ltk::check_label(y, c, ignore_index);
        const scalar_t* row = x + i * c;
        const int64_t jp = y - 1;
        if constexpr (kFloat) {
          const float* xr;
          float* gr;
          if constexpr (kNarrow) {  // float16/bfloat16 through float row buffers
            for (int64_t j = 0; j < c; ++j) xbuf[j] = static_cast<float>(row[j]);
            xr = xbuf.data();
            gr = gbuf.data();
          } else {
            xr = row;
            gr = grow;
          }
          const float kept = jp >= 0 ? negf[jp] : 0.0f;
          neg_grad_f32(xr, gamma, awn, c, gscale, gr, negf.data(), lbuf.data());
          if (jp >= 0) {  // the positive column replaces what the row's loop wrote there (dz/dx = +1)
            negf[jp] = kept;
            const float g = positive_grad<acc>(xr[jp], quality, i, gamma[jp], cw.aw_pos[jp]) * gscale;
            gr[jp] = g;
            pos[jp] += static_cast<double>(std::abs(g));
            if (row_loss) lbuf[jp] = positive_loss<acc>(xr[jp], quality, i, gamma[jp], cw.aw_pos[jp]);
          }
          if constexpr (kNarrow) {
            for (int64_t j = 0; j < c; ++j) grow[j] = static_cast<scalar_t>(gbuf[j]);
          }
          if (row_loss) row_loss[i] = static_cast<double>(sum_f32(lbuf.data(), c));  // summed as forward_kernel's
        } else {
          acc s = 0;
          for (int64_t j = 0; j < c; ++j) {
            const acc xj = static_cast<acc>(row[j]);
            if (j == jp) {  // dz/dx = +1
              const acc g = positive_grad<acc>(xj, quality, i, gamma[j], cw.aw_pos[j]) * gscale;
              grow[j] = static_cast<scalar_t>(g);
              pos[j] += static_cast<double>(std::abs(g));
              if (row_loss) s += positive_loss<acc>(xj, quality, i, gamma[j], cw.aw_pos[j]);
            } else {  // dz/dx = -1
              const acc g = -grad_z<acc>(-xj, gamma[j], awn[j]) * gscale;
              grow[j] = static_cast<scalar_t>(g);
              neg[j] += static_cast<double>(std::abs(g));
              if (row_loss) s += loss_term<acc>(-xj, gamma[j], awn[j]);
            }
          }
          if (row_loss) row_loss[i] = static_cast<double>(s);
        }
      }
      if (kFloat) flush_partials(negf.data(), neg, c);
    }
  });
  at::parallel_for(0, c, 256, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      double p = 0, q = 0;
      for (int64_t k = 0; k < nchunks; ++k) {
        p += part[k * 2 * c + j];
        q += part[k * 2 * c + c + j];
      }
      pos_out[j] = static_cast<acc>(p);
      neg_out[j] = static_cast<acc>(q);
    }
  });
}

// quality: undefined for EFL.
at::Tensor forward_cpu(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& quality,
                       const at::Tensor& pos_neg, const at::Tensor& normalizer, double gamma_b, double scale,
                       double alpha, int64_t ignore_index) {
  ltk::equalized_focal_loss::check_inputs(logits, labels, quality, pos_neg, normalizer, gamma_b, scale, at::kCPU);
  const int64_t n = logits.size(0), c = logits.size(1);
  auto x = logits.contiguous();
  auto lab = labels.to(at::kLong).contiguous();
  const double norm = normalizer.to(at::kCPU).to(at::kDouble).item<double>();
  double total = 0.0;
  LTK_DISPATCH_FLOATING(x.scalar_type(), "equalized_focal_loss_cpu", [&] {
    using acc = ltk::acc_t<scalar_t>;
    if (n > 0 && c > 0) {
      ClassWeights<acc> cw(pos_neg, gamma_b, scale, alpha);
      at::Tensor q = quality.defined() ? quality.to(ltk::acc_type(logits.scalar_type())).contiguous() : at::Tensor();
      total = forward_kernel<scalar_t, acc>(x.const_data_ptr<scalar_t>(), lab.const_data_ptr<int64_t>(),
                                            q.defined() ? q.const_data_ptr<acc>() : nullptr, n, c, cw, ignore_index);
    }
  });
  return at::scalar_tensor(total / norm, logits.options().dtype(ltk::acc_type(logits.scalar_type())));
}

// The backward (grad_loss given) or the one-pass training step (grad_loss = 1, and the loss: `loss` non-null).
std::tuple<at::Tensor, at::Tensor, at::Tensor> gradient_cpu(double g0, const at::Tensor& logits,
                                                            const at::Tensor& labels, const at::Tensor& quality,
                                                            const at::Tensor& pos_neg, double norm, double gamma_b,
                                                            double scale, double alpha, int64_t ignore_index,
                                                            double* loss) {
  const int64_t n = logits.size(0), c = logits.size(1);
  auto x = logits.contiguous();
  auto lab = labels.to(at::kLong).contiguous();
  static ltk::cpu::OutputSlot grad_slot;  // the gradient of the previous step, once autograd has dropped it
  auto grad = grad_slot.take(x.sizes(), x.scalar_type());
  auto pos = at::zeros({c}, logits.options().dtype(ltk::acc_type(logits.scalar_type())));
  auto neg = at::zeros({c}, logits.options().dtype(ltk::acc_type(logits.scalar_type())));
  std::vector<double> row_loss(loss ? n : 0);
  LTK_DISPATCH_FLOATING(x.scalar_type(), "_equalized_focal_loss_backward_cpu", [&] {
    using acc = ltk::acc_t<scalar_t>;
    if (n > 0 && c > 0) {
      ClassWeights<acc> cw(pos_neg, gamma_b, scale, alpha);
      at::Tensor q = quality.defined() ? quality.to(ltk::acc_type(logits.scalar_type())).contiguous() : at::Tensor();
      backward_kernel<scalar_t, acc>(x.const_data_ptr<scalar_t>(), lab.const_data_ptr<int64_t>(),
                                     q.defined() ? q.const_data_ptr<acc>() : nullptr, grad.data_ptr<scalar_t>(), n, c,
                                     cw, ignore_index, static_cast<acc>(g0 / norm), pos.data_ptr<acc>(),
                                     neg.data_ptr<acc>(), loss ? row_loss.data() : nullptr);
    }
  });
  if (loss) {  // summed in forward_kernel's order: rows in blocks of 32, blocks in order
    constexpr int64_t kRows = 32;
    double total = 0.0;
    for (int64_t b = 0; b < n; b += kRows) {
      double sum = 0.0;
      for (int64_t i = b; i < std::min(n, b + kRows); ++i) sum += row_loss[i];
      total += sum;
    }
    *loss = total;
  }
  return {grad, pos, neg};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cpu(const at::Tensor& grad_loss, const at::Tensor& logits,
                                                            const at::Tensor& labels, const at::Tensor& quality,
                                                            const at::Tensor& pos_neg, const at::Tensor& normalizer,
                                                            double gamma_b, double scale, double alpha,
                                                            int64_t ignore_index) {
  ltk::equalized_focal_loss::check_inputs(logits, labels, quality, pos_neg, normalizer, gamma_b, scale, at::kCPU);
  TORCH_CHECK(grad_loss.numel() == 1, "grad_loss must hold one value, got shape ", grad_loss.sizes());
  const double norm = normalizer.to(at::kCPU).to(at::kDouble).item<double>();
  const double g0 = grad_loss.to(at::kCPU).to(at::kDouble).item<double>();
  return gradient_cpu(g0, logits, labels, quality, pos_neg, norm, gamma_b, scale, alpha, ignore_index, nullptr);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_cpu(const at::Tensor& logits, const at::Tensor& labels,
                                                                     const at::Tensor& quality,
                                                                     const at::Tensor& pos_neg,
                                                                     const at::Tensor& normalizer, double gamma_b,
                                                                     double scale, double alpha, int64_t ignore_index) {
  ltk::equalized_focal_loss::check_inputs(logits, labels, quality, pos_neg, normalizer, gamma_b, scale, at::kCPU);
  const double norm = normalizer.to(at::kCPU).to(at::kDouble).item<double>();
  double total = 0.0;
  auto [grad, pos, neg] =
      gradient_cpu(1.0, logits, labels, quality, pos_neg, norm, gamma_b, scale, alpha, ignore_index, &total);
  auto loss = at::scalar_tensor(total / norm, logits.options().dtype(ltk::acc_type(logits.scalar_type())));
  return {loss, grad, pos, neg};
}

}  // namespace

TORCH_LIBRARY_IMPL(ltkernels, CPU, m) {
  ltk::equalized_focal_loss::register_kernels<&forward_cpu, &backward_cpu, &fused_cpu>(m);
}
