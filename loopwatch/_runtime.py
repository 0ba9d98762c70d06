"""The process-wide state of an active loopwatch: settings, the dispatcher, the watchdog.

Created by the first ``install()``, loop factory or policy, or by ``LOOPWATCH=1``; torn down whole
by ``uninstall()``. Around a fork every thread of loopwatch's is stopped (so the fork finds the
process as it would unwatched) and started again in the parent; the child keeps the settings and
exporters, but none of the threads, none of the parent's loops and nothing the parent queued.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import threading
from typing import TYPE_CHECKING, Any

from . import _config, _threads
from ._config import Settings
from ._dispatch import Dispatcher
from ._watchdog import Watchdog

if TYPE_CHECKING:
    from ._metrics import Snapshot
    from .exporters.prometheus import Publisher


class Runtime:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.dispatcher = Dispatcher()
        self.watchdog = Watchdog(self.dispatcher.say)
        # Prometheus publishing (exporters/prometheus.py), started by publish_metrics() now or
        # once the program imports prometheus_client; ``inherited`` is what a forked child's
        # counters held at the fork, so that its metrics count only its own.
        self.metrics: Publisher | None = None
        self.metrics_lock = threading.Lock()
        self.inherited: Snapshot | None = None
        self._at_fork: Snapshot | None = None
        self.closed = False
        from .exporters import from_settings, publish_metrics

        self.apply(settings)
        for exporter in from_settings(settings):
            self.dispatcher.add_exporter(exporter)

        publish_metrics(self)
        if settings.summary:
            atexit.register(self.print_summary)

    def apply(self, settings: Settings) -> None:
        """Make new settings the runtime's (thresholds of loops attached later, label cap)."""
        from . import _timing

        self.settings = settings
        _timing.TABLE.cap = settings.coroutine_labels

    def say(self, line: str) -> None:
        self.dispatcher.say(line)

    def print_summary(self) -> None:
        """``LOOPWATCH_SUMMARY=1``: the busiest coroutines, on standard error, at exit."""
        from . import _timing

        _config.report(_timing.summary())

    def close(self) -> None:
        from . import _timing

        atexit.unregister(self.print_summary)
        self.closed = True
        self.watchdog.stop()
        self.dispatcher.close()
        with self.metrics_lock:
            metrics, self.metrics = self.metrics, None
        if metrics is not None:
            metrics.close()
        _timing.TABLE.clear()
        _threads.discard(self.watchdog.worker)
        _threads.discard(self.dispatcher.worker)

    def before_fork(self) -> None:
        """Take the counts a child will inherit here, in the parent, where every lock works, and
        stop loopwatch's threads for the length of the fork."""
        from . import _metrics

        try:
            self._at_fork = _metrics.collect()
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
        from . import _loops

        _threads.forget_all()
        writer = _file_writer()
        if writer is not None:
            writer.after_fork_in_child()
        _loops.after_fork_in_child()
        self.watchdog.after_fork_in_child()
        self.dispatcher.after_fork_in_child()
        self.metrics_lock = threading.Lock()
        self.inherited, self._at_fork = self._at_fork, None
        if self.metrics is not None:
            self.metrics.after_fork_in_child()


def _file_writer() -> Any:
    """prometheus's multiprocess file writer, if that exporter was ever loaded."""
    module = sys.modules.get("loopwatch.exporters.prometheus")
    return getattr(module, "_writer", None)


_lock = threading.RLock()
_current: Runtime | None = None
_fork_hook_installed = False


def current() -> Runtime | None:
    return _current


def metrics_url() -> str | None:
    """The URL of the metrics endpoint loopwatch serves (``LOOPWATCH_METRICS_PORT``), or None."""
    runtime = _current
    endpoint = getattr(getattr(runtime, "metrics", None), "endpoint", None)
    return None if endpoint is None else str(endpoint.url)


def activate(**overrides: Any) -> Runtime:
    """The active runtime, created from the environment (and these keywords) if there is none.

    Keywords given to a later call update the settings used for loops attached from then on.
    """
    global _current
    with _lock:
        runtime = _current
        if runtime is None:
            settings = _config.environ_settings().replace(**overrides)
            runtime = _current = Runtime(settings)
            _install_fork_hook()
        elif overrides:
            runtime.apply(runtime.settings.replace(**overrides))
            if "metrics_port" in overrides:
                from .exporters import publish_metrics

                publish_metrics(runtime)  # serve the endpoint asked for now
        return runtime


def deactivate() -> None:
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
        timing = sys.modules.get("loopwatch._timing")
        if timing is not None:
            timing.TABLE.after_fork_in_child()
        runtime = _current
        if runtime is not None:
            runtime.after_fork_in_child()
