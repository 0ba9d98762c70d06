"""The read side: one read-only snapshot of everything the exporters publish, taken when asked.

The hot paths only ever add to plain Python counters and histograms (``_stats``); turning them
into metric values happens here, when someone asks (a scrape, a fork), so Prometheus costs
nothing per event. A snapshot is a function of a runtime; this module reads the runtime and
changes nothing in it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

from . import _runtime
from ._stats import LATENCY_BUCKETS, HistogramSnapshot
from ._timing import DURATION_BUCKETS

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


# -- what is published (Prometheus and OpenTelemetry alike) ----------------------------------

COUNTERS: Final[dict[str, str]] = {
    "loopwatch_slow_callbacks_total": "Callbacks or task steps that held the event loop for "
    "LOOPWATCH_SLOW_CALLBACK_MS or more (loopwatch.slow_callback events).",
    "loopwatch_loop_stalls_total": "Event loops still blocked after LOOPWATCH_STALL_MS "
    "(loopwatch.loop_stalled events).",
    "loopwatch_tasks_leaked_total": "Tasks still pending when their loop, scope or test ended "
    "(loopwatch.task_leaked events).",
    "loopwatch_tasks_orphaned_total": "Pending tasks destroyed by the garbage collector "
    "(loopwatch.task_orphaned events).",
    "loopwatch_task_exceptions_unretrieved_total": "Tasks that ended with an exception nobody "
    "retrieved (loopwatch.task_exception_unretrieved events).",
    "loopwatch_coroutines_never_awaited_total": "Coroutines created and dropped without being "
    "awaited (loopwatch.coroutine_never_awaited events).",
    "loopwatch_cancels_swallowed_total": "Cancelled tasks that ended without CancelledError while "
    "still being cancelled (loopwatch.cancel_swallowed events).",
    "loopwatch_cancels_ignored_total": "Tasks still pending LOOPWATCH_CANCEL_GRACE_MS after their "
    "cancellation arrived (loopwatch.cancel_ignored events).",
    "loopwatch_deadlocks_total": "Cycles of tasks waiting on each other (loopwatch.deadlock "
    "events).",
    "loopwatch_tasks_stuck_total": "Tasks suspended at the same await for LOOPWATCH_TASK_STUCK_MS "
    "(loopwatch.task_stuck events).",
}
LAG = "loopwatch_loop_lag_seconds"
LOOP_BUSY = "loopwatch_loop_busy_seconds_total"
TASKS_CREATED = "loopwatch_tasks_created_total"
TASKS_ACTIVE = "loopwatch_tasks_active"
TASKS_FINISHED = "loopwatch_tasks_finished_total"
TASK_DURATION = "loopwatch_task_duration_seconds"
TASK_BUSY = "loopwatch_task_busy_seconds"
REQUEST_BUSY = "loopwatch_request_busy_seconds"
OUTCOMES: Final = ("ok", "error", "cancelled")
# Each histogram's bucket bounds (+Inf left out).
BOUNDS: Final[dict[str, tuple[float, ...]]] = {
    LAG: LATENCY_BUCKETS,
    TASK_DURATION: DURATION_BUCKETS,
    TASK_BUSY: LATENCY_BUCKETS,
    REQUEST_BUSY: LATENCY_BUCKETS,
}
HELP: Final[dict[str, str]] = {
    **COUNTERS,
    LAG: "How late the event loop ran a callback that was due (heartbeat lateness).",
    LOOP_BUSY: "Time the watched event loops spent running callbacks rather than waiting for "
    "I/O; its rate() is the loops' utilization (exact on asyncio, the loop thread's CPU time "
    "on uvloop).",
    TASKS_CREATED: "Tasks created on watched loops.",
    TASKS_ACTIVE: "Tasks alive and not done on watched loops.",
    TASKS_FINISHED: "Tasks that ended, by outcome (ok, error, cancelled).",
    TASK_DURATION: "Wall time of tasks from creation to end, per coroutine.",
    TASK_BUSY: "Time tasks held the event loop (the sum of their steps), per coroutine.",
    REQUEST_BUSY: "Time each request's task held the event loop (the sum of its steps), per "
    "route template.",
}


def snapshot(runtime: Runtime | None = None) -> Snapshot:
    """This process's values now (since it started, or since it was forked), for ``runtime``
    (the active one by default; a closing one still has its last values to write)."""
    runtime = runtime or _runtime.current()
    snap = collect(runtime)
    inherited = runtime.inherited if runtime is not None else None
    return snap if inherited is None else _since(snap, inherited)


def _since(now: Snapshot, then: Snapshot) -> Snapshot:
    def hist(h: HistogramSnapshot, base: HistogramSnapshot | None) -> HistogramSnapshot:
        if base is None or [b for b, _ in base.buckets] != [b for b, _ in h.buckets]:
            return h
        buckets = [
            (b, max(n - m, 0)) for (b, n), (_, m) in zip(h.buckets, base.buckets, strict=True)
        ]
        return HistogramSnapshot(buckets, max(h.sum - base.sum, 0.0), buckets[-1][1])

    return Snapshot(
        events={k: max(v - then.events.get(k, 0), 0) for k, v in now.events.items()},
        loop_lag=hist(now.loop_lag, then.loop_lag),
        loop_busy_s=max(now.loop_busy_s - then.loop_busy_s, 0.0),
        tasks_created=max(now.tasks_created - then.tasks_created, 0),
        tasks_active=now.tasks_active,
        tasks_finished={
            k: max(v - then.tasks_finished.get(k, 0), 0) for k, v in now.tasks_finished.items()
        },
        task_duration={k: hist(h, then.task_duration.get(k)) for k, h in now.task_duration.items()},
        task_busy={k: hist(h, then.task_busy.get(k)) for k, h in now.task_busy.items()},
        request_busy={k: hist(h, then.request_busy.get(k)) for k, h in now.request_busy.items()},
    )
