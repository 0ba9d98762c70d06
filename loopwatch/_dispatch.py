"""Fan-out from detectors to exporters and scopes.

An exporter is any callable that takes an event (``Callable[[Event], None]``), as a structlog
processor is any callable of a documented shape. One that raises is removed and the failure said
once on standard error: a diagnostic never breaks the program it watches.

Events arrive from the loop thread, the watchdog thread and the garbage collector (any thread), so
emission takes a lock; it is never on a hot path (it runs once per finding, not per callback).
"""

from __future__ import annotations

import contextlib
import threading
from collections import Counter
from collections.abc import Callable

from ._config import report
from ._events import Event

Exporter = Callable[[Event], None]


class Dispatcher:
    """Counts every event exactly, then hands it to each sink (scopes) and exporter."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._exporters: tuple[Exporter, ...] = ()
        self._sinks: tuple[Callable[[Event], None], ...] = ()
        self.counts: Counter[str] = Counter()

    @property
    def exporters(self) -> tuple[Exporter, ...]:
        return self._exporters

    def add_exporter(self, exporter: Exporter) -> None:
        with self._lock:
            if exporter not in self._exporters:
                self._exporters = (*self._exporters, exporter)

    def remove_exporter(self, exporter: Exporter) -> None:
        with self._lock:
            self._exporters = tuple(e for e in self._exporters if e != exporter)

    def add_sink(self, sink: Callable[[Event], None]) -> None:
        with self._lock:
            self._sinks = (*self._sinks, sink)

    def remove_sink(self, sink: Callable[[Event], None]) -> None:
        with self._lock:
            self._sinks = tuple(s for s in self._sinks if s != sink)

    def emit(self, event: Event) -> None:
        with self._lock:
            self.counts[event.event] += 1
            sinks, exporters = self._sinks, self._exporters
            for sink in sinks:
                try:
                    sink(event)
                except BaseException as exc:  # noqa: BLE001 - see module docstring
                    self._sinks = tuple(s for s in self._sinks if s != sink)
                    report(f"loopwatch: a scope failed ({_describe(exc)}); it is disabled")
            for exporter in exporters:
                try:
                    exporter(event)
                except BaseException as exc:  # noqa: BLE001 - see module docstring
                    self.remove_exporter(exporter)
                    name = getattr(exporter, "name", None) or type(exporter).__name__
                    report(f"loopwatch: exporter {name} failed ({_describe(exc)}); it is disabled")

    def after_fork_in_child(self) -> None:
        """The lock may have been held by a thread that does not exist in the child."""
        self._lock = threading.RLock()
        for exporter in self._exporters:
            hook = getattr(exporter, "after_fork_in_child", None)
            if hook is not None:
                hook()

    def close(self) -> None:
        with self._lock:
            exporters, self._exporters = self._exporters, ()
        for exporter in exporters:
            close = getattr(exporter, "close", None)
            if close is not None:
                with contextlib.suppress(Exception):  # closing is best effort
                    close()


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
