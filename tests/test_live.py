"""The live view: ``loopwatch.snapshot()``, ``GET /tasks`` (answered while the loop is blocked),
and ``loopwatch tasks`` / ``loopwatch top --once`` against a real process, on both loops."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import place, run_on

import loopwatch
from loopwatch import _api
from loopwatch._live import _short

HERE = __file__
Factory = Callable[[], asyncio.AbstractEventLoop]


async def fetch(ready: asyncio.Event) -> None:
    await ready.wait()  # LIVE:fetch


async def worker(ready: asyncio.Event) -> None:
    await fetch(ready)  # LIVE:worker


async def stubborn() -> None:
    for _ in range(2):
        try:
            await asyncio.sleep(10)  # LIVE:stubborn
        except asyncio.CancelledError:
            continue


async def scene() -> dict[str, Any]:
    ready = asyncio.Event()
    one = asyncio.create_task(worker(ready), name="one")  # LIVE:one
    two = asyncio.create_task(worker(ready), name="two")  # LIVE:two

    async def gathers() -> list[None]:
        return await asyncio.gather(one, two)

    both = asyncio.create_task(gathers(), name="both")
    held = asyncio.create_task(stubborn(), name="held")  # LIVE:held
    await asyncio.sleep(0.02)
    held.cancel()
    await asyncio.sleep(0.02)
    snap = loopwatch.snapshot()
    ready.set()
    await both
    held.cancel()
    await asyncio.wait([held])
    return snap


def test_snapshot_has_every_task_with_its_place_and_its_awaiter(factory: Factory) -> None:
    _api.activate(log="off")
    snap = run_on(factory, scene())
    assert snap["pid"] == os.getpid()
    (loop,) = snap["loops"]
    assert (loop["loop"], loop["thread"], loop["blocked_s"]) == (
        "uvloop" if factory is loopwatch.new_uvloop_event_loop else "asyncio",
        "MainThread",
        None,
    )
    rows = {row["task"]: row for row in loop["tasks"]}
    (main,) = [name for name, row in rows.items() if row["coroutine"] == "scene"]
    rows["main"] = rows.pop(main)
    assert sorted(rows) == ["both", "held", "main", "one", "two"]
    chain = [place(HERE, "LIVE:worker", "worker"), place(HERE, "LIVE:fetch", "fetch")]
    for name in ("one", "two"):
        row = rows[name]
        assert (row["coroutine"], row["state"], row["created_at"]) == (
            "worker",
            "pending",
            place(HERE, f"LIVE:{name}", "scene"),
        )
        assert (row["awaiting"], row["await_chain"]) == (chain[-1], chain)
        # gather's future is what the task 'both' waits on: both tasks are awaited by it.
        assert row["awaited_by"] == ["both"]
        assert row["steps"] == 1
        assert row["waiting_s"] == pytest.approx(row["age_s"] - row["busy_s"], abs=1e-5)
    assert (rows["main"]["state"], rows["main"]["awaiting"]) == ("running", None)
    held = rows["held"]
    assert (held["state"], held["awaiting"], held["steps"]) == (
        "cancelling",
        place(HERE, "LIVE:stubborn", "stubborn"),
        2,
    )
    assert all(row["age_s"] >= 0.04 for name, row in rows.items() if name != "main")


BLOCKER = """
import asyncio, sys, time
import loopwatch

async def handler():
    await asyncio.sleep(0.05)
    time.sleep(1.5)  # BLOCK:here

async def idle(event):
    await event.wait()  # IDLE:here

async def main():
    event = asyncio.Event()
    task = asyncio.create_task(idle(event), name="idle")  # IDLE:create
    print("ready", loopwatch.metrics_url(), flush=True)
    await handler()
    await asyncio.sleep(float(sys.argv[2]))  # MAIN:linger
    event.set()
    await task

if sys.argv[1] == "uvloop":
    import uvloop
    uvloop.run(main())
else:
    asyncio.run(main())
"""


def start(tmp_path: Path, kind: str, linger: float) -> tuple[subprocess.Popen[str], str, Path]:
    script = tmp_path / "service.py"
    script.write_text(textwrap.dedent(BLOCKER))
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOPWATCH")}
    env |= {"LOOPWATCH": "1", "LOOPWATCH_METRICS_PORT": "0", "LOOPWATCH_LOG": "off"}
    proc = subprocess.Popen(
        [sys.executable, str(script), kind, str(linger)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    match = re.fullmatch(r"ready (http://\S+/metrics)\n", line)
    assert match, (line, proc.stderr.read() if proc.stderr else "")
    return proc, match.group(1), script


def test_get_tasks_answers_while_the_loop_is_blocked(tmp_path: Path, kind: str) -> None:
    """Served by loopwatch's own thread: the blocked loop, with where it is blocked, and its
    tasks as they were when it blocked."""
    proc, url, script = start(tmp_path, kind, 0.0)
    try:
        time.sleep(0.6)  # inside the 1.5 s block
        started = time.monotonic()
        response = httpx.get(url.removesuffix("/metrics") + "/tasks", timeout=5.0)
        took = time.monotonic() - started
    finally:
        proc.wait(timeout=20)
    assert response.status_code == 200
    assert took < 0.5, "answered while the loop was blocked"
    (loop,) = response.json()["loops"]
    assert loop["blocked_s"] is not None and 0.2 < loop["blocked_s"] < 1.5
    assert loop["blocked_at"] == place(script, "BLOCK:here", "handler")
    rows = {row["task"]: row for row in loop["tasks"]}
    assert rows["Task-1"]["state"] == "running"
    assert (rows["idle"]["state"], rows["idle"]["awaiting"], rows["idle"]["created_at"]) == (
        "pending",
        place(script, "IDLE:here", "idle"),
        place(script, "IDLE:create", "main"),
    )
    assert proc.returncode == 0


def test_tasks_and_top_commands_read_a_running_process(tmp_path: Path, kind: str) -> None:
    proc, url, script = start(tmp_path, kind, 3.0)
    try:
        time.sleep(1.8)  # after the block, while main sleeps
        tree = subprocess.run(
            [sys.executable, "-m", "loopwatch", "tasks", url],
            capture_output=True,
            text=True,
            timeout=20,
        )
        top = subprocess.run(
            [sys.executable, "-m", "loopwatch", "top", "--once", "--sort", "age", url],
            capture_output=True,
            text=True,
            timeout=20,
        )
    finally:
        proc.wait(timeout=20)
    assert (tree.returncode, tree.stderr) == (0, "")
    lines = tree.stdout.splitlines()
    assert lines[0] == f"pid {proc.pid}: 1 watched loop(s)"
    assert re.fullmatch(rf"loop {kind} \(thread MainThread\): not blocked, .*, 2 tasks", lines[1])
    main_at = place(script, "MAIN:linger", "main")
    idle_at = place(script, "IDLE:here", "idle")
    assert [re.sub(r"age \S+ busy \S+", "age _ busy _", line) for line in lines[2:]] == [
        f"|-- Task-1 main [pending] age _ busy _ at {_short(main_at)}",
        f"`-- idle idle [pending] age _ busy _ at {_short(idle_at)}",
    ]
    assert (top.returncode, top.stderr) == (0, "")
    frame = top.stdout.splitlines()
    assert frame[0] == f"loopwatch top - pid {proc.pid} - sorted by age"
    assert [line.split()[0] for line in frame[3:]] == ["Task-1", "idle"]
    assert proc.returncode == 0


def test_a_target_that_is_not_there_is_one_line(tmp_path: Path) -> None:
    pid = subprocess.run(
        [sys.executable, "-m", "loopwatch", "tasks", "12345"], capture_output=True, text=True
    )
    assert (pid.returncode, pid.stdout) == (1, "")
    assert pid.stderr.count("\n") == 1 and "PID (12345) is not available yet" in pid.stderr
    closed = subprocess.run(
        [sys.executable, "-m", "loopwatch", "top", "--once", "http://127.0.0.1:9/metrics"],
        capture_output=True,
        text=True,
    )
    assert (closed.returncode, closed.stdout) == (1, "")
    assert closed.stderr.startswith("loopwatch: cannot read http://127.0.0.1:9/tasks (")
    assert closed.stderr.count("\n") == 1
