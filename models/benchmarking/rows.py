"""From pytest-benchmark JSON to result rows: one row per (op, size, dtype, device, pass) holding our time, each
peer's time and speed-up, the GB/s the op moves and its share of the copy bandwidth measured in the same run."""
from __future__ import annotations

import json
import sys

OURS = "ltkernels"
PEER_ORDER = ["torchvision", "torchvision-offset", "official", "eager", "compile", "aten", "floor"]
OP_ORDER = ["copy", "roi_align", "nms", "batched_nms", "multiclass_nms", "group_softmax_loss", "group_softmax_scores",
            "equalized_focal_loss"]
PASS_ORDER = ["fwd", "fwd+bwd"]


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
