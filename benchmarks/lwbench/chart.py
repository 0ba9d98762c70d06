"""The chart of the documentation page: each variant's overhead against the plain loop, per
workload, one panel per loop kind (needs matplotlib).
"""

from __future__ import annotations

from pathlib import Path

from .common import REQUIREMENTS_HINT, log
from .harness import Results
from .report import overhead_table


def write_chart(results: Results, path: Path) -> bool:
    """Horizontal bars: each variant's overhead vs `off` per workload, one panel per loop kind.
    Values beyond the axis are clipped and written at the bar's end. False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log(f"matplotlib is not installed: no chart ({REQUIREMENTS_HINT})")
        return False
    columns, table = overhead_table(results)
    variants = list(table)
    limit = 60.0
    fig, axes = plt.subplots(
        1,
        len(results.loops),
        figsize=(6.5 * len(results.loops), 1.5 + 0.13 * len(variants) * len(results.workloads)),
        sharey=True,
        squeeze=False,
    )
    colors = plt.get_cmap("tab10")
    height = 0.8 / max(1, len(variants))
    for ax, k in zip(axes[0], results.loops, strict=True):
        for j, v in enumerate(variants):
            ys, xs = [], []
            for i, w in enumerate(results.workloads):
                x = table[v][columns.index((w, k))]
                ys.append(i + j * height)
                xs.append(max(-limit / 6, min(x, limit)))
                if x > limit:
                    ax.text(limit, i + j * height, f" {x:+.0f}%", va="center", fontsize=7)
                elif x < -limit / 6:
                    ax.text(0, i + j * height, f" {x:+.0f}%", va="center", fontsize=7)
            ax.barh(ys, xs, height=height, color=colors(j % 10), label=v)
        ax.axvline(0, color="black", linewidth=0.6)
        for budget in (2.0, 5.0):
            ax.axvline(budget, color="grey", linewidth=0.5, linestyle=":")
        ax.set_xlim(-limit / 6, limit * 1.25)
        ax.set_title(k)
        ax.set_xlabel("overhead vs off, % (HTTP: requests/s lost)")
        ax.set_yticks([i + 0.4 - height / 2 for i in range(len(results.workloads))])
        ax.set_yticklabels(results.workloads)
        ax.invert_yaxis()
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=len(variants))
    m = results.meta
    fig.suptitle(f"loopwatch and alternatives, {m['python']}, {m['mode']} run {m['date']}")
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
