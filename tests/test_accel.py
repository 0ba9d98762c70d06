"""The compiled hot paths (``loopwatch._accel``): built where the suite runs, switched off by
``LOOPWATCH_ACCEL=0``, and giving the same findings by their fast path and by the Python one.

The whole suite runs with the compiled module, and ``scripts/test`` runs the task and timing
tests again with ``LOOPWATCH_ACCEL=0``: these tests check the module itself and the switch.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import itertools
import os
import shutil
import struct
import subprocess
import sys
import sysconfig
import time
import types
from pathlib import Path
from typing import Any

import pytest
from conftest import Recorder, place, registry, run_on

import loopwatch
from loopwatch import _native, _timing

HERE = Path(__file__).resolve()
ROOT = HERE.parent.parent
PURE = os.environ.get("LOOPWATCH_ACCEL", "1").strip().lower() in ("0", "false", "no", "off")
compiled_only = pytest.mark.skipif(
    _timing.ACCEL is None, reason="loopwatch._accel is not in use (LOOPWATCH_ACCEL=0)"
)


def _python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("LOOPWATCH")}
    environ.update(env)
    return subprocess.run(
        [sys.executable, "-c", code], env=environ, capture_output=True, text=True, timeout=60
    )


def test_the_compiled_module_is_built_and_used_here() -> None:
    """CI must not test the pure-Python paths twice by mistake: on Linux CPython the install
    builds the module, and it is used unless LOOPWATCH_ACCEL=0."""
    if PURE:
        assert _timing.ACCEL is None
        return
    assert sys.platform == "linux" and sys.implementation.name == "cpython"
    assert _timing.ACCEL is not None
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    assert Path(_timing.ACCEL.__file__).name == f"_accel{suffix}"
    assert _timing.Timed is _timing.ACCEL.Timed


def _counter_usable() -> bool:
    """What the compiled module should find: x86-64, the kernel keeping time with the
    time-stamp counter, and the counter invariant (Linux shows CPUID's bit as two flags)."""
    import platform

    try:
        source = Path("/sys/devices/system/clocksource/clocksource0/current_clocksource")
        flags = Path("/proc/cpuinfo").read_text().split()
        kernel_source = source.read_text().strip()
    except OSError:
        return False
    return (
        platform.machine() == "x86_64"
        and kernel_source == "tsc"
        and "constant_tsc" in flags
        and "nonstop_tsc" in flags
    )


@pytest.mark.skipif(PURE, reason="the compiled module's step clock")
def test_steps_are_timed_with_the_counter_where_the_kernel_trusts_it() -> None:
    kind, seconds_per_tick = _timing.ACCEL.step_clock()
    if _counter_usable():
        assert kind == "tsc"
        assert 1 / 20e9 < seconds_per_tick < 1 / 0.1e9
    else:
        assert (kind, seconds_per_tick) == ("monotonic", 1e-9)


@pytest.mark.skipif(PURE, reason="the compiled module's step clock")
@pytest.mark.parametrize("counter", [True, False], ids=["counter", "clock"])
def test_both_step_clocks_measure_the_same_busy_time(
    factory: Any, events: Recorder, counter: bool
) -> None:
    """Five steps burning 20 ms each: the busy time is at least what the steps measured of
    themselves and at most the time from one step's start to the next's (so a busy host that
    preempts the test between its own clock reads cannot fail it), with the counter as with
    the clock."""
    inside: list[float] = []
    marks: list[float] = []

    async def burns() -> None:
        for _ in range(5):
            began = time.perf_counter()
            marks.append(began)
            while time.perf_counter() < began + 0.02:
                pass
            inside.append(time.perf_counter() - began)
            await asyncio.sleep(0)
        marks.append(time.perf_counter())

    ACCEL = _timing.ACCEL
    before = ACCEL.step_clock()[0]
    try:
        in_use = ACCEL.use_tsc(counter)
        assert in_use == (counter and _counter_usable())
        run_on(factory, burns())
    finally:
        ACCEL.use_tsc(before == "tsc")
    (s,) = [s for s in loopwatch.coroutine_stats() if s.name.endswith("burns")]
    assert s.steps == 6
    # Each step starts a few microseconds before its mark and ends before the next mark.
    cycles = [after - before for before, after in itertools.pairwise(marks)]
    assert sum(inside) <= s.busy_s <= marks[-1] - marks[0] + 0.002, (s.busy_s, sum(inside), cycles)
    assert max(inside) <= s.max_step_s <= max(cycles) + 0.002, (s.max_step_s, inside, cycles)


@pytest.mark.parametrize(
    ("value", "compiled", "stderr"),
    [
        ("0", False, ""),
        ("off", False, ""),
        ("1", True, ""),
        (
            "maybe",
            True,
            "loopwatch: LOOPWATCH_ACCEL='maybe' is not 1 or 0 (also true/false, yes/no, on/off);"
            " using the compiled hot paths\n",
        ),
    ],
)
def test_the_switch(value: str, compiled: bool, stderr: str) -> None:
    if _timing.ACCEL is None and not PURE:
        pytest.skip("no compiled module on this machine")
    done = _python(
        "import asyncio, loopwatch\n"
        "from loopwatch import _timing\n"
        "async def main():\n"
        "    task = asyncio.current_task()\n"
        "    assert type(task.get_coro()).__name__ == 'coroutine'\n"
        "    return type(asyncio.get_running_loop()._task_factory).__name__,"
        " type(task._coro).__name__\n"
        "loop = loopwatch.new_event_loop()\n"
        "print(_timing.ACCEL is not None, *loop.run_until_complete(main()))\n"
        "loop.close()\n",
        LOOPWATCH_ACCEL=value,
        LOOPWATCH_LOG="off",
    )
    factory, proxy = ("Factory", "Timed") if compiled else ("function", "PyTimed")
    assert (done.returncode, done.stdout, done.stderr) == (
        0,
        f"{compiled} {factory} {proxy}\n",
        stderr,
    )


async def pending() -> None:
    await asyncio.sleep(10)


def made_in_a_callback(loop: asyncio.AbstractEventLoop, tasks: list[Any]) -> None:
    tasks.append(loop.create_task(pending(), name="from-callback"))  # CREATE:callback


def task_factory(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> Any:
    task = asyncio.Task(coro, loop=loop, **kwargs)
    task.set_name(f"theirs-{task.get_name()}")
    return task


async def creates_every_way() -> list[loopwatch.watch]:
    loop = asyncio.get_running_loop()
    tasks: list[Any] = []
    scopes = []
    async with loopwatch.watch() as scope:
        tasks.append(asyncio.create_task(pending(), name="plain"))  # CREATE:plain
        context = contextvars.copy_context()
        tasks.append(asyncio.create_task(pending(), name="kw", context=context))  # CREATE:kw
        tasks.append(asyncio.ensure_future(pending()))  # CREATE:ensure
        # asyncio's own coroutine, asked for by the program: labelled by the Python path.
        tasks.append(asyncio.create_task(asyncio.Event().wait(), name="event"))  # CREATE:event
        loop.call_soon(made_in_a_callback, loop, tasks)
        await asyncio.sleep(0.01)
    scopes.append(scope)
    loop.set_task_factory(task_factory)
    async with loopwatch.watch() as scope:
        tasks.append(asyncio.create_task(pending()))  # CREATE:inner
        await asyncio.sleep(0.01)
    scopes.append(scope)
    loop.set_task_factory(None)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return scopes


def test_every_way_of_making_a_task_has_its_place(
    factory: Any, events: Recorder, request: pytest.FixtureRequest
) -> None:
    """The compiled factory's own path (a program's coroutine, made by program code) and the
    ones it hands to Python (made by a callback the loop runs, through the program's factory)
    give the same findings: each leaked task with the line that made it."""
    first, second = run_on(factory, creates_every_way())
    leaks = {e.task: e.created_at for e in first.events if e.event == "loopwatch.task_leaked"}
    assert leaks == {
        "plain": place(HERE, "CREATE:plain", "creates_every_way"),
        "kw": place(HERE, "CREATE:kw", "creates_every_way"),
        next(n for n in leaks if n.startswith("Task-")): place(
            HERE, "CREATE:ensure", "creates_every_way"
        ),
        "from-callback": place(HERE, "CREATE:callback", "made_in_a_callback"),
        "event": place(HERE, "CREATE:event", "creates_every_way"),
    }
    [inner] = [e for e in second.events if e.event == "loopwatch.task_leaked"]
    assert inner.task.startswith("theirs-Task-")  # the program's factory made it
    assert inner.created_at == place(HERE, "CREATE:inner", "creates_every_way")
    assert inner.coroutine == "pending"
    rows = {s.name: s for s in loopwatch.coroutine_stats()}
    assert (rows["pending"].count, rows["pending"].cancelled) == (5, 5)
    assert (rows["Event.wait"].count, rows["Event.wait"].cancelled) == (1, 1)


@compiled_only
def test_an_error_in_a_hook_never_reaches_the_program(factory: Any, events: Recorder) -> None:
    """The compiled proxy calls into Python when a step is long (the watchdog's hook): if that
    raises, the error goes to sys.unraisablehook and the task goes on as if nothing happened."""
    seen: list[Any] = []

    async def main() -> int:
        tracker = registry().tracker_of(asyncio.get_running_loop())
        assert tracker is not None

        def broken(took: float, now: float) -> None:
            raise RuntimeError("hook failed")

        tracker.step_watch.on_slow = broken
        tracker.step_watch.half = 0.0

        async def work() -> int:
            await asyncio.sleep(0)
            return 7

        return await asyncio.create_task(work())

    hook = sys.unraisablehook
    sys.unraisablehook = seen.append
    try:
        assert run_on(factory, main()) == 7
    finally:
        sys.unraisablehook = hook
    assert seen and all(str(u.exc_value) == "hook failed" for u in seen)
    [row] = [s for s in loopwatch.coroutine_stats() if s.name.endswith(".work")]
    assert (row.count, row.errors) == (1, 0)


def _build_in_place(root: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """What the install runs: ``python hatch_build.py ROOT``."""
    return subprocess.run(
        [sys.executable, str(ROOT / "hatch_build.py"), str(root)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="no cc")
def test_a_failed_build_falls_back_to_pure_python(tmp_path: Path) -> None:
    """``python hatch_build.py ROOT`` (what the install runs) with no working compiler: one
    warning line, exit 1, and the module an earlier build left is deleted, never used stale."""
    (tmp_path / "loopwatch").mkdir()
    (tmp_path / "loopwatch" / "__init__.py").write_text("")
    shutil.copy(ROOT / "loopwatch" / "_accel.c", tmp_path / "loopwatch" / "_accel.c")
    stale = tmp_path / "loopwatch" / f"_accel{sysconfig.get_config_var('EXT_SUFFIX')}"
    stale.write_bytes(b"old")
    env = {k: v for k, v in os.environ.items() if k != "LOOPWATCH_BUILD_ACCEL"}
    env["CC"] = "false"
    done = _build_in_place(tmp_path, env)
    assert done.returncode == 1
    assert done.stderr.splitlines()[0] == (
        "loopwatch: compiling loopwatch/_accel.c failed (false: exit status 1); building"
        f" without the C accelerator (pure Python); deleted the old loopwatch/{stale.name}"
    )
    assert not stale.exists()
    # And with a compiler, the same command builds a module that imports.
    del env["CC"]
    done = _build_in_place(tmp_path, env)
    assert (done.returncode, done.stderr) == (0, "")
    check = subprocess.run(
        [sys.executable, "-c", "import loopwatch._accel as a; print(a.API)"],
        cwd=tmp_path,
        env={**env, "PYTHONPATH": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert check.stdout == f"{_native.API}\n", check.stderr


@compiled_only
def test_the_compiled_await_key_reads_a_chain_as_the_python_walk_does(factory: Any) -> None:
    """The live view's chain of awaits, read by ``_accel.await_key`` and by the Python walk: the
    same frames (each frame's code address and offset, as native words), through coroutines, a
    generator-based coroutine and into a future; None (the Python walk's turn) at an object of
    another kind, until the Python walk has learnt that its type has no frame."""
    from loopwatch import _live

    @types.coroutine
    def legacy(fut: asyncio.Future[None]) -> Any:
        yield from fut

    async def inner(fut: asyncio.Future[None]) -> None:
        await legacy(fut)

    async def outer(fut: asyncio.Future[None]) -> None:
        await inner(fut)

    async def on_task(other: asyncio.Task[None]) -> None:
        await other

    class Own:
        def __init__(self, fut: asyncio.Future[None]) -> None:
            self.fut = fut

        def __await__(self) -> Any:
            return self

        def __next__(self) -> Any:
            if self.fut.done():
                raise StopIteration
            self.fut._asyncio_future_blocking = True  # (as Future.__await__ yields itself)
            return self.fut

    async def on_own(fut: asyncio.Future[None]) -> None:
        await Own(fut)

    def packed(frames: list[Any]) -> bytes:
        return b"".join(struct.pack("@Pn", id(f.f_code), f.f_lasti) for f in frames)

    async def main() -> None:
        fut = asyncio.get_running_loop().create_future()
        first = asyncio.create_task(outer(fut))
        second = asyncio.create_task(on_task(first))
        third = asyncio.create_task(on_own(fut))
        await asyncio.sleep(0)
        reader = _live._Reader(None, [], 0.0)
        key = _timing.ACCEL.await_key
        for task, names in ((first, ["outer", "inner", "legacy"]), (third, ["on_own"])):
            # (Ending at the future's iterator, and at Own: types the Python walk learns.)
            assert key(task.get_coro(), reader.frameless) is None
            frames, _ = reader.walk(task.get_coro())
            assert [f.f_code.co_name for f in frames] == names
            assert key(task.get_coro(), reader.frameless) == packed(frames)
        assert Own in reader.frameless
        frames, _ = reader.walk(second.get_coro())
        assert [f.f_code.co_name for f in frames] == ["on_task"]
        assert key(second.get_coro(), reader.frameless) == packed(frames)
        fut.set_result(None)
        await asyncio.gather(second, third)

    run_on(factory, main())


@compiled_only
def test_the_compiled_live_table_is_the_python_table(factory: Any) -> None:
    """``_accel.live_table`` makes the rows the Python path makes, key for key, in the same
    order (the busiest first, then by id), with the same ``awaited_by`` (a task awaited
    directly, through ``gather`` and through ``shield``), and asks the reader only for what its
    caches do not hold yet (here: the first task of each kind, the running one and a task
    asyncio itself made)."""
    from loopwatch import _live, _runtime, _tasks

    async def leaf(ready: asyncio.Event) -> None:
        await ready.wait()

    async def branch(ready: asyncio.Event) -> None:
        await leaf(ready)

    async def stubborn(ready: asyncio.Event) -> None:
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(10)
        await ready.wait()

    async def on_task(other: asyncio.Task[None]) -> None:
        await other

    async def on_gather(*others: asyncio.Task[None]) -> None:
        await asyncio.gather(*others)

    async def on_shield(other: asyncio.Task[None]) -> None:
        await asyncio.shield(other)

    class Counting(_live._Reader):
        asked = 0

        def task(self, task: asyncio.Task[Any], running: bool) -> dict[str, Any]:
            self.asked += 1
            return super().task(task, running)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        ready = asyncio.Event()
        made = [asyncio.create_task(branch(ready)) for _ in range(20)]
        made += [asyncio.create_task(leaf(ready)) for _ in range(20)]
        held = asyncio.create_task(stubborn(ready))
        made.append(held)
        made.append(asyncio.ensure_future(leaf(ready)))
        made.append(asyncio.create_task(on_task(made[0])))
        made.append(asyncio.create_task(on_gather(made[1], made[20])))
        made.append(asyncio.create_task(on_shield(made[2])))
        for _ in range(3):  # (steps enough that busy times differ, and some are equal)
            await asyncio.sleep(0.001)
        held.cancel()
        await asyncio.sleep(0.01)
        runtime = _runtime.current()
        assert runtime is not None
        state = runtime.loops.state_of(loop)
        assert state is not None
        tasks = _tasks.pending_tasks(loop)
        current = asyncio.current_task()
        now = time.monotonic()
        compiled = Counting(state.tasks, [], now)
        rows = _timing.ACCEL.live_table(
            tasks, current, state.tasks, now, compiled, _live._Gathering
        )
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(_live, "_live_table", None)
            reader = _live._Reader
            patch.setattr(_live, "_Reader", lambda *_: reader(state.tasks, [], now))
            expected = _live._loop(loop, state, now)["tasks"]
        assert [list(r) for r in rows] == [list(r) for r in expected]  # (the keys, in order)
        assert rows == expected
        assert {r["state"] for r in rows} == {"running", "pending", "cancelling"}
        by_name = {r["task"]: r for r in rows}
        assert by_name[made[0].get_name()]["awaited_by"] == [made[-3].get_name()]
        assert by_name[made[1].get_name()]["awaited_by"] == [made[-2].get_name()]
        assert by_name[made[20].get_name()]["awaited_by"] == [made[-2].get_name()]
        assert by_name[made[2].get_name()]["awaited_by"] == []  # (shield: an inner future)
        busy = [(-r["busy_s"], r["id"]) for r in rows]
        assert busy == sorted(busy) and len(set(r["busy_s"] for r in rows)) < len(rows)
        assert len(tasks) == 46 and compiled.asked <= 8, compiled.asked
        ready.set()
        await asyncio.gather(*made)

    run_on(factory, main())
