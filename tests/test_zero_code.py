"""LOOPWATCH=1 with no code change: real processes, real servers, real HTTP clients."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import line_of

BLOCKING_PROGRAM = """
import asyncio, sys, time

async def handler():
    await asyncio.sleep(0.01)
    time.sleep(0.3)  # BLOCK:program
    await asyncio.sleep(0.05)

async def main():
    await asyncio.create_task(handler(), name="handler-task")

{run}
print("program output")
sys.exit(3)
"""

RUNS = {
    "asyncio.run": "asyncio.run(main())",
    "uvloop.run": "import uvloop; uvloop.run(main())",
    "Runner": "with asyncio.Runner() as r: r.run(main())",
    "Runner+uvloop": (
        "import uvloop\nwith asyncio.Runner(loop_factory=uvloop.new_event_loop) as r: r.run(main())"
    ),
    "run_until_complete": (
        "loop = asyncio.new_event_loop(); loop.run_until_complete(main()); loop.close()"
    ),
    "uvloop run_forever": (
        "import uvloop\nloop = uvloop.new_event_loop()\n"
        "t = loop.create_task(main()); t.add_done_callback(lambda _: loop.stop())\n"
        "loop.run_forever(); loop.close()"
    ),
}


def env_with(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOPWATCH")}
    env.update(extra)
    return env


def read_events(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write(tmp_path: Path, name: str, source: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(source))
    return path


@pytest.mark.parametrize("how", sorted(RUNS))
def test_loopwatch_1_watches_however_the_loop_is_run(tmp_path: Path, how: str) -> None:
    """Output and exit code unchanged; one JSON slow_callback event on stderr with its fields."""
    app = write(tmp_path, "app.py", BLOCKING_PROGRAM.format(run=RUNS[how]))
    proc = subprocess.run(
        [sys.executable, str(app)],
        env=env_with(LOOPWATCH="1", LOOPWATCH_LOG="json"),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 3
    assert proc.stdout == "program output\n"
    lines = [json.loads(line) for line in proc.stderr.splitlines()]
    assert len(lines) == 1, proc.stderr
    event = lines[0]
    assert event["event"] == "loopwatch.slow_callback"
    assert event["task"] == "handler-task"
    assert event["coroutine"] == "handler"
    assert event["location"] == f"{app}:{line_of(app, 'BLOCK:program')} in handler"
    assert event["loop"] == ("uvloop" if "uvloop" in how else "asyncio")
    assert 0.26 <= event["duration_s"] <= 0.36
    assert event["threshold_s"] == 0.1
    assert event["stack"][-1] == event["location"]
    assert isinstance(event["pid"], int) and event["pid"] != os.getpid()


@pytest.mark.parametrize("log", ["json", "structlog"])
def test_a_program_that_imports_structlog_first_is_watched(tmp_path: Path, log: str) -> None:
    """structlog imports asyncio while it is itself being imported: loopwatch starts then, and
    must not touch the half-made structlog (its exporters make their loggers at the first
    event). Once said 'hooking asyncio failed ... it is not watched' and watched nothing."""
    program = write(
        tmp_path,
        "app.py",
        "import structlog\n" + BLOCKING_PROGRAM.replace("{run}", RUNS["asyncio.run"]),
    )
    events = tmp_path / "events.jsonl"
    proc = subprocess.run(
        [sys.executable, str(program)],
        env=env_with(LOOPWATCH="1", LOOPWATCH_LOG=log, LOOPWATCH_LOG_FILE=str(events)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 3 and "program output" in proc.stdout
    assert "loopwatch:" not in proc.stderr, proc.stderr
    if log == "json":
        found = read_events(events)
        assert [(e["event"], e["task"]) for e in found] == [
            ("loopwatch.slow_callback", "handler-task")
        ]
    else:  # structlog's default configuration prints to standard output
        assert "loopwatch.slow_callback" in proc.stdout and "handler-task" in proc.stdout


def test_unset_loads_nothing_and_starts_no_thread(tmp_path: Path) -> None:
    probe = write(
        tmp_path,
        "probe.py",
        """
        import asyncio, sys, threading, time
        async def main():
            time.sleep(0.3)
        asyncio.run(main())
        print(sorted(m for m in sys.modules if m.startswith("loopwatch")))
        print(sorted(t.name for t in threading.enumerate()))
        """,
    )
    for value in (None, "", "0"):
        env = env_with() if value is None else env_with(LOOPWATCH=value)
        proc = subprocess.run(
            [sys.executable, str(probe)], env=env, capture_output=True, text=True, timeout=30
        )
        assert proc.stdout.splitlines() == ["[]", "['MainThread']"], (value, proc.stdout)
        assert proc.stderr == ""


def test_bad_settings_are_one_line_each_and_the_program_runs_on(tmp_path: Path) -> None:
    app = write(tmp_path, "app.py", BLOCKING_PROGRAM.format(run=RUNS["asyncio.run"]))
    proc = subprocess.run(
        [sys.executable, str(app)],
        env=env_with(
            LOOPWATCH="1",
            LOOPWATCH_LOG="json",
            LOOPWATCH_SLOW_CALLBACK_MS="fast",
            LOOPWATCH_METRICS_PORT="70000",
        ),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 3
    assert proc.stdout == "program output\n"
    lines = proc.stderr.splitlines()
    assert lines[0] == (
        "loopwatch: LOOPWATCH_SLOW_CALLBACK_MS='fast' is not accepted; "
        "expected a number of milliseconds above 0; using the default (100.0)"
    )
    assert lines[1] == (
        "loopwatch: LOOPWATCH_METRICS_PORT='70000' is not accepted; "
        "expected a port number from 0 to 65535 (0 picks a free port); no metrics endpoint"
    )
    # The default threshold is in force and the block is still caught.
    assert [json.loads(line)["event"] for line in lines[2:]] == ["loopwatch.slow_callback"]


def test_bad_loopwatch_value_is_one_line_and_stays_off(tmp_path: Path) -> None:
    app = write(tmp_path, "app.py", BLOCKING_PROGRAM.format(run=RUNS["asyncio.run"]))
    proc = subprocess.run(
        [sys.executable, str(app)],
        env=env_with(LOOPWATCH="maybe", LOOPWATCH_LOG="json"),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 3
    assert proc.stderr.splitlines() == [
        "loopwatch: LOOPWATCH='maybe' is not accepted; expected 1 to turn it on or 0 to keep it "
        "off; loopwatch stays off"
    ]


def test_subprocesses_and_forked_children_are_watched(tmp_path: Path) -> None:
    log = tmp_path / "events.jsonl"
    child = write(tmp_path, "child.py", BLOCKING_PROGRAM.format(run=RUNS["uvloop.run"]))
    parent = write(
        tmp_path,
        "parent.py",
        f"""
        import asyncio, os, subprocess, sys, time

        async def forked():
            time.sleep(0.2)  # BLOCK:forked

        async def parent_main():
            await asyncio.sleep(0.01)

        asyncio.run(parent_main())        # the parent has run a loop (and its watchdog) already
        pid = os.fork()
        if pid == 0:
            asyncio.run(forked())
            os._exit(0)
        os.waitpid(pid, 0)
        code = subprocess.call([sys.executable, {str(child)!r}], stdout=subprocess.DEVNULL)
        print("child exit", code)
        """,
    )
    proc = subprocess.run(
        [sys.executable, str(parent)],
        env=env_with(LOOPWATCH="1", LOOPWATCH_LOG="json", LOOPWATCH_LOG_FILE=str(log)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.stdout == "child exit 3\n", proc.stderr
    events = read_events(log)
    assert [(e["location"], e["loop"]) for e in events] == [
        (f"{parent}:{line_of(parent, 'BLOCK:forked')} in forked", "asyncio"),
        (f"{child}:{line_of(child, 'BLOCK:program')} in handler", "uvloop"),
    ]
    assert len({e["pid"] for e in events}) == 2, "the fork and the subprocess are separate pids"


def test_loopwatch_run_command(tmp_path: Path) -> None:
    """loopwatch run sets LOOPWATCH=1 and each option as its variable; exit code passes through."""
    log = tmp_path / "events.jsonl"
    app = write(
        tmp_path,
        "app.py",
        """
        import asyncio, time
        async def main():
            time.sleep(0.07)  # BLOCK:cli
        asyncio.run(main())
        raise SystemExit(5)
        """,
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "loopwatch",
            "run",
            "--slow-callback-ms",
            "50",
            "--log",
            "json",
            "--log-file",
            str(log),
            "--",
            "python",
            str(app),
        ],
        env=env_with(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 5, proc.stderr
    events = read_events(log)
    assert [(e["event"], e["threshold_s"], e["location"]) for e in events] == [
        ("loopwatch.slow_callback", 0.05, f"{app}:{line_of(app, 'BLOCK:cli')} in main")
    ]


def test_loopwatch_run_rejects_a_bad_option() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "loopwatch", "run", "--stall-ms", "-3", "--", "python", "-c", "0"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2
    assert proc.stderr == (
        "loopwatch: --stall-ms='-3' is not accepted; expected a number of milliseconds above 0\n"
    )


def test_loopwatch_run_help_lists_every_option() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "loopwatch", "run", "--help"], capture_output=True, text=True
    )
    for option in (
        "--slow-callback-ms",
        "--stall-ms",
        "--metrics-port",
        "--metrics-addr",
        "--log",
        "--log-file",
    ):
        assert option in proc.stdout


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen[str], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nothing listens on {port}")


def get_then_stop(proc: subprocess.Popen[str], port: int, paths: list[str]) -> int:
    """Once the server listens, GET each path with a real client (each answers "ok"), give the
    watchdog time to report, stop the server with SIGINT; its exit code."""
    try:
        wait_for_port(port, proc)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            for path in paths:
                assert client.get(path).text == "ok"
        time.sleep(0.3)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=20)
    return proc.returncode


ASGI_APP = """
import time

async def app(scope, receive, send):
    assert scope["type"] == "http"
    if scope["path"] == "/slow":
        time.sleep(0.3)  # BLOCK:asgi
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})
"""


@pytest.mark.parametrize(
    ("loop_option", "kind", "env_on"),
    [
        ("asyncio", "asyncio", True),
        ("uvloop", "uvloop", True),
        ("loopwatch:new_uvloop_event_loop", "uvloop", False),
        ("loopwatch:new_event_loop", "asyncio", False),
    ],
)
def test_uvicorn_with_a_blocking_handler(
    tmp_path: Path, loop_option: str, kind: str, env_on: bool
) -> None:
    """A real uvicorn, hit by a real HTTP client: the slow request is one event at the handler."""
    app = write(tmp_path, "asgi_app.py", ASGI_APP)
    log = tmp_path / "events.jsonl"
    port = free_port()
    # 200 ms: the handler blocks 300 ms; uvicorn's start (imports on the loop) stays under it
    # even on a loaded host, where it can take past the default 100 ms.
    extra = {
        "LOOPWATCH_LOG": "json",
        "LOOPWATCH_LOG_FILE": str(log),
        "LOOPWATCH_SLOW_CALLBACK_MS": "200",
    }
    if env_on:
        extra["LOOPWATCH"] = "1"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "asgi_app:app",
            "--port",
            str(port),
            "--loop",
            loop_option,
            "--lifespan",
            "off",
            "--log-level",
            "warning",
        ],
        cwd=tmp_path,
        env=env_with(**extra),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert get_then_stop(proc, port, ["/fast", "/slow", "/fast"]) == 0
    events = read_events(log)
    assert [(e["event"], e["location"], e["loop"]) for e in events] == [
        ("loopwatch.slow_callback", f"{app}:{line_of(app, 'BLOCK:asgi')} in app", kind)
    ]
    assert events[0]["coroutine"] == "RequestResponseCycle.run_asgi"
    assert 0.26 <= events[0]["duration_s"] <= 0.36


AIOHTTP_APP = """
import sys, time
from aiohttp import web

async def slow(request):
    time.sleep(0.3)  # BLOCK:aiohttp
    return web.Response(text="ok")

async def fast(request):
    return web.Response(text="ok")

app = web.Application()
app.add_routes([web.get("/slow", slow), web.get("/fast", fast)])
loop_factory = None
if sys.argv[2] == "uvloop":
    import uvloop
    loop_factory = uvloop.new_event_loop
extra = {"loop": loop_factory()} if loop_factory else {}
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, **extra)
"""


@pytest.mark.parametrize("kind", ["asyncio", "uvloop"])
def test_aiohttp_run_app_with_a_blocking_handler(tmp_path: Path, kind: str) -> None:
    app = write(tmp_path, "aiohttp_app.py", AIOHTTP_APP)
    log = tmp_path / "events.jsonl"
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(app), str(port), kind],
        env=env_with(LOOPWATCH="1", LOOPWATCH_LOG="json", LOOPWATCH_LOG_FILE=str(log)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    get_then_stop(proc, port, ["/fast", "/slow"])
    events = read_events(log)
    assert [(e["event"], e["location"], e["loop"]) for e in events] == [
        ("loopwatch.slow_callback", f"{app}:{line_of(app, 'BLOCK:aiohttp')} in slow", kind)
    ]
    assert 0.26 <= events[0]["duration_s"] <= 0.36


def test_set_but_no_asyncio_loads_only_the_start_up_check(tmp_path: Path) -> None:
    """LOOPWATCH=1 in a process that never imports asyncio: three small modules, no thread."""
    probe = write(
        tmp_path,
        "probe.py",
        """
        import sys, threading
        print(sorted(m for m in sys.modules if m.startswith("loopwatch")))
        print(sorted(m for m in ("asyncio", "dataclasses", "importlib.abc") if m in sys.modules))
        print(sorted(t.name for t in threading.enumerate()))
        """,
    )
    proc = subprocess.run(
        [sys.executable, str(probe)],
        env=env_with(LOOPWATCH="1"),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.stdout.splitlines() == [
        "['loopwatch', 'loopwatch._bootstrap', 'loopwatch._import_hooks']",
        "[]",
        "['MainThread']",
    ]
    assert proc.stderr == ""


LOOPWATCH_FIRST = """
import sys
import loopwatch

{use}
import asyncio
from loopwatch import _api
from prometheus_client import REGISTRY, generate_latest


async def main():
    asyncio.get_running_loop().call_soon(lambda: None)


asyncio.run(main())
print("global", _api.global_enabled())
print([line for line in generate_latest(REGISTRY).decode().splitlines()
       if line.startswith("loopwatch_tasks_created_total")])
"""


@pytest.mark.parametrize(
    "use",
    ["loopwatch.install()", "app = loopwatch.metrics_app()", "from loopwatch import watch"],
)
def test_loopwatch_imported_before_asyncio(tmp_path: Path, use: str) -> None:
    """With LOOPWATCH=1, a program that reaches loopwatch's API before asyncio is imported (the
    API's own import brings asyncio and prometheus_client in, and their start-up hooks need
    loopwatch's modules, still half imported): the hooks wait for those imports, nothing is
    reported as failed, and loops and metrics are watched."""
    app = write(tmp_path, "app.py", LOOPWATCH_FIRST.format(use=use))
    proc = subprocess.run(
        [sys.executable, str(app)],
        env=env_with(LOOPWATCH="1"),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.stderr == ""
    assert proc.returncode == 0
    assert proc.stdout.splitlines() == [
        "global True",
        "['loopwatch_tasks_created_total 3.0']",  # main, and asyncio.run's two at its end
    ]
