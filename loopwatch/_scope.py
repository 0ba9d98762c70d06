"""``loopwatch.watch()``: a scope that collects findings and reports the tasks it leaves behind."""

from __future__ import annotations

import asyncio
import threading
import time
from types import TracebackType
from typing import Any

from . import _api, _runtime
from ._config import Settings
from ._events import Event


class watch:
    """Collect the events raised while the scope is open, and at its end report each task
    created inside it that is still pending (``loopwatch.task_leaked``).

    Works as ``with`` and ``async with``. Inside a running loop, that loop is watched (with these
    settings for the scope's duration); outside, every loop made inside the scope is. ``events``
    holds the findings, in order. Events are collected from the whole process while the scope
    is open: two scopes open at once both see each other's findings.
    """

    def __init__(self, **settings: Any) -> None:
        Settings().replace(**settings)  # an unknown name or bad value raises here, at the call
        self._overrides = settings
        self.events: list[Event] = []
        self._lock = threading.Lock()
        self._since = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._previous: Settings | None = None
        self._enabled_global = False
        self._reconfigured: list[tuple[Any, Settings]] = []

    def __repr__(self) -> str:
        return f"<loopwatch.watch events={len(self.events)}>"

    def _collect(self, event: Event) -> None:
        with self._lock:
            self.events.append(event)

    def __enter__(self) -> watch:
        runtime = _api.activate()
        loops = runtime.loops
        settings = runtime.settings.replace(**self._overrides)
        try:
            self._loop = asyncio.get_running_loop()
        except RuntimeError:
            self._loop = None
        if self._loop is not None:
            state = loops.state_of(self._loop)
            if state is not None:
                self._previous = state.settings
                state.configure(settings)
            else:
                loops.attach(self._loop, settings)
        else:
            # Loops made inside the scope take its settings; so do the watched loops there are.
            self._previous = runtime.settings
            runtime.apply(settings)
            self._reconfigured = [
                (state, state.settings)
                for state in (loops.state_of(lp) for lp in loops.watched_loops())
                if state is not None
            ]
            for state, _ in self._reconfigured:
                state.configure(settings)
            if not loops.global_mode:
                loops.enable_global()
                self._enabled_global = True
        runtime.dispatcher.add_sink(self._collect)
        self._since = time.monotonic()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        runtime = _runtime.current()
        try:
            self._report_leaks()
        finally:
            if runtime is not None:
                runtime.dispatcher.remove_sink(self._collect)
            if self._loop is not None:
                state = runtime.loops.state_of(self._loop) if runtime is not None else None
                if state is not None and self._previous is not None:
                    state.configure(self._previous)
            else:
                if self._enabled_global and runtime is not None:
                    runtime.loops.disable_global()
                if runtime is not None and self._previous is not None:
                    runtime.apply(self._previous)
                for state, previous in self._reconfigured:
                    state.configure(previous)

    async def __aenter__(self) -> watch:
        return self.__enter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.__exit__(exc_type, exc, tb)

    def _report_leaks(self) -> None:
        runtime = _runtime.current()
        if runtime is None:
            return
        registry = runtime.loops
        if self._loop is not None:
            loops = [self._loop]
            current = asyncio.current_task(self._loop)
        else:
            # Loops made inside the scope that were not closed, and are not running elsewhere.
            loops = [
                lp for lp in registry.watched_loops() if not lp.is_closed() and not lp.is_running()
            ]
            current = None
        for loop in loops:
            tracker = registry.tracker_of(loop)
            if tracker is None:
                continue
            pending = [t for t in asyncio.all_tasks(loop) if t is not current]
            tracker.report_leaks(pending, since=self._since)
