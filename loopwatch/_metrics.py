"""The read side: one read-only snapshot of everything the exporters publish, taken when asked.

The hot paths only ever add to plain Python counters and histograms (``_stats``); turning them
into metric values happens here, when someone asks (a scrape, a fork), so Prometheus costs
nothing per event. A snapshot is a function of a runtime; this module reads the runtime and
changes nothing in it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ._stats import HistogramSnapshot

if TYPE_CHECKING:
    from ._runtime import Runtime

# Event name -> the counter that counts it.
EVENT_COUNTERS: dict[str, str] = {
    "loopwatch.slow_callback": "loopwatch_slow_callbacks_total",
    "loopwatch.loop_stalled": "loopwatch_loop_stalls_total",
    "loopwatch.task_leaked": "loopwatch_tasks_leaked_total",
    "loopwatch.task_orphaned": "loopwatch_tasks_orphaned_total",
    "loopwatch.task_exception_unretrieved": "loopwatch_task_exceptions_unretrieved_total",
    "loopwatch.coroutine_never_awaited": "loopwatch_coroutines_never_awaited_total",
    "loopwatch.cancel_swallowed": "loopwatch_cancels_swallowed_total",
    "loopwatch.cancel_ignored": "loopwatch_cancels_ignored_total",
    "loopwatch.deadlock": "loopwatch_deadlocks_total",
    "loopwatch.task_stuck": "loopwatch_tasks_stuck_total",
}


@dataclass(slots=True)
class Snapshot:
    """What loopwatch knows right now. Counters only grow while loopwatch stays installed."""

    events: dict[str, int] = field(default_factory=dict)  # counter name -> value
    loop_lag: HistogramSnapshot = field(default_factory=HistogramSnapshot.empty)
    loop_busy_s: float = 0.0  # time the watched loops ran callbacks rather than waited for I/O
    tasks_created: int = 0
    tasks_active: int = 0
    tasks_finished: dict[str, int] = field(default_factory=dict)  # outcome -> count
    # coroutine label -> histogram; filled by the timing table (capped label set, "other")
    task_duration: dict[str, HistogramSnapshot] = field(default_factory=dict)
    task_busy: dict[str, HistogramSnapshot] = field(default_factory=dict)
    # route label -> histogram of the busy time of each request's task (capped label set)
    request_busy: dict[str, HistogramSnapshot] = field(default_factory=dict)


def collect(runtime: Runtime | None) -> Snapshot:
    """A consistent-enough snapshot of ``runtime`` for one scrape (each value is read once,
    without locks); all zeros with no runtime."""
    snap = Snapshot()
    counts = runtime.dispatcher.counts if runtime is not None else {}
    snap.events = {metric: counts.get(name, 0) for name, metric in EVENT_COUNTERS.items()}
    if runtime is None:
        snap.tasks_finished = {"ok": 0, "error": 0, "cancelled": 0}
        return snap
    loops = runtime.loops
    snap.loop_lag = HistogramSnapshot.of(loops.lag_totals())
    snap.loop_busy_s = loops.busy_total()
    totals = loops.task_totals()
    snap.tasks_created = totals.created
    snap.tasks_active = loops.active_tasks()
    snap.tasks_finished = {"ok": totals.ok, "error": totals.error, "cancelled": totals.cancelled}
    snap.task_duration, snap.task_busy = runtime.table.histograms()
    snap.request_busy = runtime.requests.histograms()
    return snap
