// Per-element Seesaw maths shared by the CPU and CUDA kernels (docs/spec.md §9), in log space: for a positive row of
// class column l with class log-sum-exp lse and ls = max(x_l - lse, log eps) (the log of the clamped self score),
//   z_j = x_j + p * min(0, logn_j - logn_l) + q * max(0, (x_j - lse) - ls)
// equals x_j + log(M_lj * C_lj) of mmdetection's factors, and gives z_l = x_l exactly (both terms are 0 there).
#pragma once

#include "scalar_math.h"

namespace ltk::seesaw_loss {

template <typename acc>
LTK_HD acc seesaw_logit(acc x, acc logn_j, acc logn_l, acc lse, acc ls, acc p, acc q) {
  const acc mitigation = logn_j < logn_l ? p * (logn_j - logn_l) : acc(0);
  const acc d = (x - lse) - ls;
  return x + mitigation + (d > acc(0) ? q * d : acc(0));
}

// The objectness cross-entropy of logits (a = object, b = background) for a row whose target is background or not:
// its loss and dloss/da (dloss/db is its negative). With d = a - b, P(object) = sigmoid(d).
template <typename acc>
struct Objectness {
  acc loss, grad_a;
};

template <typename acc>
LTK_HD Objectness<acc> objectness(acc a, acc b, bool background) {
  const acc d = a - b;
  const acc e = ex(d < acc(0) ? d : -d);  // exp(-|d|)
  const acc l1 = lg1p(e);
  const acc r = acc(1) / (acc(1) + e);
  const acc p_obj = d >= acc(0) ? r : e * r;
  const acc p_bg = d >= acc(0) ? e * r : r;  // 1 - P(object), computed directly
  if (background) return {(d > acc(0) ? d : acc(0)) + l1, p_obj};
  return {(d < acc(0) ? -d : acc(0)) + l1, -p_bg};
}

}  // namespace ltk::seesaw_loss
