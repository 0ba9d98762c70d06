"""What one ``bench.py --worker`` process does: one (workload, variant, loop kind), a warm-up then
timed runs; or one (variant, loop kind) and the memory measurements, or the probe of what the
variant detects. ``worker`` returns the result, which bench.py prints as one line of JSON.
"""

from __future__ import annotations

import asyncio
import gc
import os
import statistics
import sys
import threading
import time
import tracemalloc
from collections.abc import Callable, Coroutine, Mapping
from pathlib import Path
from typing import Any

from .alternatives import _ALT, THRESHOLDS, _otel_recorded
from .variants import VARIANTS, Variant
from .workloads import CHURN_BATCH, HTTP_LATENCY, WORKLOADS, churn

# Threads whose wake-ups are counted: loopwatch's watchdog (invisible to threading: found
# through loopwatch's own record of it), and the thread-only control's.
WATCHER_THREADS = ("bench-control",)


def _watcher_native_id() -> int | None:
    runtime = sys.modules.get("loopwatch._runtime")
    current = runtime.current() if runtime is not None else None
    if current is not None and current.watchdog.worker.running:
        return current.watchdog.worker.native_id  # type: ignore[no-any-return]
    for thread in threading.enumerate():
        if thread.name in WATCHER_THREADS:
            return thread.native_id
    return None


def _thread_sleeps() -> int | None:
    """Voluntary context switches of the watchdog (or control) thread so far. Each one is the
    thread going to sleep, so their increase over a run is how often it woke in between. None
    without such a thread, or without ``/proc`` (not Linux)."""
    native_id = _watcher_native_id()
    if native_id is None:
        return None
    try:
        status = Path(f"/proc/self/task/{native_id}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("voluntary_ctxt_switches:"):
            return int(line.split()[1])
    return None


def _around(variant: Variant, coro: Coroutine[Any, Any, Any]) -> Coroutine[Any, Any, Any]:
    return coro if variant.around is None else variant.around(coro)


def _speed(runner: asyncio.Runner, spec: Mapping[str, Any], variant: Variant) -> dict[str, Any]:
    workload = WORKLOADS[spec["workload"]]
    size = int(spec["size"])
    warmup = int(spec["warmup"])
    values: list[float] = []
    latency: list[dict[str, float]] = []
    sleeps = _thread_sleeps()
    started = time.perf_counter()
    for i in range(warmup + int(spec["repeats"])):
        gc.collect()
        HTTP_LATENCY.clear()
        seconds, operations = runner.run(_around(variant, workload.run(size)))
        if i >= warmup:
            values.append(workload.value(seconds, operations))
            latency += HTTP_LATENCY
    elapsed = time.perf_counter() - started
    slept = _thread_sleeps()
    wakes = (slept - sleeps) / elapsed if sleeps is not None and slept is not None else None
    return {
        "value": statistics.median(values),
        "runs": values,
        "wakes_per_s": wakes,
        "latency": latency or None,
    }


# The probe: with the thresholds lowered, a callback that blocks past the slow-callback one,
# then one that blocks past the stall one, and what the variant reported of each.
PROBE_THRESHOLDS = {"slow": 0.02, "stall": 0.3}
# Longer than pyleak's 50 ms sampling plus its threshold: a block shorter than that can fall
# between two of its pings and go unseen (a limit of sampling, not what the probe asks).
PROBE_SLOW_BLOCK = 0.12
PROBE_STALL_BLOCK = 1.0


async def _probe(variant: Variant) -> dict[str, Any]:
    def count(reports: Callable[[], int] | None) -> int | None:
        return None if reports is None else reports()

    async def settle() -> None:  # let the loop run, and reports made after a block come in
        for _ in range(20):
            await asyncio.sleep(0.01)

    await settle()
    slow0, stall0 = count(variant.slow_reports), count(variant.stall_reports)
    time.sleep(PROBE_SLOW_BLOCK)  # blocking the loop is the point
    await settle()
    slow1, stall1 = count(variant.slow_reports), count(variant.stall_reports)
    during: list[int | None] = []

    def sample() -> None:  # while the loop is still blocked, near the end of the block
        time.sleep(PROBE_STALL_BLOCK * 0.9)
        during.append(count(variant.stall_reports))

    sampler = threading.Thread(target=sample)
    sampler.start()
    time.sleep(PROBE_STALL_BLOCK)
    sampler.join()
    await settle()
    created = _otel_recorded() if "otel_reader" in _ALT else None
    if created is not None:
        await asyncio.create_task(settle())
        created = _otel_recorded() - created

    def diff(after: int | None, before: int | None) -> int | None:
        return None if after is None or before is None else after - before

    return {
        "slow": diff(slow1, slow0),
        "slow_block_stalls": diff(stall1, stall0),
        "stall_while_blocked": diff(during[0], stall1),
        "otel_coroutines": created,
    }


def _rss() -> int | None:
    """Resident set size of this process, in bytes (Linux), else None."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE")


def _tracked(loop: asyncio.AbstractEventLoop) -> dict[str, int] | None:
    """loopwatch's per-loop task state: live-task entries, and rows of the coroutine table."""
    if "loopwatch" not in sys.modules:
        return None
    import loopwatch
    from loopwatch import _loops, _runtime

    # The runtime's registry of watched loops (or, in a --ref before it had one, the module's).
    registry: Any = getattr(_runtime.current(), "loops", None) or _loops
    tracker = registry.tracker_of(loop)
    if tracker is None:
        return None
    return {"entries": tracker.active, "rows": len(loopwatch.coroutine_stats())}


async def _parked_tasks(n: int) -> dict[str, Any]:
    """``n`` tasks created and left pending on one future: the traced bytes they take, per task,
    and what loopwatch tracks meanwhile."""
    loop = asyncio.get_running_loop()
    gate: asyncio.Future[None] = loop.create_future()

    async def parked() -> None:
        await gate

    # One task first: one-off allocations (caches, the first table rows) are not per task.
    first = asyncio.create_task(parked())
    await asyncio.sleep(0)
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    tasks = [asyncio.create_task(parked()) for _ in range(n)]
    await asyncio.sleep(0)  # every task takes its first step and suspends on the gate
    gc.collect()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    tracked = _tracked(loop)
    gate.set_result(None)
    await asyncio.gather(first, *tasks)
    return {"tasks": n, "bytes_per_task": (after - before) / n, "tracked": tracked}


def _memory_state(loop: asyncio.AbstractEventLoop) -> dict[str, Any]:
    return {"rss": _rss(), "blocks": sys.getallocatedblocks(), "tracked": _tracked(loop)}


def _churned(
    runner: asyncio.Runner, tasks: int, traced_tasks: int, variant: Variant
) -> dict[str, Any]:
    """``tasks`` tasks created and finished (the churn workload): loopwatch's tracked state, the
    live Python blocks and the RSS before and after. Then, under tracemalloc (slower), the
    traced bytes still allocated after ``traced_tasks`` more, counted from after a first
    ``traced_tasks``: tables that are reallocated as they are reused (a dict that had entries
    deleted and added) are then traced on both sides, and only growth remains."""
    loop = runner.get_loop()
    runner.run(_around(variant, churn(20)))  # warm-up: free lists, caches, table rows
    gc.collect()
    before = _memory_state(loop)
    seconds, _ = runner.run(_around(variant, churn(tasks // CHURN_BATCH)))
    gc.collect()
    after = _memory_state(loop)
    tracemalloc.start()
    runner.run(_around(variant, churn(traced_tasks // CHURN_BATCH)))
    gc.collect()
    traced_before = tracemalloc.get_traced_memory()[0]
    runner.run(_around(variant, churn(traced_tasks // CHURN_BATCH)))
    gc.collect()
    traced_after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return {
        "tasks": tasks,
        "seconds": seconds,
        "before": before,
        "after": after,
        "traced_tasks": traced_tasks,
        "traced_growth": traced_after - traced_before,
        "tracked_end": _tracked(loop),
    }


def worker(spec: Mapping[str, Any]) -> dict[str, Any]:
    variant = VARIANTS[spec["variant"]]
    kind = spec.get("kind", "speed")
    if kind == "probe":
        THRESHOLDS.update(PROBE_THRESHOLDS)
        os.environ["LOOPWATCH_SLOW_CALLBACK_MS"] = str(round(PROBE_THRESHOLDS["slow"] * 1000))
        os.environ["LOOPWATCH_STALL_MS"] = str(round(PROBE_THRESHOLDS["stall"] * 1000))
    factory = variant.factories[spec["loop"]]()

    async def check() -> None:
        variant.check(asyncio.get_running_loop())

    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(check())
        if kind == "speed":
            result = _speed(runner, spec, variant)
        elif kind == "probe":
            result = runner.run(_around(variant, _probe(variant)))
        else:
            result = {
                "live": [
                    runner.run(_around(variant, _parked_tasks(int(n)))) for n in spec["live_tasks"]
                ],
                "churn": _churned(
                    runner, int(spec["churn_tasks"]), int(spec["traced_tasks"]), variant
                ),
            }
    variant.teardown()
    module = sys.modules.get("loopwatch")
    result["loopwatch"] = getattr(module, "__file__", None) if module is not None else None
    return result
