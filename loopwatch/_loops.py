"""Watched loops: attaching to a loop, loop factories, install/uninstall, and global mode.

Nothing of loopwatch's is put on a loop object. A watched loop is recognised by loopwatch's own
table (``_states``, weak keys), and the few loop methods loopwatch needs to hear of are hooked once
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
it is built. Each hook and wrap is undone by ``uninstall()``. A hook's own frame never shows in the
program's tracebacks.
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

from . import _runtime, _tasks, _threads, _timing
from ._config import Settings, report
from ._native import ACCEL
from ._stats import Histogram
from ._tasks import TaskStats, TaskTracker
from ._watchdog import LoopState

_lock = threading.RLock()
_states: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoopState] = (
    weakref.WeakKeyDictionary()
)
_global = False
# (class, attribute, previous value or _ABSENT): what global mode changed, to undo it exactly.
_patches: list[tuple[type, str, Any]] = []
_ABSENT = object()
# Task counts, lag and busy time of loops no longer watched, so process totals never go back.
_retired = TaskStats()
_retired_lag = Histogram()
_retired_busy = [0.0]


def task_totals() -> TaskStats:
    """Task counts over every loop watched so far, and the number of live tracked tasks."""
    totals = TaskStats()
    totals.add(_retired)
    for state in list(_states.values()):
        if state.tasks is not None:
            totals.add(state.tasks.stats)
    return totals


def lag_totals() -> Histogram:
    """The lag histogram over every loop watched so far."""
    total = Histogram()
    total.merge(_retired_lag.counts, _retired_lag.sum)
    for state in list(_states.values()):
        counts, lag_sum = state.lag_histogram()
        total.merge(counts, lag_sum)
    return total


def state_of(loop: asyncio.AbstractEventLoop) -> LoopState | None:
    return _states.get(loop)


def watched_loops() -> list[asyncio.AbstractEventLoop]:
    return list(_states.keys())


def tracker_of(loop: asyncio.AbstractEventLoop) -> TaskTracker | None:
    state = _states.get(loop)
    return state.tasks if state is not None else None


def active_tasks() -> int:
    """Tasks alive and not done, over every watched loop."""
    return sum(state.tasks.active for state in list(_states.values()) if state.tasks is not None)


def attach(loop: asyncio.AbstractEventLoop, settings: Settings | None = None) -> LoopState:
    """Watch ``loop`` (idempotent). A running loop is watched from now on."""
    runtime = _runtime.activate()
    settings = settings or runtime.settings
    with _lock:
        state = _states.get(loop)
        if state is not None and state.active:
            state.configure(settings)
            return state
        say = runtime.dispatcher.say
        state = LoopState(
            loop,
            settings,
            emit=runtime.dispatcher.emit,
            wake=runtime.watchdog.wake,
            settle=runtime.dispatcher.settle,
        )
        if settings.tasks:
            state.tasks = TaskTracker(
                loop, runtime.dispatcher.emit, creation_stack=settings.creation_stack, say=say
            )
            state.configure(settings)  # now that it has a tracker, pass it the timing settings
        _hook_loop_class(type(loop))
        _states[loop] = state
        if state.tasks is not None:
            _unhooked(loop, "set_task_factory")(loop, state.tasks.factory)
        _tasks.install_process_hooks(tracker_of, runtime.dispatcher.emit, say)
        runtime.dispatcher.start()  # (again in a forked child: its first loop starts it)
        if _threads.pending:
            _threads.resume_paused()
        runtime.watchdog.add(state)
    if loop.is_running() and _running_here(loop):
        state.run_started()
    return state


def detach(loop: asyncio.AbstractEventLoop) -> None:
    """Stop watching ``loop``; it runs on unwatched, with its own task factory back."""
    with _lock:
        state = _states.pop(loop, None)
    if state is None:
        return
    _forget(loop, state)
    runtime = _runtime.current()
    if runtime is not None:
        runtime.watchdog.remove(state)
        if not _states:
            # No loop left: loopwatch's threads end (what is queued written first), so that a
            # program that forks now is single-threaded; the next loop starts them again.
            runtime.dispatcher.stop_idle()


def _forget(loop: asyncio.AbstractEventLoop, state: LoopState) -> None:
    """Take loopwatch out of a loop that is no longer watched (no thread touched)."""
    state.detach()
    tracker = state.tasks
    if tracker is not None:
        if _factory_of(loop) is tracker.factory:
            _unhooked(loop, "set_task_factory")(loop, tracker.inner)
        _retired.add(tracker.stats)
        _timing.TABLE.retire(tracker.rows)
    counts, lag_sum = state.lag_histogram()
    _retired_lag.merge(counts, lag_sum)
    _retired_busy[0] += state.pulse.busy


def _factory_of(loop: asyncio.AbstractEventLoop) -> Any:
    """The factory the loop really holds (past the get_task_factory hook)."""
    return _unhooked(loop, "get_task_factory")(loop)


def _running_here(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


# -- the class hooks -----------------------------------------------------------------------------

_CREATE_TASK_RENAMES = "set_name" in BaseEventLoop.create_task.__code__.co_names
_HOOKS = ("run_forever", "close", "set_task_factory", "get_task_factory", "call_exception_handler")
# class -> {name: the class's own method before the hook}, while hooked
_hooked: dict[type, dict[str, Any]] = {}
_HOOK_CODES: set[Any] = set()  # the hooks' code objects: stripped from tracebacks


def _owner_class(cls: type) -> type | None:
    """The class whose methods are hooked for loops of ``cls``: BaseEventLoop or uvloop.Loop."""
    if issubclass(cls, BaseEventLoop):
        return BaseEventLoop
    uvloop = sys.modules.get("uvloop")
    base = getattr(uvloop, "Loop", None)
    if isinstance(base, type) and issubclass(cls, base):
        return base
    return None


def _hook_loop_class(cls: type) -> None:
    """Hook the owner class of ``cls`` once (under _lock)."""
    owner = _owner_class(cls)
    if owner is None or owner in _hooked:
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
            hook = ACCEL.MethodHook(current, _run_enter, _run_leave)
        else:
            hook = _make_hook(name, current)
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
    _hooked[owner] = originals


def _unhook_classes() -> None:
    for owner, originals in list(_hooked.items()):
        for name, original in originals.items():
            hook = owner.__dict__.get(name)
            if not getattr(hook, "__loopwatch__", False):
                continue  # replaced since by someone else: theirs stays
            if original is _ABSENT:
                type.__delattr__(owner, name)
            else:
                type.__setattr__(owner, name, original)
        del _hooked[owner]


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


def _make_hook(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
    hook: Callable[..., Any]
    if name == "run_forever":

        def run_forever(self: Any) -> Any:
            state = _states.get(self)
            if state is None or not state.active:
                try:
                    return original(self)
                except BaseException as exc:
                    _strip(exc)
                    raise
            state.run_started(1)  # this frame is the last one outside the loop
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
            state = _states.get(self)
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
                detach(self)
            return result

        hook = close
    elif name == "set_task_factory":

        def set_task_factory(self: Any, factory: Any) -> Any:
            tracker = _tracker_for(self)
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
            tracker = _tracker_for(self)
            return original(self) if tracker is None else tracker.inner

        hook = get_task_factory
    elif name == "call_exception_handler":

        def call_exception_handler(self: Any, context: dict[str, Any]) -> Any:
            tracker = _tracker_for(self)
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


def _run_enter(loop: Any) -> LoopState | None:
    """The compiled run_forever hook's start: the state of a watched loop, now running."""
    state = _states.get(loop)
    if state is None or not state.active:
        return None
    state.run_started()
    return state


def _run_leave(state: LoopState) -> None:
    state.run_stopped()


def _tracker_for(loop: Any) -> TaskTracker | None:
    state = _states.get(loop)
    return state.tasks if state is not None else None


def _tell_tracker(tracker: TaskTracker, context: dict[str, Any]) -> None:
    try:
        tracker.on_exception_context(context)
    except Exception as exc:  # noqa: BLE001 - never in the way of the program's handler
        tracker.say(f"loopwatch: reading an asyncio report failed ({type(exc).__name__}: {exc})")


# -- loop factories ------------------------------------------------------------------------


def _stock_loop_class() -> type[asyncio.AbstractEventLoop]:
    if sys.platform == "win32":  # pragma: no cover - the default there is the proactor loop
        return asyncio.ProactorEventLoop
    return asyncio.SelectorEventLoop


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A watched stock asyncio loop: a loop factory for ``asyncio.run`` and ``asyncio.Runner``."""
    loop = _stock_loop_class()()
    attach(loop)
    return loop


def new_uvloop_event_loop() -> asyncio.AbstractEventLoop:
    """A watched uvloop loop (needs the ``uvloop`` extra)."""
    try:
        import uvloop
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise RuntimeError(
            "loopwatch.new_uvloop_event_loop needs uvloop: pip install 'loopwatch[uvloop]'"
        ) from exc
    loop = uvloop.new_event_loop()
    attach(loop)
    return loop


# -- global mode ---------------------------------------------------------------------------


def enable_global() -> None:
    """Watch every loop built from now on, stock or uvloop (uvloop when it is imported)."""
    global _global
    _runtime.activate()
    with _lock:
        if _global:
            return
        _global = True
        _patch_init(BaseEventLoop)
        if "uvloop" in sys.modules:
            patch_uvloop()


def patch_uvloop() -> None:
    """Wrap ``uvloop.Loop.__init__`` if global mode is on (called when uvloop is imported)."""
    with _lock:
        if not _global:
            return
        uvloop = sys.modules.get("uvloop")
        loop_class = getattr(uvloop, "Loop", None)
        if loop_class is not None:
            _patch_init(loop_class)


def _patch_init(cls: type) -> None:
    if any(c is cls and name == "__init__" for c, name, _ in _patches):
        return
    previous = cls.__dict__.get("__init__", _ABSENT)
    original = cls.__init__  # type: ignore[misc]  # the class's own, whatever its subclasses do

    def __init__(self: asyncio.AbstractEventLoop, *args: Any, **kwargs: Any) -> None:
        try:
            original(self, *args, **kwargs)
        except BaseException as exc:
            _strip(exc)
            raise
        if _global:
            try:
                attach(self)
            except Exception as exc:  # noqa: BLE001 - never break loop creation
                report(f"loopwatch: could not watch a new loop ({type(exc).__name__}: {exc})")

    __init__.__loopwatch__ = True  # type: ignore[attr-defined]
    __init__.__wrapped__ = original  # type: ignore[attr-defined]
    _HOOK_CODES.add(__init__.__code__)
    type.__setattr__(cls, "__init__", __init__)
    _patches.append((cls, "__init__", previous))


def disable_global() -> None:
    global _global
    with _lock:
        _global = False
        while _patches:
            cls, name, previous = _patches.pop()
            if previous is _ABSENT:
                type.__delattr__(cls, name)
            else:
                type.__setattr__(cls, name, previous)


def global_enabled() -> bool:
    return _global


# -- forks ---------------------------------------------------------------------------------------


def after_fork_in_child() -> None:
    """A child forked inside a running loop starts with no loop state of its parent's: the loops
    it inherited run on unwatched (their pulse off, their task factory back), the loops it makes
    are watched."""
    global _lock
    _lock = threading.RLock()
    for loop, state in list(_states.items()):
        with contextlib.suppress(Exception):  # a child must never fail because of loopwatch
            _forget(loop, state)
    _states.clear()


# -- the public install/uninstall ----------------------------------------------------------


def install(loop: asyncio.AbstractEventLoop | None = None, **settings: Any) -> None:
    """Watch ``loop``, or the running loop, or every loop from now on. Idempotent.

    Keyword settings are those of ``LOOPWATCH_*`` in lower case without the prefix
    (``slow_callback_ms=50``); they win over the environment. An unknown name raises
    ``TypeError`` and a bad value ``ValueError``.
    """
    runtime = _runtime.activate(**settings)
    if loop is None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
    if loop is not None:
        attach(loop, runtime.settings)
    else:
        enable_global()
        for known in watched_loops():
            state = _states.get(known)
            if state is not None:
                state.configure(runtime.settings)


def uninstall(loop: asyncio.AbstractEventLoop | None = None) -> None:
    """Undo ``install``: for ``loop`` only, or everything (every loop, hook and thread)."""
    if loop is not None:
        detach(loop)
        return
    disable_global()
    for known in watched_loops():
        detach(known)
    with _lock:
        _unhook_classes()
    _tasks.remove_process_hooks()
    _retired.reset()  # counts start again with the next install
    _retired_lag.reset()
    _retired_busy[0] = 0.0
    _runtime.deactivate()
