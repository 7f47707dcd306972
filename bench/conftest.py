"""Shared benchmark harness: every benchmark records its op, implementation, size, dtype, device and the bytes it
must move, so `ltk bench` can put ours beside each peer measured in the same run (ratio, GB/s, % of copy bandwidth).

Usage in bench/test_bench_<op>.py:
    def test_roi_align_fwd(run_bench, device):
        run_bench(lambda: ltkernels.roi_align(x, boxes, 7), op="roi_align", impl="ltkernels", size="512x256x7x7",
                  dtype="float32", device=device, pass_="fwd", bytes_moved=...)
"""
import pytest
import torch

from ltkernels.models.benchmarking import bench_devices, sync  # noqa: F401  (shared with `ltk bench`)


def pytest_generate_tests(metafunc):
    if "device" in metafunc.fixturenames:
        metafunc.parametrize("device", bench_devices())


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
                                    bytes_moved=bytes_moved)
        if rounds:
            return benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=1)
        return benchmark(call)
    return run
