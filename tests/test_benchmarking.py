"""The benchmark report (`ltk bench`): rows, ratios, GB/s and % of copy bandwidth from a pytest-benchmark JSON; the
results files and chart; the README section; and one real quick run of the copy benchmark."""
import json
import math

import pytest
import torch

from ltkernels._ext import has_op
from ltkernels.models import benchmarking as bm
from ltkernels.models.benchmarking import cli, harness, readme

MIB = 1 << 20


def _bench(op, impl, median, *, size="s", dtype="float32", device="cpu", pass_="fwd", bytes_moved=None,
           device_name="Test CPU", cuda_ms=None, iqr=None):
    extra = {"op": op, "impl": impl, "size": size, "dtype": dtype, "device": device, "pass_": pass_,
             "bytes_moved": bytes_moved, "device_name": device_name}
    if cuda_ms is not None:
        extra.update(cuda_event_median_ms=cuda_ms, cuda_event_reps=10)
    return {"name": f"test_{op}_{impl}[{device}]", "fullname": f"bench/x.py::test_{op}_{impl}[{device}]",
            "group": f"{op}|{size}|{dtype}|{device}|{pass_}", "extra_info": extra,
            "stats": {"median": median, "iqr": median / 10 if iqr is None else iqr, "rounds": 7, "min": median,
                      "max": median, "mean": median, "stddev": 0.0, "q1": median, "q3": median, "iterations": 1}}


def _synthetic():
    return [
        _bench("copy", "torch", 0.010, size="64MiB", bytes_moved=128 * MIB),  # 13.42 GB/s
        _bench("roi_align", "eager", 0.010, size="512x7x7", bytes_moved=10_000_000),
        _bench("roi_align", "ltkernels", 0.002, size="512x7x7", bytes_moved=10_000_000),  # 5 GB/s
        _bench("roi_align", "torchvision", 0.004, size="512x7x7", bytes_moved=10_000_000),
        _bench("roi_align", "ltkernels", 0.008, size="512x7x7", pass_="fwd+bwd", bytes_moved=30_000_000),
        _bench("roi_align", "compile", 0.006, size="512x7x7", pass_="fwd+bwd", bytes_moved=30_000_000),
        _bench("nms", "ltkernels", 1e-4, size="1000"),  # no bytes: no GB/s
        _bench("nms", "torchvision", 3e-4, size="1000"),
        # A CUDA group: the CUDA-event median wins over the wall-clock one; no copy on CUDA, so no % of bandwidth.
        _bench("roi_align", "ltkernels", 0.5, size="512x7x7", device="cuda", bytes_moved=10_000_000,
               device_name="Test GPU", cuda_ms=0.01),
        _bench("roi_align", "torchvision", 0.5, size="512x7x7", device="cuda", bytes_moved=10_000_000,
               device_name="Test GPU", cuda_ms=0.03),
        {"name": "test_unrelated", "group": None, "extra_info": {}, "stats": {"median": 1.0}},  # not ours: ignored
    ]


def _row(rows, op, device="cpu", pass_="fwd"):
    (row,) = [r for r in rows if r["op"] == op and r["device"] == device and r["pass"] == pass_]
    return row


def test_rows_ratios_bandwidth():
    rows = bm.build_rows(_synthetic())
    assert [(r["device"], r["op"], r["pass"]) for r in rows] == [
        ("cpu", "copy", "fwd"), ("cpu", "roi_align", "fwd"), ("cpu", "roi_align", "fwd+bwd"), ("cpu", "nms", "fwd"),
        ("cuda", "roi_align", "fwd")]
    copy_gbps = 128 * MIB / 0.010 / 1e9
    copy = _row(rows, "copy")
    assert copy["impl"] == "torch" and math.isclose(copy["gbps"], copy_gbps) and math.isclose(copy["pct_copy_bw"], 100)

    fwd = _row(rows, "roi_align")
    assert fwd["impl"] == "ltkernels" and fwd["ours"]["seconds"] == 0.002
    assert list(fwd["peers"]) == ["torchvision", "eager"]  # the fixed peer order, not the file's
    assert math.isclose(fwd["peers"]["torchvision"]["speedup"], 2.0)
    assert math.isclose(fwd["peers"]["eager"]["speedup"], 5.0)
    assert math.isclose(fwd["gbps"], 5.0)
    assert math.isclose(fwd["pct_copy_bw"], 100 * 5.0 / copy_gbps)

    bwd = _row(rows, "roi_align", pass_="fwd+bwd")
    assert math.isclose(bwd["peers"]["compile"]["speedup"], 0.75)  # slower than the compiled reference: below 1
    assert math.isclose(bwd["gbps"], 30_000_000 / 0.008 / 1e9)

    nms = _row(rows, "nms")
    assert nms["gbps"] is None and nms["pct_copy_bw"] is None
    assert math.isclose(nms["peers"]["torchvision"]["speedup"], 3)

    cuda = _row(rows, "roi_align", device="cuda")
    assert cuda["ours"]["timer"] == "cuda-events" and math.isclose(cuda["ours"]["seconds"], 1e-5)
    assert math.isclose(cuda["peers"]["torchvision"]["speedup"], 3.0)
    assert math.isclose(cuda["gbps"], 1000.0) and cuda["pct_copy_bw"] is None  # no copy measured on cuda


def test_table_formatting():
    rows = bm.build_rows(_synthetic())
    table = bm.render_table([r for r in rows if r["device"] == "cpu"])
    lines = table.splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == ["op", "size", "dtype", "pass", "ours", "IQR", "torchvision", "eager", "compile", "GB/s",
                      "% copy BW"]
    assert len({len(line) for line in lines}) == 1  # aligned columns
    roi = [c.strip() for c in lines[3].strip("|").split("|")]
    assert roi[:6] == ["roi_align", "512x7x7", "float32", "fwd", "2 ms", "±10%"]
    assert roi[6:] == ["4 ms (2×)", "10 ms (5×)", "", "5", f"{100 * 5 / (128 * MIB / 0.01 / 1e9):.0f}%"]
    assert bm.fmt_time(1.5e-6) == "1.5 µs" and bm.fmt_time(0.25) == "250 ms" and bm.fmt_time(2.0) == "2 s"
    assert bm.fmt_ratio(None) == "—" and bm.fmt_ratio(12.345) == "12.3×"
    assert readme._short_device("Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz") == "Intel Xeon Platinum 8481C CPU"
    assert readme._short_device("AMD EPYC 7B13 64-Core Processor") == "AMD EPYC 7B13"


def test_write_results_files(tmp_path):
    env = {"torch": "2.x", "torch_cuda": None, "ltkernels": "0.1.0", "threads": 2, "build_info": {"cuda": False}}
    written = bm.write_results(_synthetic(), tmp_path, command="ltk bench", environment=env,
                               date="2026-11-23T10:00:00Z")
    names = sorted(p.name for p in written)
    assert names == sorted(["test-cpu-2026-11-23.json", "test-cpu-2026-11-23.md", "test-cpu-2026-11-23.png",
                            "test-gpu-2026-11-23.json", "test-gpu-2026-11-23.md", "test-gpu-2026-11-23.png"])
    data = json.loads((tmp_path / "test-cpu-2026-11-23.json").read_text())
    assert data["schema"] == bm.SCHEMA and data["device_name"] == "Test CPU" and data["device"] == "cpu"
    assert data["date"] == "2026-11-23T10:00:00Z" and data["environment"]["torch"] == "2.x"
    assert math.isclose(data["copy_gbps"], 128 * MIB / 0.01 / 1e9)
    assert {b["extra_info"]["device"] for b in data["benchmarks"]} == {"cpu"} and len(data["benchmarks"]) == 8
    assert data["benchmarks"][0]["stats"]["rounds"] == 7 and "iqr" in data["benchmarks"][0]["stats"]
    assert len(data["rows"]) == 4
    md = (tmp_path / "test-cpu-2026-11-23.md").read_text()
    assert "# ltkernels benchmarks: Test CPU" in md and "| roi_align" in md and "ltk bench" in md
    png = (tmp_path / "test-gpu-2026-11-23.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000

    quick = bm.write_results(_synthetic()[:1], tmp_path, command="ltk bench --quick", environment=env, quick=True,
                             date="2026-11-24T10:00:00Z")
    assert [p.name for p in quick] == ["test-cpu-2026-11-24-quick.json", "test-cpu-2026-11-24-quick.md"]  # no peers


def test_readme_section(tmp_path):
    results = tmp_path / "bench" / "results"
    env = {"torch": "2.x", "threads": 2}
    bm.write_results(_synthetic(), results, command="ltk bench", environment=env, date="2026-11-20T10:00:00Z",
                     chart=False)
    newer = [b for b in _synthetic() if b["extra_info"].get("device") == "cpu"]
    newer[2]["stats"]["median"] = 0.001  # ltkernels roi_align fwd twice as fast in the newer file
    bm.write_results(newer, results, command="ltk bench", environment=env, date="2026-11-22T10:00:00Z", chart=False)
    bm.write_results(newer, results, command="ltk bench --quick", environment=env, date="2026-11-23T10:00:00Z",
                     quick=True, chart=False)

    section = bm.render_readme_table(results, relative_to=tmp_path)
    roi_rows = [line for line in section.splitlines() if line.startswith("| Test") and "roi_align" in line]
    assert len(roi_rows) == 3  # newest CPU file (fwd, fwd+bwd) and the GPU file: each names its device
    cpu_fwd = [c.strip() for c in roi_rows[1].strip("|").split("|")]
    assert cpu_fwd[0] == "Test CPU"
    assert cpu_fwd[5] == "1 ms" and "4×" in cpu_fwd  # the 2026-11-22 file, not the older or the quick one
    assert "(bench/results/test-cpu-2026-11-22.json)" in section
    assert "test-cpu-2026-11-23-quick" not in section
    assert any("Test GPU" in line for line in roi_rows)

    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\nintro\n\n{bm.README_START}\nold table\n{bm.README_END}\n\nafter\n")
    assert bm.update_readme(readme, results)
    text = readme.read_text()
    assert "old table" not in text and text.startswith("# x\n\nintro\n\n") and text.endswith("\n\nafter\n")
    assert text.count(bm.README_START) == 1 and "roi_align" in text
    assert bm.update_readme(readme, results) and readme.read_text() == text  # idempotent

    plain = tmp_path / "PLAIN.md"
    plain.write_text("no markers\n")
    assert not bm.update_readme(plain, results) and plain.read_text() == "no markers\n"
    assert "No benchmark results" in bm.render_readme_table(tmp_path / "empty")


def test_readme_cli_prints_without_markers(tmp_path, capsys):
    (tmp_path / "README.md").write_text("no markers\n")
    assert bm.main(["readme", "--results", str(tmp_path), "--readme", str(tmp_path / "README.md")]) == 0
    assert "No benchmark results" in capsys.readouterr().out


def test_from_json(tmp_path, capsys):
    raw = tmp_path / "raw.json"
    raw.write_text(json.dumps({"machine_info": {"ltkernels": {"torch": "9.9"}}, "benchmarks": _synthetic()}))
    assert bm.main(["--from-json", str(raw), "--out", str(tmp_path / "out"), "--no-chart"]) == 0
    out = capsys.readouterr().out
    assert "cpu:" in out and "cuda:" in out and "4 ms (2×)" in out
    (gpu,) = (tmp_path / "out").glob("test-gpu-*.json")
    data = json.loads(gpu.read_text())
    assert data["environment"]["torch"] == "9.9" and data["rows"][0]["ours"]["timer"] == "cuda-events"


def _bench_checkout(tmp_path, root, *extra_files):
    """A checkout holding the real bench/conftest.py and bench/test_bench_copy.py only, so the run does not depend
    on the other bench files (which the bench suite itself exercises)."""
    fake = tmp_path / "repo"
    (fake / "bench").mkdir(parents=True)
    for name in ("conftest.py", "test_bench_copy.py"):
        (fake / "bench" / name).write_text((root / "bench" / name).read_text())
    for name, text in extra_files:
        (fake / "bench" / name).write_text(text)
    return fake


@pytest.mark.skipif(not bm.repo_root(), reason="needs the source checkout's bench/ folder")
def test_quick_copy_run(tmp_path, monkeypatch, capsys):
    pytest.importorskip("pytest_benchmark")
    fake = _bench_checkout(tmp_path, bm.repo_root())
    monkeypatch.setattr(cli, "repo_root", lambda: fake)  # where main() looks it up
    assert bm.main(["--quick", "-k", "copy", "--device", "cpu", "--out", str(tmp_path / "out")]) == 0
    (path,) = (tmp_path / "out").glob("*-quick.json")
    data = json.loads(path.read_text())
    (row,) = data["rows"]
    assert row["op"] == "copy" and row["device"] == "cpu" and row["gbps"] > 0
    assert math.isclose(row["pct_copy_bw"], 100.0)
    assert data["quick"] and data["environment"]["torch"] and data["benchmarks"][0]["stats"]["rounds"] >= 3
    assert data["benchmarks"][0]["extra_info"]["bytes_moved"] == 2 * (32 << 20)  # quick: a quarter of 128 MiB
    assert path.with_suffix(".md").is_file() and not path.with_suffix(".png").exists()  # no peers: no chart
    assert "| copy" in capsys.readouterr().out


@pytest.mark.slow
def test_budget_run_survives_a_broken_bench_file(tmp_path, monkeypatch, capsys):
    """--budget runs each bench file in its own pytest process: a file that fails leaves the others' figures."""
    pytest.importorskip("pytest_benchmark")
    root = bm.repo_root()
    if root is None:
        pytest.skip("needs the source checkout's bench/ folder")
    fake = _bench_checkout(tmp_path, root, ("test_bench_broken.py", "raise ImportError('a broken bench file')\n"))
    monkeypatch.setattr(cli, "repo_root", lambda: fake)  # where main() looks it up
    out = tmp_path / "out"
    assert bm.main(["--quick", "--device", "cpu", "--budget", "120", "--out", str(out), "--no-chart"]) == 1
    (path,) = out.glob("*-quick.json")
    data = json.loads(path.read_text())
    assert [r["op"] for r in data["rows"]] == ["copy"]
    assert any("test_bench_broken.py" in note and "exit code" in note for note in data["incomplete"])
    assert "Not measured" in path.with_suffix(".md").read_text()


_PID_BENCH = """
import os
import pytest
import torch


@pytest.mark.parametrize("impl", ["ltkernels", "peer"])
def test_pid(run_bench, device, impl):
    run_bench(lambda: None, op="pid", impl=impl, size=str(os.getpid()), dtype="float32", device=device, pass_="fwd",
              bytes_moved=1)
"""


@pytest.mark.skipif(not bm.repo_root(), reason="needs the source checkout's bench/ folder")
@pytest.mark.parametrize("isolation,processes", [("benchmark", 2), ("none", 1)])
def test_isolation_runs_each_benchmark_in_a_process_of_its_own(tmp_path, monkeypatch, isolation, processes):
    """By default every benchmark gets a fresh process: its figure cannot depend on what ran before it."""
    pytest.importorskip("pytest_benchmark")
    fake = _bench_checkout(tmp_path, bm.repo_root(), ("test_bench_pid.py", _PID_BENCH))
    monkeypatch.setattr(cli, "repo_root", lambda: fake)
    out = tmp_path / "out"
    assert bm.main(["-k", "pid", "--device", "cpu", "--isolation", isolation, "--out", str(out), "--no-chart",
                    "--benchmark-max-time=0.01", "--benchmark-min-rounds=1", "--benchmark-warmup=off"]) == 0
    (path,) = out.glob("*.json")
    pids = {b["extra_info"]["size"] for b in json.loads(path.read_text())["benchmarks"]
            if b["extra_info"]["op"] == "pid"}
    assert len(pids) == processes


def test_cuda_event_times_control_flow(monkeypatch):
    """The CUDA-event timer's logic with torch.cuda stood in for (no GPU here): warm-up calls, one flush write
    before each repetition, an event pair around each call, one synchronise after all of them."""
    import contextlib

    import torch

    log = []

    class FakeEvent:
        clock = 0.0

        def __init__(self, enable_timing):
            assert enable_timing
            self.t = None

        def record(self):
            FakeEvent.clock += 1.0
            self.t = FakeEvent.clock
            log.append("record")

        def elapsed_time(self, end):
            return end.t - self.t

    class FakeFlush:
        def fill_(self, value):
            log.append("flush")

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: log.append("sync"))
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(harness, "_l2_flush_buffer", lambda device: FakeFlush())

    def fn():
        FakeEvent.clock += 2.0  # the timed work
        log.append("fn")

    times = bm.cuda_event_times(fn, "cuda", reps=3, warmup=2)
    assert times == [3.0, 3.0, 3.0]
    assert log == ["fn", "fn", "sync"] + ["flush", "record", "fn", "record"] * 3 + ["sync"]
    log.clear()
    assert bm.cuda_event_times(fn, "cuda", reps=2, warmup=0, flush_l2=False) == [3.0, 3.0]
    assert "flush" not in log


def test_mixed_timers_fall_back_to_wall_clock():
    rows = bm.build_rows([
        _bench("nms", "ltkernels", 0.002, device="cuda", cuda_ms=0.5),
        _bench("nms", "torchvision", 0.004, device="cuda"),  # no CUDA-event figure: compare wall with wall
    ])
    peer = rows[0]["peers"]["torchvision"]
    assert math.isclose(peer["speedup"], 2.0) and peer["speedup_timer"] == "wall"


@pytest.mark.skipif(not has_op("_math_floor"), reason="_math_floor not built")
def test_math_floor_evaluates_the_formula():
    """The benchmarks' compute floor evaluates what it claims: sums over its block (x = -8 j / 4096, u = j / 4096)
    against float64, for one block and for several (the sum is over whole blocks)."""
    j = torch.arange(4096, dtype=torch.float64)
    u = j / 4096
    x = -8 * u
    e = torch.exp(-x.abs())
    lp = torch.log1p(e)
    efl = (torch.exp(-2.0 * (x.clamp(min=0) + lp)) * lp + 1 / (1 + e)).sum()
    want = {"exp": torch.exp(x).sum(), "log1p": torch.log1p(u).sum(), "efl": efl}
    for formula, total in want.items():
        got = torch.ops.ltkernels._math_floor(4096, formula)
        assert got == pytest.approx(float(total), rel=1e-5), formula
        assert torch.ops.ltkernels._math_floor(3 * 4096, formula) == pytest.approx(3 * float(total), rel=1e-5)
    with pytest.raises(ValueError, match="formula must be"):
        torch.ops.ltkernels._math_floor(10, "sin")
    with pytest.raises(ValueError, match="n must be"):
        torch.ops.ltkernels._math_floor(-1, "exp")
