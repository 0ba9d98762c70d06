"""Task lifecycle: where every task was born, and which ones leaked, were orphaned or lost their
exception; and coroutines that were never awaited.

Per task created, the task factory costs a Python call, a walk of one to three frames to the
first one outside asyncio/uvloop/loopwatch (a dict lookup per frame, the file name's hash being
cached), one dict insert and one done callback. The creation site is kept as the pair
``(code object, instruction offset)``, never a frame (a frame would keep the creator's locals
alive), and turned into ``path:line in function`` only when an event needs it. The entry leaves
the table when the task ends, so a finished task leaves nothing behind; a task that ended with an
exception carries its creation site as an attribute until it is retrieved or destroyed.

Orphans and unretrieved exceptions are what asyncio itself reports, from the task's finalizer, to
``loop.call_exception_handler``: loopwatch shadows that method on the watched loop, turns the
report into an event with the creation site, and hands it on unchanged. Leaks are judged when a
loop stops for good (just before ``asyncio.run`` / ``Runner`` cancel what is left, or at
``loop.close()``) and at the end of a ``watch()`` scope.
"""

from __future__ import annotations

import asyncio
import asyncio.runners
import contextlib
import contextvars
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterable
from types import CodeType, CoroutineType, FrameType, TracebackType
from typing import Any

from . import _places
from ._config import report
from ._events import (
    CoroutineNeverAwaited,
    Event,
    TaskExceptionUnretrieved,
    TaskLeaked,
    TaskOrphaned,
)
from ._timing import TABLE, StepWatch, Timed
from ._watchdog import coroutine_name

monotonic = time.monotonic
_getframe = sys._getframe
_Task = asyncio.Task
_machinery = _places.machinery_cache()
_is_machinery = _places.is_machinery

# What is kept per live task, flat to stay small (~180 bytes with its dict slot, per tracemalloc):
# (monotonic time of creation, coroutine label, code, instruction offset[, code, offset, ...]):
# the label its timing is recorded under (None: asyncio's own coroutine, not timed), then the
# creation site and, with a deeper ``creation_stack``, the frames around it.
Entry = tuple[Any, ...]
Site = tuple[Any, ...]  # the (code, offset, code, offset, ...) part of an Entry
# Done callbacks normally copy the current context, an allocation per task; loopwatch's callback
# reads nothing from any context, so one empty context serves every task.
_NO_CONTEXT = contextvars.Context()
_ORIGIN_ATTR = "_loopwatch_created_at"
# Frames of the loop itself running callbacks (stock asyncio's handle; loopwatch's run wrapper,
# the last frame before uvloop's compiled loop calls a callback). Registered by _loops.
_HANDLE_RUN = asyncio.Handle._run.__code__
_driver: CodeType | None = None
_OWN_DIR = _places.LOOPWATCH_DIR
# The task-making API itself: not a creation site when the loop's own code is the creator.
_API_CODES = frozenset(
    f.__code__
    for f in (
        asyncio.BaseEventLoop.create_task,
        asyncio.tasks.create_task,
        asyncio.tasks.ensure_future,
        getattr(asyncio.tasks, "_ensure_future", asyncio.tasks.ensure_future),
    )
)


def set_driver(code: CodeType) -> None:
    """Register loopwatch's run wrapper (one code object for every loop) as a driver frame."""
    global _driver
    _driver = code


_DESTROYED = "Task was destroyed but it is pending!"
_UNRETRIEVED = "Task exception was never retrieved"


def site_place(site: Site | None) -> str | None:
    if not site:
        return None
    code, offset = site[0], site[1]
    return _places.place(code, line_at(code, offset))


def site_stack(site: Site | None) -> tuple[str, ...]:
    site = site or ()
    return tuple(
        _places.place(site[i], line_at(site[i], site[i + 1])) for i in range(0, len(site), 2)
    )


def line_at(code: CodeType, offset: int) -> int | None:
    """The source line of the instruction at byte ``offset`` (what a frame's f_lineno would be)."""
    for start, end, line in code.co_lines():
        if start <= offset < end:
            return line
    return code.co_firstlineno


def _new_entry(frame: FrameType | None, depth: int, label: str | None) -> Entry:
    # The hot path of task creation; see the module docstring for what it costs.
    first = frame
    while frame is not None:
        code = frame.f_code
        machinery = _machinery.get(code.co_filename)
        if machinery is None:
            machinery = _is_machinery(code.co_filename)
        if not machinery:
            break
        if code is _HANDLE_RUN or code is _driver:
            # Reached the loop running a callback: the task was made by the loop's own code (a
            # server's connection handler, say), and that code is where it was created.
            frame = first
            while frame is not None and (
                frame.f_code.co_filename.startswith(_OWN_DIR) or frame.f_code in _API_CODES
            ):
                frame = frame.f_back
            break
        frame = frame.f_back
    if frame is None:
        return (monotonic(), label)
    if depth <= 1:
        return (monotonic(), label, frame.f_code, frame.f_lasti)
    entry: list[Any] = [monotonic(), label]
    while frame is not None and len(entry) < 2 * depth + 2:
        entry += (frame.f_code, frame.f_lasti)
        frame = frame.f_back
    return tuple(entry)


class TaskStats:
    """Counts for one loop; written by its thread only, so they stay exact without a lock."""

    __slots__ = ("cancelled", "created", "error", "leaked", "ok", "orphaned", "unretrieved")

    def __init__(self) -> None:
        self.created = self.ok = self.error = self.cancelled = 0
        self.leaked = self.orphaned = self.unretrieved = 0

    def add(self, other: TaskStats) -> None:
        for name in self.__slots__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


class TaskTracker:
    """The task bookkeeping of one watched loop."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        emit: Callable[[Event], None],
        *,
        creation_stack: int = 1,
    ) -> None:
        self.emit = emit
        self.depth = max(creation_stack, 1)
        self.inner: Any = loop.get_task_factory()
        # id(task) -> Entry, for the tasks alive and not done.
        self.live: dict[int, Entry] = {}
        # ids of live tasks already reported as leaked: a task is one finding, however many
        # ends (a test, a scope, the loop) it outlives. Emptied as those tasks end.
        self.reported: set[int] = set()
        self.exception_messages = True  # set by LoopState.configure
        self.stats = TaskStats()
        self.on_done = self._on_done  # one bound method for every task, not one per task
        # Step timing: on unless switched off; the threshold and the watchdog's hook are set by
        # attach, in one object every proxy of this loop shares.
        self.timing = True
        self.step_watch = StepWatch()
        self.factory = self._make_factory()

    def _make_factory(self) -> Callable[..., asyncio.Task[Any]]:
        tracker = self
        live = self.live
        stats = self.stats
        on_done = self.on_done

        def task_factory(
            loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any
        ) -> asyncio.Task[Any]:
            inner = tracker.inner
            if type(coro) is CoroutineType:
                code = coro.cr_code
                if _machinery.get(code.co_filename) is False:
                    label: str | None = code.co_qualname
                else:
                    label = _INTERNAL  # decided once the creation site is known
                if tracker.timing:
                    coro = Timed(coro, tracker.step_watch)
            else:
                label = _INTERNAL
            if inner is None:
                task: asyncio.Task[Any] = _Task(coro, loop=loop, **kwargs)
            else:
                task = inner(loop, coro, **kwargs)
            entry = _new_entry(_getframe(1), tracker.depth, label)
            if label is _INTERNAL:
                label = _label(coro, entry)
                entry = (entry[0], label, *entry[2:])
            stats.created += 1
            if task.done():
                # Finished eagerly, inside create_task: the task has already let go of its
                # coroutine, so it is accounted for here, with the coroutine in hand.
                tracker.finished(task, entry, coro)
            else:
                live[id(task)] = entry
                task.add_done_callback(on_done, context=_NO_CONTEXT)
            return task

        task_factory.__loopwatch__ = True  # type: ignore[attr-defined]
        return task_factory

    def _on_done(self, task: asyncio.Task[Any]) -> None:
        entry = self.live.pop(id(task), None)
        if self.reported:
            self.reported.discard(id(task))
        if entry is not None:
            self.finished(task, entry, task.get_coro())

    def finished(self, task: asyncio.Task[Any], entry: Entry, coro: Any) -> None:
        """Count a task that ended, and time it under its coroutine's name."""
        wall = monotonic() - entry[0]
        stats = self.stats
        timed = coro if type(coro) is Timed else None
        if task._state == "CANCELLED":
            stats.cancelled += 1
            outcome = "cancelled"
        elif task._exception is not None:
            stats.error += 1
            outcome = "error"
            # Kept on the task itself, so it lives exactly as long as the exception may still be
            # reported as never retrieved, and no table has to be cleaned up after it.
            # (A task class without a __dict__ gets no creation site then.)
            with contextlib.suppress(AttributeError):
                setattr(task, _ORIGIN_ATTR, entry[2:])
        else:
            stats.ok += 1
            outcome = "ok"
        label = entry[1]
        if label is not None:
            if timed is None:
                TABLE.ended((label, wall, outcome))
            else:
                TABLE.ended(
                    (
                        label,
                        wall,
                        outcome,
                        timed.busy,
                        timed.steps,
                        timed.slow_steps,
                        timed.max_step,
                    )
                )

    @property
    def active(self) -> int:
        return len(self.live)

    # -- reports -------------------------------------------------------------------------

    def on_exception_context(self, context: dict[str, Any]) -> None:
        """What asyncio hands to ``call_exception_handler``: orphans and lost exceptions."""
        message = context.get("message")
        if message == _DESTROYED:
            task = context.get("task")
            if isinstance(task, asyncio.Task):
                entry = self.live.pop(id(task), None)
                self.reported.discard(id(task))
                self.stats.orphaned += 1
                self.emit(
                    TaskOrphaned(
                        task=task.get_name(),
                        coroutine=coroutine_name(task.get_coro()),
                        created_at=site_place(entry[2:]) if entry else None,
                    )
                )
        elif message == _UNRETRIEVED:
            task = context.get("future")
            exc = context.get("exception")
            if isinstance(task, asyncio.Task) and isinstance(exc, BaseException):
                self.stats.unretrieved += 1
                site = getattr(task, _ORIGIN_ATTR, None)
                self.emit(
                    TaskExceptionUnretrieved(
                        task=task.get_name(),
                        coroutine=coroutine_name(task.get_coro()),
                        created_at=site_place(site),
                        exception=describe_exception(exc)
                        if self.exception_messages
                        else type(exc).__qualname__,
                        raised_at=raised_at(exc.__traceback__),
                    )
                )

    def report_leaks(self, tasks: Iterable[asyncio.Task[Any]], *, since: float = 0.0) -> int:
        """Report each pending task (tracked, and created at or after ``since``) as leaked."""
        now = monotonic()
        count = 0
        for task in tasks:
            if task.done() or id(task) in self.reported:
                continue
            entry = self.live.get(id(task))
            if entry is None and since > 0.0:
                continue
            born = entry[0] if entry else None
            if born is not None and born < since:
                continue
            awaiting, awaits = suspended_at(task)
            if entry is not None:
                self.reported.add(id(task))
            self.stats.leaked += 1
            count += 1
            self.emit(
                TaskLeaked(
                    task=task.get_name(),
                    coroutine=coroutine_name(task.get_coro()),
                    created_at=site_place(entry[2:]) if entry else None,
                    age_s=round(now - born, 6) if born is not None else 0.0,
                    awaiting=awaiting,
                    awaits=awaits,
                    created_stack=site_stack(entry[2:]) if entry and self.depth > 1 else (),
                )
            )
        return count


_INTERNAL = "\x00internal"  # a label placeholder: see _label


def _label(coro: Any, entry: Entry) -> str | None:
    """The timing table's key for a new task whose coroutine is not plainly the program's.

    A wrapper of the loop's own that closes over ``main`` (``uvloop.run``'s) is looked through,
    in its frame before it starts. A coroutine of asyncio's or uvloop's that the program asked for
    itself (``create_task(event.wait())``) is the program's: ``Event.wait``. One the loop made for
    itself (accepting a connection, shutting down) gets no row.
    """
    code = getattr(coro, "cr_code", None)
    if code is None or not _is_machinery(code.co_filename):
        return coroutine_name(coro)
    if code.co_name.startswith(("_", "shutdown_")):
        # asyncio's private helpers (accepting a connection, resolving an address) and what a
        # Runner runs as it closes the loop: the loop's own work, whoever set it going.
        return None
    site = entry[2] if len(entry) > 2 else None
    if site is None or _is_machinery(site.co_filename):
        return None
    if "main" in code.co_freevars:
        frame = getattr(coro, "cr_frame", None)
        main = frame.f_locals.get("main") if frame is not None else None
        name = getattr(main, "__qualname__", None)
        if name:
            return str(name)
    return str(getattr(coro, "__qualname__", None) or code.co_qualname)


def describe_exception(exc: BaseException) -> str:
    text = str(exc)
    name = type(exc).__qualname__
    return f"{name}: {text}" if text else name


def raised_at(tb: TracebackType | None) -> str | None:
    """The innermost frame of the traceback that is the program's own, else the innermost."""
    places: list[tuple[CodeType, int | None]] = []
    while tb is not None:
        places.append((tb.tb_frame.f_code, tb.tb_lineno))
        tb = tb.tb_next
    for code, line in reversed(places):
        if _places.is_own_code(code.co_filename):
            return _places.place(code, line)
    return _places.place(*places[-1]) if places else None


def suspended_at(task: asyncio.Task[Any]) -> tuple[str | None, str | None]:
    """Where a pending task is suspended (``path:line in function``) and what it awaits there.

    Follows the chain of awaits from the task's coroutine inward; the place is the innermost frame
    of the program's own code, and what it awaits is the next thing down the chain (``sleep``,
    ``Event.wait``, ``Future``...).
    """
    chain: list[Any] = []
    awaitable: Any = task.get_coro()
    for _ in range(64):
        frame = getattr(awaitable, "cr_frame", None) or getattr(awaitable, "gi_frame", None)
        if frame is None:
            break
        chain.append(awaitable)
        awaitable = getattr(awaitable, "cr_await", None) or getattr(awaitable, "gi_yieldfrom", None)
        if awaitable is None:
            break
    frames: list[FrameType] = [getattr(c, "cr_frame", None) or c.gi_frame for c in chain]
    pick = None
    for i in range(len(frames) - 1, -1, -1):
        if _places.is_own_code(frames[i].f_code.co_filename):
            pick = i
            break
    if pick is None:
        pick = len(frames) - 1
    if pick < 0:
        return None, None
    frame = frames[pick]
    if pick + 1 < len(chain):
        nxt = chain[pick + 1]
        awaits = getattr(nxt, "__qualname__", None) or type(nxt).__qualname__
    elif awaitable is not None:
        awaits = type(awaitable).__qualname__
    else:
        awaits = None
    return _places.frame_place(frame), awaits


# -- process-wide hooks: asyncio.run's final cancellation, and never-awaited coroutines ----------

_hook_lock = threading.Lock()
_hooks_installed = False
_original_cancel_all: Any = None
_original_unawaited: Any = None
_trackers: Callable[[asyncio.AbstractEventLoop], TaskTracker | None] | None = None
_emit: Callable[[Event], None] | None = None
_never_awaited = 0


def never_awaited_count() -> int:
    return _never_awaited


def install_process_hooks(
    tracker_of: Callable[[asyncio.AbstractEventLoop], TaskTracker | None],
    emit: Callable[[Event], None],
) -> None:
    """Wrap ``asyncio.runners._cancel_all_tasks`` and the never-awaited warning. Undone by
    :func:`remove_process_hooks`."""
    global _hooks_installed, _original_cancel_all, _original_unawaited, _trackers, _emit
    with _hook_lock:
        _trackers, _emit = tracker_of, emit
        if _hooks_installed:
            return
        _hooks_installed = True
        _original_cancel_all = getattr(asyncio.runners, "_cancel_all_tasks", None)
        if _original_cancel_all is not None:
            asyncio.runners._cancel_all_tasks = _cancel_all_tasks  # type: ignore[attr-defined]
        _original_unawaited = getattr(warnings, "_warn_unawaited_coroutine", None)
        if _original_unawaited is not None:
            warnings._warn_unawaited_coroutine = _warn_unawaited_coroutine  # type: ignore[attr-defined]


def remove_process_hooks() -> None:
    global _hooks_installed
    with _hook_lock:
        if not _hooks_installed:
            return
        _hooks_installed = False
        if _original_cancel_all is not None and (
            getattr(asyncio.runners, "_cancel_all_tasks", None) is _cancel_all_tasks
        ):
            asyncio.runners._cancel_all_tasks = _original_cancel_all  # type: ignore[attr-defined]
        if _original_unawaited is not None and (
            getattr(warnings, "_warn_unawaited_coroutine", None) is _warn_unawaited_coroutine
        ):
            warnings._warn_unawaited_coroutine = _original_unawaited  # type: ignore[attr-defined]


def _cancel_all_tasks(loop: asyncio.AbstractEventLoop) -> None:
    """asyncio.run / Runner is about to cancel what is left: those tasks leaked."""
    try:
        tracker = _trackers(loop) if _trackers is not None else None
        if tracker is not None:
            tracker.report_leaks(asyncio.all_tasks(loop))
    except Exception as exc:  # noqa: BLE001 - a diagnostic never breaks the program
        report(f"loopwatch: leak check failed ({type(exc).__name__}: {exc})")
    _original_cancel_all(loop)


def _warn_unawaited_coroutine(coro: Any) -> None:
    global _never_awaited
    try:
        _never_awaited += 1
        if _emit is not None:
            _emit(
                CoroutineNeverAwaited(
                    coroutine=coroutine_name(coro),
                    location=_unawaited_location(coro),
                    defined_at=_defined_at(coro),
                )
            )
    except Exception as exc:  # noqa: BLE001
        report(f"loopwatch: never-awaited check failed ({type(exc).__name__}: {exc})")
    if getattr(_original_unawaited, "__module__", None) == "warnings":
        _warn_like_python(coro)
    else:  # someone else's wrapper came first: hand it on as it is
        _original_unawaited(coro)


def _warn_like_python(coro: Any) -> None:
    """The RuntimeWarning CPython's own hook gives, word for word, attributed to the line that
    dropped the coroutine: calling the original from here would attribute it to this file."""
    lines = [f"coroutine '{coro.__qualname__}' was never awaited\n"]
    origin = getattr(coro, "cr_origin", None)
    if origin is not None:
        import linecache
        import traceback

        created = [(f, n, fn, linecache.getline(f, n)) for f, n, fn in reversed(origin)]
        lines.append("Coroutine created at (most recent call last)\n")
        lines += traceback.format_list(created)
    # 1: this function, 2: the hook, 3: the frame that dropped the coroutine.
    warnings.warn("".join(lines).rstrip("\n"), RuntimeWarning, stacklevel=3, source=coro)


def _defined_at(coro: Any) -> str | None:
    code = getattr(coro, "cr_code", None)
    return _places.place(code, code.co_firstlineno) if code is not None else None


def _unawaited_location(coro: Any) -> str | None:
    """Where the coroutine was created, if origin tracking is on (a deeper ``creation_stack``);
    else where it was dropped, which for the usual bug (``fetch()`` with no ``await``) is the
    same line."""
    origin = getattr(coro, "cr_origin", None)
    if origin:
        for filename, lineno, function in origin:
            if not _places.is_machinery(filename):
                return f"{filename}:{lineno} in {function}"
    try:
        frame: FrameType | None = _getframe(2)
    except ValueError:  # called with no Python frame at all (interpreter shutdown)
        return None
    while frame is not None and _places.is_machinery(frame.f_code.co_filename):
        frame = frame.f_back
    return _places.frame_place(frame) if frame is not None else None
