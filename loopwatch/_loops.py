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
from collections.abc import Callable
from typing import Any

from . import _runtime
from ._config import Settings
from ._watchdog import LoopState

_lock = threading.RLock()
_states: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoopState] = (
    weakref.WeakKeyDictionary()
)
_global = False
# (class, attribute, previous value or _ABSENT): what global mode changed, to undo it exactly.
_patches: list[tuple[type, str, Any]] = []
_ABSENT = object()


def state_of(loop: asyncio.AbstractEventLoop) -> LoopState | None:
    return _states.get(loop)


def watched_loops() -> list[asyncio.AbstractEventLoop]:
    return list(_states.keys())


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
        _states[loop] = state
        _wrap_run_forever(loop, state)
        runtime.watchdog.add(state)
    if loop.is_running() and _running_here(loop):
        state.run_started()
    return state


def detach(loop: asyncio.AbstractEventLoop) -> None:
    """Stop watching ``loop``; it runs on unwatched, with its own ``run_forever`` back."""
    with _lock:
        state = _states.pop(loop, None)
    if state is None:
        return
    state.detach()
    runtime = _runtime.current()
    if runtime is not None:
        runtime.watchdog.remove(state)
    wrapper = loop.__dict__.get("run_forever")
    if getattr(wrapper, "__loopwatch__", False):
        del loop.__dict__["run_forever"]


def _running_here(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


def _wrap_run_forever(loop: asyncio.AbstractEventLoop, state: LoopState) -> None:
    previous = loop.__dict__.get("run_forever")
    if getattr(previous, "__loopwatch__", False):
        previous = None
    original: Callable[[], None] = previous or type(loop).run_forever.__get__(loop)
    loop_ref = weakref.ref(loop)  # the wrapper lives on the loop: no strong cycle through it

    def run_forever() -> None:
        if loop_ref() is None or not state.active:
            return original()
        state.run_started()
        try:
            return original()
        finally:
            state.run_stopped()

    run_forever.__loopwatch__ = True  # type: ignore[attr-defined]
    run_forever.__wrapped__ = original  # type: ignore[attr-defined]
    loop.run_forever = run_forever  # type: ignore[method-assign]


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
        from asyncio.base_events import BaseEventLoop

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
    _runtime.deactivate()
