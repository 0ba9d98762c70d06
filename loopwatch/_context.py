"""Which request a finding belongs to: the route a task serves, and the context it runs in.

- **Route.** A task serving a request is labelled by its route template (``GET /users/{id}``)
  by the framework hooks (``loopwatch.integrations``) or by hand (:func:`loopwatch.set_route`).
  The label is kept by weak reference to the task, so it never keeps a task alive, and it goes
  with the task.
- **Context.** The keys the task bound with ``structlog.contextvars`` and the ``trace_id`` and
  ``span_id`` of the OpenTelemetry span current in it, read from the task's own
  ``contextvars.Context``. A context is immutable once made (each ``ContextVar.set`` makes a
  new mapping), so reading it from the watchdog's thread, while the task runs, reads a whole
  state, never a half-written one, and changes nothing of the program's.

Nothing here imports structlog or OpenTelemetry: their variables are recognised by name, and
OpenTelemetry's span only when the program has imported OpenTelemetry itself.
"""

from __future__ import annotations

import asyncio
import sys
import weakref
from collections.abc import Callable
from typing import Any

from ._native import ACCEL
from ._stats import LATENCY_BUCKETS, Histogram, HistogramSnapshot

# A request's busy time into its route's compiled Row (False: the route has none yet).
_observe_request = getattr(ACCEL, "observe_request", None)
_request_route = getattr(ACCEL, "request_route", None)


class _TaskRoutes:
    """task -> route template, by weak reference: the label goes with its task (a process-wide
    map, as asyncio's own registry of tasks is). A plain dict keyed by weak references whose
    callback is the dict's own ``pop``: an entry goes when its task does, with no Python call
    (a weak dictionary calls Python when each task dies, 1 to 2 us a request). Only that
    callback removes an entry, so it never misses: a label taken off, or every label at
    uninstall(), is set to None instead."""

    __slots__ = ("_pop", "data")

    def __init__(self) -> None:
        self.data: dict[weakref.ref[Any], str | None] = {}
        self._pop = self.data.pop

    def set(self, task: asyncio.Task[Any], route: str | None) -> None:
        if route is None and not self.data:
            return
        # (A task already labelled keeps its first reference: the new one dies unused.)
        self.data[weakref.ref(task, self._pop)] = route

    def get(self, task: asyncio.Task[Any]) -> str | None:
        return self.data.get(weakref.ref(task)) if self.data else None

    def clear(self) -> None:
        data = self.data
        for ref in list(data):
            if ref() is not None:  # (a dead one's entry is its callback's to take)
                data[ref] = None


_routes = _TaskRoutes()

_STRUCTLOG_PREFIX = "structlog_"  # structlog.contextvars names each bound key's variable so
_OTEL_VAR = "current_context"  # opentelemetry.context.contextvars_context's variable
_UNBOUND = Ellipsis  # structlog's value for a key that was unbound
_thread_context = getattr(ACCEL, "thread_context", None) if sys.version_info < (3, 12) else None


# The step-timing proxy types (set by _timing): a task driven by one keeps its route with it,
# and the proxy tells the request table when the task ends. The compiled proxy has a slot for it
# (``_route``); the pure-Python one a weak map entry (a slot would add 8 bytes to every task).
proxy_types: tuple[type, ...] = ()
proxy_routes: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()
proxy_routes_held: dict[Any, str] = proxy_routes.data  # type: ignore[attr-defined]  # its dict


def set_route(task: asyncio.Task[Any], route: str | None) -> None:
    """Label ``task`` with ``route`` (None: take the label off): on the task's step-timing proxy
    if it has one (its busy time then goes to the route when it ends)."""
    proxy: Any = getattr(task, "_coro", None)
    # (A proxy that is the task's coroutine: the task factory's, or one a framework hook made
    # for a task no factory sees, an aiohttp request's.)
    if type(proxy) in proxy_types:
        if hasattr(type(proxy), "_route"):
            proxy._route = route
        elif route is None:
            proxy_routes.pop(proxy, None)
        else:
            proxy_routes[proxy] = route
        return
    _routes.set(task, route)


def route_of(task: asyncio.Task[Any] | None) -> str | None:
    if task is None:
        return None
    proxy = getattr(task, "_coro", None)
    if type(proxy) in proxy_types:
        route: str | None = getattr(proxy, "_route", None) or (
            proxy_routes.get(proxy) if proxy_routes_held else None
        )
        if route is not None:
            return route
        request = getattr(proxy, "_request", None)
        if request is not None and _request_route is not None:
            # An aiohttp request's task: its route read from its match, once routed.
            try:
                found: str | None = _request_route(request)
            except Exception:  # noqa: BLE001 - a finding without its route, never an error
                return None
            return found
    try:
        return _routes.get(task)
    except TypeError:  # a task-like object that cannot be weakly referenced
        return None


def clear() -> None:
    _routes.clear()
    proxy_routes.clear()


def _task_context(task: asyncio.Task[Any]) -> Any:
    get = getattr(task, "get_context", None)  # 3.12+
    if get is not None:
        return get()
    return getattr(task, "_context", None)


def context_of(task: asyncio.Task[Any] | None, thread: int | None = None) -> dict[str, Any] | None:
    """The task's structlog keys and OpenTelemetry span ids, or None when it has neither.

    ``thread``: the ident of the thread running the task right now (a block). Python 3.11's tasks
    do not give their context; the context the thread runs in is the task's, read through the
    compiled module. Elsewhere on 3.11 (a task that is not running, or pure Python) there is
    none."""
    if task is None:
        return None
    ctx = _task_context(task)
    if ctx is None and thread is not None and _thread_context is not None:
        ctx = _thread_context(thread)
    if ctx is None:
        return None
    out: dict[str, Any] = {}
    otel = None
    for var, value in list(ctx.items()):
        name = var.name
        if name.startswith(_STRUCTLOG_PREFIX):
            if value is not _UNBOUND:
                out[name[len(_STRUCTLOG_PREFIX) :]] = _plain(value)
        elif name == _OTEL_VAR:
            otel = value
    if otel is not None and "opentelemetry.trace" in sys.modules:
        out.update(_span_ids(otel))
    return out or None


def _span_ids(otel_context: Any) -> dict[str, str]:
    """``trace_id`` and ``span_id`` of the span current in an OpenTelemetry context (a mapping)."""
    trace = sys.modules["opentelemetry.trace"]
    try:
        span = trace.get_current_span(otel_context)
        span_context = span.get_span_context()
    except Exception:  # noqa: BLE001 - another version's API: no ids rather than a failure
        return {}
    if not getattr(span_context, "is_valid", False):
        return {}
    ids = {
        "trace_id": format(span_context.trace_id, "032x"),
        "span_id": format(span_context.span_id, "016x"),
    }
    sink = span_sink
    if sink is not None:
        sink(ids["span_id"], span)
    return ids


# ``LOOPWATCH_OTEL=1``: told each span a finding's context names, as the context is read (a block:
# on the watchdog's thread while the loop is blocked, so the span is still open).
span_sink: Callable[[str, Any], None] | None = None
# ... and told of each block once it is a finding, while the loop is still blocked (the
# watchdog's thread): (the block, blocked so far, the threshold, the loop's kind).
block_sink: Callable[[Any, float, float, str], None] | None = None


def _plain(value: Any) -> Any:
    """A bound value as an event holds it: plain data, never the program's object itself."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def about(task: asyncio.Task[Any] | None, thread: int | None = None) -> dict[str, Any]:
    """The ``route`` and ``context`` fields of a finding about ``task`` (running in ``thread``)."""
    return {"route": route_of(task), "context": context_of(task, thread)}


class RequestTable:
    """``loopwatch_request_busy_seconds``: the busy time of each request's task, by route.

    At most ``cap`` routes have a series of their own (as coroutine labels do): the others share
    ``other``. Written on the loops' threads, read by a scrape: each observation is a few
    stores the GIL keeps whole. With the compiled module each route's row is a compiled ``Row``
    (its ``count``, ``busy`` and ``busy_counts``), and a labelled task's proxy puts its busy
    time there itself when it ends: Python is called only for a route seen for the first time."""

    OTHER = "other"

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.rows: dict[str, Any] = {}

    def observe(self, route: str, busy: float) -> None:
        rows = self.rows
        if _observe_request is not None:
            if _observe_request(rows, route, busy):
                return
            if route not in rows and len(rows) >= self.cap:
                route = self.OTHER
            rows.setdefault(route, ACCEL.Row())
            _observe_request(rows, route, busy)
            ACCEL.set_route_rows(rows)  # (the running table's: the next ones are observed in C)
            return
        histogram = rows.get(route)
        if histogram is None:
            if len(rows) >= self.cap:
                route = self.OTHER
                histogram = rows.get(route)
            if histogram is None:
                histogram = rows.setdefault(route, Histogram())
        histogram.observe(busy)

    def histograms(self) -> dict[str, HistogramSnapshot]:
        out = {}
        for route, row in list(self.rows.items()):
            if isinstance(row, Histogram):
                out[route] = HistogramSnapshot.of(row)
            else:
                out[route] = HistogramSnapshot.of_counts(LATENCY_BUCKETS, row.busy_counts, row.busy)
        return out

    def clear(self) -> None:
        if ACCEL is not None:
            ACCEL.set_route_rows(None)
        self.rows.clear()
