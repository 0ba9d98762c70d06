"""What watching costs, measured inside one process: the plain loop and the watched loop taking
turns, many times, each turn a fresh loop; the median of the paired ratios, with a
distribution-free confidence interval.

`bench.py` measures each variant in fresh processes, which is what a program pays, but on a shared
2-core VM the spread between processes (memory layout, hash seeds, the host's load) can reach tens
of percent, far above the budgets (2 to 12%). Here both variants run in the same process, one turn
after the other, so what differs between a pair is only whether the loop is watched.

    python benchmarks/inprocess.py                     # every workload, both loops, 31 pairs
    python benchmarks/inprocess.py --pairs 61 --workloads churn --loops uvloop
    python benchmarks/inprocess.py --variant step_timing=0 --json out.json
    python benchmarks/inprocess.py --report 3.11.json 3.12.json 3.13.json   # a Markdown table
    python benchmarks/inprocess.py --step-clocks --workloads sleep0   # counter vs clock, watched
    python benchmarks/inprocess.py --clock cpu --workloads echo       # CPU time, not wall time

`--clock cpu` times each run by the process's CPU time (`time.process_time()`: every thread,
loopwatch's included) instead of the wall clock: on a shared VM the wall clock also counts the
time the host gave to others (steal, other processes), which is most of the noise, while what
watching adds is CPU work. A workload that waits (echo waits in epoll now and then) is timed
only while it runs, so a cost that delays the loop without using the CPU would not show: read
both.

The budgets judged are issue 14's: the default settings against the plain loop, echo <= 2% on
both loops, callbacks <= 3%, sleep0 <= 3% (asyncio) / 5% (uvloop), churn <= 10% / 12%.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import statistics
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lwbench.stats import median_interval
from lwbench.workloads import WORKLOADS, use_clock

import loopwatch
from loopwatch._native import ACCEL

BUDGETS = {
    ("echo", "asyncio"): 2.0,
    ("echo", "uvloop"): 2.0,
    ("callbacks", "asyncio"): 3.0,
    ("callbacks", "uvloop"): 3.0,
    ("sleep0", "asyncio"): 3.0,
    ("sleep0", "uvloop"): 5.0,
    ("churn", "asyncio"): 10.0,
    ("churn", "uvloop"): 12.0,
}
SIZES = {"sleep0": 100, "echo": 400, "churn": 40, "callbacks": 400}


def new_loop(kind: str) -> asyncio.AbstractEventLoop:
    if kind == "uvloop":
        import uvloop

        return uvloop.new_event_loop()  # type: ignore[no-any-return]
    return asyncio.SelectorEventLoop()


def one_run(
    kind: str,
    workload: Callable[[int], Coroutine[Any, Any, tuple[float, int]]],
    size: int,
    settings: dict[str, Any] | None,
) -> float:
    """Seconds per operation of one run on a fresh loop (watched with ``settings``, or plain)."""
    loop = new_loop(kind)
    try:
        if settings is not None:
            loopwatch.install(loop, log="off", **settings)
        gc.collect()
        seconds, operations = loop.run_until_complete(workload(size))
        return seconds / operations
    finally:
        loop.close()
        if settings is not None:
            loopwatch.uninstall()


def measure(
    kind: str,
    name: str,
    pairs: int,
    settings: dict[str, Any],
    size: int,
    clocks: bool = False,
) -> dict[str, Any]:
    """Watched against plain; with ``clocks``, both watched, task steps timed with the
    processor's counter against with the monotonic clock (the compiled module's two clocks)."""
    workload = WORKLOADS[name].run

    def a_run() -> float:
        if clocks:
            ACCEL.use_tsc(True)
        return one_run(kind, workload, size, settings)

    def b_run() -> float:
        if clocks:
            ACCEL.use_tsc(False)
            return one_run(kind, workload, size, settings)
        return one_run(kind, workload, size, None)

    for _ in range(2):  # warm-up, both ways
        b_run()
        a_run()
    ratios: list[float] = []
    plain_times: list[float] = []
    for i in range(pairs):
        # Alternate which goes first: a drift in time then cancels out.
        if i % 2:
            watched = a_run()
            plain = b_run()
        else:
            plain = b_run()
            watched = a_run()
        ratios.append(watched / plain)
        plain_times.append(plain)
    overheads = [100.0 * (r - 1.0) for r in ratios]
    median = statistics.median(overheads)
    low, high, coverage = median_interval(overheads)
    return {
        "workload": name,
        "loop": kind,
        "pairs": pairs,
        "overhead_pct": median,
        "ci_low": low,
        "ci_high": high,
        "coverage": coverage,
        "plain_ns_per_op": 1e9 * statistics.median(plain_times),
        "added_ns_per_op": 1e9 * statistics.median(plain_times) * median / 100.0,
    }


def verdict(result: dict[str, Any]) -> str:
    """'met' or 'MISSED' against issue 14's budget, and whether the interval is on one side."""
    budget = BUDGETS.get((result["workload"], result["loop"]))
    if budget is None:
        return ""
    met = result["overhead_pct"] <= budget
    inside = result["ci_high"] <= budget or result["ci_low"] > budget
    return f"{'met' if met else 'MISSED'} ({'clearly' if inside else 'not clearly'})"


def report(paths: list[Path]) -> str:
    """A Markdown table of runs saved with --json (one column per Python)."""
    runs = [json.loads(p.read_text()) for p in paths]
    runs = [
        r if isinstance(r, dict) else {"python": p.stem, "results": r}
        for r, p in zip(runs, paths, strict=True)
    ]
    pythons = [r["python"] for r in runs]
    head = "| workload | loop | budget | " + " | ".join(pythons) + " |"
    rows = [head, "| --- | --- | ---: |" + " --- |" * len(pythons)]
    keys = [(r["workload"], r["loop"]) for r in runs[0]["results"]]
    for workload, kind in keys:
        cells = []
        for run in runs:
            found = [r for r in run["results"] if (r["workload"], r["loop"]) == (workload, kind)]
            if not found:
                cells.append("-")
                continue
            r = found[0]
            cells.append(
                f"{r['overhead_pct']:+.1f}% ({r['ci_low']:+.1f} to {r['ci_high']:+.1f}), "
                f"{r['added_ns_per_op']:+,.0f} ns of {r['plain_ns_per_op']:,.0f}: {verdict(r)}"
            )
        budget = BUDGETS.get((workload, kind))
        limit = f"<= {budget:g}%" if budget else "-"
        rows.append(f"| {workload} | {kind} | {limit} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=31)
    parser.add_argument("--workloads", default="sleep0,echo,churn,callbacks")
    parser.add_argument("--loops", default="asyncio,uvloop")
    parser.add_argument(
        "--variant",
        default="",
        help="settings of the watched side, as name=value,... (default: the defaults)",
    )
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="time runs by the wall clock (default) or by the process's CPU time",
    )
    parser.add_argument(
        "--step-clocks",
        action="store_true",
        help="compare task steps timed with the processor's counter against the clock",
    )
    parser.add_argument(
        "--report", type=Path, nargs="+", help="print a Markdown table of these --json runs"
    )
    args = parser.parse_args()
    if args.report:
        print(report(args.report))
        return 0
    if args.step_clocks and (ACCEL is None or not ACCEL.use_tsc(True)):
        print("the compiled module does not time steps with the counter here", file=sys.stderr)
        return 1
    settings: dict[str, Any] = {}
    for item in filter(None, args.variant.split(",")):
        key, _, value = item.partition("=")
        settings[key.strip()] = value.strip()
    if args.clock == "cpu":
        use_clock(time.process_time)
    started = time.monotonic()
    results = []
    what = "steps timed with the counter vs the clock, both watched" if args.step_clocks else ""
    print(
        f"loopwatch in-process overhead: Python {sys.version.split()[0]}, "
        f"{args.pairs} pairs each, watched with {settings or 'the default settings'}, "
        f"timed by {'CPU time' if args.clock == 'cpu' else 'the wall clock'}"
        + (f"; {what}" if what else "")
    )
    for name in args.workloads.split(","):
        for kind in args.loops.split(","):
            result = measure(kind, name, args.pairs, settings, SIZES[name], args.step_clocks)
            results.append(result)
            budget = BUDGETS.get((name, kind)) if not settings and not args.step_clocks else None
            judged = f"  budget <= {budget:g}%: {verdict(result)}" if budget is not None else ""
            print(
                f"{name:10} {kind:8} {result['overhead_pct']:+6.2f}% "
                f"({result['coverage']:.0%} CI {result['ci_low']:+.2f}% to "
                f"{result['ci_high']:+.2f}%), "
                f"{result['added_ns_per_op']:+7.0f} ns per op of "
                f"{result['plain_ns_per_op']:,.0f}{judged}",
                flush=True,
            )
    print(f"({time.monotonic() - started:.0f} s)")
    if args.json:
        python = f"{sys.implementation.name} {sys.version.split()[0]}"
        args.json.write_text(
            json.dumps({"python": python, "clock": args.clock, "results": results}, indent=2)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
