"""Build-time metadata (a scikit-build-core dynamic-metadata provider, see pyproject.toml): the compiled library only
works with the torch minor release it was built against, so the wheel's requirements pin that release
(`torch==X.Y.*`) and pip never pairs it with another one."""
from __future__ import annotations

CORE = ["numpy"]


def _torch_version() -> str:
    try:
        import torch
    except ImportError as err:
        raise RuntimeError(
            "ltkernels must be built against the torch it will run with, but torch is not importable here "
            f"({err}). Build isolation hides the installed torch: install torch and the build tools first "
            "(`pip install torch scikit-build-core pybind11 cmake ninja`), then "
            "`pip install --no-build-isolation .`") from err
    return torch.__version__


def torch_requirement(version: str) -> str:
    major, minor = version.split("+")[0].split(".")[:2]
    return f"torch=={major}.{minor}.*"


def dynamic_metadata(field, settings=None, project=None):
    if field != "dependencies":
        raise RuntimeError(f"build_metadata provides 'dependencies' only, not {field!r}")
    return [torch_requirement(_torch_version()), *CORE]
