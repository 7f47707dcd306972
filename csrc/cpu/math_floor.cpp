// The compute floor of the CPU loss kernels, for the benchmarks (bench/): the per-element maths of a formula alone,
// on a block of values that stays in L1, repeated to n elements over the thread pool. It is what those evaluations
// cost on this machine with no memory traffic, the floor a compute-bound kernel is measured against; and the same
// functions alone (exp, log1p), against ATen's vectorised (SLEEF) ones. Not part of the API.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <string>
#include <vector>

#include "common.h"
#include "fast_math.h"

namespace {

constexpr int64_t kBlock = 4096;  // 16 KiB of float32

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC optimize("no-trapping-math")
#endif

// What the EFL / focal-loss formula must evaluate per element for its loss and its gradient (docs/spec.md §2):
// e = exp(-|x|) (the sigmoid), log1p(e) (log p_t), the power (1 - p_t)^gamma as an exp, and 1 / (1 + e).
LTK_CPU_CLONES float efl_block(const float* __restrict__ x, int64_t m, float gamma) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < m; ++j) {
    const float z = x[j];
    const float e = ltk::exp_nonpos(z < 0.0f ? z : -z);
    const float l = ltk::log1p_unit(e);
    const float w = ltk::exp_nonpos(-gamma * ((z > 0.0f ? z : 0.0f) + l));
    s += w * l + 1.0f / (1.0f + e);
  }
  return s;
}

LTK_CPU_CLONES float exp_block(const float* __restrict__ x, int64_t m) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < m; ++j) s += ltk::exp_nonpos(x[j]);
  return s;
}

LTK_CPU_CLONES float log1p_block(const float* __restrict__ u, int64_t m) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < m; ++j) s += ltk::log1p_unit(u[j]);
  return s;
}

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif

// Evaluates `formula` ("efl", "exp" or "log1p") for n elements; returns their sum (so that nothing is elided).
double math_floor(int64_t n, const std::string& formula) {
  TORCH_CHECK_VALUE(n >= 0, "n must be >= 0, got ", n);
  TORCH_CHECK_VALUE(formula == "efl" || formula == "exp" || formula == "log1p",
                    "formula must be 'efl', 'exp' or 'log1p', got '", formula, "'");
  std::vector<float> x(kBlock), u(kBlock);  // x in [-8, 0] (logits, exp arguments), u in [0, 1] (log1p arguments)
  for (int64_t j = 0; j < kBlock; ++j) {
    u[j] = static_cast<float>(j) / kBlock;
    x[j] = -8.0f * u[j];
  }
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  std::atomic<double> total{0.0};
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    double s = 0.0;
    for (int64_t b = begin; b < end; ++b) {
      const int64_t m = std::min(kBlock, n - b * kBlock);
      s += formula == "efl"   ? efl_block(x.data(), m, 2.0f)
           : formula == "exp" ? exp_block(x.data(), m)
                              : log1p_block(u.data(), m);
    }
    double old = total.load();
    while (!total.compare_exchange_weak(old, old + s)) {
    }
  });
  return total.load();
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ltkernels, m) { m.def("_math_floor(int n, str formula) -> float", &math_floor); }
