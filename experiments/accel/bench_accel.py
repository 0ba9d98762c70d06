"""Per-step and per-task cost of the step-timing proxy: none, pure Python, compiled (prototype).

    python experiments/accel/bench_accel.py [--reps 15] [--tasks 200] [--sleeps 500]
                                            [--churn 100000] [--batch 500] [--loops asyncio,uvloop]

Variants, each run in one process, interleaved (every repetition runs every variant once, in
an order rotated from one repetition to the next), on a fresh loop each time:

  bare     no task factory at all (reference only)
  factory  the minimal task factory below, no proxy: the baseline the proxies are compared to
  py       the same factory, the coroutine wrapped in loopwatch._timing.Timed, built as
           TaskTracker._make_factory builds it (object.__new__, then its slots)
  c        the same factory, the coroutine wrapped in _lwaccel.Timed (one constructor call)
  c-nohook as c, with no owner: no end hook is called (what the compiled proxy costs alone)

Both proxies tell the same Python end hook (Tracker.proxy_ended) when their coroutine ends.
Workloads: "steps" (tasks x sleeps ``await asyncio.sleep(0)``), "churn" (short tasks made with
asyncio.create_task and gathered in batches). Reported: the fastest run of each variant, the
median, and the cost added over "factory" per step / per task (fastest minus fastest, and the
median of the per-repetition differences), by the thread's CPU time (time.thread_time: time the
process spends descheduled on a shared machine does not count) and by wall time.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import hashlib
import json
import os
import platform
import statistics
import sys
import time
from types import CoroutineType

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

import collections.abc  # noqa: E402

import _lwaccel  # noqa: E402

collections.abc.Coroutine.register(_lwaccel.Timed)

import loopwatch._timing as lwt  # noqa: E402

try:
    import uvloop
except ImportError:  # pragma: no cover
    uvloop = None

_CancelledError = asyncio.CancelledError


class Tracker:
    """The end hook both proxies call, once per task."""

    def __init__(self) -> None:
        self.created = self.gone = self.ok = self.errors = self.cancelled = self.steps = 0
        self.busy = 0.0

    def proxy_ended(self, proxy, exc) -> None:
        self.gone += 1
        if exc is None or type(exc) is StopIteration:
            self.ok += 1
        elif isinstance(exc, _CancelledError):
            self.cancelled += 1
        else:
            self.errors += 1
        self.busy += proxy.busy
        self.steps += proxy.steps


# One factory, three ways to make the proxy: only the {make} lines differ.
TEMPLATE = """
def make_factory(tracker, watch, Task, CoroutineType, new, Proxy, monotonic):
    def factory(loop, coro, **kwargs):
        if type(coro) is CoroutineType:
            label = coro.cr_code.co_qualname
{make}
            tracker.created += 1
        return Task(coro, loop=loop, **kwargs)
    return factory
"""
MAKE = {
    "factory": "            pass",
    "py": """            proxy = new(Proxy)
            proxy._coro = coro
            proxy._cfg = watch
            proxy._watch = 0.0
            proxy.busy = proxy.max_step = 0.0
            proxy.steps = proxy.slow_steps = 0
            proxy._leaked = False
            proxy._owner = tracker
            proxy._label = label
            proxy.born = monotonic()
            coro = proxy""",
    "c": """            coro = Proxy(coro, watch, tracker, label)""",
    "c-nohook": """            coro = Proxy(coro, watch, None, label)""",
}
PROXY = {"factory": None, "py": lwt.Timed, "c": _lwaccel.Timed, "c-nohook": _lwaccel.Timed}
VARIANTS = ("bare", "factory", "py", "c", "c-nohook")


def build_factory(variant, tracker, watch):
    if variant == "bare":
        return None
    ns: dict = {}
    exec(TEMPLATE.format(make=MAKE[variant]), ns)
    return ns["make_factory"](
        tracker,
        watch,
        asyncio.Task,
        CoroutineType,
        object.__new__,
        PROXY[variant],
        time.monotonic,
    )


def new_loop(kind):
    if kind == "asyncio":
        return asyncio.SelectorEventLoop()
    return uvloop.new_event_loop()


async def stepper(n):
    sleep = asyncio.sleep
    for _ in range(n):
        await sleep(0)


async def w_steps(args):
    tasks = [asyncio.create_task(stepper(args.sleeps)) for _ in range(args.tasks)]
    await asyncio.gather(*tasks)


async def short():
    return 1


async def w_churn(args):
    create = asyncio.create_task
    batch = args.batch
    for _ in range(args.churn // batch):
        await asyncio.gather(*[create(short()) for _ in range(batch)])


WORKLOADS = {"steps": w_steps, "churn": w_churn}


def units(workload, args):
    if workload == "steps":
        # each stepper takes sleeps+1 steps (the last one returns)
        return args.tasks * (args.sleeps + 1)
    return (args.churn // args.batch) * args.batch


def run_once(kind, variant, workload, args):
    loop = new_loop(kind)
    tracker = Tracker()
    watch = lwt.StepWatch(0.1, None)
    factory = build_factory(variant, tracker, watch)
    if factory is not None:
        loop.set_task_factory(factory)
    gc.collect()
    try:
        start, cpu0 = time.perf_counter(), time.thread_time()
        loop.run_until_complete(WORKLOADS[workload](args))
        took, cpu = time.perf_counter() - start, time.thread_time() - cpu0
    finally:
        loop.close()
    if variant in ("py", "c"):
        n = units(workload, args)
        assert tracker.ok == tracker.gone, (tracker.ok, tracker.gone)
        if workload == "steps":
            assert 0 <= tracker.steps - n <= 3, (tracker.steps, n)  # + the main task's steps
        else:
            assert tracker.gone == n + 1, (tracker.gone, n)  # +1: the main task itself
    return took, cpu


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--tasks", type=int, default=200)
    p.add_argument("--sleeps", type=int, default=500)
    p.add_argument("--churn", type=int, default=100_000)
    p.add_argument("--batch", type=int, default=500)
    p.add_argument("--loops", default="asyncio,uvloop")
    p.add_argument("--workloads", default="steps,churn")
    p.add_argument("--json", help="write the raw timings here")
    args = p.parse_args()
    loops = [k for k in args.loops.split(",") if k != "uvloop" or uvloop is not None]
    workloads = args.workloads.split(",")
    with open(lwt.__file__, "rb") as f:
        src = f.read()
    print(
        f"# Python {platform.python_version()}, uvloop {getattr(uvloop, '__version__', '-')}, "
        f"loopwatch/_timing.py sha1 {hashlib.sha1(src).hexdigest()[:10]}, reps {args.reps}"
    )
    raw = {}  # (workload, loop, variant) -> [seconds per run]
    for rep in range(args.reps):
        for workload in workloads:
            for kind in loops:
                k = rep % len(VARIANTS)
                order = VARIANTS[k:] + VARIANTS[:k]
                for variant in order:
                    wall, cpu = run_once(kind, variant, workload, args)
                    raw.setdefault(("wall", workload, kind, variant), []).append(wall)
                    raw.setdefault(("cpu", workload, kind, variant), []).append(cpu)
        print(f"  rep {rep + 1}/{args.reps} done", file=sys.stderr)
    for clock in ("cpu", "wall"):
        table(clock, raw, workloads, loops, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"|".join(k): v for k, v in raw.items()}, f)


def table(clock, raw, workloads, loops, args):
    print()
    print(f"{clock} time ({'thread_time' if clock == 'cpu' else 'perf_counter'}):")
    print()
    print(
        "| workload | loop | variant | fastest ns/unit | median ns/unit | spread % | "
        "added, fastest | added, median of diffs |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for workload in workloads:
        unit = "step" if workload == "steps" else "task"
        n = units(workload, args)
        for kind in loops:
            base = raw[(clock, workload, kind, "factory")]
            for variant in VARIANTS:
                ts = raw[(clock, workload, kind, variant)]
                best, med = min(ts), statistics.median(ts)
                spread = (max(ts) - best) / best * 100
                if variant not in ("bare", "factory"):
                    added = f"{(best - min(base)) / n * 1e9:+.0f}"
                    diffs = [(a - b) / n * 1e9 for a, b in zip(ts, base, strict=True)]
                    added_med = f"{statistics.median(diffs):+.0f}"
                else:
                    added = added_med = ""
                print(
                    f"| {workload} | {kind} | {variant} | {best / n * 1e9:.0f} ns/{unit} | "
                    f"{med / n * 1e9:.0f} | {spread:.0f} | {added} | {added_med} |"
                )


if __name__ == "__main__":
    main()
