// Subnormal floats flushed to zero in the calling thread for one scope (x86: MXCSR's FTZ and DAZ bits, restored on
// exit). An AVX2 multiply or FMA that meets a subnormal operand or result takes a microcode assist of ~100 cycles
// for the whole vector, and the float32 loss kernels make them in ordinary inputs: EFL's power (1 - p_t)^gamma
// underflows through the subnormals for -log(1 - p_t) between 87 / gamma and 104 / gamma, and the gradient's 1 /
// normalizer scaling pushes small values below 2^-126. With one such lane in 8, 20000 x 1203 logits ~ N(-4, 2) at
// gamma = 10 took 77 ms against 60 ms with flushing. Every value flushed is below 1.2e-38 in magnitude, beneath
// what any float32 loss, gradient or statistic can resolve (the float64 kernels never flush). Used by every float32
// CPU loss kernel (EFL / EQFL, BAGS, Seesaw, EQL v2 / federated). Elsewhere than x86 a no-op.
#pragma once

#if defined(__SSE2__) || defined(_M_X64)
#include <xmmintrin.h>
#define LTK_HAVE_MXCSR 1
#endif

namespace ltk::cpu {

class FlushDenormals {
 public:
#if defined(LTK_HAVE_MXCSR)
  FlushDenormals() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ | kFtz | kDaz); }
  ~FlushDenormals() { _mm_setcsr(saved_); }

 private:
  static constexpr unsigned kFtz = 0x8000, kDaz = 0x0040;
  unsigned saved_;
#else
  FlushDenormals() = default;
#endif

 public:
  FlushDenormals(const FlushDenormals&) = delete;
  FlushDenormals& operator=(const FlushDenormals&) = delete;
};

// The guard for kernels templated on their accumulation type: flushing for float, nothing for double.
template <bool kFlush>
struct FlushDenormalsIf : FlushDenormals {};
template <>
struct FlushDenormalsIf<false> {};

}  // namespace ltk::cpu
