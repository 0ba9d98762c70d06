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

    async def awaits_one() -> None:
        await one

    both = asyncio.create_task(gathers(), name="both")
    direct = asyncio.create_task(awaits_one(), name="direct")
    held = asyncio.create_task(stubborn(), name="held")  # LIVE:held
    await asyncio.sleep(0.02)
    held.cancel()
    await asyncio.sleep(0.02)
    snap = loopwatch.snapshot()
    ready.set()
    await asyncio.gather(both, direct)
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
    assert sorted(rows) == ["both", "direct", "held", "main", "one", "two"]
    chain = [place(HERE, "LIVE:worker", "worker"), place(HERE, "LIVE:fetch", "fetch")]
    for name in ("one", "two"):
        row = rows[name]
        assert (row["coroutine"], row["state"], row["created_at"]) == (
            "worker",
            "pending",
            place(HERE, f"LIVE:{name}", "scene"),
        )
        assert (row["awaiting"], row["await_chain"]) == (chain[-1], chain)
        # gather's future is what the task 'both' waits on: both tasks are awaited by it;
        # 'direct' awaits 'one' itself.
        assert sorted(row["awaited_by"]) == (["both", "direct"] if name == "one" else ["both"])
        assert row["steps"] == 1
        assert row["waiting_s"] == pytest.approx(row["age_s"] - row["busy_s"], abs=1e-5)
    assert (rows["main"]["state"], rows["main"]["awaiting"]) == ("running", None)
    held = rows["held"]
    assert (held["state"], held["awaiting"], held["steps"]) == (
        "cancelling",
        place(HERE, "LIVE:stubborn", "stubborn"),
        2,
    )
    # (two sleeps of 20 ms; uvloop rounds its timers to the millisecond)
    assert all(row["age_s"] >= 0.035 for name, row in rows.items() if name != "main")


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
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    ).stdout.strip()
    pid = subprocess.run(
        [sys.executable, "-m", "loopwatch", "tasks", gone], capture_output=True, text=True
    )
    assert (pid.returncode, pid.stdout) == (1, "")
    assert pid.stderr == f"loopwatch: there is no process {gone}\n"
    closed = subprocess.run(
        [sys.executable, "-m", "loopwatch", "top", "--once", "http://127.0.0.1:9/metrics"],
        capture_output=True,
        text=True,
    )
    assert (closed.returncode, closed.stdout) == (1, "")
    assert closed.stderr.startswith("loopwatch: cannot read http://127.0.0.1:9/tasks (")
    assert closed.stderr.count("\n") == 1


# -- by PID, with no port -----------------------------------------------------------------------

SERVICE = """
import asyncio, os, sys

async def idle(event):
    await event.wait()  # PID:idle

async def main():
    event = asyncio.Event()
    task = asyncio.create_task(idle(event), name="idle")
    if sys.argv[2] == "fork":
        await asyncio.sleep(0.05)
        if os.fork() == 0:  # the child runs a loop of its own, watched
            async def child():
                await asyncio.sleep(3)  # PID:child
            asyncio.run(child())
            os._exit(0)
    print("ready", flush=True)
    await asyncio.sleep(float(sys.argv[3]))
    event.set()
    await task

if sys.argv[1] == "uvloop":
    import uvloop
    uvloop.run(main())
else:
    asyncio.run(main())
"""


def start_service(tmp_path: Path, kind: str, mode: str, linger: float) -> tuple[Any, Path]:
    script = tmp_path / "pid_service.py"
    script.write_text(textwrap.dedent(SERVICE))
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOPWATCH")}
    env |= {"LOOPWATCH": "1", "LOOPWATCH_LOG": "off"}
    proc = subprocess.Popen(
        [sys.executable, str(script), kind, mode, str(linger)],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
    return proc, script


def loopwatch_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "loopwatch", *args], capture_output=True, text=True, timeout=20
    )


def test_tasks_by_pid_with_no_port(tmp_path: Path, kind: str) -> None:
    """A process run with LOOPWATCH=1 answers ``loopwatch tasks PID`` through a socket in a
    directory of its user's alone; the socket goes when the process ends."""
    from loopwatch.exporters import console

    # Up for 6 s: two CLI runs (each a Python start-up) fit in it on a loaded machine.
    proc, script = start_service(tmp_path, kind, "plain", 6.0)
    try:
        time.sleep(0.3)
        path = console.socket_path(proc.pid)
        assert path is not None
        assert (os.stat(path).st_mode & 0o777, os.stat(os.path.dirname(path)).st_mode & 0o777) == (
            0o600,
            0o700,
        )
        tree = loopwatch_cli("tasks", str(proc.pid))
        top = loopwatch_cli("top", "--once", str(proc.pid))
    finally:
        proc.wait(timeout=20)
    assert (tree.returncode, tree.stderr) == (0, "")
    lines = tree.stdout.splitlines()
    assert lines[0] == f"pid {proc.pid}: 1 watched loop(s)"
    idle_at = place(script, "PID:idle", "idle")
    assert lines[-1].startswith("`-- idle idle [pending]")
    assert lines[-1].endswith(f" at {_short(idle_at)}")
    assert (top.returncode, top.stdout.splitlines()[0]) == (
        0,
        f"loopwatch top - pid {proc.pid} - sorted by busy",
    )
    assert proc.returncode == 0
    assert not os.path.exists(path), "removed at exit"


def test_a_forked_child_answers_for_itself(tmp_path: Path) -> None:
    from loopwatch.exporters import console

    proc, script = start_service(tmp_path, "asyncio", "fork", 3.0)
    try:
        children = subprocess.run(
            ["pgrep", "-P", str(proc.pid)], capture_output=True, text=True
        ).stdout.split()
        assert len(children) == 1
        deadline = time.monotonic() + 2.0  # the child's loop starts its own socket
        while console.socket_path(int(children[0])) is None and time.monotonic() < deadline:
            time.sleep(0.02)
        child = loopwatch_cli("tasks", children[0])
        parent = loopwatch_cli("tasks", str(proc.pid))
    finally:
        proc.wait(timeout=20)
    assert child.returncode == 0, child.stderr
    assert child.stdout.splitlines()[0] == f"pid {children[0]}: 1 watched loop(s)"
    assert f"at {_short(place(script, 'PID:child', 'child'))}" in child.stdout
    assert "idle idle [pending]" not in child.stdout  # none of its parent's loops
    assert parent.stdout.splitlines()[0] == f"pid {proc.pid}: 1 watched loop(s)"
    assert "idle idle [pending]" in parent.stdout


def test_a_process_without_loopwatch_or_of_another_user_answers_nothing(tmp_path: Path) -> None:
    plain = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(5)"])
    try:
        unwatched = loopwatch_cli("tasks", str(plain.pid))
    finally:
        plain.kill()
        plain.wait()
    assert (unwatched.returncode, unwatched.stdout) == (1, "")
    assert unwatched.stderr == (
        f"loopwatch: process {plain.pid} is not watched by loopwatch (start it with "
        "LOOPWATCH=1, or give the URL of its metrics endpoint)\n"
    )
    if os.getuid() != 0:
        pytest.skip("another user is played by root dropping its rights")
    proc, _ = start_service(tmp_path, "asyncio", "plain", 2.0)
    try:
        time.sleep(0.3)
        from loopwatch.exporters import console

        path = console.socket_path(proc.pid)
        assert path is not None
        other = subprocess.run(
            [
                sys.executable,
                "-c",
                "import os, socket, sys\n"
                "os.setgid(65534); os.setuid(65534)\n"
                "s = socket.socket(socket.AF_UNIX)\n"
                "try:\n"
                f"    s.connect({path!r})\n"
                "except PermissionError:\n"
                "    print('refused')\n",
            ],
            capture_output=True,
            text=True,
            timeout=20,
        )
    finally:
        proc.wait(timeout=20)
    assert other.stdout == "refused\n", other.stderr
