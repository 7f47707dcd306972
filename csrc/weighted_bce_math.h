// Per-element maths of the class-weighted sigmoid cross-entropy shared by the CPU and CUDA kernels (docs/spec.md
// §10, §11). For an element with target t let z = t ? x : -x, so that p_t = sigmoid(z); with e = exp(-|z|):
//   BCE = -log p_t = max(-z, 0) + log1p(e),   |p - t| = 1 - p_t = sigmoid(-z),   dBCE/dx = (p - t) = t ? -q : q
// all without cancellation or overflow.
#pragma once

#include "scalar_math.h"

namespace ltk::weighted_bce {

template <typename acc>
struct Bce {
  acc loss, q;  // -log p_t and 1 - p_t
};

template <typename acc>
LTK_HD Bce<acc> bce(acc z) {
  const acc e = ex(z < acc(0) ? z : -z);
  const acc r = acc(1) / (acc(1) + e);
  return {(z < acc(0) ? -z : acc(0)) + lg1p(e), z >= acc(0) ? e * r : r};
}

}  // namespace ltk::weighted_bce
