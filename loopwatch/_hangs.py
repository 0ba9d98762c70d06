"""Hangs the loop cannot see, found from the watchdog's thread: tasks waiting on each other in a
cycle (``deadlock``), and, when asked for, a task suspended at one ``await`` too long
(``task_stuck``). Cancellations swallowed and ignored are the task tracker's (``_tasks``).

Every ``DEADLOCK_CHECK_MS`` (and, with ``TASK_STUCK_MS`` set, at least ten times per that time)
the watchdog's thread reads each running loop's pending tasks. Nothing is added to the loop's
thread: what a task waits on is its own ``_fut_waiter``, read from here, and every object of the
program's touched goes into the loop's pulse box, let go of on the loop's own thread.

The wait graph has an edge from a task to each task that must finish before it can go on:

- ``await task`` (``wait_for`` on 3.12+): the task it waits on is its future waiter;
- ``gather(...)``: its waiter is the gathering future, whose children are tasks;
- ``shield(task)``, 3.11's ``wait_for``, and any future a task awaits that another task's
  done-callback completes: the waiter is a plain future, found among the objects a pending task's
  done-callbacks hold (a ``functools.partial``'s arguments, a closure's cells, a bound method's
  object).

A cycle in that graph is a deadlock: nothing else can wake those tasks. It is reported once, while
it lasts, with each task and the place it waits at.
"""

from __future__ import annotations

import asyncio
import functools
import heapq
import time
from typing import Any

from ._events import Deadlock, TaskStuck
from ._tasks import about_task, mark_site, origin_of, pending_tasks, suspended_chain
from ._watchdog import coroutine_name

INF = float("inf")
_Future = asyncio.Future
# Tasks read per hold of the GIL: the watchdog's thread lets the loop's have it in between.
CHUNK = 2000


class Hangs:
    """The deadlock search and the stuck-task check of one loop (watchdog's thread only)."""

    def __init__(self, emit: Any) -> None:
        self.emit = emit
        self.check_every = 1.0  # DEADLOCK_CHECK_MS, in seconds
        self.stuck_after: float | None = None  # TASK_STUCK_MS, in seconds; None: off
        self.next_check = 0.0
        self._reported_cycles: set[frozenset[int]] = set()
        # id(task) -> (steps seen, since when, places already reported)
        self._still: dict[int, tuple[int, float, set[str]]] = {}
        self.last_check_s = 0.0  # what the last check took (a measure of its cost)

    def configure(self, check_ms: float, stuck_ms: float | None) -> None:
        self.check_every = check_ms / 1000.0
        self.stuck_after = stuck_ms / 1000.0 if stuck_ms is not None else None

    @property
    def period(self) -> float:
        if self.stuck_after is None:
            return self.check_every
        return min(self.check_every, self.stuck_after / 10.0)

    def run_started(self, now: float) -> float:
        """The loop's run begins: the first look is one period later (a short run, a test, is
        never read; what a look holds of the program is let go of within a loop iteration)."""
        if self.next_check < now:
            self.next_check = now + self.period
        return self.next_check

    def check(self, loop: asyncio.AbstractEventLoop, tracker: Any, keep: Any, now: float) -> float:
        """Look once if it is time; return when to look again."""
        if now < self.next_check:
            return self.next_check
        self.next_check = now + self.period
        started = time.perf_counter()
        tasks = pending_tasks(loop)
        keep.append(tasks)
        self._deadlocks(tasks, tracker, keep)
        if self.stuck_after is not None:
            self._stuck(tasks, tracker, keep, now)
        self.last_check_s = time.perf_counter() - started
        return self.next_check

    def longest_waiting(
        self, loop: asyncio.AbstractEventLoop, tracker: Any, keep: Any, now: float, count: int = 5
    ) -> list[tuple[str, str | None, float]]:
        """For a stall: the ``count`` tasks that have waited longest (their age less their busy
        time, as the live view counts it), the running one left out: ``(name, awaiting, s)``."""
        if tracker is None:
            return []
        tasks = pending_tasks(loop)
        keep.append(tasks)
        current = asyncio.current_task(loop)
        rows: list[tuple[float, int, asyncio.Task[Any]]] = []
        for task in tasks:
            mark = tracker.mark_of(task) if task is not current else None
            if mark is not None:
                busy = float(getattr(mark, "busy", 0.0) or 0.0)
                rows.append((now - mark.born - busy, id(task), task))
        out = []
        for waited, _, task in heapq.nlargest(count, rows):
            awaiting, _, _ = suspended_chain(task.get_coro(), keep)
            out.append((task.get_name(), awaiting, round(max(waited, 0.0), 3)))
        return out

    # -- deadlocks -------------------------------------------------------------------------------

    def _deadlocks(self, tasks: list[asyncio.Task[Any]], tracker: Any, keep: Any) -> None:
        by_id = {id(t): t for t in tasks}
        completes: dict[int, int] = {}
        for start in range(0, len(tasks), CHUNK):
            if start:
                time.sleep(0)  # let the loop's thread have the GIL between chunks
            completes.update(_completers(tasks[start : start + CHUNK]))
        edges: dict[int, list[int]] = {}
        for start in range(0, len(tasks), CHUNK):
            if start:
                time.sleep(0)
            for task in tasks[start : start + CHUNK]:
                targets = _waits_on(task, by_id, completes)
                if targets:
                    edges[id(task)] = targets
        if not edges:
            self._reported_cycles.clear()
            return
        cycles = _cycles(edges)
        alive = {frozenset(c) for c in cycles}
        self._reported_cycles &= alive  # a cycle that broke may be reported again if it comes back
        for cycle in cycles:
            key = frozenset(cycle)
            if key in self._reported_cycles:
                continue
            members = [by_id[i] for i in cycle]
            # Told from the task whose name sorts first: the same cycle reads the same each time.
            first = min(range(len(members)), key=lambda i: members[i].get_name())
            members = members[first:] + members[:first]
            if not _still_a_cycle(members):
                continue  # read in chunks, it may be edges of different moments: look again
            self._reported_cycles.add(key)
            self._report_cycle(members, tracker, keep)

    def _report_cycle(self, cycle: list[asyncio.Task[Any]], tracker: Any, keep: Any) -> None:
        places: list[str | None] = []
        names: list[str] = []
        origin = "library"
        for task in cycle:
            coro = task.get_coro()
            awaiting, _, _ = suspended_chain(coro, keep)
            places.append(awaiting)
            names.append(coroutine_name(coro))
            mark = tracker.mark_of(task) if tracker is not None else None
            site = mark_site(mark) if mark is not None else None
            if origin_of(site, coro) == "program":
                origin = "program"
        self.emit(
            Deadlock(
                tasks=tuple(t.get_name() for t in cycle),
                cycle=tuple(places),
                coroutines=tuple(names),
                origin=origin,
            )
        )

    # -- stuck tasks ---------------------------------------------------------------------------

    def _stuck(self, tasks: list[asyncio.Task[Any]], tracker: Any, keep: Any, now: float) -> None:
        limit = self.stuck_after
        assert limit is not None
        still = self._still
        current: dict[int, tuple[int, float, set[str]]] = {}
        for task in tasks:
            mark = tracker.mark_of(task) if tracker is not None else None
            steps = getattr(mark, "steps", None)
            if not isinstance(steps, int):
                continue  # no proxy counts its steps: not followed
            seen = still.get(id(task))
            if seen is None or seen[0] != steps:
                current[id(task)] = (steps, now, set())
                continue
            current[id(task)] = seen
            waited = now - seen[1]
            if waited < limit:
                continue
            coro = task.get_coro()
            awaiting, _, chain = suspended_chain(coro, keep)
            if awaiting is None or awaiting in seen[2]:
                continue
            seen[2].add(awaiting)
            self.emit(
                TaskStuck(
                    awaiting=awaiting,
                    await_chain=chain,
                    waiting_s=round(waited, 3),
                    **about_task(task, coro, mark),
                )
            )
        self._still = current


def _held_futures(callback: Any) -> list[Any]:
    """The futures a done-callback holds: what it may complete when its task ends."""
    found: list[Any] = []
    seen = 0
    pending = [callback]
    while pending and seen < 8:
        seen += 1
        obj = pending.pop()
        if isinstance(obj, _Future):
            found.append(obj)
            continue
        if isinstance(obj, functools.partial):
            pending.append(obj.func)
            pending.extend(obj.args)
            continue
        owner = getattr(obj, "__self__", None)
        if owner is not None and not isinstance(owner, type):
            pending.append(owner)
        for cell in getattr(obj, "__closure__", None) or ():
            try:
                pending.append(cell.cell_contents)
            except ValueError:  # an empty cell
                continue
    return found


def _completers(tasks: list[asyncio.Task[Any]]) -> dict[int, int]:
    """id(future) -> id(task) whose end completes it (through one of its done-callbacks)."""
    completes: dict[int, int] = {}
    for task in tasks:
        callbacks = getattr(task, "_callbacks", None) or ()
        for entry in callbacks:
            callback = entry[0] if isinstance(entry, tuple) else entry
            for future in _held_futures(callback):
                if future is not task:
                    completes[id(future)] = id(task)
    return completes


def _waits_on(
    task: asyncio.Task[Any], by_id: dict[int, asyncio.Task[Any]], completes: dict[int, int]
) -> list[int]:
    waiter = getattr(task, "_fut_waiter", None)
    if waiter is None:
        return []
    if id(waiter) in by_id:
        return [id(waiter)]
    children = getattr(waiter, "_children", None)
    if children:  # gather
        return [id(c) for c in children if id(c) in by_id]
    completer = completes.get(id(waiter))
    if completer is not None and completer != id(task):
        return [completer]
    return []


def _still_a_cycle(members: list[asyncio.Task[Any]]) -> bool:
    """The cycle's edges read again, all at once: each task waits on the next one now."""
    by_id = {id(t): t for t in members}
    completes = _completers(members)
    for i, task in enumerate(members):
        if id(members[(i + 1) % len(members)]) not in _waits_on(task, by_id, completes):
            return False
    return all(not t.done() for t in members)


def _cycles(edges: dict[int, list[int]]) -> list[list[int]]:
    """One cycle per strongly connected component with a cycle (Tarjan, iterative), in order:
    each task waits on the next, the last on the first."""
    index: dict[int, int] = {}
    low: dict[int, int] = {}
    on_stack: set[int] = set()
    stack: list[int] = []
    components: list[list[int]] = []
    counter = 0
    for root in edges:
        if root in index:
            continue
        work = [(root, 0)]
        while work:
            node, i = work.pop()
            if i == 0:
                index[node] = low[node] = counter
                counter += 1
                stack.append(node)
                on_stack.add(node)
            targets = edges.get(node, [])
            if i < len(targets):
                work.append((node, i + 1))
                target = targets[i]
                if target not in index:
                    work.append((target, 0))
                elif target in on_stack:
                    low[node] = min(low[node], index[target])
                continue
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1 or node in edges.get(node, []):
                    components.append(component)
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
    return [_cycle_in(component, edges) for component in components]


def _cycle_in(component: list[int], edges: dict[int, list[int]]) -> list[int]:
    """A cycle through the component's members, starting at its first, in wait order."""
    members = set(component)
    start = min(component)
    path = [start]
    seen = {start}
    node = start
    while True:
        nxt = next((t for t in edges.get(node, []) if t in members), None)
        if nxt is None or nxt == start:
            return path
        if nxt in seen:
            return path[path.index(nxt) :]
        path.append(nxt)
        seen.add(nxt)
        node = nxt
