"""Which request a finding belongs to (issue 18), with no code change: real services under
``LOOPWATCH=1``, Starlette and FastAPI through uvicorn and aiohttp's own server, on both loops,
driven by a real HTTP client. A block in a request handler carries the route template of its
request, the structlog keys and the OpenTelemetry span ids bound in it; each request's busy time
is in ``loopwatch_request_busy_seconds{route}``; a handler's traceback has no loopwatch frame."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import run_program
from prometheus_client.parser import text_string_to_metric_families

APP = """
import sys, time
import structlog
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

trace.set_tracer_provider(TracerProvider())
tracer = trace.get_tracer("shop")
SPANS = {}


def hold(user_id):
    structlog.contextvars.bind_contextvars(request_id="req-" + str(user_id))
    with tracer.start_as_current_span("get-user") as span:
        ids = span.get_span_context()
        SPANS[str(user_id)] = (format(ids.trace_id, "032x"), format(ids.span_id, "016x"))
        print("SPAN", user_id, *SPANS[str(user_id)], flush=True)
        time.sleep(0.25)  # BLOCK:handler


def fail():
    raise RuntimeError("the handler failed")  # RAISE:handler
"""

STARLETTE = (
    APP
    + """
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route


async def user(request):
    hold(request.path_params["user_id"])
    return PlainTextResponse("user")


async def broken(request):
    fail()


async def health(request):
    return PlainTextResponse("ok")


app = Starlette(routes=[
    Route("/users/{user_id}", user),
    Route("/broken", broken),
    Mount("/api", routes=[Route("/health", health)]),
])
"""
)

FASTAPI = (
    APP
    + """
from fastapi import FastAPI, APIRouter

app = FastAPI()
api = APIRouter()


@app.get("/users/{user_id}")
async def user(user_id: int):
    hold(user_id)
    return "user"


@app.get("/broken")
async def broken():
    fail()


@api.get("/health")
async def health():
    return "ok"


app.include_router(api, prefix="/api")
"""
)

AIOHTTP = (
    APP
    + """
import asyncio
from aiohttp import web


async def user(request):
    hold(request.match_info["user_id"])
    return web.Response(text="user")


async def broken(request):
    fail()


async def health(request):
    return web.Response(text="ok")


async def main(port):
    app = web.Application()
    app.router.add_get("/users/{user_id}", user)
    app.router.add_get("/broken", broken)
    sub = web.Application()
    sub.router.add_get("/health", health)
    app.add_subapp("/api", sub)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    print("READY", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    if sys.argv[2] == "uvloop":
        import uvloop
        uvloop.run(main(int(sys.argv[1])))
    else:
        asyncio.run(main(int(sys.argv[1])))
"""
)

SOURCES = {"starlette": STARLETTE, "fastapi": FASTAPI, "aiohttp": AIOHTTP}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(url: str, proc: subprocess.Popen[str], deadline: float = 20.0) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(f"the service exited: {proc.stderr.read() if proc.stderr else ''}")
        try:
            httpx.get(url, timeout=1.0)
            return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise AssertionError(f"{url} did not answer in {deadline} s")


def line_of(source: str, marker: str) -> int:
    return next(i for i, line in enumerate(source.splitlines(), 1) if marker in line)


def busy_by_route(text: str) -> dict[str, tuple[float, float]]:
    """``route -> (count, sum)`` of loopwatch_request_busy_seconds."""
    out: dict[str, list[float]] = {}
    for family in text_string_to_metric_families(text):
        if family.name != "loopwatch_request_busy_seconds":
            continue
        for sample in family.samples:
            row = out.setdefault(sample.labels["route"], [0.0, 0.0])
            if sample.name.endswith("_count"):
                row[0] = sample.value
            elif sample.name.endswith("_sum"):
                row[1] = sample.value
    return {route: (row[0], row[1]) for route, row in out.items()}


def run_service(tmp_path: Path, framework: str, kind: str, **settings: str) -> dict[str, Any]:
    source = SOURCES[framework]
    app = tmp_path / "shop.py"
    app.write_text(textwrap.dedent(source))
    port, metrics_port = free_port(), free_port()
    log = tmp_path / "events.jsonl"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOPWATCH")}
    env.update(
        LOOPWATCH="1",
        LOOPWATCH_LOG="json",
        LOOPWATCH_LOG_FILE=str(log),
        LOOPWATCH_METRICS_PORT=str(metrics_port),
        LOOPWATCH_STALL_MS="10000",
        # Over the first request's own imports (a real finding: up to 0.15 s on a loaded machine),
        # under the handlers' 0.25 s blocks.
        LOOPWATCH_SLOW_CALLBACK_MS="200",
        PYTHONPATH=str(tmp_path),
        **settings,
    )
    if framework == "aiohttp":
        command = [sys.executable, str(app), str(port), kind]
    else:
        loop = "uvloop" if kind == "uvloop" else "asyncio"
        command = [sys.executable, "-m", "uvicorn", "shop:app", "--port", str(port)]
        command += ["--loop", loop, "--log-level", "warning"]
    proc = subprocess.Popen(
        command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(base + "/api/health", proc)
        statuses = {
            path: httpx.get(base + path, timeout=10.0).status_code
            for path in ("/users/7", "/users/8", "/api/health", "/no/such/page", "/broken")
        }
        time.sleep(0.3)  # the last task's end, then a scrape
        metrics = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10.0).text
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=20)
    events = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    spans = {
        w[1]: (w[2], w[3]) for w in (line.split() for line in out.splitlines()) if w[:1] == ["SPAN"]
    }
    return {
        "statuses": statuses,
        "metrics": metrics,
        "events": events,
        "spans": spans,
        "stderr": err,
        "app": str(app),
        "source": textwrap.dedent(source),
    }


@pytest.mark.parametrize("framework", ["starlette", "fastapi", "aiohttp"])
def test_a_block_in_a_request_carries_its_route_and_context(
    tmp_path: Path, framework: str, kind: str
) -> None:
    run = run_service(tmp_path, framework, kind)
    assert run["statuses"] == {
        "/users/7": 200,
        "/users/8": 200,
        "/api/health": 200,
        "/no/such/page": 404,
        "/broken": 500,
    }, run["stderr"]
    blocks = [e for e in run["events"] if e["event"] == "loopwatch.slow_callback"]
    place = f"{run['app']}:{line_of(run['source'], 'BLOCK:handler')} in hold"
    assert [e["location"] for e in blocks] == [place, place], run["events"]
    # The route template, never the raw path; the structlog key and the span of each request.
    assert [e["route"] for e in blocks] == ["GET /users/{user_id}"] * 2
    for block, user_id in zip(blocks, ("7", "8"), strict=True):
        trace_id, span_id = run["spans"][user_id]
        assert block["context"] == {
            "request_id": f"req-{user_id}",
            "trace_id": trace_id,
            "span_id": span_id,
        }
    # Busy time per request, by route: the two blocked requests held the loop 0.25 s each.
    busy = busy_by_route(run["metrics"])
    assert set(busy) == {
        "GET /users/{user_id}",
        "GET /api/health",
        "GET <unmatched>",
        "GET /broken",
    }, busy
    count, total = busy["GET /users/{user_id}"]
    assert count == 2.0 and 0.5 <= total < 0.5 + 0.1, busy
    # /api/health: the readiness probe's request, then the test's.
    assert busy["GET /api/health"][0] == 2.0 and busy["GET <unmatched>"][0] == 1.0
    # The failed handler's traceback, as the server logs it, has no frame of loopwatch's.
    raised = f'{run["app"]}", line {line_of(run["source"], "RAISE:handler")}'
    assert raised in run["stderr"], run["stderr"]
    assert "loopwatch" not in run["stderr"], run["stderr"]


def test_routes_off_labels_nothing(tmp_path: Path, kind: str) -> None:
    """``LOOPWATCH_ROUTES=0``: no route on findings, no request series, the framework untouched."""
    run = run_service(tmp_path, "starlette", kind, LOOPWATCH_ROUTES="0")
    blocks = [e for e in run["events"] if e["event"] == "loopwatch.slow_callback"]
    assert len(blocks) == 2 and all("route" not in e for e in blocks)
    assert busy_by_route(run["metrics"]) == {}


def busy_by_coroutine(text: str, coroutine: str) -> tuple[float, float]:
    """``(count, sum)`` of loopwatch_task_busy_seconds for one coroutine."""
    count = total = 0.0
    for family in text_string_to_metric_families(text):
        if family.name != "loopwatch_task_busy_seconds":
            continue
        for sample in family.samples:
            if sample.labels.get("coroutine") != coroutine:
                continue
            if sample.name.endswith("_count"):
                count = sample.value
            elif sample.name.endswith("_sum"):
                total = sample.value
    return count, total


@pytest.mark.parametrize("routes", ["1", "0"], ids=["routes", "no-routes"])
def test_aiohttp_request_tasks_are_timed_per_coroutine_with_routes_or_without(
    tmp_path: Path, kind: str, routes: str
) -> None:
    """Every request's task of a real aiohttp server is counted and timed in the per-coroutine
    metrics, routes or not, on every Python: from 3.12 aiohttp makes these tasks with no task
    factory, and the hook gives each the proxy the loop's factory would have made (on 3.11 the
    factory sees them). The readiness probe's request and the test's five: six tasks, two of
    them blocked 0.25 s. Without routes, no route anywhere."""
    run = run_service(tmp_path, "aiohttp", kind, LOOPWATCH_ROUTES=routes)
    assert run["statuses"]["/users/8"] == 200, run["stderr"]
    count, total = busy_by_coroutine(run["metrics"], "RequestHandler._handle_request")
    assert count == 6.0 and 0.5 <= total < 0.5 + 0.1, run["metrics"]
    blocks = [e for e in run["events"] if e["event"] == "loopwatch.slow_callback"]
    assert [e["coroutine"] for e in blocks] == ["RequestHandler._handle_request"] * 2
    if routes == "1":
        assert [e["route"] for e in blocks] == ["GET /users/{user_id}"] * 2
        assert busy_by_route(run["metrics"])["GET /users/{user_id}"][0] == 2.0
    else:
        assert all("route" not in e for e in blocks), blocks
        assert busy_by_route(run["metrics"]) == {}


def test_routes_turned_off_before_the_framework_is_imported_stay_off() -> None:
    """``install()`` (routes on), then ``install(routes=False)``, then Starlette imported: its
    router is not hooked (the hook asked for first used to run when Starlette arrived)."""
    program = (
        "import loopwatch\n"
        "loopwatch.install(log='off')\n"
        "loopwatch.install(routes=False)\n"
        "import starlette.routing\n"
        "print(getattr(starlette.routing.Route.handle, '__loopwatch__', False))\n"
    )
    done = run_program(program)
    assert (done.stdout, done.stderr, done.returncode) == ("False\n", "", 0)


ROUTING_FIRST = """
import sys
from starlette.routing import Route  # imports asyncio, which starts loopwatch, half way in
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
import asyncio, time, httpx


async def slow(request):
    time.sleep(0.25)  # BLOCK:routing-first
    return PlainTextResponse("ok")


app = Starlette(routes=[Route("/users/{id}", slow)])


async def main():
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://shop") as client:
        print((await client.get("/users/3")).status_code)


if sys.argv[1] == "uvloop":
    import uvloop
    uvloop.run(main())
else:
    asyncio.run(main())
"""


def test_routes_when_starlette_routing_is_what_imports_asyncio(tmp_path: Path, kind: str) -> None:
    """``import starlette.routing`` first: it imports asyncio, so loopwatch starts while
    starlette.routing is half made; its hook waits until the module is whole (it used to run at
    once, find no Route, and label nothing)."""
    app = tmp_path / "first.py"
    app.write_text(ROUTING_FIRST)
    log = tmp_path / "events.jsonl"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOPWATCH")}
    env.update(LOOPWATCH="1", LOOPWATCH_LOG="json", LOOPWATCH_LOG_FILE=str(log))
    proc = subprocess.run(
        [sys.executable, str(app), kind], env=env, capture_output=True, text=True, timeout=60
    )
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "200\n", "")
    events = [json.loads(line) for line in log.read_text().splitlines()]
    place = f"{app}:{line_of(ROUTING_FIRST, 'BLOCK:routing-first')} in slow"
    assert [(e["event"], e["location"], e.get("route")) for e in events] == [
        ("loopwatch.slow_callback", place, "GET /users/{id}")
    ]


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "python"])
def test_the_request_table_counts_by_route_within_its_cap(
    compiled: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Busy time by route: the compiled rows (observed in C when a labelled task ends) and the
    Python histograms give the same buckets, counts and sums; past the cap, routes share
    ``other``; uninstall's clear() leaves no table for the compiled proxies to count into."""
    from loopwatch import _context
    from loopwatch._native import ACCEL
    from loopwatch._stats import LATENCY_BUCKETS

    if compiled and ACCEL is None:
        pytest.skip("the compiled module is not loaded")
    if not compiled:
        monkeypatch.setattr(_context, "_observe_request", None)
    table = _context.RequestTable(cap=2)
    for route, busy in [("GET /a", 0.002), ("GET /a", 0.2), ("GET /b", 0.0), ("GET /c", 1.5)]:
        table.observe(route, busy)
    table.observe("GET /d", 0.01)

    class Label(str):  # (a str subclass, as an enum of routes gives)
        pass

    table.observe(Label("GET /a"), 0.0)
    shown = table.histograms()
    assert set(shown) == {"GET /a", "GET /b", "other"}
    assert (shown["GET /a"].count, shown["GET /a"].sum) == (3, pytest.approx(0.202))
    assert (shown["other"].count, shown["other"].sum) == (2, pytest.approx(1.51))
    assert [b for b, _ in shown["GET /a"].buckets] == [*LATENCY_BUCKETS, float("inf")]
    below = {b: n for b, n in shown["GET /a"].buckets}
    assert below[0.1] == 2 and below[0.25] == 3 and shown["GET /b"].buckets[0][1] == 1
    if compiled:
        assert ACCEL.observe_request(table.rows, "GET /a", 0.5) is True
        assert ACCEL.observe_request(table.rows, "GET /e", 0.5) is False
        assert table.histograms()["GET /a"].count == 4
    table.clear()
    assert table.histograms() == {}
    if compiled:
        table.observe("GET /a", 0.1)  # (a new table's first route: registered again)
        assert table.histograms()["GET /a"].count == 1


def test_task_labels_go_with_their_tasks(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The task -> route map holds its tasks weakly: a label is gone with its task (no call into
    Python, nothing written to standard error), a task made after it is unlabelled even at the
    same address, a label taken off reads None, and uninstall's clear() takes every label off."""
    import asyncio
    import weakref

    from loopwatch import _context

    async def main() -> None:
        async def serve() -> None:
            await asyncio.sleep(0)

        before = len(_context._routes.data)
        refs = []
        for i in range(50):
            task = asyncio.get_running_loop().create_task(serve())
            _context._routes.set(task, f"GET /{i}")
            assert _context.route_of(task) == f"GET /{i}"
            await task
            refs.append(weakref.ref(task))
            del task
        await asyncio.sleep(0)
        gc.collect()
        alive = sum(ref() is not None for ref in refs)
        assert alive < 50 and len(_context._routes.data) == before + alive
        fresh = asyncio.get_running_loop().create_task(serve())
        assert _context.route_of(fresh) is None
        _context._routes.set(fresh, "GET /x")
        _context._routes.set(fresh, None)
        assert _context.route_of(fresh) is None
        _context._routes.set(fresh, "GET /y")
        _context._routes.clear()
        assert _context.route_of(fresh) is None
        await fresh

    unraisable: list[Any] = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    factory = __import__("loopwatch").new_uvloop_event_loop if kind == "uvloop" else None
    if factory is None:
        asyncio.run(main())
    else:
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(main())
    gc.collect()
    assert unraisable == []


STARLETTE_SCOPE = {
    "type": "http",
    "asgi": {"version": "3.0"},
    "http_version": "1.1",
    "method": "GET",
    "scheme": "http",
    "path": "/users/7",
    "raw_path": b"/users/7",
    "root_path": "",
    "query_string": b"",
    "headers": [(b"host", b"localhost")],
    "server": ("127.0.0.1", 8000),
    "client": ("127.0.0.1", 5000),
}


def test_the_starlette_hook_labels_the_request_and_calls_starlettes_own(
    kind: str, capfd: pytest.CaptureFixture[str]
) -> None:
    """In process, on a watched loop: Route.handle, hooked, labels the request's task by its
    route (a mounted route with the mount's path first), Starlette answers as it does unhooked,
    the busy time goes to the route when the task ends; a hook that fails says so once, puts
    Starlette's own function back and the request is still answered."""
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Mount, Route

    import loopwatch
    from loopwatch import _runtime
    from loopwatch.integrations import _hooks, route_of

    seen: list[Any] = []

    async def user(request: Any) -> PlainTextResponse:
        seen.append(route_of())
        return PlainTextResponse(f"user {request.path_params['user_id']}")

    app = Starlette(
        routes=[
            Route("/users/{user_id}", user),
            Mount("/api", routes=[Route("/u/{user_id}", user)]),
        ]
    )
    own = Route.__dict__["handle"]

    async def call(path: str) -> list[Any]:
        sent: list[Any] = []

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: Any) -> None:
            sent.append(message)

        scope = {**STARLETTE_SCOPE, "path": path, "raw_path": path.encode()}
        await asyncio.get_running_loop().create_task(app(scope, receive, send))
        return sent

    async def main() -> None:
        first = await call("/users/7")
        assert first[1]["body"] == b"user 7"
        await call("/api/u/3")
        assert seen == ["GET /users/{user_id}", "GET /api/u/{user_id}"]
        runtime = _runtime.current()
        assert runtime is not None
        busy = runtime.requests.histograms()
        assert {r: h.count for r, h in busy.items()} == {
            "GET /users/{user_id}": 1,
            "GET /api/u/{user_id}": 1,
        }
        hooked = Route.__dict__["handle"]
        assert hooked.__wrapped__ is own and hooked.__loopwatch__
        if _hooks._FrameworkHook is not None:
            assert type(hooked) is _hooks._FrameworkHook

            # A failure: asyncio.current_task broken (a stand-in for anything going wrong).
            def broken() -> None:
                raise ValueError("no task here")

            failing = _hooks._FrameworkHook(
                _hooks._HOOK_ROUTE, own, broken, _hooks.label_request,
                lambda exc: _hooks._failed("Starlette", exc), None,
            )  # fmt: skip
            Route.handle = failing
            _hooks._patched.append((Route, "handle", own))
            again = await call("/users/8")
            assert again[1]["body"] == b"user 8" and seen[-1] is None
            assert Route.__dict__["handle"] is own  # (put back)

    loopwatch.install(log="off")
    factory = loopwatch.new_uvloop_event_loop if kind == "uvloop" else loopwatch.new_event_loop
    run_on_loop(factory, main())
    if _hooks._FrameworkHook is not None:
        err = capfd.readouterr().err
        assert err.count("labelling Starlette requests by route failed") == 1, err
        assert "ValueError: no task here" in err


class Wire(asyncio.Transport):
    """A connection's transport without a socket, for aiohttp's own RequestHandler in process:
    what the server writes is kept."""

    def __init__(self) -> None:
        super().__init__()
        self.out = bytearray()
        self.closed = False

    def write(self, data: Any) -> None:
        self.out += data

    def writelines(self, data: Any) -> None:
        for chunk in data:
            self.out += chunk

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 5000), "sockname": ("127.0.0.1", 8080)}.get(name, default)

    def get_write_buffer_size(self) -> int:
        return 0

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def served_in_process(app: Any, paths: list[str]) -> list[bytes]:
    """The responses (status line and body) of aiohttp's own server to requests of these paths
    (GET, or the method given before the path: ``"POST /any"``), one keep-alive connection over a
    Wire: the request tasks made as aiohttp makes them (eagerly from Python 3.12, with no task
    factory; through the loop's on 3.11)."""
    from aiohttp import web

    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    assert runner.server is not None
    protocol = runner.server()
    wire = Wire()
    protocol.connection_made(wire)
    raw = b"".join(
        f"{path if ' ' in path else 'GET ' + path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode()
        for path in paths
    )
    protocol.data_received(raw)
    for _ in range(1000):
        if wire.out.count(b"HTTP/1.1 ") == len(paths):
            break
        await asyncio.sleep(0.001)
    protocol.connection_lost(None)
    await runner.cleanup()
    responses = []
    for part in bytes(wire.out).split(b"HTTP/1.1 ")[1:]:
        head, _, body = part.partition(b"\r\n\r\n")
        responses.append(head.split(b"\r\n")[0] + b" " + body)
    return responses


def test_the_aiohttp_hook_times_each_request_and_labels_it_by_its_match(
    kind: str, capfd: pytest.CaptureFixture[str]
) -> None:
    """In process, on a watched loop, through aiohttp's own RequestHandler: each request's task
    is timed (from Python 3.12 a task no task factory sees) and carries its route once routed
    (read in the handler), the busy time goes to the route when the task ends (a 404 to
    ``GET <unmatched>``), aiohttp answers as it does unhooked, a router that fails gives aiohttp's
    own 500 and no route, and a hook that fails says so once, puts aiohttp's own functions back
    and the requests are still answered."""
    from aiohttp import web

    import loopwatch
    from loopwatch import _runtime
    from loopwatch.integrations import _hooks, route_of

    seen: list[Any] = []

    async def user(request: web.Request) -> web.Response:
        seen.append(route_of())
        await asyncio.sleep(0)
        return web.Response(text=f"user {request.match_info.get('user_id', '')}")

    def make_app() -> web.Application:
        app = web.Application()
        app.router.add_get("/users/{user_id}", user)
        app.router.add_route("*", "/any", user)
        return app

    async def main() -> None:
        import aiohttp.web_protocol
        import aiohttp.web_urldispatcher

        handler_cls = aiohttp.web_protocol.RequestHandler
        hook = handler_cls.__dict__["_handle_request"]
        own = getattr(hook, "__wrapped__", hook)
        if _hooks._FrameworkHook is not None or sys.version_info >= (3, 12):
            assert own is not hook and hook.__loopwatch__
        out = await served_in_process(make_app(), ["/users/7", "/nowhere", "/users/8", "/any"])
        assert out == [
            b"200 OK user 7",
            b"404 Not Found 404: Not Found",
            b"200 OK user 8",
            b"200 OK user ",
        ]
        assert seen == ["GET /users/{user_id}", "GET /users/{user_id}", "GET /any"]
        runtime = _runtime.current()
        assert runtime is not None
        busy = {r: h.count for r, h in runtime.requests.histograms().items()}
        assert busy == {"GET /users/{user_id}": 2, "GET <unmatched>": 1, "GET /any": 1}

        class Broken(Exception):
            pass

        dispatcher = aiohttp.web_urldispatcher.UrlDispatcher

        async def failing(self: Any, request: Any) -> Any:
            await asyncio.sleep(0)
            raise Broken("router down")

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(dispatcher, "resolve", failing)
            out = await served_in_process(make_app(), ["/users/9"])
        assert out[0].startswith(b"500 Internal Server Error")
        busy = {r: h.count for r, h in runtime.requests.histograms().items()}
        assert busy == {"GET /users/{user_id}": 2, "GET <unmatched>": 1, "GET /any": 1}

        if _hooks._FrameworkHook is not None:
            # A failure: the route of a request cannot be read (a stand-in for anything).
            def broken(match: Any, route: Any) -> None:
                raise ValueError("no route here")

            from loopwatch._native import ACCEL

            assert ACCEL is not None
            ACCEL.set_request_routes(broken, _hooks._aiohttp_failed)
            out = await served_in_process(make_app(), ["/any", "/users/10"])
            assert out == [b"200 OK user ", b"200 OK user 10"]
            assert handler_cls.__dict__["_handle_request"] is own  # (put back)
            assert seen[-2:] == [None, None]

    loopwatch.install(log="off")
    factory = loopwatch.new_uvloop_event_loop if kind == "uvloop" else loopwatch.new_event_loop
    run_on_loop(factory, main())
    if _hooks._FrameworkHook is not None:
        err = capfd.readouterr().err
        assert err.count("labelling aiohttp requests by route failed") == 1, err
        assert "ValueError: no route here" in err


def test_aiohttp_requests_are_labelled_by_method_and_route_request_after_request(
    kind: str,
) -> None:
    """The labels of aiohttp's requests, the same routes met again and again (the path where the
    compiled hook keeps each label and its row): a route of one method (``add_get`` also makes a
    HEAD route), a route of any method labelled by each request's method, a method the route does
    not serve (405) unmatched, and every request counted under its own label: in a table started
    anew under the same hooks and routes, and in a second runtime's table for a new
    application's routes (uninstall, install)."""
    from aiohttp import web

    import loopwatch
    from loopwatch import _runtime

    def counts() -> dict[str, int]:
        runtime = _runtime.current()
        assert runtime is not None
        return {r: h.count for r, h in runtime.requests.histograms().items()}

    before_clear: list[dict[str, int]] = []

    async def user(request: web.Request) -> web.Response:
        await asyncio.sleep(0)
        return web.Response(text="ok")

    async def clear(request: web.Request) -> web.Response:
        before_clear.append(counts())
        runtime = _runtime.current()
        assert runtime is not None
        runtime.requests.clear()  # (the table started anew: as a runtime's own does at its end)
        return web.Response(text="ok")

    def make_app() -> web.Application:
        app = web.Application()
        app.router.add_get("/users/{user_id}", user)
        app.router.add_route("*", "/any", user)
        app.router.add_post("/clear", clear)
        return app

    requests = [
        "/users/1", "POST /any", "/users/2", "HEAD /users/3", "/any", "POST /any",
        "DELETE /users/4", "/users/5", "HEAD /users/6", "PUT /any", "/users/7",
    ]  # fmt: skip
    statuses = [b"200"] * 6 + [b"405"] + [b"200"] * 4
    expected = {
        "GET /users/{user_id}": 4,
        "HEAD /users/{user_id}": 2,
        "POST /any": 2,
        "GET /any": 1,
        "PUT /any": 1,
        "DELETE <unmatched>": 1,
    }

    def served(paths: list[str]) -> list[bytes]:
        async def main() -> list[bytes]:
            return await served_in_process(make_app(), paths)

        factory = loopwatch.new_uvloop_event_loop if kind == "uvloop" else loopwatch.new_event_loop
        return [line.split(b" ")[0] for line in run_on_loop(factory, main())]

    loopwatch.install(log="off")
    assert served([*requests, "POST /clear", *requests]) == [*statuses, b"200", *statuses]
    assert before_clear == [expected]
    assert counts() == {**expected, "POST /clear": 1}
    loopwatch.uninstall()
    loopwatch.install(log="off")
    assert served(requests) == statuses
    assert counts() == expected


def run_on_loop(factory: Any, coro: Any) -> Any:
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coro)


def test_an_aiohttp_router_of_its_own_is_labelled_and_a_label_by_hand_comes_first(
    kind: str,
) -> None:
    """A router class of the application's own (aiohttp's deprecated ``router=``) is labelled as
    aiohttp's is (the route is read from the match it returns); a label set by hand in the
    handler takes over, and gets the busy time, once."""
    import warnings

    from aiohttp import web

    import loopwatch
    from loopwatch import _runtime
    from loopwatch.integrations import label_request, route_of

    seen: list[Any] = []

    class OwnRouter(web.UrlDispatcher):
        async def resolve(self, request: Any) -> Any:
            return await super().resolve(request)

    async def user(request: web.Request) -> web.Response:
        seen.append(route_of())
        label_request("GET /own/{user_id}")
        seen.append(route_of())
        await asyncio.sleep(0)
        return web.Response(text="ok")

    async def main() -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            app = web.Application(router=OwnRouter())
        app.router.add_get("/users/{user_id}", user)
        assert await served_in_process(app, ["/users/7"]) == [b"200 OK ok"]
        assert seen == ["GET /users/{user_id}", "GET /own/{user_id}"]
        runtime = _runtime.current()
        assert runtime is not None
        busy = {r: h.count for r, h in runtime.requests.histograms().items()}
        assert busy == {"GET /own/{user_id}": 1}

    loopwatch.install(log="off")
    factory = loopwatch.new_uvloop_event_loop if kind == "uvloop" else loopwatch.new_event_loop
    run_on_loop(factory, main())


def test_the_live_view_shows_an_aiohttp_request_task_with_its_steps_and_busy_time(
    kind: str,
) -> None:
    """A request's task waiting in its handler is a row of the live view with its own steps,
    busy time and age (from Python 3.12 a task no task factory made, timed by the hook's proxy;
    on 3.11 by the factory's), its coroutine's name and the handler's line it waits at."""
    from aiohttp import web

    import loopwatch

    waiting = asyncio.Event()
    go_on = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        waiting.set()
        await go_on.wait()  # WAIT:handler
        return web.Response(text="done")

    async def main() -> None:
        app = web.Application()
        app.router.add_get("/slow", slow)
        serving = asyncio.create_task(served_in_process(app, ["/slow"]))
        await waiting.wait()
        snapshot = await asyncio.to_thread(loopwatch.snapshot)
        go_on.set()
        assert await serving == [b"200 OK done"]
        rows = [
            row
            for entry in snapshot["loops"]
            for row in entry["tasks"]
            if row["coroutine"] == "RequestHandler._handle_request"
        ]
        assert len(rows) == 1, snapshot
        row = rows[0]
        assert row["state"] == "pending" and row["steps"] == 1
        assert 0.0 < row["busy_s"] <= row["age_s"] < 5.0
        source = Path(__file__).read_text().splitlines()
        line = next(i for i, text in enumerate(source, 1) if "# WAIT:handler" in text)
        assert row["await_chain"][-1] == f"{__file__}:{line} in slow", row
        assert row["awaiting"] == row["await_chain"][-1]
        # Where aiohttp made the task: the line that makes the task (3.11, through the loop's
        # factory), or the coroutine for a task no factory sees (3.12+, through the hook).
        import aiohttp.web_protocol

        made = "loop.create_task(coro)" if sys.version_info < (3, 12) else "self._handle_request("
        protocol = Path(aiohttp.web_protocol.__file__)
        line = next(
            i for i, text in enumerate(protocol.read_text().splitlines(), 1) if made in text
        )
        assert row["created_at"] == f"{protocol}:{line} in start", row

    loopwatch.install(log="off")
    factory = loopwatch.new_uvloop_event_loop if kind == "uvloop" else loopwatch.new_event_loop
    run_on_loop(factory, main())
