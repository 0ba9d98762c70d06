"""The entry points: turning loopwatch on and off, and watching loops.

This is the top of the package's layers (see docs/architecture.md): it builds the runtime with
its exporters (``activate``), and every way in goes through it: ``install()``/``uninstall()``,
the loop factories, the policy, ``LOOPWATCH=1`` (``_bootstrap``), ``watch()``, the unittest base
class and the pytest plugin.
"""

from __future__ import annotations

import asyncio
from typing import Any

from . import _config, _live, _metrics, _runtime
from ._loops import stock_loop_class
from ._runtime import Runtime
from ._timing import CoroutineStats
from ._watchdog import LoopState
from .exporters import from_settings, publish_metrics, publish_otel
from .exporters.console import Console
from .integrations._hooks import hook_frameworks, unhook_frameworks


def activate(*, serve_pid: bool = False, **overrides: Any) -> Runtime:
    """The active runtime, created from the environment (and these keywords) if there is none.

    Keywords given to a later call update the settings used for loops attached from then on.
    ``serve_pid``: also answer ``loopwatch tasks PID`` (``LOOPWATCH=1`` asks for it).
    """

    def make() -> Runtime:
        settings = _config.environ_settings().replace(**overrides)
        return Runtime(settings, exporters=from_settings(settings), collect=_metrics.collect)

    runtime, new = _runtime.current_or_start(make)
    if new:
        publish_metrics(runtime)
        publish_otel(runtime)
    elif overrides:
        runtime.apply(runtime.settings.replace(**overrides))
        if "metrics_port" in overrides:
            publish_metrics(runtime)  # serve the endpoint asked for now
        if overrides.get("otel"):
            publish_otel(runtime)
    if serve_pid and runtime.console is None:
        console = runtime.console = Console(runtime)  # the live view by PID
        runtime.loops.workers.append(console.worker)
        if runtime.loops.watched_loops():
            console.worker.start()
    return runtime


def attach(loop: asyncio.AbstractEventLoop, settings: Any = None) -> LoopState:
    """Watch ``loop`` (idempotent), with the runtime's settings unless given others."""
    return activate().loops.attach(loop, settings)


def install(loop: asyncio.AbstractEventLoop | None = None, **settings: Any) -> None:
    """Watch ``loop``, or the running loop, or every loop from now on. Idempotent.

    Keyword settings are those of ``LOOPWATCH_*`` in lower case without the prefix
    (``slow_callback_ms=50``); they win over the environment. An unknown name raises
    ``TypeError`` and a bad value ``ValueError``.
    """
    runtime = activate(**settings)
    if loop is None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
    loops = runtime.loops
    if loop is not None:
        loops.attach(loop, runtime.settings)
        return
    loops.enable_global()
    _hook_routes(runtime)
    for known in loops.watched_loops():
        state = loops.state_of(known)
        if state is not None:
            state.configure(runtime.settings)


def uninstall(loop: asyncio.AbstractEventLoop | None = None) -> None:
    """Undo ``install``: for ``loop`` only, or everything (every loop, hook and thread)."""
    runtime = _runtime.current()
    if loop is not None:
        if runtime is not None:
            runtime.loops.detach(loop)
        return
    _runtime.stop_current()
    unhook_frameworks()


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A watched stock asyncio loop: a loop factory for ``asyncio.run`` and ``asyncio.Runner``."""
    loop = stock_loop_class()()
    attach(loop)
    return loop


def new_uvloop_event_loop() -> asyncio.AbstractEventLoop:
    """A watched uvloop loop (needs the ``uvloop`` extra)."""
    try:
        import uvloop  # an optional package: the ``uvloop`` extra
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise RuntimeError(
            "loopwatch.new_uvloop_event_loop needs uvloop: pip install 'loopwatch[uvloop]'"
        ) from exc
    loop = uvloop.new_event_loop()
    attach(loop)
    return loop


def enable_global(*, serve_pid: bool = False) -> None:
    """Watch every loop built from now on (``LOOPWATCH=1``, ``install()`` outside a loop)."""
    runtime = activate(serve_pid=serve_pid)
    runtime.loops.enable_global()
    _hook_routes(runtime)


def _hook_routes(runtime: Runtime) -> None:
    """Label requests by route in the frameworks the program imports (LOOPWATCH_ROUTES), and
    track the request tasks that no task factory sees (aiohttp's, from Python 3.12)."""
    settings = runtime.settings
    if settings.routes or settings.tasks:
        hook_frameworks(routes=settings.routes)
    else:
        unhook_frameworks()


def global_enabled() -> bool:
    """Whether every new loop is watched (global mode)."""
    runtime = _runtime.current()
    return runtime is not None and runtime.loops.global_mode


def patch_uvloop() -> None:
    """uvloop was imported: its loops are watched too if global mode is on."""
    runtime = _runtime.current()
    if runtime is not None:
        runtime.loops.patch_uvloop()


def metrics_url() -> str | None:
    """The URL of the metrics endpoint loopwatch serves (``LOOPWATCH_METRICS_PORT``), or None."""
    endpoint = getattr(getattr(_runtime.current(), "metrics", None), "endpoint", None)
    return None if endpoint is None else str(endpoint.url)


def snapshot() -> dict[str, Any]:
    """Every watched loop and every task now, as plain data (what ``GET /tasks`` serves)."""
    return _live.snapshot(_runtime.current())


def coroutine_stats() -> list[CoroutineStats]:
    """Totals per coroutine name, the busiest first: what ``LOOPWATCH_SUMMARY=1`` prints.

    Counted since loopwatch was installed (``uninstall()`` starts them again), over every
    watched loop, for tasks that have ended and for ``@loopwatch.timed`` calls.
    """
    runtime = _runtime.current()
    return runtime.table.stats() if runtime is not None else []
