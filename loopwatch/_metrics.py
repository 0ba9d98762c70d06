"""One read-only snapshot of everything the exporters publish, taken at scrape time.

The hot paths only ever add to plain Python counters and histograms (``_stats``); turning them
into metric values happens here, when someone asks, so Prometheus costs nothing per event.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from . import _runtime
from ._stats import LATENCY_BUCKETS, Histogram

# Event name -> the counter that counts it.
EVENT_COUNTERS: dict[str, str] = {
    "loopwatch.slow_callback": "loopwatch_slow_callbacks_total",
    "loopwatch.loop_stalled": "loopwatch_loop_stalls_total",
    "loopwatch.task_leaked": "loopwatch_tasks_leaked_total",
    "loopwatch.task_orphaned": "loopwatch_tasks_orphaned_total",
    "loopwatch.task_exception_unretrieved": "loopwatch_task_exceptions_unretrieved_total",
    "loopwatch.coroutine_never_awaited": "loopwatch_coroutines_never_awaited_total",
}


@dataclass(slots=True)
class HistogramSnapshot:
    """Cumulative buckets ``(upper bound, count <= bound)`` ending with ``(inf, count)``."""

    buckets: list[tuple[float, int]]
    sum: float
    count: int

    @classmethod
    def of(cls, histogram: Histogram) -> HistogramSnapshot:
        buckets = histogram.cumulative()
        return cls(buckets=buckets, sum=histogram.sum, count=buckets[-1][1])

    @classmethod
    def empty(cls, bounds: tuple[float, ...] = LATENCY_BUCKETS) -> HistogramSnapshot:
        return cls(buckets=[(b, 0) for b in (*bounds, float("inf"))], sum=0.0, count=0)


@dataclass(slots=True)
class Snapshot:
    """What loopwatch knows right now. Counters only grow while loopwatch stays installed."""

    events: dict[str, int] = field(default_factory=dict)  # counter name -> value
    loop_lag: HistogramSnapshot = field(default_factory=HistogramSnapshot.empty)
    tasks_created: int = 0
    tasks_active: int = 0
    tasks_finished: dict[str, int] = field(default_factory=dict)  # outcome -> count
    # coroutine label -> histogram; filled by the timing table (capped label set, "other")
    task_duration: dict[str, HistogramSnapshot] = field(default_factory=dict)
    task_busy: dict[str, HistogramSnapshot] = field(default_factory=dict)


def collect() -> Snapshot:
    """A consistent-enough snapshot for one scrape (each value is read once, without locks)."""
    snap = Snapshot()
    runtime = _runtime.current()
    counts = runtime.dispatcher.counts if runtime is not None else {}
    snap.events = {metric: counts.get(name, 0) for name, metric in EVENT_COUNTERS.items()}
    from . import _loops, _timing

    snap.loop_lag = HistogramSnapshot.of(_loops.lag_totals())
    totals = _loops.task_totals()
    snap.tasks_created = totals.created
    snap.tasks_active = _loops.active_tasks()
    snap.tasks_finished = {"ok": totals.ok, "error": totals.error, "cancelled": totals.cancelled}
    snap.task_duration, snap.task_busy = _timing.histograms()
    return snap
