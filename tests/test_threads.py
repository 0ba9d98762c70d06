"""Events from other threads, and loops in several threads at once (issue 8.4).

Events reach the dispatcher from the loop's thread, from the watchdog thread, from the garbage
collector in whatever thread it runs, and from callbacks handed in with ``call_soon_threadsafe``.
Each must arrive once, be counted exactly, and never raise into the thread it came from. Loops
running at once in several threads are each watched on their own: each block is reported once,
for its own loop, its own task and its own place.
"""

from __future__ import annotations

import asyncio
import gc
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from conftest import Recorder, place

import loopwatch
from loopwatch import _api

HERE = __file__
Factory = Callable[[], asyncio.AbstractEventLoop]


def in_thread(target: Callable[[], Any], name: str = "worker") -> list[BaseException]:
    """Run ``target`` in a new thread and return what it raised (nothing, if all went well)."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            target()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, name=name)
    thread.start()
    thread.join(timeout=30)
    assert not thread.is_alive()
    return errors


def test_block_and_stall_are_emitted_from_the_watchdog_thread(
    factory: Factory, kind: str, events: Recorder
) -> None:
    _api.activate(slow_callback_ms=50, stall_ms=150)
    threads: list[int] = []
    _api.activate().dispatcher.add_sink(lambda e: threads.append(threading.get_ident()))

    def block() -> None:
        time.sleep(0.3)  # BLOCK:watchdog

    async def main() -> None:
        asyncio.get_running_loop().call_soon(block)
        await asyncio.sleep(0.02)

    loop = factory()
    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
    found = events.wait_for(2)
    assert [e.event for e in found] == ["loopwatch.loop_stalled", "loopwatch.slow_callback"]
    assert {e.location for e in found} == {place(HERE, "BLOCK:watchdog", "block")}
    assert {e.loop for e in found} == {kind}
    # The stall is seen while the loop is blocked: only the watchdog thread can say it then.
    assert threads[0] == _api.activate().watchdog.worker.ident


def test_orphans_found_by_the_garbage_collector_in_other_threads(
    factory: Factory, events: Recorder
) -> None:
    """gc.collect() in four threads at once, each destroying pending tasks: every orphan is
    reported once, from the thread that collected it, and no thread sees an error."""
    _api.activate(slow_callback_ms=10_000, stall_ms=20_000)  # gc may truly take long here
    per_thread, threads = 25, 4
    loop = factory()
    gc.disable()
    try:

        async def waits_forever() -> None:
            await asyncio.get_running_loop().create_future()

        async def make(n: int) -> None:
            for i in range(n):
                loop.create_task(waits_forever(), name=f"orphan-{i}")
            await asyncio.sleep(0.01)

        loop.run_until_complete(make(per_thread * threads))
        seen: list[str] = []
        _api.activate().dispatcher.add_sink(lambda e: seen.append(threading.current_thread().name))
        barrier = threading.Barrier(threads)

        def collect() -> None:
            barrier.wait()
            gc.collect()

        workers = [threading.Thread(target=collect, name=f"gc-{i}") for i in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(timeout=30)
    finally:
        gc.enable()
        loop.close()
    orphans = events.named("loopwatch.task_orphaned")
    assert len(orphans) == per_thread * threads
    assert sorted(e.task for e in orphans) == sorted(
        f"orphan-{i}" for i in range(per_thread * threads)
    )
    assert seen and set(seen) <= {f"gc-{i}" for i in range(threads)}
    assert _api.activate().dispatcher.counts["loopwatch.task_orphaned"] == len(orphans)


def test_never_awaited_coroutines_dropped_in_many_threads_are_counted_exactly(
    factory: Factory, events: Recorder
) -> None:
    loop = factory()
    loop.run_until_complete(asyncio.sleep(0))  # attached: the never-awaited hook is in place

    async def forgotten() -> None:
        pass

    per_thread, threads = 200, 8
    barrier = threading.Barrier(threads)

    def drop() -> None:
        barrier.wait()
        for _ in range(per_thread):
            forgotten()  # type: ignore[unused-coroutine]  # DROP:threads

    with pytest.warns(RuntimeWarning):
        workers = [threading.Thread(target=drop) for _ in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(timeout=30)
    loop.close()
    found = events.named("loopwatch.coroutine_never_awaited")
    assert len(found) == per_thread * threads
    assert {e.location for e in found} == {place(HERE, "DROP:threads", "drop")}
    assert _api.activate().dispatcher.counts["loopwatch.coroutine_never_awaited"] == len(found)


def test_call_soon_threadsafe_callbacks_are_watched(
    factory: Factory, kind: str, events: Recorder
) -> None:
    """Callbacks handed in from other threads run on the loop like any other; one that blocks is
    reported once; the many that do not are not."""
    loop = factory()
    ran: list[int] = []

    def quick(i: int) -> None:
        ran.append(i)

    def slow() -> None:
        time.sleep(0.2)  # BLOCK:threadsafe

    async def main() -> None:
        def feed() -> None:
            for i in range(500):
                loop.call_soon_threadsafe(quick, i)
            loop.call_soon_threadsafe(slow)

        errors: list[BaseException] = []
        await loop.run_in_executor(None, lambda: errors.extend(in_thread(feed)))
        while len(ran) < 500:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.3)
        assert errors == []

    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
    assert ran == list(range(500))
    found = events.wait_for(1)
    assert [(e.event, e.location, e.loop) for e in found] == [
        ("loopwatch.slow_callback", place(HERE, "BLOCK:threadsafe", "slow"), kind)
    ]


def test_loops_in_several_threads_are_each_watched_on_their_own(events: Recorder) -> None:
    """Six loops (three stock, three uvloop) in six threads at once, each blocking in its own
    function for its own time: six events, each with its loop, task, place and duration."""

    def blocker(seconds: float) -> None:
        time.sleep(seconds)  # BLOCK:several

    async def job(seconds: float) -> None:
        await asyncio.sleep(0.01)
        blocker(seconds)
        await asyncio.sleep(0.01)

    factories = [loopwatch.new_event_loop, loopwatch.new_uvloop_event_loop] * 3
    barrier = threading.Barrier(len(factories))
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            barrier.wait()
            with asyncio.Runner(loop_factory=factories[i]) as runner:
                runner.run(job(0.15 + 0.05 * i), context=None)
        except BaseException as exc:
            errors.append(exc)

    def named(i: int) -> Callable[[], None]:
        def target() -> None:
            asyncio.set_event_loop(None)
            run(i)

        return target

    threads = [threading.Thread(target=named(i)) for i in range(len(factories))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert errors == []
    found = sorted(events.wait_for(len(factories)), key=lambda e: e.duration_s)
    assert [e.event for e in found] == ["loopwatch.slow_callback"] * len(factories)
    assert [e.loop for e in found] == ["asyncio", "uvloop"] * 3
    assert {e.location for e in found} == {place(HERE, "BLOCK:several", "blocker")}
    assert {e.coroutine for e in found} == {
        "test_loops_in_several_threads_are_each_watched_on_their_own.<locals>.job"
    }
    for i, event in enumerate(found):
        assert abs(event.duration_s - (0.15 + 0.05 * i)) < 0.04, (i, event.duration_s)


@pytest.mark.serial  # counts scheduling: other workers' load would delay the waiter's wake-up
@pytest.mark.parametrize("wake", ["file", "ring"])
def test_a_thread_of_loopwatchs_woken_while_the_loop_is_busy_gets_the_gil_at_once(
    factory: Factory, kind: str, wake: str
) -> None:
    """A busy loop lets go of the GIL at every iteration and takes it back at once; a thread
    woken meanwhile would wait, and be woken for nothing, at each of them (hundreds of times a
    run, the loop paying a futex wake each time). The pulse hands it the GIL instead: woken by a
    file (the watchdog's alarm or pipe, a scrape) or rung (the reporter), it holds the GIL by the
    loop's next iteration (uvloop: the next heartbeat), counted with the pulse's own counter."""
    from loopwatch import _native

    if wake == "file" and _native.ACCEL is None:
        pytest.skip("pure Python cannot say it woke before it holds the GIL")
    # The OS may not run the woken thread at once on a busy host (CPU steal): the best of three
    # wake-ups is judged. Handed the GIL: 0 to 3 iterations (up to 8 on a loaded machine);
    # unhanded, 26 to 3,000 in the same runs, every time.
    delays = []
    for _ in range(3):
        delays.append(_iterations_until_the_gil(factory, wake))
        if delays[-1] <= 10:
            break
    assert min(delays) <= 10, delays


def _iterations_until_the_gil(factory: Factory, wake: str) -> int:
    """Loop iterations between waking a thread and that thread holding the GIL."""
    from loopwatch import _threads

    runtime = _api.activate()
    read_fd, write_fd = os.pipe()
    bell = threading.Lock()
    bell.acquire()
    pulses: list[Any] = []
    at: dict[str, int] = {}
    ready = threading.Event()

    def waiter() -> None:
        ready.set()
        if wake == "file":
            _threads.wait_readable([read_fd], 10.0)
        else:
            bell.acquire(True, 10.0)
            _threads.woken()
        at["got"] = pulses[0].iterations  # no I/O before this read: it would wait again

    thread = threading.Thread(target=waiter)
    thread.start()
    assert ready.wait(5)
    time.sleep(0.05)  # in its wait
    ran = [0]

    async def main() -> None:
        loop = asyncio.get_running_loop()
        state = runtime.loops.state_of(loop)
        assert state is not None
        pulses.append(state.pulse)
        done = loop.create_future()
        start = time.monotonic()

        def step() -> None:
            ran[0] += 1
            sum(range(300))  # an iteration of 20 of these outlasts the waiter's own wake-up
            now = time.monotonic()
            if "wake" not in at and now > start + 0.1:
                at["wake"] = pulses[0].iterations
                if wake == "file":
                    os.write(write_fd, b"x")
                else:
                    _threads.want()
                    bell.release()
            if now < start + 0.4:
                loop.call_soon(step)
            elif not done.done():
                done.set_result(None)

        for _ in range(20):
            loop.call_soon(step)
        await done

    loop = factory()
    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
        thread.join(10)
        os.close(read_fd)
        os.close(write_fd)
    assert not thread.is_alive()
    assert pulses[0].iterations > 10  # the loop iterated (uvloop: its heartbeat beat) all along
    return at["got"] - at["wake"]


def _voluntary_switches(native_id: int) -> int:
    with open(f"/proc/self/task/{native_id}/status") as status:
        for line in status:
            if line.startswith("voluntary_ctxt_switches:"):
                return int(line.split()[1])
    raise AssertionError("no voluntary_ctxt_switches line")


@pytest.mark.serial  # counts scheduling: other workers' load would add wake-ups of their own
@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="reads /proc")
def test_threads_started_while_the_loop_is_busy_get_the_gil_at_once(
    factory: Factory, kind: str
) -> None:
    """A thread of loopwatch's just started waits for the GIL before its first line; on a busy
    loop it was woken at every release of the GIL and starved for the whole run (about 1,700
    wake-ups in 0.5 s, measured, and the loop paid a futex wake each time). Started while the
    loop is busy (install() from inside it), each holds the GIL and runs its first line within
    a few of the loop's iterations (counted in callbacks run: 20 an iteration)."""
    from loopwatch import _runtime

    loopwatch.uninstall()  # threads of this test's own
    workers: list[Any] = []
    ran = [0]
    at: dict[str, int] = {}

    async def main() -> None:
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        start = time.monotonic()

        def step() -> None:
            ran[0] += 1
            sum(range(300))
            if workers and "started" not in at and all(w.native_id for w in workers):
                at["started"] = ran[0]
            if time.monotonic() < start + 0.4:
                loop.call_soon(step)
            elif not done.done():
                done.set_result(None)

        for _ in range(20):
            loop.call_soon(step)
        await asyncio.sleep(0)
        loopwatch.install(log="off")  # starts the watchdog's and the reporter's threads
        at["install"] = ran[0]
        runtime = _runtime.current()
        assert runtime is not None
        workers.extend([runtime.watchdog.worker, runtime.dispatcher.worker])
        await done
        # Started within a few iterations (1 to 2 here), or within the first 5% of the run
        # where the OS runs a new thread late (a host with CPU steal: 150 iterations, 7 ms, seen
        # once in CI); starved, it would not start within the whole 0.4 s run.
        assert "started" in at, (at, ran[0], [w.native_id for w in workers])
        assert at["started"] - at["install"] <= max(200, ran[0] // 20), (at, ran[0])

    loop = factory()
    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
        loopwatch.uninstall()
