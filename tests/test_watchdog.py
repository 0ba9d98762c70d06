"""Blocks caught while they happen, on stock asyncio and uvloop: one event each, exact fields."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import re
import socket
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from conftest import Recorder, place, run_on

Factory = Callable[[], asyncio.AbstractEventLoop]

pytestmark = pytest.mark.serial

HERE = __file__
# The heartbeat's precision at the default threshold is one period (10 ms); allow for the
# scheduler of a loaded 2-core machine on top.
TOLERANCE = 0.04


def assert_block(
    event: object,
    *,
    kind: str,
    duration: float,
    task: str | None,
    coroutine: str | None,
    location: str,
) -> None:
    assert event.event == "loopwatch.slow_callback"  # type: ignore[attr-defined]
    assert event.task == task  # type: ignore[attr-defined]
    assert event.coroutine == coroutine  # type: ignore[attr-defined]
    assert event.location == location  # type: ignore[attr-defined]
    assert event.loop == kind  # type: ignore[attr-defined]
    assert event.threshold_s == 0.1  # type: ignore[attr-defined]
    assert abs(event.duration_s - duration) <= TOLERANCE, event.duration_s  # type: ignore[attr-defined]
    # The stack is outermost first and ends at the blocking line, in the program's own code.
    assert event.stack[-1] == location  # type: ignore[attr-defined]


async def blocking_step() -> None:
    await asyncio.sleep(0)
    time.sleep(0.3)  # BLOCK:task-step
    await asyncio.sleep(0)


def test_block_in_task_step(factory: Factory, kind: str, events: Recorder) -> None:
    """A task step that sleeps 0.3 s is one slow_callback naming the task, coroutine and line."""

    async def main() -> None:
        await asyncio.create_task(blocking_step(), name="stepper")
        await asyncio.sleep(0.05)

    run_on(factory, main())
    found = events.wait_for(1)
    assert len(found) == 1, found
    assert_block(
        found[0],
        kind=kind,
        duration=0.3,
        task="stepper",
        coroutine="blocking_step",
        location=place(HERE, "BLOCK:task-step", "blocking_step"),
    )
    assert any(p.endswith("in test_block_in_task_step") for p in found[0].stack)  # type: ignore[attr-defined]


def blocking_callback() -> None:
    time.sleep(0.25)  # BLOCK:call_soon


def test_block_in_call_soon_callback(factory: Factory, kind: str, events: Recorder) -> None:
    """A plain callback has no task: task and coroutine are None."""

    async def main() -> None:
        asyncio.get_running_loop().call_soon(blocking_callback)
        await asyncio.sleep(0.35)

    run_on(factory, main())
    found = events.wait_for(1)
    assert len(found) == 1, found
    assert_block(
        found[0],
        kind=kind,
        duration=0.25,
        task=None,
        coroutine=None,
        location=place(HERE, "BLOCK:call_soon", "blocking_callback"),
    )


def blocking_timer() -> None:
    time.sleep(0.2)  # BLOCK:call_later


def test_block_in_call_later_timer(factory: Factory, kind: str, events: Recorder) -> None:
    async def main() -> None:
        asyncio.get_running_loop().call_later(0.05, blocking_timer)
        await asyncio.sleep(0.4)

    run_on(factory, main())
    found = events.wait_for(1)
    assert len(found) == 1, found
    assert_block(
        found[0],
        kind=kind,
        duration=0.2,
        task=None,
        coroutine=None,
        location=place(HERE, "BLOCK:call_later", "blocking_timer"),
    )


class BlockingProtocol(asyncio.Protocol):
    def data_received(self, data: bytes) -> None:
        time.sleep(0.25)  # BLOCK:data_received


def test_block_in_protocol_data_received(factory: Factory, kind: str, events: Recorder) -> None:
    """uvloop runs data_received from C with no callback hook: only the watchdog sees it."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(BlockingProtocol, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        # A real client socket in a thread, so that nothing on the loop is mistaken for the block.
        await asyncio.to_thread(_send_and_close, port)
        await asyncio.sleep(0.4)
        server.close()
        await server.wait_closed()

    run_on(factory, main())
    found = events.wait_for(1)
    assert len(found) == 1, found
    assert_block(
        found[0],
        kind=kind,
        duration=0.25,
        task=None,
        coroutine=None,
        location=place(HERE, "BLOCK:data_received", "data_received"),
    )


def _send_and_close(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"hello")
        time.sleep(0.05)


def blocking_done_callback(fut: asyncio.Future[int]) -> None:
    time.sleep(0.2)  # BLOCK:done-callback


def test_block_in_future_done_callback(factory: Factory, kind: str, events: Recorder) -> None:
    async def main() -> None:
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        fut.add_done_callback(blocking_done_callback)
        fut.set_result(1)
        await asyncio.sleep(0.35)

    run_on(factory, main())
    found = events.wait_for(1)
    assert len(found) == 1, found
    assert_block(
        found[0],
        kind=kind,
        duration=0.2,
        task=None,
        coroutine=None,
        location=place(HERE, "BLOCK:done-callback", "blocking_done_callback"),
    )


async def hang(ended: list[float]) -> None:
    time.sleep(0.7)  # BLOCK:stall
    ended.append(time.monotonic())


def test_stall_reported_while_still_blocked(factory: Factory, kind: str, events: Recorder) -> None:
    """loop_stalled arrives during the block (before it ends); slow_callback follows at the end."""
    import loopwatch

    ended: list[float] = []

    async def main() -> None:
        loopwatch.install(stall_ms=300)
        await asyncio.sleep(0.02)
        await asyncio.create_task(hang(ended), name="hanger")
        await asyncio.sleep(0.05)

    run_on(factory, main())
    found = events.wait_for(2)
    assert [e.event for e in found] == ["loopwatch.loop_stalled", "loopwatch.slow_callback"]
    stall, block = found
    assert events.arrived[0] < ended[0], "the stall must be reported while the loop is blocked"
    location = place(HERE, "BLOCK:stall", "hang")
    assert stall.location == location  # type: ignore[attr-defined]
    assert stall.task == "hanger" and stall.coroutine == "hang"  # type: ignore[attr-defined]
    assert stall.loop == kind  # type: ignore[attr-defined]
    assert 0.3 <= stall.blocked_s <= 0.3 + 0.1 + TOLERANCE  # type: ignore[attr-defined]
    assert stall.stack[-1] == location  # type: ignore[attr-defined]
    assert_block(block, kind=kind, duration=0.7, task="hanger", coroutine="hang", location=location)


async def idle_worker(event: asyncio.Event) -> None:
    await event.wait()  # WAIT:idle-worker


def test_stall_lists_the_tasks_waiting_longest(
    factory: Factory, kind: str, events: Recorder
) -> None:
    """loop_stalled says what the rest of the program was doing: the tasks that have waited
    longest (age less busy time), longest first, each with the place it waits at."""
    import loopwatch

    ended: list[float] = []

    main_task: list[str] = []

    async def main() -> None:
        loopwatch.install(stall_ms=300)
        main_task.append(asyncio.current_task().get_name())  # type: ignore[union-attr]
        event = asyncio.Event()
        await asyncio.sleep(0.1)  # main waits 0.1 s longer than old-worker (not a busy install)
        old = asyncio.create_task(idle_worker(event), name="old-worker")
        await asyncio.sleep(0.1)
        young = asyncio.create_task(idle_worker(event), name="young-worker")
        await asyncio.sleep(0.02)
        await asyncio.create_task(hang(ended), name="hanger")
        event.set()
        await asyncio.gather(old, young)

    run_on(factory, main())
    stall = events.wait_for(2)[0]
    assert stall.event == "loopwatch.loop_stalled"
    assert stall.task == "hanger"  # type: ignore[attr-defined]
    # Oldest first: main (awaiting the hanger), then the two workers; never the running hanger.
    assert list(stall.waiting_tasks) == [main_task[0], "old-worker", "young-worker"]  # type: ignore[attr-defined]
    waits = place(HERE, "WAIT:idle-worker", "idle_worker")
    assert list(stall.waiting_at[1:]) == [waits, waits]  # type: ignore[attr-defined]
    assert stall.waiting_at[0].endswith(" in main")  # type: ignore[attr-defined]
    main_s, old_s, young_s = stall.waiting_s  # type: ignore[attr-defined]
    assert main_s >= old_s + 0.09 and old_s >= young_s + 0.09 and young_s >= 0.3, stall.waiting_s


async def just_over() -> None:
    time.sleep(0.125)  # BLOCK:just-over


def test_block_just_over_threshold_has_its_stack(
    factory: Factory, kind: str, events: Recorder
) -> None:
    """A block of 1.25 x the threshold is caught with its stack: sampled while it ran."""

    async def main() -> None:
        await asyncio.sleep(0.02)
        await asyncio.create_task(just_over(), name="brief")
        await asyncio.sleep(0.05)

    run_on(factory, main())
    found = events.wait_for(1)
    assert len(found) == 1, found
    assert found[0].location == place(HERE, "BLOCK:just-over", "just_over")  # type: ignore[attr-defined]


async def holds_the_gil() -> None:
    # A regular expression that backtracks: a C call that never lets the GIL go, so the
    # watchdog's thread cannot take a sample while it runs (about 0.4 s here).
    re.match(r"(a+)+$", "a" * 23 + "b")
    await asyncio.sleep(0)  # BLOCK:gil


async def runner(coro: Any) -> None:
    await coro  # a test runner's task awaits the test (anyio's does)


def test_a_step_the_watchdog_could_not_sample_is_placed_in_the_program(
    factory: Factory, events: Recorder
) -> None:
    """A step that held the GIL for its whole length is reported by the loop's thread when it
    ends (or by the watchdog right after it), at the innermost line of the program's own code
    along the task's awaits: the test's line, not the runner's that awaits it."""

    async def main() -> None:
        await asyncio.create_task(runner(holds_the_gil()), name="runner-task")

    run_on(factory, main())
    found = events.wait_for(1)
    assert len(found) == 1, found
    block = found[0]
    assert block.task == "runner-task" and block.coroutine == "runner"  # type: ignore[attr-defined]
    assert block.duration_s >= 0.1  # type: ignore[attr-defined]
    location = block.location  # type: ignore[attr-defined]
    assert location.startswith(f"{HERE}:") and location.endswith(" in holds_the_gil"), location


def test_where_a_task_is_suspended_follows_its_awaits_into_the_program() -> None:
    """How the loop's thread places a step the watchdog never sampled: the innermost frame of
    the program's code the task's awaits lead to, not the outermost coroutine's line."""
    from loopwatch._watchdog import suspended_place

    async def inner(gate: asyncio.Event) -> None:
        await gate.wait()  # BLOCK:suspended

    async def main() -> str | None:
        gate = asyncio.Event()
        task = asyncio.create_task(runner(inner(gate)))
        await asyncio.sleep(0)
        where = suspended_place(task)
        gate.set()
        await task
        return where

    assert asyncio.run(main()) == place(HERE, "BLOCK:suspended", "inner")


async def busy_worker(steps: int) -> None:
    for _ in range(steps):
        end = time.perf_counter() + 0.0002
        while time.perf_counter() < end:
            pass
        await asyncio.sleep(0)


@contextlib.contextmanager
def no_collector() -> Iterator[None]:
    """The collector off for a test that must see no block: a full collection of the test
    process's heap takes 30 to 70 ms here, inside whichever step allocates, and on a slower
    machine that step really would block the loop past the threshold."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def test_saturated_loop_without_a_long_callback_reports_nothing(
    factory: Factory, events: Recorder
) -> None:
    """800 tasks x 0.2 ms steps: iterations of ~160 ms, late heartbeats, but no callback is slow."""

    async def main() -> None:
        await asyncio.gather(*(busy_worker(8) for _ in range(800)))

    with no_collector():
        run_on(factory, main())
    assert events.wait_for(1, timeout=0.3) == []


def test_busy_program_that_never_blocks_reports_nothing(factory: Factory, events: Recorder) -> None:
    handler_done = asyncio.Event()

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(100):
            writer.write(data)
            await writer.drain()
        writer.close()
        handler_done.set()

    async def main() -> None:
        server = await asyncio.start_server(echo, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        end = time.monotonic() + 0.6
        while time.monotonic() < end:
            writer.write(b"ping")
            await reader.readexactly(4)
        writer.close()
        await handler_done.wait()  # the server's handler task ends too: nothing leaks
        server.close()

    with no_collector():
        run_on(factory, main())
    assert events.wait_for(1, timeout=0.3) == []


def test_two_blocks_in_a_row_are_two_events(factory: Factory, kind: str, events: Recorder) -> None:
    """Two slow callbacks back to back in one iteration are told apart by their frames."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop.call_soon(blocking_timer)
        loop.call_soon(blocking_callback)
        await asyncio.sleep(0.6)

    run_on(factory, main())
    found = events.wait_for(2)
    assert [e.location for e in found] == [  # type: ignore[attr-defined]
        place(HERE, "BLOCK:call_later", "blocking_timer"),
        place(HERE, "BLOCK:call_soon", "blocking_callback"),
    ]
    assert abs(found[0].duration_s - 0.2) <= TOLERANCE  # type: ignore[attr-defined]
    assert abs(found[1].duration_s - 0.25) <= TOLERANCE  # type: ignore[attr-defined]


async def eager_child() -> None:
    time.sleep(0.25)  # BLOCK:eager-child


async def eager_parent(eager: dict[str, Any], blocks: bool) -> None:
    child = asyncio.get_running_loop().create_task(eager_child(), **eager)
    assert child.done()  # (its one step ran inside this one)
    if blocks:
        time.sleep(0.25)  # BLOCK:eager-parent
    await child


@pytest.mark.skipif(sys.version_info < (3, 12), reason="eager tasks arrived in Python 3.12")
@pytest.mark.parametrize("parent_blocks", [False, True], ids=["child-only", "parent-too"])
def test_a_block_in_an_eager_task_is_one_event_not_one_per_task_it_ran_inside(
    factory: Factory, kind: str, events: Recorder, parent_blocks: bool
) -> None:
    """An eager task's first step runs inside the step of the task that made it, which ran
    inside main's: the child's block is one event, the child's, not one more for each step it
    ran inside (aiohttp's request tasks run so inside their connection's task from Python 3.12).
    A parent that then blocks on its own is reported for its own time, at its own line."""
    # (asyncio's eager_task_factory; on uvloop from 3.13, which hands eager_start to every task
    # factory, create_task(eager_start=True): see test_tasks.test_eager_tasks_are_tracked.)
    use_factory = kind == "asyncio" or sys.version_info < (3, 13)
    eager: dict[str, Any] = {} if use_factory else {"eager_start": True}

    async def main() -> None:
        loop = asyncio.get_running_loop()
        if use_factory:
            loop.set_task_factory(asyncio.eager_task_factory)  # type: ignore[attr-defined]
        await loop.create_task(eager_parent(eager, parent_blocks), **eager)
        await asyncio.sleep(0.05)

    run_on(factory, main())
    found = events.wait_for(2 if parent_blocks else 1)
    child = place(HERE, "BLOCK:eager-child", "eager_child")
    # (No task names: asyncio names a task made through a factory once the factory returned,
    # after an eager task's first step.)
    expected = [("eager_child", child)]
    if parent_blocks:
        expected.append(("eager_parent", place(HERE, "BLOCK:eager-parent", "eager_parent")))
    assert [(e.coroutine, e.location) for e in found] == expected, found  # type: ignore[attr-defined]
    for event in found:
        assert abs(event.duration_s - 0.25) <= TOLERANCE, found  # type: ignore[attr-defined]


@pytest.mark.parametrize("threshold_ms", [50])
def test_threshold_setting_is_honoured(
    factory: Factory, kind: str, events: Recorder, threshold_ms: int
) -> None:
    """install(slow_callback_ms=50): a 70 ms block is reported, with threshold_s 0.05."""
    import loopwatch

    async def main() -> None:
        loopwatch.install(slow_callback_ms=threshold_ms)
        await asyncio.sleep(0.02)
        time.sleep(0.08)  # BLOCK:threshold
        await asyncio.sleep(0.05)

    run_on(factory, main())
    found = events.wait_for(1)
    assert len(found) == 1, found
    assert found[0].threshold_s == 0.05  # type: ignore[attr-defined]
    assert found[0].location == place(HERE, "BLOCK:threshold", "main")  # type: ignore[attr-defined]
