// Balanced Group Softmax: CPU kernels.
//
// group_softmax_loss: one pass per row. For every group (a contiguous column range) the row's max, the exponentials
// (kept in the gradient row, so exp runs once per element), their sum, the loss term weight * (lse - x[target]) and
// the gradient weight * (softmax - onehot); a (row, group) with weight 0 gets a zero gradient and no exp at all.
// Float32/16/bf16 go through one float32 row routine (half/bf16 rows are widened into a per-thread scratch row);
// float64 uses a plain double routine. The float routine uses a vectorisable exp (Cephes polynomial, ~1 ulp) and
// is compiled for AVX2+FMA as well as the baseline ISA, picked at load time (GCC/Clang function multi-versioning).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "common.h"
#include "group_softmax.h"


namespace {

// exp(x) for x <= 0 (all our arguments are x - max); branch-free so loops over it vectorise.
LTK_ALWAYS_INLINE float exp_nonpos(float x) {
  x = x < -87.3f ? -87.3f : x;                              // exp(-87.3) ~ 1.2e-38: stays a normal float
  constexpr float kMagic = 12582912.f;                      // 1.5 * 2^23: float add rounds to an integer
  const float n = (x * 1.44269504088896341f + kMagic) - kMagic;
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.f;
  const int32_t e = (static_cast<int32_t>(n) + 127) << 23;
  return y * std::bit_cast<float>(e);
}

// One row of the loss in float32: x [K] logits, g [K] gradient out. Returns the row's loss.
// tgt: the row's targets in every group; sel points at the row's flag of group 0 (group k's is sel[k * N]).
LTK_CPU_CLONES float loss_row_f32(const float* __restrict x, float* __restrict g, int64_t G1,
                              const int64_t* __restrict off, const int64_t* __restrict tgt,
                              const bool* __restrict sel, int64_t N, const float* __restrict scale) {
  float loss = 0.f;
  for (int64_t k = 0; k < G1; ++k) {
    const int64_t s = off[k], n = off[k + 1] - off[k];
    const float wk = sel[k * N] ? scale[k] : 0.f;
    const float* xx = x + s;
    float* gg = g + s;
    if (wk == 0.f) {
      for (int64_t j = 0; j < n; ++j) gg[j] = 0.f;
      continue;
    }
    float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
    for (int64_t j = 0; j < n; ++j) m = xx[j] > m ? xx[j] : m;
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < n; ++j) {
      const float e = exp_nonpos(xx[j] - m);
      gg[j] = e;
      sum += e;
    }
    const float scale = wk / sum;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) gg[j] *= scale;
    const int64_t t = tgt[k];
    loss += wk * (m + std::log(sum) - xx[t]);
    gg[t] -= wk;
  }
  return loss;
}

// One row of the scores in float32: p [K] scratch (in-group probabilities), out [C + 1].
LTK_CPU_CLONES void scores_row_f32(const float* __restrict x, float* __restrict p, float* __restrict out, int64_t G1,
                               const int64_t* __restrict off, int64_t C1, const int64_t* __restrict score_column) {
  for (int64_t k = 0; k < G1; ++k) {
    const int64_t s = off[k], n = off[k + 1] - off[k];
    const float* xx = x + s;
    float* pp = p + s;
    float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
    for (int64_t j = 0; j < n; ++j) m = xx[j] > m ? xx[j] : m;
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < n; ++j) {
      const float e = exp_nonpos(xx[j] - m);
      pp[j] = e;
      sum += e;
    }
    const float inv = 1.f / sum;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) pp[j] *= inv;
  }
  const float fg = p[1];
  out[0] = p[0];
  for (int64_t c = 1; c < C1; ++c) out[c] = p[score_column[c]] * fg;
}

// float64 rows (the reference dtype): plain loops.
double loss_row_f64(const double* x, double* g, int64_t G1, const int64_t* off, const int64_t* tgt, const bool* sel,
                    int64_t N, const double* scale) {
  double loss = 0.;
  for (int64_t k = 0; k < G1; ++k) {
    const int64_t s = off[k], n = off[k + 1] - off[k];
    const double wk = sel[k * N] ? scale[k] : 0.;
    const double* xx = x + s;
    double* gg = g + s;
    if (wk == 0.) {
      for (int64_t j = 0; j < n; ++j) gg[j] = 0.;
      continue;
    }
    double m = -std::numeric_limits<double>::infinity();
    for (int64_t j = 0; j < n; ++j) m = xx[j] > m ? xx[j] : m;
    double sum = 0.;
    for (int64_t j = 0; j < n; ++j) {
      gg[j] = std::exp(xx[j] - m);
      sum += gg[j];
    }
    const double scale = wk / sum;
    for (int64_t j = 0; j < n; ++j) gg[j] *= scale;
    const int64_t t = tgt[k];
    loss += wk * (m + std::log(sum) - xx[t]);
    gg[t] -= wk;
  }
  return loss;
}

void scores_row_f64(const double* x, double* p, double* out, int64_t G1, const int64_t* off, int64_t C1,
                    const int64_t* score_column) {
  for (int64_t k = 0; k < G1; ++k) {
    const int64_t s = off[k], n = off[k + 1] - off[k];
    double m = -std::numeric_limits<double>::infinity();
    for (int64_t j = 0; j < n; ++j) m = x[s + j] > m ? x[s + j] : m;
    double sum = 0.;
    for (int64_t j = 0; j < n; ++j) {
      p[s + j] = std::exp(x[s + j] - m);
      sum += p[s + j];
    }
    for (int64_t j = 0; j < n; ++j) p[s + j] /= sum;
  }
  out[0] = p[0];
  for (int64_t c = 1; c < C1; ++c) out[c] = p[score_column[c]] * p[1];
}

void check_offsets(const at::Tensor& group_offsets, int64_t K) {
  TORCH_CHECK(group_offsets.dim() == 1 && group_offsets.size(0) >= 2, "group_offsets must be 1-D with >= 2 entries");
  TORCH_CHECK(group_offsets.scalar_type() == at::kLong, "group_offsets must be int64");
  const int64_t* off = group_offsets.data_ptr<int64_t>();
  const int64_t G1 = group_offsets.size(0) - 1;
  TORCH_CHECK(off[0] == 0 && off[G1] == K, "group_offsets must run from 0 to the number of logits (", K, "), got ",
              off[0], "..", off[G1]);
  for (int64_t k = 0; k < G1; ++k) TORCH_CHECK(off[k + 1] > off[k], "group_offsets must be strictly increasing");
}

std::tuple<at::Tensor, at::Tensor> group_softmax_loss_cpu(const at::Tensor& logits_, const at::Tensor& labels_,
                                                          const at::Tensor& selected_, const at::Tensor& scale_,
                                                          const at::Tensor& label_targets_,
                                                          const at::Tensor& group_offsets_) {
  LTK_CHECK_CPU(logits_);
  LTK_CHECK_CPU(labels_);
  LTK_CHECK_CPU(selected_);
  LTK_CHECK_CPU(scale_);
  LTK_CHECK_CPU(label_targets_);
  LTK_CHECK_CPU(group_offsets_);
  LTK_CHECK_DIM(logits_, 2);
  const int64_t N = logits_.size(0), K = logits_.size(1);
  const auto group_offsets = group_offsets_.contiguous();
  check_offsets(group_offsets, K);
  const int64_t G1 = group_offsets.size(0) - 1;
  ltk::check_group_softmax_loss_args(logits_, labels_, selected_, scale_, label_targets_, group_offsets);
  const auto acc_type = logits_.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto logits = logits_.contiguous();
  const auto labels = labels_.contiguous();
  const auto selected = selected_.contiguous();
  const auto scale = scale_.contiguous();
  const auto label_targets = label_targets_.contiguous();
  auto grad = at::empty_like(logits, at::MemoryFormat::Contiguous);
  auto row_loss = at::empty({N}, logits.options().dtype(acc_type));
  if (N == 0) return {row_loss.sum().to(logits.scalar_type()), grad};

  const int64_t* off = group_offsets.data_ptr<int64_t>();
  const int64_t C1 = label_targets.size(0);
  const int64_t* tt = label_targets.data_ptr<int64_t>();
  for (int64_t c = 0; c < C1; ++c)
    for (int64_t k = 0; k < G1; ++k)
      TORCH_CHECK(tt[c * G1 + k] >= 0 && tt[c * G1 + k] < off[k + 1] - off[k], "label_targets[", c, ", ", k,
                  "] is outside group ", k);
  const int64_t* lab = labels.data_ptr<int64_t>();
  for (int64_t i = 0; i < N; ++i)
    TORCH_CHECK(lab[i] >= 0 && lab[i] < C1, "labels[", i, "] = ", lab[i], " is not in 0..", C1 - 1);
  const bool* sel = selected.data_ptr<bool>();
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(K, 1));
  if (logits.scalar_type() == at::kDouble) {
    const double* x = logits.data_ptr<double>();
    const double* sc = scale.data_ptr<double>();
    double* g = grad.data_ptr<double>();
    double* rl = row_loss.data_ptr<double>();
    at::parallel_for(0, N, grain, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i)
        rl[i] = loss_row_f64(x + i * K, g + i * K, G1, off, tt + lab[i] * G1, sel + i, N, sc);
    });
  } else if (logits.scalar_type() == at::kFloat) {
    const float* x = logits.data_ptr<float>();
    const float* sc = scale.data_ptr<float>();
    float* g = grad.data_ptr<float>();
    float* rl = row_loss.data_ptr<float>();
    at::parallel_for(0, N, grain, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i)
        rl[i] = loss_row_f32(x + i * K, g + i * K, G1, off, tt + lab[i] * G1, sel + i, N, sc);
    });
  } else {
    AT_DISPATCH_REDUCED_FLOATING_TYPES(logits.scalar_type(), "group_softmax_loss_cpu", [&] {
      const scalar_t* x = logits.data_ptr<scalar_t>();
      const float* sc = scale.data_ptr<float>();
      scalar_t* g = grad.data_ptr<scalar_t>();
      float* rl = row_loss.data_ptr<float>();
      at::parallel_for(0, N, grain, [&](int64_t b, int64_t e) {
        std::vector<float> xs(K), gs(K);
        for (int64_t i = b; i < e; ++i) {
          const scalar_t* xi = x + i * K;
          for (int64_t j = 0; j < K; ++j) xs[j] = static_cast<float>(xi[j]);
          rl[i] = loss_row_f32(xs.data(), gs.data(), G1, off, tt + lab[i] * G1, sel + i, N, sc);
          scalar_t* gi = g + i * K;
          for (int64_t j = 0; j < K; ++j) gi[j] = static_cast<scalar_t>(gs[j]);
        }
      });
    });
  }
  return {row_loss.sum().to(logits.scalar_type()), grad};
}

at::Tensor group_softmax_scores_cpu(const at::Tensor& logits_, const at::Tensor& group_offsets_,
                                    const at::Tensor& label_group_, const at::Tensor& score_column_) {
  LTK_CHECK_CPU(logits_);
  LTK_CHECK_CPU(group_offsets_);
  LTK_CHECK_CPU(label_group_);
  LTK_CHECK_CPU(score_column_);
  LTK_CHECK_DIM(logits_, 2);
  LTK_CHECK_DIM(score_column_, 1);
  const int64_t N = logits_.size(0), K = logits_.size(1);
  const auto group_offsets = group_offsets_.contiguous();
  check_offsets(group_offsets, K);
  const int64_t G1 = group_offsets.size(0) - 1;
  TORCH_CHECK(G1 >= 1 && group_offsets.data_ptr<int64_t>()[1] == 2, "group 0 must have 2 columns (bg, fg)");
  TORCH_CHECK(score_column_.scalar_type() == at::kLong, "score_column must be int64");
  const auto score_column = score_column_.contiguous();
  const int64_t C1 = score_column.size(0);
  const int64_t* sc = score_column.data_ptr<int64_t>();
  for (int64_t c = 0; c < C1; ++c)
    TORCH_CHECK(sc[c] >= 0 && sc[c] < K, "score_column[", c, "] = ", sc[c], " is not a column of the logits");
  const auto logits = logits_.contiguous();
  auto out = at::empty({N, C1}, logits.options());
  if (N == 0) return out;
  const int64_t* off = group_offsets.data_ptr<int64_t>();
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(K, 1));
  if (logits.scalar_type() == at::kDouble) {
    const double* x = logits.data_ptr<double>();
    double* o = out.data_ptr<double>();
    at::parallel_for(0, N, grain, [&](int64_t b, int64_t e) {
      std::vector<double> p(K);
      for (int64_t i = b; i < e; ++i) scores_row_f64(x + i * K, p.data(), o + i * C1, G1, off, C1, sc);
    });
  } else {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "group_softmax_scores_cpu", [&] {
      const scalar_t* x = logits.data_ptr<scalar_t>();
      scalar_t* o = out.data_ptr<scalar_t>();
      at::parallel_for(0, N, grain, [&](int64_t b, int64_t e) {
        std::vector<float> xs(K), p(K), os(C1);
        for (int64_t i = b; i < e; ++i) {
          const scalar_t* xi = x + i * K;
          for (int64_t j = 0; j < K; ++j) xs[j] = static_cast<float>(xi[j]);
          scores_row_f32(xs.data(), p.data(), os.data(), G1, off, C1, sc);
          scalar_t* oi = o + i * C1;
          for (int64_t c = 0; c < C1; ++c) oi[c] = static_cast<scalar_t>(os[c]);
        }
      });
    });
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(ltkernels, CPU, m) {
  m.impl("group_softmax_loss", &group_softmax_loss_cpu);
  m.impl("group_softmax_scores", &group_softmax_scores_cpu);
}
