"""The size series as a picture (``series.py --png FILE``): wall time and peak RSS against model size.

matplotlib is not a dependency of nyxray: it comes with the ``bench`` extra
(``pip install -c constraints.txt -e '.[bench]'``; ``./dev.sh bench`` installs it) and is imported
only here, only when a chart is asked for.
"""

from __future__ import annotations

from typing import Any

STYLE = {
    "nyxray": {"color": "#1f77b4", "marker": "o", "label": "nyxray merge (default CLI)"},
    "mergekit": {"color": "#d62728", "marker": "s", "label": "mergekit-yaml 0.1.5"},
    "floor": {"color": "#7f7f7f", "marker": "^", "label": "I/O floor (read inputs once, write output once)", "linestyle": "--"},
}


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SystemExit(
            "--png needs matplotlib, which nyxray does not install: `.venv/bin/pip install -c constraints.txt -e '.[bench]'` "
            "(./dev.sh bench installs it), or leave out --png"
        ) from None


def draw(result: dict[str, Any], path: str) -> None:
    """Two panels: wall seconds (log-log) and peak RSS of the largest process, vs GB per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, NullLocator

    rows = result["rows"]
    gb = [r["model_bytes"] / 1e9 for r in rows]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(13, 5.2))
    for tool in ("nyxray", "mergekit", "floor"):
        pts = [(x, r[f"{tool}_s"]) for x, r in zip(gb, rows) if r.get(f"{tool}_s")]
        if pts:
            st = STYLE[tool]
            ax_t.plot(*zip(*pts), marker=st["marker"], color=st["color"], label=st["label"], linestyle=st.get("linestyle", "-"))
            for x, y in pts:
                ax_t.annotate(f"{y:.1f}s", (x, y), textcoords="offset points", xytext=(6, -4 if tool == "floor" else 4), fontsize=8, color=st["color"])
    for r, x in zip(rows, gb):
        if r.get("nyxray_over_mergekit"):
            ax_t.annotate(f"{r['nyxray_over_mergekit']:.2f}x", (x, r["nyxray_s"]), textcoords="offset points", xytext=(-8, -14), fontsize=8, ha="right")
    ax_t.set_xscale("log")
    ax_t.set_yscale("log")
    ax_t.set_ylabel("wall time of the whole command (s, log)")
    ax_t.set_title("Wall time (under each nyxray point: nyxray time / mergekit time)", fontsize=10)
    lo, hi = ax_t.get_ylim()
    ax_t.set_ylim(lo / 1.5, hi * 2)  # room for the labels
    for tool in ("nyxray", "mergekit"):
        pts = [(x, r[f"rss_{tool}"] / 1e9) for x, r in zip(gb, rows) if r.get(f"rss_{tool}")]
        if pts:
            st = STYLE[tool]
            ax_m.plot(*zip(*pts), marker=st["marker"], color=st["color"], label=st["label"])
            for x, y in pts:
                ax_m.annotate(f"{y:.2f} GB", (x, y), textcoords="offset points", xytext=(6, 4), fontsize=8, color=st["color"])
    ax_m.plot(gb, gb, color="#bbbbbb", linestyle=":", label="one model's size")
    ax_m.set_xscale("log")
    ax_m.set_ylim(0, ax_m.get_ylim()[1] * 1.15)
    ax_m.set_ylabel("peak RSS of the largest process (GB)")
    ax_m.set_title("Peak memory", fontsize=10)
    for ax in (ax_t, ax_m):
        ax.xaxis.set_major_locator(FixedLocator(gb))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticklabels([f"{x:.2g}\n({r['size']})" for x, r in zip(gb, rows)])
        ax.set_xlabel("GB per model (bf16; 2 inputs, 1 output)")
        ax.grid(True, which="major", alpha=0.3)
        ax.margins(x=0.12)
    i = result["info"]
    fig.suptitle(
        f"SLERP of two models: nyxray vs mergekit 0.1.5 vs the I/O floor\n"
        f"{i.get('cpus')} CPUs ({i.get('cpu_model', '?')}), {i.get('ram_gib')} GiB RAM; {i.get('date')}; nyxray @ {i.get('git')}; "
        f"{result['runs']} run(s) each, median",
        fontsize=10,
    )
    handles = {}
    for ax in (ax_t, ax_m):
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=4, fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
