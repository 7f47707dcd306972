// CPU emulation of the CUDA execution model, force-included (g++ -include) ahead of every csrc/cuda/*.cu compiled as
// C++ for the emulated library (built with -DLTK_CUDA_EMU=ON). The .cu sources compile unchanged: the CUDA keywords
// become plain C++, the built-in variables are thread-locals set by the scheduler (runtime.cpp), and the
// intrinsics that synchronise (barriers, warp votes and shuffles) switch to the scheduler, which runs each block on
// one OS thread with its CUDA threads as fibers. What it checks and what it cannot see: README, "CUDA emulation".
#pragma once

#define LTK_CUDA_EMU 1

#include <ATen/ATen.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include <atomic>
#include <cstdint>
#include <cstring>
#include <source_location>
#include <tuple>
#include <type_traits>

// ---- the op registrations go to their own namespace, under the CPU key (CPU tensors stand for CUDA tensors) ----
#undef TORCH_LIBRARY_IMPL
#define TORCH_LIBRARY_IMPL(ns, k, m) _TORCH_LIBRARY_IMPL(ltkernels_emu, CPU, m, C10_UID)
#undef TORCH_LIBRARY_FRAGMENT
#define TORCH_LIBRARY_FRAGMENT(ns, m) _TORCH_LIBRARY_FRAGMENT(ltkernels_emu, m, C10_UID)

// ---- language keywords ---------------------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

// ---- built-in types and variables ----------------------------------------------------------------------------------
struct uint3 {
  unsigned int x, y, z;
};
struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
};
struct alignas(16) int4 {
  int x, y, z, w;
};
inline int4 make_int4(int x, int y, int z, int w) { return {x, y, z, w}; }
using cudaStream_t = void*;
constexpr int warpSize = 32;

extern thread_local uint3 threadIdx;
extern thread_local uint3 blockIdx;
extern thread_local dim3 blockDim;
extern thread_local dim3 gridDim;

namespace ltk_emu {

using Loc = std::source_location;

// ---- the scheduler's interface (runtime.cpp) ------------------------------------------------------------------------
enum class Sync : int {
  Barrier,
  BarrierOr,
  BarrierAnd,
  BarrierCount,
  WarpSync,
  ShflIdx,
  ShflUp,
  ShflDown,
  ShflXor,
  Ballot,
  Any,
  All
};

// Suspends the calling CUDA thread at a sync point until the scheduler completes it; returns the op's result
// (the vote, or the bits of the shuffled value).
uint64_t sync_point(Sync kind, unsigned mask, uint64_t value, int arg, int width, const Loc& loc);
[[noreturn]] void kernel_assert_fail(const char* cond, const char* file, int line);
void* static_shared(size_t bytes, size_t align, const void* site);
void* dynamic_shared();

struct LaunchInfo {
  const char* kernel;
  const char* file;
  int line;
  dim3 grid, block;
  size_t smem;
};
// Runs the grid: body(ctx) once per CUDA thread.
void run_grid(const LaunchInfo& info, void (*body)(const void*), const void* ctx);

template <typename... P>
struct Launcher {
  LaunchInfo info;
  void (*kernel)(P...);
  template <typename... A>
  void operator()(A&&... a) const {
    static_assert(sizeof...(A) == sizeof...(P), "kernel launched with the wrong number of arguments");
    const std::tuple<P...> args(static_cast<P>(std::forward<A>(a))...);  // by value, as CUDA passes them
    struct Ctx {
      void (*kernel)(P...);
      const std::tuple<P...>* args;
    } ctx{kernel, &args};
    run_grid(
        info,
        [](const void* c) {
          const Ctx* x = static_cast<const Ctx*>(c);
          std::apply(x->kernel, *x->args);
        },
        &ctx);
  }
};

template <typename... P>
Launcher<P...> launch(const char* name, const char* file, int line, dim3 grid, dim3 block, size_t smem,
                      void (*kernel)(P...)) {
  return {LaunchInfo{name, file, line, grid, block, smem}, kernel};
}

inline dim3 to_dim3(dim3 d) { return d; }
template <typename I, std::enable_if_t<std::is_integral_v<I>, int> = 0>
dim3 to_dim3(I n) {
  // a negative or too large count must not wrap into a valid one: the scheduler rejects 0
  return dim3(n < 0 || static_cast<uint64_t>(n) > 0xffffffffull ? 0u : static_cast<unsigned int>(n));
}

template <typename T>
uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "shuffle of a type wider than 8 bytes");
  uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}
template <typename T>
T from_bits(uint64_t b) {
  T v;
  std::memcpy(&v, &b, sizeof(T));
  return v;
}

template <typename T>
T atomic_add(T* address, T val) {
  if constexpr (std::is_arithmetic_v<T>) {
    return std::atomic_ref<T>(*address).fetch_add(val);
  } else {  // at::Half / at::BFloat16: compare-and-swap on the bits
    using U = std::conditional_t<sizeof(T) == 2, uint16_t, std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>>;
    std::atomic_ref<U> ref(*reinterpret_cast<U*>(address));
    U old = ref.load();
    for (;;) {
      T cur;
      std::memcpy(&cur, &old, sizeof(T));
      const T next = static_cast<T>(static_cast<float>(cur) + static_cast<float>(val));
      U nb;
      std::memcpy(&nb, &next, sizeof(T));
      if (ref.compare_exchange_weak(old, nb)) return cur;
    }
  }
}

}  // namespace ltk_emu

// ---- launches and shared memory (csrc/cuda/launch.h gives the nvcc forms) ----------------------------------------
#define LTK_LAUNCH(grid, block, smem, stream, ...)                                                         \
  ::ltk_emu::launch(#__VA_ARGS__, __FILE__, __LINE__, ::ltk_emu::to_dim3(grid), ::ltk_emu::to_dim3(block), \
                    static_cast<size_t>(smem), __VA_ARGS__)
#define LTK_SHARED(T, name, n)               \
  static const char ltk_emu_site_##name = 0; \
  T* const name = static_cast<T*>(::ltk_emu::static_shared(sizeof(T) * (n), alignof(T), &ltk_emu_site_##name))
#define LTK_DYNAMIC_SHARED(T, name) T* const name = static_cast<T*>(::ltk_emu::dynamic_shared())

#undef CUDA_KERNEL_ASSERT
#define CUDA_KERNEL_ASSERT(cond)                                                         \
  do {                                                                                   \
    if (C10_UNLIKELY(!(cond))) ::ltk_emu::kernel_assert_fail(#cond, __FILE__, __LINE__); \
  } while (0)

// ---- intrinsics --------------------------------------------------------------------------------------------------
inline void __syncthreads(const ltk_emu::Loc& loc = ltk_emu::Loc::current()) {
  ltk_emu::sync_point(ltk_emu::Sync::Barrier, 0, 0, 0, 0, loc);
}
inline int __syncthreads_or(int pred, const ltk_emu::Loc& loc = ltk_emu::Loc::current()) {
  return static_cast<int>(ltk_emu::sync_point(ltk_emu::Sync::BarrierOr, 0, pred != 0, 0, 0, loc));
}
inline int __syncthreads_and(int pred, const ltk_emu::Loc& loc = ltk_emu::Loc::current()) {
  return static_cast<int>(ltk_emu::sync_point(ltk_emu::Sync::BarrierAnd, 0, pred != 0, 0, 0, loc));
}
inline int __syncthreads_count(int pred, const ltk_emu::Loc& loc = ltk_emu::Loc::current()) {
  return static_cast<int>(ltk_emu::sync_point(ltk_emu::Sync::BarrierCount, 0, pred != 0, 0, 0, loc));
}
inline void __syncwarp(unsigned mask = 0xffffffffu, const ltk_emu::Loc& loc = ltk_emu::Loc::current()) {
  ltk_emu::sync_point(ltk_emu::Sync::WarpSync, mask, 0, 0, 0, loc);
}
template <typename T>
T __shfl_sync(unsigned mask, T var, int src_lane, int width = warpSize,
              const ltk_emu::Loc& loc = ltk_emu::Loc::current()) {
  return ltk_emu::from_bits<T>(
      ltk_emu::sync_point(ltk_emu::Sync::ShflIdx, mask, ltk_emu::to_bits(var), src_lane, width, loc));
}
template <typename T>
T __shfl_up_sync(unsigned mask, T var, unsigned int delta, int width = warpSize,
                 const ltk_emu::Loc& loc = ltk_emu::Loc::current()) {
  return ltk_emu::from_bits<T>(
      ltk_emu::sync_point(ltk_emu::Sync::ShflUp, mask, ltk_emu::to_bits(var), static_cast<int>(delta), width, loc));
}
template <typename T>
T __shfl_down_sync(unsigned mask, T var, unsigned int delta, int width = warpSize,
                   const ltk_emu::Loc& loc = ltk_emu::Loc::current()) {
  return ltk_emu::from_bits<T>(
      ltk_emu::sync_point(ltk_emu::Sync::ShflDown, mask, ltk_emu::to_bits(var), static_cast<int>(delta), width, loc));
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = warpSize,
                  const ltk_emu::Loc& loc = ltk_emu::Loc::current()) {
  return ltk_emu::from_bits<T>(
      ltk_emu::sync_point(ltk_emu::Sync::ShflXor, mask, ltk_emu::to_bits(var), lane_mask, width, loc));
}
inline unsigned __ballot_sync(unsigned mask, int pred, const ltk_emu::Loc& loc = ltk_emu::Loc::current()) {
  return static_cast<unsigned>(ltk_emu::sync_point(ltk_emu::Sync::Ballot, mask, pred != 0, 0, 0, loc));
}
inline int __any_sync(unsigned mask, int pred, const ltk_emu::Loc& loc = ltk_emu::Loc::current()) {
  return static_cast<int>(ltk_emu::sync_point(ltk_emu::Sync::Any, mask, pred != 0, 0, 0, loc));
}
inline int __all_sync(unsigned mask, int pred, const ltk_emu::Loc& loc = ltk_emu::Loc::current()) {
  return static_cast<int>(ltk_emu::sync_point(ltk_emu::Sync::All, mask, pred != 0, 0, 0, loc));
}
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }

inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll(static_cast<unsigned long long>(x)); }

template <typename T>
T atomicAdd(T* address, T val) {
  return ltk_emu::atomic_add(address, val);
}
template <typename T>
T atomicMax(T* address, T val) {
  std::atomic_ref<T> ref(*address);
  T old = ref.load();
  while (old < val && !ref.compare_exchange_weak(old, val)) {
  }
  return old;
}
template <typename T>
T atomicMin(T* address, T val) {
  std::atomic_ref<T> ref(*address);
  T old = ref.load();
  while (val < old && !ref.compare_exchange_weak(old, val)) {
  }
  return old;
}
template <typename T>
T atomicExch(T* address, T val) {
  return std::atomic_ref<T>(*address).exchange(val);
}
template <typename T>
T atomicCAS(T* address, T compare, T val) {
  std::atomic_ref<T>(*address).compare_exchange_strong(compare, val);
  return compare;  // the old value, whether or not it was replaced
}

// CUDA's overloaded device min/max, for the arithmetic types (after every torch header: nothing there sees them).
template <typename A, typename B, std::enable_if_t<std::is_arithmetic_v<A> && std::is_arithmetic_v<B>, int> = 0>
inline std::common_type_t<A, B> min(A a, B b) {
  using R = std::common_type_t<A, B>;
  return static_cast<R>(b) < static_cast<R>(a) ? static_cast<R>(b) : static_cast<R>(a);
}
template <typename A, typename B, std::enable_if_t<std::is_arithmetic_v<A> && std::is_arithmetic_v<B>, int> = 0>
inline std::common_type_t<A, B> max(A a, B b) {
  using R = std::common_type_t<A, B>;
  return static_cast<R>(a) < static_cast<R>(b) ? static_cast<R>(b) : static_cast<R>(a);
}
