"""`ltk bench`: runs the pytest-benchmark suite in `bench/` and turns its results into one table, a results file per
device (JSON + Markdown + PNG chart) under `bench/results/`, and the README's benchmark section.

    ltk bench                          # every op on the current device (CUDA if visible, else CPU)
    ltk bench --quick                  # CI smoke: few rounds, small sizes (LTK_BENCH_QUICK=1), written to build/
    ltk bench --device all -k nms      # CPU and CUDA, only benchmarks matching `nms` (plus the copy reference)
    ltk bench --from-json run.json     # only build the report from an existing `--benchmark-json` file
    ltk bench readme                   # rewrite README.md between <!-- bench:start --> and <!-- bench:end -->
    python -m ltkernels.models.benchmarking ...   # the same without the `ltk` entry point

How figures are measured is in bench/NOTES.md. In short: the time of an implementation is the median over rounds
(on CUDA the median of CUDA-event timings with the L2 flushed before each repetition, when recorded); the speed-up
against a peer is peer median / ltkernels median, both measured in the same run on the same device; GB/s is the
bytes the op must move (each input read once, each output written once) over our median; "% of copy BW" compares
that with a large `tensor.copy_` (bytes read + written) measured in the same run on the same device.

The first part of this module (`bench_devices`, `sync`, `device_name`, `cuda_event_times`, `environment_info`) is
imported by bench/conftest.py and must stay importable without matplotlib or pytest-benchmark.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

# --------------------------------------------------------------------------------------------------------------------
# Shared with bench/conftest.py
# --------------------------------------------------------------------------------------------------------------------


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


def slugify(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


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


# --------------------------------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------------------------------

OURS = "ltkernels"
PEER_ORDER = ["torchvision", "torchvision-offset", "official", "eager", "compile"]
OP_ORDER = ["copy", "roi_align", "nms", "batched_nms", "multiclass_nms", "group_softmax_loss", "group_softmax_scores",
            "equalized_focal_loss"]
PASS_ORDER = ["fwd", "fwd+bwd"]
SCHEMA = "ltkernels-bench/1"


def _bench_time(bench: dict) -> tuple[float, str]:
    """(seconds, timer) for one pytest-benchmark entry: CUDA events where recorded, else the wall-clock median."""
    extra = bench.get("extra_info") or {}
    if extra.get("cuda_event_median_ms") is not None:
        return float(extra["cuda_event_median_ms"]) / 1e3, "cuda-events"
    return float(bench["stats"]["median"]), "wall"


def load_benchmarks(paths) -> tuple[list[dict], dict]:
    """The benchmark entries of one or more pytest-benchmark JSON files (merged), and the first file's machine_info."""
    benchmarks, machine = [], {}
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        machine = machine or data.get("machine_info", {})
        benchmarks.extend(data.get("benchmarks", []))
    return benchmarks, machine


def _ordered(values, order):
    seen = list(dict.fromkeys(values))
    return sorted(seen, key=lambda v: (order.index(v) if v in order else len(order), seen.index(v)))


def build_rows(benchmarks: list[dict]) -> list[dict]:
    """One row per (op, size, dtype, device, pass): ours, every peer, speed-ups, GB/s and % of the copy bandwidth.

    Entries without the `op`/`impl` extra_info written by bench/conftest.py's `run_bench` are ignored.
    """
    groups: dict[tuple, dict] = {}
    for bench in benchmarks:
        extra = bench.get("extra_info") or {}
        if not extra.get("op") or not extra.get("impl"):
            continue
        key = (extra["op"], str(extra.get("size", "")), str(extra.get("dtype", "")), str(extra.get("device", "")),
               str(extra.get("pass_", "")))
        group = groups.setdefault(key, {"impls": {}, "bytes_moved": None})
        seconds, timer = _bench_time(bench)
        stats = bench.get("stats", {})
        if extra["impl"] in group["impls"]:
            print(f"ltk bench: duplicate {extra['impl']} in {key}; keeping the first", file=sys.stderr)
            continue
        group["impls"][extra["impl"]] = {
            "seconds": seconds, "timer": timer, "name": bench.get("name"),
            "wall_median_s": stats.get("median"), "rounds": stats.get("rounds"),
            "iqr_s": float(extra["cuda_event_iqr_ms"]) / 1e3 if timer == "cuda-events" and
            extra.get("cuda_event_iqr_ms") is not None else (stats.get("iqr") if timer == "wall" else None),
            "cuda_event_reps": extra.get("cuda_event_reps"),
        }
        if extra.get("bytes_moved") and (group["bytes_moved"] is None or extra["impl"] == OURS):
            group["bytes_moved"] = int(extra["bytes_moved"])

    rows = []
    for (op, size, dtype, device, pass_), group in groups.items():
        impls = group["impls"]
        primary = OURS if OURS in impls else (next(iter(impls)) if len(impls) == 1 else None)
        ours = impls.get(primary) if primary else None
        peers = {}
        for impl in _ordered([i for i in impls if i != primary], PEER_ORDER):
            peer = dict(impls[impl])
            peer["speedup"] = None
            if ours and ours["timer"] == peer["timer"] and ours["seconds"] > 0:
                peer["speedup"] = peer["seconds"] / ours["seconds"]
            elif ours and ours.get("wall_median_s") and peer.get("wall_median_s"):  # never divide across timers
                peer["speedup"] = peer["wall_median_s"] / ours["wall_median_s"]
                peer["speedup_timer"] = "wall"
            peers[impl] = peer
        bytes_moved = group["bytes_moved"]
        gbps = bytes_moved / ours["seconds"] / 1e9 if bytes_moved and ours and ours["seconds"] > 0 else None
        rows.append({"op": op, "size": size, "dtype": dtype, "device": device, "pass": pass_, "impl": primary,
                     "ours": ours, "peers": peers, "bytes_moved": bytes_moved, "gbps": gbps, "pct_copy_bw": None})

    copy_bw = copy_bandwidth(rows)
    for row in rows:
        if row["gbps"] and copy_bw.get(row["device"]):
            row["pct_copy_bw"] = 100.0 * row["gbps"] / copy_bw[row["device"]]

    order = {op: i for i, op in enumerate(OP_ORDER)}
    first_seen = {id(r): i for i, r in enumerate(rows)}
    size_rank: dict[tuple, int] = {}
    for r in rows:
        size_rank.setdefault((r["device"], r["op"], r["size"]), len(size_rank))
    rows.sort(key=lambda r: (r["device"], order.get(r["op"], len(order)), r["op"],
                             size_rank[(r["device"], r["op"], r["size"])], r["dtype"],
                             PASS_ORDER.index(r["pass"]) if r["pass"] in PASS_ORDER else 9, first_seen[id(r)]))
    return rows


def copy_bandwidth(rows: list[dict]) -> dict[str, float]:
    """The copy bandwidth of each device: the best copy measured on it in these rows (GB/s, read + written)."""
    out: dict[str, float] = {}
    for row in rows:
        if row["op"] == "copy" and row["gbps"]:
            out[row["device"]] = max(out.get(row["device"], 0.0), row["gbps"])
    return out


def fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if seconds >= scale:
            break
    value = seconds / scale
    return f"{value:.0f} {unit}" if value >= 100 else f"{value:.3g} {unit}"


def fmt_ratio(ratio: float | None) -> str:
    if ratio is None:
        return "—"
    return f"{ratio:.3g}×" if ratio < 100 else f"{ratio:.0f}×"


def _fmt_num(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}g}" if value < 10 ** (digits - 1) else f"{value:.0f}"


def peers_in(rows: list[dict]) -> list[str]:
    return _ordered([p for r in rows for p in r["peers"]], PEER_ORDER)


def _table(header: list[str], body: list[list[str]], align_right_from: int) -> str:
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(header)]

    def line(cells):
        return "| " + " | ".join(c.rjust(w) if i >= align_right_from else c.ljust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths))) + " |"

    sep = "|" + "|".join(("-" * (w + 1) + ":") if i >= align_right_from else ("-" * (w + 2))
                         for i, w in enumerate(widths)) + "|"
    return "\n".join([line(header), sep, *(line(r) for r in body)])


def render_table(rows: list[dict]) -> str:
    """The run's table: op, size, dtype, pass, ours, each peer's time with its speed-up, GB/s, % of copy BW."""
    peers = peers_in(rows)
    header = ["op", "size", "dtype", "pass", "ours", "IQR", *peers, "GB/s", "% copy BW"]
    body = []
    for r in rows:
        ours = r["ours"]["seconds"] if r["ours"] else None
        ours_cell = fmt_time(ours) + ("" if r["impl"] in (OURS, None) else f" ({r['impl']})")
        iqr = (r["ours"] or {}).get("iqr_s")
        iqr_cell = f"±{100 * iqr / ours:.0f}%" if iqr is not None and ours else "—"
        cells = [r["op"], r["size"], r["dtype"], r["pass"], ours_cell, iqr_cell]
        for p in peers:
            peer = r["peers"].get(p)
            if peer is None:
                cells.append("")
            elif peer["speedup"] is None:
                cells.append(fmt_time(peer["seconds"]))
            else:
                cells.append(f"{fmt_time(peer['seconds'])} ({fmt_ratio(peer['speedup'])})")
        cells += [_fmt_num(r["gbps"]), "—" if r["pct_copy_bw"] is None else f"{r['pct_copy_bw']:.0f}%"]
        body.append(cells)
    return _table(header, body, align_right_from=4)


def render_markdown(rows: list[dict], meta: dict) -> str:
    env = meta.get("environment", {})
    lines = [f"# ltkernels benchmarks: {meta['device_name']}", "",
             f"- date: {meta['date']}" + (" (quick smoke run: not for citing)" if meta.get("quick") else ""),
             f"- device: {meta['device_name']} ({meta['device']})",
             f"- torch {env.get('torch')} (CUDA {env.get('torch_cuda')}), torchvision {env.get('torchvision')}, "
             f"ltkernels {env.get('ltkernels')}, {env.get('threads')} CPU threads",
             f"- command: `{meta.get('command', '')}`", ""]
    bw = copy_bandwidth(rows)
    if bw:
        lines.append(f"- copy bandwidth (bytes read + written): "
                     + ", ".join(f"{d}: {v:.1f} GB/s" for d, v in bw.items()))
    lines += ["- a peer's cell: its median (speed-up = peer / ours; above 1× we are faster); "
              "IQR: the interquartile range of our timings over their median",
              "- timer: " + ", ".join(sorted({(r['ours'] or {}).get('timer', '?') for r in rows})), ""]
    lines.append(render_table(rows))
    if meta.get("incomplete"):
        lines += ["", "Not measured: " + "; ".join(meta["incomplete"])]
    return "\n".join(lines) + "\n"


def render_chart(rows: list[dict], path, title: str) -> bool:
    """Horizontal bars: our speed-up over each peer per benchmark row, log scale. False if nothing to plot."""
    items = [(f"{r['op']} {r['size']} {r['dtype']} {r['pass']}", p, v["speedup"])
             for r in rows for p, v in r["peers"].items() if v.get("speedup")]
    if not items:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    labels = list(dict.fromkeys(label for label, _, _ in items))
    peers = _ordered([p for _, p, _ in items], PEER_ORDER)
    colors = {p: plt.get_cmap("tab10")(j % 10) for j, p in enumerate(peers)}
    fig, ax = plt.subplots(figsize=(10, 1.6 + 0.22 * len(items) + 0.12 * len(labels)))
    y, ticks, seen = 0.0, [], set()
    for label in labels:
        bars = [(p, v) for lab, p, v in items if lab == label]
        bars.sort(key=lambda b: peers.index(b[0]))
        ticks.append(y + (len(bars) - 1) / 2)
        for p, v in bars:  # each bar runs from 1x to the speed-up, so slower-than-peer shows to the left
            ax.barh(y, v - 1.0, left=1.0, height=0.8, color=colors[p], label=None if p in seen else f"vs {p}")
            ax.annotate(fmt_ratio(v), (v, y), xytext=(3 if v >= 1 else -3, 0), textcoords="offset points",
                        ha="left" if v >= 1 else "right", va="center", fontsize=7)
            seen.add(p)
            y += 1
        y += 0.6
    values = [v for _, _, v in items]
    ax.set_xlim(min(0.5, min(values) / 1.5), max(2.0, max(values) * 1.6))
    ax.set_xscale("log")
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}×"))
    ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_yticks(ticks)
    ax.set_yticklabels(labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("speed-up of ltkernels (peer median / ours, log scale; > 1 is faster)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(axis="x", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _raw(bench: dict) -> dict:
    stats = bench.get("stats", {})
    keep = ("min", "max", "mean", "stddev", "median", "iqr", "q1", "q3", "rounds", "iterations", "ops")
    return {"name": bench.get("name"), "fullname": bench.get("fullname"), "group": bench.get("group"),
            "extra_info": bench.get("extra_info", {}), "stats": {k: stats[k] for k in keep if k in stats}}


def write_results(benchmarks: list[dict], out_dir, *, command: str, environment: dict, quick: bool = False,
                  incomplete: list[str] | None = None, date: str | None = None, chart: bool = True) -> list[Path]:
    """Writes `<device-slug>-<date>[-quick].{json,md,png}` per device found in `benchmarks`; returns the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    date = date or _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    rows = build_rows(benchmarks)
    written = []
    for device in dict.fromkeys(r["device"] for r in rows):
        dev_rows = [r for r in rows if r["device"] == device]
        dev_benches = [b for b in benchmarks if (b.get("extra_info") or {}).get("device") == device]
        names = [(b.get("extra_info") or {}).get("device_name") for b in dev_benches]
        name = next((n for n in names if n), None)
        if not name:
            name = (environment.get("cuda_devices") or ["CUDA device"])[0] if device == "cuda" \
                else environment.get("cpu") or cpu_model()
        meta = {"schema": SCHEMA, "device": device, "device_name": name, "date": date, "command": command,
                "quick": quick, "environment": environment, "build_info": environment.get("build_info"),
                "threads": environment.get("threads"), "copy_gbps": copy_bandwidth(dev_rows).get(device),
                "incomplete": incomplete or []}
        stem = f"{slugify(name)}-{date[:10]}" + ("-quick" if quick else "")
        json_path, md_path, png_path = (out_dir / f"{stem}.{ext}" for ext in ("json", "md", "png"))
        with open(json_path, "w") as f:
            json.dump({**meta, "rows": dev_rows, "benchmarks": [_raw(b) for b in dev_benches]}, f, indent=1)
            f.write("\n")
        md_path.write_text(render_markdown(dev_rows, meta))
        written += [json_path, md_path]
        if chart and render_chart(dev_rows, png_path, f"ltkernels vs peers — {name} — {date[:10]}"):
            written.append(png_path)
        elif png_path.exists():
            png_path.unlink()  # a chart from an earlier run of the same day would no longer match the table
    return written


# --------------------------------------------------------------------------------------------------------------------
# README section
# --------------------------------------------------------------------------------------------------------------------

README_START, README_END = "<!-- bench:start -->", "<!-- bench:end -->"


def load_results(results_dir, include_quick: bool = False) -> list[dict]:
    """The newest results file per device name in `results_dir` (quick runs skipped unless asked for)."""
    newest: dict[str, dict] = {}
    for path in sorted(Path(results_dir).glob("*.json")):
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError):
            continue
        if not isinstance(data, dict) or data.get("schema") != SCHEMA or (data.get("quick") and not include_quick):
            continue
        data["_path"] = path
        key = data["device_name"]
        if key not in newest or data["date"] > newest[key]["date"]:
            newest[key] = data
    return sorted(newest.values(), key=lambda d: (d["device"] != "cuda", d["device_name"]))


def _short_device(name: str) -> str:
    name = re.sub(r"\((R|tm|TM)\)|\s+@.*$|\s+\d+-Core Processor$", "", name)
    return re.sub(r"\s+", " ", name).strip()


def render_readme_table(results_dir, relative_to=None, include_quick: bool = False) -> str:
    """The README's benchmark section from every committed results file: each row names its device."""
    results = load_results(results_dir, include_quick)
    if not results:
        return "_No benchmark results committed yet: run `ltk bench` on a device and commit `bench/results/`._\n"
    all_rows = [(res, r) for res in results for r in res["rows"] if r["peers"] or r["op"] == "copy"]
    peers = _ordered([p for _, r in all_rows for p in r["peers"]], PEER_ORDER)
    header = ["device", "op", "size", "dtype", "pass", "ours", *(f"vs {p}" for p in peers), "GB/s", "% copy BW"]
    body = []
    for res, r in all_rows:
        ours = r["ours"]["seconds"] if r["ours"] else None
        op = r["op"] if r["impl"] in (OURS, None) else f"{r['op']} ({r['impl']})"
        cells = [_short_device(res["device_name"]), op,
                 r["size"], r["dtype"], r["pass"], fmt_time(ours)]
        cells += [fmt_ratio((r["peers"].get(p) or {}).get("speedup")) if p in r["peers"] else "" for p in peers]
        cells += [_fmt_num(r["gbps"]), "—" if r["pct_copy_bw"] is None else f"{r['pct_copy_bw']:.0f}%"]
        body.append(cells)
    base = Path(relative_to) if relative_to else None
    sources = []
    for res in results:
        path = res["_path"]
        try:
            shown = os.path.relpath(path, base) if base else path.name
        except ValueError:
            shown = path.name
        env = res.get("environment", {})
        bw = f", copy {res['copy_gbps']:.0f} GB/s" if res.get("copy_gbps") else ""
        sources.append(f"- **{_short_device(res['device_name'])}**: {res['device_name']}, torch {env.get('torch')}, "
                       f"{res['date'][:10]}{bw} — [`{Path(shown).name}`]({Path(shown).as_posix()})")
    text = [
        "Generated by `ltk bench readme` from the committed files in `bench/results/` (newest per device). "
        "`ours` is the ltkernels median; `vs X` is X's median over ours, measured in the same run on the same "
        "device (above 1× ltkernels is faster); `% copy BW` is the bytes the op must move per second against a "
        "large `tensor.copy_` measured in that run. Method: `bench/NOTES.md`.", "",
        _table(header, body, align_right_from=5), "", *sources]
    return "\n".join(text) + "\n"


def update_readme(readme, results_dir, include_quick: bool = False) -> bool:
    """Rewrites `readme` between the bench markers; False (and nothing written) when the markers are missing."""
    readme = Path(readme)
    text = readme.read_text()
    start, end = text.find(README_START), text.find(README_END)
    if start < 0 or end < start:
        return False
    table = render_readme_table(results_dir, relative_to=readme.parent, include_quick=include_quick)
    new = text[:start + len(README_START)] + "\n" + table + text[end:]
    if new != text:
        readme.write_text(new)
    return True


# --------------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------------


def repo_root() -> Path | None:
    """The source checkout holding bench/ (models/ is the source folder in an editable install)."""
    root = Path(__file__).resolve().parents[1]
    return root if (root / "bench" / "conftest.py").is_file() else None


QUICK_ARGS = ["--benchmark-min-rounds=3", "--benchmark-max-time=0.1", "--benchmark-warmup=off"]
FULL_ARGS = ["--benchmark-min-rounds=5", "--benchmark-max-time=1.0", "--benchmark-warmup=on",
             "--benchmark-warmup-iterations=5"]


def _bench_files(bench_dir: Path) -> list[Path]:
    files = sorted(bench_dir.glob("test_bench_*.py"))
    return sorted(files, key=lambda p: p.name != "test_bench_copy.py")  # the copy reference first


def _run_pytest(targets, json_path, args, env, cwd, timeout):
    cmd = [sys.executable, "-m", "pytest", *map(str, targets), "-p", "no:cacheprovider", "-q",
           f"--benchmark-json={json_path}", "--benchmark-sort=name", *args]
    print("ltk bench: " + " ".join(shlex.quote(c) for c in cmd), file=sys.stderr, flush=True)
    proc = subprocess.Popen(cmd, cwd=cwd, env=env)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return None
    except KeyboardInterrupt:
        proc.kill()
        proc.wait()
        raise


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ltk bench", allow_abbrev=False,
        description="Benchmark ltkernels against its peers on this machine; print one table and write "
                    "JSON + Markdown + PNG results. `ltk bench readme` rewrites the README's benchmark section. "
                    "Other arguments are passed to pytest.")
    p.add_argument("--quick", action="store_true",
                   help="CI smoke run: 3 rounds, no warm-up rounds, small sizes (LTK_BENCH_QUICK=1); results "
                        "named *-quick and written under build/bench-results/ unless --out is given")
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "all"], default="auto",
                   help="auto: CUDA if visible, else CPU (default); all: both")
    p.add_argument("-k", dest="keyword", help="pytest -k expression; the copy reference always runs beside it")
    p.add_argument("--out", help="results folder (default: bench/results/ in a source checkout, "
                                 "else ./ltk-bench-results/)")
    p.add_argument("--from-json", nargs="+", metavar="FILE",
                   help="build the report from existing pytest-benchmark --benchmark-json files; run nothing")
    p.add_argument("--budget", type=float, metavar="SECONDS",
                   help="run each bench file in its own pytest process within this total time, so a slow or "
                        "failing file still leaves the others' figures (used by tools/gpu_validate.sh)")
    p.add_argument("--no-chart", action="store_true", help="skip the PNG chart")
    return p


def _readme_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="ltk bench readme",
                                description="Rebuild the README's benchmark table from committed results.")
    root = repo_root() or Path.cwd()
    p.add_argument("--results", default=str(root / "bench" / "results"))
    p.add_argument("--readme", default=str(root / "README.md"))
    p.add_argument("--print", action="store_true", help="print the section instead of rewriting the README")
    p.add_argument("--include-quick", action="store_true")
    a = p.parse_args(argv)
    if not a.print and Path(a.readme).is_file() and update_readme(a.readme, a.results, a.include_quick):
        print(f"ltk bench readme: updated {a.readme}", file=sys.stderr)
        return 0
    if not a.print:
        print(f"ltk bench readme: no {README_START} ... {README_END} markers in {a.readme}; printing the section",
              file=sys.stderr)
    print(render_readme_table(a.results, relative_to=Path(a.readme).parent, include_quick=a.include_quick), end="")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["readme"]:
        return _readme_main(argv[1:])
    args, pytest_args = _parser().parse_known_args(argv)
    root = repo_root()
    if args.out:
        out_dir = Path(args.out)
    elif root is not None:
        out_dir = root / ("build/bench-results" if args.quick else "bench/results")
    else:
        out_dir = Path.cwd() / "ltk-bench-results"
    command = "ltk bench " + " ".join(shlex.quote(a) for a in argv)
    environment = environment_info()
    incomplete: list[str] = []
    failed = False

    if args.from_json:
        try:
            benchmarks, machine = load_benchmarks(args.from_json)
        except (OSError, ValueError) as err:
            print(f"ltk bench: cannot read {' '.join(args.from_json)}: {err}", file=sys.stderr)
            return 2
        environment = machine.get("ltkernels") or environment
    else:
        if root is None:
            print("ltk bench: the benchmarks live in the source checkout's bench/ folder, which is not next to this "
                  "installation. Run `ltk bench` from an editable install of a checkout "
                  "(`pip install --no-build-isolation -e .`), or `python -m pytest bench` there.", file=sys.stderr)
            return 2
        if importlib_missing("pytest_benchmark"):
            print("ltk bench: pytest-benchmark is not installed (`pip install pytest-benchmark`, or the package's "
                  "[test] extra).", file=sys.stderr)
            return 2
        device = args.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            print("ltk bench: --device cuda but torch sees no CUDA device.", file=sys.stderr)
            return 2
        env = dict(os.environ)
        env["LTK_BENCH_DEVICES"] = "cpu,cuda" if device == "all" else device
        if args.quick:
            env["LTK_BENCH_QUICK"] = "1"
        env.setdefault("PYTHONUNBUFFERED", "1")
        extra = (QUICK_ARGS if args.quick else FULL_ARGS) + pytest_args
        if args.keyword:  # the copy reference always runs, for the % of copy bandwidth
            extra += ["-k", args.keyword if args.keyword.strip() == "copy" else f"({args.keyword}) or copy"]
        files = _bench_files(root / "bench")
        if not files:
            print(f"ltk bench: no bench/test_bench_*.py files in {root / 'bench'}", file=sys.stderr)
            return 2
        benchmarks = []
        with tempfile.TemporaryDirectory(prefix="ltk-bench-") as tmp:
            # One pytest run (a bench file that fails to import must not stop the others), or one per file when
            # a time budget must leave the finished files' figures even if a later one is stopped.
            runs = [(files, Path(tmp) / "all.json")] if args.budget is None else \
                [([f], Path(tmp) / f"{f.stem}.json") for f in files]
            if args.budget is None:
                extra = ["--continue-on-collection-errors", *extra]
            deadline = None if args.budget is None else time.monotonic() + args.budget
            for i, (targets, json_path) in enumerate(runs):
                label = ", ".join(t.name for t in targets)
                timeout = None
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left < 5:
                        incomplete.append(f"{label}: not run (budget spent)")
                        continue
                    timeout = min(left, 1.5 * left / (len(runs) - i))  # a fair share; what is unused carries on
                rc = _run_pytest(targets, json_path, extra, env, root, timeout)
                if rc is None:
                    incomplete.append(f"{label}: stopped after {timeout:.0f} s (budget)")
                elif rc not in (0, 5):  # 5: nothing selected by -k
                    incomplete.append(f"{label}: pytest exit code {rc} (some benchmarks failed or errored)")
                    failed = True
                if json_path.is_file():
                    benchmarks += load_benchmarks([json_path])[0]

    if not any((b.get("extra_info") or {}).get("op") for b in benchmarks):
        print("ltk bench: no benchmark results" + (f" ({'; '.join(incomplete)})" if incomplete else ""),
              file=sys.stderr)
        return 1 if failed or incomplete else 2
    rows = build_rows(benchmarks)
    for device in dict.fromkeys(r["device"] for r in rows):
        print(f"\n{device}:")
        print(render_table([r for r in rows if r["device"] == device]))
    written = write_results(benchmarks, out_dir, command=command, environment=environment, quick=args.quick,
                            incomplete=incomplete, chart=not args.no_chart)
    for note in incomplete:
        print(f"ltk bench: {note}", file=sys.stderr)
    print("\nltk bench: wrote " + ", ".join(str(p) for p in written))
    return 1 if failed else 0


def importlib_missing(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is None


if __name__ == "__main__":
    sys.exit(main())
