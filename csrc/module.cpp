// The one TORCH_LIBRARY of the `ltkernels` namespace (each op adds its schema with a TORCH_LIBRARY_FRAGMENT in
// csrc/<op>.cpp) and the pybind11 module that carries the build information.
#include <pybind11/pybind11.h>
#include <torch/library.h>
#include <torch/version.h>

#include <string>

#include "cpu/output_slot.h"

#ifdef LTK_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

#ifndef LTK_VERSION
#define LTK_VERSION "0.0.0"
#endif

TORCH_LIBRARY(ltkernels, m) {}

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
  info["version"] = LTK_VERSION;
  info["torch_version"] = TORCH_VERSION;
#ifdef LTK_WITH_CUDA
  info["cuda"] = true;
  info["cuda_version"] = std::to_string(CUDART_VERSION / 1000) + "." + std::to_string((CUDART_VERSION % 1000) / 10);
  info["cuda_architectures"] = LTK_CUDA_ARCHS;
#else
  info["cuda"] = false;
  info["cuda_version"] = pybind11::none();
  info["cuda_architectures"] = "";
#endif
  info["cxx11_abi"] = static_cast<bool>(_GLIBCXX_USE_CXX11_ABI);
#ifdef _OPENMP
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "ltkernels compiled ops (registered as torch.ops.ltkernels.*)";
  m.def("build_info", &build_info, "How this library was built: versions, CUDA on/off, architectures.");
  m.def("release_cpu_buffers", &ltk::cpu::release_output_slots,
        "Frees the CPU gradients the losses keep for reuse (csrc/cpu/output_slot.h); returns their bytes.");
}
