"""Rendering result rows: time and ratio formats, the run's table, the per-device Markdown page and the PNG chart of
speed-ups. matplotlib is imported only when a chart is drawn, so bench/conftest.py's import of the package does not
need it."""
from __future__ import annotations

from .rows import OURS, PEER_ORDER, _ordered, copy_bandwidth


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
        lines.append("- copy bandwidth (bytes read + written): "
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
