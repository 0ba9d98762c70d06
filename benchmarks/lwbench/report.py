"""The Markdown report of a run (``render_markdown``: budgets, per-unit costs, the alternatives,
the HTTP services, the probe, the overhead table, memory, start-up), and the run as JSON
(``--json``) and back (``--report``).
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from typing import Any

from .budgets import _bytes_range, _memory_row, _num, _pct, budget_lines, live_task_bytes
from .common import BASELINE, WITHIN
from .harness import Results
from .startup import STARTUP_SNIPPETS, StartupRow
from .stats import Cell, added_ns, compare, spread
from .variants import INCREMENTS, VARIANTS
from .worker import PROBE_SLOW_BLOCK, PROBE_STALL_BLOCK, PROBE_THRESHOLDS
from .workloads import WORKLOADS


def _wakes(cell: Cell) -> str:
    known = [w for w in cell.wakes if w is not None]
    return f"{statistics.median(known):.1f}" if known else ""


def render_markdown(results: Results) -> str:
    m = results.meta
    out = [
        "# loopwatch benchmarks",
        "",
        f"- Date: {m['date']}",
        f"- Machine: {m['cpu_count']} CPUs ({m['cpu']}), {m['platform']}",
        f"- Python: {m['python']} ({m['executable']})",
        f"- loopwatch {m['loopwatch']}; uvloop {m['uvloop']}",
        f"- Mode: {m['mode']}: {m['rounds']} rounds; each value is one fresh process"
        f" ({m['warmup']} warm-up run, {WITHIN[m.get('within', 'median')]} of {m['repeats']}"
        " timed runs); variants interleaved"
        f" within each round; {m['elapsed_s']} s in all",
        f"- Load average (1 / 5 / 15 min) at the start {m.get('load_start', '?')}, at the end"
        f" {m.get('load_end', '?')}, with {m['cpu_count']} CPUs: above 1 means something else"
        " was running, and the noise grows",
        "",
        "## Budgets",
        "",
    ]
    out += [f"- {text}" for _, text in budget_lines(results)] or ["- (no budgeted pair was run)"]
    out += render_increments(results)
    out += render_alternatives(results)
    out += render_http(results)
    out += render_probes(results)
    out += [
        "",
        "## Overhead",
        "",
        "`median` and its spread (IQR from 5 rounds on, else min to max) are over the rounds."
        " `vs off` is the variant's median over the `off` median of the same loop, in the"
        " workload's unit; `overhead` is the extra time per operation that implies (positive:"
        " slower). `paired` is the median of the overhead computed within each round (against"
        " the `off` run next to it in time), with a distribution-free confidence interval for"
        " that median: the uncertainty of the overhead. `wakes/s`: how often the watchdog"
        " thread (or the control's thread) woke during the timed runs, median over the rounds"
        " (from its voluntary context switches).",
        "",
        "| workload | loop | variant | median | spread of rounds | vs off | overhead"
        " | paired (CI) | wakes/s |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for w in results.workloads:
        workload = WORKLOADS[w]
        for k in results.loops:
            base = results.cells[(w, k, BASELINE)]
            for v in results.variants:
                cell = results.cells[(w, k, v)]
                low, high, kind = spread(cell.values)
                rel = (high - low) / cell.median * 100.0
                row = [
                    w,
                    k,
                    v,
                    f"{_num(cell.median)} {workload.unit}",
                    f"{_num(low)} - {_num(high)} ({kind}, {rel:.1f}%)",
                ]
                if v == BASELINE:
                    row += ["1", "", ""]
                else:
                    c = compare(workload, cell, base)
                    row += [
                        f"{c.ratio:.3f}",
                        _pct(c.overhead),
                        f"{_pct(c.paired)} ({c.ci_level:.0%}: {_pct(c.ci_low)} to"
                        f" {_pct(c.ci_high)})",
                    ]
                row.append(_wakes(cell))
                out.append("| " + " | ".join(row) + " |")
    out += ["", "Workloads:", ""]
    out += [f"- `{w}`: {WORKLOADS[w].doc}" for w in results.workloads]
    out += ["", "Variants:", ""]
    out += [f"- `{v}`: {VARIANTS[v].doc}" for v in results.variants]
    if results.memory:
        out += render_memory(results)
    if results.startup:
        out += render_startup(results.startup, results.meta.get("pth_line_ns"))
    return "\n".join(out) + "\n"


def shown_variants(results: Results) -> list[str]:
    """The variants of the summary table and the chart: loopwatch's and the alternatives."""
    return [
        v
        for v in results.variants
        if v != BASELINE and VARIANTS[v].group in ("loopwatch", "alternative")
    ]


def overhead_table(results: Results) -> tuple[list[tuple[str, str]], dict[str, list[float]]]:
    """(columns as (workload, loop)) and, per variant, its overhead vs `off` in each column:
    the extra time per operation in percent (for HTTP, the requests per second lost)."""
    columns = [(w, k) for w in results.workloads for k in results.loops]
    table: dict[str, list[float]] = {}
    for v in shown_variants(results):
        row = []
        for w, k in columns:
            cell, base = results.cells[(w, k, v)], results.cells[(w, k, BASELINE)]
            workload = WORKLOADS[w]
            if workload.http:
                row.append((1.0 - cell.median / base.median) * 100.0)
            else:
                row.append(compare(workload, cell, base).overhead)
        table[v] = row
    return columns, table


def render_alternatives(results: Results) -> list[str]:
    columns, table = overhead_table(results)
    if not table:
        return []
    out = [
        "",
        "## loopwatch next to the alternatives",
        "",
        "Overhead against the plain loop (`off`) of the same kind, from the medians over the"
        " rounds: the extra time per operation in percent, and for the HTTP services the"
        " requests per second lost, in percent. Lower is better; a negative value is noise"
        " (see the paired intervals in the overhead table below).",
        "",
        "| variant | " + " | ".join(f"{w}, {k}" for w, k in columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for v, row in table.items():
        out.append(f"| `{v}` | " + " | ".join(f"{x:+.1f}%" for x in row) + " |")
    inert = [
        f"- `{v}` on {k}: {why}."
        for v in table
        for k, why in VARIANTS[v].inert.items()
        if k in results.loops
    ]
    if inert:
        out += ["", *inert]
    return out


def _latency(cell: Cell, key: str) -> str:
    known = [x[key] for x in cell.latency if key in x]
    return f"{statistics.median(known):.2f} ms" if known else ""


def render_http(results: Results) -> list[str]:
    http = [w for w in results.workloads if WORKLOADS[w].http]
    if not http:
        return []
    plan = results.meta.get("http", {})
    out = [
        "",
        "## HTTP services",
        "",
        f"The server runs in the worker process on the variant's loop; wrk ({plan.get('wrk')})"
        f" loads it from another process with {plan.get('threads')} thread and"
        f" {plan.get('connections')} keep-alive connections for {plan.get('seconds')} s per"
        f" run, the same for every variant ({plan.get('warmup')} warm-up run and"
        f" {plan.get('repeats')} timed per process, {plan.get('rounds')} interleaved rounds)."
        " Requests per second: median over the rounds; latency percentiles: wrk's, of the"
        " same runs, median over the rounds.",
        "",
        "| service | loop | variant | requests/s | vs off | p50 | p90 | p99 |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for w in http:
        for k in results.loops:
            base = results.cells[(w, k, BASELINE)]
            for v in results.variants:
                cell = results.cells[(w, k, v)]
                ratio = "1" if v == BASELINE else f"{cell.median / base.median:.3f}"
                out.append(
                    f"| {w} | {k} | {v} | {_num(cell.median)} | {ratio}"
                    f" | {_latency(cell, 'p50')} | {_latency(cell, 'p90')}"
                    f" | {_latency(cell, 'p99')} |"
                )
    versions = plan.get("packages", {})
    if versions:
        names = ", ".join(f"{d} {versions[d]}" for d in versions if versions[d])
        out += ["", f"Packages: {names}."]
    return out


def _probe_word(value: int | None) -> str:
    if value is None:
        return "not claimed"
    return "yes" if value > 0 else "**no**"


def render_probes(results: Results) -> list[str]:
    if not results.probes:
        return []
    slow, stall = PROBE_THRESHOLDS["slow"] * 1000, PROBE_THRESHOLDS["stall"] * 1000
    out = [
        "",
        "## What each variant detects",
        "",
        "The probe, run before the rounds in a process of its own per variant and loop, with the"
        f" thresholds lowered to {slow:.0f} ms (slow callback) and {stall:.0f} ms (stall): a"
        f" task step that blocks the loop for {PROBE_SLOW_BLOCK * 1000:.0f} ms, then one that"
        f" blocks it for {PROBE_STALL_BLOCK * 1000:.0f} ms. `slow callback`: reported once the"
        " first block ended (loopwatch's `slow_callback` counter, debug mode's and aiodebug's"
        " warnings); `stall, while blocked`: reported while the second block was still going"
        f" on (sampled {PROBE_STALL_BLOCK * 900:.0f} ms into it: loopwatch's `loop_stalled`"
        " counter, aiodebug's stack files, pyleak's blocks). pyleak has one threshold, and"
        " reports a block while it lasts. OpenTelemetry detects no blocking: its row shows"
        " that it counted the probe's coroutines.",
        "",
        "| variant | loop | slow callback | stall, while blocked | note |",
        "|---|---|---|---|---|",
    ]
    for row in results.probes:
        v, k = row["variant"], row["loop"]
        note = VARIANTS[v].inert.get(k, "") if v in VARIANTS else ""
        if row.get("otel_coroutines") is not None:
            note = f"counted {row['otel_coroutines']} coroutine(s) of the probe"
        if v == "pyleak":
            slow_word = _probe_word(row.get("slow_block_stalls"))
        else:
            slow_word = _probe_word(row.get("slow"))
        out.append(
            f"| `{v}` | {k} | {slow_word} | {_probe_word(row.get('stall_while_blocked'))}"
            f" | {note} |"
        )
    return out


def render_increments(results: Results) -> list[str]:
    pairs = [
        (v, ref, what)
        for v, ref, what in INCREMENTS
        if v in results.variants and ref in results.variants
    ]
    if not pairs:
        return []
    out = [
        "",
        "## Per-unit costs",
        "",
        "What each feature adds, in nanoseconds per operation (ns): the variant's median time per"
        " operation minus that of the variant it adds to, and in brackets the confidence"
        " interval of the same difference taken within each round. On `sleep0` an operation is"
        " one task step; on `churn`, one task created (and run, and gathered); on `echo` and"
        " `pingpong`, one round trip (several task steps).",
        "",
        "| adds | variant vs | loop | "
        + " | ".join(f"{w} (ns per {WORKLOADS[w].operation})" for w in results.workloads)
        + " |",
        "|---|---|---|" + "---:|" * len(results.workloads),
    ]
    for v, ref, what in pairs:
        for k in results.loops:
            cells = []
            for w in results.workloads:
                a = added_ns(WORKLOADS[w], results.cells[(w, k, v)], results.cells[(w, k, ref)])
                cells.append(f"{a.ns:+,.0f} ({a.ci_low:+,.0f} to {a.ci_high:+,.0f})")
            out.append(f"| {what} | `{v}` vs `{ref}` | {k} | " + " | ".join(cells) + " |")
    if results.memory:
        out += ["", "Memory, from the section below:", ""]
        for k in results.loops:
            parts = []
            for v in results.variants:
                added = live_task_bytes(results, v, k)
                if v != BASELINE and added:
                    parts.append(f"`{v}` {_bytes_range(added)}")
            out.append(f"- bytes per live task over the plain loop, {k}: " + ", ".join(parts))
        for k in results.loops:
            parts = []
            for v in results.variants:
                row = _memory_row(results, v, k)
                if row is None:
                    continue
                churn = row["churn"]
                blocks = churn["after"]["blocks"] - churn["before"]["blocks"]
                tracked = churn["after"]["tracked"]
                entries = f", {tracked['entries']} entries" if tracked else ""
                parts.append(f"`{v}` {blocks:+,} blocks{entries}")
            out.append(
                f"- after {results.memory[0]['churn']['tasks']:,} tasks churned, {k}: "
                + ", ".join(parts)
            )
    return out


def _mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value / 1048576:+.2f} MiB"


def render_memory(results: Results) -> list[str]:
    first = results.memory[0]
    counts = [m["tasks"] for m in first["live"]]
    churn_n, traced_n = first["churn"]["tasks"], first["churn"]["traced_tasks"]
    out = [
        "",
        "## Memory",
        "",
        "Per live task: N tasks created and left pending on one future, measured with"
        " tracemalloc (every allocation of the interpreter, C and Python: the tasks, their"
        " coroutines, loopwatch's entries and proxies), in bytes per task; `+` is the difference"
        " to the plain loop of the same kind at the same N: what loopwatch keeps for each live"
        " task. Its live-task dict is part of that, and its share per task depends on where N"
        " falls between two resizes of the dict, hence several N.",
        "",
        "| loop | variant | "
        + " | ".join(f"N = {n:,}" for n in counts)
        + " | tracked entries (largest N) |",
        "|---|---|" + "---:|" * (len(counts) + 1),
    ]
    for row in results.memory:
        added = dict(live_task_bytes(results, row["variant"], row["loop"]))
        cells = []
        for m in row["live"]:
            extra = "" if row["variant"] == BASELINE else f" ({added[m['tasks']]:+,.0f})"
            cells.append(f"{m['bytes_per_task']:,.0f}{extra}")
        tracked = row["live"][-1]["tracked"]
        out.append(
            f"| {row['loop']} | {row['variant']} | "
            + " | ".join(cells)
            + f" | {tracked['entries'] if tracked else ''} |"
        )
    out += [
        "",
        f"After churn: {churn_n:,} tasks created and finished (the `churn` workload, after a"
        " warm-up of 10,000), with the state before and after: loopwatch's tracked entries"
        " (`tracker_of(loop).active`) and coroutine table rows, the interpreter's live blocks"
        " (`sys.getallocatedblocks()`; a leak of one object per task would be"
        f" +{churn_n:,}) and the RSS; then, under tracemalloc, the traced bytes still allocated"
        f" after {traced_n:,} more tasks, counted from after a first {traced_n:,} (so that"
        " tables reallocated as they are reused count on both sides).",
        "",
        "| loop | variant | entries | table rows | live blocks | RSS | traced after"
        f" {traced_n:,} more | ns/task |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in results.memory:
        churn = row["churn"]
        before, after = churn["before"], churn["after"]
        tb, ta = before["tracked"], after["tracked"]
        rss = (
            after["rss"] - before["rss"]
            if after["rss"] is not None and before["rss"] is not None
            else None
        )
        entries = f"{tb['entries']} -> {ta['entries']}" if tb and ta else ""
        rows = f"{tb['rows']} -> {ta['rows']}" if tb and ta else ""
        out.append(
            f"| {row['loop']} | {row['variant']} | {entries} | {rows}"
            f" | {after['blocks'] - before['blocks']:+,} | {_mib(rss)}"
            f" | {churn['traced_growth']:+,} B"
            f" | {churn['seconds'] * 1e9 / churn['tasks']:,.0f} |"
        )
    return out


def render_startup(rows: list[StartupRow], pth_ns: float | None = None) -> list[str]:
    out = [
        "",
        "## Start-up",
        "",
        f"Wall time of a whole `python -c ...` process (median, IQR over {len(rows[0].wall_ms)}"
        " interleaved runs) and, from `python -X importtime`, the import time of loopwatch's own"
        " modules (`self`) and of everything the outermost loopwatch imports pulled in"
        f" (`cumulative`), median of {len(rows[0].self_us)} runs.",
        "",
        "| command | LOOPWATCH | wall time | loopwatch self | loopwatch cumulative |",
        "|---|---|---:|---:|---:|",
    ]
    walls: dict[tuple[str, str], float] = {}
    for row in rows:
        q1, q3, _ = spread(row.wall_ms)
        wall = walls[(row.snippet, row.setting)] = statistics.median(row.wall_ms)
        out.append(
            f'| `python -c "{row.snippet}"` | {row.setting} | {wall:.1f} ms ({q1:.1f} - {q3:.1f})'
            f" | {statistics.median(row.self_us):,.0f} us"
            f" | {statistics.median(row.cumulative_us):,.0f} us |"
        )
    out.append("")
    if pth_ns is not None:
        out.append(
            f"- With LOOPWATCH unset, loopwatch's whole start-up cost is the `loopwatch.pth` line"
            f" reading `os.environ`: {pth_ns:,.0f} ns per interpreter (timeit, best of 5)."
        )
    for snippet in STARTUP_SNIPPETS:
        if (snippet, "unset") not in walls or (snippet, "1") not in walls:
            continue
        base, on = walls[(snippet, "unset")], walls[(snippet, "1")]
        out.append(
            f'- `python -c "{snippet}"`: LOOPWATCH=1 costs {on - base:+.1f} ms'
            f" ({(on / base - 1.0) * 100.0:+.1f}%) over LOOPWATCH unset."
        )
    for row in rows:
        if row.modules:
            names = ", ".join(f"`{n}`" for n in row.modules)
            out.append(f"- Imported by `{row.snippet}` with LOOPWATCH={row.setting}: {names}.")
        elif row.setting == "unset":
            out.append(f"- `{row.snippet}` with LOOPWATCH unset imports no loopwatch module.")
    return out


def results_json(results: Results) -> dict[str, Any]:
    return {
        "meta": results.meta,
        "budgets": [{"met": met, "text": text} for met, text in budget_lines(results)],
        "cells": [
            {
                "workload": c.workload,
                "loop": c.loop,
                "variant": c.variant,
                "unit": WORKLOADS[c.workload].unit,
                "values": c.values,
                "runs": c.runs,
                "median": c.median,
                "wakes_per_s": c.wakes,
                "latency": c.latency,
            }
            for c in results.cells.values()
        ],
        "memory": results.memory,
        "probes": results.probes,
        "startup": [
            {
                "snippet": r.snippet,
                "loopwatch": r.setting,
                "wall_ms": r.wall_ms,
                "self_us": r.self_us,
                "cumulative_us": r.cumulative_us,
                "modules": r.modules,
            }
            for r in results.startup
        ],
    }


def results_from_json(data: Mapping[str, Any], within: str | None = None) -> Results:
    """The inverse of :func:`results_json`, to render a saved run again (``--report``), with
    each process's value taken from its runs again if ``within`` says how."""
    meta = dict(data["meta"])
    cells: dict[tuple[str, str, str], Cell] = {}
    for c in data["cells"]:
        runs = [[float(x) for x in r] for r in c.get("runs", [])]
        values = [float(v) for v in c["values"]]
        if within is not None and runs:
            values = [WORKLOADS[c["workload"]].within(r, within) for r in runs]
            meta["within"] = within
        cells[(c["workload"], c["loop"], c["variant"])] = Cell(
            c["workload"],
            c["loop"],
            c["variant"],
            values,
            list(c.get("wakes_per_s", [])),
            runs,
            list(c.get("latency", [])),
        )
    startup = [
        StartupRow(
            r["snippet"],
            r["loopwatch"],
            r["wall_ms"],
            r["self_us"],
            r["cumulative_us"],
            r["modules"],
        )
        for r in data["startup"]
    ]
    return Results(
        meta=meta,
        workloads=list(dict.fromkeys(w for w, _, _ in cells)),
        loops=list(dict.fromkeys(k for _, k, _ in cells)),
        variants=list(dict.fromkeys(v for _, _, v in cells)),
        cells=cells,
        startup=startup,
        # Runs saved before several N were measured per live task have one dict there.
        memory=[
            {**row, "live": row["live"] if isinstance(row["live"], list) else [row["live"]]}
            for row in data.get("memory", [])
        ],
        probes=list(data.get("probes", [])),
    )
