// Branch-free float maths for the CPU kernels' hot loops. Written as plain inline code so that GCC vectorises the
// loops that call it inside LTK_CPU_CLONES functions (8 lanes in the AVX2+FMA clone, 4 in the baseline one);
// std::exp does not vectorise there (a libm call per element).
#pragma once

#include <cstdint>

#include "common.h"

namespace ltk {

// std::bit_cast without the call: GCC does not inline std::bit_cast (not always_inline) into a function compiled
// with other options (a target clone under #pragma GCC optimize), and an out-of-line call stops vectorisation.
template <typename To, typename From>
LTK_ALWAYS_INLINE To bits_as(From v) {
  static_assert(sizeof(To) == sizeof(From));
  return __builtin_bit_cast(To, v);
}

// exp(x) for x <= 0, as float std::exp gives it: within 1 ulp of the correctly rounded value for every float in
// [-105, 0] (checked exhaustively in the AVX2+FMA and the SSE2 build; glibc's expf is within 1 ulp too), subnormal
// results below -87.34 (one rounding), 0 from about -103.97 down to -inf, NaN for NaN. Cephes' expf:
// x = n ln2 + r with |r| <= ln2 / 2 (ln2 in two parts, so r is exact), exp(r) by a degree-7 polynomial, times 2^n.
// x > 0 is outside the domain (every caller passes a max-subtracted or otherwise non-positive argument).
LTK_ALWAYS_INLINE float exp_nonpos(float x) {
  // x < -104 (exp(x) < 2^-150 rounds to 0) and -inf -> -104; NaN stays NaN. Done on the bits (the negative floats
  // from -104 down to -inf, then the negative NaNs, are increasing unsigned patterns) with an integer min and a select
  // whose arms are both variables: GCC if-converts and vectorises that under the default -ftrapping-math, where a
  // float compare (it may trap) or a select with a constant arm (folded into a branch around the polynomial) stop it.
  const uint32_t u = bits_as<uint32_t>(x);
  const uint32_t c = u < 0xC2D00000u ? u : 0xC2D00000u;  // 0xC2D00000 = -104.f
  x = bits_as<float>(u > 0xFF800000u ? u : c);           // 0xFF800000 = -inf: above it, the negative NaNs
  constexpr float kMagic = 12582912.f;                   // 1.5 * 2^23: adding it rounds to an integer
  const float t = x * 1.44269504088896341f + kMagic;     // kMagic + n, n = round(x / ln2) in [-150, 0]
  const float n = t - kMagic;
  const int32_t ni = bits_as<int32_t>(t) - bits_as<int32_t>(kMagic);  // n as an integer (no UB on NaN)
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.f;
  // 2^n as two normal factors 2^n1 * 2^n2 (n1, n2 in [-75, 0]): the first product is exact, the second rounds once,
  // into the subnormals where it must.
  const int32_t n1 = ni >> 1, n2 = ni - n1;
  return (y * bits_as<float>((n1 + 127) << 23)) * bits_as<float>((n2 + 127) << 23);
}

// log1p(e) for e in [0, 1]: 2 atanh(s), s = e / (2 + e) in [0, 1/3], no cancellation.
LTK_ALWAYS_INLINE float log1p_unit(float e) {
  const float s = e / (2.0f + e);
  const float s2 = s * s;
  float p = 1.0f / 13.0f;
  p = p * s2 + 1.0f / 11.0f;
  p = p * s2 + 1.0f / 9.0f;
  p = p * s2 + 1.0f / 7.0f;
  p = p * s2 + 1.0f / 5.0f;
  p = p * s2 + 1.0f / 3.0f;
  p = p * s2 + 1.0f;
  return 2.0f * s * p;
}

}  // namespace ltk
