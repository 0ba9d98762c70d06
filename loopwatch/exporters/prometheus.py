"""Prometheus metrics: made from loopwatch's plain counters when someone asks, never per event.

The hot paths only add to plain Python counters and histograms (``_stats``, the dispatcher's
counts, the task tables); :class:`MetricsCollector` turns one :func:`snapshot` of them into metric
families at scrape time, so a slow callback or a task costs Prometheus nothing. What there is:

- :class:`MetricsCollector`, registered in ``prometheus_client.REGISTRY`` while loopwatch is
  active (by :class:`Publisher`), or in any registry the program passes;
- the ``LOOPWATCH_METRICS_PORT`` endpoint, served from one daemon thread (:class:`Endpoint`);
- :func:`metrics_app` (ASGI) and :func:`aiohttp_metrics_handler`, to serve ``/metrics`` from the
  program's own server; both render in a worker thread, so a scrape never blocks the loop;
- prometheus_client's multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``, for gunicorn and other
  pre-fork servers): each process writes its values to its own file once a second (and before
  it answers a scrape), and every scrape merges every process's files.

A forked child counts from the moment it was forked: the runtime keeps what the child inherited
(``Runtime.inherited``) and :func:`snapshot` subtracts it, so a pre-fork server's workers never
count their parent's events twice.
"""

from __future__ import annotations

import _thread
import asyncio
import atexit
import contextlib
import errno
import functools
import gzip
import ipaddress
import json
import socket
import threading
from collections.abc import Awaitable, Callable, Iterable, Iterator, MutableMapping
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import REGISTRY, CollectorRegistry, values
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString as _go_float

from .. import _live, _runtime
from .._config import Settings, report
from .._dispatch import _describe
from .._metrics import Snapshot
from .._stats import HistogramSnapshot
from .._threads import Worker, discard, hidden_call, wait_readable

if TYPE_CHECKING:
    from aiohttp import web  # an optional package: only for its aiohttp handler

    from .._runtime import Runtime

# How prometheus_client writes a bucket bound (``0.1``, ``1.0``, ``+Inf``); untyped there.
floatToGoString: Callable[[float], str] = _go_float

# -- what is published (names, help and the snapshot: ``_metrics``, shared with OpenTelemetry) ---
from .._metrics import (  # noqa: E402 - re-exported: tests and the docs name them here
    COUNTERS,
    HELP,
    LAG,
    LOOP_BUSY,
    OUTCOMES,
    REQUEST_BUSY,
    TASK_BUSY,
    TASK_DURATION,
    TASKS_ACTIVE,
    TASKS_CREATED,
    TASKS_FINISHED,
    snapshot,
)


def _base(name: str) -> str:
    """prometheus_client names a counter family without ``_total`` and adds it to the sample."""
    return name.removesuffix("_total")


@functools.cache
def _go(bound: float) -> str:
    return floatToGoString(bound)


def _le(histogram: HistogramSnapshot) -> list[tuple[str, float]]:
    return [(_go(bound), count) for bound, count in histogram.buckets]


def families(snap: Snapshot | None) -> list[Metric]:
    """The metric families, in the contract's order; without a snapshot, empty (to describe)."""
    out: list[Metric] = []
    for name, text in COUNTERS.items():
        counter = CounterMetricFamily(_base(name), text)
        if snap is not None:
            counter.add_metric([], float(snap.events.get(name, 0)))
        out.append(counter)
    lag = HistogramMetricFamily(LAG, HELP[LAG])
    loop_busy = CounterMetricFamily(_base(LOOP_BUSY), HELP[LOOP_BUSY])
    created = CounterMetricFamily(_base(TASKS_CREATED), HELP[TASKS_CREATED])
    active = GaugeMetricFamily(TASKS_ACTIVE, HELP[TASKS_ACTIVE])
    finished = CounterMetricFamily(_base(TASKS_FINISHED), HELP[TASKS_FINISHED], labels=["outcome"])
    duration = HistogramMetricFamily(TASK_DURATION, HELP[TASK_DURATION], labels=["coroutine"])
    busy = HistogramMetricFamily(TASK_BUSY, HELP[TASK_BUSY], labels=["coroutine"])
    requests = HistogramMetricFamily(REQUEST_BUSY, HELP[REQUEST_BUSY], labels=["route"])
    if snap is not None:
        lag.add_metric([], _le(snap.loop_lag), snap.loop_lag.sum)
        loop_busy.add_metric([], snap.loop_busy_s)
        created.add_metric([], float(snap.tasks_created))
        active.add_metric([], float(snap.tasks_active))
        for outcome in OUTCOMES:
            finished.add_metric([outcome], float(snap.tasks_finished.get(outcome, 0)))
        tables = (
            (duration, snap.task_duration),
            (busy, snap.task_busy),
            (requests, snap.request_busy),
        )
        for family, table in tables:
            for label, histogram in sorted(table.items()):
                family.add_metric([label], _le(histogram), histogram.sum)
    return [*out, lag, loop_busy, created, active, finished, duration, busy, requests]


class MetricsCollector(Collector):
    """loopwatch's metrics for a prometheus_client registry, read at each scrape.

    loopwatch registers one in ``prometheus_client.REGISTRY`` while it is active; for a registry
    of your own, pass it (``MetricsCollector(registry)``) or call ``registry.register``.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        if registry is not None:
            registry.register(self)

    def describe(self) -> list[Metric]:
        # Names only: registering never takes a snapshot.
        return families(None)

    def collect(self) -> list[Metric]:
        return families(snapshot())


# -- multiprocess mode ------------------------------------------------------------------------


def multiprocess_mode() -> bool:
    """Whether prometheus_client runs in multiprocess mode (it read PROMETHEUS_MULTIPROC_DIR at
    import; loopwatch asks it rather than reading a variable outside ``LOOPWATCH_*``)."""
    return values.ValueClass is not values.MutexValue


# (type, family name, sample name, label names, label values, gauge mode): one value in a file.
_Series = tuple[str, str, str, tuple[str, ...], tuple[str, ...], str]


def _series(snap: Snapshot) -> Iterator[tuple[_Series, float]]:
    """Every value of a snapshot as prometheus_client's multiprocess files hold them: counters
    and histogram buckets per process (buckets not cumulative), the gauge summed over live ones."""
    for name in COUNTERS:
        yield ("counter", _base(name), name, (), (), ""), snap.events.get(name, 0)
    yield ("counter", _base(LOOP_BUSY), LOOP_BUSY, (), (), ""), snap.loop_busy_s
    yield ("counter", _base(TASKS_CREATED), TASKS_CREATED, (), (), ""), snap.tasks_created
    yield ("gauge", TASKS_ACTIVE, TASKS_ACTIVE, (), (), "livesum"), snap.tasks_active
    for outcome in OUTCOMES:
        series = ("counter", _base(TASKS_FINISHED), TASKS_FINISHED, ("outcome",), (outcome,), "")
        yield series, snap.tasks_finished.get(outcome, 0)
    tables: list[tuple[str, tuple[str, ...], dict[tuple[str, ...], HistogramSnapshot]]] = [
        (LAG, (), {(): snap.loop_lag}),
        (TASK_DURATION, ("coroutine",), {(k,): h for k, h in snap.task_duration.items()}),
        (TASK_BUSY, ("coroutine",), {(k,): h for k, h in snap.task_busy.items()}),
        (REQUEST_BUSY, ("route",), {(k,): h for k, h in snap.request_busy.items()}),
    ]
    for name, labels, table in tables:
        for label_values, histogram in table.items():
            below = 0
            for bound, cumulative in histogram.buckets:
                le = (*label_values, _go(bound))
                yield (
                    ("histogram", name, name + "_bucket", (*labels, "le"), le, ""),
                    cumulative - below,
                )
                below = cumulative
            yield ("histogram", name, name + "_sum", labels, label_values, ""), histogram.sum


class _FileWriter:
    """Writes this process's values into prometheus_client's multiprocess files.

    Absolute values, set (never added): writing twice is harmless, and only values that changed
    since the last write touch the file, so a quiet process costs a snapshot per second.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[_Series, Any] = {}
        self._written: dict[_Series, float] = {}

    def write(self, snap: Snapshot) -> None:
        with self._lock:
            for series, value in _series(snap):
                if self._written.get(series) == value:
                    continue
                stored = self._values.get(series)
                if stored is None:
                    typ, family, sample, label_names, label_values, mode = series
                    stored = values.ValueClass(
                        typ,
                        family,
                        sample,
                        list(label_names),
                        list(label_values),
                        HELP.get(family, HELP.get(family + "_total", "")),
                        multiprocess_mode=mode,
                    )
                    self._values[series] = stored
                stored.set(float(value))
                self._written[series] = value

    # Held across fork(), so that no write is half done (with prometheus_client's own lock
    # taken) in the child.
    def before_fork(self) -> None:
        self._lock.acquire()

    def after_fork_in_parent(self) -> None:
        self._lock.release()

    def after_fork_in_child(self) -> None:
        # prometheus_client moves its values to the child's own files by itself (it checks the
        # pid); everything is to be written there again.
        self._lock = threading.Lock()
        self._written = {}


# Its fork hooks are the runtime's (``Runtime.before_fork`` and the others): one at-fork hook of
# loopwatch's, run last, so that nothing of loopwatch's runs Python code after it in the parent.
_writer = _FileWriter()


class _Flusher:
    """The thread (invisible, see ``_threads``) that writes a runtime's values to this process's
    file every ``interval`` seconds, and once more when the runtime closes or the process exits."""

    def __init__(self, runtime: Runtime, interval: float = 1.0) -> None:
        self.runtime = runtime
        self.interval = interval
        self._bell = _thread.allocate_lock()
        self._bell.acquire()
        self.worker = Worker("metrics file writer", self._run, self._ring)
        self.worker.start()
        atexit.register(self.write)

    def _ring(self) -> None:
        with contextlib.suppress(RuntimeError):
            self._bell.release()

    def write(self) -> None:
        _writer.write(snapshot(self.runtime))

    def _run(self, keep_going: Callable[[], bool]) -> None:
        while True:
            self._bell.acquire(True, self.interval)
            if not keep_going():
                return
            try:
                self.write()
            except Exception as exc:  # noqa: BLE001 - metrics never take the program down
                report(
                    f"loopwatch: writing multiprocess metrics failed ({_describe(exc)}); stopped"
                )
                return

    def stop(self) -> None:
        atexit.unregister(self.write)
        self.worker.stop(timeout=5.0)
        discard(self.worker)
        with contextlib.suppress(Exception):  # best effort at the end
            self.write()  # the last values, so that a worker that stops leaves them all

    def after_fork_in_child(self) -> _Flusher:
        """The thread is the parent's: a new one for the child."""
        atexit.unregister(self.write)
        discard(self.worker)
        return _Flusher(self.runtime, self.interval)


# -- rendering and serving --------------------------------------------------------------------


def exposition_registry(registry: CollectorRegistry | None = None) -> CollectorRegistry:
    """What a scrape reads: ``registry`` if given; in multiprocess mode every process's files
    (this process's values written first); else ``prometheus_client.REGISTRY``."""
    if registry is not None:
        return registry
    if not multiprocess_mode():
        return REGISTRY
    if _runtime.current() is not None:
        _writer.write(snapshot())
    merged = CollectorRegistry()
    MultiProcessCollector(merged)  # type: ignore[no-untyped-call]
    return merged


def _gzip_accepted(accept_encoding: str | None) -> bool:
    return any(
        part.split(";")[0].strip().lower() == "gzip" for part in (accept_encoding or "").split(",")
    )


def render(
    registry: CollectorRegistry | None,
    accept: str | None,
    accept_encoding: str | None,
    names: Iterable[str] = (),
) -> tuple[bytes, list[tuple[str, str]]]:
    """The body and headers of one scrape, in the format the ``Accept`` header asks for."""
    target = exposition_registry(registry)
    wanted = list(names)
    encoder, content_type = choose_encoder(accept or "")
    body = encoder(target.restricted_registry(wanted) if wanted else target)
    headers = [("Content-Type", content_type)]
    if _gzip_accepted(accept_encoding):
        body = gzip.compress(body)
        headers.append(("Content-Encoding", "gzip"))
    return body, headers


Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGIApp = Callable[
    [Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]],
    Awaitable[None],
]


def metrics_app(registry: CollectorRegistry | None = None) -> ASGIApp:
    """An ASGI app that serves the metrics (mount it at ``/metrics``).

    Without ``registry``: ``prometheus_client.REGISTRY``, or in multiprocess mode every worker's
    values. Rendering runs in a worker thread, so a scrape never holds the event loop.
    """

    async def app(
        scope: Scope,
        receive: Callable[[], Awaitable[Message]],
        send: Callable[[Message], Awaitable[None]],
    ) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        body, out = await asyncio.to_thread(
            render,
            registry,
            headers.get("accept"),
            headers.get("accept-encoding"),
            query.get("name[]", ()),
        )
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(k.lower().encode(), v.encode()) for k, v in out],
            }
        )
        await send(
            {"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body}
        )

    return app


def aiohttp_metrics_handler(
    registry: CollectorRegistry | None = None,
) -> Callable[[web.Request], Awaitable[web.Response]]:
    """An aiohttp handler that serves the metrics: ``app.router.add_get("/metrics", ...)``.

    Without ``registry``: as :func:`metrics_app`. Rendering runs in a worker thread.
    """
    from aiohttp import web  # an optional package: only for its aiohttp handler

    async def handler(request: web.Request) -> web.Response:
        body, headers = await asyncio.to_thread(
            render,
            registry,
            request.headers.get("Accept"),
            request.headers.get("Accept-Encoding"),
            request.query.getall("name[]", []),
        )
        return web.Response(body=body, headers=headers)

    return handler


class _QuietHandler(WSGIRequestHandler):
    timeout = 10  # seconds a client may take to send its request: no thread hangs for ever

    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes are not the program's output: nothing on standard error per request."""


class _Server(WSGIServer):
    # Each scrape is served in the endpoint's own thread, one after another (a thread per scrape
    # would be a thread the program can count); _QuietHandler.timeout bounds a slow client.
    # socketserver's default backlog of 5 drops the connections of concurrent scrapers, which
    # then wait a second for the SYN to be sent again.
    request_queue_size = 128

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A scraper that went away mid-request is not the program's output: nothing printed."""


def _wsgi_app(registry: CollectorRegistry | None) -> Callable[..., Iterable[bytes]]:
    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        path = environ.get("PATH_INFO", "/")
        if path in ("/tasks", "/tasks/") and method in ("GET", "HEAD"):
            # The live view, from this thread: it answers while the loop is blocked.
            body = json.dumps(_live.snapshot(_runtime.current())).encode()
            start_response(
                "200 OK",
                [("Content-Type", "application/json"), ("Content-Length", str(len(body)))],
            )
            return [b"" if method == "HEAD" else body]
        if path not in ("/metrics", "/metrics/"):
            start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
            return [b"loopwatch: the metrics are at /metrics, the tasks at /tasks\n"]
        if method not in ("GET", "HEAD"):
            start_response("405 Method Not Allowed", [("Allow", "GET, HEAD")])
            return [b""]
        query = parse_qs(environ.get("QUERY_STRING", ""))
        body, headers = render(
            registry,
            environ.get("HTTP_ACCEPT"),
            environ.get("HTTP_ACCEPT_ENCODING"),
            query.get("name[]", ()),
        )
        start_response("200 OK", [*headers, ("Content-Length", str(len(body)))])
        return [b"" if method == "HEAD" else body]

    return app


class Endpoint:
    """``http://ADDR:PORT/metrics`` served from one thread of loopwatch's (invisible to the
    program, stopped around forks: see ``_threads``).

    The serving thread sleeps in ``select`` on the socket and a wake-up pipe: it costs nothing
    between scrapes, and :meth:`close` returns at once instead of after a poll interval.
    """

    def __init__(
        self,
        addr: str,
        port: int,
        registry: CollectorRegistry | None = None,
        *,
        reuse_port: bool = False,
    ) -> None:
        family = socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        server_class = type(
            "_Server",
            (_Server,),
            {"address_family": family[0][0], "allow_reuse_port": reuse_port},
        )
        self.server: WSGIServer = make_server(
            addr, port, _wsgi_app(registry), server_class, handler_class=_QuietHandler
        )
        self.server.socket.setblocking(False)
        self._wake_r, self._wake_w = socket.socketpair()
        self.worker = Worker("metrics endpoint", self._serve, self._wake)
        self.worker.start()

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.server.server_address[:2]
        return str(host), int(port)

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://{f'[{host}]' if ':' in host else host}:{port}/metrics"

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")

    def _serve(self, keep_going: Callable[[], bool]) -> None:
        server = self.server
        fds = [server.fileno(), self._wake_r.fileno()]
        while keep_going():
            # As select, and a busy loop hands this thread the GIL as it wakes (_threads).
            for fd in wait_readable(fds, None):
                if fd == fds[1]:
                    with contextlib.suppress(OSError):
                        self._wake_r.recv(4096)
                    break
                if not keep_going():
                    break
                # Non-blocking socket: a client gone before accept costs nothing.
                hidden_call(lambda _: server.handle_request(), None)

    def close(self) -> None:
        self.worker.stop(timeout=5.0)
        discard(self.worker)
        self.server.server_close()
        self._wake_r.close()
        self._wake_w.close()

    def after_fork_in_child(self) -> None:
        """The serving thread is the parent's; the child lets go of the socket it inherited (so
        the port never outlives the parent in a child that does not serve it)."""
        discard(self.worker)
        for sock in (self.server.socket, self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                sock.close()


def serve(settings: Settings, registry: CollectorRegistry | None = None) -> Endpoint | None:
    """Start the endpoint ``settings`` ask for; a port that cannot be served is one line."""
    port, addr = settings.metrics_port, settings.metrics_addr
    if port is None:
        return None
    try:
        endpoint = Endpoint(addr, port, registry, reuse_port=multiprocess_mode())
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            report(
                f"loopwatch: LOOPWATCH_METRICS_PORT={port} is not accepted: the port is in use "
                f"on {addr}; expected a free port; the metrics endpoint is off"
            )
        else:
            report(
                f"loopwatch: LOOPWATCH_METRICS_ADDR={addr} with LOOPWATCH_METRICS_PORT={port} "
                f"cannot be served ({_describe(exc)}); expected an address of this host and a "
                "port it may bind; the metrics endpoint is off"
            )
        return None
    if port == 0:
        report(f"loopwatch: metrics at {endpoint.url}")  # a port picked by the system: say which
    if not _loopback(addr):
        # Not only this host: the endpoint (metrics and GET /tasks: task names, coroutines,
        # places in the code) can be read by anyone who reaches this address. Said once.
        report(
            f"loopwatch: the metrics endpoint on {addr}:{endpoint.address[1]} can be reached from "
            "other hosts (metrics and /tasks, no authentication); LOOPWATCH_METRICS_ADDR="
            "127.0.0.1 keeps it on this host"
        )
    return endpoint


def _loopback(addr: str) -> bool:
    """Whether ``addr`` can be reached from this host only."""
    try:
        return ipaddress.ip_address(addr.strip("[]")).is_loopback
    except ValueError:
        return addr == "localhost"


class Publisher:
    """Everything loopwatch publishes to Prometheus for one runtime, and its undoing.

    Registered in ``registry`` (``REGISTRY``) while the runtime lives; the endpoint when a port
    is asked for; in multiprocess mode, the thread that writes this process's file.
    """

    def __init__(self, runtime: Runtime, registry: CollectorRegistry = REGISTRY) -> None:
        self.collector = MetricsCollector()
        self.registry: CollectorRegistry | None = registry
        try:
            registry.register(self.collector)
        except ValueError as exc:
            self.registry = None
            report(f"loopwatch: metrics not registered in the registry ({exc})")
        self.endpoint: Endpoint | None = None
        self._flusher = _Flusher(runtime) if multiprocess_mode() else None
        self.update(runtime.settings)

    def update(self, settings: Settings) -> None:
        """Start the endpoint if the settings now ask for one and none is serving."""
        if self.endpoint is None and settings.metrics_port is not None:
            self.endpoint = serve(settings)

    def close(self) -> None:
        endpoint, self.endpoint = self.endpoint, None
        if endpoint is not None:
            endpoint.close()
        flusher, self._flusher = self._flusher, None
        if flusher is not None:
            flusher.stop()
        registry, self.registry = self.registry, None
        if registry is not None:
            with contextlib.suppress(KeyError):
                registry.unregister(self.collector)

    def after_fork_in_child(self) -> None:
        """Nothing of the parent's threads survives a fork: the child does not serve the port
        (the parent does; in multiprocess mode the parent's scrape sees the child's file), and
        starts its own file writer."""
        endpoint, self.endpoint = self.endpoint, None
        if endpoint is not None:
            endpoint.after_fork_in_child()
        if self._flusher is not None:
            self._flusher = self._flusher.after_fork_in_child()
