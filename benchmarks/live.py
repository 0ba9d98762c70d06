"""What the live view and the deadlock search cost: ``loopwatch.snapshot()`` of a loop with many
pending tasks (each in a chain of two coroutines waiting on an event), taken from another thread
while the loop runs, as ``GET /tasks`` is; and one deadlock search over the same tasks, with the
longest time it holds the GIL (it lets go between chunks of 2,000 tasks). The budgets (issue 17):
a snapshot of 10,000 tasks in under 50 ms; a search holds the GIL under 10 ms.

    python benchmarks/live.py                 # 10,000 tasks, both loops, 7 snapshots each
    python benchmarks/live.py --tasks 1000 --loops asyncio
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import threading
import time

import loopwatch


async def fetch(ready: asyncio.Event) -> None:
    await ready.wait()


async def worker(ready: asyncio.Event) -> None:
    await fetch(ready)


async def scene(count: int, rounds: int) -> tuple[list[float], list[float]]:
    loop = asyncio.get_running_loop()
    ready = asyncio.Event()
    tasks = [asyncio.create_task(worker(ready)) for _ in range(count)]
    await asyncio.sleep(0.05)
    took: list[float] = []
    holds: list[float] = []

    def search() -> None:
        from loopwatch import _hangs, _runtime

        runtime = _runtime.current()
        assert runtime is not None
        state = runtime.loops.state_of(loop)
        assert state is not None and state.hangs is not None
        tasks = _hangs.pending_tasks(loop)
        start = time.perf_counter()
        completes = _hangs._completers(tasks[: _hangs.CHUNK])
        by_id = {id(t): t for t in tasks}
        for task in tasks[: _hangs.CHUNK]:
            _hangs._waits_on(task, by_id, completes)
        holds.append(time.perf_counter() - start)
        state.hangs._deadlocks(tasks, state.tasks, [])

    def read() -> None:
        start = time.perf_counter()
        snap = loopwatch.snapshot()
        took.append(time.perf_counter() - start)
        assert len(snap["loops"][0]["tasks"]) == count + 1

    for target in (read, search):
        for _ in range(rounds):
            reader = threading.Thread(target=target)
            reader.start()
            while reader.is_alive():
                await asyncio.sleep(0.001)
    ready.set()
    await asyncio.gather(*tasks)
    return took, holds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--loops", default="asyncio,uvloop")
    args = parser.parse_args()
    loopwatch.install(log="off")
    for kind in args.loops.split(","):
        factory = loopwatch.new_uvloop_event_loop if kind == "uvloop" else loopwatch.new_event_loop
        with asyncio.Runner(loop_factory=factory) as runner:
            took, holds = runner.run(scene(args.tasks, args.rounds))
        median = statistics.median(took) * 1e3
        print(
            f"{kind:8} snapshot of {args.tasks:,} tasks: median {median:.1f} ms "
            f"(min {min(took) * 1e3:.1f}, max {max(took) * 1e3:.1f}; budget 50 ms for 10,000)"
        )
        hold = statistics.median(holds) * 1e3
        print(
            f"{kind:8} deadlock search: one chunk of 2,000 tasks holds the GIL {hold:.1f} ms "
            f"(max {max(holds) * 1e3:.1f}; budget 10 ms)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
