"""Loads the compiled library (which registers torch.ops.ltkernels.*) and checks it matches the installed torch."""
from __future__ import annotations

import importlib
import importlib.util
import os

import torch


class LibraryMismatchError(ImportError):
    """The compiled ltkernels library cannot be used with the installed torch."""


_REBUILD_HINT = ("Rebuild it against this torch from the ltkernels source tree: "
                 "`pip install --no-build-isolation --force-reinstall --no-deps <path to the ltkernels source>` "
                 "(the build tools first: `pip install scikit-build-core pybind11 cmake ninja`).")


def _source_tree_hint() -> str:
    """Said when the import found the source folder (run from the repository root without an editable install)."""
    here = os.path.dirname(os.path.abspath(__file__))
    if os.path.isdir(os.path.join(os.path.dirname(here), "csrc")):
        return (f" Python imported ltkernels from its source tree ({here}), which holds no compiled library: "
                "run from another folder, or install it with `pip install --no-build-isolation -e .`.")
    return ""


def _load():
    override = os.environ.get("LTKERNELS_LIBRARY")  # a developer's own build, e.g. build/dev-nms/_C*.so
    try:
        if override:
            spec = importlib.util.spec_from_file_location("ltkernels._C", override)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module
        return importlib.import_module("ltkernels._C")
    except ImportError as err:
        if "undefined symbol" in str(err):
            raise LibraryMismatchError(
                f"ltkernels' compiled library does not match torch {torch.__version__} ({err}). {_REBUILD_HINT}"
            ) from err
        raise ImportError(
            f"ltkernels' compiled library could not be loaded ({err}). Install the package with "
            "`pip install --no-build-isolation .` so the C++/CUDA kernels are built." + _source_tree_hint()
        ) from err


_C = _load()
_BUILD = _C.build_info()


def _major_minor(version: str) -> tuple[int, int]:
    major, minor = version.split("+")[0].split(".")[:2]
    return int(major), int(minor)


def check_torch_matches(built: str, installed: str) -> None:
    """C++ ABI of torch changes between minor releases: a library built for another one must not be loaded."""
    if _major_minor(built) != _major_minor(installed):
        raise LibraryMismatchError(
            f"ltkernels was built against torch {built} but torch {installed} is installed. " + _REBUILD_HINT)


check_torch_matches(_BUILD["torch_version"], torch.__version__)


def build_info() -> dict:
    """Version, the torch it was built against, whether the CUDA kernels are in, and their architectures."""
    return dict(_BUILD)


def has_cuda_kernels() -> bool:
    return bool(_BUILD["cuda"])


def release_cpu_buffers() -> int:
    """Free the CPU gradients that the losses keep for reuse between training steps (one per loss, the size in use;
    a step's gradient above 32 MiB reuses the previous one's memory once nothing references it, which saves its page
    faults). For a process that has trained and goes on to other work; the next step allocates afresh. Returns the
    bytes released (0 for those still in use by a tensor, which free with it)."""
    return int(_C.release_cpu_buffers())


def has_op(name: str) -> bool:
    """Whether the loaded library defines torch.ops.ltkernels.<name> (a developer build may hold only some ops)."""
    return bool(torch._C._jit_get_schemas_for_operator(f"ltkernels::{name}"))
