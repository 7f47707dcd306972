"""Measured comparisons over seeds on the synthetic long-tail set: mean +- standard deviation of AP, APr, APc, APf, the
paired per-seed differences, and a plain verdict on whether a method beats its baseline by more than the
seed-to-seed spread. Writes `study.json` and `study.md` to `--out`.

- `ltk study efl`: focal loss vs EFL and QFL vs EQFL on the improved one-stage baseline (ATSS + IoU branch).
- `ltk study losses`: the softmax two-stage baseline vs Seesaw, EQL v2 and the federated loss (Faster R-CNN)."""
from __future__ import annotations

import json
import os
import platform
import statistics
import time

import torch

from ..configs import get_config, merge, resolve
from .demo import PLANS, synthesize
from .trainer import _jsonable, train

# per study: its methods, the (method, baseline) pairs, the config of a method, its name in the table
STUDIES = {
    "efl": {"methods": ["focal", "efl", "qfl", "eqfl"], "pairs": [("efl", "focal"), ("eqfl", "qfl")],
            "config": "atss_{}", "label": "ATSS + {}"},
    "losses": {"methods": ["softmax", "seesaw", "eqlv2", "federated"],
               "pairs": [("seesaw", "softmax"), ("eqlv2", "softmax"), ("federated", "softmax")],
               "config": "two_stage_{}", "label": "Faster R-CNN + {}"},
}
METHODS = STUDIES["efl"]["methods"]
PAIRS = STUDIES["efl"]["pairs"]
_NAMES = {"focal": "focal loss", "softmax": "softmax", "seesaw": "Seesaw", "eqlv2": "EQL v2",
          "federated": "federated loss", "efl": "EFL", "qfl": "QFL", "eqfl": "EQFL"}
METRICS = ["AP", "AP50", "APr", "APc", "APf"]

# "default": the demo's data and 1200 iterations per run (the README's table); "quick": a smoke run of the whole
# pipeline on a tiny set (the tests).
STUDY_PLANS = {
    "default": {"data": PLANS["default"]["data"], "max_iter": 1200},
    "quick": {"data": {"num_classes": 8, "num_train_images": 40, "num_val_images": 12, "image_size": [96, 96]},
              "max_iter": 3},
}


def _mean_std(values: list, defined=lambda v: v >= 0) -> tuple:
    """Mean and sample standard deviation of the defined values (the LVIS API gives -1 for an undefined metric)."""
    values = [v for v in values if v is not None and v == v and defined(v)]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(runs: dict, seeds: list, pairs=PAIRS) -> dict:
    """runs[method][seed] = metrics -> per method mean/std of each metric, per pair the paired differences."""
    out = {"methods": {}, "pairs": {}}
    for m, per_seed in runs.items():
        out["methods"][m] = {k: dict(zip(("mean", "std"), _mean_std([per_seed[s][k] for s in seeds])))
                             for k in METRICS}
    for a, b in pairs:
        if a not in runs or b not in runs:
            continue
        pair = {}
        for k in METRICS:
            diffs = [runs[a][s][k] - runs[b][s][k] for s in seeds]
            ok = [d for d, s in zip(diffs, seeds) if runs[a][s][k] >= 0 and runs[b][s][k] >= 0]
            mean, std = _mean_std(ok, defined=lambda v: True)
            spread = max(out["methods"][a][k]["std"], out["methods"][b][k]["std"])
            pair[k] = {"diffs": diffs, "mean": mean, "std": std, "spread": spread,
                       "beats": bool(mean > 0 and mean > spread)}
        out["pairs"][f"{a}-{b}"] = pair
    return out


def format_markdown(summary: dict, seeds: list, label: str = STUDIES["efl"]["label"]) -> str:
    pct = lambda v: f"{100 * v:.1f}"
    lines = ["| method | " + " | ".join(METRICS) + " |", "|---|" + "---|" * len(METRICS)]
    for m, stats in summary["methods"].items():
        lines.append(f"| {label.format(_NAMES.get(m, m))} | " + " | ".join(
            f"{pct(stats[k]['mean'])} ± {pct(stats[k]['std'])}" for k in METRICS) + " |")
    lines.append("")
    for name, pair in summary["pairs"].items():
        a, b = (_NAMES.get(v, v) for v in name.split("-"))
        cells = ", ".join(f"{k} {100 * p['mean']:+.1f} ± {pct(p['std'])}" for k, p in pair.items())
        verdict = pair["AP"]["beats"]
        lines.append(f"- {a} - {b} (paired over seeds {seeds}): {cells}. {a} {'beats' if verdict else 'does not beat'} "
                     f"{b} on AP by more than the seed-to-seed spread ({pct(pair['AP']['spread'])}).")
    return "\n".join(lines)


def finished_run(run_dir: str, cfg: dict) -> dict | None:
    """The train log of a run in `run_dir` that finished and evaluated exactly `cfg`, else None."""
    try:
        with open(os.path.join(run_dir, "train_log.json")) as f:
            done = json.load(f)
    except (OSError, ValueError):
        return None
    same = done.get("config") == json.loads(json.dumps(resolve(cfg)))
    return done if same and isinstance(done.get("metrics"), dict) else None


def run_study(out: str = "ltk_study", seeds=(0, 1, 2), quick: bool = False, max_iter: int | None = None,
              methods=None, device: str = "auto", log=print, study: str = "efl", reuse: bool = False) -> dict:
    """Train every method for every seed and summarize. `reuse` keeps the results of runs already in `out` that
    finished with the same config (a study stopped part-way, or more seeds added later)."""
    if study not in STUDIES:
        raise ValueError(f"unknown study {study!r} ({', '.join(STUDIES)})")
    spec = STUDIES[study]
    plan = STUDY_PLANS["quick" if quick else "default"]
    iters = int(max_iter or plan["max_iter"])
    seeds = [int(s) for s in seeds]
    methods = list(methods or spec["methods"])
    t_all = time.time()
    os.makedirs(out, exist_ok=True)
    data = synthesize(os.path.join(out, "data"), plan["data"], log)
    runs, times = {m: {} for m in methods}, {m: {} for m in methods}
    for seed in seeds:
        for m in methods:
            cfg = merge(get_config(spec["config"].format(m)), {"solver": {"max_iter": iters},
                                                  "train": {"seed": seed, "ckpt_every": 0, "log_every": 0,
                                                            "tensorboard": False}})
            run_dir = os.path.join(out, f"{m}_seed{seed}")
            done = finished_run(run_dir, cfg) if reuse else None
            reused = done is not None
            if not reused:
                done = train(cfg, data["train_ann"], data["image_root"], run_dir, val_ann=data["val_ann"],
                             val_images=data["image_root"], device=device, progress=False, log=log, overwrite=True)
            runs[m][seed] = {k: float(done["metrics"][k]) for k in METRICS}
            times[m][seed] = round(done["train_time"], 1)
            r = runs[m][seed]
            log(f"[study] {m} seed {seed}{' (reused)' if reused else ''}: train "
                f"{times[m][seed]:.0f}s  AP {100 * r['AP']:.1f}  APr {100 * r['APr']:.1f}  "
                f"APc {100 * r['APc']:.1f}  APf {100 * r['APf']:.1f}")
    summary = summarize(runs, seeds, spec["pairs"])
    table = format_markdown(summary, seeds, spec["label"])
    log("\n" + table)
    used = "cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu"
    result = {"study": study, "seeds": seeds, "max_iter": iters, "quick": quick, "device": used,
              "torch_threads": torch.get_num_threads(), "platform": platform.platform(), "torch": torch.__version__,
              "data": {**plan["data"], **data}, "runs": runs, "train_time_s": times, "summary": summary,
              "table": table, "total_time_s": round(time.time() - t_all, 1)}
    with open(os.path.join(out, "study.json"), "w") as f:
        json.dump(_jsonable(result), f, indent=1)
    with open(os.path.join(out, "study.md"), "w") as f:
        f.write(table + "\n")
    log(f"wrote {os.path.join(out, 'study.json')} ({result['total_time_s']:.0f}s in all)")
    return result
