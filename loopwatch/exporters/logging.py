"""Publish events through the standard library's ``logging``, logger ``loopwatch``.

Each event is one record at WARNING (so an unconfigured program still shows it, through logging's
last-resort handler), its message starting with the event name; the fields are readable in the
message and available whole as ``record.loopwatch`` for formatters that want structure.
"""

from __future__ import annotations

import logging

from .._events import Event
from ._text import render

LOGGER_NAME = "loopwatch"


class LoggingExporter:
    name = "logging"

    def __init__(
        self,
        logger: logging.Logger | None = None,
        level: int = logging.WARNING,
        *,
        full_stack: bool = False,
    ) -> None:
        self.logger = logger or logging.getLogger(LOGGER_NAME)
        self.level = level
        self.full_stack = full_stack

    def __call__(self, event: Event) -> None:
        if self.logger.isEnabledFor(self.level):
            message = render(event, full_stack=self.full_stack)
            self.logger.log(self.level, message, extra={"loopwatch": event.as_dict()})
