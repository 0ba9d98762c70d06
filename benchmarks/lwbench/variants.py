"""The variants: name -> how to make a loop factory for each loop kind (``VARIANTS``), which run
by default, and which pairs give per-unit costs (``INCREMENTS``). Adding a variant is one entry
in ``VARIANTS``, made of the set-ups and checks of ``setups`` or ``alternatives``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any

from .alternatives import (
    REPORTS,
    _aiodebug,
    _aiodebug_stalls,
    _aiodebug_teardown,
    _check_aiodebug,
    _check_debug,
    _check_otel,
    _debug_mode,
    _otel,
    _pyleak_around,
    _pyleak_stalls,
)
from .common import BASELINE, LOOP_KINDS, LoopFactory
from .setups import (
    _ablated,
    _check_unwatched,
    _check_watched,
    _loopwatch_reports,
    _no_teardown,
    _stock_loop,
    _stop_thread,
    _uninstall,
    _uvloop_loop,
    _watched_factories,
    _with_otel,
    _with_routes,
    _with_task_factory,
    _with_thread,
    _with_timer,
)


@dataclass(frozen=True, slots=True)
class Variant:
    name: str
    factories: Mapping[str, Callable[[], LoopFactory]]  # loop kind -> set-up returning a factory
    check: Callable[[asyncio.AbstractEventLoop], None]  # called on the running loop; raises
    teardown: Callable[[], None]
    doc: str
    # "loopwatch", "baseline", "alternative", "control" or "diagnostic".
    group: str = "loopwatch"
    # Modules it needs beyond loopwatch and uvloop; the run skips it when one is missing.
    requires: tuple[str, ...] = ()
    # Wraps each workload's coroutine (for a detector used as a context manager).
    around: Callable[[Coroutine[Any, Any, Any]], Coroutine[Any, Any, Any]] | None = None
    # The workloads' sizes are multiplied by this (a variant many times slower gets shorter
    # runs: the rate is per operation, so it is unchanged); never HTTP durations.
    scale: float = 1.0
    # Reports counted so far, for the probe: slow callbacks said after they ended, and a stalled
    # loop said while it was still blocked; None for one it does not claim to detect.
    slow_reports: Callable[[], int] | None = None
    stall_reports: Callable[[], int] | None = None
    # Loop kinds where a part of it has no effect, and why (checked by the probe).
    inert: Mapping[str, str] = field(default_factory=dict)


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant(
            BASELINE,
            {"asyncio": _stock_loop, "uvloop": _uvloop_loop},
            _check_unwatched,
            _no_teardown,
            "plain loop: `asyncio.SelectorEventLoop` / `uvloop.new_event_loop`, loopwatch not"
            " imported",
            group="baseline",
        ),
        Variant(
            "watchdog",
            _watched_factories(tasks="0"),
            _check_watched(tasks=False),
            _uninstall,
            "`loopwatch.new_event_loop` / `loopwatch.new_uvloop_event_loop` with"
            " `LOOPWATCH_TASKS=0`: the watchdog only (its pulse on the loop's selector, a"
            " heartbeat timer on uvloop, and its thread)",
            slow_reports=_loopwatch_reports("slow"),
            stall_reports=_loopwatch_reports("stall"),
        ),
        Variant(
            "tasks",
            _watched_factories(step_timing="0"),
            _check_watched(tasks=True, step_timing=False),
            _uninstall,
            "`LOOPWATCH_STEP_TIMING=0`: the watchdog plus task tracking (the compiled task"
            " factory: creation site, and a proxy that forwards each step untimed and counts the"
            " task's end)",
            slow_reports=_loopwatch_reports("slow"),
            stall_reports=_loopwatch_reports("stall"),
        ),
        Variant(
            "default",
            _watched_factories(),
            _check_watched(tasks=True, step_timing=True),
            _uninstall,
            "default settings: the watchdog, task tracking and per-step timing (a proxy around"
            " each task's coroutine)",
            slow_reports=_loopwatch_reports("slow"),
            stall_reports=_loopwatch_reports("stall"),
        ),
        Variant(
            "routes",
            {kind: _with_routes(make) for kind, make in _watched_factories().items()},
            _check_watched(tasks=True, step_timing=True),
            _uninstall,
            "default settings with the framework routers hooked, as LOOPWATCH=1 does: each "
            "request's task labelled by its route template, its busy time per route",
        ),
        Variant(
            "routes-otel",
            {kind: _with_otel(make) for kind, make in _watched_factories().items()},
            _check_watched(tasks=True, step_timing=True),
            _uninstall,
            "routes, and LOOPWATCH_OTEL=1 in a program that set an SDK MeterProvider: loopwatch's"
            " histograms recorded into it every second from loopwatch's thread",
        ),
        Variant(
            "everything",
            _watched_factories(creation_stack="8"),
            _check_watched(tasks=True, step_timing=True, creation_stack=8),
            _uninstall,
            "default plus `LOOPWATCH_CREATION_STACK=8`: 8 frames of each task's creation stack",
            slow_reports=_loopwatch_reports("slow"),
            stall_reports=_loopwatch_reports("stall"),
        ),
        # The same with the pure-Python hot paths (no compiler at install, or LOOPWATCH_ACCEL=0).
        Variant(
            "tasks-py",
            _watched_factories(step_timing="0", accel="0"),
            _check_watched(tasks=True, step_timing=False, compiled=False),
            _uninstall,
            "`tasks` in pure Python (`LOOPWATCH_ACCEL=0`): the Python task factory, and a done"
            " callback per task",
            slow_reports=_loopwatch_reports("slow"),
            stall_reports=_loopwatch_reports("stall"),
        ),
        Variant(
            "default-py",
            _watched_factories(accel="0"),
            _check_watched(tasks=True, step_timing=True, compiled=False),
            _uninstall,
            "`default` in pure Python (`LOOPWATCH_ACCEL=0`): the Python task factory and proxy",
            slow_reports=_loopwatch_reports("slow"),
            stall_reports=_loopwatch_reports("stall"),
        ),
        # Controls, run only when asked for (--variants): no loopwatch, one of its costs each.
        Variant(
            "timer-only",
            {"asyncio": _with_timer(_stock_loop), "uvloop": _with_timer(_uvloop_loop)},
            _check_unwatched,
            _no_teardown,
            "control, no loopwatch: the plain loop plus a 10 ms self re-arming `call_later`",
            group="control",
        ),
        Variant(
            "thread-only",
            {"asyncio": _with_thread(_stock_loop), "uvloop": _with_thread(_uvloop_loop)},
            _check_unwatched,
            _stop_thread,
            "control, no loopwatch: the plain loop plus a daemon thread waking every 20 ms",
            group="control",
        ),
        Variant(
            "py-factory",
            {
                "asyncio": _with_task_factory(_stock_loop, done_callback=False),
                "uvloop": _with_task_factory(_uvloop_loop, done_callback=False),
            },
            _check_unwatched,
            _no_teardown,
            "control, no loopwatch: the plain loop with a Python task factory that only makes"
            " the task",
            group="control",
        ),
        Variant(
            "py-callback",
            {
                "asyncio": _with_task_factory(_stock_loop, done_callback=True),
                "uvloop": _with_task_factory(_uvloop_loop, done_callback=True),
            },
            _check_unwatched,
            _no_teardown,
            "control, no loopwatch: `py-factory` plus a no-op done callback on every task",
            group="control",
        ),
        # Diagnostics: `tasks` or `default` with one part cut out (private functions replaced).
        Variant(
            "tasks-no-end",
            {k: _ablated(k, {"step_timing": "0", "accel": "0"}, "end") for k in LOOP_KINDS},
            _check_watched(tasks=True, step_timing=False, compiled=False),
            _uninstall,
            "diagnostic: `tasks-py` without the accounting at each task's end (counts, wall"
            " time, coroutine table); the done callback still runs",
            group="diagnostic",
        ),
        Variant(
            "tasks-no-site",
            {k: _ablated(k, {"step_timing": "0", "accel": "0"}, "site") for k in LOOP_KINDS},
            _check_watched(tasks=True, step_timing=False, compiled=False),
            _uninstall,
            "diagnostic: `tasks-py` without the walk to each task's creation site",
            group="diagnostic",
        ),
        Variant(
            "bare-proxy",
            {k: _ablated(k, {"accel": "0"}, "timing") for k in LOOP_KINDS},
            _check_watched(tasks=True, step_timing=True, compiled=False),
            _uninstall,
            "diagnostic: `default-py` with the proxy forwarding each step untimed (its call alone)",
            group="diagnostic",
        ),
        # The alternatives users have today, at loopwatch's thresholds.
        Variant(
            "debug",
            {"asyncio": _debug_mode(_stock_loop), "uvloop": _debug_mode(_uvloop_loop)},
            _check_debug,
            _no_teardown,
            "asyncio's debug mode: `loop.set_debug(True)`, `slow_callback_duration` at"
            " loopwatch's slow-callback threshold (it also keeps a creation traceback per"
            " callback and task); uvloop implements it too",
            group="alternative",
            scale=0.1,
            slow_reports=lambda: REPORTS["slow"],
        ),
        Variant(
            "aiodebug",
            {"asyncio": _aiodebug(_stock_loop), "uvloop": _aiodebug(_uvloop_loop)},
            _check_aiodebug,
            _aiodebug_teardown,
            "aiodebug: `log_slow_callbacks.enable` at the slow-callback threshold (a patch of"
            " `asyncio.events.Handle._run` timing every callback) and `hang_inspection.start` at"
            " the stall threshold (a task stamping the time, a thread dumping stacks to files)",
            group="alternative",
            requires=("aiodebug",),
            slow_reports=lambda: REPORTS["slow"],
            stall_reports=_aiodebug_stalls,
            inert={
                "uvloop": "its slow-callback logging patches `asyncio.events.Handle._run`, which"
                " uvloop never calls (uvloop's handles are its own, compiled): only the hang"
                " inspection works there"
            },
        ),
        Variant(
            "pyleak",
            {"asyncio": _stock_loop, "uvloop": _uvloop_loop},
            _check_unwatched,
            _no_teardown,
            "pyleak: `no_event_loop_blocking(threshold=...)` at the slow-callback threshold around"
            " the workload (a thread pinging the loop with `call_soon_threadsafe` every 50 ms)",
            group="alternative",
            requires=("pyleak",),
            around=_pyleak_around,
            stall_reports=_pyleak_stalls,
        ),
        Variant(
            "otel",
            {"asyncio": _otel(_stock_loop), "uvloop": _otel(_uvloop_loop)},
            _check_otel,
            _no_teardown,
            "OpenTelemetry's asyncio instrumentation, `AsyncioInstrumentor().instrument()` with"
            " the SDK's meter provider: a duration and a count for every coroutine given to"
            " `asyncio.create_task`, `gather`, `ensure_future`, ...; it detects no blocking",
            group="alternative",
            requires=("opentelemetry.instrumentation.asyncio", "opentelemetry.sdk"),
        ),
    )
}

ALTERNATIVES = tuple(v for v in VARIANTS if VARIANTS[v].group == "alternative")
DEFAULT_VARIANTS = (
    BASELINE,
    "watchdog",
    "tasks",
    "default",
    "everything",
    "tasks-py",
    "default-py",
    *ALTERNATIVES,
)

# Each variant against the one it adds to: the cost of one feature at a time.
INCREMENTS: tuple[tuple[str, str, str], ...] = (
    ("watchdog", BASELINE, "the watchdog"),
    ("tasks", "watchdog", "task tracking"),
    ("default", "tasks", "step timing"),
    ("everything", "default", "8-frame creation stacks"),
    ("routes", "default", "route labelling"),
    ("routes-otel", "routes", "LOOPWATCH_OTEL=1 into the program's MeterProvider"),
    ("default", BASELINE, "all of the default"),
    ("tasks-py", "watchdog", "task tracking, pure Python"),
    ("default-py", "tasks-py", "step timing, pure Python"),
    ("default-py", BASELINE, "all of the default, pure Python"),
    ("timer-only", BASELINE, "a 10 ms timer"),
    ("thread-only", BASELINE, "a thread waking every 20 ms"),
    ("py-factory", BASELINE, "a Python task factory"),
    ("py-callback", "py-factory", "a done callback per task"),
    ("tasks-py", "tasks-no-end", "accounting at task end (pure Python)"),
    ("tasks-py", "tasks-no-site", "the creation-site walk (pure Python)"),
    ("bare-proxy", "tasks-py", "a forwarding proxy (pure Python)"),
    ("default-py", "bare-proxy", "timing in the proxy (pure Python)"),
    ("debug", BASELINE, "asyncio debug mode"),
    ("aiodebug", BASELINE, "aiodebug"),
    ("pyleak", BASELINE, "pyleak"),
    ("otel", BASELINE, "OpenTelemetry asyncio"),
)
