"""Publish events through structlog, without ever configuring it.

A library must not configure structlog globally: that is the program's to do. So there are two
ways in, and neither touches ``structlog.configure``:

- :class:`StructlogExporter` logs through the program's own configuration, as
  ``structlog.get_logger("loopwatch")``: the event name is the event, the fields are key/values.
- :class:`JsonExporter` (``LOOPWATCH_LOG=json``) renders with structlog's own processors on a
  private bound logger, whatever the program configured (or did not).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import structlog

from .._events import Event
from ._text import shown_stack
from .jsonlines import JsonLines

if TYPE_CHECKING:
    from structlog.typing import EventDict, WrappedLogger

LOGGER_NAME = "loopwatch"


def structlog_fields(event: Event, *, full_stack: bool = False) -> dict[str, Any]:
    """The event's fields as structlog key/values (without ``event``, which is the message).

    ``stack`` becomes one indented place per line, the program's own frames unless
    ``full_stack``: in structlog, ``stack`` is a preformatted text that renderers such as
    ``ConsoleRenderer`` print on the lines below the event (a list there would not even render).
    """
    data = event.as_dict()
    del data["event"]
    stack = shown_stack(data.pop("stack", None) or [], full_stack=full_stack)
    if stack:
        data["stack"] = "\n".join(f"    {place}" for place in stack)
    return data


class StructlogExporter:
    """Each event as a warning of ``structlog.get_logger("loopwatch")``, as the program set up."""

    name = "structlog"

    def __init__(self, *, full_stack: bool = False) -> None:
        self.full_stack = full_stack
        self._logger: Any = None

    def __call__(self, event: Event) -> None:
        logger = self._logger
        if logger is None:
            # A lazy proxy: it follows the program's configuration, even one made later. Made
            # at the first event, on the reporter's thread: loopwatch may start while the
            # program is still importing structlog (which imports asyncio).
            logger = self._logger = structlog.get_logger(LOGGER_NAME)
        logger.warning(event.event, **structlog_fields(event, full_stack=self.full_stack))


def _event_first(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    """Put ``event`` first, as loopwatch's JSON lines always have it (structlog puts it last)."""
    return {"event": event_dict.pop("event"), **event_dict}


class _Lines:
    """The wrapped logger of the private pipeline: hands each rendered line to the exporter."""

    def __init__(self, write: JsonExporter) -> None:
        self._exporter = write

    def warning(self, line: str) -> None:
        self._exporter.write_line(line)


class JsonExporter(JsonLines):
    """JSON lines rendered by structlog's ``JSONRenderer`` on a private logger.

    The bound logger is built here, with its own processors, wrapper class and context class, so
    nothing of the program's structlog configuration applies to it, and nothing of it leaks out.
    """

    name = "json"

    def __init__(self, path: str | None = None) -> None:
        super().__init__(path)
        self._logger: Any = None

    def _bound(self) -> Any:
        # Made at the first event (see StructlogExporter): structlog may be half imported now.
        renderer = structlog.processors.JSONRenderer(
            serializer=json.dumps, default=str, separators=(",", ":")
        )
        self._logger = structlog.BoundLogger(
            _Lines(self), processors=[_event_first, renderer], context={}
        )
        return self._logger

    def __call__(self, event: Event) -> None:
        data = event.as_dict()
        (self._logger or self._bound()).warning(data.pop("event"), **data)

    def write_line(self, line: str) -> None:
        with self._lock:
            stream = self._stream()
            stream.write(line + "\n")
            stream.flush()
