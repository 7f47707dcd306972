"""Test facilities of ltkernels: the CPU emulation of its CUDA kernels (`cuda_emulation`)."""
