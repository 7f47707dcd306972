#!/usr/bin/env bash
# Sets up ltkernels from nothing (idempotent): a virtual environment in .venv with the pinned development torch,
# the build tools, and this package built from source (C++ kernels always, CUDA kernels when nvcc and a CUDA build
# of torch are present; their CPU emulation when Boost.Context is installed). Re-running it rebuilds only what
# changed.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
python="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$python" -m venv .venv
. .venv/bin/activate
pip_q() { pip install -q --disable-pip-version-check "$@"; }
# The pair below is what development and CI pin (torch's CUDA build; the kernels compile against it).
python -c "import torch, torchvision" 2>/dev/null || pip_q torch==2.14.1 torchvision==0.29.1
pip_q "scikit-build-core>=0.10" "pybind11>=2.12" ninja "cmake>=3.24"
# The CPU emulation of the CUDA kernels (their tests without a GPU) is built where Boost.Context is installed.
if [ -z "${LTK_CUDA_EMU:-}" ] && [ -f /usr/include/boost/context/fiber.hpp ]; then export LTK_CUDA_EMU=ON; fi
pip_q --no-build-isolation -e ".[test]"
python -c "import ltkernels; print('ltkernels', ltkernels.__version__, ltkernels.build_info())"
