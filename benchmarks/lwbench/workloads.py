"""What is timed. Each workload runs on whatever loop it is awaited on and returns (seconds,
operations); only the part after the set-up is timed. The two HTTP services are served on the
worker's loop and loaded by wrk from another process. ``WORKLOADS`` names them all.
"""

from __future__ import annotations

import asyncio
import statistics
import subprocess
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

from .common import Measured

SLEEP0_TASKS = 200
ECHO_CLIENTS = 8
ECHO_MESSAGE = b"x" * 64
CHURN_BATCH = 500

# The clock the workloads time themselves with: wall time by default; use_clock() sets another
# (inprocess.py --clock cpu: the process's CPU time, every thread of it counted).
_CLOCK: list[Callable[[], float]] = [time.perf_counter]


def use_clock(clock: Callable[[], float]) -> None:
    _CLOCK[0] = clock


async def sleep0(iterations: int) -> Measured:
    """SLEEP0_TASKS tasks, each awaiting ``asyncio.sleep(0)`` ``iterations`` times."""

    async def spin() -> None:
        for _ in range(iterations):
            await asyncio.sleep(0)

    now = _CLOCK[0]
    start = now()
    await asyncio.gather(*(spin() for _ in range(SLEEP0_TASKS)))
    return now() - start, SLEEP0_TASKS * iterations


async def _echo_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    finally:
        writer.close()


async def echo(round_trips: int) -> Measured:
    """ECHO_CLIENTS loopback clients, each sending a small message and reading it back."""
    server = await asyncio.start_server(_echo_handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    clients = [await asyncio.open_connection("127.0.0.1", port) for _ in range(ECHO_CLIENTS)]
    size = len(ECHO_MESSAGE)

    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in range(round_trips):
            writer.write(ECHO_MESSAGE)
            await writer.drain()
            await reader.readexactly(size)

    now = _CLOCK[0]
    start = now()
    await asyncio.gather(*(client(r, w) for r, w in clients))
    elapsed = now() - start
    for _, writer in clients:
        writer.close()
        await writer.wait_closed()
    server.close()
    await server.wait_closed()
    return elapsed, ECHO_CLIENTS * round_trips


async def _nothing() -> None:
    pass


async def churn(batches: int) -> Measured:
    """``batches`` batches of CHURN_BATCH trivial tasks, created and gathered."""
    create_task = asyncio.create_task
    now = _CLOCK[0]
    start = now()
    for _ in range(batches):
        await asyncio.gather(*[create_task(_nothing()) for _ in range(CHURN_BATCH)])
    return now() - start, batches * CHURN_BATCH


async def pingpong(round_trips: int) -> Measured:
    """Two tasks waking each other through futures: ping resolves pong's, pong resolves ping's."""
    loop = asyncio.get_running_loop()
    futures = [loop.create_future(), loop.create_future()]

    async def player(me: int) -> None:
        other = 1 - me
        for _ in range(round_trips):
            await futures[me]
            futures[me] = loop.create_future()
            futures[other].set_result(None)

    now = _CLOCK[0]
    start = now()
    players = asyncio.gather(player(0), player(1))
    futures[0].set_result(None)
    await players
    return now() - start, round_trips


CALLBACK_CHAINS = 100


async def callbacks(rounds: int) -> Measured:
    """CALLBACK_CHAINS chains of ``loop.call_soon`` callbacks, each scheduling the next: no task
    steps at all, only the loop running plain callbacks (what the loop's own handles cost)."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    left = [CALLBACK_CHAINS]

    def step(n: int) -> None:
        if n:
            loop.call_soon(step, n - 1)
        else:
            left[0] -= 1
            if not left[0]:
                done.set_result(None)

    now = _CLOCK[0]
    start = now()
    for _ in range(CALLBACK_CHAINS):
        loop.call_soon(step, rounds)
    await done
    return now() - start, CALLBACK_CHAINS * (rounds + 1)


# HTTP services, served on the worker's loop and loaded by wrk in another process. The size of
# a run is wrk's duration in seconds; wrk's own count and time give the rate, and its latency
# distribution the percentiles, which each run leaves in HTTP_LATENCY for the worker to report.
HTTP_CONNECTIONS = 32
HTTP_THREADS = 1
HTTP_BODY = b"Hello, world!"
HTTP_LATENCY: list[dict[str, float]] = []
WRK_INSTALL = "apt-get install -y wrk (Debian/Ubuntu; or build https://github.com/wg/wrk)"


def _listening_socket() -> Any:
    """A listening socket on 127.0.0.1, as ``loop.create_server(host, port)`` would make it: with
    ``proto=IPPROTO_TCP``, without which stock asyncio does not set TCP_NODELAY on the accepted
    connections, and a response written in two parts waits 40 ms for the client's delayed ACK."""
    import socket

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    sock.setblocking(False)
    return sock


_WRK_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def _wrk_ms(text: str) -> float:
    for unit in sorted(_WRK_UNITS, key=len, reverse=True):
        if text.endswith(unit):
            return float(text[: -len(unit)]) * _WRK_UNITS[unit]
    raise ValueError(f"not a wrk duration: {text!r}")


def parse_wrk(output: str) -> tuple[float, int, dict[str, float]]:
    """(seconds, requests, {"p50": ms, "p90": ms, "p99": ms}) from ``wrk --latency`` output;
    raises if any request failed (a non-2xx answer, a connect, read or write error)."""
    seconds, requests, latency = 0.0, 0, {}
    for line in output.splitlines():
        words = line.split()
        if len(words) >= 4 and words[1:3] == ["requests", "in"]:
            requests, seconds = int(words[0]), _wrk_ms(words[3].rstrip(",")) / 1000.0
        elif len(words) == 2 and words[0] in ("50%", "90%", "99%"):
            latency[f"p{words[0][:-1]}"] = _wrk_ms(words[1])
        elif line.strip().startswith("Non-2xx"):
            raise RuntimeError(f"wrk saw failed requests:\n{output}")
        elif line.strip().startswith("Socket errors:"):
            counts = dict(part.split() for part in line.split(":", 1)[1].split(","))
            if any(int(counts[k]) for k in ("connect", "read", "write")):
                raise RuntimeError(f"wrk saw socket errors:\n{output}")
            latency["timeouts"] = float(counts.get("timeout", 0))
    if not requests or seconds <= 0:
        raise RuntimeError(f"no result in wrk's output:\n{output}")
    return seconds, requests, latency


async def _wrk_load(port: int, seconds: int) -> Measured:
    """wrk against ``port`` for ``seconds``, from a thread (the loop keeps serving meanwhile)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[str] = loop.create_future()
    command = [
        "wrk",
        f"-t{HTTP_THREADS}",
        f"-c{HTTP_CONNECTIONS}",
        f"-d{seconds}s",
        "--latency",
        f"http://127.0.0.1:{port}/",
    ]

    def run() -> None:
        try:
            out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        except Exception as error:  # handed to the loop, raised there
            loop.call_soon_threadsafe(done.set_exception, error)
        else:
            loop.call_soon_threadsafe(done.set_result, out)

    threading.Thread(target=run, name="bench-wrk", daemon=True).start()
    seconds_run, requests, latency = parse_wrk(await done)
    HTTP_LATENCY.append(latency)
    return seconds_run, requests


async def http_aiohttp(seconds: int) -> Measured:
    """An aiohttp ``web.Application`` with one small handler, loaded by wrk."""
    from aiohttp import web

    async def hello(request: web.Request) -> web.Response:
        return web.Response(body=HTTP_BODY, content_type="text/plain")

    app = web.Application()
    app.router.add_get("/", hello)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    sock = _listening_socket()
    await web.SockSite(runner, sock).start()
    try:
        return await _wrk_load(sock.getsockname()[1], seconds)
    finally:
        await runner.cleanup()


async def http_starlette(seconds: int) -> Measured:
    """A Starlette app with one small route, served by uvicorn (httptools when installed, as
    `uvicorn[standard]` has it), loaded by wrk."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    async def hello(request: Request) -> PlainTextResponse:
        return PlainTextResponse(HTTP_BODY)

    app = Starlette(routes=[Route("/", hello)])
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off")
    server = uvicorn.Server(config)
    sock = _listening_socket()
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            if serving.done():
                serving.result()
            await asyncio.sleep(0.01)
        return await _wrk_load(sock.getsockname()[1], seconds)
    finally:
        server.should_exit = True
        await serving


@dataclass(frozen=True, slots=True)
class Workload:
    name: str
    run: Callable[[int], Coroutine[Any, Any, Measured]]
    unit: str
    higher_is_better: bool  # a rate (operations/s) or a cost (ns/operation)
    quick_size: int
    full_size: int
    doc: str
    operation: str  # what one operation is, for "ns added per ..." lines
    # An HTTP service under wrk: the size is wrk's duration in seconds (never scaled per
    # variant), fewer timed runs per process and fewer rounds (see HTTP_PLAN), and each run
    # also reports latency percentiles.
    http: bool = False

    def value(self, seconds: float, operations: int) -> float:
        return operations / seconds if self.higher_is_better else seconds * 1e9 / operations

    def cost_ratio(self, value: float, baseline: float) -> float:
        """Time per operation of ``value`` relative to ``baseline`` (> 1: slower)."""
        return baseline / value if self.higher_is_better else value / baseline

    def within(self, runs: Sequence[float], how: str) -> float:
        """One process's value from its timed runs: the fastest (``best``) or the median."""
        if how == "median":
            return statistics.median(runs)
        return max(runs) if self.higher_is_better else min(runs)

    def ns_per_op(self, value: float) -> float:
        """Nanoseconds per operation: the unit in which per-step and per-task costs add up."""
        return 1e9 / value if self.higher_is_better else value


WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        Workload(
            "sleep0",
            sleep0,
            "steps/s",
            True,
            400,
            1000,
            f"{SLEEP0_TASKS} tasks looping on `await asyncio.sleep(0)`; size = steps per task",
            "task step",
        ),
        Workload(
            "echo",
            echo,
            "round trips/s",
            True,
            500,
            1200,
            f"TCP echo on 127.0.0.1, {ECHO_CLIENTS} clients, {len(ECHO_MESSAGE)}-byte messages;"
            " size = round trips per client",
            "round trip",
        ),
        Workload(
            "churn",
            churn,
            "ns/task",
            False,
            40,
            100,
            f"create_task of a trivial coroutine, gathered {CHURN_BATCH} at a time; size = batches",
            "task created",
        ),
        Workload(
            "pingpong",
            pingpong,
            "round trips/s",
            True,
            20_000,
            50_000,
            "two tasks passing a future back and forth; size = round trips",
            "round trip",
        ),
        Workload(
            "callbacks",
            callbacks,
            "callbacks/s",
            True,
            400,
            1000,
            f"{CALLBACK_CHAINS} chains of `loop.call_soon` callbacks, each scheduling the next;"
            " size = callbacks per chain",
            "callback",
        ),
        Workload(
            "http-aiohttp",
            http_aiohttp,
            "requests/s",
            True,
            1,
            2,
            f"aiohttp `web.Application`, one handler returning {len(HTTP_BODY)} bytes, loaded by"
            f" wrk in another process ({HTTP_THREADS} thread, {HTTP_CONNECTIONS} keep-alive"
            " connections); size = seconds of load",
            "request",
            http=True,
        ),
        Workload(
            "http-starlette",
            http_starlette,
            "requests/s",
            True,
            1,
            2,
            f"uvicorn serving a Starlette app, one route returning {len(HTTP_BODY)} bytes, loaded"
            f" by wrk in another process ({HTTP_THREADS} thread, {HTTP_CONNECTIONS} keep-alive"
            " connections); size = seconds of load",
            "request",
            http=True,
        ),
    )
}

# pingpong (another per-step workload) only on request.
DEFAULT_WORKLOADS = ("sleep0", "echo", "churn", "callbacks", "http-aiohttp", "http-starlette")
# Per process of an HTTP workload: (warm-up runs, timed runs); and the most rounds they get (each
# process takes seconds, not a fraction of one). The other workloads: 1 warm-up, 3 timed runs.
HTTP_PLAN = {"quick": (0, 1, 2), "full": (1, 2, 6)}
