"""Attaching to loops: the registry of watched loops (:class:`Loops`), the class hooks, global mode.

One :class:`Loops` belongs to the runtime (``_runtime.Runtime.loops``) and holds everything about
the loops being watched: their states (weak keys), the totals of loops no longer watched, the
class hooks and global mode's patches, with the undo of each. It is given the runtime's
dispatcher, watchdog and timing table; it imports no layer above the detectors.

Nothing of loopwatch's is put on a loop object. A watched loop is recognised by the registry's
own table (weak keys), and the few loop methods loopwatch needs to hear of are hooked once
on the loop *classes*, asyncio's ``BaseEventLoop`` and uvloop's ``Loop``, where each hook hands an
unwatched loop straight on:

- ``run_forever``: marks the start and end of each run for the watchdog (``run_until_complete``,
  on asyncio and uvloop alike, calls ``self.run_forever()``, so every run passes through it);
- ``close``: tasks still pending when the loop is closed leaked;
- ``set_task_factory`` / ``get_task_factory``: a factory the program sets later is wrapped, not
  lost, and the program still reads back its own;
- ``call_exception_handler``: asyncio reports orphaned tasks and lost exceptions through it;
- ``create_task``, on Pythons whose ``create_task`` calls ``task.set_name(None)`` after a task
  factory (3.13.0): that would rename every unnamed task 'None' just because loopwatch brought a
  factory, so unnamed tasks are made by loopwatch's factory directly there.

Instance attributes would cost more than they look: uvloop's loops pay for every attribute lookup
once an instance dictionary exists (about 10% on a chain of ``call_soon`` callbacks, measured), and
asyncio's pure-Python loop stops sharing its instance dictionary's keys past 30 attributes. The
watchdog's pulse goes on the loop's *selector* (see ``_pulse``), uvloop's in its timer heap.

Global mode ("every loop from now on": ``LOOPWATCH=1``, or ``install()`` outside a loop) wraps
``__init__`` of ``BaseEventLoop`` and of ``uvloop.Loop``, so a loop however made is attached when
it is built. Each hook and wrap is undone by :meth:`Loops.close` (``uninstall()``). A hook's own
frame never shows in the program's tracebacks.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
import weakref
from asyncio.base_events import BaseEventLoop
from collections.abc import Callable
from typing import Any

from . import _import_hooks, _tasks, _threads
from ._config import Settings, report
from ._dispatch import Dispatcher
from ._hangs import Hangs
from ._native import ACCEL
from ._stats import Histogram
from ._tasks import ProcessHooks, TaskStats, TaskTracker
from ._threads import Worker
from ._timing import Table
from ._watchdog import LoopState, Watchdog

_ABSENT = object()
_CREATE_TASK_RENAMES = "set_name" in BaseEventLoop.create_task.__code__.co_names
_HOOKS = ("run_forever", "close", "set_task_factory", "get_task_factory", "call_exception_handler")
_HOOK_CODES: set[Any] = set()  # the hooks' code objects: stripped from tracebacks


class Loops:
    """The watched loops of one runtime, and every hook that attaching to them put in place."""

    def __init__(
        self, settings: Settings, dispatcher: Dispatcher, watchdog: Watchdog, table: Table
    ) -> None:
        self.settings = settings  # for loops attached with no settings of their own
        self.dispatcher = dispatcher
        self.watchdog = watchdog
        self.table = table
        self._lock = threading.RLock()
        self._states: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoopState] = (
            weakref.WeakKeyDictionary()
        )
        # Task counts, lag and busy time of loops no longer watched, so totals never go back.
        self.retired = TaskStats()
        self.retired_lag = Histogram()
        self.retired_busy = 0.0
        self.global_mode = False
        self._uvloop_hooked = False
        # (class, attribute, previous value or _ABSENT): what global mode changed, to undo it.
        self._patches: list[tuple[type, str, Any]] = []
        # class -> {name: the class's own method before the hook}, while hooked
        self._hooked: dict[type, dict[str, Any]] = {}
        self.process_hooks = ProcessHooks(self.tracker_of, dispatcher.emit, dispatcher.say)
        # Other threads of the runtime's that run while loops are watched (the live view by PID):
        # started with the dispatcher's (again in a forked child, by its first loop).
        self.workers: list[Worker] = []

    # -- reading ---------------------------------------------------------------------------------

    def task_totals(self) -> TaskStats:
        """Task counts over every loop watched so far, and the number of live tracked tasks."""
        totals = TaskStats()
        totals.add(self.retired)
        for state in list(self._states.values()):
            if state.tasks is not None:
                totals.add(state.tasks.stats)
        return totals

    def lag_totals(self) -> Histogram:
        """The lag histogram over every loop watched so far."""
        total = Histogram()
        total.merge(self.retired_lag.counts, self.retired_lag.sum)
        for state in list(self._states.values()):
            counts, lag_sum = state.lag_histogram()
            total.merge(counts, lag_sum)
        return total

    def busy_total(self) -> float:
        """Seconds the loops watched so far spent running callbacks (see LoopState.busy_seconds)."""
        return self.retired_busy + sum(s.busy_seconds() for s in list(self._states.values()))

    def state_of(self, loop: asyncio.AbstractEventLoop) -> LoopState | None:
        return self._states.get(loop)

    def watched_loops(self) -> list[asyncio.AbstractEventLoop]:
        return list(self._states.keys())

    def tracker_of(self, loop: asyncio.AbstractEventLoop) -> TaskTracker | None:
        state = self._states.get(loop)
        return state.tasks if state is not None else None

    def active_tasks(self) -> int:
        """Tasks alive and not done, over every watched loop."""
        return sum(s.tasks.active for s in list(self._states.values()) if s.tasks is not None)

    # -- attaching -------------------------------------------------------------------------------

    def attach(
        self, loop: asyncio.AbstractEventLoop, settings: Settings | None = None
    ) -> LoopState:
        """Watch ``loop`` (idempotent). A running loop is watched from now on."""
        if _import_hooks._deferred:
            _import_hooks.flush_deferred()  # a hook put off until its module was whole
        settings = settings or self.settings
        dispatcher = self.dispatcher
        with self._lock:
            state = self._states.get(loop)
            if state is not None and state.active:
                state.configure(settings)
                return state
            state = LoopState(
                loop,
                settings,
                emit=dispatcher.emit,
                wake=self.watchdog.wake,
                settle=dispatcher.settle,
            )
            if settings.tasks:
                state.tasks = TaskTracker(
                    loop,
                    dispatcher.emit,
                    creation_stack=settings.creation_stack,
                    say=dispatcher.say,
                    table=self.table,
                )
                state.tasks.wake_by = self.watchdog.wake_by
                state.hangs = Hangs(dispatcher.emit)
                state.wake_by = self.watchdog.wake_by
                state.configure(settings)  # now that it has a tracker, pass it the timing settings
            self._hook_loop_class(type(loop))
            self._states[loop] = state
            if ACCEL is not None:
                ACCEL.forget_factories()  # (aiohttp's hook finds this loop's factory anew)
            if state.tasks is not None:
                _unhooked(loop, "set_task_factory")(loop, state.tasks.factory)
            self.process_hooks.install()
            dispatcher.start()  # (again in a forked child: its first loop starts it)
            for worker in self.workers:
                worker.start()
            if _threads.pending:
                _threads.resume_paused()
            self.watchdog.add(state)
        if loop.is_running() and _running_here(loop):
            state.run_started()
        return state

    def detach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Stop watching ``loop``; it runs on unwatched, with its own task factory back."""
        with self._lock:
            state = self._states.pop(loop, None)
        if state is None:
            return
        if ACCEL is not None:
            ACCEL.forget_factories()
        self._forget(loop, state)
        self.watchdog.remove(state)
        if not self._states:
            # No loop left: loopwatch's threads end (what is queued written first), so that a
            # program that forks now is single-threaded; the next loop starts them again.
            self.dispatcher.stop_idle()

    def _forget(self, loop: asyncio.AbstractEventLoop, state: LoopState) -> None:
        """Take loopwatch out of a loop that is no longer watched (no thread touched)."""
        state.detach()
        tracker = state.tasks
        if tracker is not None:
            if _factory_of(loop) is tracker.factory:
                _unhooked(loop, "set_task_factory")(loop, tracker.inner)
            self.retired.add(tracker.stats)
            self.table.retire(tracker.rows)
        counts, lag_sum = state.lag_histogram()
        self.retired_lag.merge(counts, lag_sum)
        self.retired_busy += state.busy_seconds()

    def close(self) -> None:
        """Undo everything: global mode, every loop, the class hooks, the process hooks."""
        self.disable_global()
        for known in self.watched_loops():
            self.detach(known)
        with self._lock:
            self._unhook_classes()
        self.process_hooks.remove()

    # -- the class hooks -------------------------------------------------------------------------

    def _hook_loop_class(self, cls: type) -> None:
        """Hook the owner class of ``cls`` once (under the lock)."""
        owner = _owner_class(cls)
        if owner is None or owner in self._hooked:
            return
        originals: dict[str, Any] = {}
        names = list(_HOOKS)
        if owner is BaseEventLoop and _CREATE_TASK_RENAMES:
            names.append("create_task")
        for name in names:
            original = owner.__dict__.get(name, _ABSENT)
            current = getattr(owner, name)
            hook: Any
            if name == "run_forever" and ACCEL is not None:
                # Compiled: no frame of loopwatch's on the stack for the length of the run (the
                # program's stacks, tracebacks and cr_origin show the loop's frames only).
                hook = ACCEL.MethodHook(current, self._run_enter, _run_leave)
            else:
                hook = _make_hook(self, name, current)
                hook.__qualname__ = f"{owner.__name__}.{name}"
                hook.__doc__ = current.__doc__
                setattr(hook, "__wrapped__", current)  # noqa: B010 - mypy: functions take attributes
                setattr(hook, "__loopwatch__", True)  # noqa: B010
                _HOOK_CODES.add(hook.__code__)
                if name == "run_forever":
                    # The last frame of loopwatch's before uvloop's compiled loop calls a callback.
                    _tasks.set_driver(hook.__code__)
            type.__setattr__(owner, name, hook)
            originals[name] = original
        self._hooked[owner] = originals

    def _unhook_classes(self) -> None:
        for owner, originals in list(self._hooked.items()):
            for name, original in originals.items():
                hook = owner.__dict__.get(name)
                if not getattr(hook, "__loopwatch__", False):
                    continue  # replaced since by someone else: theirs stays
                if original is _ABSENT:
                    type.__delattr__(owner, name)
                else:
                    type.__setattr__(owner, name, original)
            del self._hooked[owner]

    def _run_enter(self, loop: Any) -> LoopState | None:
        """The compiled run_forever hook's start: the state of a watched loop, now running."""
        state = self._states.get(loop)
        if state is None or not state.active:
            return None
        try:
            state.run_started()
        except Exception as exc:  # noqa: BLE001 - never in the program's way
            self.run_failed(state, exc)
            return None
        return state

    def run_failed(self, state: LoopState, exc: Exception) -> None:
        """Starting to follow a run failed: this loop is no longer watched, said once."""
        with contextlib.suppress(Exception):
            state.detach()
        state.active = False
        report(
            f"loopwatch: watching a loop's run failed ({type(exc).__name__}: {exc}); "
            "that loop is no longer watched"
        )

    # -- global mode ---------------------------------------------------------------------------

    def enable_global(self) -> None:
        """Watch every loop built from now on, stock or uvloop (uvloop when it is imported)."""
        with self._lock:
            if self.global_mode:
                return
            self.global_mode = True
            self._patch_init(BaseEventLoop)
        if "uvloop" in sys.modules:
            self.patch_uvloop()
        elif not self._uvloop_hooked:
            # (install() in code: LOOPWATCH=1 and the pytest plugin hook the import themselves)
            self._uvloop_hooked = True
            _import_hooks.when_imported("uvloop", lambda _module: self.patch_uvloop())

    def patch_uvloop(self) -> None:
        """Wrap ``uvloop.Loop.__init__`` if global mode is on (called when uvloop is imported)."""
        with self._lock:
            if not self.global_mode:
                return
            uvloop = sys.modules.get("uvloop")
            loop_class = getattr(uvloop, "Loop", None)
            if loop_class is not None:
                self._patch_init(loop_class)

    def _patch_init(self, cls: type) -> None:
        if any(c is cls and name == "__init__" for c, name, _ in self._patches):
            return
        previous = cls.__dict__.get("__init__", _ABSENT)
        original = cls.__init__  # type: ignore[misc]  # the class's own, whatever its subclasses do
        loops = self

        def __init__(self: asyncio.AbstractEventLoop, *args: Any, **kwargs: Any) -> None:
            try:
                original(self, *args, **kwargs)
            except BaseException as exc:
                _strip(exc)
                raise
            if loops.global_mode:
                try:
                    loops.attach(self)
                except Exception as exc:  # noqa: BLE001 - never break loop creation
                    report(f"loopwatch: could not watch a new loop ({type(exc).__name__}: {exc})")

        __init__.__loopwatch__ = True  # type: ignore[attr-defined]
        __init__.__wrapped__ = original  # type: ignore[attr-defined]
        _HOOK_CODES.add(__init__.__code__)
        type.__setattr__(cls, "__init__", __init__)
        self._patches.append((cls, "__init__", previous))

    def disable_global(self) -> None:
        with self._lock:
            self.global_mode = False
            while self._patches:
                cls, name, previous = self._patches.pop()
                if previous is _ABSENT:
                    type.__delattr__(cls, name)
                else:
                    type.__setattr__(cls, name, previous)

    # -- forks -----------------------------------------------------------------------------------

    def after_fork_in_child(self) -> None:
        """A child forked inside a running loop starts with no loop state of its parent's: the
        loops it inherited run on unwatched (their pulse off, their task factory back), the loops
        it makes are watched."""
        self._lock = threading.RLock()
        for loop, state in list(self._states.items()):
            with contextlib.suppress(Exception):  # a child must never fail because of loopwatch
                self._forget(loop, state)
        self._states.clear()


def _factory_of(loop: asyncio.AbstractEventLoop) -> Any:
    """The factory the loop really holds (past the get_task_factory hook)."""
    return _unhooked(loop, "get_task_factory")(loop)


def _running_here(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


def _owner_class(cls: type) -> type | None:
    """The class whose methods are hooked for loops of ``cls``: BaseEventLoop or uvloop.Loop."""
    if issubclass(cls, BaseEventLoop):
        return BaseEventLoop
    uvloop = sys.modules.get("uvloop")
    base = getattr(uvloop, "Loop", None)
    if isinstance(base, type) and issubclass(cls, base):
        return base
    return None


def _unhooked(loop: Any, name: str) -> Any:
    """``type(loop).<name>`` as the loop itself has it, past loopwatch's class hook."""
    method = getattr(type(loop), name)
    return getattr(method, "__wrapped__", method) if getattr(method, "__loopwatch__", 0) else method


def _strip(exc: BaseException) -> None:
    """Drop the hook's own frame from the head of a traceback (then re-raised with a bare
    ``raise``, which does not add it back)."""
    tb = exc.__traceback__
    if tb is not None and tb.tb_frame.f_code in _HOOK_CODES:
        exc.__traceback__ = tb.tb_next


def _make_hook(loops: Loops, name: str, original: Callable[..., Any]) -> Callable[..., Any]:
    hook: Callable[..., Any]
    if name == "run_forever":

        def run_forever(self: Any) -> Any:
            state = loops.state_of(self)
            if state is None or not state.active:
                try:
                    return original(self)
                except BaseException as exc:
                    _strip(exc)
                    raise
            try:
                state.run_started(1)  # this frame is the last one outside the loop
            except Exception as exc:  # noqa: BLE001 - never in the program's way
                loops.run_failed(state, exc)
                try:
                    return original(self)
                except BaseException as exc2:
                    _strip(exc2)
                    raise
            try:
                result = original(self)
            except BaseException as exc:
                _strip(exc)
                state.run_stopped()
                raise
            state.run_stopped()
            return result

        hook = run_forever
    elif name == "close":

        def close(self: Any) -> Any:
            state = loops.state_of(self)
            tracker = state.tasks if state is not None else None
            if tracker is not None and not self.is_running() and not self.is_closed():
                try:
                    tracker.report_leaks(asyncio.all_tasks(self))
                except Exception as exc:  # noqa: BLE001 - never in the program's way
                    tracker.say(f"loopwatch: leak check failed ({type(exc).__name__}: {exc})")
            try:
                result = original(self)
            except BaseException as exc:
                _strip(exc)
                raise
            if state is not None:
                loops.detach(self)
            return result

        hook = close
    elif name == "set_task_factory":

        def set_task_factory(self: Any, factory: Any) -> Any:
            tracker = loops.tracker_of(self)
            if tracker is None:
                try:
                    return original(self, factory)
                except BaseException as exc:
                    _strip(exc)
                    raise
            if factory is not None and not callable(factory):
                raise TypeError("task factory must be a callable or None")
            tracker.inner = factory
            return None

        hook = set_task_factory
    elif name == "get_task_factory":

        def get_task_factory(self: Any) -> Any:
            tracker = loops.tracker_of(self)
            return original(self) if tracker is None else tracker.inner

        hook = get_task_factory
    elif name == "call_exception_handler":

        def call_exception_handler(self: Any, context: dict[str, Any]) -> Any:
            tracker = loops.tracker_of(self)
            if tracker is not None:
                _tell_tracker(tracker, context)
            try:
                return original(self, context)
            except BaseException as exc:
                _strip(exc)
                raise

        hook = call_exception_handler
    else:  # create_task, on 3.13.0

        def create_task(
            self: Any, coro: Any, *, name: Any = None, context: Any = None, **kwargs: Any
        ) -> Any:
            factory = self._task_factory
            if name is not None or kwargs or not getattr(factory, "__loopwatch__", False):
                try:
                    return original(self, coro, name=name, context=context, **kwargs)
                except BaseException as exc:
                    _strip(exc)
                    raise
            try:
                self._check_closed()
                if context is None:
                    return factory(self, coro)
                return factory(self, coro, context=context)
            except BaseException as exc:
                _strip(exc)
                raise

        hook = create_task
    return hook


def _run_leave(state: LoopState) -> None:
    state.run_stopped()


def _tell_tracker(tracker: TaskTracker, context: dict[str, Any]) -> None:
    try:
        tracker.on_exception_context(context)
    except Exception as exc:  # noqa: BLE001 - never in the way of the program's handler
        tracker.say(f"loopwatch: reading an asyncio report failed ({type(exc).__name__}: {exc})")


def stock_loop_class() -> type[asyncio.AbstractEventLoop]:
    if sys.platform == "win32":  # pragma: no cover - the default there is the proactor loop
        return asyncio.ProactorEventLoop
    return asyncio.SelectorEventLoop
