"""The results files under bench/results/: `<device-slug>-<date>[-quick].{json,md,png}` per device written after a
run, and the newest file per device read back for the README section."""
from __future__ import annotations

import datetime as _dt
import json
import re
from pathlib import Path

from .harness import cpu_model
from .report import render_chart, render_markdown
from .rows import build_rows, copy_bandwidth

SCHEMA = "ltkernels-bench/1"


def slugify(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


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
