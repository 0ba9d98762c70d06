"""A program cannot tell that loopwatch is there: nothing in its loop, no thread it can count, no
warning, no exception, no changed output; only the report. Each test runs on both loops, and
compares the program watched with the program plain where it can."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import Recorder, place, run_on

import loopwatch
from loopwatch import _runtime

HERE = __file__
RUNS = {"asyncio": "asyncio.run(main())", "uvloop": "uvloop.run(main())"}


def run_program(
    tmp_path: Path, source: str, kind: str, *args: str, name: str = "app.py", **env: str
) -> subprocess.CompletedProcess[str]:
    """``source`` (with ``{run}`` replaced by the loop kind's runner) in a fresh interpreter."""
    path = tmp_path / name
    path.write_text(textwrap.dedent(source).replace("{run}", RUNS[kind]))
    base = {k: v for k, v in os.environ.items() if not k.startswith("LOOPWATCH")}
    return subprocess.run(
        [sys.executable, *args, str(path)],
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )


def plain_and_watched(
    tmp_path: Path, source: str, kind: str, *args: str, **env: str
) -> tuple[subprocess.CompletedProcess[str], subprocess.CompletedProcess[str], list[Any]]:
    """The program plain, then with ``LOOPWATCH=1`` (findings as JSON lines in a file): the same
    stdout, stderr and exit code. Returns both runs and the findings."""
    log = tmp_path / "findings.jsonl"
    plain = run_program(tmp_path, source, kind, *args)
    watched = run_program(
        tmp_path,
        source,
        kind,
        *args,
        LOOPWATCH="1",
        LOOPWATCH_LOG="json",
        LOOPWATCH_LOG_FILE=str(log),
        **env,
    )
    assert (watched.stdout, watched.stderr, watched.returncode) == (
        plain.stdout,
        plain.stderr,
        plain.returncode,
    )
    findings = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return plain, watched, findings


# -- nothing in the program's loop ----------------------------------------------------------------


class FakeClockLoop(asyncio.SelectorEventLoop):
    """A test loop whose clock jumps to the next timer when the loop is idle (as aiostream's test
    loop and looptime do): any timer of loopwatch's would show in its jumps."""

    def __init__(self) -> None:
        super().__init__()
        self._now = 0.0
        self.jumps: list[float] = []

    def time(self) -> float:
        return self._now

    def _run_once(self) -> None:
        scheduled = self._scheduled  # type: ignore[attr-defined]
        if not self._ready and scheduled and scheduled[0]._when > self._now:  # type: ignore[attr-defined]
            self.jumps.append(round(scheduled[0]._when - self._now, 3))
            self._now = scheduled[0]._when
        super()._run_once()  # type: ignore[misc]


async def two_sleeps() -> str:
    await asyncio.sleep(1)
    await asyncio.sleep(1)
    return "slept"


def test_a_fake_clock_loop_runs_as_it_does_unwatched(events: Recorder) -> None:
    """Two ``sleep(1)`` make two jumps of 1.0, and no timer is left: nothing of loopwatch's is in
    ``_scheduled`` or ``_ready``; and a block in it is still reported."""
    plain = FakeClockLoop()
    watched = FakeClockLoop()
    loopwatch.install(watched)
    try:
        assert plain.run_until_complete(two_sleeps()) == "slept"
        assert watched.run_until_complete(two_sleeps()) == "slept"
        assert watched.jumps == plain.jumps == [1.0, 1.0]
        assert watched._scheduled == [] and len(watched._ready) == 0  # type: ignore[attr-defined]

        async def blocks() -> None:
            await asyncio.sleep(0.5)  # fake time
            time.sleep(0.2)  # BLOCK:fake-clock

        watched.run_until_complete(blocks())
        assert [(e.event, e.location) for e in events.wait_for(1)] == [  # type: ignore[attr-defined]
            ("loopwatch.slow_callback", place(HERE, "BLOCK:fake-clock", "blocks"))
        ]
    finally:
        plain.close()
        watched.close()


def test_only_the_programs_handles_are_in_the_loop(events: Recorder) -> None:
    """While a watched stock loop runs, ``_scheduled`` and ``_ready`` hold the program's handles
    only, and the loop object has no attribute of loopwatch's."""
    seen: list[Any] = []

    def mine() -> None:
        pass

    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop.call_later(5, mine)
        for _ in range(20):
            await asyncio.sleep(0.01)
            callbacks = [h._callback for h in (*loop._scheduled, *loop._ready)]  # type: ignore[attr-defined]
            seen.extend(c for c in callbacks if c is not mine and not _is_task_step(c))

    run_on(loopwatch.new_event_loop, main())
    assert seen == []


def _is_task_step(callback: Any) -> bool:
    return isinstance(getattr(callback, "__self__", None), asyncio.Future) or "wakeup" in repr(
        callback
    )


LOOPTIME = """
import asyncio, time
import looptime

async def main():
    loop = asyncio.get_running_loop()
    started, real = loop.time(), time.monotonic()
    try:
        await asyncio.Event().wait()  # nobody sets it: looptime's idle timeout must fire
    except looptime.IdleTimeoutError:
        print("idle timeout after", round(loop.time() - started, 1), "fake seconds")
    print("real seconds under 3:", time.monotonic() - real < 3)

loop = looptime.new_event_loop(idle_timeout=1.0, idle_step=0.01)
loop.run_until_complete(main())
loop.close()
"""


def test_looptime_idle_timeout_fires_as_unwatched(tmp_path: Path) -> None:
    """looptime moves its fake clock only while the loop has timers or waits for I/O in steps; a
    timer of loopwatch's kept its clock running and its idle timeout never fired (a hang)."""
    plain, _, findings = plain_and_watched(tmp_path, LOOPTIME, "asyncio")
    assert plain.stdout == "idle timeout after 1.0 fake seconds\nreal seconds under 3: True\n"
    assert findings == []


# -- no thread the program can count --------------------------------------------------------------

THREADS = """
import asyncio, logging, os, sys, threading, time, uvloop

logging.basicConfig(level=logging.WARNING, stream=sys.stdout, format="%(threadName)s %(message)s")
seen = []

def look():
    seen.append((threading.active_count(), [t.name for t in threading.enumerate()]))

async def main():
    look()
    time.sleep(0.3)  # a block: reported through logging, from loopwatch's thread
    await asyncio.sleep(0.2)
    look()
    for _ in range(50):
        await asyncio.sleep(0.002)
        look()

{run}
look()
print(sorted({repr(s) for s in seen}))
"""


def test_threads_cannot_be_counted(tmp_path: Path, kind: str) -> None:
    """``threading.active_count()`` is 1 and ``enumerate()`` lists the main thread only, before,
    during and after a block reported through the program's own logging."""
    plain = run_program(tmp_path, THREADS, kind)
    watched = run_program(tmp_path, THREADS, kind, LOOPWATCH="1", LOOPWATCH_LOG="logging")
    assert plain.stdout == "[\"(1, ['MainThread'])\"]\n"
    report, rest = watched.stdout.split("\n", 1)
    assert report.startswith("loopwatch loopwatch.slow_callback duration_s=0.3"), watched.stdout
    assert rest.endswith(plain.stdout), watched.stdout
    assert watched.stderr == plain.stderr == ""


def test_a_thread_a_finalizer_made_known_is_unseen_again() -> None:
    """The collector may run a program's finalizer on one of loopwatch's threads; one that logs
    makes the thread known to ``threading`` (a ``Dummy-N``). The worker's next turn removes it."""
    import threading

    from loopwatch import _threads

    turns: list[bool] = []
    done = threading.Event()

    def body(keep_going: Any) -> None:
        threading.current_thread()  # what logging does for a record: registers Dummy-N
        turns.append(any(t.name.startswith("Dummy") for t in threading.enumerate()))
        keep_going()
        turns.append(any(t.name.startswith("Dummy") for t in threading.enumerate()))
        done.set()

    worker = _threads.Worker("test", body, lambda: None)
    try:
        worker.start()
        assert done.wait(5)
        worker.stop()
    finally:
        _threads.discard(worker)
    assert turns == [True, False]


FORK_IN_LOOP = """
import asyncio, os, sys, time, uvloop

async def child_main():
    await asyncio.sleep(0.01)
    time.sleep(0.2)  # BLOCK:child
    return "child done"

async def main():
    await asyncio.sleep(0.05)
    pid = os.fork()  # inside a running loop, from a task step
    if pid == 0:
        {reset}
        print({run_child}, flush=True)
        os._exit(3)
    while True:  # the parent's loop waits without blocking
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        await asyncio.sleep(0.01)

print("parent", {run})
"""


def fork_in_loop(kind: str) -> str:
    # 3.11's asyncio keeps the parent's running loop in a child: a new one needs it let go of.
    reset = "asyncio.events._set_running_loop(None)" if sys.version_info < (3, 12) else "pass"
    run_child = RUNS[kind].replace("main()", "child_main()")
    return FORK_IN_LOOP.replace("{reset}", reset).replace("{run_child}", run_child)


def test_a_fork_inside_a_running_loop_says_nothing_and_the_child_is_watched(
    tmp_path: Path, kind: str
) -> None:
    """``-W error``: Python's multi-threaded fork warning would end the program. The child starts
    with none of its parent's loop state or threads, and the loop it runs is watched: its block
    is reported once, and nothing else is (no stall at the parent's fork line, no leak)."""
    source = fork_in_loop(kind)
    plain, _, findings = plain_and_watched(tmp_path, source, kind, "-W", "error")
    assert plain.stdout == "child done\nparent 3\n"
    assert [(e["event"], e["location"]) for e in findings] == [
        ("loopwatch.slow_callback", place(tmp_path / "app.py", "BLOCK:child", "child_main"))
    ]
    assert findings[0]["loop"] == kind


# -- hooks that cannot hurt ------------------------------------------------------------------------

BLOCKBUSTER = """
import asyncio, sys, uvloop
from blockbuster import blockbuster_ctx

sys.path.insert(0, "lib")
import helper  # a file no task came from yet

async def main():
    with blockbuster_ctx():
        tasks = [asyncio.create_task(helper.work(n)) for n in range(3)]
        gen = helper.numbers()
        first = await gen.__anext__()
        await gen.aclose()
        return [await t for t in tasks] + [first]

print({run})
"""


def test_blockbuster_sees_no_blocking_call_of_loopwatch(tmp_path: Path, kind: str) -> None:
    """blockbuster (which anyio, FastAPI and others run their tests under) raises on any
    blocking call made on a running loop's thread: creating tasks from a new file made the task
    factory call ``os.path.abspath`` there. Now nothing of loopwatch's blocks."""
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "helper.py").write_text(
        "import asyncio\n"
        "async def work(n):\n"
        "    await asyncio.sleep(0.01)\n"
        "    return n * 2\n"
        "async def numbers():\n"
        "    yield 1\n"
    )
    plain, _, findings = plain_and_watched(tmp_path, BLOCKBUSTER, kind)
    assert plain.stdout == "[0, 2, 4, 1]\n"
    assert findings == []


FAILING_FACTORY = """
import asyncio, sys, uvloop
from loopwatch import _tasks

def broken(*args):
    raise RuntimeError("injected")

_tasks._site_frame = broken  # loopwatch's own part of making a task fails

async def work(n):
    await asyncio.sleep(0)
    return n

async def main():
    return [await asyncio.create_task(work(n)) for n in range(3)]

print({run})
"""


def test_a_failure_inside_the_task_factory_never_reaches_create_task(
    tmp_path: Path, kind: str
) -> None:
    """The task is made as if loopwatch were not there, task tracking is off for that loop, and
    that is said once."""
    done = run_program(tmp_path, FAILING_FACTORY, kind, LOOPWATCH="1", LOOPWATCH_ACCEL="0")
    assert (done.returncode, done.stdout) == (0, "[0, 1, 2]\n")
    assert done.stderr == (
        "loopwatch: following tasks failed (RuntimeError: injected); task tracking is off for "
        "this loop\n"
    )


# -- tasks asyncio makes itself --------------------------------------------------------------------


async def stuck_numbers() -> Any:
    try:
        yield 1
    finally:
        await asyncio.get_running_loop().create_future()  # aclose() never ends  # AGEN:finally


async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await asyncio.get_running_loop().create_future()  # HANDLER:waits


def test_tasks_asyncio_makes_itself_have_no_place_inside_asyncio(
    factory: Any, kind: str, events: Recorder
) -> None:
    """An async generator dropped unfinished (asyncio's finalizer runs its ``aclose()`` in a task
    of its own) and a stream server's connection handler, both left pending at the end of the
    run: ``created_at`` is null, ``created_by`` says what made them, never a place in asyncio."""

    async def main() -> None:
        gen = stuck_numbers()
        first = await gen.__anext__()
        del gen  # dropped: asyncio's finalizer hook makes a task for its aclose()
        server = await asyncio.start_server(connection, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        await asyncio.sleep(0.1)
        writer.close()
        assert first == 1

    run_on(factory, main())
    # Nobody holds the aclose() task (asyncio drops it): pending at the end, or destroyed by the
    # collector before that, whichever comes first. Both are the same finding of the same task.
    found = {
        e.coroutine: e  # type: ignore[attr-defined]
        for e in events
        if e.event in ("loopwatch.task_leaked", "loopwatch.task_orphaned")
    }
    agen = found["stuck_numbers"]  # the async generator's name, not its aclose() object's
    assert (agen.created_at, agen.created_by, agen.origin) == (  # type: ignore[attr-defined]
        None,
        "asyncio: async generator finalizer (aclose of a dropped async generator)",
        "program",
    )
    if agen.event == "loopwatch.task_leaked":
        assert agen.awaiting == place(HERE, "AGEN:finally", "stuck_numbers")  # type: ignore[attr-defined]
    leaked = {e.coroutine: e for e in events.named("loopwatch.task_leaked")}  # type: ignore[attr-defined]
    handler = leaked["connection"]
    assert (handler.created_at, handler.created_by) == (  # type: ignore[attr-defined]
        None,
        "asyncio.streams: StreamReaderProtocol.connection_made",
    )
    assert handler.awaiting == place(HERE, "HANDLER:waits", "connection")  # type: ignore[attr-defined]
    for event in events:
        for field in ("created_at", "location"):
            where = getattr(event, field, None)
            assert where is None or "/asyncio/" not in where, event


# -- no loopwatch frame in the program's tracebacks ------------------------------------------------

TRACEBACK = """
import asyncio, traceback, uvloop

async def main():
    await asyncio.sleep(0)
    raise ValueError("the program's own")

try:
    {run}
except ValueError:
    print("".join(traceback.format_exc()).count("loopwatch"))
"""


def test_the_programs_exceptions_pass_through_without_a_loopwatch_frame(
    tmp_path: Path, kind: str
) -> None:
    plain, _, _ = plain_and_watched(tmp_path, TRACEBACK, kind)
    assert plain.stdout == "0\n"


# -- origin ----------------------------------------------------------------------------------------


def test_a_library_s_own_task_has_origin_library(tmp_path: Path, events: Recorder) -> None:
    """A task both made and run by an installed library (no frame of the program's) is the
    library's; one a library runs for the program's coroutine is the program's."""
    site = tmp_path / "site-packages"
    site.mkdir()
    (site / "somelib.py").write_text(
        "import asyncio\n"
        "async def poll():\n"
        "    await asyncio.sleep(3600)\n"
        "def start(coro=None):\n"
        "    return asyncio.get_running_loop().create_task(coro or poll())\n"
    )
    sys.path.insert(0, str(site))
    try:
        import somelib  # type: ignore[import-not-found]

        async def mine() -> None:
            await asyncio.sleep(3600)

        async def main() -> None:
            somelib.start()
            somelib.start(mine())
            await asyncio.sleep(0.01)

        run_on(loopwatch.new_event_loop, main())
    finally:
        sys.path.remove(str(site))
        sys.modules.pop("somelib", None)
    leaked = {e.coroutine: e.origin for e in events.named("loopwatch.task_leaked")}  # type: ignore[attr-defined]
    assert leaked == {
        "poll": "library",
        "test_a_library_s_own_task_has_origin_library.<locals>.mine": "program",
    }


# -- settings that fail quietly no more ------------------------------------------------------------


def test_an_unknown_setting_name_is_said_with_the_closest_known_one(tmp_path: Path) -> None:
    done = run_program(
        tmp_path,
        "import asyncio\nasyncio.run(asyncio.sleep(0))\nprint('ok')\n",
        "asyncio",
        LOOPWATCH="1",
        LOOPWATCH_SLOWCALLBACK_MS="50",
    )
    assert (done.returncode, done.stdout) == (0, "ok\n")
    assert done.stderr == (
        "loopwatch: LOOPWATCH_SLOWCALLBACK_MS is not a setting of loopwatch (did you mean "
        "LOOPWATCH_SLOW_CALLBACK_MS?); it is ignored\n"
    )


def test_metrics_port_0_says_the_url_it_bound(tmp_path: Path) -> None:
    done = run_program(
        tmp_path,
        "import asyncio, loopwatch, urllib.request\n"
        "asyncio.run(asyncio.sleep(0))\n"
        "url = loopwatch.metrics_url()\n"
        "print(url.startswith('http://127.0.0.1:'), url.endswith('/metrics'))\n"
        "print(b'loopwatch_slow_callbacks_total' in urllib.request.urlopen(url).read())\n",
        "asyncio",
        LOOPWATCH="1",
        LOOPWATCH_METRICS_PORT="0",
    )
    assert (done.returncode, done.stdout) == (0, "True True\nTrue\n"), done.stderr
    (line,) = done.stderr.splitlines()
    assert line.startswith("loopwatch: metrics at http://127.0.0.1:") and line.endswith("/metrics")


def test_a_port_out_of_range_says_there_is_no_endpoint(tmp_path: Path) -> None:
    done = run_program(
        tmp_path,
        "import asyncio, loopwatch\n"
        "asyncio.run(asyncio.sleep(0))\n"
        "print(loopwatch.metrics_url())\n",
        "asyncio",
        LOOPWATCH="1",
        LOOPWATCH_METRICS_PORT="99999",
    )
    assert (done.returncode, done.stdout) == (0, "None\n")
    assert done.stderr == (
        "loopwatch: LOOPWATCH_METRICS_PORT='99999' is not accepted; expected a port number from "
        "0 to 65535 (0 picks a free port); no metrics endpoint\n"
    )


# -- unknown Pythons stay safe ---------------------------------------------------------------------


UNTESTED = """
import asyncio, sys, time, types
{pretend}
import loopwatch
from loopwatch import _native

async def main():
    time.sleep(0.2)

loopwatch.install(log="off")
with loopwatch.watch() as scope, asyncio.Runner(loop_factory=loopwatch.new_event_loop) as run:
    run.run(main())
print(_native.ACCEL, [e.event for e in scope.events])
"""


@pytest.mark.parametrize(
    ("pretend", "said"),
    [
        ("sys.version_info = (3, 14, 0, 'final', 0)", "cpython 3.14"),
        (
            "sys.implementation = types.SimpleNamespace(**{**vars(sys.implementation), "
            "'name': 'pypy'})",
            "pypy 3.",
        ),
    ],
    ids=["python-3.14", "pypy"],
)
def test_the_compiled_module_loads_only_where_it_was_tested(
    tmp_path: Path, pretend: str, said: str
) -> None:
    """Made to look like an untested interpreter, loopwatch runs pure Python, says so in one
    line, and still reports the block."""
    from loopwatch import _native

    if _native.ACCEL is None:
        pytest.skip("no compiled module on this machine (or LOOPWATCH_ACCEL=0)")
    done = run_program(tmp_path, UNTESTED.replace("{pretend}", pretend), "asyncio")
    assert (done.returncode, done.stdout) == (0, "None ['loopwatch.slow_callback']\n"), done.stderr
    (line,) = done.stderr.splitlines()
    assert line.startswith("loopwatch: the compiled hot paths are tested on CPython 3.11 to 3.13")
    assert said in line and line.endswith("using the pure-Python ones")


def test_process_hooks_are_removable() -> None:
    """Nothing of loopwatch's stays on asyncio's classes after uninstall()."""
    from asyncio.base_events import BaseEventLoop

    loopwatch.install()
    loop = loopwatch.new_event_loop()
    loop.close()
    assert getattr(BaseEventLoop.run_forever, "__loopwatch__", False)
    loopwatch.uninstall()
    for name in ("run_forever", "close", "call_exception_handler", "set_task_factory"):
        assert not getattr(getattr(BaseEventLoop, name), "__loopwatch__", False), name
    assert _runtime.current() is None
    assert asyncio.runners._cancel_all_tasks.__module__ == "asyncio.runners"  # type: ignore[attr-defined]
    assert warnings._warn_unawaited_coroutine.__module__ == "warnings"  # type: ignore[attr-defined]


def test_the_pulse_calls_no_method_of_the_programs_loop(
    factory: Callable[[], asyncio.AbstractEventLoop],
) -> None:
    """A test may count the calls of its loop's methods (janus's counts ``is_closed``): the
    pulse, which on uvloop beats every 10 ms, calls none of them while the loop runs."""
    loopwatch.install()
    loop = factory()
    calls: list[str] = []

    def counted(name: str) -> Callable[..., Any]:
        real = getattr(loop, name)

        def method(*args: Any, **kwargs: Any) -> Any:
            calls.append(name)
            return real(*args, **kwargs)

        return method

    async def main() -> None:
        for name in ("is_closed", "is_running"):
            setattr(loop, name, counted(name))
        await asyncio.sleep(0.1)  # ten beats of the heartbeat, many iterations of the pulse
        for name in ("is_closed", "is_running"):
            delattr(loop, name)

    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
    # (the program's own sleep calls neither; loopwatch's heartbeat called is_closed at each beat)
    assert calls == []
