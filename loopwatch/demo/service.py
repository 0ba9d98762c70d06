"""A small HTTP service with seven classic asyncio mistakes, watched by loopwatch.

Run by ``loopwatch demo`` in a child process with ``LOOPWATCH=1``: the service itself contains no
loopwatch code at all, which is the point. A client thread sends real HTTP requests to it, one
endpoint per mistake, and the findings appear on standard output as they happen.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import sys
import threading
import time
import urllib.request

log = logging.getLogger("demo")
background: set[asyncio.Task[None]] = set()


# -- the mistakes ---------------------------------------------------------------------------


def render_report() -> bytes:
    # A synchronous call inside a handler (a sync HTTP client, a slow regex, a big JSON dump):
    # it holds the event loop, and every other request waits.
    time.sleep(0.3)
    return b"report ready\n"


def rebuild_index() -> bytes:
    # Far too long: long enough to be reported while it is still going on (a stall).
    time.sleep(1.5)
    return b"index rebuilt\n"


async def send_receipt(order: str) -> None:
    await asyncio.sleep(0.05)
    raise ConnectionError(f"mail server refused the receipt for {order}")


async def wait_for_payment(order: str) -> None:
    # Waits on a future that nobody holds or resolves.
    await asyncio.get_running_loop().create_future()


async def audit(order: str) -> None:
    await asyncio.sleep(0.01)


async def call_rates_api() -> bytes:
    await asyncio.sleep(0.3)  # a slow upstream
    return b"EUR 1.00\n"


async def fetch_rates() -> bytes:
    # "Retry on anything": the except clause also catches the CancelledError that the request's
    # timeout sends, so this task runs on, and the request waits for it: 0.5 s, not 0.2.
    for attempt in range(2):
        try:
            return await call_rates_api()
        except BaseException:  # noqa: BLE001 - the mistake on show
            log.warning("demo rates: attempt %d failed, retrying", attempt + 1)
    return await call_rates_api()


async def refresh_cache() -> None:
    while True:
        await asyncio.sleep(3600)


async def handle_path(path: bytes) -> bytes:
    if path == b"/report":
        return render_report()
    if path == b"/reindex":
        return rebuild_index()
    if path == b"/order":
        # Fire and forget: nobody awaits it, so its exception is never retrieved.
        asyncio.create_task(send_receipt("A-17"))  # noqa: RUF006
        return b"order placed\n"
    if path == b"/pay":
        # A task nobody keeps a reference to: the garbage collector may destroy it mid-work.
        asyncio.create_task(wait_for_payment("A-17"))  # noqa: RUF006
        await asyncio.sleep(0.05)
        gc.collect()
        return b"payment pending\n"
    if path == b"/audit":
        audit("A-17")  # type: ignore[unused-coroutine]  # forgot the await
        return b"audited\n"
    if path == b"/rates":
        # At most 0.2 s, says wait_for; fetch_rates swallows the cancellation it sends.
        rates = asyncio.create_task(fetch_rates())
        try:
            return await asyncio.wait_for(rates, 0.2)
        except TimeoutError:
            return b"rates: timed out\n"
    if path == b"/cache":
        # Started and never stopped: still pending when the service shuts down.
        task = asyncio.create_task(refresh_cache())
        background.add(task)
        return b"cache refresh started\n"
    return b"ok\n"


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    request_line = await reader.readline()
    while (await reader.readline()) not in (b"\r\n", b"\n", b""):
        pass
    path = request_line.split(b" ")[1] if request_line.count(b" ") >= 2 else b"/"
    body = await handle_path(path)
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body))
    writer.write(body)
    await writer.drain()
    writer.close()


# -- the demo around it ---------------------------------------------------------------------

STEPS = (
    ("/", "a fast request: nothing to report"),
    ("/report", "a handler that calls a blocking function for 0.3 s"),
    ("/reindex", "a handler that blocks for 1.5 s: reported while it still blocks"),
    ("/order", "a fire-and-forget task whose exception nobody retrieves"),
    ("/pay", "a task nobody holds, destroyed by the garbage collector"),
    ("/audit", "a coroutine called without await"),
    ("/rates", "a 0.2 s timeout whose cancellation a retry loop swallows: it takes 0.5 s"),
    ("/cache", "a background task never stopped: leaked at shutdown"),
)


def say(text: str) -> None:
    # One write per line: the watchdog thread logs at the same time, and print() writes the
    # text and the newline separately.
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def client(port: int, pause: float, metrics: str | None, done: threading.Event) -> None:
    try:
        for path, what in STEPS:
            time.sleep(pause)
            say(f"\n--- GET {path}: {what}")
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
                say(f"demo client: {resp.status} {resp.read().decode().strip()}")
        time.sleep(pause)
        if metrics:
            show_counters(metrics)
    finally:
        done.set()


def show_counters(url: str) -> None:
    # What a Prometheus server would scrape: the finding counters. The leak is still to come,
    # since it is found when the loop shuts down.
    say(f"\n--- GET {url}: the counters so far")
    with urllib.request.urlopen(url, timeout=10) as resp:
        text = resp.read().decode()
    for line in text.splitlines():
        name = line.split(" ")[0]
        if name.startswith("loopwatch_") and name.endswith("_total") and "{" not in name:
            say(line)


async def serve(pause: float) -> None:
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    loop_name = type(asyncio.get_running_loop()).__module__.split(".")[0]
    print(f"demo service: listening on http://127.0.0.1:{port} ({loop_name} loop)")
    metrics_port = os.environ.get("LOOPWATCH_METRICS_PORT")
    metrics = None
    if metrics_port and metrics_port != "0":
        metrics = f"http://127.0.0.1:{metrics_port}/metrics"
        print(f"demo service: loopwatch metrics at {metrics}")
    done = threading.Event()
    threading.Thread(target=client, args=(port, pause, metrics, done), daemon=True).start()
    async with server:
        while not done.is_set():
            await asyncio.sleep(0.05)
    say("\n--- shutting down: asyncio.run cancels what is still pending")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--uvloop", action="store_true")
    parser.add_argument("--pause", type=float, default=2.0, help="seconds between requests")
    args = parser.parse_args(argv)
    # Messages only: loopwatch's start with their event's name (loopwatch.slow_callback ...).
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    if args.uvloop:
        import uvloop  # an optional package (the uvloop extra)

        uvloop.run(serve(args.pause))
    else:
        asyncio.run(serve(args.pause))
    return 0


if __name__ == "__main__":
    # The .pth start-up hook does this in an installed environment; calling it again is a no-op,
    # and it keeps the demo working when run from a source checkout.
    from loopwatch._bootstrap import start

    start()
    raise SystemExit(main())
