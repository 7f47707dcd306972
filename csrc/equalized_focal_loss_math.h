// Per-element Equalized Focal Loss maths shared by the CPU and CUDA kernels (SPEC.md section 2).
// For an element with target t (1 = positive, 0 = negative) let z = t ? x : -x, so that p_t = sigmoid(z). With
// e = exp(-|z|):  -log p_t = max(-z, 0) + log1p(e),  -log(1 - p_t) = max(z, 0) + log1p(e),
// (1 - p_t)^gamma = exp(-gamma * -log(1 - p_t)), all without cancellation or overflow.
//   loss term  = aw * (1 - p_t)^gamma * (-log p_t)                         (aw = alpha_t * w_j)
//   dterm / dz = aw * (1 - p_t)^gamma * (gamma * p_t * log p_t + p_t - 1)  (<= 0),  dz/dx = 2t - 1.
#pragma once

#include <math.h>

#if defined(__CUDACC__)
#define LTK_EFL_HD __host__ __device__ __forceinline__
#else
#define LTK_EFL_HD inline
#endif

namespace ltk::efl {

LTK_EFL_HD float ex(float v) { return ::expf(v); }
LTK_EFL_HD double ex(double v) { return ::exp(v); }
LTK_EFL_HD float lg1p(float v) { return ::log1pf(v); }
LTK_EFL_HD double lg1p(double v) { return ::log1p(v); }

// What both need of z: e = exp(-|z|), -log p_t and -log(1 - p_t).
template <typename A>
struct NegLogs {
  A e, nlog_pt, nlog_qt;
};

template <typename A>
LTK_EFL_HD NegLogs<A> neg_logs(A z) {
  const A e = ex(z < A(0) ? z : -z);  // exp(-|z|)
  const A l1 = lg1p(e);
  return {e, (z < A(0) ? -z : A(0)) + l1, (z > A(0) ? z : A(0)) + l1};
}

template <typename A>
LTK_EFL_HD A loss_term(A z, A gamma, A aw) {
  const NegLogs<A> l = neg_logs(z);
  return aw * ex(-gamma * l.nlog_qt) * l.nlog_pt;
}

// dterm/dz (times nothing: the caller applies dz/dx, the upstream gradient and 1/normalizer).
template <typename A>
LTK_EFL_HD A grad_z(A z, A gamma, A aw) {
  const NegLogs<A> l = neg_logs(z);
  const A r = A(1) / (A(1) + l.e);
  const A pt = z >= A(0) ? r : l.e * r;  // p_t
  const A qt = z >= A(0) ? l.e * r : r;  // 1 - p_t, computed directly
  return -aw * ex(-gamma * l.nlog_qt) * (gamma * pt * l.nlog_pt + qt);
}

}  // namespace ltk::efl
