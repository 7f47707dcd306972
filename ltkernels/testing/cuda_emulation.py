"""Run ltkernels' CUDA kernels on a machine without a GPU: the exact `csrc/cuda/*.cu` sources compiled as C++ under
an emulation of the CUDA execution model (blocks on OS threads, their CUDA threads as fibers that switch at every
barrier, warp vote and shuffle; see the README's "CUDA emulation").

    with cuda_emulation(order="reverse"):
        keep = ltkernels.nms(boxes, scores, 0.5)      # CPU tensors standing for CUDA tensors

Inside the context every call of a `torch.ops.ltkernels.*` op that has a CUDA kernel goes to that kernel's emulated
build (`torch.ops.ltkernels_emu.*`), below autograd, so the public functions, their autograd formulas and module
buffers run unchanged. The emulated library exists in builds made with `LTK_CUDA_EMU=ON` (`tools/setup.sh` turns it
on where Boost.Context is installed); `available()` says whether this one has it.
"""
from __future__ import annotations

import glob
import importlib
import importlib.util
import os

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ORDERS = ("forward", "reverse", "random")

_lib = None


def _load():
    global _lib
    if _lib is None:
        import ltkernels  # noqa: F401  (the schemas' torch dependencies and the version check come first)
        override = os.environ.get("LTKERNELS_LIBRARY")  # a developer's build: its emulated library lies beside it
        try:
            if override:
                found = glob.glob(os.path.join(os.path.dirname(override), "_C_emu*.so"))
                if not found:
                    raise ImportError(f"no _C_emu library beside {override}")
                spec = importlib.util.spec_from_file_location("ltkernels._C_emu", found[0])
                _lib = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(_lib)
            else:
                _lib = importlib.import_module("ltkernels._C_emu")
        except ImportError:
            _lib = False
    return _lib or None


def available() -> bool:
    """Whether this build of ltkernels holds the emulated CUDA kernels."""
    return _load() is not None


def _require():
    lib = _load()
    if lib is None:
        raise RuntimeError("this build of ltkernels has no CUDA emulation: rebuild with LTK_CUDA_EMU=ON "
                           "(needs Boost.Context, e.g. `apt-get install libboost-context-dev`)")
    return lib


def stats() -> dict:
    """Counters since the emulated library was loaded: kernel launches, blocks, CUDA threads, sync rounds."""
    return dict(_require().stats())


def _emulated_overload(func):
    """The emulated twin of `func` (an `ltkernels::` OpOverload), or None when it has no CUDA kernel."""
    name = f"ltkernels_emu::{func._opname}"
    if not (torch._C._jit_get_schemas_for_operator(name)
            and torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU")):
        return None  # an op of Python's (e.g. the statistics update) or one without a CUDA kernel
    return getattr(getattr(torch.ops.ltkernels_emu, func._opname), func._overloadname)


class cuda_emulation(TorchDispatchMode):
    """Sends ltkernels' ops to their emulated CUDA kernels while active.

    order: how a block's threads are interleaved between two sync points (and the blocks taken): "forward",
    "reverse" or "random" (seeded by `seed`). A race between threads of a block that a missing barrier leaves shows
    up in at least one order. sms: the emulated device's multiprocessor count, by which some kernels size their
    grids."""

    def __init__(self, order: str = "forward", seed: int = 0, sms: int = 2):
        super().__init__()
        if order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
        if not (isinstance(sms, int) and 1 <= sms <= 1024):
            raise ValueError(f"sms must be an int in 1..1024, got {sms!r}")
        self.order, self.seed, self.sms = order, int(seed), sms
        self._saved = None

    def __enter__(self):
        lib = _require()
        self._saved = dict(lib.config())
        lib.configure(self.order, self.seed, self.sms)
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            _require().configure(**self._saved)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "ltkernels":
            twin = _emulated_overload(func)
            if twin is not None:
                return twin(*args, **kwargs)
        return func(*args, **kwargs)
