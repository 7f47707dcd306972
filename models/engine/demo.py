"""`ltk demo`: the whole long-tail story on the bundled synthetic set, in minutes on a laptop CPU.

1. two-stage Mask R-CNN FPN, softmax cross-entropy (the baseline);
2. BAGS: the baseline with its classifier re-initialised and retrained with the group softmax loss;
3. SimCal: the baseline plus a calibration classifier trained with bi-level sampling, dual-head inference;
(the two decoupled stages keep the baseline's frozen mask head: a detection's mask is its predicted class's);
4. the EFL paper's improved one-stage baseline (ATSS, IoU branch, GIoU) with sigmoid focal loss;
5. the same with the equalized focal loss (EFL).
All are evaluated with the LVIS API on the class-balanced validation split (boxes, and masks for the two-stage
runs); the tables, `metrics.json` and plots are written to `--out`."""
from __future__ import annotations

import json
import os
import platform
import time

import torch

from ..configs import get_config, merge
from .trainer import _jsonable, train

METHODS = [  # (run name, config, trained on top of)
    ("softmax", "two_stage_mask_softmax", None),
    ("bags", "two_stage_mask_bags", "softmax"),
    ("simcal", "two_stage_mask_simcal", "softmax"),
    ("focal", "atss_focal", None),
    ("efl", "atss_efl", None),
]
COLUMNS = ["AP", "AP50", "APr", "APc", "APf", "AP1", "AP2", "AP3", "AP4"]

# Data and schedules, measured to fit 15 min (default) / 3 min (--quick) on 2 CPU cores.
PLANS = {
    "default": {
        "data": {"num_classes": 40, "num_train_images": 900, "num_val_images": 200, "image_size": [160, 160]},
        "runs": {"softmax": {"solver": {"max_iter": 1200}}, "bags": {"solver": {"max_iter": 300}},
                 "simcal": {"solver": {"max_iter": 300}}, "focal": {"solver": {"max_iter": 1200}},
                 "efl": {"solver": {"max_iter": 1200}}},
    },
    "quick": {
        "data": {"num_classes": 40, "num_train_images": 900, "num_val_images": 120, "image_size": [160, 160]},
        "runs": {"softmax": {"solver": {"max_iter": 200}}, "bags": {"solver": {"max_iter": 60}},
                 "simcal": {"solver": {"max_iter": 60}}, "focal": {"solver": {"max_iter": 200}},
                 "efl": {"solver": {"max_iter": 200}}},
    },
}


def synthesize(data_dir: str, params: dict, log=print) -> dict:
    """Write the synthetic set once; reuse it when the same parameters were written before."""
    from ..data.synthetic import write_synthetic_lvis

    stamp = os.path.join(data_dir, "demo_data.json")
    if os.path.exists(stamp):
        with open(stamp) as f:
            saved = json.load(f)
        if saved.get("params") == params and all(os.path.exists(saved["paths"][k]) for k in ("train_ann", "val_ann")):
            log(f"data: reusing {data_dir}")
            return saved["paths"]
    t0 = time.time()
    info = write_synthetic_lvis(data_dir, **{k: tuple(v) if isinstance(v, list) else v for k, v in params.items()})
    paths = {k: info[k] for k in ("train_ann", "val_ann", "image_root")}
    with open(stamp, "w") as f:
        json.dump({"params": params, "paths": paths}, f, indent=1)
    log(f"data: wrote {info.get('num_train_images')} train / {info.get('num_val_images')} val images "
        f"({info.get('frequency_counts')}) to {data_dir} in {time.time() - t0:.1f}s")
    return paths


def format_table(runs: dict, prefix: str = "") -> str:
    """One row per run of COLUMNS; `prefix="mask_"` reads the mask metrics (runs without them are left out)."""
    head = f"{(prefix + 'method'):<12}" + "".join(f"{c:>7}" for c in COLUMNS)
    lines = [head, "-" * len(head)]
    for name, m in runs.items():
        if prefix + "AP" not in m:
            continue
        cells = "".join(f"{100 * m[prefix + c]:>7.1f}" if m.get(prefix + c, -1) >= 0 else f"{'-':>7}"
                        for c in COLUMNS)
        lines.append(f"{name:<12}{cells}")
    return "\n".join(lines)


def mask_metrics(runs: dict) -> dict:
    """The mask metrics of the runs that have them, under the box metrics' names (for the plots)."""
    return {name: {k[len("mask_"):]: v for k, v in m.items() if k.startswith("mask_")}
            for name, m in runs.items() if "mask_AP" in m}


def run_demo(out: str = "ltk_demo", quick: bool = False, device: str = "auto", threads: int | None = None,
             log=print) -> dict:
    t_all = time.time()
    if threads:
        torch.set_num_threads(threads)
    plan = PLANS["quick" if quick else "default"]
    os.makedirs(out, exist_ok=True)
    data = synthesize(os.path.join(out, "data"), plan["data"], log)
    results, metrics, ckpts = {}, {}, {}
    for name, config, base in METHODS:
        cfg = merge(get_config(config), plan["runs"][name])
        t0 = time.time()
        res = train(cfg, data["train_ann"], data["image_root"], os.path.join(out, name), val_ann=data["val_ann"],
                    val_images=data["image_root"], base=ckpts.get(base), device=device, progress=True, log=log,
                    overwrite=True)
        ckpts[name] = res["checkpoint"]
        metrics[name] = res["metrics"]
        hist = res["history"]
        results[name] = {"config": cfg, "base": base, "train_time_s": round(res["train_time"], 2),
                         "total_time_s": round(time.time() - t0, 2),
                         "loss_first": sum(h["loss"] for h in hist[:20]) / len(hist[:20]),
                         "loss_last": sum(h["loss"] for h in hist[-20:]) / len(hist[-20:]),
                         "metrics": metrics[name]}
        m = metrics[name]
        masks = (f"  mask AP {100 * m['mask_AP']:.1f}  mask APr {100 * m['mask_APr']:.1f}"
                 if "mask_AP" in m else "")
        log(f"[{name}] {time.time() - t0:.0f}s  AP {100 * m['AP']:.1f}  APr {100 * m['APr']:.1f}  "
            f"APc {100 * m['APc']:.1f}  APf {100 * m['APf']:.1f}{masks}")
        if name in ("softmax", "bags"):
            _plot_per_class(res, m, os.path.join(out, f"ap_vs_instances_{name}.png"), name, log)
    table = format_table(metrics)
    mask_table = format_table(metrics, prefix="mask_")
    log("\nbox AP\n" + table + "\n\nmask AP\n" + mask_table)
    _plot_bins(metrics, os.path.join(out, "ap_by_bin.png"), log)
    _plot_bins(mask_metrics(metrics), os.path.join(out, "mask_ap_by_bin.png"), log, "mask AP by instance-count "
               "bin and frequency group")
    used = "cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu"
    summary = {"quick": quick, "device": used, "torch_threads": torch.get_num_threads(),
               "platform": platform.platform(), "torch": torch.__version__, "data": {**plan["data"], **data},
               "total_time_s": round(time.time() - t_all, 1), "runs": results, "table": table,
               "mask_table": mask_table}
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump(_jsonable(summary), f, indent=1)
    log(f"wrote {os.path.join(out, 'metrics.json')} ({summary['total_time_s']:.0f}s in all)")
    return summary


def _plot_per_class(res, metrics, path, name, log):
    try:
        from ..evaluation.plots import plot_ap_vs_instances

        norms = res["model"].roi_heads.class_weight_norms().cpu().tolist()
        counts = res["meta"]["instance_counts"]
        plot_ap_vs_instances(metrics["per_class_ap"], {c: n for c, n in enumerate(counts, start=1)},
                             {c: w for c, w in enumerate(norms, start=1)}, path,
                             f"{name}: per-class AP and classifier weight norm vs training instances")
    except ImportError as err:  # matplotlib is an optional dependency
        log(f"plot skipped: {err}")


def _plot_bins(metrics, path, log, title=None):
    try:
        from ..evaluation.plots import plot_ap_by_bin

        plot_ap_by_bin(metrics, path, *([title] if title else []))
    except ImportError as err:
        log(f"plot skipped: {err}")
