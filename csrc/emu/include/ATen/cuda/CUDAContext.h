// Stand-in for ATen's CUDA context under the CUDA emulation (csrc/emu/cuda_emu.h): one emulated device whose
// properties the scheduler's configuration sets (the SM count changes how kernels size their grids).
#pragma once

#include <c10/cuda/CUDAException.h>

namespace ltk_emu {
struct DeviceProp {
  char name[256];
  int multiProcessorCount;
  int maxThreadsPerBlock;
  int warpSize;
  size_t sharedMemPerBlock;
  int major, minor;
};
DeviceProp* device_properties();
struct Stream {
  cudaStream_t stream() const { return nullptr; }
  operator cudaStream_t() const { return nullptr; }
};
}  // namespace ltk_emu

using cudaDeviceProp = ltk_emu::DeviceProp;

namespace at::cuda {
inline ltk_emu::Stream getCurrentCUDAStream(int = -1) { return {}; }
inline cudaDeviceProp* getCurrentDeviceProperties() { return ltk_emu::device_properties(); }
}  // namespace at::cuda
