"""LOOPWATCH_OTEL=1, end to end: real programs under LOOPWATCH=1 with the real OpenTelemetry SDK
and the real OTLP/HTTP exporters, sending to a receiver on loopback that decodes what arrives
with opentelemetry-proto. Both loops.
"""

from __future__ import annotations

import gzip
import http.server
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from loopwatch._stats import LATENCY_BUCKETS

pytest.importorskip("opentelemetry.exporter.otlp.proto.http")
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

KINDS = {
    "/v1/metrics": metrics_service_pb2.ExportMetricsServiceRequest,
    "/v1/logs": logs_service_pb2.ExportLogsServiceRequest,
    "/v1/traces": trace_service_pb2.ExportTraceServiceRequest,
}


class Receiver:
    """An OTLP/HTTP receiver on loopback: every request decoded, kept by path."""

    def __init__(self) -> None:
        self.got: dict[str, list[Any]] = {path: [] for path in KINDS}
        received = self.got

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                kind = KINDS.get(self.path)
                if kind is not None:
                    message = kind()
                    message.ParseFromString(body)
                    received[self.path].append(message)
                self.send_response(200 if kind is not None else 404)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def log_records(self) -> list[Any]:
        return [
            record
            for request in self.got["/v1/logs"]
            for rl in request.resource_logs
            for sl in rl.scope_logs
            for record in sl.log_records
        ]

    def spans(self) -> list[Any]:
        return [
            span
            for request in self.got["/v1/traces"]
            for rs in request.resource_spans
            for ss in rs.scope_spans
            for span in ss.spans
        ]

    def metrics(self) -> list[tuple[Any, Any, Any]]:
        """(resource, scope, metric) of every metric received, in order."""
        return [
            (rm.resource, sm.scope, metric)
            for request in self.got["/v1/metrics"]
            for rm in request.resource_metrics
            for sm in rm.scope_metrics
            for metric in sm.metrics
        ]

    def last(self, name: str) -> Any:
        found = [
            m for _, scope, m in self.metrics() if m.name == name and scope.name == "loopwatch"
        ]
        assert found, (name, sorted({m.name for _, _, m in self.metrics()}))
        return found[-1]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    try:
        yield r
    finally:
        r.close()


def attrs(kvs: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kv in kvs:
        which = kv.value.WhichOneof("value")
        value = getattr(kv.value, which)
        if which == "array_value":
            value = [getattr(v, v.WhichOneof("value")) for v in value.values]
        out[kv.key] = value
    return out


def otel_env(endpoint: str, **extra: str) -> dict[str, str]:
    """The test's environment without LOOPWATCH_* and OTEL_*, then LOOPWATCH=1 with
    LOOPWATCH_OTEL=1, sending to ``endpoint``."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("LOOPWATCH", "OTEL_"))}
    environ.update(
        LOOPWATCH="1",
        LOOPWATCH_OTEL="1",
        LOOPWATCH_LOG="off",
        LOOPWATCH_SLOW_CALLBACK_MS="100",
        OTEL_EXPORTER_OTLP_ENDPOINT=endpoint,
        OTEL_SERVICE_NAME="shop",
        **extra,
    )
    return environ


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(tmp_path: Path, source: str, kind: str, receiver: Receiver, **env: str) -> str:
    app = tmp_path / "app.py"
    app.write_text(textwrap.dedent(source))
    environ = otel_env(receiver.endpoint, **env)
    proc = subprocess.run(
        [sys.executable, str(app), kind],
        cwd=tmp_path,
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "", proc.stderr
    return str(app)


def line_of(source: str, marker: str) -> int:
    lines = textwrap.dedent(source).splitlines()
    return next(i for i, line in enumerate(lines, 1) if marker in line)


RUN_ON = """
def run(main):
    if sys.argv[1] == "uvloop":
        import uvloop
        uvloop.run(main())
    else:
        asyncio.run(main())
"""

OWN = (
    """
import asyncio, sys, time
"""
    + RUN_ON
    + """
async def handler():
    await asyncio.sleep(0.01)
    time.sleep(0.25)  # BLOCK
    await asyncio.sleep(0.01)

async def main():
    await asyncio.gather(handler(), handler())

run(main)
assert "opentelemetry" not in sys.modules or True
"""
)


def test_no_provider_of_the_programs_loopwatch_exports_by_otlp_itself(
    tmp_path: Path, kind: str, receiver: Receiver
) -> None:
    """The program has no OpenTelemetry of its own: the metrics and a log record per finding go
    out by OTLP/HTTP to OTEL_EXPORTER_OTLP_ENDPOINT, with the Prometheus endpoint's values, the
    resource from OTEL_SERVICE_NAME, at exit at the latest."""
    app = run(tmp_path, OWN, kind, receiver)
    where = f"{app}:{line_of(OWN, '# BLOCK')} in handler"

    records = receiver.log_records()
    assert [r.event_name for r in records] == ["loopwatch.slow_callback"] * 2
    for record in records:
        fields = attrs(record.attributes)
        assert fields["location"] == where
        assert fields["coroutine"] == "handler"
        assert fields["loop"] == kind
        assert fields["origin"] == "program"
        assert 0.2 <= fields["duration_s"] < 1.0
        assert record.severity_text == "WARNING"
        assert record.body.string_value.startswith("loopwatch.slow_callback duration_s=")
        assert record.trace_id == b""  # no span in that task

    slow = receiver.last("loopwatch_slow_callbacks")
    assert slow.sum.is_monotonic
    assert [p.as_int for p in slow.sum.data_points] == [2]
    busy = receiver.last("loopwatch_task_busy_seconds")
    assert busy.unit == "s"
    points = {attrs(p.attributes)["coroutine"]: p for p in busy.histogram.data_points}
    assert points["handler"].count == 2
    assert 0.5 <= points["handler"].sum < 2.0
    assert sum(points["handler"].bucket_counts) == 2
    finished = receiver.last("loopwatch_tasks_finished")
    by_outcome = {attrs(p.attributes)["outcome"]: p.as_int for p in finished.sum.data_points}
    assert by_outcome["ok"] >= 3  # main and the two handlers
    busy_s = receiver.last("loopwatch_loop_busy_seconds").sum.data_points[0].as_double
    # asyncio: exact, the blocks included; uvloop: the thread's CPU time, which a sleep leaves out
    assert busy_s >= 0.5 if kind == "asyncio" else 0 < busy_s < 0.5
    resource = attrs(receiver.metrics()[-1][0].attributes)
    assert resource["service.name"] == "shop"


PROGRAM = (
    """
import asyncio, sys, time
from opentelemetry import metrics, trace
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
"""
    + RUN_ON
    + """
spans = TracerProvider()
spans.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter()))
trace.set_tracer_provider(spans)
reader = PeriodicExportingMetricReader(OTLPMetricExporter(), export_interval_millis=300)
meters = MeterProvider(metric_readers=[reader])
metrics.set_meter_provider(meters)
tracer = trace.get_tracer("shop")

async def handler(n):
    with tracer.start_as_current_span(f"GET /users/{n}"):
        await asyncio.sleep(0.01)
        time.sleep(0.25)  # BLOCK: the span ends in the same step

async def main():
    await asyncio.gather(handler(1), handler(2))
    await asyncio.sleep(2.5)  # loopwatch's tick records, the program's reader exports

run(main)
meters.shutdown()
spans.shutdown()
"""
)


def test_the_programs_providers_carry_loopwatch_and_its_spans_show_the_block(
    tmp_path: Path, kind: str, receiver: Receiver
) -> None:
    """The program set its MeterProvider and TracerProvider: loopwatch's metrics are its
    instruments (the histogram's observations recorded into it), each block is an event on the
    request's span (put there while the loop was blocked: the span ends as soon as the block
    does), and the log record carries that span's trace and span ids."""
    app = run(tmp_path, PROGRAM, kind, receiver)
    where = f"{app}:{line_of(PROGRAM, '# BLOCK')} in handler"

    spans = {s.name: s for s in receiver.spans()}
    assert sorted(spans) == ["GET /users/1", "GET /users/2"]
    for span in spans.values():
        [event] = [e for e in span.events if e.name == "loopwatch.slow_callback"]
        fields = attrs(event.attributes)
        assert fields["location"] == where
        assert fields["blocking"] is True
        assert fields["coroutine"] == "handler"
        assert 0.1 <= fields["duration_s"] <= 0.3
        assert fields["context.span_id"] == span.span_id.hex()
        assert span.start_time_unix_nano <= event.time_unix_nano <= span.end_time_unix_nano

    records = receiver.log_records()
    assert [r.event_name for r in records] == ["loopwatch.slow_callback"] * 2
    assert {r.span_id for r in records} == {s.span_id for s in spans.values()}
    assert {r.trace_id for r in records} == {s.trace_id for s in spans.values()}
    for record in records:
        assert attrs(record.attributes)["location"] == where
        assert 0.2 <= attrs(record.attributes)["duration_s"] < 1.0

    slow = receiver.last("loopwatch_slow_callbacks")
    assert [p.as_int for p in slow.sum.data_points] == [2]
    busy = receiver.last("loopwatch_task_busy_seconds")
    points = {attrs(p.attributes)["coroutine"]: p for p in busy.histogram.data_points}
    assert points["handler"].count == 2
    assert 0.5 <= points["handler"].sum < 2.0
    assert list(busy.histogram.data_points[0].explicit_bounds) == list(LATENCY_BUCKETS)
    resource = attrs(receiver.metrics()[-1][0].attributes)
    assert resource["service.name"] == "shop"


def test_off_imports_no_opentelemetry(tmp_path: Path, kind: str) -> None:
    """Without LOOPWATCH_OTEL=1 nothing of OpenTelemetry is imported."""
    app = tmp_path / "plain.py"
    app.write_text(
        "import asyncio, sys\n" + RUN_ON + "async def main():\n"
        "    await asyncio.sleep(0.01)\n"
        "run(main)\n"
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))\n"
    )
    environ = {k: v for k, v in os.environ.items() if not k.startswith("LOOPWATCH")}
    environ.update(LOOPWATCH="1")
    out = subprocess.run(
        [sys.executable, str(app), kind], env=environ, capture_output=True, text=True, timeout=60
    )
    assert (out.returncode, out.stdout, out.stderr) == (0, "[]\n", "")


def test_without_the_extra_it_is_one_line(tmp_path: Path) -> None:
    """LOOPWATCH_OTEL=1 without the otel extra's packages: one line on standard error, and the
    program runs as it would."""
    app = tmp_path / "missing.py"
    app.write_text(
        "import sys\n"
        "sys.modules['opentelemetry.exporter.otlp.proto.http'] = None\n"
        "import asyncio, loopwatch\n"
        "loopwatch.install(otel=True)\n"
        "asyncio.run(asyncio.sleep(0))\n"
        "print('done')\n"
    )
    environ = {k: v for k, v in os.environ.items() if not k.startswith("LOOPWATCH")}
    out = subprocess.run(
        [sys.executable, str(app)], env=environ, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0
    assert out.stdout == "done\n"
    assert out.stderr == (
        "loopwatch: LOOPWATCH_OTEL=1 but opentelemetry.exporter.otlp.proto.http is missing: "
        "pip install 'loopwatch[otel]'; OpenTelemetry is off\n"
    )


SERVICE = """
import time
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

spans = TracerProvider()
spans.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter()))
trace.set_tracer_provider(spans)
tracer = trace.get_tracer("shop")

async def user(request):
    time.sleep(0.25)  # BLOCK
    return PlainTextResponse(request.path_params["user_id"])

async def health(request):
    return PlainTextResponse("ok")

inner = Starlette(routes=[Route("/users/{user_id}", user), Route("/health", health)])

async def app(scope, receive, send):  # a span per request, as OpenTelemetry's ASGI middleware
    if scope["type"] != "http":
        return await inner(scope, receive, send)
    with tracer.start_as_current_span(scope["method"] + " " + scope["path"]):
        await inner(scope, receive, send)
"""


def test_a_request_span_under_uvicorn_shows_the_block_with_its_route(
    tmp_path: Path, kind: str, receiver: Receiver
) -> None:
    """Starlette under uvicorn, a real HTTP client: the request's span has the block as an
    event, at the handler's line, with the route template; the log record is in that trace."""
    import httpx

    (tmp_path / "shop.py").write_text(textwrap.dedent(SERVICE))
    port = free_port()
    environ = otel_env(
        receiver.endpoint, OTEL_METRIC_EXPORT_INTERVAL="500", PYTHONPATH=str(tmp_path)
    )
    loop = "uvloop" if kind == "uvloop" else "asyncio"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "shop:app",
            "--port",
            str(port),
            "--loop",
            loop,
            "--log-level",
            "warning",
        ],
        cwd=tmp_path,
        env=environ,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                httpx.get(f"http://127.0.0.1:{port}/health", timeout=2.0)
                break
            except httpx.TransportError:
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.1)
        assert httpx.get(f"http://127.0.0.1:{port}/users/7", timeout=10.0).text == "7"
        time.sleep(1.5)  # an export of the metrics (every 0.5 s here)
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=20)
    # uvicorn raises the SIGTERM it caught again once it has shut down (no atexit then)
    assert proc.returncode in (0, -signal.SIGTERM), err
    assert "Traceback" not in err, err
    where = f"{tmp_path / 'shop.py'}:{line_of(SERVICE, '# BLOCK')} in user"
    [span] = [s for s in receiver.spans() if s.name == "GET /users/7"]
    [event] = [e for e in span.events if e.name == "loopwatch.slow_callback"]
    fields = attrs(event.attributes)
    assert fields["location"] == where
    assert fields["route"] == "GET /users/{user_id}"
    assert fields["context.trace_id"] == span.trace_id.hex()
    [record] = [r for r in receiver.log_records() if r.event_name == "loopwatch.slow_callback"]
    assert (record.trace_id, record.span_id) == (span.trace_id, span.span_id)
    assert attrs(record.attributes)["route"] == "GET /users/{user_id}"
    busy = receiver.last("loopwatch_request_busy_seconds")
    routes = {attrs(p.attributes)["route"]: p.count for p in busy.histogram.data_points}
    assert routes["GET /users/{user_id}"] == 1


def test_a_collector_that_is_down_is_one_line_and_a_short_wait(tmp_path: Path, kind: str) -> None:
    """Nothing listens at OTEL_EXPORTER_OTLP_ENDPOINT: the program runs and exits as it would,
    the exporters' own retry lines are not on its standard error, loopwatch says it once, and
    the exit waits 2 s at most for the last export."""
    dead = free_port()  # closed again: nothing listens there
    app = tmp_path / "app.py"
    app.write_text(textwrap.dedent(OWN))
    environ = otel_env(f"http://127.0.0.1:{dead}")
    start = time.monotonic()
    out = subprocess.run(
        [sys.executable, str(app), kind], env=environ, capture_output=True, text=True, timeout=60
    )
    took = time.monotonic() - start
    assert out.returncode == 0
    assert out.stderr == (
        "loopwatch: OpenTelemetry: sending log records by OTLP failed (is the collector at "
        "OTEL_EXPORTER_OTLP_ENDPOINT up?); trying again with the next\n"
    )
    assert took < 8.0, took  # 0.6 s of program, 2 s per export at most, start-up
