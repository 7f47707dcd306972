"""What bench/conftest.py needs on the device being measured: which devices to run, quick mode, synchronising, the
device's name, CUDA-event timing with the L2 cache flushed, and the environment a figure must be cited with.

Imported by bench/conftest.py (through the package), so this module and the package's import chain must stay
importable without matplotlib or pytest-benchmark.
"""
from __future__ import annotations

import os
import platform

import torch


def bench_devices() -> list[str]:
    """CPU always; CUDA where visible. LTK_BENCH_DEVICES=cpu (or cuda) restricts the list."""
    wanted = os.environ.get("LTK_BENCH_DEVICES")
    found = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return [d for d in found if not wanted or d in wanted.split(",")]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def quick_mode() -> bool:
    """True under `ltk bench --quick` (LTK_BENCH_QUICK=1): bench files may shrink their sizes."""
    return os.environ.get("LTK_BENCH_QUICK", "") not in ("", "0")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_name(device="cpu") -> str:
    """Human-readable name of the device the figures belong to: the GPU's name, or the CPU model."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model()


_L2_FLUSH: dict = {}


def _l2_flush_buffer(device: torch.device) -> torch.Tensor:
    """A buffer larger than the L2 cache (at least 256 MiB); writing it evicts the previous repetition's data."""
    key = torch.cuda.current_device() if device.index is None else device.index
    if key not in _L2_FLUSH:
        l2 = getattr(torch.cuda.get_device_properties(key), "L2_cache_size", 0) or 0
        nbytes = max(256 << 20, 4 * int(l2))
        _L2_FLUSH[key] = torch.empty(nbytes // 4, dtype=torch.int32, device=torch.device("cuda", key))
    return _L2_FLUSH[key]


def cuda_event_times(fn, device, reps: int, warmup: int = 2, flush_l2: bool = True) -> list[float]:
    """Times `fn()` `reps` times on the current CUDA stream with CUDA events, in milliseconds.

    Before each repetition the L2 cache is flushed by writing a buffer several times its size (outside the events),
    so inputs do not stay hot between repetitions. One synchronisation at the end; `fn` must not depend on it.
    """
    device = torch.device(device)
    with torch.cuda.device(device):
        for _ in range(warmup):
            fn()
        flush = _l2_flush_buffer(device) if flush_l2 else None
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        torch.cuda.synchronize(device)
        for i in range(reps):
            if flush is not None:
                flush.fill_(i)
            starts[i].record()
            fn()
            ends[i].record()
        torch.cuda.synchronize(device)
        return [s.elapsed_time(e) for s, e in zip(starts, ends)]


def _version(module: str) -> str | None:
    try:
        mod = __import__(module)
        return str(getattr(mod, "__version__", "unknown"))
    except Exception:  # noqa: BLE001  (a missing or broken optional package is just "absent")
        return None


def environment_info() -> dict:
    """Versions, build information, threads and device names: what a figure needs to be cited."""
    info = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "torchvision": _version("torchvision"),
        "triton": _version("triton"),
        "pytest_benchmark": _version("pytest_benchmark"),
        "threads": torch.get_num_threads(),
        "cpu": cpu_model(),
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available() else [],
    }
    try:
        import ltkernels

        info["ltkernels"] = ltkernels.__version__
        info["build_info"] = ltkernels.build_info()
    except Exception as err:  # noqa: BLE001
        info["ltkernels"] = None
        info["build_info"] = {"error": str(err)}
    return info
