"""The budgets (``BUDGETS``, and the memory and start-up ones) and their lines in the report:
each one met or MISSED, on each loop, with the margin and whether the interval is clearly on
one side.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

from .common import BASELINE, LOOP_KINDS
from .harness import Results
from .stats import added_ns, compare, median_interval
from .workloads import WORKLOADS


@dataclass(frozen=True, slots=True)
class Budget:
    """``variant`` may cost at most ``limit`` more than ``reference`` on ``workload``, on every
    loop: in percent (``unit`` "%"), or in nanoseconds per operation ("ns"). A limit of 0 ns
    means "nothing detectable": met unless the whole paired interval is above zero."""

    variant: str
    reference: str
    workload: str
    limit: float
    unit: str
    what: str
    loops: tuple[str, ...] = LOOP_KINDS  # the loop kinds it applies to


BUDGETS: tuple[Budget, ...] = (
    Budget("watchdog", BASELINE, "echo", 2.0, "%", "the watchdog alone"),
    Budget("watchdog", BASELINE, "sleep0", 5.0, "%", "the watchdog alone"),
    Budget("tasks", "watchdog", "churn", 1000.0, "ns", "task tracking, per task created"),
    Budget("tasks", "watchdog", "sleep0", 0.0, "ns", "task tracking, per task step"),
    Budget("default", "tasks", "sleep0", 300.0, "ns", "step timing, per task step"),
    Budget("default", "tasks", "echo", 5.0, "%", "step timing"),
    # The same two per-operation budgets with the pure-Python hot paths (LOOPWATCH_ACCEL=0).
    Budget("tasks-py", "watchdog", "churn", 1000.0, "ns", "task tracking in pure Python"),
    Budget("default-py", "tasks-py", "sleep0", 300.0, "ns", "step timing in pure Python"),
    # "fewer": the rate lost, in percent of the reference's rate.
    # What watching costs a program with the default settings (issue 14), per loop kind.
    Budget("default", BASELINE, "echo", 2.0, "%", "the default settings"),
    Budget("default", BASELINE, "callbacks", 3.0, "%", "the default settings"),
    Budget("default", BASELINE, "sleep0", 3.0, "%", "the default settings", ("asyncio",)),
    Budget("default", BASELINE, "sleep0", 5.0, "%", "the default settings", ("uvloop",)),
    Budget("default", BASELINE, "churn", 10.0, "%", "the default settings", ("asyncio",)),
    Budget("default", BASELINE, "churn", 12.0, "%", "the default settings", ("uvloop",)),
    Budget("default", BASELINE, "http-aiohttp", 3.0, "fewer", "HTTP service, default settings"),
    Budget("default", BASELINE, "http-starlette", 3.0, "fewer", "HTTP service, default settings"),
    Budget("routes", "default", "http-aiohttp", 1.0, "fewer", "route labelling (issue 18)"),
    Budget("routes", "default", "http-starlette", 1.0, "fewer", "route labelling (issue 18)"),
)
# Memory budgets: bytes of loopwatch state per live task, against the plain loop.
LIVE_TASK_BUDGET = 200.0
LIVE_TASK_BUDGETED = ("tasks", "default")


def _num(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:,.2f}"


def _pct(value: float) -> str:
    return f"{value:+.1f}%"


def _ns(value: float) -> str:
    return f"{value:+,.0f} ns" if abs(value) >= 10 else f"{value:+,.1f} ns"


def _sure(low: float, high: float, limit: float) -> str:
    if high <= limit or low > limit:
        return "clearly: the whole interval is on this side"
    return "not clearly: the interval straddles the budget, more rounds would tell"


def _speed_budget_line(results: Results, budget: Budget, k: str) -> tuple[bool, str]:
    workload = WORKLOADS[budget.workload]
    cell = results.cells[(budget.workload, k, budget.variant)]
    base = results.cells[(budget.workload, k, budget.reference)]
    c = compare(workload, cell, base)
    a = added_ns(workload, cell, base)
    pair = f"`{budget.variant}` vs `{budget.reference}`"
    head = f"{budget.what} ({pair}) on {budget.workload}, {k}:"
    if budget.unit == "fewer":
        lost = [(1.0 - v / b) * 100.0 for v, b in zip(cell.values, base.values, strict=True)]
        low, high, level = median_interval(lost)
        loss = (1.0 - cell.median / base.median) * 100.0
        met = loss <= budget.limit
        return met, (
            f"**{'met' if met else 'MISSED'}**: {head}"
            + (f" {loss:.2f}% fewer" if loss >= 0 else f" {-loss:.2f}% more")
            + f" {workload.unit}"
            f" ({_num(cell.median)} vs {_num(base.median)}); budget <= {budget.limit:g}% fewer,"
            f" {'by' if met else 'over by'} {abs(budget.limit - loss):.2f} points; paired"
            f" {statistics.median(lost):.2f}%, {level:.0%} CI {low:.1f}% to {high:.1f}%;"
            f" {_sure(low, high, budget.limit)}"
        )
    if budget.unit == "%":
        met = c.overhead <= budget.limit
        margin = budget.limit - c.overhead
        return met, (
            f"**{'met' if met else 'MISSED'}**: {head} {c.overhead:+.2f}%"
            f" ({_ns(a.ns)} per {workload.operation}); budget <= {budget.limit:g}%,"
            f" {'by' if met else 'over by'} {abs(margin):.2f} points; paired {c.paired:+.2f}%,"
            f" {c.ci_level:.0%} CI {_pct(c.ci_low)} to {_pct(c.ci_high)};"
            f" {_sure(c.ci_low, c.ci_high, budget.limit)}"
        )
    figure = (
        f"{_ns(a.ns)} per {workload.operation} ({c.overhead:+.1f}%); paired {_ns(a.paired)},"
        f" {a.ci_level:.0%} CI {_ns(a.ci_low)} to {_ns(a.ci_high)}"
    )
    if budget.limit == 0.0:
        # "Nothing added": a cost is only claimed when the whole interval is above zero.
        met = a.ci_low <= 0.0
        why = (
            "the interval includes 0, so no cost is detectable at this noise"
            if met
            else "the whole interval is above 0"
        )
        verdict = "met" if met else "MISSED"
        return met, f"**{verdict}**: {head} {figure}; budget: nothing detectable; {why}"
    met = a.ns <= budget.limit
    margin = budget.limit - a.ns
    return met, (
        f"**{'met' if met else 'MISSED'}**: {head} {figure}; budget <= {budget.limit:,.0f} ns,"
        f" {'by' if met else 'over by'} {abs(margin):,.0f} ns;"
        f" {_sure(a.ci_low, a.ci_high, budget.limit)}"
    )


def _memory_row(results: Results, variant: str, k: str) -> dict[str, Any] | None:
    for row in results.memory:
        if row["variant"] == variant and row["loop"] == k:
            return row
    return None


def live_task_bytes(results: Results, variant: str, k: str) -> list[tuple[int, float]]:
    """(N, traced bytes per pending task that ``variant`` adds to the plain loop of the same
    kind), for each N measured; empty if either was not measured."""
    row, base = _memory_row(results, variant, k), _memory_row(results, BASELINE, k)
    if row is None or base is None:
        return []
    plain = {m["tasks"]: float(m["bytes_per_task"]) for m in base["live"]}
    return [
        (m["tasks"], float(m["bytes_per_task"]) - plain[m["tasks"]])
        for m in row["live"]
        if m["tasks"] in plain
    ]


def _bytes_range(added: list[tuple[int, float]]) -> str:
    low, high = min(b for _, b in added), max(b for _, b in added)
    return f"{low:+,.0f}" if round(low) == round(high) else f"{low:+,.0f} to {high:+,.0f}"


def _memory_budget_lines(results: Results) -> list[tuple[bool, str]]:
    lines: list[tuple[bool, str]] = []
    for k in results.loops:
        for v in LIVE_TASK_BUDGETED:
            added = live_task_bytes(results, v, k)
            if not added:
                continue
            worst = max(b for _, b in added)
            met = worst < LIVE_TASK_BUDGET
            margin = LIVE_TASK_BUDGET - worst
            counts = " / ".join(f"{n:,}" for n, _ in added)
            lines.append(
                (
                    met,
                    f"**{'met' if met else 'MISSED'}**: loopwatch state per live task"
                    f" (`{v}` vs `off`), {k}: {_bytes_range(added)} bytes at {counts} pending"
                    f" tasks; budget < {LIVE_TASK_BUDGET:,.0f} bytes (judged on the largest),"
                    f" {'by' if met else 'over by'} {abs(margin):,.0f} bytes",
                )
            )
    for row in results.memory:
        churn = row["churn"]
        before, after = churn["before"]["tracked"], churn["after"]["tracked"]
        if before is None or after is None:
            continue
        base = _memory_row(results, BASELINE, row["loop"])
        blocks = churn["after"]["blocks"] - churn["before"]["blocks"]
        base_blocks = (
            base["churn"]["after"]["blocks"] - base["churn"]["before"]["blocks"]
            if base is not None
            else None
        )
        # A leak of one object per task would be `tasks` blocks; allow one per 100 tasks of noise.
        met = after == before and blocks < churn["tasks"] / 100
        lines.append(
            (
                met,
                f"**{'met' if met else 'MISSED'}**: state after {churn['tasks']:,} tasks created"
                f" and finished (`{row['variant']}`), {row['loop']}: tracked entries"
                f" {before['entries']} -> {after['entries']}, coroutine table rows"
                f" {before['rows']} -> {after['rows']}, live Python blocks {blocks:+,}"
                + (f" (`off`: {base_blocks:+,})" if base_blocks is not None else "")
                + "; budget: back to the starting size",
            )
        )
    return lines


def _startup_budget_lines(results: Results) -> list[tuple[bool, str]]:
    lines: list[tuple[bool, str]] = []
    pth = results.meta.get("pth_line_ns")
    for row in results.startup:
        if row.setting != "unset":
            continue
        cumulative = statistics.median(row.cumulative_us)
        met = cumulative < 1000 and not row.modules
        extra = f"; the `.pth` line itself {pth:,.0f} ns" if pth is not None and not lines else ""
        lines.append(
            (
                met,
                f"**{'met' if met else 'MISSED'}**: start-up with LOOPWATCH unset,"
                f' `python -c "{row.snippet}"`: {len(row.modules)} loopwatch modules,'
                f" {cumulative:,.0f} us of loopwatch import (budget < 1 ms, 0 modules){extra}",
            )
        )
    return lines


def budget_lines(results: Results) -> list[tuple[bool, str]]:
    lines: list[tuple[bool, str]] = []
    for budget in BUDGETS:
        if (
            budget.variant not in results.variants
            or budget.reference not in results.variants
            or budget.workload not in results.workloads
        ):
            continue
        lines += [
            _speed_budget_line(results, budget, k) for k in results.loops if k in budget.loops
        ]
    lines += _memory_budget_lines(results)
    lines += _startup_budget_lines(results)
    return lines
