"""The live view: every watched loop and every task, now, as plain data (``loopwatch.snapshot()``,
``GET /tasks``), and the text the ``loopwatch tasks`` and ``loopwatch top`` commands make of it.

Built on demand from what loopwatch keeps anyway (each task's proxy: its creation site, age,
steps and busy time; the loop's pulse and the watchdog's block), so it adds nothing per step or
per task. It is read from whichever thread asks: the metrics endpoint's thread answers while the
loop is blocked. Reading a task's chain of awaits from another thread touches the program's
coroutines and frames: each is put in the loop's pulse box, let go of on the loop's own thread
(so no finalizer of the program runs here), as the watchdog does with its samples.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
import types
from operator import itemgetter
from typing import TYPE_CHECKING, Any

from . import _places
from ._native import ACCEL
from ._tasks import mark_site, pending_tasks, site_place, suspended_chain
from ._timing import Timed
from ._watchdog import LoopState, coroutine_name

_MISSING = object()
_PyFuture = getattr(asyncio.futures, "_PyFuture", asyncio.Future)
_Coroutine = types.CoroutineType
_Generator = types.GeneratorType
# The compiled key of a chain of awaits (bytes: each frame's code address and offset), read
# without making a frame object or a list: a snapshot looks its places up by it.
_await_key = getattr(ACCEL, "await_key", None)
# The compiled table: the rows (each task whose chain, name and creation site are in the
# reader's caches; the rest are the reader's own ``task()``, which fills them), who awaits whom
# and the order, as the Python below makes them, in a fifth of its time.
_live_table = getattr(ACCEL, "live_table", None)
_Gathering = getattr(asyncio.tasks, "_GatheringFuture", None)
_by_id = itemgetter("id")
_by_busy = itemgetter("busy_s")


def _micro(seconds: float) -> float:
    """``round(seconds, 6)`` for a duration (never negative), in a third of its time."""
    return int(seconds * 1e6 + 0.5) / 1e6


if TYPE_CHECKING:
    from ._runtime import Runtime

SORT_KEYS = ("busy", "age", "steps", "waiting")


def snapshot(runtime: Runtime | None) -> dict[str, Any]:
    """``{"pid", "time", "loops": [...]}``: see the contract's "The live view"."""
    now = time.monotonic()
    loops: list[dict[str, Any]] = []
    if runtime is not None:
        for loop in runtime.loops.watched_loops():
            state = runtime.loops.state_of(loop)
            if state is not None:
                loops.append(_loop(loop, state, now))
    return {"pid": os.getpid(), "time": time.time(), "loops": loops}


def _thread_name(ident: int | None) -> str:
    if ident is None:
        return ""
    thread = threading._active.get(ident)  # type: ignore[attr-defined]  # no lock, no call
    return thread.name if thread is not None else str(ident)


def _loop(loop: asyncio.AbstractEventLoop, state: LoopState, now: float) -> dict[str, Any]:
    block = state.block
    blocked = None
    if block is not None and block.token and state.running:
        blocked = round(now - block.start, 6)
    counts, lag_sum = state.lag_histogram()
    observed = sum(counts)
    entry: dict[str, Any] = {
        "loop": state.kind,
        "thread": _thread_name(state.thread_id),
        "running": state.running,
        "blocked_s": blocked,
        "blocked_at": block.location if blocked is not None and block is not None else None,
        "lag_s": round(lag_sum / observed, 6) if observed else 0.0,
        "busy_s": round(state.busy_seconds(), 6),
        "tasks": [],
    }
    if not state.running:
        return entry  # (a stopped loop's box is not emptied until it runs again: nothing read)
    keep = state.pulse.box
    tasks = pending_tasks(loop)
    keep.append(tasks)
    current = asyncio.current_task(loop)
    reader = _Reader(state.tasks, keep, now)
    if _live_table is not None:
        entry["tasks"] = _live_table(tasks, current, state.tasks, now, reader, _Gathering)
        return entry
    row_of = reader.task
    rows = {id(task): row_of(task, task is current) for task in tasks}
    # Who awaits whom: a task's future waiter is the task (or the gather) it waits on.
    for task in tasks:
        waiter = getattr(task, "_fut_waiter", None)
        if waiter is None:
            continue
        if type(waiter) is _Gathering or (_Gathering is None and hasattr(waiter, "_children")):
            targets = waiter._children
        else:
            row = rows.get(id(waiter))  # (mostly a plain future: asking it for _children is slow)
            if row is not None:
                row["awaited_by"].append(rows[id(task)]["task"])
            continue
        for target in targets:
            row = rows.get(id(target))
            if row is not None:
                row["awaited_by"].append(rows[id(task)]["task"])
    # The busiest first, then by id: two stable sorts cost less than one by a tuple key.
    ordered = sorted(rows.values(), key=_by_id)
    ordered.sort(key=_by_busy, reverse=True)
    entry["tasks"] = ordered
    return entry


class _Reader:
    """Reads tasks for one snapshot, with caches by code object: a snapshot of 10,000 tasks
    made by a few dozen coroutine functions formats a few dozen names and places, not 30,000."""

    def __init__(self, tracker: Any, keep: Any, now: float) -> None:
        self.tracker = tracker
        self.keep = keep
        self.now = now
        # Keyed by id(code): a code object's own hash is computed anew at each call (it hashes
        # its bytecode and constants), which cost more than the rest of a task's row. The ids
        # are stable for the snapshot's length: every code is held by a frame or mark in `keep`.
        self.names: dict[int, str] = {}
        self.places: dict[tuple[int, int | None], str] = {}
        self.sites: dict[tuple[int, int], str | None] = {}
        self.chains: dict[tuple[int, ...] | bytes, tuple[str, list[str]]] = {}
        self.frameless: set[type] = {asyncio.Future, _PyFuture}

    def place(self, code: Any, line: int | None) -> str:
        key = (id(code), line)
        found = self.places.get(key)
        if found is None:
            found = self.places[key] = _places.place(code, line)
        return found

    def name(self, coro: Any) -> str:
        code = getattr(coro, "cr_code", None)
        found = self.names.get(id(code)) if code is not None else None
        if found is None:
            found = coroutine_name(coro)
            if code is not None and found == code.co_qualname:
                self.names[id(code)] = found  # (a name of the loop's own wrappers: not cached)
        return found

    def chain(self, coro: Any) -> tuple[str | None, list[str]]:
        """Where a suspended coroutine waits (the innermost frame of the program's own code)
        and the places of its chain of coroutines to there, outermost first. Tasks suspended at
        the same instructions share one answer: the chain is keyed by its frames' code and
        instruction offsets, and placed once."""
        key = _await_key(coro, self.frameless) if _await_key is not None else None
        if key is not None:
            found = self.chains.get(key)
            if found is not None:
                return found[0], found[1].copy()
        frames, signature = self.walk(coro)
        if not frames:
            awaiting, _, places_ = suspended_chain(coro, self.keep)  # (an async generator)
            return awaiting, list(places_)
        self.keep.append(frames)
        found = self.chains.get(signature)
        if found is None:
            pick = len(frames) - 1
            while pick > 0 and not _places.is_own_code(frames[pick].f_code.co_filename):
                pick -= 1
            if pick == 0 and not _places.is_own_code(frames[0].f_code.co_filename):
                pick = len(frames) - 1
            places = [self.place(f.f_code, f.f_lineno) for f in frames[: pick + 1]]
            found = self.chains[signature] = (places[-1], places)
        if key is None and _await_key is not None:
            key = _await_key(coro, self.frameless)  # (the walk may have learnt a type)
        if key is not None:
            self.chains[key] = found  # (where the compiled rows look it up)
        return found[0], found[1].copy()

    def walk(self, coro: Any) -> tuple[list[Any], tuple[Any, ...]]:
        """The frames of a chain of awaits, outermost first, and its key (for any kind of
        awaitable; the compiled ``await_key`` reads the common kinds, and learns here which
        types end a chain)."""
        frames = []
        key: list[Any] = []
        awaitable = coro
        for _ in range(64):
            kind = type(awaitable)
            if kind is _Coroutine:
                frame = awaitable.cr_frame
                nxt = awaitable.cr_await
            elif kind is _Generator:
                frame = awaitable.gi_frame
                nxt = awaitable.gi_yieldfrom
            elif kind in self.frameless:
                break  # a future (where most chains end), or another object with no frame
            else:
                frame = getattr(awaitable, "cr_frame", None) or getattr(awaitable, "gi_frame", None)
                nxt = getattr(awaitable, "cr_await", None) or getattr(
                    awaitable, "gi_yieldfrom", None
                )
                if frame is None and not (hasattr(kind, "cr_frame") or hasattr(kind, "gi_frame")):
                    self.frameless.add(kind)  # (asking again raises and catches, ~1 us)
            if frame is None:
                break
            frames.append(frame)
            key.append(id(frame.f_code))
            key.append(frame.f_lasti)
            awaitable = nxt
            if awaitable is None:
                break
        return frames, tuple(key)

    def task(self, task: asyncio.Task[Any], running: bool) -> dict[str, Any]:
        proxy: Any = getattr(task, "_coro", None)
        if type(proxy) is Timed and proxy._owner is self.tracker:
            # (The common case, read straight off the task's proxy: what mark_of() and
            # get_coro() would find, without their calls.)
            mark: Any = proxy
            coro = proxy._coro
            age = self.now - proxy.born
            busy = proxy.busy
            steps = proxy.steps
        else:
            coro = task.get_coro()
            own: Any = coro
            mark = self.tracker.mark_of(task) if self.tracker is not None else None
            if mark is not None:
                age = self.now - mark.born
                busy = getattr(mark, "busy", 0.0)  # (a TaskMark, without a proxy, counts neither)
                steps = getattr(mark, "steps", 0)
            elif type(own) is Timed and own._owner is None and hasattr(own, "born"):
                # A task no task factory made whose coroutine a framework hook put in a proxy
                # (an aiohttp request's, from Python 3.12): the proxy's own counts.
                age = self.now - own.born
                busy = own.busy
                steps = own.steps
            else:
                age = busy = 0.0
                steps = 0
        if running:
            awaiting: str | None = None
            chain: list[str] = []
            state = "running"
        else:
            awaiting, chain = self.chain(coro)
            state = "cancelling" if task.cancelling() else "pending"
        if mark is None:
            created_at = None
        elif mark._stack is None and mark._code is not None:
            key = (id(mark._code), mark._lasti)
            created_at = self.sites.get(key, _MISSING)
            if created_at is _MISSING:
                created_at = self.sites[key] = site_place((mark._code, mark._lasti))
        else:
            created_at = site_place(mark_site(mark))
        return {
            "task": task.get_name(),
            "id": id(task),
            "coroutine": self.name(coro),
            "state": state,
            "age_s": _micro(age),
            "created_at": created_at,
            "awaiting": awaiting,
            "await_chain": chain,
            "awaited_by": [],
            "steps": steps,
            "busy_s": _micro(busy),
            "waiting_s": _micro(age - busy) if age > busy else 0.0,
        }


# -- as text ----------------------------------------------------------------------------------


def _short(place: str | None, width: int = 60) -> str:
    if not place:
        return "-"
    return place if len(place) <= width else "..." + place[-(width - 3) :]


def _task_line(row: dict[str, Any]) -> str:
    return (
        f"{row['task']} {row['coroutine']} [{row['state']}] age {row['age_s']:.1f}s "
        f"busy {row['busy_s'] * 1000:.1f}ms at {_short(row['awaiting'])}"
    )


def _loop_line(entry: dict[str, Any]) -> str:
    blocked = entry["blocked_s"]
    health = (
        f"BLOCKED {blocked:.3f}s at {_short(entry.get('blocked_at'))}"
        if blocked is not None
        else "not blocked"
    )
    return (
        f"loop {entry['loop']} (thread {entry['thread'] or '?'}): {health}, "
        f"mean lag {entry['lag_s'] * 1000:.2f}ms, busy {entry['busy_s']:.3f}s, "
        f"{len(entry['tasks'])} tasks"
    )


def tree_text(snap: dict[str, Any]) -> str:
    """Every task under the task that awaits it, like ``pstree``."""
    lines = [f"pid {snap['pid']}: {len(snap['loops'])} watched loop(s)"]
    for entry in snap["loops"]:
        lines.append(_loop_line(entry))
        rows = entry["tasks"]
        by_name = {r["task"]: r for r in rows}
        children: dict[str, list[dict[str, Any]]] = {}
        roots = []
        for row in sorted(rows, key=lambda r: (-r["age_s"], r["task"])):  # the oldest first
            parents = [p for p in row["awaited_by"] if p in by_name]
            if parents:
                children.setdefault(parents[0], []).append(row)
            else:
                roots.append(row)
        seen: set[str] = set()
        for i, row in enumerate(roots):
            _show(lines, children, seen, row, "", i == len(roots) - 1)
    return "\n".join(lines)


def _show(
    lines: list[str],
    children: dict[str, list[dict[str, Any]]],
    seen: set[str],
    row: dict[str, Any],
    prefix: str,
    last: bool,
) -> None:
    lines.append(f"{prefix}{'`-- ' if last else '|-- '}{_task_line(row)}")
    if row["task"] in seen:
        return  # (a cycle of awaits: shown once)
    seen.add(row["task"])
    kids = children.get(row["task"], [])
    for i, kid in enumerate(kids):
        _show(lines, children, seen, kid, prefix + ("    " if last else "|   "), i == len(kids) - 1)


def top_text(
    snap: dict[str, Any],
    *,
    sort: str = "busy",
    previous: dict[str, Any] | None = None,
    limit: int = 30,
) -> str:
    """One frame of ``loopwatch top``: loop health, then the tasks sorted by ``sort``."""
    key = {"busy": "busy_s", "age": "age_s", "steps": "steps", "waiting": "waiting_s"}[sort]
    lines = [f"loopwatch top - pid {snap['pid']} - sorted by {sort}"]
    before = {(e["loop"], e["thread"]): e for e in (previous or {}).get("loops", [])}
    elapsed = snap["time"] - previous["time"] if previous else 0.0
    for entry in snap["loops"]:
        line = _loop_line(entry)
        old = before.get((entry["loop"], entry["thread"]))
        if old is not None and elapsed > 0:
            share = (entry["busy_s"] - old["busy_s"]) / elapsed
            line += f", busy share {min(max(share, 0.0), 1.0) * 100:.0f}%"
        lines.append(line)
        lines.append(
            f"  {'TASK':<12} {'COROUTINE':<28} {'STATE':<10} {'AGE s':>8} {'BUSY ms':>9} "
            f"{'STEPS':>7} {'WAIT s':>8}  AWAITING"
        )
        rows = sorted(entry["tasks"], key=lambda r: (-r[key], r["id"]))
        for row in rows[:limit]:
            lines.append(
                f"  {row['task'][:12]:<12} {row['coroutine'][:28]:<28} {row['state']:<10} "
                f"{row['age_s']:>8.1f} {row['busy_s'] * 1000:>9.1f} {row['steps']:>7} "
                f"{row['waiting_s']:>8.1f}  {_short(row['awaiting'], 50)}"
            )
        if len(rows) > limit:
            lines.append(f"  ... and {len(rows) - limit} more")
    return "\n".join(lines)
