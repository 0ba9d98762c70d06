"""What route labelling costs per request, measured inside one process: a real Starlette app and a
real aiohttp application, each request served in a task of its own (as uvicorn and aiohttp serve
them) on a loop watched with the default settings, with the framework hooks as
``LOOPWATCH_ROUTES=0`` and as ``LOOPWATCH=1`` set them (``hook_frameworks(routes=False)`` /
``hook_frameworks(routes=True)``) in turns, many times; the median of the paired differences,
with a distribution-free interval. ``--tasks`` also measures what ``LOOPWATCH_ROUTES=0`` itself
adds on aiohttp from Python 3.12: its request tasks, made where no task factory sees them, tracked
and timed as every other task (no hook against ``hook_frameworks(routes=False)``).

The requests skip the network (the ASGI app is called with a scope; aiohttp's own RequestHandler
is given requests as bytes on a connection without a socket, ten pipelined at a time), so what
differs between the two sides of a pair is only the route: Starlette's routing-time label,
aiohttp's request carried by its task's proxy and its route read from its match when the task
ends, and the route's busy-time histogram. The budget (issue 18) is on
requests per second: labelling may cost at most 1% of a request. A served HTTP request costs far
more than the bare dispatch measured here (parsing, the socket, the response), so the report gives
the added time both per request and as a share of a served request's time (``--served-us``: the
time per request of ``benchmarks/bench.py``'s HTTP services with the default settings on the
2-core machine the benchmarks run on: 113 us for Starlette under uvicorn, 37 us for aiohttp, on
2026-12-01; they move with the machine, so measure them where you run this).

    python benchmarks/routes.py                       # both apps, both loops, 31 pairs
    python benchmarks/routes.py --pairs 61 --apps starlette --loops uvloop
    python benchmarks/routes.py --apps aiohttp --tasks  # and tracking aiohttp's request tasks
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lwbench.stats import median_interval

import loopwatch
from loopwatch import _api
from loopwatch.integrations._hooks import hook_frameworks, unhook_frameworks

REQUESTS = 400  # per turn


def starlette_app() -> Callable[[], Coroutine[Any, Any, None]]:
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    async def user(request: Any) -> PlainTextResponse:
        return PlainTextResponse(f"user {request.path_params['user_id']}")

    app = Starlette(routes=[Route("/users/{user_id}", user)])
    scope = {
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
    body = {"type": "http.request", "body": b"", "more_body": False}

    async def receive() -> dict[str, Any]:
        return body

    async def send(message: dict[str, Any]) -> None:
        pass

    def one() -> Coroutine[Any, Any, None]:
        return app(dict(scope), receive, send)

    return one


class Wire(asyncio.Transport):
    """A connection's transport without a socket: aiohttp's own RequestHandler writes into it;
    each response's status line counts one request served."""

    def __init__(self) -> None:
        super().__init__()
        self.served = 0
        self.wanted = 0
        self.done: asyncio.Future[None] | None = None

    def write(self, data: Any) -> None:
        if bytes(data[:9]) == b"HTTP/1.1 ":
            self.served += 1
            if self.served >= self.wanted and self.done is not None and not self.done.done():
                self.done.set_result(None)

    def writelines(self, data: Any) -> None:
        for chunk in data:
            self.write(chunk)

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def get_write_buffer_size(self) -> int:
        return 0

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def aiohttp_app() -> Callable[[], Coroutine[Any, Any, Any]]:
    from aiohttp import web

    async def user(request: web.Request) -> web.Response:
        return web.Response(text=f"user {request.match_info['user_id']}")

    app = web.Application()
    app.router.add_get("/users/{user_id}", user)
    batch = b"GET /users/7 HTTP/1.1\r\nHost: localhost\r\n\r\n" * 10
    state: dict[str, Any] = {}

    async def one() -> None:
        # Ten requests pipelined on one keep-alive connection of aiohttp's own RequestHandler
        # (the request tasks made as aiohttp makes them: eagerly, with no task factory, from
        # Python 3.12), the response parsed by nothing: a served request without the socket.
        if "protocol" not in state:
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            assert runner.server is not None
            state["runner"], state["protocol"], state["wire"] = runner, runner.server(), Wire()
            state["protocol"].connection_made(state["wire"])
        wire: Wire = state["wire"]
        wire.wanted = wire.served + 10
        wire.done = asyncio.get_running_loop().create_future()
        state["protocol"].data_received(batch)
        await wire.done

    async def close() -> None:
        if "protocol" in state:
            state["protocol"].connection_lost(None)
            await state["runner"].cleanup()

    one.close = close  # type: ignore[attr-defined]
    return one


PER_CALL = {"starlette": 1, "aiohttp": 10}  # requests served by one call of the app's one()
APPS = {"starlette": starlette_app, "aiohttp": aiohttp_app}


def new_loop(kind: str) -> asyncio.AbstractEventLoop:
    factory = loopwatch.new_uvloop_event_loop if kind == "uvloop" else loopwatch.new_event_loop
    return factory()


def turn(kind: str, app: str) -> float:
    """Seconds per request: REQUESTS requests, each in its own task, on a fresh watched loop."""
    one = APPS[app]()  # (made after hooking or unhooking: the hooks patch the classes)
    per_call = PER_CALL[app]

    async def serve() -> float:
        loop = asyncio.get_running_loop()
        for _ in range(20):  # warm-up
            await loop.create_task(one())
        start = time.perf_counter()
        for _ in range(REQUESTS // per_call):
            await loop.create_task(one())
        took = (time.perf_counter() - start) / REQUESTS
        close = getattr(one, "close", None)
        if close is not None:
            await close()
        return took

    loop = new_loop(kind)
    try:
        gc.collect()
        return loop.run_until_complete(serve())
    finally:
        loop.close()


def hook(side: bool | None) -> None:
    """None: no framework hook (what ``LOOPWATCH=1`` did before aiohttp's request tasks were
    tracked); False: ``LOOPWATCH_ROUTES=0`` (aiohttp's request tasks tracked from Python 3.12, no
    route); True: ``LOOPWATCH=1``'s default (routes)."""
    unhook_frameworks()
    if side is not None:
        hook_frameworks(routes=side)


def measure(
    app: str, kind: str, pairs: int, sides: tuple[bool | None, bool | None]
) -> tuple[float, float, float, float]:
    """(median seconds per request on the first side, median added by the second, interval low,
    high)."""
    plain: list[float] = []
    added: list[float] = []
    first, second = sides
    for i in range(pairs):
        took: dict[bool | None, float] = {}
        for side in sides if i % 2 == 0 else (second, first):
            hook(side)
            took[side] = turn(kind, app)
        unhook_frameworks()
        plain.append(took[first])
        added.append(took[second] - took[first])
    low, high, _ = median_interval(added)
    return statistics.median(plain), statistics.median(added), low, high


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=31)
    parser.add_argument("--apps", default="starlette,aiohttp")
    parser.add_argument("--loops", default="asyncio,uvloop")
    parser.add_argument(
        "--served-us",
        default="starlette=113,aiohttp=37",
        help="the time of a served request per app, APP=US,... or one US for both (default: "
        "bench.py's HTTP services with the default settings on the 2-core machine, 2026-12-01: "
        "8,831 and 26,866 requests/s)",
    )
    parser.add_argument(
        "--tasks",
        action="store_true",
        help="also measure what tracking aiohttp's request tasks costs (no hook against "
        "LOOPWATCH_ROUTES=0; nothing is hooked on Python 3.11, where the task factory sees them)",
    )
    args = parser.parse_args()
    if "=" in args.served_us:
        served = {k: float(v) for k, v in (p.split("=") for p in args.served_us.split(","))}
    else:
        served = dict.fromkeys(APPS, float(args.served_us))
    _api.activate(log="off")
    print(
        f"route labelling: Python {sys.version.split()[0]}, {args.pairs} pairs of "
        f"{REQUESTS} requests, LOOPWATCH_ROUTES=0 vs routes, loop watched with the default "
        "settings"
    )
    comparisons: list[tuple[str, tuple[bool | None, bool | None], float | None]] = [
        ("routes", (False, True), 1.0)
    ]
    if args.tasks:
        comparisons.append(("tasks", (None, False), None))
    for what, sides, budget in comparisons:
        for app in args.apps.split(","):
            if what == "tasks" and app != "aiohttp":
                continue
            for kind in args.loops.split(","):
                base, extra, low, high = measure(app, kind, args.pairs, sides)
                share = extra / (served[app] * 1e-6) * 100
                verdict = (
                    ""
                    if budget is None
                    else f" (budget <= {budget:g}%: {'met' if share <= budget else 'MISSED'})"
                )
                print(
                    f"{what:6} {app:10} {kind:8} {extra * 1e9:+7,.0f} ns per request "
                    f"(CI {low * 1e9:+,.0f} to {high * 1e9:+,.0f}) of {base * 1e9:,.0f} "
                    f"dispatched: {share:+.2f}% of a served request of {served[app]:.0f} us"
                    f"{verdict}"
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
