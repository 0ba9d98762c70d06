"""loopwatch's own threads: invisible to the program, and gone while it forks.

A watched program must not be able to count loopwatch's threads: ``threading.enumerate()`` and
``threading.active_count()`` are what they are unwatched, and ``os.fork()`` from inside a running
loop says nothing it would not say unwatched (Python 3.12 warns "This process is multi-threaded"
when the process has another OS thread at the fork). So:

- each thread is started with the ``_thread`` module, which ``threading`` never hears of;
- before a fork every running worker is stopped and joined at the OS level (through the
  compiled module's ``Thread``, else ``_thread.start_joinable_thread`` on 3.13+), restarted in
  the parent after it, and the child starts with none (its runtime starts them again when it
  watches a loop of its own); a worker asked to start in between starts with the others after;
- a worker that calls code which asks ``threading.current_thread()`` (the ``logging`` module does,
  for every record) goes through :func:`hidden_call`, which lets ``threading`` see the thread only
  for the length of that call, under a name of its own (``loopwatch``).

A worker's body never raises: what fails is said once on standard error and the worker ends.
Joining never happens on a thread whose event loop is running (a running loop's thread must not
wait, and blockbuster would rightly call that a blocking call): there the worker is only asked to
end, which it does at its next wake-up.
"""

from __future__ import annotations

import _thread
import asyncio
import contextlib
import select
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from ._config import report
from ._native import ACCEL

# 3.13+: a handle that joins the OS thread; before that, a lock the body releases at its end.
_JOINABLE = getattr(_thread, "start_joinable_thread", None)
_running_loop = asyncio.events._get_running_loop


class Worker:
    """One background thread of loopwatch's, started and stopped as a unit.

    ``body(keep_going)`` runs in the thread and returns once ``keep_going()`` is false; ``wake``
    interrupts its wait. Starting again while an older thread is still ending is safe: each start
    is a generation, and a body of an older generation finds ``keep_going()`` false.
    """

    def __init__(
        self,
        name: str,
        body: Callable[[Callable[[], bool]], None],
        wake: Callable[[], None],
        *,
        failure: str = "",
    ) -> None:
        self.name = name
        self._body = body
        self._wake = wake
        self._failure = failure  # what stops working if the thread fails, said with it
        self.gen = 0
        self.stopping = True  # not started yet
        self.failed = False  # the body raised once: said once, never started again
        self._live: set[int] = set()  # generations whose thread is still running
        self._ident: int | None = None
        self.native_id: int | None = None
        self._handles: list[Any] = []  # threads started and not yet joined
        _all.append(self)

    @property
    def ident(self) -> int | None:
        """The thread identifier of the latest thread started (None before any)."""
        return self._ident

    @property
    def running(self) -> bool:
        """Whether the current generation's thread runs and has not been asked to stop."""
        return not self.stopping and self.gen in self._live

    @property
    def ending(self) -> bool:
        """Whether a thread of this worker may still be alive (started and not yet joined)."""
        return any(not handle.done() for handle in self._handles)

    def start(self) -> None:
        if self.failed or self.running:
            return
        if forking:
            # Between the pause before a fork and the resume after it (a finalizer the collector
            # runs in a fork hook may have a finding to report): started with the others after.
            if self not in _paused:
                _paused.append(self)
            return
        self.gen += 1
        gen = self.gen
        self.stopping = False
        self._live.add(gen)
        self._handles = [h for h in self._handles if not h.done()]
        handle = _Handle(gen)
        thread_starting()  # until it first holds the GIL, a busy loop hands it over
        try:
            handle.start(lambda: self._run(gen, handle))
        except RuntimeError as exc:  # can't start new thread (at interpreter shutdown, say)
            thread_started()
            self._live.discard(gen)
            self.stopping = True
            report(f"loopwatch: could not start the {self.name} thread ({exc})")
            return
        self._handles.append(handle)

    def _run(self, gen: int, handle: _Handle) -> None:
        thread_started()
        handle.ident = self._ident = _thread.get_ident()
        self.native_id = threading.get_native_id()  # for tools that read /proc (benchmarks)
        ident = handle.ident

        def keep_going() -> bool:
            _unseen(ident)
            return gen == self.gen and not self.stopping

        try:
            self._body(keep_going)
        except BaseException as exc:  # noqa: BLE001 - a thread of ours never takes the host down
            self.failed = True
            then = f"; {self._failure}" if self._failure else ""
            report(f"loopwatch: the {self.name} thread failed ({type(exc).__name__}: {exc}){then}")
        finally:
            self._live.discard(gen)
            handle.finished()
            # Pass the wake-up on. Threads of several generations can wait on one wake (a loop
            # on another thread started the worker again while an older thread was ending), and
            # a wake-up wakes one of them: the one meant for the current thread may have woken
            # this older one, which must not swallow it (the current thread would then sleep
            # through its stop, and whoever joins it waits out the timeout).
            if self._live:
                with contextlib.suppress(Exception):
                    self._wake()

    def stop(self, timeout: float = 5.0, *, wait: bool | None = None) -> bool:
        """Ask the thread to end, wake it, and wait for it (by default not on a running loop's
        thread, and never on itself). True if no thread of this worker is left."""
        self.stopping = True
        self._wake()
        if wait is None:
            wait = _running_loop() is None
        if not wait:
            return not self._live
        me = _thread.get_ident()
        for handle in list(self._handles):
            if handle.gen == self.gen and not self.stopping:
                # Started again meanwhile (a loop on another thread): that thread stays, and
                # waiting for it would hold this thread up to `timeout` for nothing. An older
                # generation, even one being joined here, finds keep_going() false and ends.
                continue
            if handle.ident != me:
                handle.join(timeout)
        self._handles = [h for h in self._handles if not h.done()]
        return not self._live

    def forget(self) -> None:
        """In a forked child: the threads are the parent's; this process has none."""
        self._handles = []
        self._live = set()
        self.stopping = True


class _CompiledThread:
    """``_accel.Thread`` with the handle API of ``_thread.start_joinable_thread`` (3.13+)."""

    __slots__ = ("_thread",)

    def __init__(self, thread: Any) -> None:
        self._thread = thread

    def join(self, timeout: float) -> None:
        self._thread.join(float(timeout))

    def is_done(self) -> bool:
        return bool(self._thread.done())


class _Handle:
    """One thread: joined at the OS level when compiled or on 3.13+, else through a lock its body
    releases as it ends."""

    __slots__ = ("_done", "_os", "gen", "ident")

    def __init__(self, gen: int) -> None:
        self.gen = gen  # the worker's generation this thread runs
        self.ident: int | None = None
        self._os: Any = None
        self._done = _thread.allocate_lock()
        self._done.acquire()

    def start(self, run: Callable[[], None]) -> None:
        if ACCEL is not None:
            # Joined at the OS level, and until the kernel no longer counts the thread (see
            # _accel.Thread): on every version it runs on.
            self._os = _CompiledThread(ACCEL.Thread(run))
        elif _JOINABLE is not None:
            self._os = _JOINABLE(run, daemon=True)
        else:
            _thread.start_new_thread(run, ())

    def finished(self) -> None:
        self._done.release()

    def done(self) -> bool:
        if self._os is not None:
            return bool(self._os.is_done())
        return not self._done.locked()

    def join(self, timeout: float) -> None:
        if self._os is not None:
            with contextlib.suppress(RuntimeError):  # a handle of the parent process
                self._os.join(timeout)
        elif self._done.acquire(True, timeout):
            self._done.release()


# Every worker made, for the fork hooks; a handful per process.
_all: list[Worker] = []
_paused: list[Worker] = []


def pause_all(timeout: float = 1.0) -> None:
    """Before a fork: stop every running worker (the parent restarts them after it); until then
    a worker asked to start waits with them."""
    global forking
    forking = True
    for worker in _all:
        running = worker.running
        if running or worker.ending:
            # Even on a running loop's thread: the fork itself waits already, and a thread
            # still alive at the fork would be the warning this is here to avoid. A worker asked
            # to stop earlier (without waiting, from a running loop) is joined too.
            worker.stop(timeout, wait=True)
        if running:
            _paused.append(worker)


def resume_paused() -> None:
    """Start again the workers a fork stopped (the parent's side)."""
    global pending, forking
    if in_fork_hook:
        # A pending call run by the fork hook's own remaining bytecode: too early (the fork
        # warning has not counted the threads yet). Again at the next chance.
        _again_later()
        return
    pending = False
    forking = False
    paused, _paused[:] = list(_paused), []
    for worker in paused:
        worker.start()


# Set after a fork, in the parent, until the workers run again (the pure-Python pulses look).
pending = False
# Set from the pause before a fork until the workers run again (parent) or are forgotten (child).
forking = False
# True while loopwatch's own after-fork hook runs (see resume_paused).
in_fork_hook = False
# Whether os.fork() counts threads for its warning after the parent's at-fork hooks (3.13+).
_WARNS_AFTER_HOOKS: bool = sys.version_info >= (3, 13)


def resume_soon() -> None:
    """After a fork, in the parent. Up to 3.12 the fork warning counts threads before the at-fork
    hooks of the parent run, so the workers start again at once; from 3.13 it counts them after,
    so they start again from the program's own thread once ``os.fork()`` has returned: a pending
    call (the main thread's next bytecode), or a watched loop's next pulse, whichever comes first.
    """
    global pending, forking
    if not _paused:
        forking = False
        return
    if not _WARNS_AFTER_HOOKS:
        resume_paused()
        return
    pending = True
    if not _again_later():
        resume_paused()  # nothing can run it later: at once, with the warning that may bring


def _again_later() -> bool:
    if ACCEL is not None:
        ACCEL.resume_later(resume_paused)
        return True
    return _pending_call(resume_paused)


def _pending_call(fn: Callable[[], None]) -> bool:
    """``Py_AddPendingCall(fn)`` through ctypes (no compiled module here): False if it cannot.
    One C callback is made for the process and kept: it may be queued again while it runs."""
    global _callback
    try:
        if _callback is None:
            import ctypes  # (deferred: start-up cost; only without the compiled module)

            def trampoline(_: Any) -> int:
                with contextlib.suppress(Exception):  # resume_paused says its own failures
                    fn()
                return 0

            _callback = (ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p)(trampoline), ctypes)
        callback, ctypes_module = _callback
        return bool(ctypes_module.pythonapi.Py_AddPendingCall(callback, None) == 0)
    except Exception:  # noqa: BLE001 - no ctypes, no pythonapi: the caller resumes at once
        return False


_callback: Any = None


def forget_all() -> None:
    """After a fork, in the child: none of the parent's threads exist here."""
    global forking
    forking = False
    _paused.clear()
    _presence.clear()
    for worker in _all:
        worker.forget()
    reset_handoff()  # none of them waits for the GIL here


def discard(worker: Worker) -> None:
    """A worker that will never run again (its runtime closed)."""
    with contextlib.suppress(ValueError):
        _all.remove(worker)


# -- letting threading see a worker only while it calls the program's code -----------------------

_presence: dict[int, Any] = {}


def hidden_call(fn: Callable[[Any], None], arg: Any) -> None:
    """``fn(arg)`` from a worker, with ``threading.current_thread()`` answering ``loopwatch`` during
    the call and the thread out of ``threading.enumerate()`` again after it."""
    ident = _thread.get_ident()
    active: dict[int, Any] | None = getattr(threading, "_active", None)
    guard = getattr(threading, "_active_limbo_lock", None)
    if active is None or guard is None or ident in active:
        fn(arg)
        return
    dummy = _presence.get(ident)
    if dummy is None:
        dummy = _presence[ident] = _named_dummy(active, guard, ident)
    with guard:
        active[ident] = dummy
    try:
        fn(arg)
    finally:
        with guard:
            if active.get(ident) is dummy:
                del active[ident]


def _unseen(ident: int) -> None:
    """Out of ``threading.enumerate()`` again, if something made this worker's thread known to
    ``threading``: a finalizer the collector ran on it (asyncio's "Task was destroyed" logs, and
    logging asks ``threading.current_thread()``). Called at each turn of a worker's loop."""
    active: dict[int, Any] | None = getattr(threading, "_active", None)
    if active is None or ident not in active:
        return
    guard = getattr(threading, "_active_limbo_lock", None)
    if guard is None:
        return
    with guard:
        thread = active.get(ident)
        if thread is not None and isinstance(thread, threading._DummyThread):
            del active[ident]


def _named_dummy(active: dict[int, Any], guard: Any, ident: int) -> Any:
    """A ``threading`` object for this thread, named ``loopwatch`` (made once per thread)."""
    dummy = threading.current_thread()  # registers a _DummyThread in threading._active
    with contextlib.suppress(Exception):
        dummy.name = "loopwatch"
    with guard:
        if active.get(ident) is dummy:
            del active[ident]
    return dummy


# -- the GIL, handed to a thread of loopwatch's when it wakes ------------------------------------
#
# A busy loop lets go of the GIL at every iteration (its select with a timeout of 0) and takes it
# back at once. A thread waiting for the GIL is woken by each release, finds it taken again and
# waits again; each wake-up restarts CPython's switch interval, so the interval never forces a
# switch, and the thread can starve for hundreds of milliseconds while every release of the
# loop's thread pays a futex wake for it (measured: +7 to +10% on a chain of call_soon callbacks
# on stock asyncio with the watchdog waking once a second; 0% with what follows).
#
# So a thread of loopwatch's that wakes says so before it asks for the GIL, and a loop's pulse
# that sees it lets go of the GIL until that thread holds it (at most 2 ms): the thread takes the
# GIL once, at once.
# - ``wait_readable(fds, timeout)`` waits as ``select`` does, and says so as it returns;
# - ``want()``: the caller just woke one of loopwatch's threads (rang the reporter);
# - ``wake_due(t)``: a thread will wake at monotonic time ``t`` (a timed wait on a lock);
# - ``woken()``: the thread holds the GIL again;
# - ``handoff_if_due()``: a loop's pulse (the compiled select pulse does it itself).
# The compiled module says "woken" from poll's return, before the GIL is asked for. Pure Python
# cannot run without the GIL, so its ``wait_readable`` announces its timeout instead: a wake-up
# by a file (a request, an alarm) is not handed the GIL and waits as it would without this.

_INF = float("inf")
_wake_at = _INF


def _wake_due_py(t: float) -> None:
    global _wake_at
    if t < _wake_at:
        _wake_at = t


def _want_py() -> None:
    global _wake_at
    _wake_at = 0.0


def _woken_py() -> None:
    global _wake_at
    _wake_at = _INF


def _handoff_if_due_py() -> None:
    global _wake_at
    if time.monotonic() >= _wake_at:
        _wake_at = _INF
        time.sleep(0.0002)  # the GIL is let go of: the waiting thread takes it meanwhile


def _wait_readable_py(fds: list[int], timeout: float | None) -> list[int]:
    if timeout is not None:
        _wake_due_py(time.monotonic() + timeout)
    try:
        ready, _, _ = select.select(fds, [], [], timeout)
    finally:
        _woken_py()
    return ready


def _reset_handoff_py() -> None:
    global _wake_at
    _wake_at = _INF


if ACCEL is not None and hasattr(ACCEL, "wait_readable"):
    wait_readable: Callable[[list[int], float | None], list[int]] = ACCEL.wait_readable
    want: Callable[[], None] = ACCEL.want
    wake_due: Callable[[float], None] = ACCEL.wake_due
    woken: Callable[[], None] = ACCEL.woken
    handoff_if_due: Callable[[], None] = ACCEL.handoff_if_due
    reset_handoff: Callable[[], None] = ACCEL.reset_handoff
    thread_starting: Callable[[], None] = ACCEL.thread_starting
    thread_started: Callable[[], None] = ACCEL.thread_started
    forget_wakeups: Callable[[], None] = ACCEL.forget_wakeups
else:
    wait_readable, want, wake_due, woken, handoff_if_due, reset_handoff = (
        _wait_readable_py,
        _want_py,
        _wake_due_py,
        _woken_py,
        _handoff_if_due_py,
        _reset_handoff_py,
    )
    thread_starting, thread_started, forget_wakeups = _want_py, _woken_py, _reset_handoff_py
