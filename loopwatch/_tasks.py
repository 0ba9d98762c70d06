"""Task lifecycle: where every task was born, and which ones leaked, were orphaned or lost their
exception; and coroutines that were never awaited.

Per task created, the task factory walks one to three frames to the first one outside
asyncio/uvloop/loopwatch (a dict lookup per frame, the file name's hash being cached) and makes a
small object that carries what is kept about the task: the task's proxy
(:class:`~loopwatch._timing.Timed`), or, in pure Python with step timing off, a :class:`TaskMark`
that is the task's done callback. The common case of all this is compiled (``_accel.Factory``,
which walks the interpreter's own frames without making a frame object: about 0.4 us per task in
all); this module is the rest, and the whole of it without the compiled module. The creation site
is kept as ``(code object, instruction offset)``, never a frame (a frame would keep the creator's
locals alive), and turned into ``path:line in function`` only when an event needs it. There is no
table of live tasks: pending tasks are asyncio's own (``asyncio.all_tasks``), and what is kept
about each goes when the task goes. A task without a proxy that ended with an exception carries its
creation site as an attribute until the exception is retrieved or the task destroyed.

Orphans and unretrieved exceptions are what asyncio itself reports, from the task's finalizer, to
``loop.call_exception_handler``: loopwatch hooks that method, turns the report into an event with
the creation site, and hands it on unchanged. Leaks are judged when a loop stops for good (just
before ``asyncio.run`` / ``Runner`` cancel what is left, or at ``loop.close()``) and at the end of
a ``watch()`` scope.

Cancellations: a task's proxy tells the tracker when a ``CancelledError`` is thrown into its
coroutine (where it was suspended, and when) and, for such a task only, when the coroutine ends.
One that ends without ``CancelledError`` while ``task.cancelling()`` is still above 0 swallowed
its cancellation (``cancel_swallowed``: ``asyncio.timeout``, ``TaskGroup`` and the like withdraw
theirs with ``uncancel()``, so they are never reported). One still pending ``cancel_grace`` after
its cancellation arrived is reported by the watchdog's thread, while it hangs
(``cancel_ignored``).
"""

from __future__ import annotations

import asyncio
import asyncio.runners
import bisect
import contextlib
import contextvars
import sys
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Iterable
from types import CodeType, CoroutineType, FrameType, TracebackType
from typing import TYPE_CHECKING, Any

from . import _places
from ._config import report
from ._context import context_of, route_of
from ._events import (
    CancelIgnored,
    CancelSwallowed,
    CoroutineNeverAwaited,
    Event,
    TaskExceptionUnretrieved,
    TaskLeaked,
    TaskOrphaned,
)
from ._native import ACCEL
from ._stats import LATENCY_BUCKETS, Counter
from ._timing import DURATION_BUCKETS, StepWatch, Table, Timed, unwrap
from ._watchdog import (
    await_chain,
    chain_codes,
    chain_frames,
    coroutine_name,
)

monotonic = time.monotonic
_getframe = sys._getframe
_Task = asyncio.Task
_task_get_coro = asyncio.Task.get_coro
_EAGER = getattr(asyncio, "eager_task_factory", None)
_machinery = _places.machinery_cache()
_is_machinery = _places.is_machinery

# (monotonic time of creation, coroutine label, code, instruction offset[, code, offset, ...]) of a
# pending task, as ``TaskTracker.entry_of`` gives it: the label its timing is recorded under
# (None: asyncio's own coroutine, not timed), then the creation site and, with a deeper
# ``creation_stack``, the frames around it.
Entry = tuple[Any, ...]
Site = tuple[Any, ...]  # the (code, offset, code, offset, ...) part of an Entry
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
    if ACCEL is not None:
        ACCEL.set_driver(code)


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


def _site_frame(frame: FrameType | None, boundary: FrameType | None = None) -> FrameType | None:
    """The creation site: the first frame outside asyncio/uvloop/loopwatch, from ``frame`` out.

    Costs a dict lookup per frame (the file name's hash is cached by the string), one to three
    frames for the usual ``asyncio.create_task`` / ``loop.create_task`` / ``TaskGroup``. None when
    the loop's own code made the task (the walk reaches the loop running a callback first): a
    server's connection handler, an async generator's finalizer. ``made_by`` says which. The loop
    running a callback is a frame of asyncio's handle, or, for uvloop (whose loop is compiled),
    ``boundary``: the frame that called ``run_forever``, outside the loop.
    """
    while frame is not None:
        if frame is boundary:
            return None
        code = frame.f_code
        machinery = _machinery.get(code.co_filename)
        if machinery is None:
            machinery = _is_machinery(code.co_filename)
        if not machinery:
            return frame
        if code is _HANDLE_RUN or code is _driver:
            return None
        frame = frame.f_back
    return None


def made_by(frame: FrameType | None, coro: Any, boundary: FrameType | None = None) -> str:
    """What in asyncio or uvloop made a task that has no creation site of the program's."""
    kind = type(coro).__name__
    if kind == "async_generator_athrow":
        return "asyncio: async generator finalizer (aclose of a dropped async generator)"
    while frame is not None and (
        frame.f_code.co_filename.startswith(_OWN_DIR) or frame.f_code in _API_CODES
    ):
        frame = frame.f_back
    if frame is None or frame is boundary or frame.f_code is _HANDLE_RUN or frame.f_code is _driver:
        return "the event loop (a callback scheduled by asyncio or uvloop)"
    code = frame.f_code
    module = _module_of(code.co_filename)
    return f"{module}: {code.co_qualname}"


def _module_of(filename: str) -> str:
    """``asyncio.streams`` for ``.../asyncio/streams.py`` (string work only)."""
    parts = filename.replace("\\", "/").split("/")
    for i in range(len(parts) - 1, -1, -1):
        if parts[i] in ("asyncio", "uvloop", "loopwatch"):
            tail = [p.removesuffix(".py").removesuffix(".pyx") for p in parts[i:]]
            return ".".join(t for t in tail if t != "__init__")
    return filename


def _stack_from(frame: FrameType | None, depth: int) -> Site:
    """``(code, offset, code, offset, ...)`` of ``depth`` frames from ``frame`` outward."""
    stack: list[Any] = []
    while frame is not None and len(stack) < 2 * depth:
        stack += (frame.f_code, frame.f_lasti)
        frame = frame.f_back
    return tuple(stack)


def origin_of(site: Site | None, coro: Any, tb: TracebackType | None = None) -> str:
    """``"program"`` if the program's own code made the task or runs in it, else ``"library"``.

    "Runs in it": the task's coroutine, or any coroutine it awaits now (a library's wrapper that
    runs the program's coroutine, as anyio's task groups do), or a frame of the traceback of the
    exception it ended with."""
    if site and _places.is_program(site[0].co_filename):
        return "program"
    codes = chain_codes(unwrap(coro))
    while tb is not None:
        codes.append(tb.tb_frame.f_code)
        tb = tb.tb_next
    if not codes and not site:
        return "program"  # nothing to tell by: a finding is the program's unless shown otherwise
    if any(_places.is_program(code.co_filename) for code in codes):
        return "program"
    return "library"


def is_runner_task(coro: Any) -> bool:
    """A test runner's own task (see ``_places.is_runner_code``)."""
    code = getattr(unwrap(coro), "cr_code", None)
    return code is not None and _places.is_runner_code(code)


def about_task(task: asyncio.Task[Any], coro: Any, mark: Any) -> dict[str, Any]:
    """The fields every task finding carries: ``task``, ``coroutine``, ``created_at``,
    ``created_by`` and ``origin``, from the task, its coroutine and its mark (or None)."""
    site = mark_site(mark) if mark is not None else None
    return {
        "task": task.get_name(),
        "coroutine": coroutine_name(coro),
        "created_at": site_place(site),
        "created_by": getattr(mark, "_by", None),
        "origin": origin_of(site, coro),
        "route": route_of(task),
        "context": context_of(task),
    }


def mark_site(mark: Any) -> Site:
    """The creation site a task's proxy or mark carries: ``(code, offset[, code, offset...])``."""
    if mark._stack is not None:
        return mark._stack  # type: ignore[no-any-return]
    if mark._code is None:
        return ()
    return (mark._code, mark._lasti)


_COUNTS = ("cancelled", "created", "error", "gone", "leaked", "ok", "orphaned", "unretrieved")


class _PyTaskCounts:
    """The counts as Python attributes (the compiled ``TaskCounts`` keeps them as C numbers, with
    the loop's coroutine rows, so that its proxies can count a task's end themselves)."""

    __slots__ = _COUNTS

    def __init__(self) -> None:
        self.created = self.ok = self.error = self.cancelled = self.gone = 0
        self.leaked = self.orphaned = self.unretrieved = 0


if TYPE_CHECKING:
    _TaskCounts = _PyTaskCounts
else:
    _TaskCounts = _PyTaskCounts if ACCEL is None else ACCEL.TaskCounts


class TaskStats(_TaskCounts):
    """Counts for one loop. The plain ones are written by its thread only (or by C code holding
    the GIL), so they stay exact without a lock; what a finalizer reports, on whatever thread the
    garbage collector ran it, goes to the atomic counters in ``collected``.

    ``gone`` counts the tracked tasks that ended or were destroyed: live = created - gone."""

    __slots__ = ("collected",)

    def __init__(self) -> None:
        super().__init__()
        # gone, orphaned, unretrieved: counted from finalizers (any thread).
        self.collected = (Counter(), Counter(), Counter())

    def total(self, name: str) -> int:
        value = int(getattr(self, name))
        if name in _COLLECTED:
            value += self.collected[_COLLECTED[name]].value
        return value

    def add(self, other: TaskStats) -> None:
        for name in _COUNTS:
            setattr(self, name, getattr(self, name) + other.total(name))

    def reset(self) -> None:
        for name in _COUNTS:
            setattr(self, name, 0)
        self.collected = (Counter(), Counter(), Counter())


_COLLECTED = {"gone": 0, "orphaned": 1, "unretrieved": 2}


class Task(asyncio.Task):  # type: ignore[type-arg]
    """asyncio's ``Task``, for the tasks loopwatch makes itself: ``get_coro()`` returns the
    program's own coroutine, not the step-timing proxy the task drives (``repr(task)`` reads
    ``<Task ...>`` as before). A task made by another factory the program set keeps that
    factory's class, and its ``get_coro()`` returns the proxy."""

    __slots__ = ()

    def get_coro(self) -> Any:
        coro: Any = _task_get_coro(self)
        return coro._coro if type(coro) is Timed else coro


# The class of the tasks the factory makes (see Task): compiled when asyncio's Task is, as it
# then costs a task less (no subtype_dealloc).
_TaskType: type[asyncio.Task[Any]] = Task
if ACCEL is not None:
    if _Task is getattr(asyncio.tasks, "_CTask", None):
        _TaskType = ACCEL.task_type(_Task)
    ACCEL.set_task_type(_TaskType)

_CancelledError = asyncio.CancelledError
_bisect = bisect.bisect_left
_DURATION_BUCKETS = DURATION_BUCKETS
_LATENCY_BUCKETS = LATENCY_BUCKETS
_new_object = object.__new__


class TaskMark:
    """What is kept about a task that has no proxy: it is the task's own done callback.

    Same fields as a :class:`Timed` proxy's bookkeeping (``born``, ``_label``, ``_code``,
    ``_lasti``, ``_stack``, ``_leaked``, ``_owner``): 64 bytes with no table entry, no
    ``id(task)`` key, and nothing held after the task ends. It costs the loop one more callback
    when the task ends (about 1 us on stock asyncio, 0.5 us on uvloop), which a proxy avoids.
    """

    __slots__ = (
        "_by",
        "_code",
        "_ended",
        "_label",
        "_lasti",
        "_leaked",
        "_owner",
        "_stack",
        "born",
    )
    _by: str | None
    _ended: bool
    _code: CodeType | None
    _label: str | None
    _lasti: int
    _leaked: bool
    _owner: TaskTracker
    _stack: Site | None
    born: float

    def __call__(self, task: asyncio.Task[Any]) -> None:
        if not self._ended:
            self._ended = True
            self._owner.mark_done(task, self)


Mark = Any  # a proxy (Timed) or a TaskMark
_current_task = asyncio.current_task


_TG_EXIT = getattr(getattr(asyncio, "TaskGroup", None), "__aexit__", None)
_TG_EXIT_CODE = getattr(_TG_EXIT, "__code__", None)


# The message of a cancellation an anyio cancel scope delivers (anyio 4: "Cancelled via cancel
# scope 7f...", anyio 3: "Cancelled by cancel scope 7f..."). A scope delivers it again at every
# loop iteration until the task leaves the scope, and catches it at the scope's edge: the task
# goes on (or ends) with its cancelling() count above 0, by anyio's design, not a swallow.
_SCOPE_MESSAGES = ("Cancelled via cancel scope ", "Cancelled by cancel scope ")


def _from_cancel_scope(thrown: Any) -> bool:
    args: Any = getattr(thrown, "args", None) or ()
    return bool(args) and isinstance(args[0], str) and args[0].startswith(_SCOPE_MESSAGES)


def _task_group_exiting(chain: list[Any]) -> Any:
    """The TaskGroup whose ``__aexit__`` a cancellation arriving now reaches (its parent task
    waits there for the group's tasks), or None.

    Two things a TaskGroup does there are its design, not a swallowed cancellation: when a task
    of the group fails meanwhile, the group raises its errors instead of the cancellation; and
    when its own cancellation of the parent (``_parent_cancel_requested``: a task of the group
    failed while the parent waited) arrives there, Python 3.11 and 3.12 leave the parent's
    ``cancelling()`` at 1 for good (their ``__aexit__`` calls ``uncancel()`` before that wait, not
    after; 3.13 calls it after, and the count goes back to 0).
    """
    if not chain or _TG_EXIT_CODE is None:
        return None
    innermost = chain[-1]
    if getattr(innermost, "cr_code", None) is not _TG_EXIT_CODE:
        return None
    frame = getattr(innermost, "cr_frame", None)
    return frame.f_locals.get("self") if frame is not None else None


class _Cancel:
    """A cancellation delivered to a task still running: the task (weakly), the line it was
    suspended at when the cancellation arrived, when, whether it was reported ignored, and how
    many of its cancellations were a TaskGroup's own that Python never withdraws (see
    ``_task_group_own``)."""

    __slots__ = ("excused", "in_group_exit", "place", "reported", "scoped", "since", "task")
    excused: int
    in_group_exit: bool
    scoped: bool

    def __init__(
        self,
        task: weakref.ref[asyncio.Task[Any]],
        place: str | None,
        since: float,
        reported: bool,
    ) -> None:
        self.task = task
        self.place = place
        self.since = since
        self.reported = reported


class TaskTracker:
    """The task bookkeeping of one watched loop.

    A task whose coroutine is a plain coroutine gets a :class:`Timed` proxy (unless step timing
    is off), and the proxy carries everything kept about the task: when it was created, its
    label, its creation site. The proxy sees the coroutine end and tells :meth:`proxy_ended`:
    no table entry and no done callback. Any other task (step timing off, or an awaitable that
    is not a coroutine) gets a :class:`TaskMark` as its done callback instead. Pending tasks are
    found through ``asyncio.all_tasks``, and each one's mark through its coroutine or callbacks.

    With the compiled module (``_timing.ACCEL``), ``factory`` is its ``Factory``: it makes the
    task of a plain coroutine from a known file itself, and hands anything else to the Python
    factory below. Its proxies count their task's end in C (``proxy_ended`` is then not called),
    and with step timing off they stay, forwarding steps with no clock read, instead of a mark.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        emit: Callable[[Event], None],
        *,
        creation_stack: int = 1,
        say: Callable[[str], None] = report,
        table: Table | None = None,
    ) -> None:
        self.emit = emit
        self.say = say
        self.broken = False  # loopwatch's own part failed once: tasks are made untracked
        self.exception_messages = True  # set by LoopState.configure
        self.stats = TaskStats()
        # The runtime's per-coroutine table, and this loop's rows in it (see Table).
        self.table = table = table if table is not None else Table()
        self.rows = table.rows_for()
        # Step timing: on unless switched off; the threshold and the watchdog's hook are set by
        # attach, in one object every proxy of this loop shares.
        self.step_watch = StepWatch()
        self._inner: Any = loop.get_task_factory()
        self._timing = True
        self._depth = max(creation_stack, 1)
        self._boundary: FrameType | None = None
        self._compiled: Any = None
        # Cancellations delivered to tasks still running (id of the proxy -> _Cancel): written on
        # the loop's thread when a CancelledError is thrown into a coroutine (rare), read by the
        # watchdog's thread for the ones ignored. ``wake_by(deadline)`` (set by the registry)
        # makes the watchdog look by then.
        self._cancels: dict[int, _Cancel] = {}
        self.cancel_grace = 5.0  # set by LoopState.configure
        self.wake_by: Callable[[float], None] | None = None
        self.factory: Callable[..., asyncio.Task[Any]] = self._make_factory()
        if ACCEL is not None:
            counts: Any = self.stats  # the compiled TaskCounts: its proxies add into these rows
            counts._rows = self.rows
            counts._table = table
            self._compiled = ACCEL.Factory(self, self.stats, self.step_watch, self.factory)
            self._compiled.inner = self._inner
            self._compiled.depth = self._depth
            self.factory = self._compiled

    # What the compiled factory reads is kept on it as well.
    @property
    def inner(self) -> Any:
        """The task factory loopwatch wraps (the loop's own, or the program's)."""
        return self._inner

    @inner.setter
    def inner(self, factory: Any) -> None:
        self._inner = factory
        if self._compiled is not None:
            self._compiled.inner = factory

    @property
    def boundary(self) -> FrameType | None:
        """The frame that called ``run_forever`` while the loop runs (set by the loop's thread at
        the start and end of each run): frames from there out are not the loop's."""
        return self._boundary

    @boundary.setter
    def boundary(self, frame: FrameType | None) -> None:
        self._boundary = frame
        if self._compiled is not None:
            self._compiled.boundary = frame

    @property
    def timing(self) -> bool:
        return self._timing

    @timing.setter
    def timing(self, on: bool) -> None:
        self._timing = bool(on)
        if self._compiled is not None:
            self._compiled.timing = int(self._timing)

    @property
    def depth(self) -> int:
        return self._depth

    @depth.setter
    def depth(self, frames: int) -> None:
        self._depth = max(frames, 1)
        if self._compiled is not None:
            self._compiled.depth = self._depth

    def _make_factory(self) -> Callable[..., asyncio.Task[Any]]:
        tracker = self
        stats = self.stats
        # Done callbacks normally copy the current context, an allocation per task; loopwatch's
        # callback reads nothing from any context, so one empty context serves every task of
        # this loop. One per loop, never one for the process: a context can be entered by one
        # thread at a time, and loops on several threads run their callbacks at once.
        no_context = contextvars.Context()
        watch = self.step_watch
        compiled = ACCEL is not None

        def prepare(coro: Any, caller: FrameType | None) -> tuple[Mark, Any]:
            """The mark of a task of ``coro`` made from ``caller``'s frame, and what the task
            runs: ``coro``, or the proxy that is its mark. Raises on loopwatch's own failure."""
            plain = type(coro) is CoroutineType
            code = coro.cr_code if plain else None
            run = coro
            mark: Mark
            if plain and compiled:
                mark = run = proxy = Timed(coro, watch, tracker)
                proxy._sink = stats
                proxy._timing = tracker._timing
            elif plain and tracker._timing and not _origin_depth():
                # (With coroutine origin tracking on, a Python proxy would show its own frame in
                # every cr_origin made during a step: the task goes untimed.)
                mark = run = proxy = _new_object(Timed)  # Timed.__init__, inlined
                proxy._coro = coro
                proxy._cfg = watch
                proxy._watch = 0.0
                proxy.busy = proxy.max_step = 0.0
                proxy.steps = proxy.slow_steps = 0
            else:
                mark = _new_object(TaskMark)
            mark._leaked = False
            mark._ended = False
            mark._owner = tracker
            mark._by = None
            frame = _site_frame(caller, tracker.boundary)
            if frame is None:
                mark._code = mark._stack = None
                mark._lasti = 0
                mark._by = made_by(caller, coro, tracker.boundary)
            else:
                mark._code = frame.f_code
                mark._lasti = frame.f_lasti
                depth = tracker._depth
                mark._stack = _stack_from(frame, depth) if depth > 1 else None
            del caller, frame
            if code is not None and _machinery.get(code.co_filename) is False:
                mark._label = code.co_qualname
            else:
                mark._label = _label(coro, mark._code)
            mark.born = monotonic()
            return mark, run

        def task_factory(
            loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any
        ) -> asyncio.Task[Any]:
            # The hot path of task creation: see benchmarks/ for what it costs. Everything
            # loopwatch does here is inside the try: a failure of its own (never the program's)
            # turns task tracking off for this loop, said once, and the task is made as if
            # loopwatch were not there.
            inner = tracker._inner
            if tracker.broken:
                return _make_task(inner, loop, coro, kwargs)
            if type(coro) is not CoroutineType and type(coro) is Timed and _adopted(coro):
                # This factory's proxy already, made by a framework hook (adopt) for a task it
                # expected no factory to see: the task runs it as it is.
                return _make_task(inner, loop, coro, kwargs)
            try:
                try:
                    caller = _getframe(1)
                except ValueError:  # called with no Python frame below (from C code alone)
                    caller = None
                mark, run = prepare(coro, caller)
                del caller
            except Exception as exc:  # noqa: BLE001 - never the program's: see above
                tracker.fail(exc)
                return _make_task(inner, loop, coro, kwargs)
            stats.created += 1
            try:
                task = _make_task(inner, loop, run, kwargs)
            except BaseException:
                if type(mark) is not Timed or mark.steps == 0:  # no task came of it
                    stats.created -= 1
                    mark._ended = True
                raise
            if type(mark) is TaskMark:
                if task.done():
                    mark(task)  # finished eagerly, inside create_task
                else:
                    task.add_done_callback(mark, context=no_context)
            return task

        def _adopted(proxy: Any) -> bool:
            return proxy._owner is tracker and proxy.steps == 0 and not proxy._ended

        def adopt(coro: Any) -> Any:
            """What the task of ``coro``, about to be made where no task factory sees it, should
            run: the proxy this factory would make for it (a framework hook's way in: aiohttp's
            request tasks from Python 3.12), or ``coro`` as it is where it would make none (a
            mark needs the task itself)."""
            if (
                tracker.broken
                or type(coro) is not CoroutineType
                or not (compiled or (tracker._timing and not _origin_depth()))
            ):
                return coro
            try:
                try:
                    caller = _getframe(1)
                except ValueError:
                    caller = None
                _mark, run = prepare(coro, caller)
                del caller
            except Exception as exc:  # noqa: BLE001 - never the program's
                tracker.fail(exc)
                return coro
            stats.created += 1
            return run

        self.adopt = adopt
        task_factory.adopt = adopt  # type: ignore[attr-defined]
        task_factory.__loopwatch__ = True  # type: ignore[attr-defined]
        return task_factory

    def fail(self, exc: BaseException) -> None:
        """loopwatch's own part of making a task failed: tasks of this loop are made untracked."""
        self.broken = True
        if self._compiled is not None:
            self._compiled.depth = 1 << 20  # the compiled path steps aside for every task
        self.say(
            f"loopwatch: following tasks failed ({type(exc).__name__}: {exc}); task tracking is "
            "off for this loop"
        )

    def proxy_abandoned(self, proxy: Any) -> None:
        """A task's coroutine was closed midway (pure-Python proxy): its task is gone."""
        self.stats.collected[0].add()

    def proxy_ended(self, proxy: Timed, exc: BaseException) -> None:
        """A task's coroutine ended, as its proxy saw it: count it and time it.

        Once per task: ``Row.add`` inlined (a Python call less), about 0.4 us in all."""
        if self._cancels and id(proxy) in self._cancels:
            self.cancel_ended(proxy, exc)
        wall = monotonic() - proxy.born
        stats = self.stats
        stats.gone += 1
        label = proxy._label
        if label is None:
            row = None
        else:
            row = self.rows.get(label)
            if row is None:
                row = self.table.row(self.rows, label)
            row.count += 1
        kind = type(exc)
        if kind is StopIteration:
            stats.ok += 1
        elif issubclass(kind, _CancelledError):
            # The task becomes cancelled. (A task cancelled just as its coroutine returned is
            # cancelled too, but counted ok here: the proxy cannot see that.)
            stats.cancelled += 1
            if row is not None:
                row.cancelled += 1
        else:
            stats.error += 1
            if row is not None:
                row.errors += 1
        if row is None:
            return
        row.wall += wall
        if wall > row.max_wall:
            row.max_wall = wall
        row.wall_counts[_bisect(_DURATION_BUCKETS, wall)] += 1
        busy = proxy.busy
        row.timed += 1
        row.busy += busy
        row.busy_counts[_bisect(_LATENCY_BUCKETS, busy)] += 1
        row.steps += proxy.steps
        if proxy.slow_steps:
            row.slow_steps += proxy.slow_steps
        if proxy.max_step > row.max_step:
            row.max_step = proxy.max_step

    def mark_done(self, task: asyncio.Task[Any], mark: TaskMark) -> None:
        """A task without a proxy ended (its mark is its done callback): count it and time it."""
        wall = monotonic() - mark.born
        stats = self.stats
        stats.gone += 1
        if task._state == "CANCELLED":
            stats.cancelled += 1
            outcome = "cancelled"
        elif task._exception is not None:
            stats.error += 1
            outcome = "error"
            # Kept on the task itself, so it lives exactly as long as the exception may still be
            # reported as never retrieved. (A task class without a __dict__ gets no site then.)
            with contextlib.suppress(AttributeError):
                setattr(task, _ORIGIN_ATTR, mark_site(mark))
        else:
            stats.ok += 1
            outcome = "ok"
            if task.cancelling():  # no proxy saw its cancellation arrive: no place for it
                self._swallowed(task, task.get_coro(), mark, None, None)
        label = mark._label
        if label is not None:
            row = self.rows.get(label)
            if row is None:
                row = self.table.row(self.rows, label)
            row.add(wall, outcome, None)

    # -- cancellations: swallowed, ignored -------------------------------------------------------
    #
    # A proxy tells its tracker when a CancelledError is thrown into its coroutine (the task's
    # cancellation arriving: ``cancel_arrived``) and, for such a proxy only, when the coroutine
    # ends (``cancel_ended``). Nothing is added to any other task's path.

    def cancel_arrived(self, proxy: Timed, thrown: Any = None) -> None:
        """A CancelledError (``thrown``: the instance or class) is about to be thrown into the
        coroutine of ``proxy``, by its task."""
        try:
            task = _current_task()
            if task is None:
                return
            now = monotonic()
            chain, _ = await_chain(proxy._coro)
            awaiting, _, _ = suspended_chain(proxy._coro)
            key = id(proxy)
            previous = self._cancels.get(key)
            if previous is not None and previous.task() is not task:
                previous = None  # (a record of a proxy gone, whose id this one reuses)
            record = self._cancels[key] = _Cancel(
                weakref.ref(task),
                awaiting,
                now,
                previous is not None and previous.reported,
            )
            record.excused = previous.excused if previous is not None else 0
            record.in_group_exit = previous is not None and previous.in_group_exit
            record.scoped = (previous is not None and previous.scoped) or _from_cancel_scope(thrown)
            group = _task_group_exiting(chain)
            if group is not None:
                record.in_group_exit = True
                if getattr(group, "_parent_cancel_requested", False):
                    record.excused += 1
            wake_by = self.wake_by
            if wake_by is not None:
                wake_by(now + self.cancel_grace)
        except Exception as exc:  # noqa: BLE001 - never the program's
            self.say(f"loopwatch: reading a cancellation failed ({type(exc).__name__}: {exc})")

    def cancel_ended(self, proxy: Timed, exc: BaseException | None) -> None:
        """The coroutine of a proxy that had a cancellation thrown in ended (``exc`` None, or a
        ``StopIteration``, for a return)."""
        try:
            record = self._cancels.pop(id(proxy), None)
            if exc is not None and isinstance(exc, _CancelledError):
                return
            task = _current_task()
            if task is None:
                return
            if record is not None and record.task() is not task:
                record = None  # (a record of a proxy gone, whose id this one reuses)
            if task.cancelling() <= (record.excused if record is not None else 0):
                return  # withdrawn (uncancel(): asyncio.timeout, TaskGroup)
            if record is not None and record.scoped:
                return  # anyio's cancel scopes end a task's cancellation their own way
            if record is not None and record.in_group_exit and isinstance(exc, BaseExceptionGroup):
                return  # a TaskGroup's errors take the place of the cancellation, by design
            ended = "returned" if exc is None or type(exc) is StopIteration else None
            if ended is not None and getattr(task, "_must_cancel", False):
                # Cancelled again before this last step: the task ends CANCELLED all the same
                # (Task.__step cancels a task whose coroutine returns while a cancellation is
                # due). Python 3.13's TaskGroup does so when its errors took the place of an
                # outside cancellation, so that the cancellation is not lost.
                return
            self._swallowed(
                task, proxy._coro, proxy, record.place if record else None, ended or exc
            )
        except Exception as error:  # noqa: BLE001 - never the program's
            self.say(f"loopwatch: reading a cancellation failed ({type(error).__name__}: {error})")

    def _swallowed(
        self,
        task: asyncio.Task[Any],
        coro: Any,
        mark: Mark | None,
        location: str | None,
        ended: str | BaseException | None,
    ) -> None:
        if ended is None:
            ended = "returned"
        elif not isinstance(ended, str):
            ended = describe_exception(ended) if self.exception_messages else type(ended).__name__
        self.emit(CancelSwallowed(location=location, ended=ended, **about_task(task, coro, mark)))

    def overdue_cancels(self, now: float, keep: Any) -> float:
        """From the watchdog's thread: report each task still pending ``cancel_grace`` after its
        cancellation arrived (once per task); return when to look again. Every object of the
        program's touched goes into ``keep`` (the pulse's box), let go of on the loop's thread."""
        due_next = float("inf")
        if not self._cancels:
            return due_next
        grace = self.cancel_grace
        for key, record in list(self._cancels.items()):
            task = record.task()
            if task is None or task.done():
                # Gone, or ended unseen. (Only these are dropped here: the loop's thread reads
                # a live task's record when it ends.)
                if self._cancels.get(key) is record:
                    self._cancels.pop(key, None)
                if task is not None:
                    keep.append(task)
                continue
            keep.append(task)
            if task.cancelling() <= record.excused or record.scoped:
                continue  # the cancellation was withdrawn (uncancel()), or is anyio's to end
            if record.reported:
                continue
            due = record.since + grace
            if now < due:
                due_next = min(due_next, due)
                continue
            record.reported = True
            coro = task.get_coro()
            keep.append(coro)
            awaiting, _, chain = suspended_chain(coro, keep)
            self.emit(
                CancelIgnored(
                    awaiting=awaiting,
                    await_chain=chain,
                    since_cancel_s=round(now - record.since, 3),
                    cancelled_at=record.place,
                    **about_task(task, coro, self.mark_of(task)),
                )
            )
        return due_next

    def mark_of(self, task: asyncio.Task[Any]) -> Mark | None:
        """What this tracker keeps about ``task`` (its proxy or its mark), while it is pending."""
        coro: Any = getattr(task, "_coro", None)  # the proxy (get_coro() sees through it)
        if type(coro) is Timed:
            return coro if coro._owner is self else None
        for callback, _context in getattr(task, "_callbacks", None) or ():
            if type(callback) is TaskMark and callback._owner is self:
                return callback
        return None

    def entry_of(self, task: asyncio.Task[Any]) -> Entry | None:
        """``(created, label, *site)`` of a pending task this tracker follows."""
        mark = self.mark_of(task)
        return None if mark is None else (mark.born, mark._label, *mark_site(mark))

    @property
    def active(self) -> int:
        """Tasks created here and neither ended nor destroyed."""
        return self.stats.created - self.stats.total("gone")

    # -- reports -------------------------------------------------------------------------

    def on_exception_context(self, context: dict[str, Any]) -> None:
        """What asyncio hands to ``call_exception_handler``: orphans and lost exceptions.

        Called from the task's finalizer, on whatever thread the garbage collector ran it:
        counts go to atomic counters, and the event is only queued (see ``_dispatch``)."""
        message = context.get("message")
        if message == _DESTROYED:
            task = context.get("task")
            if isinstance(task, asyncio.Task):
                mark = self.mark_of(task)
                if mark is not None and not mark._ended:
                    mark._ended = True
                    self.stats.collected[0].add()
                self.stats.collected[1].add()
                orphan_site = mark_site(mark) if mark is not None else None
                coro = task.get_coro()
                self.emit(
                    TaskOrphaned(
                        task=task.get_name(),
                        coroutine=coroutine_name(coro),
                        created_at=site_place(orphan_site),
                        created_by=mark._by if mark is not None else None,
                        origin=origin_of(orphan_site, coro),
                        route=route_of(task),
                        context=context_of(task),
                    )
                )
        elif message == _UNRETRIEVED:
            task = context.get("future")
            exc = context.get("exception")
            if isinstance(task, asyncio.Task) and isinstance(exc, BaseException):
                self.stats.collected[2].add()
                proxy: Any = getattr(task, "_coro", None)
                by = None
                if type(proxy) is Timed and getattr(proxy, "born", None) is not None:
                    # A proxy of this loop's factory (its owner may be gone: it ended).
                    site: Site | None = mark_site(proxy)
                    by = proxy._by
                else:
                    site = getattr(task, _ORIGIN_ATTR, None)
                coro = task.get_coro()
                self.emit(
                    TaskExceptionUnretrieved(
                        task=task.get_name(),
                        coroutine=coroutine_name(coro),
                        created_at=site_place(site),
                        exception=describe_exception(exc)
                        if self.exception_messages
                        else type(exc).__qualname__,
                        raised_at=raised_at(exc.__traceback__),
                        created_by=by,
                        origin=origin_of(site, coro, exc.__traceback__),
                        route=route_of(task),
                        context=context_of(task),
                    )
                )

    def report_leaks(self, tasks: Iterable[asyncio.Task[Any]], *, since: float = 0.0) -> int:
        """Report each pending task (tracked, and created at or after ``since``) as leaked."""
        now = monotonic()
        count = 0
        for task in tasks:
            if task.done():
                continue
            mark = self.mark_of(task)
            if mark is None:
                if since > 0.0:
                    continue
            elif mark._leaked or mark.born < since:
                continue
            coro = task.get_coro()
            if is_runner_task(coro):
                continue  # a test runner's own task, cancelled by design when it closes
            awaiting, awaits, chain = suspended_chain(coro)
            site = mark_site(mark) if mark is not None else None
            if mark is not None:
                mark._leaked = True
            self.stats.leaked += 1
            count += 1
            self.emit(
                TaskLeaked(
                    task=task.get_name(),
                    coroutine=coroutine_name(coro),
                    created_at=site_place(site),
                    age_s=round(now - mark.born, 6) if mark is not None else 0.0,
                    awaiting=awaiting,
                    awaits=awaits,
                    created_stack=site_stack(site) if site and self.depth > 1 else (),
                    created_by=mark._by if mark is not None else None,
                    await_chain=chain,
                    origin=origin_of(site, coro),
                    route=route_of(task),
                    context=context_of(task),
                )
            )
        return count


def _make_task(
    inner: Any, loop: asyncio.AbstractEventLoop, coro: Any, kwargs: dict[str, Any]
) -> asyncio.Task[Any]:
    """The task, as the factory loopwatch wraps (or asyncio's ``Task``) makes it."""
    if inner is None:
        return _TaskType(coro, loop=loop, **kwargs)
    if inner is _EAGER and _TaskType is not _Task:
        return _TaskType(coro, loop=loop, eager_start=True, **kwargs)  # type: ignore[call-arg]
    return inner(loop, coro, **kwargs)  # type: ignore[no-any-return]


def _origin_depth() -> int:
    return sys.get_coroutine_origin_tracking_depth()


def _label(coro: Any, site: CodeType | None) -> str | None:
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


def pending_tasks(loop: asyncio.AbstractEventLoop) -> list[asyncio.Task[Any]]:
    """The loop's pending tasks, as ``asyncio.all_tasks(loop)`` finds them, in a tenth of its
    time on 3.11 to 3.13 (it iterates a ``WeakSet`` in Python, 7 us a task): here the weak set's
    own set of references is copied in one C call (atomic under the GIL, so no retry) and each
    reference called. Elsewhere, asyncio's own function."""
    module = asyncio.tasks
    weak = getattr(module, "_scheduled_tasks", None) or getattr(module, "_all_tasks", None)
    refs = getattr(weak, "data", None)
    if sys.version_info >= (3, 14) or not isinstance(refs, set):
        return [t for t in asyncio.all_tasks(loop) if not t.done()]
    eager = list(getattr(module, "_eager_tasks", ()))
    found = [ref() for ref in list(refs)]
    seen: set[int] = set()
    tasks: list[asyncio.Task[Any]] = []
    for task in (*found, *eager):
        if task is not None and id(task) not in seen and task.get_loop() is loop:
            seen.add(id(task))
            if not task.done():
                tasks.append(task)
    return tasks


def suspended_at(task: asyncio.Task[Any]) -> tuple[str | None, str | None]:
    """Where a pending task is suspended (``path:line in function``) and what it awaits there."""
    awaiting, awaits, _ = suspended_chain(task.get_coro())
    return awaiting, awaits


def suspended_chain(coro: Any, keep: Any = None) -> tuple[str | None, str | None, tuple[str, ...]]:
    """Where a suspended coroutine waits, what it awaits there, and the chain of places to it.

    Follows the chain of awaits from the coroutine inward; the place is the innermost frame of
    the program's own code, and what it awaits is the next thing down the chain (``sleep``,
    ``Event.wait``, ``Future``...). The chain is the place of each coroutine from the outermost
    to that one. From another thread than the loop's, ``keep`` (the pulse's box) takes every
    object of the program's touched here, to be let go of on the loop's thread.
    """
    chain, awaitable = await_chain(coro)
    frames = chain_frames(chain)
    if keep is not None:
        keep.append((chain, awaitable, frames))
    pick = None
    for i in range(len(frames) - 1, -1, -1):
        if _places.is_own_code(frames[i].f_code.co_filename):
            pick = i
            break
    if pick is None:
        pick = len(frames) - 1
    if pick < 0:
        return None, None, ()
    if pick + 1 < len(chain):
        nxt = chain[pick + 1]
        awaits = getattr(nxt, "__qualname__", None) or type(nxt).__qualname__
    elif awaitable is not None:
        awaits = type(awaitable).__qualname__
    else:
        awaits = None
    places = tuple(_places.frame_place(f) for f in frames[: pick + 1])
    return places[-1], awaits, places


# -- process-wide hooks: asyncio.run's final cancellation, and never-awaited coroutines ----------


class ProcessHooks:
    """The two process-wide functions loopwatch wraps while it watches loops:
    ``asyncio.runners._cancel_all_tasks`` (what ``asyncio.run`` and ``Runner`` cancel as they
    close were leaked) and ``warnings._warn_unawaited_coroutine`` (a coroutine never awaited).

    Owned by the loop registry (``_loops.Loops``); :meth:`remove` puts back exactly what was
    there, unless someone else has wrapped it since (theirs then stays).
    """

    def __init__(
        self,
        tracker_of: Callable[[asyncio.AbstractEventLoop], TaskTracker | None],
        emit: Callable[[Event], None],
        say: Callable[[str], None] = report,
    ) -> None:
        self._tracker_of = tracker_of
        self._emit = emit
        self._say = say
        self._lock = threading.Lock()
        self._installed = False
        self._original_cancel_all: Any = None
        self._original_unawaited: Any = None
        # Bound once: what is installed is compared by identity when it is taken out.
        self._cancel_all = self._cancel_all_tasks
        self._unawaited = self._warn_unawaited_coroutine
        self.never_awaited = Counter()  # from finalizers, on any thread

    def install(self) -> None:
        with self._lock:
            if self._installed:
                return
            self._installed = True
            self._original_cancel_all = getattr(asyncio.runners, "_cancel_all_tasks", None)
            if self._original_cancel_all is not None:
                asyncio.runners._cancel_all_tasks = self._cancel_all  # type: ignore[attr-defined]
            self._original_unawaited = getattr(warnings, "_warn_unawaited_coroutine", None)
            if self._original_unawaited is not None:
                warnings._warn_unawaited_coroutine = self._unawaited  # type: ignore[attr-defined]

    def remove(self) -> None:
        with self._lock:
            if not self._installed:
                return
            self._installed = False
            if self._original_cancel_all is not None and (
                getattr(asyncio.runners, "_cancel_all_tasks", None) is self._cancel_all
            ):
                asyncio.runners._cancel_all_tasks = self._original_cancel_all  # type: ignore[attr-defined]
            if self._original_unawaited is not None and (
                getattr(warnings, "_warn_unawaited_coroutine", None) is self._unawaited
            ):
                warnings._warn_unawaited_coroutine = self._original_unawaited  # type: ignore[attr-defined]

    def _cancel_all_tasks(self, loop: asyncio.AbstractEventLoop) -> None:
        """asyncio.run / Runner is about to cancel what is left: those tasks leaked."""
        try:
            tracker = self._tracker_of(loop)
            if tracker is not None:
                tracker.report_leaks(asyncio.all_tasks(loop))
        except Exception as exc:  # noqa: BLE001 - a diagnostic never breaks the program
            self._say(f"loopwatch: leak check failed ({type(exc).__name__}: {exc})")
        try:
            self._original_cancel_all(loop)
        except BaseException as exc:
            # The program's own (a second Ctrl-C, say): it goes on without this frame.
            tb = exc.__traceback__
            if tb is not None and tb.tb_frame.f_code is _CANCEL_ALL_CODE:
                exc.__traceback__ = tb.tb_next
            raise

    def _warn_unawaited_coroutine(self, coro: Any) -> None:
        try:
            self.never_awaited.add()
            self._emit(
                CoroutineNeverAwaited(
                    coroutine=coroutine_name(coro),
                    location=_unawaited_location(coro),
                    defined_at=_defined_at(coro),
                    origin=origin_of(None, coro),
                )
            )
        except Exception as exc:  # noqa: BLE001
            self._say(f"loopwatch: never-awaited check failed ({type(exc).__name__}: {exc})")
        original = self._original_unawaited
        if getattr(original, "__module__", None) == "warnings":
            _warn_like_python(coro)
        else:  # someone else's wrapper came first: hand it on as it is
            original(coro)


_CANCEL_ALL_CODE = ProcessHooks._cancel_all_tasks.__code__


def _warn_like_python(coro: Any) -> None:
    """The RuntimeWarning CPython's own hook gives, word for word, attributed to the line that
    dropped the coroutine: calling the original from here would attribute it to this file."""
    lines = [f"coroutine '{coro.__qualname__}' was never awaited\n"]
    origin = getattr(coro, "cr_origin", None)
    if origin is not None:
        # (deferred: start-up cost; only when a never-awaited coroutine had its origin tracked)
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
