"""Exporters publish events and metrics. An exporter is any callable that takes an event.

The log exporters are chosen by ``LOOPWATCH_LOG`` (see :func:`from_settings`) and wrapped in flood
folding (``LOOPWATCH_LOG_FOLD_MS``). Metrics are published by :mod:`.prometheus`, started by
:func:`publish_metrics`.
"""

from __future__ import annotations

import sys
import threading
from types import ModuleType
from typing import TYPE_CHECKING

from .. import _runtime
from .._config import Settings, report
from .._dispatch import Exporter
from .._events import Event
from .._import_hooks import when_imported
from .logging import LoggingExporter

if TYPE_CHECKING:
    from .._runtime import Runtime
    from .structlog import StructlogExporter


def from_settings(settings: Settings) -> list[Exporter]:
    """The log exporter ``LOOPWATCH_LOG`` asks for, folding floods unless told not to."""
    mode = settings.log
    full = settings.log_stack == "full"
    exporter: Exporter
    if mode == "off":
        return []
    if mode == "json":
        from .structlog import JsonExporter  # (deferred: loaded only when asked for)

        exporter = JsonExporter(settings.log_file)
    elif mode == "structlog":
        from .structlog import StructlogExporter  # (deferred: as above)

        exporter = StructlogExporter(full_stack=full)
    elif mode == "logging":
        exporter = LoggingExporter(full_stack=full)
    else:
        exporter = AutoExporter(full_stack=full)
    if settings.log_fold_ms > 0:
        from ._fold import Fold  # (deferred: loaded only when folding is on)

        exporter = Fold(exporter, settings.log_fold_ms / 1000.0)
    return [exporter]


class AutoExporter:
    """``LOOPWATCH_LOG=auto``: through structlog if the program configured it, else ``logging``.

    Decided per event, so a program that configures structlog after loopwatch started (in an
    ASGI lifespan, say) is followed. structlog is never imported here: a program that did not
    import it cannot have configured it, and checking costs a dict lookup.
    """

    name = "auto"

    def __init__(self, *, full_stack: bool = False) -> None:
        self.full_stack = full_stack
        self._logging = LoggingExporter(full_stack=full_stack)
        self._structlog: StructlogExporter | None = None

    def __call__(self, event: Event) -> None:
        module = sys.modules.get("structlog")
        if module is None or not module.is_configured():
            self._logging(event)
            return
        if self._structlog is None:
            from .structlog import StructlogExporter  # (deferred: only once structlog is set up)

            self._structlog = StructlogExporter(full_stack=self.full_stack)
        self._structlog(event)


# -- metrics -----------------------------------------------------------------------------------

_hook_lock = threading.Lock()
_hooked = False


def publish_metrics(runtime: Runtime) -> None:
    """Start publishing metrics for ``runtime``: now, or once the program imports prometheus_client.

    Importing prometheus_client costs 30 to 50 ms, which a program that never uses Prometheus
    should not pay at start-up: without an endpoint asked for, loopwatch waits for the program to
    import it (until then nobody could read ``REGISTRY`` anyway).
    """
    if runtime.settings.metrics_port is not None or "prometheus_client" in sys.modules:
        _attach(runtime)
        return
    global _hooked
    with _hook_lock:
        if _hooked:
            return
        _hooked = True

    when_imported("prometheus_client", _on_prometheus_client)


def _on_prometheus_client(_: ModuleType) -> None:
    runtime = _runtime.current()
    if runtime is not None:
        _attach(runtime)


def _attach(runtime: Runtime) -> None:
    # Imported before taking the lock: this import may wait for another thread that is importing
    # prometheus_client, and that thread's import hook may be waiting for the lock.
    from .prometheus import Publisher

    with runtime.metrics_lock:
        if runtime.closed:
            return
        if runtime.metrics is None:
            runtime.metrics = Publisher(runtime)
        else:
            runtime.metrics.update(runtime.settings)


def publish_otel(runtime: Runtime) -> None:
    """``LOOPWATCH_OTEL=1``: start the OpenTelemetry exporter for ``runtime`` (once). Without the
    ``otel`` extra's packages it is one line on standard error, and loopwatch goes on without."""
    if not runtime.settings.otel or runtime.closed:
        return
    if any(getattr(e, "name", None) == "otel" for e in runtime.dispatcher.exporters):
        return
    from .otel import OTel, Unavailable  # (deferred: OpenTelemetry only when asked for)

    try:
        exporter = OTel(runtime)
    except Unavailable as exc:
        report(f"loopwatch: LOOPWATCH_OTEL=1 but {exc}; OpenTelemetry is off")
        return
    except Exception as exc:  # noqa: BLE001 - never in the program's way
        report(f"loopwatch: OpenTelemetry could not start ({type(exc).__name__}: {exc}); it is off")
        return
    runtime.dispatcher.add_exporter(exporter)
