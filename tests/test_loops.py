"""Watched loops: factories, the policy, install/uninstall, and global mode."""

from __future__ import annotations

import asyncio
import json
import textwrap
import threading
import time
import warnings
from asyncio.base_events import BaseEventLoop
from collections.abc import Callable
from typing import Any

import pytest
import uvloop
from conftest import LOOP_FACTORIES, Recorder, place, registry, run_on, run_program

import loopwatch
from loopwatch import _api, _runtime, _threads
from loopwatch._native import ACCEL
from loopwatch._pulse import SelectPulse

HERE = __file__


COMPILED_PULSE = (ACCEL.Pulse,) if ACCEL is not None else ()


def watchdog_threads() -> list[str]:
    """loopwatch's running watchdog threads (invisible to ``threading``: see test_invisible)."""
    return [w.name for w in _threads._all if w.name == "watchdog" and w.running]


async def block_briefly() -> None:
    await asyncio.sleep(0.02)
    time.sleep(0.15)  # BLOCK:loops
    await asyncio.sleep(0.03)


def test_factories_make_watched_loops_of_the_right_kind() -> None:
    """new_event_loop is stock asyncio, new_uvloop_event_loop is uvloop; both are watched."""
    for factory, cls in (
        (loopwatch.new_event_loop, asyncio.SelectorEventLoop),
        (loopwatch.new_uvloop_event_loop, uvloop.Loop),
    ):
        loop = factory()
        try:
            assert type(loop) is cls
            assert registry().state_of(loop) is not None
            assert loop.run_until_complete(asyncio.sleep(0, "ok")) == "ok"
        finally:
            loop.close()


def test_runner_with_loop_factory(
    factory: Callable[[], asyncio.AbstractEventLoop], kind: str, events: Recorder
) -> None:
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(block_briefly())
        runner.run(block_briefly())
    found = events.wait_for(2)
    assert [e.location for e in found] == [place(HERE, "BLOCK:loops", "block_briefly")] * 2  # type: ignore[attr-defined]
    assert {e.loop for e in found} == {kind}  # type: ignore[attr-defined]


def test_uninstall_leaves_no_thread_and_restores_the_loop(events: Recorder) -> None:
    loop = loopwatch.new_event_loop()
    try:
        loop.run_until_complete(asyncio.sleep(0.01))
        assert len(watchdog_threads()) == 1  # the loop is open: its thread waits for the next run
        selector = loop._selector  # type: ignore[attr-defined]
        inner = selector._selector
        pulses = (SelectPulse, *COMPILED_PULSE)
        # The compiled pulse stands in for an epoll selector's epoll object (poll mode); else
        # (pure Python, another selector) it wraps the selector's select.
        polled = isinstance(inner, pulses)
        assert polled == bool(COMPILED_PULSE), inner
        if polled:
            real = inner.target
            assert type(real).__name__ == "epoll"
        else:
            assert isinstance(vars(selector).get("select"), pulses)
        loopwatch.uninstall()
        assert watchdog_threads() == []
        assert "select" not in vars(selector)
        if polled:
            assert selector._selector is real
        assert getattr(BaseEventLoop.run_forever, "__loopwatch__", False) is False
        # The loop runs on, unwatched: a block is no longer reported.
        loop.run_until_complete(block_briefly())
    finally:
        loop.close()
    assert events.wait_for(1, timeout=0.3) == []


def test_uninstall_one_loop_while_it_runs(
    factory: Callable[[], asyncio.AbstractEventLoop], events: Recorder
) -> None:
    """uninstall(loop) from inside: the loop keeps running, unwatched, and blocks go unreported."""

    async def main() -> str:
        loopwatch.uninstall(asyncio.get_running_loop())
        await block_briefly()
        return "done"

    assert run_on(factory, main()) == "done"
    assert events.wait_for(1, timeout=0.3) == []


def test_install_is_idempotent(events: Recorder) -> None:
    threads: list[int] = []

    async def main() -> None:
        loopwatch.install()
        loopwatch.install()
        await block_briefly()
        threads.append(len(watchdog_threads()))

    asyncio.run(main())
    assert len(events.wait_for(1)) == 1
    assert threads == [1]
    assert watchdog_threads() == [], "the thread ends with the last watched loop"


def test_install_on_the_running_loop_of_a_plain_asyncio_run(kind: str, events: Recorder) -> None:
    """install() inside a loop nobody watched watches that loop from then on."""

    async def main() -> None:
        loopwatch.install()
        await block_briefly()

    if kind == "uvloop":
        uvloop.run(main())
    else:
        asyncio.run(main())
    found = events.wait_for(1)
    assert len(found) == 1
    assert found[0].loop == kind  # type: ignore[attr-defined]


def test_install_given_loop(kind: str, events: Recorder) -> None:
    loop = uvloop.new_event_loop() if kind == "uvloop" else asyncio.new_event_loop()
    try:
        loopwatch.install(loop)
        loop.run_until_complete(block_briefly())
    finally:
        loop.close()
    assert [e.loop for e in events.wait_for(1)] == [kind]  # type: ignore[attr-defined]


def test_global_install_watches_every_new_loop(events: Recorder) -> None:
    """install() outside a loop: asyncio.run, new_event_loop, uvloop.run, Runner are all watched."""
    loopwatch.install()
    asyncio.run(block_briefly())
    uvloop.run(block_briefly())
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(block_briefly())
    finally:
        loop.close()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(block_briefly())
    found = events.wait_for(4)
    assert [e.loop for e in found] == ["asyncio", "uvloop", "asyncio", "uvloop"]  # type: ignore[attr-defined]
    loopwatch.uninstall()
    # Global mode is undone: the classes are as they were.
    from asyncio.base_events import BaseEventLoop

    assert not getattr(BaseEventLoop.__init__, "__loopwatch__", False)
    assert "__init__" not in uvloop.Loop.__dict__
    asyncio.run(block_briefly())
    time.sleep(0.2)
    assert len(events) == 4


def test_global_install_watches_uvloop_imported_after_it() -> None:
    """install() outside a loop, then ``import uvloop`` (a program's usual order): uvloop's loops
    are watched too (they were not: only LOOPWATCH=1 and the pytest plugin hooked the import)."""
    program = textwrap.dedent(
        """
        import asyncio, sys, time
        import loopwatch
        loopwatch.install(log="json", slow_callback_ms=50)
        assert "uvloop" not in sys.modules
        import uvloop

        async def main():
            time.sleep(0.1)

        uvloop.run(main())
        """
    )
    done = run_program(program)
    assert done.returncode == 0, done.stderr
    found = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    assert [(e["event"], e["loop"]) for e in found] == [("loopwatch.slow_callback", "uvloop")]


def test_settings_from_install_apply(events: Recorder) -> None:
    loopwatch.install(slow_callback_ms=300)
    asyncio.run(block_briefly())
    assert events.wait_for(1, timeout=0.4) == []
    assert _runtime.current() is not None
    assert _runtime.current().settings.slow_callback_ms == 300  # type: ignore[union-attr]


def test_policy_wraps_the_default_and_uvloop_policies(events: Recorder) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        for base, kind in ((None, "asyncio"), (uvloop.EventLoopPolicy(), "uvloop")):
            policy = loopwatch.EventLoopPolicy(base)
            loop = policy.new_event_loop()
            try:
                loop.run_until_complete(block_briefly())
            finally:
                loop.close()
            assert events.wait_for(1)[-1].loop == kind  # type: ignore[attr-defined]
            events.clear()
        previous = asyncio.get_event_loop_policy()
        asyncio.set_event_loop_policy(loopwatch.EventLoopPolicy(uvloop.EventLoopPolicy()))
        try:
            asyncio.run(block_briefly())
        finally:
            asyncio.set_event_loop_policy(previous)
    assert [e.loop for e in events.wait_for(1)] == ["uvloop"]  # type: ignore[attr-defined]


def test_loop_stopped_and_restarted_is_not_a_block(
    factory: Callable[[], asyncio.AbstractEventLoop], events: Recorder
) -> None:
    """Time between two runs of a loop is not time the loop was blocked."""
    loop = factory()
    try:
        loop.run_until_complete(asyncio.sleep(0.01))
        time.sleep(0.3)  # the loop is not running: nothing to report
        loop.run_until_complete(asyncio.sleep(0.05))
    finally:
        loop.close()
    assert events.wait_for(1, timeout=0.3) == []


def test_loops_in_several_threads_are_watched_each_on_their_own(events: Recorder) -> None:
    results: list[str] = []

    def run(factory: Callable[[], asyncio.AbstractEventLoop]) -> None:
        run_on(factory, block_briefly())
        results.append("ok")

    threads = [
        threading.Thread(target=run, args=(f,))
        for f in (loopwatch.new_event_loop, loopwatch.new_uvloop_event_loop)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == ["ok", "ok"]
    found = events.wait_for(2)
    assert sorted(e.loop for e in found) == ["asyncio", "uvloop"]  # type: ignore[attr-defined]
    assert watchdog_threads() == [], "one thread for both, ended with the last loop"


@pytest.mark.parametrize("name", ["slow_callback_ms", "stall_ms"])
def test_bad_keyword_values_raise(name: str) -> None:
    with pytest.raises(ValueError, match=f"{name}='soon' is not accepted"):
        loopwatch.install(**{name: "soon"})


def test_unknown_keyword_raises() -> None:
    with pytest.raises(TypeError, match="unknown setting 'slow_ms'"):
        loopwatch.install(slow_ms=5)


def test_tasks_off_keeps_the_watchdog_and_leaves_the_task_factory_alone(
    factory: Callable[[], asyncio.AbstractEventLoop], kind: str, events: Recorder
) -> None:
    """LOOPWATCH_TASKS=0: blocks are still caught; no task factory, nothing counted per task."""
    _api.activate(tasks=False)

    async def main() -> object:
        loop = asyncio.get_running_loop()
        assert loop.get_task_factory() is None
        assert "set_task_factory" not in vars(loop)
        asyncio.create_task(asyncio.sleep(10))  # would be a leak with tasks on
        await block_briefly()
        return registry().tracker_of(loop)

    assert run_on(factory, main()) is None
    found = events.wait_for(1)
    assert [(e.event, e.location) for e in found] == [  # type: ignore[attr-defined]
        ("loopwatch.slow_callback", place(HERE, "BLOCK:loops", "block_briefly"))
    ]


def test_the_watchdog_thread_sleeps_while_the_loop_is_healthy(kind: str, events: Recorder) -> None:
    """With timerfd alarms the thread does not wake while a busy loop stays healthy (Linux):
    the pulse keeps pushing the alarm back."""
    from loopwatch import _alarm

    if _alarm.new_alarm() is None:
        pytest.skip("no timerfd here: the watchdog wakes on deadlines instead")
    checks: list[float] = []

    async def main() -> None:
        state = registry().state_of(asyncio.get_running_loop())
        assert state is not None
        original = state.check

        def counting(now: float) -> float:
            checks.append(now)
            return original(now)

        state.check = counting  # type: ignore[method-assign]
        # (This wait's alarm fires once, after half the threshold: well before the clear.)
        await asyncio.sleep(0.2)
        checks.clear()
        until = time.monotonic() + 0.5
        while time.monotonic() < until:  # busy and healthy: short steps, never a wait
            await asyncio.sleep(0)

    run_on(LOOP_FACTORIES[kind], main())
    assert checks == []


def test_an_idle_loop_wakes_the_watchdog_at_most_once_per_wait(events: Recorder) -> None:
    """A loop waiting for I/O has no pulse: the alarm fires once, the watchdog sees the loop
    waiting and sleeps again until the loop wakes (no polling while idle)."""
    from loopwatch import _alarm

    if _alarm.new_alarm() is None:
        pytest.skip("no timerfd here: the watchdog wakes on deadlines instead")
    checks: list[float] = []

    async def main() -> None:
        state = registry().state_of(asyncio.get_running_loop())
        assert state is not None
        original = state.check

        def counting(now: float) -> float:
            checks.append(now)
            return original(now)

        state.check = counting  # type: ignore[method-assign]
        # (This wait's alarm fires once, after half the threshold: well before the clear.)
        await asyncio.sleep(0.2)
        checks.clear()
        await asyncio.sleep(0.5)  # one wait of half a second

    run_on(loopwatch.new_event_loop, main())
    assert len(checks) <= 1, checks


def test_watching_puts_nothing_on_the_loop_object(events: Recorder) -> None:
    """No instance attribute of loopwatch's on a loop: asyncio's pure-Python loop stops sharing
    its instance dict's keys past 30 attributes (every ``self.x`` slower), uvloop pays for every
    lookup once an instance dict exists, and a program may look (``vars(loop)``)."""
    for make_plain, make_watched in (
        (asyncio.SelectorEventLoop, loopwatch.new_event_loop),
        (uvloop.new_event_loop, loopwatch.new_uvloop_event_loop),
    ):
        plain = make_plain()
        watched = make_watched()
        try:
            assert set(vars(watched)) == set(vars(plain))
        finally:
            plain.close()
            watched.close()


def test_task_hooks_on_the_loop_class_leave_other_loops_alone(events: Recorder) -> None:
    """Stock loops get their task-factory and exception-handler hooks on ``BaseEventLoop``: a
    loop that is not watched keeps its own behaviour, a watched one answers with the program's
    factory and still calls the loopwatch one, and uninstall puts the class back as it was."""
    from asyncio.base_events import BaseEventLoop

    names = ("set_task_factory", "get_task_factory", "call_exception_handler")
    own = {n: BaseEventLoop.__dict__[n] for n in names}
    assert not any(getattr(m, "__loopwatch__", False) for m in own.values())
    made: list[str] = []

    def program_factory(loop: asyncio.AbstractEventLoop, coro: Any, **kw: Any) -> Any:
        made.append(type(loop).__name__)
        return asyncio.Task(coro, loop=loop, **kw)

    async def job() -> int:
        return 7

    watched = loopwatch.new_event_loop()
    plain = asyncio.SelectorEventLoop()
    try:
        assert all(getattr(BaseEventLoop.__dict__[n], "__loopwatch__", False) for n in names)
        plain.set_task_factory(program_factory)
        assert plain.get_task_factory() is program_factory
        assert plain.run_until_complete(plain.create_task(job())) == 7
        watched.set_task_factory(program_factory)
        assert watched.get_task_factory() is program_factory  # the program reads back its own
        tracker = registry().tracker_of(watched)
        assert tracker is not None
        assert watched._task_factory is tracker.factory  # type: ignore[attr-defined]
        assert watched.run_until_complete(watched.create_task(job())) == 7
        assert made == ["_UnixSelectorEventLoop", "_UnixSelectorEventLoop"]
        assert tracker.stats.created == 1  # the plain loop's task is none of loopwatch's business
        handled: list[str] = []
        plain.set_exception_handler(lambda loop, ctx: handled.append(ctx["message"]))
        plain.call_exception_handler({"message": "from the program"})
        assert handled == ["from the program"]
    finally:
        plain.close()
        watched.close()
    loopwatch.uninstall()
    assert {n: BaseEventLoop.__dict__[n] for n in names} == own
