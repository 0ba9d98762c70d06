"""The documentation page (``--docs``, docs/benchmarks.md): the report, its chart, the notes kept
beside bench.py, and the budget lines of runs on other Pythons.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .budgets import budget_lines
from .chart import write_chart
from .common import BENCHMARKS, log
from .harness import Results
from .report import render_markdown

DOCS_COMMAND = (
    "python benchmarks/bench.py --ref HEAD --json benchmarks/results/full.json"
    " --docs docs/benchmarks.md"
)

MISSED_NOTES = BENCHMARKS / "missed-budgets.md"
# The in-process paired figures (inprocess.py --report, with a few lines on how they were taken),
# which judge the default settings' budgets: placed before this run's own budget lines.
INPROCESS_NOTES = BENCHMARKS / "results-inprocess.md"


def write_docs(results: Results, others: Sequence[Results], page: Path) -> None:
    """docs/benchmarks.md: how the page was made, the budgets, the chart, the tables; with
    ``others`` (runs on other Pythons), a cross-Python summary of their budget lines."""
    chart = page.parent / "assets" / "benchmarks.png"
    has_chart = write_chart(results, chart)
    m = results.meta
    quick = m["mode"] == "quick"
    out = ["# Benchmarks", ""]
    if quick:
        out += [
            "> **A quick run.** These figures come from `--quick` (few rounds, short runs) on a"
            " shared machine"
            " while loopwatch was still being changed: a smoke test of the harness, not results"
            f" to quote. The full run replaces them: `{DOCS_COMMAND}`.",
            "",
        ]
    out += [
        "What loopwatch costs a program, next to what users would otherwise run, on stock"
        " asyncio and on uvloop. Every figure is a ratio to the same loop unwatched; the"
        " absolute rates are only there to make the ratios checkable. The harness,"
        " `benchmarks/bench.py`, and how to read each column are described in"
        " `benchmarks/README.md`. Regenerate this page with:",
        "",
        "```sh",
        "python -m pip install -r benchmarks/requirements.txt   # and: apt-get install -y wrk",
        DOCS_COMMAND,
        "```",
        "",
    ]
    report = render_markdown(results).splitlines()
    body = report[1:]  # the report without its title
    if has_chart:
        split = next(
            (i for i, line in enumerate(body) if line == "## loopwatch next to the alternatives"),
            None,
        )
        picture = [
            "![Overhead of each variant against the plain loop, per workload, on asyncio and"
            " uvloop](assets/benchmarks.png)",
            "",
        ]
        if split is not None:
            body = body[: split + 2] + picture + body[split + 2 :]
    if INPROCESS_NOTES.exists():
        at = next((i for i, line in enumerate(body) if line == "## Budgets"), 0)
        body = [*body[:at], *INPROCESS_NOTES.read_text().rstrip().splitlines(), "", *body[at:]]
    if MISSED_NOTES.exists():
        # What a missed budget would take: written by hand after reading a run, kept beside
        # this script, and placed right after the budget lines.
        at = next((i for i, line in enumerate(body) if line == "## Per-unit costs"), len(body))
        body = [*body[:at], *MISSED_NOTES.read_text().rstrip().splitlines(), "", *body[at:]]
    out += body
    for other in others:
        o = other.meta
        out += [
            "",
            f"## {o['python']}",
            "",
            f"The same harness with `--python` on {o['python']} ({o['mode']} run, {o['date']},"
            f" {o['rounds']} rounds): its budget lines.",
            "",
        ]
        out += [f"- {text}" for _, text in budget_lines(other)]
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text("\n".join(out).rstrip() + "\n")
    log(f"wrote {page}" + (f" and {chart}" if has_chart else ""))
