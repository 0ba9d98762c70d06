"""loopwatch is never the incident: it cannot deadlock the program, keep its objects alive, run
its finalizers on another thread, swallow its Ctrl-C, or change what its tasks look like. Each
program here runs plain and watched (``LOOPWATCH=1``) under a hard timeout, on both loops, and
must print the same, end the same, and say no more than its findings."""

from __future__ import annotations

import asyncio
import gc
import os
import subprocess
import sys
import textwrap
import threading
import time
import weakref
from pathlib import Path
from types import CoroutineType
from typing import Any

import pytest
from conftest import Recorder, registry, run_on

import loopwatch
from loopwatch import _runtime
from loopwatch._native import ACCEL

RUNS = {"asyncio": "asyncio.run(main())", "uvloop": "uvloop.run(main())"}
HERE = __file__


def run_program(
    tmp_path: Path, source: str, kind: str, *, timeout: float = 60, **env: str
) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "app.py"
    path.write_text(textwrap.dedent(source).replace("{run}", RUNS[kind]))
    base = {k: v for k, v in os.environ.items() if not k.startswith("LOOPWATCH")}
    return subprocess.run(
        [sys.executable, str(path)],
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=tmp_path,
    )


def same(tmp_path: Path, source: str, kind: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Plain, then watched: the same stdout, stderr and exit code. Returns the plain run."""
    plain = run_program(tmp_path, source, kind)
    watched = run_program(
        tmp_path, source, kind, **{"LOOPWATCH": "1", "LOOPWATCH_LOG": "off", **env}
    )
    assert (watched.stdout, watched.stderr, watched.returncode) == (
        plain.stdout,
        plain.stderr,
        plain.returncode,
    )
    return plain


DEADLOCK = """
import asyncio, gc, time, uvloop

async def waits_forever(fut):
    await fut

async def main():
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda l, c: None)
    gc.set_threshold(1)
    for i in range(1500):
        t = loop.create_task(waits_forever(loop.create_future()))
        await asyncio.sleep(0)
        del t
        time.sleep(0.0012)  # a slow step (threshold 1 ms), reported from this thread
        await asyncio.sleep(0)
    print("finished without deadlock")

{run}
"""


def test_no_deadlock_when_the_collector_reports_inside_loopwatch(tmp_path: Path, kind: str) -> None:
    """Orphans found by the collector (at any allocation, possibly inside loopwatch) while slow
    steps are being reported: the collector's report only queues its event, no lock of
    loopwatch's is held while anything is called, so the thread never waits on itself."""
    log = str(tmp_path / "findings.jsonl")
    plain = same(
        tmp_path,
        DEADLOCK,
        kind,
        LOOPWATCH_SLOW_CALLBACK_MS="1",
        LOOPWATCH_LOG="json",
        LOOPWATCH_LOG_FILE=log,
    )
    assert plain.stdout == "finished without deadlock\n"


LOST_ERROR = """
import asyncio, gc, time, uvloop, weakref

async def fails_once_blocked():
    time.sleep(0.15)  # a slow step: the watchdog follows it
    await asyncio.sleep(0)
    raise ValueError("lost")

async def main():
    loop = asyncio.get_running_loop()
    seen = []
    loop.set_exception_handler(lambda l, c: seen.append(c["message"]))
    ref = weakref.ref(loop.create_task(fails_once_blocked()))  # fire and forget
    await asyncio.sleep(0.4)
    gc.collect()
    await asyncio.sleep(0.05)
    print("task still alive:", ref() is not None, "| handler saw:", seen)

{run}
"""


def test_a_failed_task_is_collected_and_its_error_reported_as_unwatched(
    tmp_path: Path, kind: str
) -> None:
    """The watchdog keeps no task: the one that blocked once and then failed is collected, and
    asyncio's "Task exception was never retrieved" reaches the program's handler."""
    plain = same(tmp_path, LOST_ERROR, kind)
    assert plain.stdout == (
        "task still alive: False | handler saw: ['Task exception was never retrieved']\n"
    )


FINALIZER = """
import asyncio, threading, time, uvloop

class Local:
    def __del__(self):
        print("__del__ on", threading.current_thread().name, flush=True)

def blocking_callback():
    local = Local()  # lives in the blocking callback's frame
    time.sleep(0.3)

async def main():
    asyncio.get_running_loop().call_soon(blocking_callback)
    await asyncio.sleep(0.5)

{run}
"""


def test_the_programs_finalizers_run_on_its_own_thread(tmp_path: Path, kind: str) -> None:
    """The watchdog sampled the blocking callback's frame: that frame (and its locals) is let go
    of by the loop's own thread, so ``__del__`` runs where it would unwatched."""
    plain = same(tmp_path, FINALIZER, kind)
    assert plain.stdout == "__del__ on MainThread\n"


LOOPS_ON_THREADS = """
import asyncio, threading, time, uvloop

async def main():
    await asyncio.sleep(0)
    return 1

def worker(results, slowest):
    for _ in range(25):
        began = time.monotonic()
        results.append({run})
        slowest.append(time.monotonic() - began)

results, slowest = [], []
threads = [threading.Thread(target=worker, args=(results, slowest)) for _ in range(8)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(len(results), sum(results), "every run under a second:", max(slowest) < 1.0)
"""


def test_loops_closed_on_many_threads_at_once(tmp_path: Path, kind: str) -> None:
    """Eight threads each run and close loops (as async-lru's per-thread caching test does): every
    close stops loopwatch's threads when its last loop leaves, while other threads start them
    again. The compiled join let two threads join one OS thread, which crashed the process (a
    join of a joined thread is undefined); and a thread of an older generation could take the
    wake-up meant for the current one, so a loop's close waited out the join's timeout (2 to 5
    s, 98 s in all once). Each run of a loop now takes what it takes unwatched."""
    for _ in range(3):
        plain = same(tmp_path, LOOPS_ON_THREADS, kind)
        assert (plain.stdout, plain.returncode) == ("200 200 every run under a second: True\n", 0)


def test_a_restarted_worker_stops_at_once_whichever_thread_the_wake_woke() -> None:
    """Threads of two generations of one worker can wait on one wake-up (a loop on another
    thread started it again while the older thread was still waiting), and a wake-up wakes one
    of them. Here it wakes the older one (a semaphore wakes its waiters in order): as it ends it
    passes the wake-up on, so stopping the current thread never waits out the join's timeout
    (loops closed on many threads at once met this under load: 2 to 5 s per close)."""
    import threading

    from loopwatch import _threads

    bell = threading.Semaphore(0)
    muted = [True]

    def ring() -> None:
        if not muted[0]:
            bell.release()

    def waiting() -> int:
        return len(bell._cond._waiters)  # type: ignore[attr-defined]

    def body(keep_going: Any) -> None:
        while keep_going():
            bell.acquire()

    worker = _threads.Worker("test", body, ring)
    try:
        worker.start()
        deadline = time.monotonic() + 5
        while waiting() < 1 and time.monotonic() < deadline:
            time.sleep(0.001)
        worker.stop(wait=False)  # asked to end, but not woken: still waiting
        worker.start()  # the next generation waits behind it
        while waiting() < 2 and time.monotonic() < deadline:
            time.sleep(0.001)
        assert waiting() == 2
        muted[0] = False
        began = time.monotonic()
        stopped = worker.stop(timeout=3.0, wait=True)  # the wake-up goes to the older thread
        took = time.monotonic() - began
    finally:
        muted[0] = False
        worker.stop(timeout=0.5, wait=True)
        _threads.discard(worker)
        for _ in range(4):
            bell.release()
    assert stopped
    assert took < 1.0, took


INTERRUPTS = """
import asyncio, gc, signal, sys, uvloop

class Stop(BaseException):
    pass

async def waits(fut):
    await fut

def handler(loop, context):
    if context["message"].startswith("Task was destroyed"):
        raise KeyboardInterrupt("from the program's exception handler")

async def main():
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(handler)
    loop.create_task(waits(loop.create_future()))  # nobody holds it
    await asyncio.sleep(0.01)
    gc.collect()  # its finalizer calls the handler, which raises
    await asyncio.sleep(0.01)
    print("not reached")

try:
    {run}
except KeyboardInterrupt as exc:
    import traceback
    print("interrupted:", exc, "| loopwatch frames:", traceback.format_exc().count("loopwatch"))
"""


def test_keyboard_interrupt_from_the_programs_handler_passes_through(
    tmp_path: Path, kind: str
) -> None:
    """A program's exception handler raising KeyboardInterrupt, reached through loopwatch's hook
    of ``call_exception_handler``: it goes on unchanged, with no loopwatch frame."""
    plain = same(tmp_path, INTERRUPTS, kind)
    assert plain.stdout.startswith("interrupted:") or "not reached" in plain.stdout, plain.stdout


def test_get_coro_is_the_programs_coroutine(factory: Any, events: Recorder) -> None:
    """``task.get_coro()`` returns the coroutine the program passed, which can be weakly
    referenced; the proxy the task drives stays loopwatch's business."""
    seen: list[Any] = []

    async def child() -> str:
        await asyncio.sleep(0)
        return "done"

    async def main() -> None:
        coro = child()
        task = asyncio.create_task(coro)
        assert task.get_coro() is coro
        ref = weakref.ref(task.get_coro())
        seen.append(ref() is coro)
        seen.append(await task)
        seen.append(repr(task).startswith("<Task finished name="))

    run_on(factory, main())
    assert seen == [True, "done", True]


@pytest.mark.skipif(ACCEL is None, reason="pure Python: run_forever's hook is a Python frame")
def test_no_loopwatch_frame_in_cr_origin(factory: Any, events: Recorder) -> None:
    """With coroutine origin tracking on (asyncio debug mode, or a deeper creation stack), a
    coroutine made inside a task's step has no frame of loopwatch's in ``cr_origin``."""
    origins: list[Any] = []

    async def inner() -> None:
        pass

    async def step() -> None:
        coro = inner()
        origins.append(coro.cr_origin)
        await coro

    async def main() -> None:
        await asyncio.create_task(step())

    before = sys.get_coroutine_origin_tracking_depth()
    sys.set_coroutine_origin_tracking_depth(20)
    try:
        run_on(factory, main())
    finally:
        sys.set_coroutine_origin_tracking_depth(before)
    (origin,) = origins
    assert origin, origin
    assert [f for f, _, _ in origin if "/loopwatch/" in f] == [], origin


def test_tasks_destroyed_pending_are_counted_gone(factory: Any, events: Recorder) -> None:
    """Tasks dropped while pending (orphans) leave no task counted as active, whatever thread
    the collector finds them on."""

    async def waits(fut: asyncio.Future[None]) -> None:
        await fut

    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _loop, _context: None)
        for _ in range(20):
            loop.create_task(waits(loop.create_future()))
        await asyncio.sleep(0.01)
        assert registry().active_tasks() >= 20
        thread = threading.Thread(target=gc.collect)  # found on another thread
        thread.start()
        thread.join()
        await asyncio.sleep(0.01)

    run_on(factory, main())
    gc.collect()
    totals = registry().task_totals()
    assert (totals.orphaned, registry().active_tasks()) == (20, 0)
    assert len(events.wait_for(20, "loopwatch.task_orphaned")) == 20


def test_counts_from_many_threads_are_exact(factory: Any, events: Recorder) -> None:
    """Orphans reported from four threads at once while the loop thread makes and ends tasks:
    every count is exact (atomic counters for what a finalizer reports)."""
    orphans_per_thread = 250

    async def waits(fut: asyncio.Future[None]) -> None:
        await fut

    async def quick() -> None:
        await asyncio.sleep(0)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _loop, _context: None)
        batches = []
        for _ in range(4):
            made = [
                loop.create_task(waits(loop.create_future())) for _ in range(orphans_per_thread)
            ]
            batches.append(made)
        await asyncio.sleep(0.01)

        def drop(batch: list[asyncio.Task[None]]) -> None:
            batch.clear()
            gc.collect()

        threads = [threading.Thread(target=drop, args=(b,)) for b in batches]
        for thread in threads:
            thread.start()
        for _ in range(200):  # meanwhile, the loop thread counts tasks of its own
            await asyncio.gather(*(asyncio.create_task(quick()) for _ in range(5)))
        for thread in threads:
            thread.join()
        del batches
        gc.collect()

    run_on(factory, main())
    gc.collect()
    totals = registry().task_totals()
    assert totals.orphaned == 4 * orphans_per_thread
    assert registry().active_tasks() == 0
    runtime = _runtime.current()
    assert runtime is not None
    assert runtime.dispatcher.counts["loopwatch.task_orphaned"] == 4 * orphans_per_thread


# -- the stress test ------------------------------------------------------------------------------

STRESS = """
import asyncio, gc, os, signal, sys, time, uvloop

FLOOD = {flood}

async def orphan():
    await asyncio.get_running_loop().create_future()

async def fails():
    await asyncio.sleep(0)
    raise RuntimeError("nobody retrieves this")

async def slow_steps(n):
    for _ in range(n):
        time.sleep(0.003)  # above the 2 ms threshold: a flood of slow_callback findings
        await asyncio.sleep(0)

async def child_work():
    await asyncio.sleep(0.01)
    time.sleep(0.01)
    return 5

async def main():
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda l, c: None)
    gc.set_threshold(5)
    interrupted = []
    signal.signal(signal.SIGUSR1, lambda *a: interrupted.append(1))
    for round_ in range(FLOOD):
        for _ in range(20):
            loop.create_task(orphan())
            loop.create_task(fails())
        await slow_steps(5)
        os.kill(os.getpid(), signal.SIGUSR1)  # a signal while exporters may be writing
        if round_ % 5 == 0:
            pid = os.fork()  # inside the running loop
            if pid == 0:
                {reset}
                code = {run_child}
                os._exit(code)
            while not os.waitpid(pid, os.WNOHANG)[0]:
                await asyncio.sleep(0.002)
    gc.collect()
    await asyncio.sleep(0.05)
    print("rounds", FLOOD, "signals", len(interrupted))
    sys.exit(3)

{run}
"""


@pytest.mark.parametrize(
    "exporter",
    ["json", "logging", "raising"],
    ids=["json-lines", "logging", "exporter-raises"],
)
def test_stress_watched_and_plain_end_the_same(tmp_path: Path, kind: str, exporter: str) -> None:
    """Collector pressure, orphans, lost exceptions, a flood of slow steps, signals and forks
    inside the running loop, with each log exporter (and one whose handler raises): the same
    output and exit code as unwatched, no hang, and nothing said but the findings."""
    reset = "asyncio.events._set_running_loop(None)" if sys.version_info < (3, 12) else "pass"
    run_child = RUNS[kind].replace("main()", "child_work()")
    source = (
        STRESS.replace("{flood}", "15").replace("{reset}", reset).replace("{run_child}", run_child)
    )
    plain = run_program(tmp_path, source, kind, timeout=120)
    assert (plain.returncode, plain.stdout, plain.stderr) == (3, "rounds 15 signals 15\n", "")
    env = {"LOOPWATCH": "1", "LOOPWATCH_SLOW_CALLBACK_MS": "2"}
    log = tmp_path / "findings.jsonl"
    if exporter == "json":
        env.update(LOOPWATCH_LOG="json", LOOPWATCH_LOG_FILE=str(log))
    elif exporter == "logging":
        env.update(LOOPWATCH_LOG="logging")
    else:
        (tmp_path / "sitecustomize.py").write_text(
            "import logging\n"
            "class Broken(logging.Handler):\n"
            "    def emit(self, record):\n"
            "        raise OSError('the disk is full')\n"
            "logging.getLogger('loopwatch').addHandler(Broken())\n"
            "logging.getLogger('loopwatch').propagate = False\n"
        )
        env.update(LOOPWATCH_LOG="logging", PYTHONPATH=str(tmp_path))
    started = time.monotonic()
    watched = run_program(tmp_path, source, kind, timeout=120, **env)
    assert time.monotonic() - started < 120
    assert (watched.returncode, watched.stdout) == (3, plain.stdout), watched.stderr
    said = [line for line in watched.stderr.splitlines() if not line.startswith((" ", "\t"))]
    if exporter == "json":
        assert said == []
        assert log.read_text().count('"event":"loopwatch.slow_callback"') >= 1
    elif exporter == "logging":
        assert said and all(line.startswith("loopwatch.") for line in said), said[:5]
    else:
        # The program's handler raises on loopwatch's records: that exporter is disabled and
        # said once; the program is untouched.
        assert said == [
            "loopwatch: exporter logging failed (OSError: the disk is full); it is disabled"
        ]


def test_a_coroutine_is_still_a_coroutine_to_the_program(factory: Any, events: Recorder) -> None:
    seen: list[Any] = []

    async def work() -> None:
        task = asyncio.current_task()
        assert task is not None
        seen.append(type(task.get_coro()) is CoroutineType)
        seen.append(asyncio.iscoroutine(task.get_coro()))

    run_on(factory, work())
    assert seen == [True, True]


def test_uninstall_leaves_the_program_running(events: Recorder) -> None:
    """uninstall() from inside a running loop: the loop goes on, unwatched."""

    async def main() -> str:
        await asyncio.sleep(0.01)
        loopwatch.uninstall()
        await asyncio.sleep(0.01)
        return "ran on"

    assert run_on(loopwatch.new_event_loop, main()) == "ran on"
