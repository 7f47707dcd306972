// Scalar exp / log / log1p overloads for the accumulation types, callable from host and device code: the maths
// headers that the CPU and CUDA kernels share (<op>_math.h) are written once, on these.
#pragma once

#include <math.h>

#if defined(__CUDACC__)
#define LTK_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
#define LTK_HD inline __attribute__((always_inline))  // inlined into the CPU kernels' target clones too
#else
#define LTK_HD inline
#endif

namespace ltk {

LTK_HD float ex(float v) { return ::expf(v); }
LTK_HD double ex(double v) { return ::exp(v); }
LTK_HD float lg1p(float v) { return ::log1pf(v); }
LTK_HD double lg1p(double v) { return ::log1p(v); }
LTK_HD float lg(float v) { return ::logf(v); }
LTK_HD double lg(double v) { return ::log(v); }

}  // namespace ltk
