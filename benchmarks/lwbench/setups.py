"""How loopwatch's variants, the controls and the diagnostics make their loops, check them and
tear down: each set-up runs in the worker and returns a loop factory, so a variant's imports and
global state exist only in its own process. ``variants`` puts them in the table.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from .common import LOOP_KINDS, LoopFactory


def _stock_loop() -> LoopFactory:
    return asyncio.SelectorEventLoop


def _uvloop_loop() -> LoopFactory:
    import uvloop

    factory: LoopFactory = uvloop.new_event_loop
    return factory


def _watched(kind: str, settings: Mapping[str, str]) -> Callable[[], LoopFactory]:
    """A set-up for a watched loop of ``kind``: loopwatch's settings go into the environment
    (``LOOPWATCH_<NAME>``) before loopwatch is first imported, as a program's would, and the loop
    factory is ``loopwatch.new_event_loop`` or ``loopwatch.new_uvloop_event_loop``. With task
    tracking, aiohttp's request tasks are tracked as ``LOOPWATCH=1`` tracks them (from Python
    3.12, where no task factory sees them: ``hook_frameworks(routes=False)``)."""

    def setup() -> LoopFactory:
        for name, value in settings.items():
            os.environ[f"LOOPWATCH_{name.upper()}"] = value
        import loopwatch

        if settings.get("tasks") != "0":
            from loopwatch import _api
            from loopwatch.integrations._hooks import hook_frameworks

            _api.activate()
            hook_frameworks(routes=False)
        factory: LoopFactory = (
            loopwatch.new_event_loop if kind == "asyncio" else loopwatch.new_uvloop_event_loop
        )
        return factory

    return setup


def _watched_factories(**settings: str) -> dict[str, Callable[[], LoopFactory]]:
    return {kind: _watched(kind, settings) for kind in LOOP_KINDS}


def _with_routes(make: Callable[[], LoopFactory]) -> Callable[[], LoopFactory]:
    """The watched loop, and the framework routers hooked as ``LOOPWATCH=1`` hooks them (each
    request's task labelled by its route, its busy time per route)."""

    def setup() -> LoopFactory:
        factory = make()
        from loopwatch import _api
        from loopwatch.integrations._hooks import hook_frameworks

        _api.activate()
        hook_frameworks(routes=True)
        return factory

    return setup


def _with_otel(make: Callable[[], LoopFactory]) -> Callable[[], LoopFactory]:
    """``_with_routes`` with ``LOOPWATCH_OTEL=1`` and a program that set an SDK MeterProvider (an
    in-memory reader, collected every second as a periodic one would) and LoggerProvider:
    loopwatch's histograms are recorded into it from its thread, its most expensive mode."""

    def setup() -> LoopFactory:
        os.environ["LOOPWATCH_OTEL"] = "1"
        from opentelemetry import metrics
        from opentelemetry._logs import set_logger_provider
        from opentelemetry.sdk._logs import LoggerProvider
        from opentelemetry.sdk._logs.export import InMemoryLogExporter, SimpleLogRecordProcessor
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader

        reader = InMemoryMetricReader()
        metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
        # (And a LoggerProvider: each finding is a log record, kept in memory, as a program
        # that set up OpenTelemetry logs would have it.)
        logs = LoggerProvider()
        logs.add_log_record_processor(SimpleLogRecordProcessor(InMemoryLogExporter()))
        set_logger_provider(logs)
        factory = _with_routes(make)()

        def collect() -> None:
            while True:
                time.sleep(1.0)
                reader.get_metrics_data()

        threading.Thread(target=collect, daemon=True, name="benchmark collector").start()
        return factory

    return setup


def _with_timer(make: Callable[[], LoopFactory]) -> Callable[[], LoopFactory]:
    """Control: the plain loop plus a self re-arming 10 ms timer (loopwatch's heartbeat on uvloop,
    and on asyncio's loops before the select pulse)."""

    def setup() -> LoopFactory:
        base = make()

        def factory() -> asyncio.AbstractEventLoop:
            loop = base()
            stamps = [0.0]

            def beat() -> None:
                stamps[0] = time.monotonic()
                loop.call_later(0.01, beat)

            loop.call_soon(beat)
            return loop

        return factory

    return setup


_control_stop = threading.Event()


def _with_thread(make: Callable[[], LoopFactory]) -> Callable[[], LoopFactory]:
    """Control: the plain loop plus a daemon thread waking every 20 ms (as the watchdog does on a
    healthy loop: every heartbeat period to 50 ms) and taking the GIL for a moment."""

    def setup() -> LoopFactory:
        def run() -> None:
            while not _control_stop.wait(0.02):
                time.monotonic()

        threading.Thread(target=run, name="bench-control", daemon=True).start()
        return make()

    return setup


def _with_task_factory(
    make: Callable[[], LoopFactory], *, done_callback: bool
) -> Callable[[], LoopFactory]:
    """Control: the plain loop with a Python task factory that only makes the task (what any
    Python-level factory costs), and with ``done_callback`` a no-op done callback per task (what
    scheduling one more callback at each task's end costs)."""

    def setup() -> LoopFactory:
        import contextvars

        base = make()
        task_class = asyncio.Task
        context = contextvars.Context()

        def noop(task: asyncio.Task[Any]) -> None:
            pass

        def bare(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> asyncio.Task[Any]:
            return task_class(coro, loop=loop, **kwargs)

        def with_callback(
            loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any
        ) -> asyncio.Task[Any]:
            task = task_class(coro, loop=loop, **kwargs)
            task.add_done_callback(noop, context=context)
            return task

        def factory() -> asyncio.AbstractEventLoop:
            loop = base()
            loop.set_task_factory(with_callback if done_callback else bare)
            return loop

        return factory

    return setup


def _ablated(kind: str, settings: Mapping[str, str], part: str) -> Callable[[], LoopFactory]:
    """Diagnostics: a watched loop with one part of task tracking or step timing cut out, by
    replacing a private function of loopwatch (so the difference to the full variant is what
    that part costs). Parts: ``end`` (the accounting when a task ends: counts, wall time, the
    coroutine table), ``site`` (the walk to the creation site), ``timing`` (the proxy forwards
    each step without timing it)."""
    watched = _watched(kind, settings)

    def setup() -> LoopFactory:
        factory = watched()
        from loopwatch import _tasks, _timing

        # The private names these replace change as loopwatch is optimised: say so plainly.
        needed: dict[str, list[tuple[Any, str]]] = {
            "end": [(_tasks.TaskTracker, "proxy_ended"), (_tasks.TaskTracker, "mark_done")],
            "site": [(_tasks, "_site_frame")],
        }
        for owner, name in needed.get(part, []):
            if not hasattr(owner, name):
                raise RuntimeError(f"this diagnostic replaces {owner.__name__}.{name}, now gone")
        ignore: Any = _tasks  # the names are checked above, not by the type checker
        if part == "end":

            def ended(self: Any, *args: Any) -> None:  # whatever its signature is now
                self.stats.gone += 1

            ignore.TaskTracker.proxy_ended = ended
            ignore.TaskTracker.mark_done = ended
        elif part == "site":
            ignore._site_frame = lambda frame, boundary=None: None
        elif part == "timing":

            def forward(self: Any) -> Any:
                return self._coro.send(None)

            _timing.PyTimed.__next__ = forward  # type: ignore[method-assign]
        return factory

    return setup


def _stop_thread() -> None:
    _control_stop.set()


def _loopwatch_reports(kind: str) -> Callable[[], int]:
    """loopwatch's own count of slow callbacks or stalls, from its Prometheus counters."""
    name = {"slow": "loopwatch_slow_callbacks_total", "stall": "loopwatch_loop_stalls_total"}[kind]

    def count() -> int:
        from prometheus_client import REGISTRY

        return int(REGISTRY.get_sample_value(name) or 0)

    return count


def _check_unwatched(loop: asyncio.AbstractEventLoop) -> None:
    if "loopwatch" in sys.modules:
        raise RuntimeError("the baseline imported loopwatch (is LOOPWATCH set?)")


def _check_watched(
    *, tasks: bool, step_timing: bool = False, creation_stack: int = 1, compiled: bool = True
) -> Callable[[asyncio.AbstractEventLoop], None]:
    """A check that the loop is watched, with task tracking, step timing and creation stacks as
    the variant says, and the compiled hot paths (``loopwatch._accel``) in use or not. Called
    from a task of the loop (so its own coroutine shows the proxy)."""

    def check(loop: asyncio.AbstractEventLoop) -> None:
        # Private names on purpose: a benchmark of "the watchdog" that silently measured a loop
        # with no heartbeat or no thread, or "step timing" with no proxy, would be worse than one
        # that fails.
        from loopwatch import _loops, _runtime, _timing

        runtime = _runtime.current()
        # The registry of watched loops: the runtime's (or, in a --ref before it had one, the
        # module's functions).
        registry: Any = getattr(runtime, "loops", None) or _loops

        if (_timing.ACCEL is not None) != compiled:
            raise RuntimeError(
                "expected the compiled hot paths (loopwatch._accel) to be in use"
                if compiled
                else "expected the pure-Python hot paths (LOOPWATCH_ACCEL=0)"
            )
        state = registry.state_of(loop)
        worker = runtime.watchdog.worker if runtime is not None else None
        if state is None or not state.running or worker is None or not worker.running:
            raise RuntimeError("the variant is not watching its loop")
        tracker = registry.tracker_of(loop)
        # The factory the loop really calls: past loopwatch's hook of get_task_factory, which
        # answers with the program's own.
        factory = _loops._factory_of(loop)
        task = asyncio.current_task(loop)
        # What the task drives (get_coro() answers with the program's own coroutine).
        coro = getattr(task, "_coro", None) if task is not None else None
        # A proxy that times steps (the compiled one stays, untimed, with step timing off).
        timed = type(coro).__name__ in ("Timed", "PyTimed") and getattr(coro, "_timing", True)
        found = (
            f"tracker {tracker is not None}, task factory {factory!r}, proxy {timed},"
            f" creation_stack {getattr(tracker, 'depth', None)}"
        )
        if not tasks:
            if tracker is not None or factory is not None or timed:
                raise RuntimeError(f"task tracking should be off: {found}")
            return
        if (
            tracker is None
            or factory is not tracker.factory
            or tracker.timing != step_timing
            or timed != step_timing
            or tracker.depth != creation_stack
        ):
            raise RuntimeError(
                f"expected task tracking, step_timing={step_timing},"
                f" creation_stack={creation_stack}; found {found}"
            )

    return check


def _uninstall() -> None:
    import loopwatch

    loopwatch.uninstall()


def _no_teardown() -> None:
    pass
