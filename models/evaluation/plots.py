"""PNG plots (matplotlib, Agg backend): per-class AP vs training instances (the BAGS paper's Figure 1 view) and
AP by bin / frequency group for several runs side by side."""
from __future__ import annotations

import math
import os
from collections.abc import Mapping

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

__all__ = ["plot_ap_vs_instances", "plot_ap_by_bin"]

BIN_KEYS = ("AP1", "AP2", "AP3", "AP4", "APr", "APc", "APf")
BIN_LABELS = {"AP1": "AP1\n(<10)", "AP2": "AP2\n(10-100)", "AP3": "AP3\n(100-1k)", "AP4": "AP4\n(>=1k)",
              "APr": "APr", "APc": "APc", "APf": "APf"}


def _num(v) -> float:
    if hasattr(v, "item"):
        v = v.item()
    return float(v)


def plot_ap_vs_instances(per_class_ap: Mapping, instance_counts: Mapping, weight_norms: Mapping | None,
                         path: str, title: str = "") -> str:
    """Scatter of per-class AP (left axis) against the class's training instance count (log x), and, when
    `weight_norms` is given, the classifier weight norm of each class on a second axis.  Keys are category
    ids (int or str); classes with AP < 0 (no ground truth) or without a positive count are left out."""
    ap = {int(k): _num(v) for k, v in per_class_ap.items()}
    cnt = {int(k): _num(v) for k, v in instance_counts.items()}
    xs, ys = [], []
    for c, a in sorted(ap.items()):
        if a >= 0 and not math.isnan(a) and cnt.get(c, 0) > 0:
            xs.append(cnt[c])
            ys.append(a)
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    ax.scatter(xs, ys, s=14, color="tab:blue", alpha=0.75, label="per-class AP")
    ax.set_xscale("log")
    ax.set_xlabel("training instances per class (log)")
    ax.set_ylabel("AP", color="tab:blue")
    ax.set_ylim(-0.02, 1.02)
    for edge in (10, 100, 1000):
        ax.axvline(edge, color="0.8", lw=0.8, ls="--", zorder=0)
    handles, labels = ax.get_legend_handles_labels()
    if weight_norms:
        wn = {int(k): _num(v) for k, v in weight_norms.items()}
        wx = [cnt[c] for c in sorted(wn) if cnt.get(c, 0) > 0]
        wy = [wn[c] for c in sorted(wn) if cnt.get(c, 0) > 0]
        ax2 = ax.twinx()
        ax2.scatter(wx, wy, s=10, marker="x", color="tab:red", alpha=0.7, label="classifier weight norm")
        ax2.set_ylabel("weight norm", color="tab:red")
        h2, l2 = ax2.get_legend_handles_labels()
        handles += h2
        labels += l2
    ax.legend(handles, labels, loc="upper left", fontsize=8)
    ax.set_title(title or "per-class AP vs training instances")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, format="png")
    plt.close(fig)
    return path


def plot_ap_by_bin(runs: Mapping[str, Mapping], path: str, title: str = "AP by instance-count bin and "
                   "frequency group") -> str:
    """Grouped bars: AP1..AP4 and APr/APc/APf (x groups) for each run (one bar colour per run).  Undefined
    metrics (-1 or missing) are drawn as empty (hatched, zero-height) bars and labelled 'n/a'."""
    names = list(runs)
    n = max(1, len(names))
    x = np.arange(len(BIN_KEYS))
    width = 0.8 / n
    fig, ax = plt.subplots(figsize=(max(7, 1.1 * len(BIN_KEYS) + 0.4 * n), 4.2), dpi=110)
    for j, name in enumerate(names):
        m = runs[name]
        vals = []
        for k in BIN_KEYS:
            v = m.get(k, -1.0)
            v = -1.0 if v is None else _num(v)
            vals.append(v)
        heights = [v if v >= 0 else 0.0 for v in vals]
        pos = x - 0.4 + width * (j + 0.5)
        bars = ax.bar(pos, heights, width, label=name)
        for b, v in zip(bars, vals):
            if v < 0:
                ax.text(b.get_x() + b.get_width() / 2, 0.01, "n/a", ha="center", va="bottom", fontsize=6,
                        rotation=90)
    ax.set_xticks(x)
    ax.set_xticklabels([BIN_LABELS[k] for k in BIN_KEYS], fontsize=8)
    ax.set_ylabel("AP")
    ax.set_ylim(0, 1.0)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, format="png")
    plt.close(fig)
    return path
