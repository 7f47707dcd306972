"""Prints what CMakeLists.txt needs to know about the installed torch, one KEY=VALUE per line (lists joined by commas).

Asking torch directly avoids its CMake package config, which on cudart-only toolkits wants files that are absent.
"""
import glob
import os

import torch
from torch.utils import cpp_extension

lib_dir = os.path.join(os.path.dirname(torch.__file__), "lib")
# The OpenMP runtime torch was linked with (bundled in torch/lib or torch.libs); our at::parallel_for must share it.
omp = sorted(glob.glob(os.path.join(lib_dir, "libgomp*.so*")) +
             glob.glob(os.path.join(os.path.dirname(torch.__file__), os.pardir, "torch.libs", "libgomp*.so*")))
nvidia_root = os.path.join(os.path.dirname(torch.__file__), os.pardir, "nvidia")
nvidia_includes = sorted(p for p in glob.glob(os.path.join(nvidia_root, "**", "include"), recursive=True))

print(f"TORCH_VERSION={torch.__version__}")
print(f"TORCH_CUDA_VERSION={torch.version.cuda}")
print(f"TORCH_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}")
print(f"TORCH_LIB_DIR={lib_dir}")
print(f"TORCH_INCLUDE_DIRS={','.join(cpp_extension.include_paths())}")
print(f"TORCH_OPENMP_LIB={os.path.realpath(omp[0]) if omp else ''}")
print(f"TORCH_NVIDIA_INCLUDE_DIRS={','.join(os.path.realpath(p) for p in nvidia_includes)}")
