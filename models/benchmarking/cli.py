"""`ltk bench` on the command line: runs the pytest-benchmark suite in `bench/` (in one pytest process, or one per
file under --budget), prints the table per device and writes the results files; `ltk bench readme` rewrites the
README section.

    ltk bench                          # every op on the current device (CUDA if visible, else CPU)
    ltk bench --quick                  # CI smoke: few rounds, small sizes (LTK_BENCH_QUICK=1), written to build/
    ltk bench --device all -k nms      # CPU and CUDA, only benchmarks matching `nms` (plus the copy reference)
    ltk bench --from-json run.json     # only build the report from an existing `--benchmark-json` file
    ltk bench readme                   # rewrite README.md between <!-- bench:start --> and <!-- bench:end -->
    python -m ltkernels.models.benchmarking ...   # the same without the `ltk` entry point
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from .harness import environment_info
from .readme import README_END, README_START, render_readme_table, update_readme
from .report import render_table
from .results import write_results
from .rows import build_rows, load_benchmarks


def repo_root() -> Path | None:
    """The source checkout holding bench/ (models/ is the source folder in an editable install)."""
    root = Path(__file__).resolve().parents[2]  # models/benchmarking/cli.py -> the checkout
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
    p.add_argument("--isolation", choices=["benchmark", "file", "none"], default=None,
                   help="run each benchmark (the default of full runs) or each bench file (the default of --quick "
                        "and --budget runs) in a pytest process of its own, so that no figure depends on what "
                        "ran before it in the same process; none: one process for everything")
    p.add_argument("--no-chart", action="store_true", help="skip the PNG chart")
    return p


def _collect(files, args, env, cwd) -> list[str]:
    """The node ids of the benchmarks `pytest files args` would run (no benchmark runs)."""
    cmd = [sys.executable, "-m", "pytest", *map(str, files), "-p", "no:cacheprovider", "-q", "--collect-only",
           *args]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    return [line.strip() for line in proc.stdout.splitlines() if "::" in line and not line.startswith(" ")]


def _runs(isolation: str, files, tmp: Path, extra, env, cwd) -> list:
    """(targets, json path) of each pytest process: one per benchmark, per file or for everything."""
    if isolation == "none":
        return [(files, tmp / "all.json")]
    if isolation == "file":
        return [([f], tmp / f"{f.stem}.json") for f in files]
    runs = []
    for f in files:  # a file that cannot be collected still runs on its own, and its failure is reported
        nodes = _collect([f], extra, env, cwd) or [str(f)]
        runs += [([node], tmp / f"{len(runs) + i:03d}.json") for i, node in enumerate(nodes)]
    return runs


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
        if importlib.util.find_spec("pytest_benchmark") is None:
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
            # One pytest process per benchmark by default (a figure must not depend on what ran before it: the
            # allocator's cached memory, the thread pool's state), per file for --quick and --budget (a budget
            # must leave the finished files' figures even if a later one is stopped), or one for everything.
            isolation = args.isolation or ("file" if args.quick or args.budget is not None else "benchmark")
            runs = _runs(isolation, files, Path(tmp), extra, env, root)
            if isolation == "none":
                extra = ["--continue-on-collection-errors", *extra]
            deadline = None if args.budget is None else time.monotonic() + args.budget
            for i, (targets, json_path) in enumerate(runs):
                label = ", ".join(t if isinstance(t, str) else t.name for t in targets)
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
