"""The alternatives users have today, each set to loopwatch's thresholds: set-ups, checks and
teardowns as in ``setups``. Their reports are counted (never printed: a worker fails on any
output to standard error), as loopwatch's are with LOOPWATCH_LOG=off, so that the probe (run
before the rounds) can check that each one really detects what it claims, on each loop.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import Callable, Coroutine
from typing import Any

from .common import LoopFactory
from .setups import _check_unwatched

# loopwatch's defaults (LOOPWATCH_SLOW_CALLBACK_MS, LOOPWATCH_STALL_MS), in seconds; the probe
# worker lowers them so that it can show a detection in well under a second.
THRESHOLDS = {"slow": 0.1, "stall": 2.0}
# Reports counted in this process: "slow" (a callback or step that took too long, said after it
# ended), "stall" (a loop still blocked, said while it is).
REPORTS = {"slow": 0, "stall": 0}
_ALT: dict[str, Any] = {}  # the alternatives' handles, for their checks and teardowns


def _counting_logger(name: str, kind: str, prefix: str = "") -> Any:
    """A logger that counts its records (those starting with ``prefix``) as ``kind`` reports
    and prints nothing."""
    import logging

    class Count(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage().startswith(prefix):
                REPORTS[kind] += 1

    logger = logging.getLogger(name)
    logger.addHandler(Count())
    logger.propagate = False
    logger.setLevel(logging.WARNING)
    return logger


def _debug_mode(make: Callable[[], LoopFactory]) -> Callable[[], LoopFactory]:
    """asyncio's debug mode, ``loop.set_debug(True)``, with ``slow_callback_duration`` at
    loopwatch's slow-callback threshold. It also records a creation traceback for every
    callback handle and task, and checks the thread of every call: all of it is what users get
    when they turn it on."""

    def setup() -> LoopFactory:
        base = make()
        _counting_logger("asyncio", "slow", "Executing ")

        def factory() -> asyncio.AbstractEventLoop:
            loop = base()
            loop.set_debug(True)
            loop.slow_callback_duration = THRESHOLDS["slow"]
            return loop

        return factory

    return setup


def _check_debug(loop: asyncio.AbstractEventLoop) -> None:
    _check_unwatched(loop)
    if not loop.get_debug() or loop.slow_callback_duration != THRESHOLDS["slow"]:
        raise RuntimeError("debug mode is not on, or not at the slow-callback threshold")


def _aiodebug(make: Callable[[], LoopFactory]) -> Callable[[], LoopFactory]:
    """aiodebug: ``log_slow_callbacks.enable`` (patches ``asyncio.events.Handle._run`` to time
    every callback) at the slow-callback threshold, and ``hang_inspection.start`` (a task
    stamping the time, a thread dumping every thread's stack to files when the stamp is older
    than ``interval``) at the stall threshold."""

    def setup() -> LoopFactory:
        from aiodebug import (  # type: ignore[import-untyped]
            hang_inspection,
            log_slow_callbacks,
        )

        base = make()

        def slow(name: str, duration: float) -> None:
            REPORTS["slow"] += 1

        log_slow_callbacks.enable(THRESHOLDS["slow"], on_slow_callback=slow)
        folder = tempfile.mkdtemp(prefix="loopwatch-bench-aiodebug-")
        _ALT["aiodebug_dir"] = folder

        def factory() -> asyncio.AbstractEventLoop:
            loop = base()
            _ALT["aiodebug"] = hang_inspection.start(folder, THRESHOLDS["stall"], loop)
            return loop

        return factory

    return setup


def _aiodebug_stalls() -> int:
    folder = _ALT.get("aiodebug_dir")
    return len(os.listdir(folder)) if folder else 0


def _check_aiodebug(loop: asyncio.AbstractEventLoop) -> None:
    _check_unwatched(loop)
    run = asyncio.events.Handle._run
    dumper, monitor = _ALT.get("aiodebug", (None, None))
    if getattr(run, "__module__", "") != "aiodebug.log_slow_callbacks":
        raise RuntimeError("aiodebug's Handle._run patch is not installed")
    if dumper is None or not dumper.is_alive() or monitor.done():
        raise RuntimeError("aiodebug's hang inspection is not running")


def _aiodebug_teardown() -> None:
    dumper, _ = _ALT.get("aiodebug", (None, None))
    if dumper is not None:
        dumper.stop = True
    shutil.rmtree(_ALT.get("aiodebug_dir", ""), ignore_errors=True)


def _pyleak_around(coro: Coroutine[Any, Any, Any]) -> Coroutine[Any, Any, Any]:
    """pyleak's blocking detector, ``no_event_loop_blocking`` (a thread that schedules a
    callback with ``call_soon_threadsafe`` every ``check_interval``, its default 50 ms, and
    reports when it has not run within ``threshold``), around the workload, as its decorator or
    pytest plugin would put it around a test; ``threshold`` is loopwatch's slow-callback one."""

    async def run() -> Any:
        from pyleak import no_event_loop_blocking
        from pyleak.base import LeakAction

        logger = _ALT.get("pyleak_logger") or _counting_logger("bench-pyleak", "stall")
        _ALT["pyleak_logger"] = logger
        scope = no_event_loop_blocking(
            action=LeakAction.LOG, logger=logger, threshold=THRESHOLDS["slow"]
        )
        async with scope:
            thread = scope.detector.monitor_thread
            if thread is None or not thread.is_alive():
                raise RuntimeError("pyleak's monitor thread is not running")
            _ALT["pyleak"] = scope.detector
            return await coro

    return run()


def _pyleak_stalls() -> int:
    detector = _ALT.get("pyleak")
    return detector.block_count if detector is not None else 0


def _otel(make: Callable[[], LoopFactory]) -> Callable[[], LoopFactory]:
    """The OpenTelemetry asyncio instrumentation, ``AsyncioInstrumentor().instrument()``, with
    the SDK's meter and tracer providers (a metric reader that keeps what it is given, no
    exporter): it wraps ``asyncio.create_task``, ``ensure_future``, ``gather``, ``wait_for``,
    ``wait``, ``as_completed``, ``to_thread`` and ``TaskGroup.create_task``, and records a
    duration histogram and a counter for every coroutine passed to them. It does not look at
    blocking at all; it applies where a program's tasks go through those functions (not through
    ``loop.create_task``, which aiohttp and uvicorn use)."""

    def setup() -> LoopFactory:
        from opentelemetry.instrumentation.asyncio import AsyncioInstrumentor
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
        from opentelemetry.sdk.trace import TracerProvider

        reader = InMemoryMetricReader()
        AsyncioInstrumentor().instrument(
            meter_provider=MeterProvider(metric_readers=[reader]),
            tracer_provider=TracerProvider(),
        )
        _ALT["otel_reader"] = reader
        return make()

    return setup


def _otel_recorded() -> int:
    """How many coroutines the OpenTelemetry instrumentation has counted so far."""
    reader = _ALT.get("otel_reader")
    data = reader.get_metrics_data() if reader is not None else None
    total = 0
    for resource in getattr(data, "resource_metrics", None) or ():
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name == "asyncio.process.created":
                    total += sum(int(point.value) for point in metric.data.data_points)
    return total


def _check_otel(loop: asyncio.AbstractEventLoop) -> None:
    _check_unwatched(loop)
    wrapped = ("create_task", "gather", "ensure_future")
    if not all(hasattr(getattr(asyncio, name), "__wrapped__") for name in wrapped):
        raise RuntimeError("the OpenTelemetry asyncio instrumentation is not installed")
