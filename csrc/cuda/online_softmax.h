// Online softmax pieces for the CUDA kernels: a running (max, sum of exp(x - max)) pair per thread, merged across a
// block. NaN and infinite logits behave as in the CPU kernels (see push).
#pragma once

#include <limits>

#include "scalar_math.h"

namespace ltk::cuda {

template <typename T>
struct MaxSum {
  T m;  // running max
  T s;  // sum of exp(x - m)
};

template <typename T>
__device__ __forceinline__ MaxSum<T> merge(MaxSum<T> a, MaxSum<T> b) {
  const T ninf = -std::numeric_limits<T>::infinity();
  // A side with max -inf holds no finite terms: its sum is 0, or NaN after a NaN logit (kept, as on the CPU).
  if (a.m == ninf) return {b.m, b.s + a.s};
  if (b.m == ninf) return {a.m, a.s + b.s};
  const T m = a.m > b.m ? a.m : b.m;
  return {m, a.s * ex(a.m - m) + b.s * ex(b.m - m)};
}

template <typename T>
__device__ __forceinline__ MaxSum<T> push(MaxSum<T> v, T x) {
  // As on the CPU: a -inf logit adds exp(-inf) = 0 (never exp(-inf - -inf) = NaN while v.m is still -inf); a NaN
  // logit makes the sum NaN; a +inf logit adds exp(inf - inf) = NaN (x - x below: 0 for finite x, NaN for inf).
  if (x > v.m) {
    v.s = v.s * ex(v.m - x) + (T(1) + (x - x));  // v.m == -inf: exp(-inf) = 0
    v.m = x;
  } else if (!(x == -std::numeric_limits<T>::infinity())) {
    v.s += ex(x - v.m);
  }
  return v;
}

// Block-wide merge of every thread's pair; every thread gets the result. `shared` holds >= 32 pairs.
template <typename T>
__device__ __forceinline__ MaxSum<T> block_merge(MaxSum<T> v, MaxSum<T>* shared) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    MaxSum<T> other{__shfl_xor_sync(0xffffffffu, v.m, o), __shfl_xor_sync(0xffffffffu, v.s, o)};
    v = merge(v, other);
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  __syncthreads();  // the previous call's readers are done with shared[]
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < nwarps ? shared[lane] : MaxSum<T>{-std::numeric_limits<T>::infinity(), T(0)};
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      MaxSum<T> other{__shfl_xor_sync(0xffffffffu, v.m, o), __shfl_xor_sync(0xffffffffu, v.s, o)};
      v = merge(v, other);
    }
    if (lane == 0) shared[32] = v;
  }
  __syncthreads();
  return shared[32];
}

}  // namespace ltk::cuda
