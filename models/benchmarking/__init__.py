"""`ltk bench`: runs the pytest-benchmark suite in `bench/` and turns its results into one table, a results file per
device (JSON + Markdown + PNG chart) under `bench/results/`, and the README's benchmark section.

How figures are measured is in bench/NOTES.md. In short: the time of an implementation is the median over rounds
(on CUDA the median of CUDA-event timings with the L2 flushed before each repetition, when recorded); the speed-up
against a peer is peer median / ltkernels median, both measured in the same run on the same device; GB/s is the
bytes the op must move (each input read once, each output written once) over our median; "% of copy BW" compares
that with a large `tensor.copy_` (bytes read + written) measured in the same run on the same device.

The modules, in the order the data flows through them:
    harness   devices, quick mode, sync, device names, CUDA-event timing, environment info (for bench/conftest.py)
    rows      pytest-benchmark JSON -> one row per (op, size, dtype, device, pass) with speed-ups and bandwidth
    report    the run's table, the per-device Markdown page and the PNG chart
    results   the results files under bench/results/, written per device and read back
    readme    the README section built from the newest results file of each device
    cli       `ltk bench` / `python -m ltkernels.models.benchmarking`: runs pytest, then all of the above

bench/conftest.py imports this package, so nothing here may import matplotlib or pytest-benchmark at import time.
"""
from .cli import main, repo_root
from .harness import bench_devices, cpu_model, cuda_event_times, device_name, environment_info, quick_mode, sync
from .readme import README_END, README_START, render_readme_table, update_readme
from .report import fmt_ratio, fmt_time, render_chart, render_markdown, render_table
from .results import SCHEMA, load_results, write_results
from .rows import OURS, build_rows, copy_bandwidth, load_benchmarks

__all__ = [
    "OURS", "README_END", "README_START", "SCHEMA", "bench_devices", "build_rows", "copy_bandwidth", "cpu_model",
    "cuda_event_times", "device_name", "environment_info", "fmt_ratio", "fmt_time", "load_benchmarks", "load_results",
    "main", "quick_mode", "render_chart", "render_markdown", "render_readme_table", "render_table", "repo_root", "sync",
    "update_readme", "write_results",
]
