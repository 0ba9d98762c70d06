"""The one owner of loopwatch's process state: :class:`Runtime`.

A runtime holds, for as long as loopwatch is on: the settings, the dispatcher (events to
exporters), the watchdog (its thread and the loops it follows), the registry of watched loops
with every hook they needed (``_loops.Loops``), the per-coroutine timing table, the Prometheus
publisher once there is one, and what a forked child inherited. Creating it turns loopwatch on,
:meth:`Runtime.close` turns it off and undoes every hook; a test or a fork resets this one object.

It is made by ``_api.activate()`` (the first ``install()``, loop factory, policy or
``LOOPWATCH=1``), which also gives it its exporters: this module imports nothing above the loop
registry. Around a fork every thread of loopwatch's is stopped (so the fork finds the process as
it would unwatched) and started again in the parent; the child keeps the settings and exporters,
but none of the threads, none of the parent's loops and nothing the parent queued.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from . import _config, _context, _threads, _timing
from ._config import Settings
from ._dispatch import Dispatcher, Exporter
from ._loops import Loops
from ._timing import Table
from ._watchdog import Watchdog

if TYPE_CHECKING:
    from ._metrics import Snapshot
    from .exporters.prometheus import Publisher


class Runtime:
    def __init__(
        self,
        settings: Settings,
        *,
        exporters: Iterable[Exporter] = (),
        collect: Callable[[Runtime], Snapshot] | None = None,
    ) -> None:
        self.dispatcher = Dispatcher()
        self.watchdog = Watchdog(self.dispatcher.say)
        self.table = Table(settings.coroutine_labels)
        self.requests = _context.RequestTable(settings.coroutine_labels)  # busy time by route
        self.loops = Loops(settings, self.dispatcher, self.watchdog, self.table)
        # The read side's snapshot (``_metrics.collect``), taken just before a fork: a child's
        # counters then count only its own (``inherited``).
        self.collect = collect
        # Prometheus publishing (exporters/prometheus.py), started by publish_metrics() now or
        # once the program imports prometheus_client.
        self.metrics: Publisher | None = None
        self.metrics_lock = threading.Lock()
        self.inherited: Snapshot | None = None
        self._at_fork: Snapshot | None = None
        self.closed = False
        self.console: Any = None  # the live view by PID (exporters/console.py), set by _api
        self.apply(settings)
        for exporter in exporters:
            self.dispatcher.add_exporter(exporter)
        _timing.record_timed_calls(self.table)  # @loopwatch.timed calls count here
        if settings.summary:
            atexit.register(self.print_summary)

    @property
    def settings(self) -> Settings:
        """The settings of loops attached from now on (each loop keeps those it was given)."""
        return self.loops.settings

    @settings.setter
    def settings(self, settings: Settings) -> None:
        self.loops.settings = settings

    def apply(self, settings: Settings) -> None:
        """Make new settings the runtime's (thresholds of loops attached later, label cap)."""
        self.settings = settings
        self.table.cap = settings.coroutine_labels
        self.requests.cap = settings.coroutine_labels

    def say(self, line: str) -> None:
        self.dispatcher.say(line)

    def print_summary(self) -> None:
        """``LOOPWATCH_SUMMARY=1``: the busiest coroutines, on standard error, at exit."""
        _config.report(_timing.summary(self.table.stats()))

    def close(self) -> None:
        """Turn loopwatch off: every loop unwatched, every hook undone, every thread ended."""
        atexit.unregister(self.print_summary)
        self.closed = True
        self.loops.close()
        self.watchdog.stop()
        self.dispatcher.close()
        with self.metrics_lock:
            metrics, self.metrics = self.metrics, None
        if metrics is not None:
            metrics.close()
        if self.console is not None:
            self.console.close()
        if _timing._decorated is self.table:
            _timing.record_timed_calls(None)
        self.table.clear()
        self.requests.clear()
        _context.clear()
        _threads.discard(self.watchdog.worker)
        _threads.discard(self.dispatcher.worker)
        # A wake-up announced or rung by a thread now ended would make the next loop's pulse
        # wait for a thread that never comes (2 ms a run on uvloop, measured).
        _threads.forget_wakeups()

    def before_fork(self) -> None:
        """Take the counts a child will inherit here, in the parent, where every lock works, and
        stop loopwatch's threads for the length of the fork."""
        try:
            self._at_fork = self.collect(self) if self.collect is not None else None
        except Exception:  # noqa: BLE001 - a fork must never fail because of loopwatch
            self._at_fork = None
        _threads.pause_all()
        writer = _file_writer()
        if writer is not None:
            writer.before_fork()

    def after_fork_in_parent(self) -> None:
        self._at_fork = None
        writer = _file_writer()
        if writer is not None:
            writer.after_fork_in_parent()
        _threads.resume_soon()

    def after_fork_in_child(self) -> None:
        _threads.forget_all()
        writer = _file_writer()
        if writer is not None:
            writer.after_fork_in_child()
        self.table.after_fork_in_child()
        self.loops.after_fork_in_child()
        self.watchdog.after_fork_in_child()
        self.dispatcher.after_fork_in_child()
        self.metrics_lock = threading.Lock()
        self.inherited, self._at_fork = self._at_fork, None
        if self.metrics is not None:
            self.metrics.after_fork_in_child()
        if self.console is not None:
            self.console.after_fork_in_child()


def _file_writer() -> Any:
    """prometheus's multiprocess file writer, if that exporter was ever loaded (looked up, not
    imported: the exporters are above this layer)."""
    module = sys.modules.get("loopwatch.exporters.prometheus")
    return getattr(module, "_writer", None)


# The active runtime: the one pointer to loopwatch's state, for the entry points and the hooks
# that have no other way in (an import hook, a fork hook, a scrape).
_lock = threading.RLock()
_current: Runtime | None = None
_fork_hook_installed = False


def current() -> Runtime | None:
    return _current


def current_or_start(make: Callable[[], Runtime]) -> tuple[Runtime, bool]:
    """The active runtime, or the one ``make()`` builds, made active; and whether it is new."""
    global _current
    with _lock:
        runtime = _current
        if runtime is not None:
            return runtime, False
        runtime = _current = make()
        _install_fork_hook()
        return runtime, True


def stop_current() -> None:
    """Close the active runtime, if there is one: loopwatch is off."""
    global _current
    with _lock:
        runtime, _current = _current, None
    if runtime is not None:
        runtime.close()


def _install_fork_hook() -> None:
    global _fork_hook_installed
    if _fork_hook_installed or not hasattr(os, "register_at_fork"):
        return
    _fork_hook_installed = True
    os.register_at_fork(
        before=_before_fork,
        after_in_parent=_after_fork_in_parent,
        after_in_child=_after_fork_in_child,
    )


# Fork hooks: what fails in them is kept quiet (an exception in an at-fork hook would be
# printed by Python as "Exception ignored in ...", an output the program never had).


def _before_fork() -> None:
    runtime = _current
    if runtime is not None:
        with contextlib.suppress(Exception):
            runtime.before_fork()


def _after_fork_in_parent() -> None:
    runtime = _current
    _threads.in_fork_hook = True
    if runtime is not None:
        with contextlib.suppress(Exception):
            runtime.after_fork_in_parent()
    _threads.in_fork_hook = False  # the last statement: no call after it in this hook


def _after_fork_in_child() -> None:
    global _lock
    _lock = threading.RLock()
    with contextlib.suppress(Exception):
        runtime = _current
        if runtime is not None:
            runtime.after_fork_in_child()
