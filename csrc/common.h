// Small helpers shared by every kernel file. Python validates arguments first (with messages that name them);
// these checks are the safety net for callers that reach torch.ops.ltkernels.* directly.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <initializer_list>

// The device type of the CUDA kernels' tensors: CUDA, or CPU under the CPU emulation of CUDA (csrc/emu), where CPU
// tensors stand for CUDA ones.
#ifdef LTK_CUDA_EMU
#define LTK_CUDA_DEVICE at::kCPU
#else
#define LTK_CUDA_DEVICE at::kCUDA
#endif
// Every tensor of `ts` on one device, the first one's, which is of type `type` (a kernel file's own backend).
#define LTK_CHECK_DEVICES(type, ...) ::ltk::check_devices(type, {__VA_ARGS__})
#define LTK_CHECK_DIM(x, d) TORCH_CHECK((x).dim() == (d), #x " must be ", d, "-D, got shape ", (x).sizes())

// float32/float64/float16/bfloat16: the dtypes every ltkernels op accepts for its floating-point inputs.
#define LTK_DISPATCH_FLOATING(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, TYPE, NAME, __VA_ARGS__)

// Hot CPU loops are compiled twice, for AVX2+FMA and for the baseline ISA, and the loader picks one (GCC function
// multiversioning). Helpers they call must be LTK_ALWAYS_INLINE: GCC does not inline a default-target function into
// a clone, and an out-of-line call inside a loop stops it from vectorising.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define LTK_CPU_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#define LTK_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define LTK_CPU_CLONES
#define LTK_ALWAYS_INLINE inline
#endif

namespace ltk {

// Accumulation type: float for float32/float16/bfloat16, double for float64.
template <typename T>
struct acc {
  using type = float;
};
template <>
struct acc<double> {
  using type = double;
};
template <typename T>
using acc_t = typename acc<T>::type;
// The same rule for a tensor's dtype.
constexpr at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// A loss kernel's label check of one row (background-first layout: 0 = background, 1..c the classes).
inline void check_label(int64_t y, int64_t c, int64_t ignore_index) {
  TORCH_CHECK(y >= 0 && y <= c, "labels must lie in 0..", c, " (0 = background) or be ", ignore_index,
              " (ignored), found ", y);
}

inline void check_devices(c10::DeviceType type, std::initializer_list<at::Tensor> ts) {
  const at::Tensor& first = *ts.begin();
  TORCH_CHECK(first.device().type() == type, "the inputs must be ", type, " tensors, got one on ", first.device());
  for (const at::Tensor& t : ts)
    TORCH_CHECK(t.device() == first.device(), "all inputs must be on ", first.device(), ", got one on ", t.device());
}

}  // namespace ltk
