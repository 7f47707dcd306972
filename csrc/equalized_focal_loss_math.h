// Per-element Equalized Focal Loss maths shared by the CPU and CUDA kernels (docs/spec.md §2), and the positive
// column of the Equalized Quality Focal Loss (a soft target y = the row's quality; its negatives are EFL's).
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
LTK_EFL_HD float lg(float v) { return ::logf(v); }
LTK_EFL_HD double lg(double v) { return ::log(v); }

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

// ---- EQFL: soft target y in [0, 1] on the positive column ----------------------------------------------------------
//   loss term  = aw * |y - p|^gamma * (y * -log p + (1 - y) * -log(1 - p))
//   dterm / dx = aw * (gamma * |d|^gamma / d * p (1 - p) * bce + |d|^gamma * d),  d = p - y
// (0 at d = 0, where the term has its minimum; with y = 1 both equal EFL's positive term and its derivative).
template <typename A>
struct QualityParts {
  A d, ad, pq, bce;  // p - y, |p - y|, p (1 - p), the soft binary cross-entropy
};

template <typename A>
LTK_EFL_HD QualityParts<A> quality_parts(A x, A y) {
  const NegLogs<A> l = neg_logs(x);  // z = x: nlog_pt = -log p, nlog_qt = -log(1 - p)
  const A r = A(1) / (A(1) + l.e);
  const A p = x >= A(0) ? r : l.e * r;
  const A q = x >= A(0) ? l.e * r : r;  // 1 - p, computed directly
  // d = p - y without cancellation at y = 1, p -> 1: p - y = (1 - y) - q
  const A d = x >= A(0) ? (A(1) - y) - q : p - y;
  return {d, d < A(0) ? -d : d, p * q, y * l.nlog_pt + (A(1) - y) * l.nlog_qt};
}

// |d|^gamma with 0^0 = 1
template <typename A>
LTK_EFL_HD A pow_abs(A ad, A gamma) {
  return gamma == A(0) ? A(1) : (ad == A(0) ? A(0) : ex(gamma * lg(ad)));
}

template <typename A>
LTK_EFL_HD A quality_loss_term(A x, A y, A gamma, A aw) {
  const QualityParts<A> t = quality_parts(x, y);
  return aw * pow_abs(t.ad, gamma) * t.bce;
}

// dterm/dx (the caller applies the upstream gradient and 1/normalizer).
template <typename A>
LTK_EFL_HD A quality_grad_x(A x, A y, A gamma, A aw) {
  const QualityParts<A> t = quality_parts(x, y);
  if (t.d == A(0)) return A(0);
  const A m = pow_abs(t.ad, gamma);
  return aw * (gamma * (m / t.d) * t.pq * t.bce + m * t.d);
}

}  // namespace ltk::efl
