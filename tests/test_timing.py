"""Coroutine timing on asyncio and uvloop: busy and wall time, steps; what the program sees."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from types import CoroutineType
from typing import Any

import pytest
from conftest import Recorder, place, run_on

import loopwatch
from loopwatch import _api, _timing

pytestmark = pytest.mark.serial

HERE = __file__
Factory = Callable[[], asyncio.AbstractEventLoop]


def burn(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def stats_of(name: str) -> loopwatch.CoroutineStats:
    (found,) = [s for s in loopwatch.coroutine_stats() if s.name == name]
    return found


async def burner() -> None:
    for _ in range(5):
        burn(0.02)
        await asyncio.sleep(0.03)


def test_busy_time_is_the_cpu_each_step_burned(factory: Factory, events: Recorder) -> None:
    """5 steps burning 20 ms each, 30 ms waits between: busy 100 ms (within 10%), wall ~250 ms,
    6 steps (the last one returns), no slow step."""
    run_on(factory, burner())
    s = stats_of("burner")
    assert s.count == 1 and s.errors == 0 and s.cancelled == 0
    assert s.steps == 6
    assert 0.1 <= s.busy_s <= 0.11, s.busy_s
    assert 0.24 <= s.wall_s <= 0.4, s.wall_s
    assert 0.02 <= s.max_step_s <= 0.025
    assert s.slow_steps == 0


async def yields(n: int) -> int:
    for _ in range(n):
        await asyncio.sleep(0)
    return n


def test_steps_are_counted_exactly(factory: Factory, events: Recorder) -> None:
    async def main() -> None:
        await asyncio.gather(*(asyncio.create_task(yields(9)) for _ in range(4)))

    run_on(factory, main())
    s = stats_of("yields")
    assert (s.count, s.steps) == (4, 40)


async def fails_after_a_step() -> None:
    await asyncio.sleep(0)
    raise LookupError("missing")  # RAISE:timed


async def waits() -> None:
    await asyncio.sleep(10)


def test_failed_and_cancelled_tasks_are_timed(factory: Factory, events: Recorder) -> None:
    async def main() -> None:
        bad = asyncio.create_task(fails_after_a_step())
        stop = asyncio.create_task(waits())
        await asyncio.sleep(0.01)
        stop.cancel()
        await asyncio.gather(bad, stop, return_exceptions=True)

    run_on(factory, main())
    assert (stats_of("fails_after_a_step").count, stats_of("fails_after_a_step").errors) == (1, 1)
    assert stats_of("fails_after_a_step").steps == 2
    waited = stats_of("waits")
    assert (waited.count, waited.cancelled, waited.steps) == (1, 1, 2)
    assert 0.009 <= waited.wall_s <= 0.2


@pytest.mark.skipif(sys.version_info < (3, 12), reason="eager tasks arrived in Python 3.12")
def test_eager_tasks_are_timed(factory: Factory, kind: str, events: Recorder) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        if kind == "asyncio" or sys.version_info < (3, 13):
            loop.set_task_factory(asyncio.eager_task_factory)  # type: ignore[attr-defined]
            eager: dict[str, Any] = {}
        else:
            eager = {"eager_start": True}
        done = loop.create_task(yields(0), **eager)
        assert done.done()
        await loop.create_task(yields(3), **eager)

    run_on(factory, main())
    s = stats_of("yields")
    assert (s.count, s.steps) == (2, 1 + 4)


def test_label_cap_counts_the_rest_under_other(factory: Factory, events: Recorder) -> None:
    _api.activate(coroutine_labels=3)
    namespace: dict[str, Any] = {"asyncio": asyncio}
    for i in range(6):
        exec(f"async def co{i}():\n    await asyncio.sleep(0)\n", namespace)

    async def main() -> None:
        for i in range(6):
            await asyncio.create_task(namespace[f"co{i}"]())

    run_on(factory, main())
    rows = {s.name: s.count for s in loopwatch.coroutine_stats()}
    # Tasks are counted as they end: co0..co2 take the three names; co3..co5 and main (which
    # ends last) are counted under "other".
    assert rows == {"co0": 1, "co1": 1, "co2": 1, "other": 4}
    assert len(rows) == 4


@loopwatch.timed
async def plain_timed(n: int) -> int:
    await asyncio.sleep(0)
    return n * 2


@loopwatch.timed("db.fetch")
async def named_timed() -> None:
    await asyncio.sleep(0.01)
    raise ConnectionError("db down")  # RAISE:db


def test_timed_records_calls_and_keeps_the_exception(factory: Factory, events: Recorder) -> None:
    """@timed works without its own task, even with step timing off; a raise is unchanged."""
    _api.activate(step_timing=False)

    async def main() -> None:
        assert await plain_timed(21) == 42
        with pytest.raises(ConnectionError, match="db down") as caught:
            await named_timed()
        frames = [f.filename for f in traceback.extract_tb(caught.value.__traceback__)]
        assert not any("loopwatch" in f and "tests" not in f for f in frames), frames
        assert traceback.extract_tb(caught.value.__traceback__)[-1].lineno == int(
            place(HERE, "RAISE:db", "x").split(":")[1].split(" ")[0]
        )

    run_on(factory, main())
    assert (stats_of("plain_timed").count, stats_of("plain_timed").steps) == (1, 2)
    db = stats_of("db.fetch")
    assert (db.count, db.errors) == (1, 1)
    assert db.wall_s >= 0.009  # asyncio.sleep(0.01) may wake within the clock's resolution


def test_timed_rejects_a_plain_function() -> None:
    with pytest.raises(TypeError, match="needs a coroutine function"):
        loopwatch.timed(len)  # type: ignore[arg-type]


async def suspended_here(gate: asyncio.Event) -> None:
    await gate.wait()  # SUSPEND:repr


def test_what_the_program_sees_of_its_tasks_is_unchanged(kind: str) -> None:
    """repr's coroutine part, get_coro names, get_stack, print_stack, iscoroutine, cancellation
    and tracebacks read the same on a watched loop as on a plain one."""
    import io

    import uvloop

    async def observe() -> dict[str, Any]:
        gate = asyncio.Event()
        task = asyncio.create_task(suspended_here(gate), name="observed")
        await asyncio.sleep(0)
        out = io.StringIO()
        task.print_stack(file=out)
        seen = {
            "repr": repr(task).split(" cb=[")[0],
            "name": task.get_coro().__qualname__,
            "stack": [(f.f_code.co_name, f.f_lineno) for f in task.get_stack()],
            # The first line repeats repr(task), whose cb=[...] lists loopwatch's done callback.
            "print_stack": out.getvalue().splitlines()[1:],
            "iscoroutine": asyncio.iscoroutine(task.get_coro()),
        }
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        seen["cancelled"] = task.cancelled()
        failing = asyncio.create_task(fails_after_a_step())
        with pytest.raises(LookupError) as caught:
            await failing
        seen["traceback"] = [
            (f.name, f.lineno) for f in traceback.extract_tb(caught.value.__traceback__)
        ][-2:]
        return seen

    plain = uvloop.new_event_loop if kind == "uvloop" else asyncio.SelectorEventLoop
    watched = loopwatch.new_uvloop_event_loop if kind == "uvloop" else loopwatch.new_event_loop
    assert run_on(watched, observe()) == run_on(plain, observe())


async def one_slow_step() -> tuple[float, float]:
    await asyncio.sleep(0.01)
    start = time.perf_counter()
    time.sleep(0.25)  # BLOCK:exact
    took = time.perf_counter() - start
    await asyncio.sleep(0)
    # The slow step ended before this next one began.
    bound = time.perf_counter() - start
    await asyncio.sleep(0.02)
    return took, bound


def test_slow_task_step_has_its_exact_duration(
    factory: Factory, kind: str, events: Recorder
) -> None:
    """The step's own timing replaces the heartbeat's estimate; the watchdog gives the stack."""
    took, bound = run_on(factory, one_slow_step())
    (event,) = events.wait_for(1)
    assert event.location == place(HERE, "BLOCK:exact", "one_slow_step")  # type: ignore[attr-defined]
    assert event.stack[-1] == event.location  # type: ignore[attr-defined]
    # Between what the step measured of itself and the start of the next step (the step
    # starts a few microseconds before its own clock read).
    assert took <= event.duration_s <= bound + 0.002, (event.duration_s, took, bound)  # type: ignore[attr-defined]
    assert stats_of("one_slow_step").slow_steps == 1


async def slow_to_the_end() -> None:
    await asyncio.sleep(0)
    time.sleep(0.25)  # BLOCK:first
    await asyncio.sleep(0)
    time.sleep(0.15)  # BLOCK:last


def test_every_slow_step_counts_the_last_one_too(factory: Factory, events: Recorder) -> None:
    """A task's last step is slow but shorter than its slowest: it still counts as slow and is
    reported with its own duration (the compiled and the Python proxy alike)."""

    async def main() -> None:
        await asyncio.create_task(slow_to_the_end())

    run_on(factory, main())
    s = stats_of("slow_to_the_end")
    assert (s.count, s.steps, s.slow_steps) == (1, 3, 2)
    assert 0.25 <= s.max_step_s < 0.3, s.max_step_s
    found = events.wait_for(2)
    assert [e.location for e in found] == [  # type: ignore[attr-defined]
        place(HERE, "BLOCK:first", "slow_to_the_end"),
        place(HERE, "BLOCK:last", "slow_to_the_end"),
    ]
    assert 0.15 <= found[1].duration_s < 0.2  # type: ignore[attr-defined]


def test_step_timing_off_keeps_wall_time_and_counts(factory: Factory, events: Recorder) -> None:
    _api.activate(step_timing=False)

    async def main() -> Any:
        task = asyncio.create_task(yields(3))
        await task
        assert type(task.get_coro()) is CoroutineType  # the program's own, either way
        return task._coro  # type: ignore[attr-defined]  # what the task drives

    coro = run_on(factory, main())
    if _timing.ACCEL is None:  # the task drives its coroutine itself
        assert type(coro) is CoroutineType
    else:  # the compiled proxy stays, only to see the end: it reads no clock
        assert type(coro) is _timing.ACCEL.Timed
        assert (coro._timing, coro.busy, coro.steps) == (False, 0.0, 4)
    s = stats_of("yields")
    assert (s.count, s.steps, s.busy_s) == (1, 0, 0.0)
    assert s.wall_s > 0


def test_summary_at_exit(tmp_path: Any) -> None:
    app = tmp_path / "app.py"
    app.write_text(
        "import asyncio, time\n"
        "async def crunch():\n"
        "    time.sleep(0.03)\n"
        "    await asyncio.sleep(0)\n"
        "async def main():\n"
        "    await asyncio.gather(*(asyncio.create_task(crunch()) for _ in range(3)))\n"
        "asyncio.run(main())\n"
        "print('done')\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("LOOPWATCH")}
    env.update(LOOPWATCH="1", LOOPWATCH_SUMMARY="1", LOOPWATCH_LOG="off")
    proc = subprocess.run(
        [sys.executable, str(app)], env=env, capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 0 and proc.stdout == "done\n"
    lines = proc.stderr.splitlines()
    assert lines[0] == "loopwatch: top 2 coroutines by busy time"
    assert lines[1].split() == [
        "coroutine",
        "count",
        "busy",
        "s",
        "mean",
        "busy",
        "max",
        "step",
        "slow",
        "wall",
        "s",
        "max",
        "wall",
    ]
    crunch = lines[2].split()
    assert crunch[0] == "crunch" and crunch[1] == "3"
    assert 0.09 <= float(crunch[2]) <= 0.12
    assert lines[3].split()[0:2] == ["main", "1"]
