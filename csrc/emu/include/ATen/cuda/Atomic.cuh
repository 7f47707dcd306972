// Stand-in for ATen's device atomics under the CUDA emulation: real atomics on host memory.
#pragma once

template <typename T>
inline void gpuAtomicAdd(T* address, T val) {
  ltk_emu::atomic_add(address, val);
}
