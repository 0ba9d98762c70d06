"""Watched loops: attaching to a loop, loop factories, install/uninstall, and global mode.

Attaching to a loop shadows its ``run_forever`` with an instance attribute that marks the start
and end of each run for the watchdog (``run_until_complete`` on both asyncio and uvloop calls
``self.run_forever()``, so every run passes through it), starts the heartbeat, and (from the task
issue on) installs the task factory. Nothing is patched on a class for a single loop, and
detaching deletes the attribute again: the loop runs on as it was.

Global mode ("every loop from now on": ``LOOPWATCH=1``, or ``install()`` outside a loop) wraps
``__init__`` of asyncio's ``BaseEventLoop`` and of ``uvloop.Loop`` (uvloop's Python subclass of its
compiled loop), so a loop however made is attached when it is built. Each wrap is undone by
``uninstall()``.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import weakref
from asyncio.base_events import BaseEventLoop
from collections.abc import Callable
from typing import Any

from . import _runtime, _tasks, _timing
from ._config import Settings, report
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
# Task counts of loops no longer watched, so that process totals never go backwards.
_retired = TaskStats()


def task_totals() -> TaskStats:
    """Task counts over every loop watched so far, and the number of live tracked tasks."""
    totals = TaskStats()
    totals.add(_retired)
    for state in list(_states.values()):
        if state.tasks is not None:
            totals.add(state.tasks.stats)
    return totals


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
        state = LoopState(
            loop,
            settings,
            lag=runtime.lag,
            emit=runtime.dispatcher.emit,
            wake=runtime.watchdog.wake,
        )
        if settings.tasks:
            state.tasks = TaskTracker(
                loop, runtime.dispatcher.emit, creation_stack=settings.creation_stack
            )
            state.configure(settings)  # now that it has a tracker, pass it the timing settings
        _states[loop] = state
        _shadow_methods(loop, state)
        _tasks.install_process_hooks(tracker_of, runtime.dispatcher.emit)
        runtime.watchdog.add(state)
    if loop.is_running() and _running_here(loop):
        state.run_started()
    return state


def detach(loop: asyncio.AbstractEventLoop) -> None:
    """Stop watching ``loop``; it runs on unwatched, with its own methods and task factory back."""
    with _lock:
        state = _states.pop(loop, None)
    if state is None:
        return
    state.detach()
    runtime = _runtime.current()
    if runtime is not None:
        runtime.watchdog.remove(state)
    for name in _SHADOWED:
        method = loop.__dict__.get(name)
        if getattr(method, "__loopwatch__", False):
            del loop.__dict__[name]
    tracker = state.tasks
    if tracker is not None:
        if loop.get_task_factory() is tracker.factory:
            _unhooked(type(loop), "set_task_factory")(loop, tracker.inner)
        _retired.add(tracker.stats)
        _timing.TABLE.retire(tracker.rows)


def _running_here(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


# Methods shadowed on a watched loop instance (instance attributes, deleted by detach):
# - run_forever: marks each run's start and end for the watchdog (run_until_complete, on asyncio
#   and on uvloop, calls self.run_forever());
# - close: tasks still pending when the loop is closed leaked;
# - create_task, on stock loops of Pythons whose create_task calls ``task.set_name(None)`` after a
#   task factory (3.13.0): that would rename every unnamed task 'None' just because loopwatch
#   brought a factory, so unnamed tasks are made by the factory directly there.
# and, with task tracking, three rarely called methods (below, at _class_hooks).
_CREATE_TASK_RENAMES = "set_name" in BaseEventLoop.create_task.__code__.co_names
_SHADOWED = (
    "create_task",
    "run_forever",
    "set_task_factory",
    "get_task_factory",
    "call_exception_handler",
    "close",
)
# - set_task_factory / get_task_factory: a factory the program sets later is wrapped, not lost,
#   and the program still reads back its own;
# - call_exception_handler: asyncio reports orphaned tasks and lost exceptions through it.
# On a stock loop these are hooked once on ``BaseEventLoop`` (each hook looks the loop up and
# hands unwatched loops straight on), not on the instance: asyncio's pure-Python loop reads its
# own attributes on every callback, and from 30 instance attributes on CPython stops sharing
# the instance dict's keys, which slows every ``self.<attr>`` (about +80 ns per task step,
# measured in benchmarks/results.md). A stock loop has 26; loopwatch adds at most 3.
_class_hooks: dict[str, Any] = {}  # name -> BaseEventLoop's own method, while hooked


def _shadow_methods(loop: asyncio.AbstractEventLoop, state: LoopState) -> None:
    cls = type(loop)
    tracker = state.tasks  # None with LOOPWATCH_TASKS=0: only run_forever and close then
    # The closures below hold the state, never the loop: the loop holds them (in its __dict__),
    # and a strong reference back would make every watched loop a reference cycle.
    loop_ref = weakref.ref(loop)

    def _loop() -> asyncio.AbstractEventLoop:
        current = loop_ref()
        assert current is not None
        return current

    def run_forever() -> None:
        this = _loop()
        if not state.active:
            return cls.run_forever(this)
        state.run_started()
        try:
            return cls.run_forever(this)
        finally:
            state.run_stopped()

    def close() -> None:
        this = loop_ref()
        if this is None:
            # Called from the loop's own __del__ once the garbage collector has let go of
            # it (a loop never closed, at interpreter exit): nothing left to close from here.
            return
        if tracker is not None and not this.is_running() and not this.is_closed():
            try:
                tracker.report_leaks(asyncio.all_tasks(this))
            except Exception as exc:  # noqa: BLE001
                report(f"loopwatch: leak check failed ({type(exc).__name__}: {exc})")
        cls.close(this)
        detach(this)

    _tasks.set_driver(run_forever.__code__)
    methods: list[Callable[..., Any]] = [run_forever, close]
    if tracker is not None:
        methods += _task_methods(loop, tracker, _loop)
    for method in methods:
        setattr(method, "__loopwatch__", True)  # noqa: B010 - mypy: functions take attributes
        setattr(loop, method.__name__, method)
    if tracker is not None:
        _unhooked(cls, "set_task_factory")(loop, tracker.factory)


def _unhooked(cls: type, name: str) -> Any:
    """``cls.<name>`` as the loop itself has it, past loopwatch's class hook."""
    method = getattr(cls, name)
    hook: Any = _class_hooks.get(name)
    return hook.__wrapped__ if hook is not None and method is hook else method


def _tracker_for(loop: Any) -> TaskTracker | None:
    state = _states.get(loop)
    return state.tasks if state is not None else None


def _class_hookable(loop: asyncio.AbstractEventLoop, name: str) -> bool:
    """Whether the loop's class takes ``name`` from ``BaseEventLoop`` (or its hook)."""
    if not isinstance(loop, BaseEventLoop):
        return False
    method = getattr(type(loop), name, None)
    return method is BaseEventLoop.__dict__[name] or method is _class_hooks.get(name)


def _hook_class(name: str) -> None:
    """Hook ``BaseEventLoop.<name>`` once for every watched stock loop (under _lock)."""
    if name in _class_hooks:
        return
    original = BaseEventLoop.__dict__[name]
    hook: Callable[..., Any]
    if name == "set_task_factory":

        def set_task_factory(self: Any, factory: Any) -> None:
            tracker = _tracker_for(self)
            if tracker is None:
                return original(self, factory)  # type: ignore[no-any-return]
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
    else:

        def call_exception_handler(self: Any, context: dict[str, Any]) -> None:
            tracker = _tracker_for(self)
            if tracker is not None:
                _tell_tracker(tracker, context)
            return original(self, context)  # type: ignore[no-any-return]

        hook = call_exception_handler
    hook.__qualname__ = f"BaseEventLoop.{name}"
    hook.__doc__ = original.__doc__
    setattr(hook, "__wrapped__", original)  # noqa: B010 - mypy: functions take attributes
    setattr(hook, "__loopwatch__", True)  # noqa: B010
    type.__setattr__(BaseEventLoop, name, hook)
    _class_hooks[name] = hook


def _unhook_classes() -> None:
    for name, hook in list(_class_hooks.items()):
        original = hook.__wrapped__
        if BaseEventLoop.__dict__.get(name) is hook:
            type.__setattr__(BaseEventLoop, name, original)
        del _class_hooks[name]


def _tell_tracker(tracker: TaskTracker, context: dict[str, Any]) -> None:
    try:
        tracker.on_exception_context(context)
    except Exception as exc:  # noqa: BLE001 - never in the way of the program's handler
        report(f"loopwatch: reading an asyncio report failed ({type(exc).__name__}: {exc})")


def _task_methods(
    loop: asyncio.AbstractEventLoop,
    tracker: TaskTracker,
    _loop: Callable[[], asyncio.AbstractEventLoop],
) -> list[Callable[..., Any]]:
    cls = type(loop)

    def set_task_factory(factory: Any) -> None:
        if factory is not None and not callable(factory):
            raise TypeError("task factory must be a callable or None")
        tracker.inner = factory

    def get_task_factory() -> Any:
        return tracker.inner

    def call_exception_handler(context: dict[str, Any]) -> None:
        _tell_tracker(tracker, context)
        cls.call_exception_handler(_loop(), context)

    def create_task(coro: Any, *, name: Any = None, context: Any = None, **kwargs: Any) -> Any:
        this = _loop()
        factory = this._task_factory  # type: ignore[attr-defined]
        if name is not None or kwargs or factory is not tracker.factory:
            return cls.create_task(this, coro, name=name, context=context, **kwargs)
        this._check_closed()  # type: ignore[attr-defined]
        if context is None:
            return factory(this, coro)
        return factory(this, coro, context=context)

    methods: list[Callable[..., Any]] = []
    for method in (set_task_factory, get_task_factory, call_exception_handler):
        if _class_hookable(loop, method.__name__):
            _hook_class(method.__name__)
        else:
            methods.append(method)
    if _CREATE_TASK_RENAMES and isinstance(loop, BaseEventLoop):
        methods.append(create_task)
    return methods


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
        original(self, *args, **kwargs)
        if _global:
            try:
                attach(self)
            except Exception as exc:  # noqa: BLE001 - never break loop creation
                from ._config import report

                report(f"loopwatch: could not watch a new loop ({type(exc).__name__}: {exc})")

    __init__.__loopwatch__ = True  # type: ignore[attr-defined]
    __init__.__wrapped__ = original  # type: ignore[attr-defined]
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
    _runtime.deactivate()
