// Kernel launches and shared-memory declarations, spelled once for nvcc and for the CPU emulation of CUDA
// (csrc/emu/cuda_emu.h defines the emulated forms; `k<<<...>>>` is not C++).
//   LTK_LAUNCH(grid, block, smem, stream, kernel)(args...)  ==  kernel<<<grid, block, smem, stream>>>(args...)
//   LTK_SHARED(T, name, n);       ==  __shared__ T name[n];
//   LTK_DYNAMIC_SHARED(T, name);  ==  extern __shared__ T name[];
#pragma once

#ifndef LTK_CUDA_EMU
#define LTK_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<grid, block, smem, stream>>>
#define LTK_SHARED(T, name, n) __shared__ T name[n]
#define LTK_DYNAMIC_SHARED(T, name) extern __shared__ T name[]
#endif
