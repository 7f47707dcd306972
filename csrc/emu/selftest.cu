// Kernels that check the CUDA emulation itself (tests/test_cuda_emulation.py): what each intrinsic returns, and that
// each misuse it claims to catch is caught. Compiled into the emulated library only, as ltkernels_emu::_selftest.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <torch/library.h>

#include <string>

#include "cuda/launch.h"

namespace {

constexpr int kThreads = 128;

// Tree reduction of x[0..127] through shared memory; `barriers` false drops every barrier (a race).
__global__ void block_sum_kernel(const float* x, bool barriers, float* out) {
  LTK_SHARED(float, s, kThreads);
  const int t = threadIdx.x;
  s[t] = x[t];
  if (barriers) __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride >>= 1) {
    if (t < stride) s[t] += s[t + stride];
    if (barriers) __syncthreads();
  }
  if (t == 0) out[0] = s[0];
}

// out[lane] for every lane of a 32-thread block: each shuffle form and vote on x[lane], at `width`.
__global__ void warp_ops_kernel(const float* x, int arg, int width, float* out) {
  const int l = threadIdx.x;
  const float v = x[l];
  out[0 * 32 + l] = __shfl_sync(0xffffffffu, v, arg, width);
  out[1 * 32 + l] = __shfl_up_sync(0xffffffffu, v, arg, width);
  out[2 * 32 + l] = __shfl_down_sync(0xffffffffu, v, arg, width);
  out[3 * 32 + l] = __shfl_xor_sync(0xffffffffu, v, arg, width);
  const unsigned ballot = __ballot_sync(0xffffffffu, v > 0);
  out[4 * 32 + l] = static_cast<float>(ballot & 0xffffu);  // exact in float: the two halves apart
  out[5 * 32 + l] = static_cast<float>(ballot >> 16);
  out[6 * 32 + l] = static_cast<float>(__any_sync(0xffffffffu, v > 0));
  out[7 * 32 + l] = static_cast<float>(__all_sync(0xffffffffu, v > 0));
  out[8 * 32 + l] = static_cast<float>(__syncthreads_count(v > 0));
  out[9 * 32 + l] = static_cast<float>(__syncthreads_or(v > 0));
  out[10 * 32 + l] = static_cast<float>(__syncthreads_and(v > 0));
}

__global__ void divergent_barrier_kernel() {
  if (threadIdx.x < 16) __syncthreads();
}

__global__ void early_exit_kernel() {
  if (threadIdx.x == 5) return;
  __syncthreads();
}

__global__ void warp_mask_kernel(unsigned mask, float* out) { out[threadIdx.x] = __shfl_xor_sync(mask, 1.f, 1); }

__global__ void deadlock_kernel(float* out) {  // lanes 0-15 wait at a shuffle, 16-31 at a barrier
  if (threadIdx.x < 16)
    out[threadIdx.x] = __shfl_down_sync(0xffffffffu, 1.f, 1);
  else
    __syncthreads();
}

__global__ void assert_kernel(const float* x) { CUDA_KERNEL_ASSERT(x[threadIdx.x] >= 0 && "x must be >= 0"); }

__global__ void dynamic_shared_kernel(float* out) {
  LTK_DYNAMIC_SHARED(float, s);
  out[threadIdx.x] = s[threadIdx.x];  // never written: the poison shows
}

at::Tensor selftest(const std::string& name, const at::Tensor& x_) {
  const at::Tensor x = x_.contiguous().to(at::kFloat);
  const auto stream = at::cuda::getCurrentCUDAStream();
  if (name == "block_sum" || name == "block_sum_no_barriers") {
    TORCH_CHECK(x.numel() == kThreads, "block_sum takes ", kThreads, " values");
    auto out = at::empty({1}, x.options());
    LTK_LAUNCH(1, kThreads, 0, stream, block_sum_kernel)
    (x.data_ptr<float>(), name == "block_sum", out.data_ptr<float>());
    return out;
  }
  if (name.rfind("warp_ops:", 0) == 0) {  // warp_ops:<arg>:<width>
    const auto colon = name.find(':', 9);
    const int arg = std::stoi(name.substr(9, colon - 9)), width = std::stoi(name.substr(colon + 1));
    TORCH_CHECK(x.numel() == 32, "warp_ops takes 32 values");
    auto out = at::empty({11, 32}, x.options());
    LTK_LAUNCH(1, 32, 0, stream, warp_ops_kernel)(x.data_ptr<float>(), arg, width, out.data_ptr<float>());
    return out;
  }
  auto out = at::zeros({64}, x.options());
  float* o = out.data_ptr<float>();
  if (name == "divergent_barrier")
    LTK_LAUNCH(1, 32, 0, stream, divergent_barrier_kernel)();
  else if (name == "early_exit")
    LTK_LAUNCH(1, 32, 0, stream, early_exit_kernel)();
  else if (name == "mask_leaves_out_caller")
    LTK_LAUNCH(1, 32, 0, stream, warp_mask_kernel)(0xfffffffeu, o);
  else if (name == "mask_names_missing_lane")
    LTK_LAUNCH(1, 48, 0, stream, warp_mask_kernel)(0xffffffffu, o);
  else if (name == "deadlock")
    LTK_LAUNCH(1, 32, 0, stream, deadlock_kernel)(o);
  else if (name == "assert")
    LTK_LAUNCH(1, 32, 0, stream, assert_kernel)(x.data_ptr<float>());
  else if (name == "too_many_threads")
    LTK_LAUNCH(1, 2048, 0, stream, divergent_barrier_kernel)();
  else if (name == "zero_grid")
    LTK_LAUNCH(0, 32, 0, stream, divergent_barrier_kernel)();
  else if (name == "too_much_shared")
    LTK_LAUNCH(1, 32, 64 * 1024, stream, dynamic_shared_kernel)(o);
  else if (name == "dynamic_shared")
    LTK_LAUNCH(1, 32, 32 * sizeof(float), stream, dynamic_shared_kernel)(o);
  else
    TORCH_CHECK(false, "unknown selftest '", name, "'");
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ltkernels_emu, m) { m.def("_selftest(str name, Tensor x) -> Tensor"); }

TORCH_LIBRARY_IMPL(ltkernels_emu, CPU, m) { m.impl("_selftest", &selftest); }
