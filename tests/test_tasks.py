"""Task lifecycle on asyncio and uvloop: leaks, orphans, lost exceptions, forgotten awaits, with
the place each task was created; and no finding for the patterns that are fine."""

from __future__ import annotations

import asyncio
import gc
import sys
import time
from collections.abc import Callable
from typing import Any

import pytest
from conftest import Recorder, place, registry, run_on

import loopwatch
from loopwatch import _api, _timing

HERE = __file__
Factory = Callable[[], asyncio.AbstractEventLoop]


@pytest.fixture(params=["timed", "untimed"])
def tracking(request: pytest.FixtureRequest) -> str:
    """How each task is followed: by its step-timing proxy (the default), or, with step timing
    off, by a mark that is its done callback (pure Python) or a proxy that only forwards (the
    compiled module). Every finding must come out the same."""

    _api.activate(step_timing=request.param == "timed")
    return str(request.param)


def no_gc_blocks() -> None:
    """These tests run gc.collect() on the loop, which in a loaded test process can really take
    over 100 ms: a true slow callback, but not what the test is about."""

    _api.activate(slow_callback_ms=10_000, stall_ms=20_000)


def only(events: list[Any], name: str) -> Any:
    matching = [e for e in events if e.event == name]
    assert len(matching) == 1, events
    assert len(events) == 1, events
    return matching[0]


async def sleeper() -> None:
    await asyncio.sleep(10)  # AWAIT:leak


def test_task_pending_when_asyncio_run_returns_is_leaked(
    tracking: str, factory: Factory, events: Recorder
) -> None:
    async def main() -> None:
        asyncio.create_task(sleeper(), name="forgotten")  # CREATE:leak
        await asyncio.sleep(0.05)

    run_on(factory, main())
    leak = only(events.wait_for(1), "loopwatch.task_leaked")
    assert leak.task == "forgotten"
    assert leak.coroutine == "sleeper"
    assert leak.created_at == place(HERE, "CREATE:leak", "main")
    assert leak.awaiting == place(HERE, "AWAIT:leak", "sleeper")
    assert leak.awaits == "sleep"
    assert 0.04 <= leak.age_s <= 0.5


def test_task_pending_at_loop_close_is_leaked(
    tracking: str, factory: Factory, events: Recorder
) -> None:
    loop = factory()
    # Held here: once the loop is closed, a collection would destroy the task while the test
    # waits, and that is an orphan besides the leak (true, but not this test's finding).
    left = loop.create_task(sleeper(), name="left")  # CREATE:close
    loop.run_until_complete(asyncio.sleep(0.01))
    loop.close()
    leak = only(events.wait_for(1), "loopwatch.task_leaked")
    del left
    assert (leak.task, leak.coroutine) == ("left", "sleeper")
    assert leak.created_at == place(
        HERE, "CREATE:close", "test_task_pending_at_loop_close_is_leaked"
    )
    assert leak.awaiting == place(HERE, "AWAIT:leak", "sleeper")
    assert registry().state_of(loop) is None, "a closed loop is no longer watched"


async def waits_forever() -> None:
    await asyncio.get_running_loop().create_future()


def test_pending_task_destroyed_by_gc_is_orphaned(
    tracking: str, factory: Factory, events: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    no_gc_blocks()

    async def main() -> None:
        asyncio.create_task(waits_forever(), name="orphan")  # CREATE:orphan
        await asyncio.sleep(0.01)
        gc.collect()
        await asyncio.sleep(0.01)

    run_on(factory, main())
    orphan = only(events.wait_for(1), "loopwatch.task_orphaned")
    assert (orphan.task, orphan.coroutine) == ("orphan", "waits_forever")
    assert orphan.created_at == place(HERE, "CREATE:orphan", "main")
    # asyncio's own report still reaches the program's handler: behaviour unchanged.
    assert "Task was destroyed but it is pending!" in caplog.text


async def fails() -> None:
    await asyncio.sleep(0)
    raise ValueError("bad input")  # RAISE:unretrieved


def test_exception_nobody_retrieved(
    tracking: str, factory: Factory, events: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    no_gc_blocks()

    async def main() -> None:
        asyncio.create_task(fails(), name="fire-and-forget")  # CREATE:unretrieved
        await asyncio.sleep(0.02)
        gc.collect()

    run_on(factory, main())
    lost = only(events.wait_for(1), "loopwatch.task_exception_unretrieved")
    assert (lost.task, lost.coroutine) == ("fire-and-forget", "fails")
    assert lost.created_at == place(HERE, "CREATE:unretrieved", "main")
    assert lost.exception == "ValueError: bad input"
    assert lost.raised_at == place(HERE, "RAISE:unretrieved", "fails")
    assert "Task exception was never retrieved" in caplog.text


def test_exception_retrieved_is_not_a_finding(factory: Factory, events: Recorder) -> None:
    no_gc_blocks()

    async def main() -> None:
        task = asyncio.create_task(fails())
        with pytest.raises(ValueError):
            await task
        gc.collect()

    run_on(factory, main())
    assert events.wait_for(1, timeout=0.2) == []


async def fetch() -> int:
    return 1


@pytest.mark.filterwarnings("ignore:coroutine 'fetch' was never awaited")
def test_coroutine_never_awaited(factory: Factory, events: Recorder) -> None:
    async def main() -> None:
        fetch()  # type: ignore[unused-coroutine]  # FORGOT:await
        await asyncio.sleep(0)

    run_on(factory, main())
    forgot = only(events.wait_for(1), "loopwatch.coroutine_never_awaited")
    assert forgot.coroutine == "fetch"
    assert forgot.location == place(HERE, "FORGOT:await", "main")
    assert forgot.defined_at == f"{HERE}:{fetch.__code__.co_firstlineno} in fetch"


async def worker(n: int) -> int:
    await asyncio.sleep(0.001 * n)
    return n


def test_patterns_that_are_fine_report_nothing(
    tracking: str, factory: Factory, events: Recorder
) -> None:
    no_gc_blocks()
    """Background tasks held in a set, TaskGroup, gather, wait_for, timeout, to_thread,
    shielding, a server task cancelled and awaited at shutdown: no finding."""

    async def main() -> None:
        background: set[asyncio.Task[int]] = set()
        for i in range(5):
            task = asyncio.create_task(worker(i))
            background.add(task)
            task.add_done_callback(background.discard)
        async with asyncio.TaskGroup() as tg:
            for i in range(3):
                tg.create_task(worker(i))
        assert await asyncio.gather(*(worker(i) for i in range(3))) == [0, 1, 2]
        assert await asyncio.wait_for(worker(1), timeout=1) == 1
        async with asyncio.timeout(1):
            await worker(2)
        assert await asyncio.to_thread(sum, [1, 2]) == 3
        assert await asyncio.shield(worker(1)) == 1
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(asyncio.sleep(1), timeout=0.01)
        server_task = asyncio.create_task(sleeper())
        await asyncio.sleep(0.01)
        server_task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await server_task
        while background:
            await asyncio.sleep(0.005)

    run_on(factory, main())
    gc.collect()
    assert events.wait_for(1, timeout=0.2) == []


@pytest.mark.skipif(sys.version_info < (3, 12), reason="eager tasks arrived in Python 3.12")
def test_eager_tasks_are_tracked(
    tracking: str, factory: Factory, kind: str, events: Recorder
) -> None:
    """eager_task_factory wrapped; on uvloop with Python 3.13+, create_task(eager_start=True)
    passed through instead (uvloop 0.23 hands eager_start to every factory there, so asyncio's
    eager_task_factory fails on plain uvloop; before 3.13 it drops eager_start)."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        if kind == "asyncio" or sys.version_info < (3, 13):
            loop.set_task_factory(asyncio.eager_task_factory)  # type: ignore[attr-defined]
            assert loop.get_task_factory() is asyncio.eager_task_factory  # type: ignore[attr-defined]
            eager: dict[str, Any] = {}
        else:
            eager = {"eager_start": True}
        done = loop.create_task(fetch(), **eager)  # completes eagerly, before create_task returns
        assert done.done() and done.result() == 1
        loop.create_task(sleeper(), name="eager-left", **eager)  # CREATE:eager
        await asyncio.sleep(0.01)
        stats = registry().tracker_of(loop).stats  # type: ignore[union-attr]
        assert (stats.created, stats.ok) == (3, 1)

    run_on(factory, main())
    leak = only(events.wait_for(1), "loopwatch.task_leaked")
    assert leak.task == "eager-left"
    assert leak.created_at == place(HERE, "CREATE:eager", "main")


def test_a_task_no_factory_sees_is_tracked_through_adopt(
    tracking: str, factory: Factory, events: Recorder
) -> None:
    """What aiohttp's hook does from Python 3.12, where aiohttp makes each request's task with
    ``asyncio.Task(coro, eager_start=True)`` and no task factory sees it: ``adopt`` gives the
    proxy the loop's factory would have made (creation site, label, the loop's bookkeeping), so
    the task is counted, timed and reported as any other. Given to the factory after all (Python
    3.14's ``create_task``), the task runs that proxy as it is and is counted once. Pure Python
    with step timing off follows a task by a done callback, which needs the task: nothing is
    adopted there."""
    eager: dict[str, Any] = {"eager_start": True} if sys.version_info >= (3, 12) else {}

    async def main() -> None:
        loop = asyncio.get_running_loop()
        tracker = registry().tracker_of(loop)
        assert tracker is not None
        coro = fetch()
        adopted = tracker.adopt(coro)
        if tracking == "untimed" and _timing.ACCEL is None:
            assert adopted is coro and tracker.stats.created == 1  # (main's task)
            assert await asyncio.Task(adopted, loop=loop, **eager) == 1
            return
        assert adopted is not coro and adopted._owner is tracker
        assert await asyncio.Task(adopted, loop=loop, **eager) == 1  # no factory
        through = tracker.adopt(fetch())
        assert await loop.create_task(through) == 1  # the factory after all
        left = tracker.adopt(sleeper())  # ADOPT:leak
        asyncio.Task(left, loop=loop, name="adopted-left", **eager)
        await asyncio.sleep(0.01)
        stats = tracker.stats
        assert (stats.created, stats.ok) == (4, 2)  # with main's task
        row = tracker.rows["fetch"]
        assert (row.count, row.steps) == (2, 2 if tracking == "timed" else 0)

    run_on(factory, main())
    if tracking == "untimed" and _timing.ACCEL is None:
        assert events.wait_for(1, timeout=0.3) == []
        return
    leak = only(events.wait_for(1), "loopwatch.task_leaked")
    assert (leak.task, leak.coroutine) == ("adopted-left", "sleeper")
    assert leak.created_at == place(HERE, "ADOPT:leak", "main")
    assert leak.awaiting == place(HERE, "AWAIT:leak", "sleeper")


def test_task_factory_set_before_and_after_is_still_called(factory: Factory, kind: str) -> None:
    """A factory the program sets, before or after loopwatch arrives, keeps being used."""
    made: list[str] = []

    def named_factory(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> Any:
        made.append(coro.__qualname__)
        return asyncio.Task(coro, loop=loop, **kwargs)

    import uvloop

    loop = uvloop.new_event_loop() if kind == "uvloop" else asyncio.new_event_loop()
    try:
        loop.set_task_factory(named_factory)
        loopwatch.install(loop)
        assert loop.get_task_factory() is named_factory
        loop.run_until_complete(loop.create_task(worker(1)))
        loop.set_task_factory(None)
        loop.set_task_factory(named_factory)
        loop.run_until_complete(loop.create_task(fetch()))
        assert made == ["worker", "fetch"]
        stats = registry().tracker_of(loop).stats  # type: ignore[union-attr]
        assert (stats.created, stats.ok) == (2, 2)
        loopwatch.uninstall(loop)
        assert loop.get_task_factory() is named_factory
        assert "get_task_factory" not in vars(loop)
    finally:
        loop.close()


def test_counters_are_exact(tracking: str, factory: Factory, events: Recorder) -> None:
    async def cancelled() -> None:
        await asyncio.sleep(10)

    async def main() -> None:
        ok = [asyncio.create_task(worker(0)) for _ in range(7)]
        bad = [asyncio.create_task(fails()) for _ in range(3)]
        stop = [asyncio.create_task(cancelled()) for _ in range(2)]
        await asyncio.sleep(0.01)
        for t in stop:
            t.cancel()
        await asyncio.gather(*ok, *bad, *stop, return_exceptions=True)
        stats = registry().tracker_of(asyncio.get_running_loop()).stats  # type: ignore[union-attr]
        # main itself is a task too: created, still running.
        assert (stats.created, stats.ok, stats.error, stats.cancelled) == (13, 7, 3, 2)
        assert registry().tracker_of(asyncio.get_running_loop()).active == 1  # type: ignore[union-attr]

    run_on(factory, main())
    totals = registry().task_totals()
    # Runner's close runs shutdown_asyncgens and shutdown_default_executor as tasks too.
    assert (totals.created, totals.ok, totals.error, totals.cancelled) == (15, 10, 3, 2)


def test_names_and_repr_of_tasks_unchanged(factory: Factory) -> None:
    async def main() -> tuple[str, str, bool]:
        t = asyncio.create_task(fetch())
        named = asyncio.create_task(fetch(), name="given")
        await asyncio.gather(t, named)
        return t.get_name(), named.get_name(), asyncio.iscoroutine(t.get_coro())

    name, given, is_coro = run_on(factory, main())
    assert name.startswith("Task-") and given == "given" and is_coro


def test_finished_tasks_leave_nothing_behind(
    tracking: str, factory: Factory, events: Recorder
) -> None:
    """20,000 tasks churned: the tracking table is empty again (1,000,000 is a benchmark)."""

    async def main() -> int:
        tracker = registry().tracker_of(asyncio.get_running_loop())
        assert tracker is not None
        start = tracker.active
        for _ in range(20):
            await asyncio.gather(*(asyncio.create_task(worker(0)) for _ in range(1000)))
        await asyncio.sleep(0)
        return tracker.active - start

    assert run_on(factory, main()) == 0


@pytest.mark.parametrize(("step_timing", "budget"), [(False, 200), (True, 200)])
def test_state_per_live_task_is_small(kind: str, step_timing: bool, budget: int) -> None:
    """What watching adds per live task, by tracemalloc: the same 5,000 pending tasks on a
    watched and on an unwatched loop of the same kind: under 200 bytes each, with the
    step-timing proxy (about 170 measured) or without (a mark, about 115)."""
    import tracemalloc

    # No watchdog samples while tasks are made (a slow host makes 5,000 tasks take past the
    # threshold, and the samples' allocations would be counted as the tasks').
    _api.activate(log="off", step_timing=step_timing, slow_callback_ms=60_000, stall_ms=60_000)

    import uvloop

    async def main() -> int:
        gate = asyncio.Event()
        tracemalloc.start()
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        tasks = [asyncio.create_task(gate.wait()) for _ in range(5000)]
        used = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
        gate.set()
        await asyncio.gather(*tasks)
        return used

    plain = uvloop.new_event_loop if kind == "uvloop" else asyncio.SelectorEventLoop
    watched = loopwatch.new_uvloop_event_loop if kind == "uvloop" else loopwatch.new_event_loop
    # Interleaved, and the least of three each, so a stray allocation does not decide it.
    bare = min(run_on(plain, main()) for _ in range(3))
    with_watch = min(run_on(watched, main()) for _ in range(3))
    per_task = (with_watch - bare) / 5000
    assert 0 < per_task < budget, (per_task, bare / 5000)


async def leaks_in_scope() -> loopwatch.watch:
    async with loopwatch.watch() as scope:
        await asyncio.sleep(0)
        asyncio.create_task(sleeper(), name="scoped")  # CREATE:scope
        asyncio.create_task(worker(0))
        await asyncio.sleep(0.01)
    return scope


def test_watch_scope_reports_tasks_it_leaves_behind(
    tracking: str, factory: Factory, events: Recorder
) -> None:
    async def main() -> loopwatch.watch:
        before = asyncio.create_task(sleeper(), name="older")
        scope = await leaks_in_scope()
        before.cancel()
        return scope

    scope = run_on(factory, main())
    leak = only(scope.events, "loopwatch.task_leaked")
    assert leak.task == "scoped"
    assert leak.created_at == place(HERE, "CREATE:scope", "leaks_in_scope")
    # One task, one finding: asyncio.run does not report "scoped" again; "older" was cancelled.
    assert [e.task for e in events.wait_for(2, timeout=0.5)] == ["scoped"]  # type: ignore[attr-defined]


def test_sync_watch_around_asyncio_run(kind: str) -> None:
    """With no loop running, the scope watches every loop made inside it, then stops."""
    import uvloop

    async def main() -> None:
        asyncio.create_task(sleeper(), name="run-leak")  # CREATE:sync-scope
        time.sleep(0.15)  # BLOCK:sync-scope
        await asyncio.sleep(0.02)

    with loopwatch.watch(log="off") as scope:
        if kind == "uvloop":
            uvloop.run(main())
        else:
            asyncio.run(main())
        time.sleep(0.1)
    assert [e.event for e in scope.events] == ["loopwatch.slow_callback", "loopwatch.task_leaked"]
    assert scope.events[0].location == place(HERE, "BLOCK:sync-scope", "main")  # type: ignore[attr-defined]
    assert scope.events[1].created_at == place(HERE, "CREATE:sync-scope", "main")  # type: ignore[attr-defined]
    assert not _api.global_enabled()


def test_watch_rejects_bad_settings() -> None:
    with pytest.raises(TypeError, match="unknown setting"):
        loopwatch.watch(threshold=3)


def test_deeper_creation_stack(factory: Factory, events: Recorder) -> None:
    async def inner_spawn() -> None:
        asyncio.create_task(sleeper(), name="deep")  # CREATE:deep

    async def main() -> None:
        loopwatch.install(asyncio.get_running_loop(), creation_stack=3)
        await inner_spawn()  # CALL:deep
        await asyncio.sleep(0.01)

    run_on(factory, main())
    leak = only(events.wait_for(1), "loopwatch.task_leaked")
    assert leak.created_stack[:2] == (
        place(HERE, "CREATE:deep", "inner_spawn"),
        place(HERE, "CALL:deep", "main"),
    )
    assert len(leak.created_stack) == 3


@pytest.mark.filterwarnings("ignore:coroutine 'fetch' was never awaited")
def test_the_never_awaited_warning_still_points_at_the_program(factory: Factory) -> None:
    """CPython's own RuntimeWarning is unchanged: same text, attributed to the dropping line."""
    import warnings

    async def main() -> list[warnings.WarningMessage]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fetch()  # type: ignore[unused-coroutine]  # FORGOT:warning
            await asyncio.sleep(0)
        return caught

    loopwatch.install(log="off")
    (warning,) = run_on(factory, main())
    assert str(warning.message) == "coroutine 'fetch' was never awaited"
    assert warning.category is RuntimeWarning
    assert (warning.filename, warning.lineno) == (
        HERE,
        int(place(HERE, "FORGOT:warning", "x").split(":")[1].split(" ")[0]),
    )


def test_tasks_the_loop_makes_for_itself_are_placed_in_the_loop(
    factory: Factory, events: Recorder
) -> None:
    """A server's connection handler task is created by asyncio's code, not at asyncio.run: no
    created_at (never a place inside asyncio), created_by says what made it, and loop-internal
    coroutines get no timing row."""
    seen: list[tuple[str | None, str | None]] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        tracker = registry().tracker_of(asyncio.get_running_loop())
        entry = tracker.entry_of(task)  # type: ignore[union-attr,arg-type]
        mark = tracker.mark_of(task)  # type: ignore[union-attr,arg-type]
        assert entry is not None and mark is not None
        from loopwatch._tasks import site_place

        seen.append((site_place(entry[2:]), mark._by))
        writer.close()

    async def main() -> None:
        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        await asyncio.sleep(0.05)
        writer.close()
        server.close()
        await server.wait_closed()

    run_on(factory, main())
    assert seen == [(None, "asyncio.streams: StreamReaderProtocol.connection_made")]
    names = {s.name for s in loopwatch.coroutine_stats()}
    assert "main" in names or any(n.endswith("main") for n in names)
    assert not any("_accept_connection" in n or "getaddrinfo" in n for n in names), names


def test_sync_watch_settings_apply_when_every_loop_is_already_watched(kind: str) -> None:
    """With global mode already on, a scope's own threshold still applies inside it."""
    import uvloop

    async def main() -> None:
        await asyncio.sleep(0.01)
        time.sleep(0.07)  # BLOCK:scope-threshold
        await asyncio.sleep(0.02)

    loopwatch.install(log="off")  # every loop from now on, threshold 100 ms
    with loopwatch.watch(slow_callback_ms=50) as scope:
        (uvloop.run if kind == "uvloop" else asyncio.run)(main())
        time.sleep(0.1)
    assert [(e.event, e.threshold_s) for e in scope.events] == [("loopwatch.slow_callback", 0.05)]  # type: ignore[attr-defined]
    from loopwatch import _runtime

    assert _runtime.current().settings.slow_callback_ms == 100  # type: ignore[union-attr]
