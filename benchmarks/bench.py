#!/usr/bin/env python3
"""loopwatch overhead benchmarks: what watching a loop costs, as a ratio to the same loop unwatched.

Run ``python benchmarks/bench.py --quick`` (about 8 minutes on 2 cores, 3 without the HTTP
services) or ``python benchmarks/bench.py`` (about 45 minutes); see ``benchmarks/README.md`` for
how to read the output. Besides speed, it measures memory (per live task, and after a million
tasks have come and gone), start-up (what the ``.pth`` line costs with LOOPWATCH unset and set),
two HTTP services under wrk, and the alternatives users run today, with a probe of what each one
really detects.

Every measurement runs in a fresh interpreter (this file, re-run with ``--worker``), so loopwatch's
process-wide state and imports never leak from one variant into another. Variants are interleaved
round by round, so slow drift of the machine falls on all of them alike, and the conclusions are
drawn from ratios to the unwatched loop of the same kind, never from absolute numbers.

Adding a variant is one entry in ``VARIANTS``: a loop factory per loop kind, made inside the
worker, plus a check that the variant really is what it claims.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib.metadata
import importlib.util
import io
import json
import math
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import tracemalloc
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

LoopFactory = Callable[[], asyncio.AbstractEventLoop]
# How one process's value is taken from its timed runs (--within), as the report words it.
WITHIN = {"best": "the fastest", "median": "the median"}
Measured = tuple[float, int]  # (seconds, operations) of one timed run
HERE = Path(__file__).resolve()
# The interpreter of the workers and start-up runs (--python; by default this one).
PYTHON = sys.executable
REPO = HERE.parent.parent
LOOP_KINDS = ("asyncio", "uvloop")
BASELINE = "off"

# --------------------------------------------------------------------------------------------
# Workloads. Each runs on whatever loop it is awaited on and returns (seconds, operations); only
# the part after the set-up is timed.
# --------------------------------------------------------------------------------------------

SLEEP0_TASKS = 200
ECHO_CLIENTS = 8
ECHO_MESSAGE = b"x" * 64
CHURN_BATCH = 500


async def sleep0(iterations: int) -> Measured:
    """SLEEP0_TASKS tasks, each awaiting ``asyncio.sleep(0)`` ``iterations`` times."""

    async def spin() -> None:
        for _ in range(iterations):
            await asyncio.sleep(0)

    start = time.perf_counter()
    await asyncio.gather(*(spin() for _ in range(SLEEP0_TASKS)))
    return time.perf_counter() - start, SLEEP0_TASKS * iterations


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

    start = time.perf_counter()
    await asyncio.gather(*(client(r, w) for r, w in clients))
    elapsed = time.perf_counter() - start
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
    start = time.perf_counter()
    for _ in range(batches):
        await asyncio.gather(*[create_task(_nothing()) for _ in range(CHURN_BATCH)])
    return time.perf_counter() - start, batches * CHURN_BATCH


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

    start = time.perf_counter()
    players = asyncio.gather(player(0), player(1))
    futures[0].set_result(None)
    await players
    return time.perf_counter() - start, round_trips


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

    start = time.perf_counter()
    for _ in range(CALLBACK_CHAINS):
        loop.call_soon(step, rounds)
    await done
    return time.perf_counter() - start, CALLBACK_CHAINS * (rounds + 1)


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

# --------------------------------------------------------------------------------------------
# Variants: name -> how to make a loop factory for each loop kind. The set-up runs in the worker,
# so a variant's imports and global state exist only in its own process.
# --------------------------------------------------------------------------------------------


def _stock_loop() -> LoopFactory:
    return asyncio.SelectorEventLoop


def _uvloop_loop() -> LoopFactory:
    import uvloop

    factory: LoopFactory = uvloop.new_event_loop
    return factory


def _watched(kind: str, settings: Mapping[str, str]) -> Callable[[], LoopFactory]:
    """A set-up for a watched loop of ``kind``: loopwatch's settings go into the environment
    (``LOOPWATCH_<NAME>``) before loopwatch is first imported, as a program's would, and the loop
    factory is ``loopwatch.new_event_loop`` or ``loopwatch.new_uvloop_event_loop``."""

    def setup() -> LoopFactory:
        for name, value in settings.items():
            os.environ[f"LOOPWATCH_{name.upper()}"] = value
        import loopwatch

        factory: LoopFactory = (
            loopwatch.new_event_loop if kind == "asyncio" else loopwatch.new_uvloop_event_loop
        )
        return factory

    return setup


def _watched_factories(**settings: str) -> dict[str, Callable[[], LoopFactory]]:
    return {kind: _watched(kind, settings) for kind in LOOP_KINDS}


def _with_timer(make: Callable[[], LoopFactory]) -> Callable[[], LoopFactory]:
    """Control: the plain loop plus a self re-arming 10 ms timer (loopwatch's heartbeat on uvloop,
    and on asyncio's loops before the select pulse)."""

    def setup() -> LoopFactory:
        base = make()

        def factory() -> asyncio.AbstractEventLoop:
            loop = base()
            stamps = [0.0]

            def beat() -> None:
                stamps[0] = time.monotonic()
                loop.call_later(0.01, beat)

            loop.call_soon(beat)
            return loop

        return factory

    return setup


_control_stop = threading.Event()


def _with_thread(make: Callable[[], LoopFactory]) -> Callable[[], LoopFactory]:
    """Control: the plain loop plus a daemon thread waking every 20 ms (as the watchdog does on a
    healthy loop: every heartbeat period to 50 ms) and taking the GIL for a moment."""

    def setup() -> LoopFactory:
        def run() -> None:
            while not _control_stop.wait(0.02):
                time.monotonic()

        threading.Thread(target=run, name="bench-control", daemon=True).start()
        return make()

    return setup


def _with_task_factory(
    make: Callable[[], LoopFactory], *, done_callback: bool
) -> Callable[[], LoopFactory]:
    """Control: the plain loop with a Python task factory that only makes the task (what any
    Python-level factory costs), and with ``done_callback`` a no-op done callback per task (what
    scheduling one more callback at each task's end costs)."""

    def setup() -> LoopFactory:
        import contextvars

        base = make()
        task_class = asyncio.Task
        context = contextvars.Context()

        def noop(task: asyncio.Task[Any]) -> None:
            pass

        def bare(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> asyncio.Task[Any]:
            return task_class(coro, loop=loop, **kwargs)

        def with_callback(
            loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any
        ) -> asyncio.Task[Any]:
            task = task_class(coro, loop=loop, **kwargs)
            task.add_done_callback(noop, context=context)
            return task

        def factory() -> asyncio.AbstractEventLoop:
            loop = base()
            loop.set_task_factory(with_callback if done_callback else bare)
            return loop

        return factory

    return setup


def _ablated(kind: str, settings: Mapping[str, str], part: str) -> Callable[[], LoopFactory]:
    """Diagnostics: a watched loop with one part of task tracking or step timing cut out, by
    replacing a private function of loopwatch (so the difference to the full variant is what
    that part costs). Parts: ``end`` (the accounting when a task ends: counts, wall time, the
    coroutine table), ``site`` (the walk to the creation site), ``timing`` (the proxy forwards
    each step without timing it)."""
    watched = _watched(kind, settings)

    def setup() -> LoopFactory:
        factory = watched()
        from loopwatch import _tasks, _timing

        # The private names these replace change as loopwatch is optimised: say so plainly.
        needed: dict[str, list[tuple[Any, str]]] = {
            "end": [(_tasks.TaskTracker, "proxy_ended"), (_tasks.TaskTracker, "mark_done")],
            "site": [(_tasks, "_site_frame")],
        }
        for owner, name in needed.get(part, []):
            if not hasattr(owner, name):
                raise RuntimeError(f"this diagnostic replaces {owner.__name__}.{name}, now gone")
        ignore: Any = _tasks  # the names are checked above, not by the type checker
        if part == "end":

            def ended(self: Any, *args: Any) -> None:  # whatever its signature is now
                self.stats.gone += 1

            ignore.TaskTracker.proxy_ended = ended
            ignore.TaskTracker.mark_done = ended
        elif part == "site":
            ignore._site_frame = lambda frame, boundary=None: None
        elif part == "timing":

            def forward(self: Any) -> Any:
                return self._coro.send(None)

            _timing.PyTimed.__next__ = forward  # type: ignore[method-assign]
        return factory

    return setup


def _stop_thread() -> None:
    _control_stop.set()


def _loopwatch_reports(kind: str) -> Callable[[], int]:
    """loopwatch's own count of slow callbacks or stalls, from its Prometheus counters."""
    name = {"slow": "loopwatch_slow_callbacks_total", "stall": "loopwatch_loop_stalls_total"}[kind]

    def count() -> int:
        from prometheus_client import REGISTRY

        return int(REGISTRY.get_sample_value(name) or 0)

    return count


def _check_unwatched(loop: asyncio.AbstractEventLoop) -> None:
    if "loopwatch" in sys.modules:
        raise RuntimeError("the baseline imported loopwatch (is LOOPWATCH set?)")


def _check_watched(
    *, tasks: bool, step_timing: bool = False, creation_stack: int = 1, compiled: bool = True
) -> Callable[[asyncio.AbstractEventLoop], None]:
    """A check that the loop is watched, with task tracking, step timing and creation stacks as
    the variant says, and the compiled hot paths (``loopwatch._accel``) in use or not. Called
    from a task of the loop (so its own coroutine shows the proxy)."""

    def check(loop: asyncio.AbstractEventLoop) -> None:
        # Private names on purpose: a benchmark of "the watchdog" that silently measured a loop
        # with no heartbeat or no thread, or "step timing" with no proxy, would be worse than one
        # that fails.
        from loopwatch import _loops, _runtime, _timing

        if (_timing.ACCEL is not None) != compiled:
            raise RuntimeError(
                "expected the compiled hot paths (loopwatch._accel) to be in use"
                if compiled
                else "expected the pure-Python hot paths (LOOPWATCH_ACCEL=0)"
            )
        state = _loops.state_of(loop)
        runtime = _runtime.current()
        worker = runtime.watchdog.worker if runtime is not None else None
        if state is None or not state.running or worker is None or not worker.running:
            raise RuntimeError("the variant is not watching its loop")
        tracker = _loops.tracker_of(loop)
        # The factory the loop really calls: past loopwatch's hook of get_task_factory, which
        # answers with the program's own.
        factory = _loops._factory_of(loop)
        task = asyncio.current_task(loop)
        # What the task drives (get_coro() answers with the program's own coroutine).
        coro = getattr(task, "_coro", None) if task is not None else None
        # A proxy that times steps (the compiled one stays, untimed, with step timing off).
        timed = type(coro).__name__ in ("Timed", "PyTimed") and getattr(coro, "_timing", True)
        found = (
            f"tracker {tracker is not None}, task factory {factory!r}, proxy {timed},"
            f" creation_stack {getattr(tracker, 'depth', None)}"
        )
        if not tasks:
            if tracker is not None or factory is not None or timed:
                raise RuntimeError(f"task tracking should be off: {found}")
            return
        if (
            tracker is None
            or factory is not tracker.factory
            or tracker.timing != step_timing
            or timed != step_timing
            or tracker.depth != creation_stack
        ):
            raise RuntimeError(
                f"expected task tracking, step_timing={step_timing},"
                f" creation_stack={creation_stack}; found {found}"
            )

    return check


# --------------------------------------------------------------------------------------------
# The alternatives users have today, each set to loopwatch's thresholds. Their reports are
# counted (never printed: a worker fails on any output to standard error), as loopwatch's are
# with LOOPWATCH_LOG=off, so that the probe (--probe, run before the rounds) can check that each
# one really detects what it claims, on each loop.
# --------------------------------------------------------------------------------------------

# loopwatch's defaults (LOOPWATCH_SLOW_CALLBACK_MS, LOOPWATCH_STALL_MS), in seconds; the probe
# worker lowers them so that it can show a detection in well under a second.
THRESHOLDS = {"slow": 0.1, "stall": 2.0}
# Reports counted in this process: "slow" (a callback or step that took too long, said after it
# ended), "stall" (a loop still blocked, said while it is).
REPORTS = {"slow": 0, "stall": 0}
_ALT: dict[str, Any] = {}  # the alternatives' handles, for their checks and teardowns


def _counting_logger(name: str, kind: str, prefix: str = "") -> Any:
    """A logger that counts its records (those starting with ``prefix``) as ``kind`` reports
    and prints nothing."""
    import logging

    class Count(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage().startswith(prefix):
                REPORTS[kind] += 1

    logger = logging.getLogger(name)
    logger.addHandler(Count())
    logger.propagate = False
    logger.setLevel(logging.WARNING)
    return logger


def _debug_mode(make: Callable[[], LoopFactory]) -> Callable[[], LoopFactory]:
    """asyncio's debug mode, ``loop.set_debug(True)``, with ``slow_callback_duration`` at
    loopwatch's slow-callback threshold. It also records a creation traceback for every
    callback handle and task, and checks the thread of every call: all of it is what users get
    when they turn it on."""

    def setup() -> LoopFactory:
        base = make()
        _counting_logger("asyncio", "slow", "Executing ")

        def factory() -> asyncio.AbstractEventLoop:
            loop = base()
            loop.set_debug(True)
            loop.slow_callback_duration = THRESHOLDS["slow"]
            return loop

        return factory

    return setup


def _check_debug(loop: asyncio.AbstractEventLoop) -> None:
    _check_unwatched(loop)
    if not loop.get_debug() or loop.slow_callback_duration != THRESHOLDS["slow"]:
        raise RuntimeError("debug mode is not on, or not at the slow-callback threshold")


def _aiodebug(make: Callable[[], LoopFactory]) -> Callable[[], LoopFactory]:
    """aiodebug: ``log_slow_callbacks.enable`` (patches ``asyncio.events.Handle._run`` to time
    every callback) at the slow-callback threshold, and ``hang_inspection.start`` (a task
    stamping the time, a thread dumping every thread's stack to files when the stamp is older
    than ``interval``) at the stall threshold."""

    def setup() -> LoopFactory:
        from aiodebug import (  # type: ignore[import-untyped]
            hang_inspection,
            log_slow_callbacks,
        )

        base = make()

        def slow(name: str, duration: float) -> None:
            REPORTS["slow"] += 1

        log_slow_callbacks.enable(THRESHOLDS["slow"], on_slow_callback=slow)
        folder = tempfile.mkdtemp(prefix="loopwatch-bench-aiodebug-")
        _ALT["aiodebug_dir"] = folder

        def factory() -> asyncio.AbstractEventLoop:
            loop = base()
            _ALT["aiodebug"] = hang_inspection.start(folder, THRESHOLDS["stall"], loop)
            return loop

        return factory

    return setup


def _aiodebug_stalls() -> int:
    folder = _ALT.get("aiodebug_dir")
    return len(os.listdir(folder)) if folder else 0


def _check_aiodebug(loop: asyncio.AbstractEventLoop) -> None:
    _check_unwatched(loop)
    run = asyncio.events.Handle._run
    dumper, monitor = _ALT.get("aiodebug", (None, None))
    if getattr(run, "__module__", "") != "aiodebug.log_slow_callbacks":
        raise RuntimeError("aiodebug's Handle._run patch is not installed")
    if dumper is None or not dumper.is_alive() or monitor.done():
        raise RuntimeError("aiodebug's hang inspection is not running")


def _aiodebug_teardown() -> None:
    dumper, _ = _ALT.get("aiodebug", (None, None))
    if dumper is not None:
        dumper.stop = True
    shutil.rmtree(_ALT.get("aiodebug_dir", ""), ignore_errors=True)


def _pyleak_around(coro: Coroutine[Any, Any, Any]) -> Coroutine[Any, Any, Any]:
    """pyleak's blocking detector, ``no_event_loop_blocking`` (a thread that schedules a
    callback with ``call_soon_threadsafe`` every ``check_interval``, its default 50 ms, and
    reports when it has not run within ``threshold``), around the workload, as its decorator or
    pytest plugin would put it around a test; ``threshold`` is loopwatch's slow-callback one."""

    async def run() -> Any:
        from pyleak import no_event_loop_blocking
        from pyleak.base import LeakAction

        logger = _ALT.get("pyleak_logger") or _counting_logger("bench-pyleak", "stall")
        _ALT["pyleak_logger"] = logger
        scope = no_event_loop_blocking(
            action=LeakAction.LOG, logger=logger, threshold=THRESHOLDS["slow"]
        )
        async with scope:
            thread = scope.detector.monitor_thread
            if thread is None or not thread.is_alive():
                raise RuntimeError("pyleak's monitor thread is not running")
            _ALT["pyleak"] = scope.detector
            return await coro

    return run()


def _pyleak_stalls() -> int:
    detector = _ALT.get("pyleak")
    return detector.block_count if detector is not None else 0


def _otel(make: Callable[[], LoopFactory]) -> Callable[[], LoopFactory]:
    """The OpenTelemetry asyncio instrumentation, ``AsyncioInstrumentor().instrument()``, with
    the SDK's meter and tracer providers (a metric reader that keeps what it is given, no
    exporter): it wraps ``asyncio.create_task``, ``ensure_future``, ``gather``, ``wait_for``,
    ``wait``, ``as_completed``, ``to_thread`` and ``TaskGroup.create_task``, and records a
    duration histogram and a counter for every coroutine passed to them. It does not look at
    blocking at all; it applies where a program's tasks go through those functions (not through
    ``loop.create_task``, which aiohttp and uvicorn use)."""

    def setup() -> LoopFactory:
        from opentelemetry.instrumentation.asyncio import AsyncioInstrumentor
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
        from opentelemetry.sdk.trace import TracerProvider

        reader = InMemoryMetricReader()
        AsyncioInstrumentor().instrument(
            meter_provider=MeterProvider(metric_readers=[reader]),
            tracer_provider=TracerProvider(),
        )
        _ALT["otel_reader"] = reader
        return make()

    return setup


def _otel_recorded() -> int:
    """How many coroutines the OpenTelemetry instrumentation has counted so far."""
    reader = _ALT.get("otel_reader")
    data = reader.get_metrics_data() if reader is not None else None
    total = 0
    for resource in getattr(data, "resource_metrics", None) or ():
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name == "asyncio.process.created":
                    total += sum(int(point.value) for point in metric.data.data_points)
    return total


def _check_otel(loop: asyncio.AbstractEventLoop) -> None:
    _check_unwatched(loop)
    wrapped = ("create_task", "gather", "ensure_future")
    if not all(hasattr(getattr(asyncio, name), "__wrapped__") for name in wrapped):
        raise RuntimeError("the OpenTelemetry asyncio instrumentation is not installed")


def _uninstall() -> None:
    import loopwatch

    loopwatch.uninstall()


def _no_teardown() -> None:
    pass


@dataclass(frozen=True, slots=True)
class Variant:
    name: str
    factories: Mapping[str, Callable[[], LoopFactory]]  # loop kind -> set-up returning a factory
    check: Callable[[asyncio.AbstractEventLoop], None]  # called on the running loop; raises
    teardown: Callable[[], None]
    doc: str
    # "loopwatch", "baseline", "alternative", "control" or "diagnostic".
    group: str = "loopwatch"
    # Modules it needs beyond loopwatch and uvloop; the run skips it when one is missing.
    requires: tuple[str, ...] = ()
    # Wraps each workload's coroutine (for a detector used as a context manager).
    around: Callable[[Coroutine[Any, Any, Any]], Coroutine[Any, Any, Any]] | None = None
    # The workloads' sizes are multiplied by this (a variant many times slower gets shorter
    # runs: the rate is per operation, so it is unchanged); never HTTP durations.
    scale: float = 1.0
    # Reports counted so far, for the probe: slow callbacks said after they ended, and a stalled
    # loop said while it was still blocked; None for one it does not claim to detect.
    slow_reports: Callable[[], int] | None = None
    stall_reports: Callable[[], int] | None = None
    # Loop kinds where a part of it has no effect, and why (checked by the probe).
    inert: Mapping[str, str] = field(default_factory=dict)


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant(
            BASELINE,
            {"asyncio": _stock_loop, "uvloop": _uvloop_loop},
            _check_unwatched,
            _no_teardown,
            "plain loop: `asyncio.SelectorEventLoop` / `uvloop.new_event_loop`, loopwatch not"
            " imported",
            group="baseline",
        ),
        Variant(
            "watchdog",
            _watched_factories(tasks="0"),
            _check_watched(tasks=False),
            _uninstall,
            "`loopwatch.new_event_loop` / `loopwatch.new_uvloop_event_loop` with"
            " `LOOPWATCH_TASKS=0`: the watchdog only (its pulse on the loop's selector, a"
            " heartbeat timer on uvloop, and its thread)",
            slow_reports=_loopwatch_reports("slow"),
            stall_reports=_loopwatch_reports("stall"),
        ),
        Variant(
            "tasks",
            _watched_factories(step_timing="0"),
            _check_watched(tasks=True, step_timing=False),
            _uninstall,
            "`LOOPWATCH_STEP_TIMING=0`: the watchdog plus task tracking (the compiled task"
            " factory: creation site, and a proxy that forwards each step untimed and counts the"
            " task's end)",
            slow_reports=_loopwatch_reports("slow"),
            stall_reports=_loopwatch_reports("stall"),
        ),
        Variant(
            "default",
            _watched_factories(),
            _check_watched(tasks=True, step_timing=True),
            _uninstall,
            "default settings: the watchdog, task tracking and per-step timing (a proxy around"
            " each task's coroutine)",
            slow_reports=_loopwatch_reports("slow"),
            stall_reports=_loopwatch_reports("stall"),
        ),
        Variant(
            "everything",
            _watched_factories(creation_stack="8"),
            _check_watched(tasks=True, step_timing=True, creation_stack=8),
            _uninstall,
            "default plus `LOOPWATCH_CREATION_STACK=8`: 8 frames of each task's creation stack",
            slow_reports=_loopwatch_reports("slow"),
            stall_reports=_loopwatch_reports("stall"),
        ),
        # The same with the pure-Python hot paths (no compiler at install, or LOOPWATCH_ACCEL=0).
        Variant(
            "tasks-py",
            _watched_factories(step_timing="0", accel="0"),
            _check_watched(tasks=True, step_timing=False, compiled=False),
            _uninstall,
            "`tasks` in pure Python (`LOOPWATCH_ACCEL=0`): the Python task factory, and a done"
            " callback per task",
            slow_reports=_loopwatch_reports("slow"),
            stall_reports=_loopwatch_reports("stall"),
        ),
        Variant(
            "default-py",
            _watched_factories(accel="0"),
            _check_watched(tasks=True, step_timing=True, compiled=False),
            _uninstall,
            "`default` in pure Python (`LOOPWATCH_ACCEL=0`): the Python task factory and proxy",
            slow_reports=_loopwatch_reports("slow"),
            stall_reports=_loopwatch_reports("stall"),
        ),
        # Controls, run only when asked for (--variants): no loopwatch, one of its costs each.
        Variant(
            "timer-only",
            {"asyncio": _with_timer(_stock_loop), "uvloop": _with_timer(_uvloop_loop)},
            _check_unwatched,
            _no_teardown,
            "control, no loopwatch: the plain loop plus a 10 ms self re-arming `call_later`",
            group="control",
        ),
        Variant(
            "thread-only",
            {"asyncio": _with_thread(_stock_loop), "uvloop": _with_thread(_uvloop_loop)},
            _check_unwatched,
            _stop_thread,
            "control, no loopwatch: the plain loop plus a daemon thread waking every 20 ms",
            group="control",
        ),
        Variant(
            "py-factory",
            {
                "asyncio": _with_task_factory(_stock_loop, done_callback=False),
                "uvloop": _with_task_factory(_uvloop_loop, done_callback=False),
            },
            _check_unwatched,
            _no_teardown,
            "control, no loopwatch: the plain loop with a Python task factory that only makes"
            " the task",
            group="control",
        ),
        Variant(
            "py-callback",
            {
                "asyncio": _with_task_factory(_stock_loop, done_callback=True),
                "uvloop": _with_task_factory(_uvloop_loop, done_callback=True),
            },
            _check_unwatched,
            _no_teardown,
            "control, no loopwatch: `py-factory` plus a no-op done callback on every task",
            group="control",
        ),
        # Diagnostics: `tasks` or `default` with one part cut out (private functions replaced).
        Variant(
            "tasks-no-end",
            {k: _ablated(k, {"step_timing": "0", "accel": "0"}, "end") for k in LOOP_KINDS},
            _check_watched(tasks=True, step_timing=False, compiled=False),
            _uninstall,
            "diagnostic: `tasks-py` without the accounting at each task's end (counts, wall"
            " time, coroutine table); the done callback still runs",
            group="diagnostic",
        ),
        Variant(
            "tasks-no-site",
            {k: _ablated(k, {"step_timing": "0", "accel": "0"}, "site") for k in LOOP_KINDS},
            _check_watched(tasks=True, step_timing=False, compiled=False),
            _uninstall,
            "diagnostic: `tasks-py` without the walk to each task's creation site",
            group="diagnostic",
        ),
        Variant(
            "bare-proxy",
            {k: _ablated(k, {"accel": "0"}, "timing") for k in LOOP_KINDS},
            _check_watched(tasks=True, step_timing=True, compiled=False),
            _uninstall,
            "diagnostic: `default-py` with the proxy forwarding each step untimed (its call alone)",
            group="diagnostic",
        ),
        # The alternatives users have today, at loopwatch's thresholds.
        Variant(
            "debug",
            {"asyncio": _debug_mode(_stock_loop), "uvloop": _debug_mode(_uvloop_loop)},
            _check_debug,
            _no_teardown,
            "asyncio's debug mode: `loop.set_debug(True)`, `slow_callback_duration` at"
            " loopwatch's slow-callback threshold (it also keeps a creation traceback per"
            " callback and task); uvloop implements it too",
            group="alternative",
            scale=0.1,
            slow_reports=lambda: REPORTS["slow"],
        ),
        Variant(
            "aiodebug",
            {"asyncio": _aiodebug(_stock_loop), "uvloop": _aiodebug(_uvloop_loop)},
            _check_aiodebug,
            _aiodebug_teardown,
            "aiodebug: `log_slow_callbacks.enable` at the slow-callback threshold (a patch of"
            " `asyncio.events.Handle._run` timing every callback) and `hang_inspection.start` at"
            " the stall threshold (a task stamping the time, a thread dumping stacks to files)",
            group="alternative",
            requires=("aiodebug",),
            slow_reports=lambda: REPORTS["slow"],
            stall_reports=_aiodebug_stalls,
            inert={
                "uvloop": "its slow-callback logging patches `asyncio.events.Handle._run`, which"
                " uvloop never calls (uvloop's handles are its own, compiled): only the hang"
                " inspection works there"
            },
        ),
        Variant(
            "pyleak",
            {"asyncio": _stock_loop, "uvloop": _uvloop_loop},
            _check_unwatched,
            _no_teardown,
            "pyleak: `no_event_loop_blocking(threshold=...)` at the slow-callback threshold around"
            " the workload (a thread pinging the loop with `call_soon_threadsafe` every 50 ms)",
            group="alternative",
            requires=("pyleak",),
            around=_pyleak_around,
            stall_reports=_pyleak_stalls,
        ),
        Variant(
            "otel",
            {"asyncio": _otel(_stock_loop), "uvloop": _otel(_uvloop_loop)},
            _check_otel,
            _no_teardown,
            "OpenTelemetry's asyncio instrumentation, `AsyncioInstrumentor().instrument()` with"
            " the SDK's meter provider: a duration and a count for every coroutine given to"
            " `asyncio.create_task`, `gather`, `ensure_future`, ...; it detects no blocking",
            group="alternative",
            requires=("opentelemetry.instrumentation.asyncio", "opentelemetry.sdk"),
        ),
    )
}

ALTERNATIVES = tuple(v for v in VARIANTS if VARIANTS[v].group == "alternative")
DEFAULT_VARIANTS = (
    BASELINE,
    "watchdog",
    "tasks",
    "default",
    "everything",
    "tasks-py",
    "default-py",
    *ALTERNATIVES,
)

# Each variant against the one it adds to: the cost of one feature at a time.
INCREMENTS: tuple[tuple[str, str, str], ...] = (
    ("watchdog", BASELINE, "the watchdog"),
    ("tasks", "watchdog", "task tracking"),
    ("default", "tasks", "step timing"),
    ("everything", "default", "8-frame creation stacks"),
    ("default", BASELINE, "all of the default"),
    ("tasks-py", "watchdog", "task tracking, pure Python"),
    ("default-py", "tasks-py", "step timing, pure Python"),
    ("default-py", BASELINE, "all of the default, pure Python"),
    ("timer-only", BASELINE, "a 10 ms timer"),
    ("thread-only", BASELINE, "a thread waking every 20 ms"),
    ("py-factory", BASELINE, "a Python task factory"),
    ("py-callback", "py-factory", "a done callback per task"),
    ("tasks-py", "tasks-no-end", "accounting at task end (pure Python)"),
    ("tasks-py", "tasks-no-site", "the creation-site walk (pure Python)"),
    ("bare-proxy", "tasks-py", "a forwarding proxy (pure Python)"),
    ("default-py", "bare-proxy", "timing in the proxy (pure Python)"),
    ("debug", BASELINE, "asyncio debug mode"),
    ("aiodebug", BASELINE, "aiodebug"),
    ("pyleak", BASELINE, "pyleak"),
    ("otel", BASELINE, "OpenTelemetry asyncio"),
)


@dataclass(frozen=True, slots=True)
class Budget:
    """``variant`` may cost at most ``limit`` more than ``reference`` on ``workload``, on every
    loop: in percent (``unit`` "%"), or in nanoseconds per operation ("ns"). A limit of 0 ns
    means "nothing detectable": met unless the whole paired interval is above zero."""

    variant: str
    reference: str
    workload: str
    limit: float
    unit: str
    what: str
    loops: tuple[str, ...] = LOOP_KINDS  # the loop kinds it applies to


BUDGETS: tuple[Budget, ...] = (
    Budget("watchdog", BASELINE, "echo", 2.0, "%", "the watchdog alone"),
    Budget("watchdog", BASELINE, "sleep0", 5.0, "%", "the watchdog alone"),
    Budget("tasks", "watchdog", "churn", 1000.0, "ns", "task tracking, per task created"),
    Budget("tasks", "watchdog", "sleep0", 0.0, "ns", "task tracking, per task step"),
    Budget("default", "tasks", "sleep0", 300.0, "ns", "step timing, per task step"),
    Budget("default", "tasks", "echo", 5.0, "%", "step timing"),
    # The same two per-operation budgets with the pure-Python hot paths (LOOPWATCH_ACCEL=0).
    Budget("tasks-py", "watchdog", "churn", 1000.0, "ns", "task tracking in pure Python"),
    Budget("default-py", "tasks-py", "sleep0", 300.0, "ns", "step timing in pure Python"),
    # "fewer": the rate lost, in percent of the reference's rate.
    # What watching costs a program with the default settings (issue 14), per loop kind.
    Budget("default", BASELINE, "echo", 2.0, "%", "the default settings"),
    Budget("default", BASELINE, "callbacks", 3.0, "%", "the default settings"),
    Budget("default", BASELINE, "sleep0", 3.0, "%", "the default settings", ("asyncio",)),
    Budget("default", BASELINE, "sleep0", 5.0, "%", "the default settings", ("uvloop",)),
    Budget("default", BASELINE, "churn", 10.0, "%", "the default settings", ("asyncio",)),
    Budget("default", BASELINE, "churn", 12.0, "%", "the default settings", ("uvloop",)),
    Budget("default", BASELINE, "http-aiohttp", 3.0, "fewer", "HTTP service, default settings"),
    Budget("default", BASELINE, "http-starlette", 3.0, "fewer", "HTTP service, default settings"),
)
# Memory budgets: bytes of loopwatch state per live task, against the plain loop.
LIVE_TASK_BUDGET = 200.0
LIVE_TASK_BUDGETED = ("tasks", "default")


# --------------------------------------------------------------------------------------------
# The worker: one process, one (workload, variant, loop kind), a warm-up then timed runs; or one
# (variant, loop kind) and the memory measurements.
# --------------------------------------------------------------------------------------------

# Threads whose wake-ups are counted: loopwatch's watchdog (invisible to threading: found
# through loopwatch's own record of it), and the thread-only control's.
WATCHER_THREADS = ("bench-control",)


def _watcher_native_id() -> int | None:
    runtime = sys.modules.get("loopwatch._runtime")
    current = runtime.current() if runtime is not None else None
    if current is not None and current.watchdog.worker.running:
        return current.watchdog.worker.native_id  # type: ignore[no-any-return]
    for thread in threading.enumerate():
        if thread.name in WATCHER_THREADS:
            return thread.native_id
    return None


def _thread_sleeps() -> int | None:
    """Voluntary context switches of the watchdog (or control) thread so far. Each one is the
    thread going to sleep, so their increase over a run is how often it woke in between. None
    without such a thread, or without ``/proc`` (not Linux)."""
    native_id = _watcher_native_id()
    if native_id is None:
        return None
    try:
        status = Path(f"/proc/self/task/{native_id}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("voluntary_ctxt_switches:"):
            return int(line.split()[1])
    return None


def _around(variant: Variant, coro: Coroutine[Any, Any, Any]) -> Coroutine[Any, Any, Any]:
    return coro if variant.around is None else variant.around(coro)


def _speed(runner: asyncio.Runner, spec: Mapping[str, Any], variant: Variant) -> dict[str, Any]:
    workload = WORKLOADS[spec["workload"]]
    size = int(spec["size"])
    warmup = int(spec["warmup"])
    values: list[float] = []
    latency: list[dict[str, float]] = []
    sleeps = _thread_sleeps()
    started = time.perf_counter()
    for i in range(warmup + int(spec["repeats"])):
        gc.collect()
        HTTP_LATENCY.clear()
        seconds, operations = runner.run(_around(variant, workload.run(size)))
        if i >= warmup:
            values.append(workload.value(seconds, operations))
            latency += HTTP_LATENCY
    elapsed = time.perf_counter() - started
    slept = _thread_sleeps()
    wakes = (slept - sleeps) / elapsed if sleeps is not None and slept is not None else None
    return {
        "value": statistics.median(values),
        "runs": values,
        "wakes_per_s": wakes,
        "latency": latency or None,
    }


# The probe: with the thresholds lowered, a callback that blocks past the slow-callback one,
# then one that blocks past the stall one, and what the variant reported of each.
PROBE_THRESHOLDS = {"slow": 0.02, "stall": 0.3}
# Longer than pyleak's 50 ms sampling plus its threshold: a block shorter than that can fall
# between two of its pings and go unseen (a limit of sampling, not what the probe asks).
PROBE_SLOW_BLOCK = 0.12
PROBE_STALL_BLOCK = 1.0


async def _probe(variant: Variant) -> dict[str, Any]:
    def count(reports: Callable[[], int] | None) -> int | None:
        return None if reports is None else reports()

    async def settle() -> None:  # let the loop run, and reports made after a block come in
        for _ in range(20):
            await asyncio.sleep(0.01)

    await settle()
    slow0, stall0 = count(variant.slow_reports), count(variant.stall_reports)
    time.sleep(PROBE_SLOW_BLOCK)  # blocking the loop is the point
    await settle()
    slow1, stall1 = count(variant.slow_reports), count(variant.stall_reports)
    during: list[int | None] = []

    def sample() -> None:  # while the loop is still blocked, near the end of the block
        time.sleep(PROBE_STALL_BLOCK * 0.9)
        during.append(count(variant.stall_reports))

    sampler = threading.Thread(target=sample)
    sampler.start()
    time.sleep(PROBE_STALL_BLOCK)
    sampler.join()
    await settle()
    created = _otel_recorded() if "otel_reader" in _ALT else None
    if created is not None:
        await asyncio.create_task(settle())
        created = _otel_recorded() - created

    def diff(after: int | None, before: int | None) -> int | None:
        return None if after is None or before is None else after - before

    return {
        "slow": diff(slow1, slow0),
        "slow_block_stalls": diff(stall1, stall0),
        "stall_while_blocked": diff(during[0], stall1),
        "otel_coroutines": created,
    }


def _rss() -> int | None:
    """Resident set size of this process, in bytes (Linux), else None."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE")


def _tracked(loop: asyncio.AbstractEventLoop) -> dict[str, int] | None:
    """loopwatch's per-loop task state: live-task entries, and rows of the coroutine table."""
    if "loopwatch" not in sys.modules:
        return None
    import loopwatch
    from loopwatch import _loops

    tracker = _loops.tracker_of(loop)
    if tracker is None:
        return None
    return {"entries": tracker.active, "rows": len(loopwatch.coroutine_stats())}


async def _parked_tasks(n: int) -> dict[str, Any]:
    """``n`` tasks created and left pending on one future: the traced bytes they take, per task,
    and what loopwatch tracks meanwhile."""
    loop = asyncio.get_running_loop()
    gate: asyncio.Future[None] = loop.create_future()

    async def parked() -> None:
        await gate

    # One task first: one-off allocations (caches, the first table rows) are not per task.
    first = asyncio.create_task(parked())
    await asyncio.sleep(0)
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    tasks = [asyncio.create_task(parked()) for _ in range(n)]
    await asyncio.sleep(0)  # every task takes its first step and suspends on the gate
    gc.collect()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    tracked = _tracked(loop)
    gate.set_result(None)
    await asyncio.gather(first, *tasks)
    return {"tasks": n, "bytes_per_task": (after - before) / n, "tracked": tracked}


def _memory_state(loop: asyncio.AbstractEventLoop) -> dict[str, Any]:
    return {"rss": _rss(), "blocks": sys.getallocatedblocks(), "tracked": _tracked(loop)}


def _churned(
    runner: asyncio.Runner, tasks: int, traced_tasks: int, variant: Variant
) -> dict[str, Any]:
    """``tasks`` tasks created and finished (the churn workload): loopwatch's tracked state, the
    live Python blocks and the RSS before and after. Then, under tracemalloc (slower), the
    traced bytes still allocated after ``traced_tasks`` more, counted from after a first
    ``traced_tasks``: tables that are reallocated as they are reused (a dict that had entries
    deleted and added) are then traced on both sides, and only growth remains."""
    loop = runner.get_loop()
    runner.run(_around(variant, churn(20)))  # warm-up: free lists, caches, table rows
    gc.collect()
    before = _memory_state(loop)
    seconds, _ = runner.run(_around(variant, churn(tasks // CHURN_BATCH)))
    gc.collect()
    after = _memory_state(loop)
    tracemalloc.start()
    runner.run(_around(variant, churn(traced_tasks // CHURN_BATCH)))
    gc.collect()
    traced_before = tracemalloc.get_traced_memory()[0]
    runner.run(_around(variant, churn(traced_tasks // CHURN_BATCH)))
    gc.collect()
    traced_after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return {
        "tasks": tasks,
        "seconds": seconds,
        "before": before,
        "after": after,
        "traced_tasks": traced_tasks,
        "traced_growth": traced_after - traced_before,
        "tracked_end": _tracked(loop),
    }


def worker(spec: Mapping[str, Any]) -> dict[str, Any]:
    variant = VARIANTS[spec["variant"]]
    kind = spec.get("kind", "speed")
    if kind == "probe":
        THRESHOLDS.update(PROBE_THRESHOLDS)
        os.environ["LOOPWATCH_SLOW_CALLBACK_MS"] = str(round(PROBE_THRESHOLDS["slow"] * 1000))
        os.environ["LOOPWATCH_STALL_MS"] = str(round(PROBE_THRESHOLDS["stall"] * 1000))
    factory = variant.factories[spec["loop"]]()

    async def check() -> None:
        variant.check(asyncio.get_running_loop())

    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(check())
        if kind == "speed":
            result = _speed(runner, spec, variant)
        elif kind == "probe":
            result = runner.run(_around(variant, _probe(variant)))
        else:
            result = {
                "live": [
                    runner.run(_around(variant, _parked_tasks(int(n)))) for n in spec["live_tasks"]
                ],
                "churn": _churned(
                    runner, int(spec["churn_tasks"]), int(spec["traced_tasks"]), variant
                ),
            }
    variant.teardown()
    module = sys.modules.get("loopwatch")
    result["loopwatch"] = getattr(module, "__file__", None) if module is not None else None
    return result


def child_env(source: Path | None) -> dict[str, str]:
    """The environment of every child: this one without LOOPWATCH*, loopwatch's log off.

    Bytecode is cached under the temporary directory (``PYTHONPYCACHEPREFIX``), even when
    ``PYTHONDONTWRITEBYTECODE`` is set: an installed package has its ``.pyc`` files, and recompiling
    loopwatch in every process would be charged to it. With ``source`` (a ``--ref`` snapshot), that
    copy of loopwatch comes first on the path, before the installed one.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOPWATCH")}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = str(Path(tempfile.gettempdir()) / "loopwatch-bench-pycache")
    env["LOOPWATCH_LOG"] = "off"
    if source is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(source), env.get("PYTHONPATH")]))
    return env


def run_worker(
    script: Path, spec: Mapping[str, Any], env: Mapping[str, str], source: Path | None
) -> dict[str, Any]:
    command = [PYTHON, str(script), "--worker", json.dumps(dict(spec))]
    done = subprocess.run(
        command, env=dict(env), capture_output=True, text=True, timeout=300, check=False
    )
    if done.returncode != 0 or done.stderr.strip():
        raise RuntimeError(
            f"worker {dict(spec)} failed (exit {done.returncode}):\n{done.stderr}{done.stdout}"
        )
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    imported = result["loopwatch"]
    if source is not None and imported is not None and not Path(imported).is_relative_to(source):
        raise RuntimeError(f"worker {dict(spec)} imported {imported}, not the snapshot {source}")
    return result


@contextmanager
def workspace(ref: str | None) -> Iterator[tuple[Path, Path | None, str]]:
    """A temporary directory holding a copy of this script (workers run the copy, so editing
    ``bench.py`` during a run changes nothing) and, with ``ref``, ``loopwatch/`` as of that git
    ref. Yields the script, the loopwatch source to use (None: as installed) and a description."""
    with tempfile.TemporaryDirectory(prefix="loopwatch-bench-") as tmp:
        script = Path(tmp) / HERE.name
        shutil.copy2(HERE, script)
        if ref is None:
            spec = importlib.util.find_spec("loopwatch")
            where = Path(spec.origin).parent if spec is not None and spec.origin else "not found"
            yield (
                script,
                None,
                f"{_version('loopwatch')} as installed ({where}; git {_git_state()})",
            )
            return
        commit = _git("rev-parse", "--verify", f"{ref}^{{commit}}")
        source = Path(tmp) / "source"
        paths = ["loopwatch"]
        if _git("ls-tree", "--name-only", commit, "hatch_build.py"):
            paths.append("hatch_build.py")
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", "--format=tar", commit, *paths],
            capture_output=True,
            check=True,
        ).stdout
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(source, filter="data")
        compiled = ""
        if (source / "hatch_build.py").exists():
            # The snapshot's compiled hot paths, built as an install would build them, for the
            # workers' interpreter; without them the compiled variants fail their check.
            built = subprocess.run(
                [PYTHON, str(source / "hatch_build.py"), str(source)], check=False
            )
            compiled = (
                ", with its compiled module built"
                if built.returncode == 0
                else ", its compiled module NOT built (the warning above says why)"
            )
        yield script, source, f"git {commit[:12]} ({ref}), exported from {REPO}{compiled}"


# --------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------


def spread(values: Sequence[float]) -> tuple[float, float, str]:
    """The interquartile range with 5 values or more, else min-max; and which one it is."""
    if len(values) >= 5:
        q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
        return q1, q3, "IQR"
    return min(values), max(values), "min-max"


def median_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """A distribution-free confidence interval for the median (from the sign test): the k-th
    smallest and k-th largest values, k as large as keeps the coverage at ``level`` or above.
    Returns (low, high, coverage); with few values the coverage is lower (3 values: 75%)."""
    ordered = sorted(values)
    n = len(ordered)

    def coverage(k: int) -> float:  # P(x_(k) <= median <= x_(n+1-k)) = 1 - 2 P(Bin(n, 1/2) < k)
        return 1.0 - 2.0 * sum(math.comb(n, i) for i in range(k)) / 2.0**n

    k = 1
    while k + 1 <= (n + 1) // 2 and coverage(k + 1) >= level:
        k += 1
    return ordered[k - 1], ordered[n - k], coverage(k)


@dataclass(slots=True)
class Cell:
    """All rounds of one (workload, loop kind, variant)."""

    workload: str
    loop: str
    variant: str
    values: list[float] = field(default_factory=list)  # one per round, in round order
    # Wake-ups per second of the watchdog (or control) thread, one per round; None without one.
    wakes: list[float | None] = field(default_factory=list)
    # Every timed run of each round's process, from which ``values`` was taken.
    runs: list[list[float]] = field(default_factory=list)
    # HTTP workloads: wrk's latency percentiles (ms) of the run ``values`` was taken from.
    latency: list[dict[str, float]] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.values)


@dataclass(frozen=True, slots=True)
class Comparison:
    """A variant against the baseline of the same workload and loop kind."""

    ratio: float  # variant median / baseline median, in the workload's own unit
    overhead: float  # extra time per operation that ratio means, percent (> 0: slower)
    # The overhead within each round (the variant against the baseline run next to it in time):
    # its median and a confidence interval for that median.
    paired: float
    ci_low: float
    ci_high: float
    ci_level: float


def compare(workload: Workload, cell: Cell, base: Cell) -> Comparison:
    paired = [
        (workload.cost_ratio(v, b) - 1.0) * 100.0
        for v, b in zip(cell.values, base.values, strict=True)
    ]
    low, high, level = median_interval(paired)
    return Comparison(
        ratio=cell.median / base.median,
        overhead=(workload.cost_ratio(cell.median, base.median) - 1.0) * 100.0,
        paired=statistics.median(paired),
        ci_low=low,
        ci_high=high,
        ci_level=level,
    )


@dataclass(frozen=True, slots=True)
class Added:
    """Nanoseconds per operation a variant adds to another (the reference): what one task step,
    task creation or round trip costs more."""

    ns: float  # difference of the two medians, each in ns per operation
    # The difference within each round (the two runs next to each other in time): its median
    # and a confidence interval for that median.
    paired: float
    ci_low: float
    ci_high: float
    ci_level: float


def added_ns(workload: Workload, cell: Cell, base: Cell) -> Added:
    paired = [
        workload.ns_per_op(v) - workload.ns_per_op(b)
        for v, b in zip(cell.values, base.values, strict=True)
    ]
    low, high, level = median_interval(paired)
    return Added(
        ns=workload.ns_per_op(cell.median) - workload.ns_per_op(base.median),
        paired=statistics.median(paired),
        ci_low=low,
        ci_high=high,
        ci_level=level,
    )


# --------------------------------------------------------------------------------------------
# Start-up: what the .pth line costs a process that does not ask for loopwatch, and one that does.
# --------------------------------------------------------------------------------------------

STARTUP_SNIPPETS = ("pass", "import asyncio", "import asyncio; asyncio.run(asyncio.sleep(0))")
STARTUP_SETTINGS = ("unset", "1")
# With LOOPWATCH unset, loopwatch's whole start-up cost is the line of loopwatch.pth: timed here
# in a child with that environment, in nanoseconds per execution (best of 5 repeats).
PTH_TIMER = """
import sysconfig, timeit
from pathlib import Path
pth = Path(sysconfig.get_paths()["purelib"]) / "loopwatch.pth"
lines = [x for x in pth.read_text().splitlines() if x.startswith("import")] if pth.exists() else []
n = 100_000
print(min(timeit.repeat(lines[0], number=n, repeat=5)) / n * 1e9 if lines else "none")
"""


def loopwatch_import_times(stderr: str) -> tuple[int, int, list[str]]:
    """From ``-X importtime`` output: summed self time of loopwatch modules, summed cumulative time
    of the outermost loopwatch imports (what they pulled in included), and their names."""
    rows: list[tuple[int, int, int, str]] = []
    for line in stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        parts = line[len("import time:") :].split("|")
        if len(parts) != 3 or not parts[0].strip().isdigit():
            continue  # the header line
        name = parts[2].rstrip()
        depth = (len(name) - len(name.lstrip())) // 2
        rows.append((int(parts[0]), int(parts[1]), depth, name.strip()))
    own_self = own_cumulative = 0
    names: list[str] = []
    ancestors: list[tuple[int, str]] = []
    # A module's line comes after those of the imports it triggered: walk backwards, so that each
    # line's enclosing imports are on the stack when it is reached.
    for self_us, cumulative_us, depth, name in reversed(rows):
        while ancestors and ancestors[-1][0] >= depth:
            ancestors.pop()
        if name.split(".")[0] == "loopwatch":
            names.append(name)
            own_self += self_us
            if not any(a.split(".")[0] == "loopwatch" for _, a in ancestors):
                own_cumulative += cumulative_us
        ancestors.append((depth, name))
    return own_self, own_cumulative, sorted(names)


@dataclass(slots=True)
class StartupRow:
    snippet: str
    setting: str
    wall_ms: list[float] = field(default_factory=list)
    self_us: list[int] = field(default_factory=list)
    cumulative_us: list[int] = field(default_factory=list)
    modules: list[str] = field(default_factory=list)


def pth_line_ns(env: Mapping[str, str]) -> float | None:
    """What the ``loopwatch.pth`` line costs a process with LOOPWATCH unset, in ns (None: the
    environment has no ``loopwatch.pth``)."""
    done = subprocess.run(
        [PYTHON, "-c", PTH_TIMER], env=dict(env), capture_output=True, text=True, check=True
    )
    out = done.stdout.strip()
    return None if out == "none" else float(out)


def measure_startup(
    env: Mapping[str, str], wall_runs: int, importtime_runs: int
) -> list[StartupRow]:
    rows = {(s, v): StartupRow(s, v) for s in STARTUP_SNIPPETS for v in STARTUP_SETTINGS}
    envs = {v: dict(env) if v == "unset" else {**env, "LOOPWATCH": v} for v in STARTUP_SETTINGS}
    order = list(rows)
    log(f"start-up: {wall_runs} wall-time runs and {importtime_runs} -X importtime runs each")
    for row in rows.values():  # warm-up: fill the bytecode cache, the page cache
        for _ in range(2):
            subprocess.run([PYTHON, "-c", row.snippet], env=envs[row.setting], check=True)
    for i in range(max(wall_runs, importtime_runs)):
        for key in order if i % 2 == 0 else reversed(order):
            row = rows[key]
            env = envs[row.setting]
            if i < wall_runs:
                start = time.perf_counter()
                subprocess.run(
                    [PYTHON, "-c", row.snippet],
                    env=env,
                    check=True,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                row.wall_ms.append((time.perf_counter() - start) * 1000.0)
            if i < importtime_runs:
                done = subprocess.run(
                    [PYTHON, "-X", "importtime", "-c", row.snippet],
                    env=env,
                    check=True,
                    capture_output=True,
                    text=True,
                )
                own_self, own_cumulative, names = loopwatch_import_times(done.stderr)
                row.self_us.append(own_self)
                row.cumulative_us.append(own_cumulative)
                row.modules = names
    return list(rows.values())


# --------------------------------------------------------------------------------------------
# Memory: what loopwatch keeps per live task, and what is left after many tasks have come and gone.
# --------------------------------------------------------------------------------------------

# Pending tasks at once, smallest first (each set is finished before the next). loopwatch's
# live-task dict is part of the cost per task, and that part depends on where N falls between
# two resizes of the dict: several N show the range.
LIVE_TASKS = {"quick": (10_000, 30_000), "full": (10_000, 30_000, 100_000)}
CHURN_TASKS = {"quick": 100_000, "full": 1_000_000}
TRACED_TASKS = {"quick": 10_000, "full": 20_000}


def measure_memory(
    script: Path,
    env: Mapping[str, str],
    source: Path | None,
    variants: Sequence[str],
    loops: Sequence[str],
    *,
    quick: bool,
) -> list[dict[str, Any]]:
    """One fresh process per (variant, loop kind): tracemalloc bytes of N pending tasks, then
    the churn workload for many tasks with the state before and after. Allocation counts do not
    drift with the machine's load the way times do, so one process each is enough."""
    mode = "quick" if quick else "full"
    pending = " / ".join(f"{n:,}" for n in LIVE_TASKS[mode])
    log(
        f"memory: {pending} pending tasks, {CHURN_TASKS[mode]:,} churned"
        f" (+2 x {TRACED_TASKS[mode]:,} traced) per variant and loop"
    )
    rows: list[dict[str, Any]] = []
    for k in loops:
        for v in variants:
            spec = {
                "kind": "memory",
                "variant": v,
                "loop": k,
                "live_tasks": list(LIVE_TASKS[mode]),
                "churn_tasks": CHURN_TASKS[mode],
                "traced_tasks": TRACED_TASKS[mode],
            }
            result = run_worker(script, spec, env, source)
            rows.append({"variant": v, "loop": k, "live": result["live"], "churn": result["churn"]})
    return rows


# --------------------------------------------------------------------------------------------
# The run and its report
# --------------------------------------------------------------------------------------------


@dataclass(slots=True)
class Results:
    meta: dict[str, Any]
    workloads: list[str]
    loops: list[str]
    variants: list[str]
    cells: dict[tuple[str, str, str], Cell]
    startup: list[StartupRow]
    memory: list[dict[str, Any]] = field(default_factory=list)  # one per (variant, loop kind)
    probes: list[dict[str, Any]] = field(default_factory=list)  # one per (variant, loop kind)


def _git(*args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(REPO), *args], capture_output=True, text=True, check=True
    ).stdout.strip()


def _git_state() -> str:
    try:
        head = _git("rev-parse", "--short=12", "HEAD")
        dirty = _git("status", "--porcelain", "--", "loopwatch")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{head} plus uncommitted changes in loopwatch/" if dirty else head


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _load() -> str:
    """The 1, 5 and 15 minute load averages: how busy the machine was besides this run."""
    try:
        return " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine_info(
    mode: str, rounds: int, warmup: int, repeats: int, loopwatch: str, target: Mapping[str, Any]
) -> dict[str, Any]:
    return {
        "load_start": _load(),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": target["python"],
        "executable": PYTHON,
        "loopwatch": loopwatch,
        "uvloop": target["versions"].get("uvloop") or "not installed",
        "mode": mode,
        "rounds": rounds,
        "warmup": warmup,
        "repeats": repeats,
    }


def run_all(args: argparse.Namespace) -> Results:
    with workspace(args.ref) as (script, source, description):
        return _run_all(args, script, child_env(source), source, description)


def _run_all(
    args: argparse.Namespace,
    script: Path,
    env: Mapping[str, str],
    source: Path | None,
    description: str,
) -> Results:
    mode = "quick" if args.quick else "full"
    rounds = args.rounds or (3 if args.quick else 12)
    warmup, repeats = 1, 3
    http_warmup, http_repeats, http_cap = HTTP_PLAN[mode]
    http_rounds = min(rounds, args.http_rounds or http_cap)
    target = interpreter_info(
        sorted({m for v in VARIANTS.values() for m in v.requires} | set(HTTP_MODULES) | {"uvloop"})
    )
    workloads = [w for w in args.workloads if _workload_runs(w, target)]
    variants = [BASELINE, *[v for v in args.variants if v != BASELINE]]
    for v in variants[:]:
        missing = [m for m in VARIANTS[v].requires if not target["importable"][m]]
        if missing:
            log(f"variant {v} skipped: {', '.join(missing)} not installed ({REQUIREMENTS_HINT})")
            variants.remove(v)
    loops = [k for k in args.loops if k != "uvloop" or target["importable"]["uvloop"]]
    if loops != args.loops:
        log("uvloop is not installed: its rows are skipped")
    cells = {(w, k, v): Cell(w, k, v) for w in workloads for k in loops for v in variants}
    started = time.monotonic()
    meta = machine_info(mode, rounds, warmup, repeats, description, target)
    meta["within"] = args.within
    meta["http"] = {
        "rounds": http_rounds,
        "warmup": http_warmup,
        "repeats": http_repeats,
        "seconds": WORKLOADS["http-aiohttp"].quick_size
        if args.quick
        else WORKLOADS["http-aiohttp"].full_size,
        "connections": HTTP_CONNECTIONS,
        "threads": HTTP_THREADS,
        "wrk": _wrk_version(),
        "packages": target["versions"],
    }
    log(f"loopwatch: {description}; Python {target['python']} ({PYTHON})")
    probes = [] if args.no_probe else run_probes(script, env, source, variants, loops)
    rng = random.Random(20240601)
    for r in range(rounds):
        for w in workloads:
            workload = WORKLOADS[w]
            if workload.http and r >= http_rounds:
                continue
            size = workload.quick_size if args.quick else workload.full_size
            for k in loops:
                # A B, then B A, ...: within a round both orders are used equally over the run.
                order = variants[:] if r % 2 == 0 else variants[::-1]
                if len(order) > 2:
                    rng.shuffle(order)
                for v in order:
                    scale = 1.0 if workload.http else VARIANTS[v].scale
                    spec = {
                        "workload": w,
                        "variant": v,
                        "loop": k,
                        "size": max(1, round(size * scale)),
                        "warmup": http_warmup if workload.http else warmup,
                        "repeats": http_repeats if workload.http else repeats,
                    }
                    result = run_worker(script, spec, env, source)
                    runs = [float(x) for x in result["runs"]]
                    cell = cells[(w, k, v)]
                    cell.runs.append(runs)
                    value = workload.within(runs, args.within)
                    cell.values.append(value)
                    cell.wakes.append(result.get("wakes_per_s"))
                    if result.get("latency"):
                        chosen = min(range(len(runs)), key=lambda i: abs(runs[i] - value))
                        cell.latency.append(result["latency"][chosen])
        log(f"round {r + 1}/{rounds} done ({time.monotonic() - started:.0f} s)")
    memory = (
        []
        if args.no_memory
        else measure_memory(script, env, source, variants, loops, quick=args.quick)
    )
    startup = (
        []
        if args.no_startup
        else measure_startup(
            env, wall_runs=20 if args.quick else 40, importtime_runs=5 if args.quick else 10
        )
    )
    if not args.no_startup:
        meta["pth_line_ns"] = pth_line_ns(env)
    meta["load_end"] = _load()
    meta["elapsed_s"] = round(time.monotonic() - started, 1)
    return Results(meta, workloads, loops, variants, cells, startup, memory, probes)


HTTP_MODULES = ("aiohttp", "uvicorn", "starlette")
REQUIREMENTS_HINT = "python -m pip install -r benchmarks/requirements.txt"


def _workload_runs(name: str, target: Mapping[str, Any]) -> bool:
    """Whether ``name`` can run here (an HTTP workload needs wrk and its server packages)."""
    if not WORKLOADS[name].http:
        return True
    needed = ("aiohttp",) if name == "http-aiohttp" else ("uvicorn", "starlette")
    missing = [m for m in needed if not target["importable"][m]]
    if missing:
        log(f"workload {name} skipped: {', '.join(missing)} not installed ({REQUIREMENTS_HINT})")
        return False
    if shutil.which("wrk") is None:
        log(f"workload {name} skipped: wrk, the load generator, is not installed: {WRK_INSTALL}")
        return False
    return True


def _wrk_version() -> str:
    if shutil.which("wrk") is None:
        return "not installed"
    done = subprocess.run(["wrk", "--version"], capture_output=True, text=True, check=False)
    return (done.stdout or done.stderr).split("\n")[0].strip() or "unknown"


INTERPRETER_QUERY = """
import importlib.metadata, importlib.util, json, platform, sys
def ok(m):
    try:
        return importlib.util.find_spec(m) is not None
    except ModuleNotFoundError:
        return False
def version(d):
    try:
        return importlib.metadata.version(d)
    except importlib.metadata.PackageNotFoundError:
        return None
names = sys.argv[1:]
print(json.dumps({
    "python": f"{platform.python_implementation()} {platform.python_version()}",
    "importable": {m: ok(m) for m in names},
    "versions": {d: version(d) for d in ("uvloop", "aiohttp", "uvicorn", "starlette", "httptools",
        "aiodebug", "pyleak", "opentelemetry-instrumentation-asyncio", "opentelemetry-sdk")},
}))
"""


def interpreter_info(modules: Sequence[str]) -> dict[str, Any]:
    """The Python that runs the workers (``--python``): its version, which of ``modules`` it
    can import, and the versions of the packages the benchmark drives."""
    done = subprocess.run(
        [PYTHON, "-c", INTERPRETER_QUERY, *modules], capture_output=True, text=True, check=True
    )
    info: dict[str, Any] = json.loads(done.stdout)
    return info


def run_probes(
    script: Path,
    env: Mapping[str, str],
    source: Path | None,
    variants: Sequence[str],
    loops: Sequence[str],
) -> list[dict[str, Any]]:
    """One process per (variant, loop kind), the thresholds lowered: does the variant report a
    callback that blocked past the slow-callback threshold, and a loop still blocked past the
    stall threshold while it is?"""
    probed = [v for v in variants if VARIANTS[v].group in ("loopwatch", "alternative")]
    log(f"probe: what {len(probed)} variants detect, on {len(loops)} loops")
    rows = []
    for k in loops:
        for v in probed:
            result = run_worker(script, {"kind": "probe", "variant": v, "loop": k}, env, source)
            rows.append({"variant": v, "loop": k, **{x: result[x] for x in PROBE_KEYS}})
    return rows


PROBE_KEYS = ("slow", "slow_block_stalls", "stall_while_blocked", "otel_coroutines")


def _num(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:,.2f}"


def _pct(value: float) -> str:
    return f"{value:+.1f}%"


def _ns(value: float) -> str:
    return f"{value:+,.0f} ns" if abs(value) >= 10 else f"{value:+,.1f} ns"


def _sure(low: float, high: float, limit: float) -> str:
    if high <= limit or low > limit:
        return "clearly: the whole interval is on this side"
    return "not clearly: the interval straddles the budget, more rounds would tell"


def _speed_budget_line(results: Results, budget: Budget, k: str) -> tuple[bool, str]:
    workload = WORKLOADS[budget.workload]
    cell = results.cells[(budget.workload, k, budget.variant)]
    base = results.cells[(budget.workload, k, budget.reference)]
    c = compare(workload, cell, base)
    a = added_ns(workload, cell, base)
    pair = f"`{budget.variant}` vs `{budget.reference}`"
    head = f"{budget.what} ({pair}) on {budget.workload}, {k}:"
    if budget.unit == "fewer":
        lost = [(1.0 - v / b) * 100.0 for v, b in zip(cell.values, base.values, strict=True)]
        low, high, level = median_interval(lost)
        loss = (1.0 - cell.median / base.median) * 100.0
        met = loss <= budget.limit
        return met, (
            f"**{'met' if met else 'MISSED'}**: {head}"
            + (f" {loss:.2f}% fewer" if loss >= 0 else f" {-loss:.2f}% more")
            + f" {workload.unit}"
            f" ({_num(cell.median)} vs {_num(base.median)}); budget <= {budget.limit:g}% fewer,"
            f" {'by' if met else 'over by'} {abs(budget.limit - loss):.2f} points; paired"
            f" {statistics.median(lost):.2f}%, {level:.0%} CI {low:.1f}% to {high:.1f}%;"
            f" {_sure(low, high, budget.limit)}"
        )
    if budget.unit == "%":
        met = c.overhead <= budget.limit
        margin = budget.limit - c.overhead
        return met, (
            f"**{'met' if met else 'MISSED'}**: {head} {c.overhead:+.2f}%"
            f" ({_ns(a.ns)} per {workload.operation}); budget <= {budget.limit:g}%,"
            f" {'by' if met else 'over by'} {abs(margin):.2f} points; paired {c.paired:+.2f}%,"
            f" {c.ci_level:.0%} CI {_pct(c.ci_low)} to {_pct(c.ci_high)};"
            f" {_sure(c.ci_low, c.ci_high, budget.limit)}"
        )
    figure = (
        f"{_ns(a.ns)} per {workload.operation} ({c.overhead:+.1f}%); paired {_ns(a.paired)},"
        f" {a.ci_level:.0%} CI {_ns(a.ci_low)} to {_ns(a.ci_high)}"
    )
    if budget.limit == 0.0:
        # "Nothing added": a cost is only claimed when the whole interval is above zero.
        met = a.ci_low <= 0.0
        why = (
            "the interval includes 0, so no cost is detectable at this noise"
            if met
            else "the whole interval is above 0"
        )
        verdict = "met" if met else "MISSED"
        return met, f"**{verdict}**: {head} {figure}; budget: nothing detectable; {why}"
    met = a.ns <= budget.limit
    margin = budget.limit - a.ns
    return met, (
        f"**{'met' if met else 'MISSED'}**: {head} {figure}; budget <= {budget.limit:,.0f} ns,"
        f" {'by' if met else 'over by'} {abs(margin):,.0f} ns;"
        f" {_sure(a.ci_low, a.ci_high, budget.limit)}"
    )


def _memory_row(results: Results, variant: str, k: str) -> dict[str, Any] | None:
    for row in results.memory:
        if row["variant"] == variant and row["loop"] == k:
            return row
    return None


def live_task_bytes(results: Results, variant: str, k: str) -> list[tuple[int, float]]:
    """(N, traced bytes per pending task that ``variant`` adds to the plain loop of the same
    kind), for each N measured; empty if either was not measured."""
    row, base = _memory_row(results, variant, k), _memory_row(results, BASELINE, k)
    if row is None or base is None:
        return []
    plain = {m["tasks"]: float(m["bytes_per_task"]) for m in base["live"]}
    return [
        (m["tasks"], float(m["bytes_per_task"]) - plain[m["tasks"]])
        for m in row["live"]
        if m["tasks"] in plain
    ]


def _bytes_range(added: list[tuple[int, float]]) -> str:
    low, high = min(b for _, b in added), max(b for _, b in added)
    return f"{low:+,.0f}" if round(low) == round(high) else f"{low:+,.0f} to {high:+,.0f}"


def _memory_budget_lines(results: Results) -> list[tuple[bool, str]]:
    lines: list[tuple[bool, str]] = []
    for k in results.loops:
        for v in LIVE_TASK_BUDGETED:
            added = live_task_bytes(results, v, k)
            if not added:
                continue
            worst = max(b for _, b in added)
            met = worst < LIVE_TASK_BUDGET
            margin = LIVE_TASK_BUDGET - worst
            counts = " / ".join(f"{n:,}" for n, _ in added)
            lines.append(
                (
                    met,
                    f"**{'met' if met else 'MISSED'}**: loopwatch state per live task"
                    f" (`{v}` vs `off`), {k}: {_bytes_range(added)} bytes at {counts} pending"
                    f" tasks; budget < {LIVE_TASK_BUDGET:,.0f} bytes (judged on the largest),"
                    f" {'by' if met else 'over by'} {abs(margin):,.0f} bytes",
                )
            )
    for row in results.memory:
        churn = row["churn"]
        before, after = churn["before"]["tracked"], churn["after"]["tracked"]
        if before is None or after is None:
            continue
        base = _memory_row(results, BASELINE, row["loop"])
        blocks = churn["after"]["blocks"] - churn["before"]["blocks"]
        base_blocks = (
            base["churn"]["after"]["blocks"] - base["churn"]["before"]["blocks"]
            if base is not None
            else None
        )
        # A leak of one object per task would be `tasks` blocks; allow one per 100 tasks of noise.
        met = after == before and blocks < churn["tasks"] / 100
        lines.append(
            (
                met,
                f"**{'met' if met else 'MISSED'}**: state after {churn['tasks']:,} tasks created"
                f" and finished (`{row['variant']}`), {row['loop']}: tracked entries"
                f" {before['entries']} -> {after['entries']}, coroutine table rows"
                f" {before['rows']} -> {after['rows']}, live Python blocks {blocks:+,}"
                + (f" (`off`: {base_blocks:+,})" if base_blocks is not None else "")
                + "; budget: back to the starting size",
            )
        )
    return lines


def _startup_budget_lines(results: Results) -> list[tuple[bool, str]]:
    lines: list[tuple[bool, str]] = []
    pth = results.meta.get("pth_line_ns")
    for row in results.startup:
        if row.setting != "unset":
            continue
        cumulative = statistics.median(row.cumulative_us)
        met = cumulative < 1000 and not row.modules
        extra = f"; the `.pth` line itself {pth:,.0f} ns" if pth is not None and not lines else ""
        lines.append(
            (
                met,
                f"**{'met' if met else 'MISSED'}**: start-up with LOOPWATCH unset,"
                f' `python -c "{row.snippet}"`: {len(row.modules)} loopwatch modules,'
                f" {cumulative:,.0f} us of loopwatch import (budget < 1 ms, 0 modules){extra}",
            )
        )
    return lines


def budget_lines(results: Results) -> list[tuple[bool, str]]:
    lines: list[tuple[bool, str]] = []
    for budget in BUDGETS:
        if (
            budget.variant not in results.variants
            or budget.reference not in results.variants
            or budget.workload not in results.workloads
        ):
            continue
        lines += [
            _speed_budget_line(results, budget, k) for k in results.loops if k in budget.loops
        ]
    lines += _memory_budget_lines(results)
    lines += _startup_budget_lines(results)
    return lines


def _wakes(cell: Cell) -> str:
    known = [w for w in cell.wakes if w is not None]
    return f"{statistics.median(known):.1f}" if known else ""


def render_markdown(results: Results) -> str:
    m = results.meta
    out = [
        "# loopwatch benchmarks",
        "",
        f"- Date: {m['date']}",
        f"- Machine: {m['cpu_count']} CPUs ({m['cpu']}), {m['platform']}",
        f"- Python: {m['python']} ({m['executable']})",
        f"- loopwatch {m['loopwatch']}; uvloop {m['uvloop']}",
        f"- Mode: {m['mode']}: {m['rounds']} rounds; each value is one fresh process"
        f" ({m['warmup']} warm-up run, {WITHIN[m.get('within', 'median')]} of {m['repeats']}"
        " timed runs); variants interleaved"
        f" within each round; {m['elapsed_s']} s in all",
        f"- Load average (1 / 5 / 15 min) at the start {m.get('load_start', '?')}, at the end"
        f" {m.get('load_end', '?')}, with {m['cpu_count']} CPUs: above 1 means something else"
        " was running, and the noise grows",
        "",
        "## Budgets",
        "",
    ]
    out += [f"- {text}" for _, text in budget_lines(results)] or ["- (no budgeted pair was run)"]
    out += render_increments(results)
    out += render_alternatives(results)
    out += render_http(results)
    out += render_probes(results)
    out += [
        "",
        "## Overhead",
        "",
        "`median` and its spread (IQR from 5 rounds on, else min to max) are over the rounds."
        " `vs off` is the variant's median over the `off` median of the same loop, in the"
        " workload's unit; `overhead` is the extra time per operation that implies (positive:"
        " slower). `paired` is the median of the overhead computed within each round (against"
        " the `off` run next to it in time), with a distribution-free confidence interval for"
        " that median: the uncertainty of the overhead. `wakes/s`: how often the watchdog"
        " thread (or the control's thread) woke during the timed runs, median over the rounds"
        " (from its voluntary context switches).",
        "",
        "| workload | loop | variant | median | spread of rounds | vs off | overhead"
        " | paired (CI) | wakes/s |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for w in results.workloads:
        workload = WORKLOADS[w]
        for k in results.loops:
            base = results.cells[(w, k, BASELINE)]
            for v in results.variants:
                cell = results.cells[(w, k, v)]
                low, high, kind = spread(cell.values)
                rel = (high - low) / cell.median * 100.0
                row = [
                    w,
                    k,
                    v,
                    f"{_num(cell.median)} {workload.unit}",
                    f"{_num(low)} - {_num(high)} ({kind}, {rel:.1f}%)",
                ]
                if v == BASELINE:
                    row += ["1", "", ""]
                else:
                    c = compare(workload, cell, base)
                    row += [
                        f"{c.ratio:.3f}",
                        _pct(c.overhead),
                        f"{_pct(c.paired)} ({c.ci_level:.0%}: {_pct(c.ci_low)} to"
                        f" {_pct(c.ci_high)})",
                    ]
                row.append(_wakes(cell))
                out.append("| " + " | ".join(row) + " |")
    out += ["", "Workloads:", ""]
    out += [f"- `{w}`: {WORKLOADS[w].doc}" for w in results.workloads]
    out += ["", "Variants:", ""]
    out += [f"- `{v}`: {VARIANTS[v].doc}" for v in results.variants]
    if results.memory:
        out += render_memory(results)
    if results.startup:
        out += render_startup(results.startup, results.meta.get("pth_line_ns"))
    return "\n".join(out) + "\n"


def shown_variants(results: Results) -> list[str]:
    """The variants of the summary table and the chart: loopwatch's and the alternatives."""
    return [
        v
        for v in results.variants
        if v != BASELINE and VARIANTS[v].group in ("loopwatch", "alternative")
    ]


def overhead_table(results: Results) -> tuple[list[tuple[str, str]], dict[str, list[float]]]:
    """(columns as (workload, loop)) and, per variant, its overhead vs `off` in each column:
    the extra time per operation in percent (for HTTP, the requests per second lost)."""
    columns = [(w, k) for w in results.workloads for k in results.loops]
    table: dict[str, list[float]] = {}
    for v in shown_variants(results):
        row = []
        for w, k in columns:
            cell, base = results.cells[(w, k, v)], results.cells[(w, k, BASELINE)]
            workload = WORKLOADS[w]
            if workload.http:
                row.append((1.0 - cell.median / base.median) * 100.0)
            else:
                row.append(compare(workload, cell, base).overhead)
        table[v] = row
    return columns, table


def render_alternatives(results: Results) -> list[str]:
    columns, table = overhead_table(results)
    if not table:
        return []
    out = [
        "",
        "## loopwatch next to the alternatives",
        "",
        "Overhead against the plain loop (`off`) of the same kind, from the medians over the"
        " rounds: the extra time per operation in percent, and for the HTTP services the"
        " requests per second lost, in percent. Lower is better; a negative value is noise"
        " (see the paired intervals in the overhead table below).",
        "",
        "| variant | " + " | ".join(f"{w}, {k}" for w, k in columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for v, row in table.items():
        out.append(f"| `{v}` | " + " | ".join(f"{x:+.1f}%" for x in row) + " |")
    inert = [
        f"- `{v}` on {k}: {why}."
        for v in table
        for k, why in VARIANTS[v].inert.items()
        if k in results.loops
    ]
    if inert:
        out += ["", *inert]
    return out


def _latency(cell: Cell, key: str) -> str:
    known = [x[key] for x in cell.latency if key in x]
    return f"{statistics.median(known):.2f} ms" if known else ""


def render_http(results: Results) -> list[str]:
    http = [w for w in results.workloads if WORKLOADS[w].http]
    if not http:
        return []
    plan = results.meta.get("http", {})
    out = [
        "",
        "## HTTP services",
        "",
        f"The server runs in the worker process on the variant's loop; wrk ({plan.get('wrk')})"
        f" loads it from another process with {plan.get('threads')} thread and"
        f" {plan.get('connections')} keep-alive connections for {plan.get('seconds')} s per"
        f" run, the same for every variant ({plan.get('warmup')} warm-up run and"
        f" {plan.get('repeats')} timed per process, {plan.get('rounds')} interleaved rounds)."
        " Requests per second: median over the rounds; latency percentiles: wrk's, of the"
        " same runs, median over the rounds.",
        "",
        "| service | loop | variant | requests/s | vs off | p50 | p90 | p99 |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for w in http:
        for k in results.loops:
            base = results.cells[(w, k, BASELINE)]
            for v in results.variants:
                cell = results.cells[(w, k, v)]
                ratio = "1" if v == BASELINE else f"{cell.median / base.median:.3f}"
                out.append(
                    f"| {w} | {k} | {v} | {_num(cell.median)} | {ratio}"
                    f" | {_latency(cell, 'p50')} | {_latency(cell, 'p90')}"
                    f" | {_latency(cell, 'p99')} |"
                )
    versions = plan.get("packages", {})
    if versions:
        names = ", ".join(f"{d} {versions[d]}" for d in versions if versions[d])
        out += ["", f"Packages: {names}."]
    return out


def _probe_word(value: int | None) -> str:
    if value is None:
        return "not claimed"
    return "yes" if value > 0 else "**no**"


def render_probes(results: Results) -> list[str]:
    if not results.probes:
        return []
    slow, stall = PROBE_THRESHOLDS["slow"] * 1000, PROBE_THRESHOLDS["stall"] * 1000
    out = [
        "",
        "## What each variant detects",
        "",
        "The probe, run before the rounds in a process of its own per variant and loop, with the"
        f" thresholds lowered to {slow:.0f} ms (slow callback) and {stall:.0f} ms (stall): a"
        f" task step that blocks the loop for {PROBE_SLOW_BLOCK * 1000:.0f} ms, then one that"
        f" blocks it for {PROBE_STALL_BLOCK * 1000:.0f} ms. `slow callback`: reported once the"
        " first block ended (loopwatch's `slow_callback` counter, debug mode's and aiodebug's"
        " warnings); `stall, while blocked`: reported while the second block was still going"
        f" on (sampled {PROBE_STALL_BLOCK * 900:.0f} ms into it: loopwatch's `loop_stalled`"
        " counter, aiodebug's stack files, pyleak's blocks). pyleak has one threshold, and"
        " reports a block while it lasts. OpenTelemetry detects no blocking: its row shows"
        " that it counted the probe's coroutines.",
        "",
        "| variant | loop | slow callback | stall, while blocked | note |",
        "|---|---|---|---|---|",
    ]
    for row in results.probes:
        v, k = row["variant"], row["loop"]
        note = VARIANTS[v].inert.get(k, "") if v in VARIANTS else ""
        if row.get("otel_coroutines") is not None:
            note = f"counted {row['otel_coroutines']} coroutine(s) of the probe"
        if v == "pyleak":
            slow_word = _probe_word(row.get("slow_block_stalls"))
        else:
            slow_word = _probe_word(row.get("slow"))
        out.append(
            f"| `{v}` | {k} | {slow_word} | {_probe_word(row.get('stall_while_blocked'))}"
            f" | {note} |"
        )
    return out


def render_increments(results: Results) -> list[str]:
    pairs = [
        (v, ref, what)
        for v, ref, what in INCREMENTS
        if v in results.variants and ref in results.variants
    ]
    if not pairs:
        return []
    out = [
        "",
        "## Per-unit costs",
        "",
        "What each feature adds, in nanoseconds per operation (ns): the variant's median time per"
        " operation minus that of the variant it adds to, and in brackets the confidence"
        " interval of the same difference taken within each round. On `sleep0` an operation is"
        " one task step; on `churn`, one task created (and run, and gathered); on `echo` and"
        " `pingpong`, one round trip (several task steps).",
        "",
        "| adds | variant vs | loop | "
        + " | ".join(f"{w} (ns per {WORKLOADS[w].operation})" for w in results.workloads)
        + " |",
        "|---|---|---|" + "---:|" * len(results.workloads),
    ]
    for v, ref, what in pairs:
        for k in results.loops:
            cells = []
            for w in results.workloads:
                a = added_ns(WORKLOADS[w], results.cells[(w, k, v)], results.cells[(w, k, ref)])
                cells.append(f"{a.ns:+,.0f} ({a.ci_low:+,.0f} to {a.ci_high:+,.0f})")
            out.append(f"| {what} | `{v}` vs `{ref}` | {k} | " + " | ".join(cells) + " |")
    if results.memory:
        out += ["", "Memory, from the section below:", ""]
        for k in results.loops:
            parts = []
            for v in results.variants:
                added = live_task_bytes(results, v, k)
                if v != BASELINE and added:
                    parts.append(f"`{v}` {_bytes_range(added)}")
            out.append(f"- bytes per live task over the plain loop, {k}: " + ", ".join(parts))
        for k in results.loops:
            parts = []
            for v in results.variants:
                row = _memory_row(results, v, k)
                if row is None:
                    continue
                churn = row["churn"]
                blocks = churn["after"]["blocks"] - churn["before"]["blocks"]
                tracked = churn["after"]["tracked"]
                entries = f", {tracked['entries']} entries" if tracked else ""
                parts.append(f"`{v}` {blocks:+,} blocks{entries}")
            out.append(
                f"- after {results.memory[0]['churn']['tasks']:,} tasks churned, {k}: "
                + ", ".join(parts)
            )
    return out


def _mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value / 1048576:+.2f} MiB"


def render_memory(results: Results) -> list[str]:
    first = results.memory[0]
    counts = [m["tasks"] for m in first["live"]]
    churn_n, traced_n = first["churn"]["tasks"], first["churn"]["traced_tasks"]
    out = [
        "",
        "## Memory",
        "",
        "Per live task: N tasks created and left pending on one future, measured with"
        " tracemalloc (every allocation of the interpreter, C and Python: the tasks, their"
        " coroutines, loopwatch's entries and proxies), in bytes per task; `+` is the difference"
        " to the plain loop of the same kind at the same N: what loopwatch keeps for each live"
        " task. Its live-task dict is part of that, and its share per task depends on where N"
        " falls between two resizes of the dict, hence several N.",
        "",
        "| loop | variant | "
        + " | ".join(f"N = {n:,}" for n in counts)
        + " | tracked entries (largest N) |",
        "|---|---|" + "---:|" * (len(counts) + 1),
    ]
    for row in results.memory:
        added = dict(live_task_bytes(results, row["variant"], row["loop"]))
        cells = []
        for m in row["live"]:
            extra = "" if row["variant"] == BASELINE else f" ({added[m['tasks']]:+,.0f})"
            cells.append(f"{m['bytes_per_task']:,.0f}{extra}")
        tracked = row["live"][-1]["tracked"]
        out.append(
            f"| {row['loop']} | {row['variant']} | "
            + " | ".join(cells)
            + f" | {tracked['entries'] if tracked else ''} |"
        )
    out += [
        "",
        f"After churn: {churn_n:,} tasks created and finished (the `churn` workload, after a"
        " warm-up of 10,000), with the state before and after: loopwatch's tracked entries"
        " (`tracker_of(loop).active`) and coroutine table rows, the interpreter's live blocks"
        " (`sys.getallocatedblocks()`; a leak of one object per task would be"
        f" +{churn_n:,}) and the RSS; then, under tracemalloc, the traced bytes still allocated"
        f" after {traced_n:,} more tasks, counted from after a first {traced_n:,} (so that"
        " tables reallocated as they are reused count on both sides).",
        "",
        "| loop | variant | entries | table rows | live blocks | RSS | traced after"
        f" {traced_n:,} more | ns/task |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in results.memory:
        churn = row["churn"]
        before, after = churn["before"], churn["after"]
        tb, ta = before["tracked"], after["tracked"]
        rss = (
            after["rss"] - before["rss"]
            if after["rss"] is not None and before["rss"] is not None
            else None
        )
        entries = f"{tb['entries']} -> {ta['entries']}" if tb and ta else ""
        rows = f"{tb['rows']} -> {ta['rows']}" if tb and ta else ""
        out.append(
            f"| {row['loop']} | {row['variant']} | {entries} | {rows}"
            f" | {after['blocks'] - before['blocks']:+,} | {_mib(rss)}"
            f" | {churn['traced_growth']:+,} B"
            f" | {churn['seconds'] * 1e9 / churn['tasks']:,.0f} |"
        )
    return out


def render_startup(rows: list[StartupRow], pth_ns: float | None = None) -> list[str]:
    out = [
        "",
        "## Start-up",
        "",
        f"Wall time of a whole `python -c ...` process (median, IQR over {len(rows[0].wall_ms)}"
        " interleaved runs) and, from `python -X importtime`, the import time of loopwatch's own"
        " modules (`self`) and of everything the outermost loopwatch imports pulled in"
        f" (`cumulative`), median of {len(rows[0].self_us)} runs.",
        "",
        "| command | LOOPWATCH | wall time | loopwatch self | loopwatch cumulative |",
        "|---|---|---:|---:|---:|",
    ]
    walls: dict[tuple[str, str], float] = {}
    for row in rows:
        q1, q3, _ = spread(row.wall_ms)
        wall = walls[(row.snippet, row.setting)] = statistics.median(row.wall_ms)
        out.append(
            f'| `python -c "{row.snippet}"` | {row.setting} | {wall:.1f} ms ({q1:.1f} - {q3:.1f})'
            f" | {statistics.median(row.self_us):,.0f} us"
            f" | {statistics.median(row.cumulative_us):,.0f} us |"
        )
    out.append("")
    if pth_ns is not None:
        out.append(
            f"- With LOOPWATCH unset, loopwatch's whole start-up cost is the `loopwatch.pth` line"
            f" reading `os.environ`: {pth_ns:,.0f} ns per interpreter (timeit, best of 5)."
        )
    for snippet in STARTUP_SNIPPETS:
        if (snippet, "unset") not in walls or (snippet, "1") not in walls:
            continue
        base, on = walls[(snippet, "unset")], walls[(snippet, "1")]
        out.append(
            f'- `python -c "{snippet}"`: LOOPWATCH=1 costs {on - base:+.1f} ms'
            f" ({(on / base - 1.0) * 100.0:+.1f}%) over LOOPWATCH unset."
        )
    for row in rows:
        if row.modules:
            names = ", ".join(f"`{n}`" for n in row.modules)
            out.append(f"- Imported by `{row.snippet}` with LOOPWATCH={row.setting}: {names}.")
        elif row.setting == "unset":
            out.append(f"- `{row.snippet}` with LOOPWATCH unset imports no loopwatch module.")
    return out


def results_json(results: Results) -> dict[str, Any]:
    return {
        "meta": results.meta,
        "budgets": [{"met": met, "text": text} for met, text in budget_lines(results)],
        "cells": [
            {
                "workload": c.workload,
                "loop": c.loop,
                "variant": c.variant,
                "unit": WORKLOADS[c.workload].unit,
                "values": c.values,
                "runs": c.runs,
                "median": c.median,
                "wakes_per_s": c.wakes,
                "latency": c.latency,
            }
            for c in results.cells.values()
        ],
        "memory": results.memory,
        "probes": results.probes,
        "startup": [
            {
                "snippet": r.snippet,
                "loopwatch": r.setting,
                "wall_ms": r.wall_ms,
                "self_us": r.self_us,
                "cumulative_us": r.cumulative_us,
                "modules": r.modules,
            }
            for r in results.startup
        ],
    }


def results_from_json(data: Mapping[str, Any], within: str | None = None) -> Results:
    """The inverse of :func:`results_json`, to render a saved run again (``--report``), with
    each process's value taken from its runs again if ``within`` says how."""
    meta = dict(data["meta"])
    cells: dict[tuple[str, str, str], Cell] = {}
    for c in data["cells"]:
        runs = [[float(x) for x in r] for r in c.get("runs", [])]
        values = [float(v) for v in c["values"]]
        if within is not None and runs:
            values = [WORKLOADS[c["workload"]].within(r, within) for r in runs]
            meta["within"] = within
        cells[(c["workload"], c["loop"], c["variant"])] = Cell(
            c["workload"],
            c["loop"],
            c["variant"],
            values,
            list(c.get("wakes_per_s", [])),
            runs,
            list(c.get("latency", [])),
        )
    startup = [
        StartupRow(
            r["snippet"],
            r["loopwatch"],
            r["wall_ms"],
            r["self_us"],
            r["cumulative_us"],
            r["modules"],
        )
        for r in data["startup"]
    ]
    return Results(
        meta=meta,
        workloads=list(dict.fromkeys(w for w, _, _ in cells)),
        loops=list(dict.fromkeys(k for _, k, _ in cells)),
        variants=list(dict.fromkeys(v for _, _, v in cells)),
        cells=cells,
        startup=startup,
        # Runs saved before several N were measured per live task have one dict there.
        memory=[
            {**row, "live": row["live"] if isinstance(row["live"], list) else [row["live"]]}
            for row in data.get("memory", [])
        ],
        probes=list(data.get("probes", [])),
    )


# --------------------------------------------------------------------------------------------
# The documentation page and its chart
# --------------------------------------------------------------------------------------------

DOCS_COMMAND = (
    "python benchmarks/bench.py --ref HEAD --json benchmarks/results/full.json"
    " --docs docs/benchmarks.md"
)


def write_chart(results: Results, path: Path) -> bool:
    """Horizontal bars: each variant's overhead vs `off` per workload, one panel per loop kind.
    Values beyond the axis are clipped and written at the bar's end. False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log(f"matplotlib is not installed: no chart ({REQUIREMENTS_HINT})")
        return False
    columns, table = overhead_table(results)
    variants = list(table)
    limit = 60.0
    fig, axes = plt.subplots(
        1,
        len(results.loops),
        figsize=(6.5 * len(results.loops), 1.5 + 0.13 * len(variants) * len(results.workloads)),
        sharey=True,
        squeeze=False,
    )
    colors = plt.get_cmap("tab10")
    height = 0.8 / max(1, len(variants))
    for ax, k in zip(axes[0], results.loops, strict=True):
        for j, v in enumerate(variants):
            ys, xs = [], []
            for i, w in enumerate(results.workloads):
                x = table[v][columns.index((w, k))]
                ys.append(i + j * height)
                xs.append(max(-limit / 6, min(x, limit)))
                if x > limit:
                    ax.text(limit, i + j * height, f" {x:+.0f}%", va="center", fontsize=7)
                elif x < -limit / 6:
                    ax.text(0, i + j * height, f" {x:+.0f}%", va="center", fontsize=7)
            ax.barh(ys, xs, height=height, color=colors(j % 10), label=v)
        ax.axvline(0, color="black", linewidth=0.6)
        for budget in (2.0, 5.0):
            ax.axvline(budget, color="grey", linewidth=0.5, linestyle=":")
        ax.set_xlim(-limit / 6, limit * 1.25)
        ax.set_title(k)
        ax.set_xlabel("overhead vs off, % (HTTP: requests/s lost)")
        ax.set_yticks([i + 0.4 - height / 2 for i in range(len(results.workloads))])
        ax.set_yticklabels(results.workloads)
        ax.invert_yaxis()
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=len(variants))
    m = results.meta
    fig.suptitle(f"loopwatch and alternatives, {m['python']}, {m['mode']} run {m['date']}")
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


MISSED_NOTES = HERE.parent / "missed-budgets.md"
# The in-process paired figures (inprocess.py --report, with a few lines on how they were taken),
# which judge the default settings' budgets: placed before this run's own budget lines.
INPROCESS_NOTES = HERE.parent / "results-inprocess.md"


def write_docs(results: Results, others: Sequence[Results], page: Path) -> None:
    """docs/benchmarks.md: how the page was made, the budgets, the chart, the tables; with
    ``others`` (runs on other Pythons), a cross-Python summary of their budget lines."""
    chart = page.parent / "assets" / "benchmarks.png"
    has_chart = write_chart(results, chart)
    m = results.meta
    quick = m["mode"] == "quick"
    out = ["# Benchmarks", ""]
    if quick:
        out += [
            "> **A quick run.** These figures come from `--quick` (few rounds, short runs) on a"
            " shared machine"
            " while loopwatch was still being changed: a smoke test of the harness, not results"
            f" to quote. The full run replaces them: `{DOCS_COMMAND}`.",
            "",
        ]
    out += [
        "What loopwatch costs a program, next to what users would otherwise run, on stock"
        " asyncio and on uvloop. Every figure is a ratio to the same loop unwatched; the"
        " absolute rates are only there to make the ratios checkable. The harness,"
        " `benchmarks/bench.py`, and how to read each column are described in"
        " `benchmarks/README.md`. Regenerate this page with:",
        "",
        "```sh",
        "python -m pip install -r benchmarks/requirements.txt   # and: apt-get install -y wrk",
        DOCS_COMMAND,
        "```",
        "",
    ]
    report = render_markdown(results).splitlines()
    body = report[1:]  # the report without its title
    if has_chart:
        split = next(
            (i for i, line in enumerate(body) if line == "## loopwatch next to the alternatives"),
            None,
        )
        picture = [
            "![Overhead of each variant against the plain loop, per workload, on asyncio and"
            " uvloop](assets/benchmarks.png)",
            "",
        ]
        if split is not None:
            body = body[: split + 2] + picture + body[split + 2 :]
    if INPROCESS_NOTES.exists():
        at = next((i for i, line in enumerate(body) if line == "## Budgets"), 0)
        body = [*body[:at], *INPROCESS_NOTES.read_text().rstrip().splitlines(), "", *body[at:]]
    if MISSED_NOTES.exists():
        # What a missed budget would take: written by hand after reading a run, kept beside
        # this script, and placed right after the budget lines.
        at = next((i for i, line in enumerate(body) if line == "## Per-unit costs"), len(body))
        body = [*body[:at], *MISSED_NOTES.read_text().rstrip().splitlines(), "", *body[at:]]
    out += body
    for other in others:
        o = other.meta
        out += [
            "",
            f"## {o['python']}",
            "",
            f"The same harness with `--python` on {o['python']} ({o['mode']} run, {o['date']},"
            f" {o['rounds']} rounds): its budget lines.",
            "",
        ]
        out += [f"- {text}" for _, text in budget_lines(other)]
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text("\n".join(out).rstrip() + "\n")
    log(f"wrote {page}" + (f" and {chart}" if has_chart else ""))


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _names(known: Sequence[str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        names = [n.strip() for n in text.split(",") if n.strip()]
        unknown = [n for n in names if n not in known]
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(known)}")
        return names

    return parse


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="3 rounds (HTTP: 2), small sizes (~8 min on 2 cores; the default full run:"
        " 12 rounds, HTTP 6, ~45 min)",
    )
    parser.add_argument("--rounds", type=int, help="override the number of rounds")
    parser.add_argument(
        "--within",
        choices=list(WITHIN),
        help="each process's value from its timed runs: the fastest (best, the default: other"
        " programs on the machine only ever slow a run down) or the median; with --report, the"
        " run's own choice unless given",
    )
    parser.add_argument("--json", metavar="OUT", type=Path, help="write raw results as JSON")
    parser.add_argument("--markdown", metavar="FILE", type=Path, help="also write the table")
    parser.add_argument(
        "--workloads",
        type=_names(list(WORKLOADS)),
        default=list(DEFAULT_WORKLOADS),
        help=f"comma-separated, from {','.join(WORKLOADS)} (default {','.join(DEFAULT_WORKLOADS)})",
    )
    parser.add_argument(
        "--variants",
        type=_names(list(VARIANTS)),
        default=list(DEFAULT_VARIANTS),
        help=f"comma-separated, from {','.join(VARIANTS)} (default"
        f" {','.join(DEFAULT_VARIANTS)}; {BASELINE} is always run)",
    )
    parser.add_argument(
        "--ref",
        help="measure loopwatch as of this git ref (exported to a"
        " temporary directory) instead of the installed working tree",
    )
    parser.add_argument(
        "--loops",
        type=_names(list(LOOP_KINDS)),
        default=list(LOOP_KINDS),
        help="comma-separated subset of asyncio,uvloop",
    )
    parser.add_argument("--no-startup", action="store_true", help="skip the start-up section")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory section")
    parser.add_argument(
        "--report",
        metavar="JSON",
        type=Path,
        help="render a run saved with --json again instead of running anything",
    )
    parser.add_argument(
        "--python",
        metavar="PATH",
        help="run the workers and start-up measurements with this interpreter (another venv's"
        " python, with loopwatch installed) instead of this one",
    )
    parser.add_argument(
        "--http-rounds",
        type=int,
        help="rounds of the HTTP workloads (default: at most 2 with --quick, 6 otherwise)",
    )
    parser.add_argument(
        "--no-probe", action="store_true", help="skip the probe of what each variant detects"
    )
    parser.add_argument(
        "--docs",
        metavar="PAGE",
        type=Path,
        help="write the documentation page (e.g. docs/benchmarks.md) and its chart"
        " (assets/benchmarks.png next to it)",
    )
    parser.add_argument(
        "--also",
        metavar="JSON",
        type=Path,
        action="append",
        default=[],
        help="with --docs: runs saved with --json on other Pythons, for a cross-Python summary",
    )
    parser.add_argument("--worker", metavar="SPEC", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.python:
        global PYTHON  # one setting for the whole run
        PYTHON = str(Path(args.python).absolute())
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    if args.report:
        results = results_from_json(json.loads(args.report.read_text()), args.within)
    else:
        args.within = args.within or "best"
        results = run_all(args)
    text = render_markdown(results)
    sys.stdout.write(text)
    if args.markdown:
        args.markdown.write_text(text)
    if args.json:
        args.json.write_text(json.dumps(results_json(results), indent=2) + "\n")
    if args.docs:
        others = [results_from_json(json.loads(path.read_text())) for path in args.also]
        write_docs(results, others, args.docs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
