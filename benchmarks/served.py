"""What a setting costs a served HTTP request in machine instructions and cache misses: a real
aiohttp server (a hello-world handler, ``add_get("/")``) started with ``LOOPWATCH=1`` under
valgrind's callgrind with its cache simulation, given the same number of keep-alive requests one
after another over one connection from a client in another process, counted after a warm-up.
Each side (``--a`` and ``--b``, ``LOOPWATCH_*`` settings) is run ``--runs`` times, in turns, each
in a server process of its own with the same hash seed.

wrk's requests per second (``benchmarks/bench.py``) are the budget's measure, but on a small
shared machine two processes of the same code differ by a percent or two, more than the 1% route
labelling is allowed. Counts do not vary that way: the client sends one request at a time, so
every request takes the same path through the server, and the report gives each side's
instructions, first-level cache misses (instruction, data read, data write) and an estimate of
cycles, ``Ir + 10 x L1 misses + 100 x last-level misses`` (callgrind's own), per request, and the
difference of the medians. What it cannot show is a real processor's prediction and a cache
shared with other processes.

    python benchmarks/served.py                         # LOOPWATCH_ROUTES=0 against routes
    python benchmarks/served.py --runs 3 --requests 2000
    python benchmarks/served.py --a LOOPWATCH_TASKS=0 --b ""   # any two settings

Needs valgrind (``apt-get install valgrind``); without it, one line says so.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SERVER = r"""
import asyncio, sys
from aiohttp import web

async def hello(request):
    return web.Response(body=b"hello, world!", content_type="text/plain")

async def main():
    app = web.Application()
    app.router.add_get("/", hello)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", int(sys.argv[1])).start()
    await asyncio.sleep(3600)

asyncio.run(main())
"""

REQUEST = b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n"
EVENTS = ("Ir", "I1mr", "D1mr", "D1mw", "ILmr", "DLmr", "DLmw")


def settings(text: str) -> dict[str, str]:
    out = {}
    for item in text.split():
        name, sep, value = item.partition("=")
        if not sep or not name.startswith("LOOPWATCH_"):
            raise SystemExit(f"served.py: {item!r} is not a LOOPWATCH_NAME=value setting")
        out[name] = value
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def requests(port: int, count: int, deadline: float) -> None:
    """``count`` requests, each sent once the last response has been read whole."""
    with socket.create_connection(
        ("127.0.0.1", port), timeout=max(1.0, deadline - time.time())
    ) as s:
        buf = b""
        for _ in range(count):
            s.sendall(REQUEST)
            while True:
                end = buf.find(b"\r\n\r\n")
                if end >= 0:
                    length = re.search(rb"(?i)content-length:\s*(\d+)", buf[:end])
                    size = end + 4 + (int(length.group(1)) if length else 0)
                    if len(buf) >= size:
                        buf = buf[size:]
                        break
                chunk = s.recv(65536)
                if not chunk:
                    raise RuntimeError("the server closed the connection")
                buf += chunk


def wait_listening(port: int, server: subprocess.Popen[bytes], seconds: float) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server ended (exit code {server.returncode})")
        try:
            requests(port, 1, deadline)
            return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError("the server did not answer in time")


def control(what: str, pid: int) -> None:
    """callgrind_control: ``-z`` zeroes the counts, ``-d`` dumps them."""
    subprocess.run(["callgrind_control", what, str(pid)], capture_output=True, check=True)


def measure(env: dict[str, str], count: int, warmup: int, workdir: Path) -> dict[str, float]:
    """One server process under callgrind: the counts per request of ``count`` requests."""
    port = free_port()
    script = workdir / "server.py"
    script.write_text(SERVER)
    out = workdir / "callgrind.out"
    for old in workdir.glob("callgrind.out*"):
        old.unlink()
    full = {k: v for k, v in os.environ.items() if not k.startswith("LOOPWATCH")}
    full.update({"LOOPWATCH": "1", "PYTHONHASHSEED": "1", **env})
    server = subprocess.Popen(
        ["valgrind", "--tool=callgrind", "--cache-sim=yes", "--separate-threads=no",
         f"--callgrind-out-file={out}", sys.executable, str(script), str(port)],
        env=full, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_listening(port, server, 180)
        requests(port, warmup, time.time() + 600)
        control("-z", server.pid)
        requests(port, count, time.time() + 1800)
        control("-d", server.pid)
    finally:
        server.terminate()
        server.wait(60)
    dumps = sorted(p for p in workdir.glob("callgrind.out.*") if p.suffix != ".out")
    if not dumps:
        raise RuntimeError("callgrind wrote no dump")
    text = dumps[0].read_text(errors="replace")
    events = re.search(r"^events:\s*(.+)$", text, re.M)
    totals = re.search(r"^(?:summary|totals):\s*(.+)$", text, re.M)
    if events is None or totals is None:
        raise RuntimeError("callgrind's dump has no totals")
    names, values = events.group(1).split(), [int(v) for v in totals.group(1).split()]
    counts = dict(zip(names, values, strict=False))
    row = {name: counts.get(name, 0) / count for name in EVENTS}
    l1 = row["I1mr"] + row["D1mr"] + row["D1mw"]
    row["cycles"] = row["Ir"] + 10 * l1 + 100 * (row["ILmr"] + row["DLmr"] + row["DLmw"])
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--a", default="LOOPWATCH_ROUTES=0", help="settings of side A")
    parser.add_argument("--b", default="LOOPWATCH_ROUTES=1", help="settings of side B")
    parser.add_argument("--runs", type=int, default=2, help="server processes per side")
    parser.add_argument("--requests", type=int, default=1000, help="counted, per process")
    parser.add_argument("--warmup", type=int, default=300)
    args = parser.parse_args()
    sides = {"A": settings(args.a), "B": settings(args.b)}
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        print("served.py: needs valgrind (apt-get install valgrind); nothing measured")
        return 0
    rows: dict[str, list[dict[str, float]]] = {"A": [], "B": []}
    with tempfile.TemporaryDirectory(prefix="loopwatch-served-") as tmp:
        for run in range(args.runs):
            for side in ("A", "B") if run % 2 == 0 else ("B", "A"):
                rows[side].append(measure(sides[side], args.requests, args.warmup, Path(tmp)))
                r = rows[side][-1]
                print(
                    f"run {run + 1} {side}: {r['Ir']:,.0f} instructions, {r['I1mr']:,.1f} I1 /"
                    f" {r['D1mr']:,.1f} D1r / {r['D1mw']:,.1f} D1w misses, about"
                    f" {r['cycles']:,.0f} cycles a request",
                    flush=True,
                )
    print(
        f"\nPer served request, median of {args.runs} processes a side, {args.requests} requests"
        f" each (aiohttp hello-world, LOOPWATCH=1, Python {sys.version.split()[0]}):"
    )
    print(f"  A: {args.a or '(nothing more)'}\n  B: {args.b or '(nothing more)'}")
    print(f"{'':8}{'A':>12}{'B':>12}{'B - A':>10}{'B vs A':>9}")
    for name in ("Ir", "I1mr", "D1mr", "D1mw", "cycles"):
        a = statistics.median(r[name] for r in rows["A"])
        b = statistics.median(r[name] for r in rows["B"])
        print(f"{name:8}{a:12,.1f}{b:12,.1f}{b - a:+10,.1f}{(b / a - 1) * 100 if a else 0:+8.2f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
