// Per-element Equalized Focal Loss maths shared by the CPU and CUDA kernels (docs/spec.md §2), and the positive
// column of the Equalized Quality Focal Loss (a soft target y = the row's quality; its negatives are EFL's).
// For an element with target t (1 = positive, 0 = negative) let z = t ? x : -x, so that p_t = sigmoid(z). With
// e = exp(-|z|):  -log p_t = max(-z, 0) + log1p(e),  -log(1 - p_t) = max(z, 0) + log1p(e),
// (1 - p_t)^gamma = exp(-gamma * -log(1 - p_t)), all without cancellation or overflow.
//   loss term  = aw * (1 - p_t)^gamma * (-log p_t)                         (aw = alpha_t * w_j)
//   dterm / dz = aw * (1 - p_t)^gamma * (gamma * p_t * log p_t + p_t - 1)  (<= 0),  dz/dx = 2t - 1.
#pragma once

#include "scalar_math.h"

namespace ltk::equalized_focal_loss {

// What both need of z: e = exp(-|z|), -log p_t and -log(1 - p_t).
template <typename acc>
struct NegLogs {
  acc e, nlog_pt, nlog_qt;
};

template <typename acc>
LTK_HD NegLogs<acc> neg_logs(acc z) {
  const acc e = ex(z < acc(0) ? z : -z);  // exp(-|z|)
  const acc l1 = lg1p(e);
  return {e, (z < acc(0) ? -z : acc(0)) + l1, (z > acc(0) ? z : acc(0)) + l1};
}

template <typename acc>
LTK_HD acc loss_term(acc z, acc gamma, acc aw) {
  const NegLogs<acc> l = neg_logs(z);
  return aw * ex(-gamma * l.nlog_qt) * l.nlog_pt;
}

// dterm/dz (times nothing: the caller applies dz/dx, the upstream gradient and 1/normalizer).
template <typename acc>
LTK_HD acc grad_z(acc z, acc gamma, acc aw) {
  const NegLogs<acc> l = neg_logs(z);
  const acc r = acc(1) / (acc(1) + l.e);
  const acc pt = z >= acc(0) ? r : l.e * r;  // p_t
  const acc qt = z >= acc(0) ? l.e * r : r;  // 1 - p_t, computed directly
  return -aw * ex(-gamma * l.nlog_qt) * (gamma * pt * l.nlog_pt + qt);
}

// ---- EQFL: soft target y in [0, 1] on the positive column ----------------------------------------------------------
//   loss term  = aw * |y - p|^gamma * (y * -log p + (1 - y) * -log(1 - p))
//   dterm / dx = aw * (gamma * |d|^gamma / d * p (1 - p) * bce + |d|^gamma * d),  d = p - y
// (0 at d = 0, where the term has its minimum; with y = 1 both equal EFL's positive term and its derivative).
template <typename acc>
struct QualityParts {
  acc d, ad, pq, bce;  // p - y, |p - y|, p (1 - p), the soft binary cross-entropy
};

template <typename acc>
LTK_HD QualityParts<acc> quality_parts(acc x, acc y) {
  const NegLogs<acc> l = neg_logs(x);  // z = x: nlog_pt = -log p, nlog_qt = -log(1 - p)
  const acc r = acc(1) / (acc(1) + l.e);
  const acc p = x >= acc(0) ? r : l.e * r;
  const acc q = x >= acc(0) ? l.e * r : r;  // 1 - p, computed directly
  // d = p - y without cancellation at y = 1, p -> 1: p - y = (1 - y) - q
  const acc d = x >= acc(0) ? (acc(1) - y) - q : p - y;
  return {d, d < acc(0) ? -d : d, p * q, y * l.nlog_pt + (acc(1) - y) * l.nlog_qt};
}

// |d|^gamma with 0^0 = 1
template <typename acc>
LTK_HD acc pow_abs(acc ad, acc gamma) {
  return gamma == acc(0) ? acc(1) : (ad == acc(0) ? acc(0) : ex(gamma * lg(ad)));
}

template <typename acc>
LTK_HD acc quality_loss_term(acc x, acc y, acc gamma, acc aw) {
  const QualityParts<acc> t = quality_parts(x, y);
  return aw * pow_abs(t.ad, gamma) * t.bce;
}

// dterm/dx (the caller applies the upstream gradient and 1/normalizer).
template <typename acc>
LTK_HD acc quality_grad_x(acc x, acc y, acc gamma, acc aw) {
  const QualityParts<acc> t = quality_parts(x, y);
  if (t.d == acc(0)) return acc(0);
  const acc m = pow_abs(t.ad, gamma);
  return aw * (gamma * (m / t.d) * t.pq * t.bce + m * t.d);
}

}  // namespace ltk::equalized_focal_loss
