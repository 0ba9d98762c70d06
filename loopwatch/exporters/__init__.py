"""Exporters publish events. An exporter is any callable that takes an event.

The built-in ones are chosen by ``LOOPWATCH_LOG`` (see :func:`from_settings`); users may add their
own with ``loopwatch.add_exporter``.
"""

from __future__ import annotations

from .._config import Settings
from .._dispatch import Exporter


def from_settings(settings: Settings) -> list[Exporter]:
    """The exporters ``LOOPWATCH_LOG`` asks for. ``auto`` falls back to stdlib logging."""
    mode = settings.log
    if mode == "off":
        return []
    if mode == "json":
        from .jsonlines import JsonLines

        return [JsonLines(settings.log_file)]
    from .logging import LoggingExporter

    return [LoggingExporter()]
