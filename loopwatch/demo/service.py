"""A small HTTP service with a handler that blocks its event loop, watched by loopwatch.

Run by ``loopwatch demo`` in a child process with ``LOOPWATCH=1``: the service itself contains no
loopwatch code at all, which is the point. A client thread sends real HTTP requests to it.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import threading
import time
import urllib.request


def render_report() -> bytes:
    # A stand-in for a synchronous HTTP client, a slow regex or a big JSON dump: it holds the loop.
    time.sleep(0.25)
    return b"report ready\n"


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    request_line = await reader.readline()
    while (await reader.readline()) not in (b"\r\n", b"\n", b""):
        pass
    path = request_line.split(b" ")[1] if request_line.count(b" ") >= 2 else b"/"
    body = render_report() if path == b"/report" else b"ok\n"
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body))
    writer.write(body)
    await writer.drain()
    writer.close()


def client(port: int, requests: int, done: threading.Event) -> None:
    try:
        for i in range(requests):
            path = "/report" if i % 3 == 2 else "/"
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
                print(f"demo client: GET {path} -> {resp.status} {resp.read().decode().strip()}")
            time.sleep(0.1)
    finally:
        done.set()


async def serve(requests: int) -> None:
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    loop_name = type(asyncio.get_running_loop()).__module__.split(".")[0]
    print(f"demo service: listening on http://127.0.0.1:{port} ({loop_name} loop)")
    print("demo service: GET / answers at once; GET /report calls a blocking function")
    done = threading.Event()
    threading.Thread(target=client, args=(port, requests, done), daemon=True).start()
    async with server:
        while not done.is_set():
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)  # let the watchdog report the last block


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--uvloop", action="store_true")
    parser.add_argument("--requests", type=int, default=6)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stdout,
    )
    if args.uvloop:
        import uvloop

        uvloop.run(serve(args.requests))
    else:
        asyncio.run(serve(args.requests))
    return 0


if __name__ == "__main__":
    # The .pth start-up hook does this in an installed environment; calling it again is a no-op,
    # and it keeps the demo working when run from a source checkout.
    from loopwatch._bootstrap import start

    start()
    raise SystemExit(main())
