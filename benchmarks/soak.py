"""Soak: a watched loop under a flood for minutes; memory over time, log folding, exact counts.

Not run in CI. Each cycle of the flood, on one watched loop (stock asyncio or uvloop):

- ``--tasks`` short tasks (created, run, finished; a few fail, a few are cancelled),
- ``--unawaited`` coroutines created and dropped without being awaited,
- one task step that holds the loop past the slow-callback threshold, alternating between
  ``--places`` places in the code so the log has something to fold per place.

Every ``--every`` seconds it prints the resident set size, Python's allocated blocks, live
tracked tasks, the counters, and the JSON log's line count. At the end it checks that every
counter equals what the flood did (exact), that the log was folded (far fewer lines than events,
and the lines' ``folded`` counts add up), and that memory after warm-up stayed within
``--max-growth-mb``; it exits 1 if not.

    python benchmarks/soak.py --minutes 2 --loop uvloop
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import resource
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import loopwatch
from loopwatch import _runtime
from loopwatch._tasks import TaskStats


def registry() -> Any:
    """The active runtime's registry of watched loops."""
    runtime = _runtime.current()
    assert runtime is not None
    return runtime.loops


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


async def short(i: int) -> int:
    await asyncio.sleep(0)
    if i % 50 == 0:
        raise ValueError("flood")
    return i


async def forgotten() -> None:
    pass


def hold(seconds: float) -> None:
    time.sleep(seconds)


async def slow_at_place(place: int, seconds: float) -> None:
    # Each branch is its own line: a place of its own for the log to fold on.
    if place == 0:  # noqa: SIM114 - one place per branch
        hold(seconds)
    elif place == 1:  # noqa: SIM114
        hold(seconds)
    elif place == 2:
        hold(seconds)
    else:
        hold(seconds)
    await asyncio.sleep(0)


class Flood:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tasks = 0
        self.failed = 0
        self.cancelled = 0
        self.unawaited = 0
        self.slow = 0
        self.cycles = 0
        self.totals = TaskStats()

    async def cycle(self) -> None:
        args = self.args
        loop = asyncio.get_running_loop()
        batch = [loop.create_task(short(i)) for i in range(args.tasks)]
        cancel = loop.create_task(asyncio.sleep(10))
        batch.append(cancel)
        self.tasks += args.tasks + 1
        cancel.cancel()
        results = await asyncio.gather(*batch, return_exceptions=True)
        self.failed += sum(isinstance(r, ValueError) for r in results)
        self.cancelled += 1
        for _ in range(args.unawaited):
            forgotten()  # type: ignore[unused-coroutine]
        self.unawaited += args.unawaited
        await loop.create_task(slow_at_place(self.cycles % args.places, args.hold_ms / 1000))
        self.tasks += 1
        self.slow += 1
        self.cycles += 1

    async def run(self, log: Path) -> list[dict[str, Any]]:
        args = self.args
        rows: list[dict[str, Any]] = []
        start = time.monotonic()
        next_report = start
        baseline: float | None = None
        while (now := time.monotonic()) - start < args.minutes * 60:
            await self.cycle()
            if now >= next_report:
                gc.collect()
                row = self.row(now - start, log)
                if baseline is None and now - start >= args.warmup:
                    baseline = row["rss_mb"]
                row["growth_mb"] = row["rss_mb"] - baseline if baseline is not None else 0.0
                rows.append(row)
                print(format_row(row), flush=True)
                next_report = now + args.every
        self.totals = registry().task_totals()  # before the Runner's own closing tasks
        return rows

    def row(self, elapsed: float, log: Path) -> dict[str, Any]:
        runtime = _runtime.current()
        assert runtime is not None
        counts = runtime.dispatcher.counts
        lines = log.read_text().count("\n") if log.exists() else 0
        return {
            "t_s": round(elapsed, 1),
            "rss_mb": round(rss_mb(), 1),
            "blocks": sys.getallocatedblocks(),
            "live_tasks": runtime.loops.active_tasks(),
            "tasks": runtime.loops.task_totals().created,
            "slow": counts["loopwatch.slow_callback"],
            "unawaited": counts["loopwatch.coroutine_never_awaited"],
            "log_lines": lines,
        }


def format_row(row: dict[str, Any]) -> str:
    return (
        f"{row['t_s']:7.1f}s  rss {row['rss_mb']:7.1f} MB (+{row['growth_mb']:5.1f})  "
        f"blocks {row['blocks']:9d}  live tasks {row['live_tasks']:5d}  "
        f"tasks {row['tasks']:9d}  slow {row['slow']:6d}  never-awaited {row['unawaited']:8d}  "
        f"log lines {row['log_lines']:5d}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    parser.add_argument("--tasks", type=int, default=200, help="short tasks per cycle")
    parser.add_argument("--unawaited", type=int, default=50, help="dropped coroutines per cycle")
    parser.add_argument("--places", type=int, default=4, help="places the slow steps rotate over")
    parser.add_argument("--hold-ms", type=float, default=6.0, help="each slow step (threshold 5)")
    parser.add_argument("--every", type=float, default=10.0, help="seconds between reports")
    parser.add_argument("--warmup", type=float, default=10.0, help="seconds before the baseline")
    parser.add_argument("--max-growth-mb", type=float, default=16.0)
    parser.add_argument("--json", type=Path, help="write the rows and the verdict here")
    args = parser.parse_args()

    warnings.simplefilter("ignore", RuntimeWarning)  # the never-awaited warnings, by design
    log = Path(tempfile.mkdtemp(prefix="loopwatch-soak-")) / "events.jsonl"
    loopwatch.install(
        slow_callback_ms=5, log="json", log_file=str(log), log_fold_ms=2000, stall_ms=60_000
    )
    factory = loopwatch.new_uvloop_event_loop if args.loop == "uvloop" else loopwatch.new_event_loop
    flood = Flood(args)
    # Slow steps of the flood's own, told from true slow steps elsewhere (a gc.collect() in a
    # report, or the machine's load, can hold the loop 5 ms too): counted by their coroutine.
    ours: list[int] = [0]
    runtime = _runtime.current()
    assert runtime is not None
    runtime.dispatcher.add_sink(
        lambda e: ours.__setitem__(0, ours[0] + (getattr(e, "coroutine", None) == "slow_at_place"))
    )
    print(
        f"soak: {args.minutes} min on {args.loop}, Python {sys.version.split()[0]}, "
        f"pid {os.getpid()}, log {log}",
        flush=True,
    )
    with asyncio.Runner(loop_factory=factory) as runner:
        rows = runner.run(flood.run(log))
    runtime = _runtime.current()
    assert runtime is not None
    counts = dict(runtime.dispatcher.counts)
    totals = flood.totals
    loopwatch.uninstall()  # closes the log: what the fold held back is written now
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    logged = {
        name: sum(e.get("folded", 1) for e in lines if e["event"] == name)
        for name in ("loopwatch.slow_callback", "loopwatch.coroutine_never_awaited")
    }
    checks = {
        "tasks created exact (and the Runner's main task)": totals.created == flood.tasks + 1,
        "tasks failed exact": totals.error == flood.failed,
        "tasks cancelled exact": totals.cancelled == flood.cancelled,
        "never-awaited exact": counts.get("loopwatch.coroutine_never_awaited", 0)
        == flood.unawaited,
        "slow steps exact": ours[0] == flood.slow,
        "log folded (lines < events / 20)": len(lines) * 20 < flood.slow + flood.unawaited,
        "folded counts add up": logged
        == {
            "loopwatch.slow_callback": counts.get("loopwatch.slow_callback", 0),
            "loopwatch.coroutine_never_awaited": counts.get("loopwatch.coroutine_never_awaited", 0),
        },
        f"rss growth after warm-up <= {args.max_growth_mb} MB": max(
            (r["growth_mb"] for r in rows), default=0.0
        )
        <= args.max_growth_mb,
        "no other finding": {name for name, n in counts.items() if n}
        <= {"loopwatch.slow_callback", "loopwatch.coroutine_never_awaited"},
    }
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"\nflood: {flood.cycles} cycles, {flood.tasks} tasks ({flood.failed} failed, "
        f"{flood.cancelled} cancelled), {flood.unawaited} never awaited, {flood.slow} slow steps"
    )
    print(f"counted: tasks {totals.created}, events {counts}; slow steps of the flood {ours[0]}")
    print(
        f"log: {len(lines)} lines for {flood.slow + flood.unawaited} events; peak RSS {peak:.1f} MB"
    )
    for name, ok in checks.items():
        print(f"  {'ok  ' if ok else 'FAIL'} {name}")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "checks": checks}, indent=1))
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
