"""Shared benchmark harness: every benchmark records its op, implementation, size, dtype, device and the bytes it
must move, so `ltk bench` can put ours beside each peer measured in the same run (ratio, GB/s, % of copy bandwidth).

Usage in bench/test_bench_<op>.py:
    def test_roi_align_fwd(run_bench, device):
        run_bench(lambda: ltkernels.roi_align(x, boxes, 7), op="roi_align", impl="ltkernels", size="512x256x7x7",
                  dtype="float32", device=device, pass_="fwd", bytes_moved=...)

Environment (set by `ltk bench`, see ltkernels/models/benchmarking/cli.py and bench/NOTES.md):
    LTK_BENCH_DEVICES=cpu|cuda|cpu,cuda   which devices the `device` parameter takes (default: all visible)
    LTK_BENCH_QUICK=1                     `ltk bench --quick` (CI smoke run): bench files MAY shrink their sizes;
                                          read it with `ltkernels.models.benchmarking.quick_mode()`
    LTK_BENCH_CUDA_REPS=N                 CUDA-event repetitions per benchmark (default: about 0.3 s worth, 10..200,
                                          3 for calls over 30 ms; 5 in quick mode)
    LTK_BENCH_FLUSH_L2=0                  do not flush the L2 cache between CUDA-event repetitions (default: flush)

Timing: pytest-benchmark times wall-clock rounds of `fn(); synchronize`. On CUDA, run_bench then also times `fn`
with CUDA events over N repetitions after warm-up, writing a buffer larger than L2 before each one, and records the
median as extra_info["cuda_event_median_ms"], which `ltk bench` reports in preference to the wall-clock median.
"""
import os
import statistics
from pathlib import Path

import pytest
import torch

from ltkernels.models.benchmarking.harness import (
    bench_devices,
    cuda_event_times,
    device_name,
    environment_info,
    quick_mode,
    sync,
)
from ltkernels.testing.checkout_guard import forbid_sibling_reads

forbid_sibling_reads(Path(__file__).resolve().parents[1])


def pytest_generate_tests(metafunc):
    if "device" in metafunc.fixturenames:
        metafunc.parametrize("device", bench_devices())


def pytest_benchmark_update_machine_info(config, machine_info):
    """Versions, build information and device names go into every --benchmark-json file."""
    machine_info["ltkernels"] = environment_info()


def _cuda_reps(wall_median_s: float) -> int:
    if os.environ.get("LTK_BENCH_CUDA_REPS"):
        return max(1, int(os.environ["LTK_BENCH_CUDA_REPS"]))
    if quick_mode():
        return 5
    floor = 10 if wall_median_s < 0.03 else 3  # slow peers (per-class loops): a few repetitions are enough
    return int(min(200, max(floor, 0.3 / max(wall_median_s, 1e-6))))


@pytest.fixture
def run_bench(benchmark):
    def run(fn, *, op, impl, size, dtype, device, pass_, bytes_moved=None, rounds=None):
        device = torch.device(device)
        def call():
            out = fn()
            sync(device)
            return out
        call()  # warm-up: autotuning, torch.compile, allocator
        benchmark.group = f"{op}|{size}|{dtype}|{device.type}|{pass_}"
        benchmark.extra_info.update(op=op, impl=impl, size=size, dtype=dtype, device=device.type, pass_=pass_,
                                    bytes_moved=bytes_moved, device_name=device_name(device))
        if rounds:
            result = benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=1)
        else:
            result = benchmark(call)
        if device.type == "cuda" and not getattr(benchmark, "disabled", False):
            stats = getattr(benchmark, "stats", None)
            wall = getattr(getattr(stats, "stats", None), "median", None) or 1e-3
            reps = _cuda_reps(wall)
            flush = os.environ.get("LTK_BENCH_FLUSH_L2", "1") != "0"
            times = cuda_event_times(fn, device, reps=reps, warmup=1, flush_l2=flush)
            q1, _, q3 = statistics.quantiles(times, n=4) if len(times) > 1 else (times[0],) * 3
            benchmark.extra_info.update(cuda_event_median_ms=statistics.median(times), cuda_event_iqr_ms=q3 - q1,
                                        cuda_event_min_ms=min(times), cuda_event_reps=reps, l2_flushed=flush)
        return result
    return run
