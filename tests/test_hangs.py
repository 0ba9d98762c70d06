"""Cancellations swallowed and ignored: exact findings, on both loops, and none for the patterns
that withdraw or honour a cancellation (asyncio.timeout, TaskGroup, wait_for, shield, uncancel,
cleanup then re-raise)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import uvloop
from conftest import Recorder, place, run_on

from loopwatch import _api
from loopwatch._events import CancelIgnored, CancelSwallowed, TaskLeaked, TaskStuck
from loopwatch._native import ACCEL

HERE = __file__
Factory = Callable[[], asyncio.AbstractEventLoop]
HANG_EVENTS = ("loopwatch.cancel_swallowed", "loopwatch.cancel_ignored")
LOOPS: dict[str, Factory] = {"asyncio": asyncio.SelectorEventLoop, "uvloop": uvloop.new_event_loop}


@pytest.fixture
def hangs() -> Recorder:
    """loopwatch on, quiet, with a short grace for ignored cancellations."""
    recorder = Recorder()
    _api.activate(log="off", cancel_grace_ms=200).dispatcher.add_sink(recorder)
    return recorder


# -- swallowed --------------------------------------------------------------------------------


async def swallows() -> str:
    try:  # noqa: SIM105 - the mistake under test, spelled as people write it
        await asyncio.sleep(10)  # SWALLOW:sleep
    except asyncio.CancelledError:
        pass
    return "done"


async def swallows_then_raises() -> None:
    try:
        await asyncio.sleep(10)  # SWALLOW:raise
    except asyncio.CancelledError:
        raise ValueError("gave up") from None


async def start_and_cancel(coro_fn: Callable[[], object]) -> asyncio.Task[object]:
    task = asyncio.create_task(coro_fn())  # type: ignore[arg-type]  # SWALLOW:create
    await asyncio.sleep(0.01)
    task.cancel()
    await asyncio.wait([task])
    return task


def test_a_swallowed_cancellation_is_reported_where_it_arrived(
    factory: Factory, hangs: Recorder
) -> None:
    """The task returned after catching CancelledError: one finding, at the line it was
    suspended at when the cancellation arrived, and the task's outcome is as unwatched."""
    task = run_on(factory, start_and_cancel(swallows))
    assert (task.cancelled(), task.result()) == (False, "done")
    (found,) = hangs.wait_for(1, "loopwatch.cancel_swallowed")
    assert isinstance(found, CancelSwallowed)
    assert found.as_dict() | {"time": 0, "pid": 0} == {
        "event": "loopwatch.cancel_swallowed",
        "time": 0,
        "pid": 0,
        "task": task.get_name(),
        "coroutine": "swallows",
        "created_at": place(HERE, "SWALLOW:create", "start_and_cancel"),
        "location": place(HERE, "SWALLOW:sleep", "swallows"),
        "ended": "returned",
        "created_by": None,
        "origin": "program",
    }
    assert [e.event for e in hangs] == ["loopwatch.cancel_swallowed"]


def test_a_cancellation_turned_into_another_exception_is_swallowed_too(
    factory: Factory, hangs: Recorder
) -> None:
    task = run_on(factory, start_and_cancel(swallows_then_raises))
    assert isinstance(task.exception(), ValueError)
    (found,) = hangs.wait_for(1, "loopwatch.cancel_swallowed")
    assert (found.location, found.ended) == (  # type: ignore[attr-defined]
        place(HERE, "SWALLOW:raise", "swallows_then_raises"),
        "ValueError: gave up",
    )


async def catches_group_errors() -> str:
    async def fails() -> None:
        raise KeyError("k")

    try:
        async with asyncio.TaskGroup() as group:  # SWALLOW:group
            group.create_task(fails())
    except Exception:
        return "caught"
    return "ok"


async def awaits_group(inner: list[asyncio.Task[str]]) -> str:
    inner.append(asyncio.create_task(catches_group_errors()))  # SWALLOW:group-create
    return await inner[0]


async def cancel_the_awaiter() -> tuple[asyncio.Task[str], asyncio.Task[str]]:
    """Cancels a task awaiting another (the cancellation passes on to the awaited one) just as
    a task of the awaited one's TaskGroup has failed: the group's errors take the place of the
    cancellation, and the task catches them."""
    inner: list[asyncio.Task[str]] = []
    outer = asyncio.create_task(awaits_group(inner))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    outer.cancel()
    await asyncio.wait([outer])
    return outer, inner[0]


def test_a_cancellation_lost_to_a_task_groups_errors(
    kind: str, factory: Factory, hangs: Recorder
) -> None:
    """Python 3.11 and 3.12 lose the cancellation then: the task returns what its ``except``
    made of the group's errors, ``cancelling()`` still 1, a swallowed cancellation (the task
    awaiting it goes on as if never cancelled). Python 3.13 cancels the task again so as not to
    lose it: the task ends cancelled, and nothing is reported. Each as unwatched."""
    plain = run_on(LOOPS[kind], cancel_the_awaiter())
    outer, inner = run_on(factory, cancel_the_awaiter())
    outcome = [
        (t.cancelled(), t.cancelling(), None if t.cancelled() else t.result())
        for t in (outer, inner)
    ]
    assert outcome == [
        (t.cancelled(), t.cancelling(), None if t.cancelled() else t.result()) for t in plain
    ]
    if sys.version_info >= (3, 13):
        assert outcome == [(True, 1, None), (True, 1, None)]
        time.sleep(0.05)
        assert list(hangs) == []
        return
    assert outcome == [(False, 1, "caught"), (False, 1, "caught")]
    (found,) = hangs.wait_for(1, "loopwatch.cancel_swallowed")
    assert (found.task, found.coroutine, found.created_at, found.location, found.ended) == (  # type: ignore[attr-defined]
        inner.get_name(),
        "catches_group_errors",
        place(HERE, "SWALLOW:group-create", "awaits_group"),
        place(HERE, "SWALLOW:group", "catches_group_errors"),
        "returned",
    )
    assert [e.event for e in hangs] == ["loopwatch.cancel_swallowed"]


def test_a_swallowed_cancellation_is_seen_with_step_timing_off(factory: Factory) -> None:
    """The compiled proxy stays, untimed, and sees where it arrived; in pure Python there is no
    proxy: still reported when the task ends, with no place for it."""
    recorder = Recorder()
    _api.activate(log="off", step_timing=False).dispatcher.add_sink(recorder)
    run_on(factory, start_and_cancel(swallows))
    (found,) = recorder.wait_for(1, "loopwatch.cancel_swallowed")
    where = place(HERE, "SWALLOW:sleep", "swallows") if ACCEL is not None else None
    assert (found.coroutine, found.location) == ("swallows", where)  # type: ignore[attr-defined]


# -- what must never be reported --------------------------------------------------------------


async def with_timeout() -> str:
    try:
        async with asyncio.timeout(0.01):
            await asyncio.sleep(10)
    except TimeoutError:
        pass
    await asyncio.sleep(0)
    return "ok"


async def with_wait_for() -> str:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.sleep(10), 0.01)
    return "ok"


async def with_task_group() -> str:
    async def fails() -> None:
        await asyncio.sleep(0.01)
        raise LookupError("one child fails")

    async def waits() -> None:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            await asyncio.sleep(0)  # cleanup, then the cancellation goes on
            raise

    try:
        async with asyncio.TaskGroup() as group:
            group.create_task(fails())
            group.create_task(waits())
            await asyncio.sleep(10)
    except* LookupError:
        pass
    return "ok"


async def with_task_group_waiting() -> str:
    """The child fails while the parent already waits in the group's ``__aexit__`` (Python 3.11
    and 3.12 leave the parent's ``cancelling()`` at 1 then: the TaskGroup's, not a swallow)."""

    async def times_out() -> None:
        async with asyncio.timeout(0.001):
            await asyncio.Event().wait()

    try:
        async with asyncio.TaskGroup() as group:
            group.create_task(times_out())
    except* TimeoutError:
        pass
    await asyncio.sleep(0)
    return "ok"


async def with_shield() -> str:
    inner = asyncio.create_task(asyncio.sleep(0.05, "inner"))

    async def guarded() -> str:
        return await asyncio.shield(inner)

    outer = asyncio.create_task(guarded())
    await asyncio.sleep(0.01)
    outer.cancel()
    await asyncio.wait([outer])
    return str(await inner)


async def with_uncancel() -> str:
    async def balanced() -> str:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            assert task is not None
            task.uncancel()  # this cancellation is handled here, on purpose
        return "resumed"

    task = asyncio.create_task(balanced())
    await asyncio.sleep(0.01)
    task.cancel()
    return await task


async def with_cleanup_and_reraise() -> str:
    async def cleans_up() -> None:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            await asyncio.sleep(0.01)
            raise

    task = asyncio.create_task(cleans_up())
    await asyncio.sleep(0.01)
    task.cancel()
    await asyncio.wait([task])
    return "cancelled" if task.cancelled() else "not cancelled"


async def cancelled_before_start() -> str:
    task = asyncio.create_task(asyncio.sleep(1))
    task.cancel()
    await asyncio.wait([task])
    return "cancelled" if task.cancelled() else "not cancelled"


async def repeated_timeouts() -> str:
    """A long-lived worker whose every read times out: each cancellation is withdrawn."""
    for _ in range(30):
        try:
            async with asyncio.timeout(0.005):
                await asyncio.sleep(1)
        except TimeoutError:
            pass
    await asyncio.sleep(0.3)  # longer than the grace: nothing is ignored here
    return "ok"


async def with_anyio_scopes() -> str:
    """anyio's cancel scopes catch their own cancellation at the scope's edge, by design."""
    import anyio

    async with anyio.create_task_group() as group:
        group.start_soon(anyio.sleep, 10)
        group.start_soon(anyio.sleep, 10)
        await anyio.sleep(0.01)
        group.cancel_scope.cancel()
    with anyio.move_on_after(0.01):
        await anyio.sleep(10)
    return "ok"


PRECISION = {
    "asyncio.timeout": (with_timeout, "ok"),
    "wait_for": (with_wait_for, "ok"),
    "TaskGroup": (with_task_group, "ok"),
    "TaskGroup, failing while the parent waits": (with_task_group_waiting, "ok"),
    "shield": (with_shield, "inner"),
    "uncancel": (with_uncancel, "resumed"),
    "cleanup then re-raise": (with_cleanup_and_reraise, "cancelled"),
    "cancelled before it started": (cancelled_before_start, "cancelled"),
    "repeated timeouts": (repeated_timeouts, "ok"),
    "anyio cancel scopes": (with_anyio_scopes, "ok"),
}


@pytest.mark.parametrize("pattern", sorted(PRECISION))
def test_correct_cancellation_is_never_reported(
    factory: Factory, hangs: Recorder, pattern: str
) -> None:
    """Each pattern withdraws (uncancel) or honours its cancellations: no finding at all."""
    fn, expected = PRECISION[pattern]
    assert run_on(factory, fn()) == expected
    time.sleep(0.3)  # longer than the grace, with the watchdog looking
    assert [e.event for e in hangs if e.event in HANG_EVENTS] == []


# -- ignored ----------------------------------------------------------------------------------


async def fetch(stop: asyncio.Event) -> None:
    while not stop.is_set():
        try:
            await stop.wait()  # IGNORE:wait
        except asyncio.CancelledError:
            continue  # "not now": the cancellation is dropped


async def worker(stop: asyncio.Event) -> None:
    await fetch(stop)  # IGNORE:fetch


async def ignore_then_stop(hangs: Recorder) -> tuple[float, float]:
    stop = asyncio.Event()
    task = asyncio.create_task(worker(stop))  # IGNORE:create
    await asyncio.sleep(0.01)
    cancelled = time.monotonic()
    task.cancel()
    # The finding comes while the task still hangs (the loop waits, idle, meanwhile).
    while not hangs.named("loopwatch.cancel_ignored"):
        await asyncio.sleep(0.02)
        assert time.monotonic() - cancelled < 5.0, "no cancel_ignored"
    seen = time.monotonic() - cancelled
    assert not task.done()
    task.cancel()  # again: reported once per task
    await asyncio.sleep(0.4)
    stop.set()
    await task
    return seen, time.monotonic() - cancelled


def test_an_ignored_cancellation_is_reported_while_the_task_hangs(
    factory: Factory, hangs: Recorder
) -> None:
    """Once, after the grace, with the task's chain of awaits; the task's end (it returned)
    is then a swallowed cancellation as well."""
    seen, _ = run_on(factory, ignore_then_stop(hangs))
    assert 0.2 <= seen < 1.2
    (found,) = hangs.named("loopwatch.cancel_ignored")
    assert isinstance(found, CancelIgnored)
    assert 0.2 <= found.since_cancel_s < 1.2
    chain = [
        place(HERE, "IGNORE:fetch", "worker"),
        place(HERE, "IGNORE:wait", "fetch"),
    ]
    assert found.as_dict() | {"time": 0, "pid": 0, "since_cancel_s": 0} == {
        "event": "loopwatch.cancel_ignored",
        "time": 0,
        "pid": 0,
        "task": found.task,
        "coroutine": "worker",
        "created_at": place(HERE, "IGNORE:create", "ignore_then_stop"),
        "awaiting": chain[-1],
        "await_chain": chain,
        "since_cancel_s": 0,
        "cancelled_at": chain[-1],
        "created_by": None,
        "origin": "program",
    }
    swallowed = hangs.wait_for(1, "loopwatch.cancel_swallowed")
    assert [(e.coroutine, e.location) for e in swallowed] == [  # type: ignore[attr-defined]
        ("worker", chain[-1])
    ]


def test_a_leaked_task_carries_its_await_chain(factory: Factory, hangs: Recorder) -> None:
    held: list[asyncio.Task[None]] = []  # (unheld, a collection may make it an orphan first)

    async def leaves_one() -> None:
        held.append(asyncio.create_task(worker(asyncio.Event())))  # IGNORE:leak
        await asyncio.sleep(0.01)

    loop = factory()
    try:
        loop.run_until_complete(leaves_one())
    finally:
        loop.close()
    (leak,) = hangs.wait_for(1, "loopwatch.task_leaked")
    assert isinstance(leak, TaskLeaked)
    assert leak.await_chain == (
        place(HERE, "IGNORE:fetch", "worker"),
        place(HERE, "IGNORE:wait", "fetch"),
    )
    assert leak.awaiting == leak.await_chain[-1]


SHUTDOWN = """
import asyncio, sys, time

async def stubborn():
    while True:
        try:
            await asyncio.sleep(3600)  # HANG:sleep
        except asyncio.CancelledError:
            print("not now", flush=True)

async def main():
    asyncio.create_task(stubborn())  # HANG:create
    await asyncio.sleep(0.05)

if sys.argv[1] == "uvloop":
    import uvloop
    uvloop.run(main())
else:
    asyncio.run(main())
"""


@pytest.mark.parametrize("kind", ["asyncio", "uvloop"])
def test_a_shutdown_that_waits_for_ever_is_in_the_log_before_the_kill(
    kind: str, tmp_path: Path
) -> None:
    """``asyncio.run`` cancels what is left and waits; the task ignores it. With LOOPWATCH=1 the
    JSON log has the finding while the process hangs, and a kill loses nothing."""
    script = tmp_path / "hang.py"
    script.write_text(textwrap.dedent(SHUTDOWN))
    log = tmp_path / "events.jsonl"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOPWATCH")}
    env |= {
        "LOOPWATCH": "1",
        "LOOPWATCH_LOG": "json",
        "LOOPWATCH_LOG_FILE": str(log),
        "LOOPWATCH_CANCEL_GRACE_MS": "300",
    }
    proc = subprocess.Popen(
        [sys.executable, str(script), kind], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 10.0
        lines: list[dict[str, object]] = []
        while time.monotonic() < deadline:
            if log.exists():
                lines = [json.loads(line) for line in log.read_text().splitlines()]
                if any(e["event"] == "loopwatch.cancel_ignored" for e in lines):
                    break
            time.sleep(0.05)
        assert proc.poll() is None, "the program hangs, as it does unwatched"
    finally:
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate(timeout=10)
    assert out == "not now\n"
    by_event = {e["event"]: e for e in lines}
    assert sorted(by_event) == ["loopwatch.cancel_ignored", "loopwatch.task_leaked"]
    ignored = by_event["loopwatch.cancel_ignored"]
    hang_at = place(script, "HANG:sleep", "stubborn")
    assert (ignored["coroutine"], ignored["awaiting"], ignored["await_chain"]) == (
        "stubborn",
        hang_at,
        [hang_at],
    )
    assert ignored["created_at"] == place(script, "HANG:create", "main")


# -- the programs of docs/hangs.md ------------------------------------------------------------

HANGS = Path(__file__).resolve().parent.parent / "docs" / "hangs"


def expected_hangs(name: str) -> tuple[str, list[dict[str, object]]]:
    path = HANGS / f"{name}.py"
    if name == "swallowed":
        waits = place(path, "waiting for work when shutdown cancels it", "consume")
        return "consumer returned 7; cancelled: False\n", [
            {
                "event": "loopwatch.cancel_swallowed",
                "task": "Task-2",
                "coroutine": "consume",
                "created_at": place(path, "the consumer starts", "main"),
                "location": waits,
                "ended": "returned",
            }
        ]
    waits = place(path, '"not until the buffer is flushed"', "flush")
    created = place(path, "the flusher starts", "main")
    return "flusher finished after its cancellation: False\n", [
        {
            "event": "loopwatch.cancel_ignored",
            "task": "Task-2",
            "coroutine": "flush",
            "created_at": created,
            "awaiting": waits,
            "await_chain": [waits],
            "cancelled_at": waits,
        },
        {
            "event": "loopwatch.cancel_swallowed",
            "task": "Task-2",
            "coroutine": "flush",
            "created_at": created,
            "location": waits,
            "ended": "returned",
        },
    ]


def test_every_hang_program_is_on_the_page() -> None:
    page = (HANGS.parent / "hangs.md").read_text()
    names = sorted(p.stem for p in HANGS.glob("*.py"))
    assert names == ["ignored", "swallowed"]
    assert [n for n in names if f"hangs/{n}.py" not in page] == []


@pytest.mark.parametrize("name", ["ignored", "swallowed"])
def test_hang_program_findings(tmp_path: Path, name: str, kind: str) -> None:
    """LOOPWATCH=1 python docs/hangs/NAME.py [--uvloop]: exactly the findings on the page."""
    log = tmp_path / "events.jsonl"
    command = [sys.executable, str(HANGS / f"{name}.py")]
    if kind == "uvloop":
        command.append("--uvloop")
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOPWATCH")}
    env |= {
        "LOOPWATCH": "1",
        "LOOPWATCH_LOG": "json",
        "LOOPWATCH_LOG_FILE": str(log),
        "LOOPWATCH_CANCEL_GRACE_MS": "300",
    }
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    stdout, want = expected_hangs(name)
    assert (proc.stdout, proc.stderr) == (stdout, "")
    got = [json.loads(line) for line in log.read_text().splitlines()]
    drop = {"time", "pid", "origin", "created_by", "since_cancel_s"}
    assert [{k: v for k, v in e.items() if k not in drop} for e in got] == want
    assert all(e["origin"] == "program" for e in got)


# -- deadlocks and stuck tasks ----------------------------------------------------------------

DEADLOCK = """
import asyncio, json, os, sys, threading
import loopwatch
from loopwatch import _api

found = []
done = threading.Event()

def sink(event):
    if event.event == "loopwatch.deadlock":
        found.append(event.as_dict())
        if len(found) == int(sys.argv[2]):
            done.set()

_api.activate(log="off", deadlock_check_ms=50).dispatcher.add_sink(sink)
held = {}

async def first():
    await asyncio.sleep(0.01)
    await held["second"]  # CYCLE:first

async def second():
    await asyncio.sleep(0.01)
    await asyncio.gather(held["first"])  # CYCLE:second

async def guarded():
    await asyncio.shield(held["inner"])  # CYCLE:shield

async def inner():
    await asyncio.sleep(0.01)
    await held["guarded"]  # CYCLE:inner

async def chain_a():
    await held["chain_b"]  # NOCYCLE:a

async def chain_b():
    await asyncio.sleep(0.5)  # NOCYCLE:b

async def main():
    held["first"] = asyncio.create_task(first(), name="first")
    held["second"] = asyncio.create_task(second(), name="second")
    held["inner"] = asyncio.create_task(inner(), name="inner")
    held["guarded"] = asyncio.create_task(guarded(), name="guarded")
    held["chain_b"] = asyncio.create_task(chain_b(), name="chain_b")
    held["chain_a"] = asyncio.create_task(chain_a(), name="chain_a")
    await asyncio.sleep(0.4)  # several checks: each cycle once

def watch():
    done.wait(5)
    import time
    time.sleep(0.3)
    print(json.dumps(sorted(found, key=lambda e: e["tasks"])), flush=True)
    os._exit(0)  # (a deadlock cannot be cancelled: asyncio recurses through the cycle)

threading.Thread(target=watch).start()
factory = loopwatch.new_uvloop_event_loop if sys.argv[1] == "uvloop" else loopwatch.new_event_loop
loop = factory()
loop.run_until_complete(main())
threading.Event().wait()
"""


def test_a_cycle_of_tasks_waiting_on_each_other_is_a_deadlock(tmp_path: Path, kind: str) -> None:
    """Through ``await task``, ``gather`` and ``shield``: each cycle once, in wait order, with
    the place each task waits at; a chain that is no cycle is not one."""
    script = tmp_path / "deadlock.py"
    script.write_text(textwrap.dedent(DEADLOCK))
    proc = subprocess.run(
        [sys.executable, str(script), kind, "2"], capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 0, proc.stderr
    found = json.loads(proc.stdout)
    drop = {"time", "pid"}
    assert [{k: v for k, v in e.items() if k not in drop} for e in found] == [
        {
            "event": "loopwatch.deadlock",
            "tasks": ["first", "second"],
            "cycle": [
                place(script, "CYCLE:first", "first"),
                place(script, "CYCLE:second", "second"),
            ],
            "coroutines": ["first", "second"],
            "origin": "program",
        },
        {
            "event": "loopwatch.deadlock",
            "tasks": ["guarded", "inner"],
            "cycle": [
                place(script, "CYCLE:shield", "guarded"),
                place(script, "CYCLE:inner", "inner"),
            ],
            "coroutines": ["guarded", "inner"],
            "origin": "program",
        },
    ]


async def waits_long(ready: asyncio.Event) -> None:
    await ready.wait()  # STUCK:wait


async def keeps_going(ready: asyncio.Event) -> None:
    while not ready.is_set():
        await asyncio.sleep(0.01)


async def stuck_scene(recorder: Recorder) -> None:
    ready = asyncio.Event()
    stuck = asyncio.create_task(waits_long(ready), name="stuck")  # STUCK:create
    moving = asyncio.create_task(keeps_going(ready), name="moving")
    await asyncio.sleep(0.6)
    ready.set()
    await asyncio.gather(stuck, moving)


def test_a_task_stuck_at_one_await_is_reported_once(factory: Factory) -> None:
    """With TASK_STUCK_MS: the task that waits, once, at its line; the task that keeps stepping
    never; the main task (waiting on a sleep that long) is stuck too, by the same rule."""
    recorder = Recorder()
    _api.activate(log="off", task_stuck_ms=200).dispatcher.add_sink(recorder)
    run_on(factory, stuck_scene(recorder))
    stuck = {e.task: e for e in recorder.named("loopwatch.task_stuck")}  # type: ignore[attr-defined]
    assert "moving" not in stuck
    assert len(stuck) == 2, sorted(stuck)
    event = stuck["stuck"]
    assert isinstance(event, TaskStuck)
    assert (event.coroutine, event.awaiting, event.await_chain, event.created_at) == (
        "waits_long",
        place(HERE, "STUCK:wait", "waits_long"),
        (place(HERE, "STUCK:wait", "waits_long"),),
        place(HERE, "STUCK:create", "stuck_scene"),
    )
    assert 0.2 <= event.waiting_s < 0.5


def test_stuck_tasks_are_not_looked_for_unless_asked(factory: Factory, hangs: Recorder) -> None:
    run_on(factory, stuck_scene(hangs))
    assert hangs.named("loopwatch.task_stuck") == []
