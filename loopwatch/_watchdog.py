"""Blocks seen while they happen: one sampler thread for every watched loop.

A blocked loop cannot report on itself, and on uvloop no callback hook sees I/O callbacks such as
``data_received``. So each watched loop writes a pulse (``_pulse``: at every iteration on asyncio's
loops, every ``period`` on uvloop), and one watchdog thread, invisible to the program
(``_threads``), reads it. The watchdog sleeps in ``select`` on each loop's alarm, a timerfd the
pulse keeps pushing back: a healthy loop never wakes it. When a loop has stayed away from its wait
for I/O for ``first_check`` (half the slow-callback threshold), the alarm fires and the watchdog
samples the loop thread's stack and running task every ``period`` until the loop waits again:

- The sample's *key* says which callback runs: for a task step, the task and the step's number
  (its step-timing proxy counts them); otherwise the frame where the loop entered the callback (a
  new frame for each plain callback) and the iteration. A loop late because one iteration ran
  thousands of short callbacks shows a different key at each sample, so it is not mistaken for
  one callback blocking.
- A block starts when the iteration began (the pulse's ``woke``), or after the last sample that
  showed something else, and ends when the loop waits again (``block_end``), when a different
  callback is seen, or when the loop stops. A task step's exact duration, measured by its proxy,
  replaces the estimate.
- The first sample is taken at most half a threshold (plus one GIL switch interval, 5 ms) after
  the block began, comfortably inside the 1.25 x threshold budget.

What the watchdog keeps of the program: strings, code objects and ids, never a frame or a task.
Every frame and task it samples goes into the pulse's ``box``, which the loop's own thread empties
at its next wait, so no finalizer of the program runs on the watchdog's thread.

Who reports a block, exactly once: the watchdog when it sees the block end, the loop thread when
its run stops (so a block at the very end of a program is reported before it exits) or when the
step's proxy has the exact duration. Each block carries a one-shot claim (a list popped by
whoever reports it): no lock is shared with the loop's thread, which never waits on the watchdog.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import inspect
import os
import select
import selectors
import sys
import threading
import time
import weakref
from asyncio.base_events import BaseEventLoop
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from types import CodeType, FrameType
from typing import TYPE_CHECKING, Any, cast

from . import _context, _places, _threads
from ._alarm import Alarm, new_alarm
from ._config import Settings, report
from ._context import about
from ._events import Event, LoopStalled, SlowCallback
from ._native import ACCEL
from ._pulse import Heartbeat, SelectPulse
from ._stats import Histogram
from ._threads import Worker

if TYPE_CHECKING:
    from ._hangs import Hangs
    from ._tasks import TaskTracker

INF = float("inf")
_HANDLE_RUN = asyncio.Handle._run.__code__
monotonic = time.monotonic
_current_frames = sys._current_frames


def _thread_frame_py(tid: int) -> FrameType | None:
    return _current_frames().get(tid)


def _load_thread_frame() -> Callable[[int], FrameType | None]:
    # The compiled version takes the one thread's frame with no window in which another thread's
    # frame could be dropped here (see the module docstring).
    fn = getattr(ACCEL, "thread_frame", None)
    return fn if fn is not None else _thread_frame_py


def loop_kind(loop: asyncio.AbstractEventLoop) -> str:
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"


def coroutine_name(coro: Any, entry: FrameType | None = None) -> str:
    """The coroutine's qualified name, looking through the loop's own wrappers.

    ``uvloop.run`` wraps ``main()`` in a coroutine of its own; naming that would tell the user
    nothing, so a machinery coroutine is named after the frame it is running instead. A task
    that runs an async generator's ``aclose()`` (asyncio's finalizer of a dropped generator) is
    named after the generator.
    """
    agen = async_generator_of(coro)
    if agen is not None:
        return str(agen.__qualname__)
    code = getattr(coro, "cr_code", None) or getattr(coro, "gi_code", None)
    if code is not None and _places.is_runner_code(code):
        # A test runner's task (anyio's): named after the test it runs now, if it runs one.
        inner = getattr(coro, "cr_await", None)
        name = getattr(inner, "__qualname__", None)
        if name and getattr(inner, "cr_code", None) is not None:
            return str(name)
    if code is not None and _places.is_machinery(code.co_filename):
        if entry is not None and entry.f_code.co_flags & inspect.CO_COROUTINE:
            return entry.f_code.co_qualname
        frame = getattr(coro, "cr_frame", None)
        inner = frame.f_locals.get("main") if frame is not None else None
        if inner is not None and hasattr(inner, "__qualname__"):
            return str(inner.__qualname__)
    name = getattr(coro, "__qualname__", None)
    return str(name) if name else type(coro).__qualname__


_AGEN_METHODS = frozenset({"async_generator_athrow", "async_generator_asend"})


def async_generator_of(awaitable: Any) -> Any:
    """The async generator behind an ``aclose()``/``asend()``/``athrow()`` object, else None.

    Those objects have no attribute for it; the collector's view of what they reference does
    (read-only, and only for these rare tasks)."""
    if type(awaitable).__name__ not in _AGEN_METHODS:
        return None
    for referent in gc.get_referents(awaitable):
        if inspect.isasyncgen(referent):
            return referent
    return None


def await_chain(coro: Any) -> tuple[list[Any], Any]:
    """A coroutine (generator, async generator) and those it awaits now, outermost first, and
    what the innermost of them awaits that is none of these (a future), or None."""
    chain: list[Any] = []
    awaitable = async_generator_of(coro) or coro
    for _ in range(64):
        code = (
            getattr(awaitable, "cr_code", None)
            or getattr(awaitable, "gi_code", None)
            or getattr(awaitable, "ag_code", None)
        )
        if code is None:
            return chain, awaitable
        chain.append(awaitable)
        awaitable = (
            getattr(awaitable, "cr_await", None)
            or getattr(awaitable, "gi_yieldfrom", None)
            or getattr(awaitable, "ag_await", None)
        )
        if awaitable is None:
            break
    return chain, None


def chain_codes(coro: Any) -> list[CodeType]:
    """The code objects of a coroutine and of those it awaits now, outermost first."""
    return [
        getattr(a, "cr_code", None) or getattr(a, "gi_code", None) or a.ag_code
        for a in await_chain(coro)[0]
    ]


def chain_frames(chain: list[Any]) -> list[FrameType]:
    """The frames of an await chain, outermost first, up to the first that has none (ended)."""
    frames: list[FrameType] = []
    for a in chain:
        frame = (
            getattr(a, "cr_frame", None)
            or getattr(a, "gi_frame", None)
            or getattr(a, "ag_frame", None)
        )
        if frame is None:
            break
        frames.append(frame)
    return frames


def origin_of_frames(frames: list[FrameType]) -> str:
    """A block's origin: ``program`` if the callback (its frames from the loop's call inward)
    runs any of the program's own code (or has no frame to tell by: a C function the program
    scheduled), else ``library``."""
    if not frames:
        return "program"
    for frame in frames:
        if _places.is_program(frame.f_code.co_filename):
            return "program"
    return "library"


def origin_of_codes(codes: list[CodeType]) -> str:
    if not codes or any(_places.is_program(code.co_filename) for code in codes):
        return "program"
    return "library"


def _callback_frames(frames: list[FrameType], entry: FrameType | None) -> list[FrameType]:
    """The frames of the callback the loop is running: from its entry inward, or (no entry
    known) those after the loop's own frames."""
    if entry is not None and entry in frames:
        return frames[frames.index(entry) :]
    last = -1
    for i, frame in enumerate(frames):
        if _places.is_machinery(frame.f_code.co_filename):
            last = i
    return frames[last + 1 :]


def suspended_place(task: asyncio.Task[Any]) -> str | None:
    """Where a task is suspended now: the innermost frame of the program's own code along its
    chain of awaits (a test runner's task awaits the test), else its coroutine's own frame."""
    frames = chain_frames(await_chain(task.get_coro())[0])
    own = next((f for f in reversed(frames) if _places.is_own_code(f.f_code.co_filename)), None)
    frame = own or (frames[0] if frames else None)
    return _places.frame_place(frame) if frame is not None else None


def step_of(task: asyncio.Task[Any] | None) -> int | None:
    """The number of the step a task is in, from its step-timing proxy (None: no proxy)."""
    steps = getattr(getattr(task, "_coro", None), "steps", None)
    return steps if isinstance(steps, int) else None


def claim(token: list[bool]) -> bool:
    """Take a one-shot right to report (atomic: ``list.pop`` is one C call under the GIL)."""
    try:
        token.pop()
    except IndexError:
        return False
    return True


@dataclass(slots=True)
class _Sample:
    at: float
    key: tuple[Any, ...] | None
    task_id: int | None
    step: int | None
    task_name: str | None
    coroutine: str | None
    location: str | None
    stack: tuple[str, ...]
    origin: str = "program"
    self_timed: bool = False
    route: str | None = None
    context: dict[str, Any] | None = None


@dataclass(slots=True)
class _Block:
    """One callback (or task step) seen holding the loop, while the watchdog follows it."""

    gen: int
    key: tuple[Any, ...]
    task_id: int | None
    step: int | None
    first_seen: float
    last_seen: float
    start: float
    task_name: str | None
    coroutine: str | None
    location: str | None
    stack: tuple[str, ...]
    origin: str = "program"
    route: str | None = None
    context: dict[str, Any] | None = None
    stalled: bool = False
    told: bool = False  # to _context.block_sink (OpenTelemetry: on the task's span)
    # A task step whose proxy times it and tells step_finished of any step of half the
    # threshold or more: only that report (with the exact duration) can say it was slow.
    self_timed: bool = False
    token: list[bool] = field(default_factory=lambda: [True])

    def same(self, sample: _Sample) -> bool:
        return sample.key == self.key


@dataclass(slots=True)
class _Exact:
    """A task step whose proxy measured it long, reported by the loop thread itself."""

    task_id: int
    step: int
    end: float


class LoopState:
    """What the watchdog knows of one loop: written by the loop's thread, read by the watchdog."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        settings: Settings,
        *,
        emit: Callable[[Event], None],
        wake: Callable[[], None],
        settle: Callable[[], None] = lambda: None,
    ) -> None:
        self._loop_ref = weakref.ref(loop)
        self.kind = loop_kind(loop)
        self.emit = emit
        self._wake = wake
        self._settle = settle
        self.thread_id: int | None = None
        self.running = False
        self.active = True
        self.gen = 0
        self.stopped_at = 0.0
        # Pushed back by the pulse; wakes the watchdog only if the loop stays away from its wait
        # (None where timerfd is not available: then the watchdog wakes on deadlines).
        self.alarm: Alarm | None = new_alarm()
        self.block: _Block | None = None
        self.exact: _Exact | None = None
        # Long steps accounted for, as (end, duration): reported, or holding ones that were (an
        # eager task's first step runs inside the step that made it). Loop thread only.
        self._accounted: list[tuple[float, float]] = []
        # The frame that called run_forever, while the loop runs (the loop's thread sets it).
        self.boundary: FrameType | None = None
        self.tasks: TaskTracker | None = None  # set by Loops.attach, which configures again
        self.hangs: Hangs | None = None  # set by Loops.attach (deadlocks, stuck tasks)
        self._waiting_failed = False
        # uvloop's busy time: the loop thread's CPU clock, read at each run's start and end.
        self._cpu_clock: int | None = None
        self._cpu_at_start = 0.0
        self._cpu_busy = 0.0
        self.wake_by: Callable[[float], None] | None = None  # the watchdog's, set with it
        self._origin_before = -1  # coroutine origin tracking depth to restore at the run's end
        self._said_failure = False
        self.configure(settings)
        # A loop attached from inside BaseEventLoop.__init__ (global mode) has no selector yet:
        # its pulse is made when it first runs.
        self.pulse: Any = self._make_pulse(loop) if _complete(loop) else _Unborn()

    def configure(self, settings: Settings) -> None:
        self.settings = settings
        self.threshold = settings.slow_callback_s
        self.stall = settings.stall_s
        # The pulse's period: a tenth of the threshold, kept between 1 ms and 100 ms.
        self.origin_depth = settings.creation_stack if settings.creation_stack > 1 else 0
        self.period = min(max(self.threshold / 10.0, 0.001), 0.1)
        self.first_check = self.threshold / 2.0
        pulse = getattr(self, "pulse", None)
        if pulse is not None:
            pulse.period = self.period
            pulse.first_check = self.first_check
        tracker = self.tasks
        if tracker is not None:
            tracker.timing = settings.step_timing
            tracker.exception_messages = settings.exception_messages
            tracker.depth = settings.creation_stack
            tracker.cancel_grace = settings.cancel_grace_s
            watch = tracker.step_watch
            watch.threshold = self.threshold
            watch.half = self.threshold / 2.0
            watch.on_slow = self.step_finished
        hangs = getattr(self, "hangs", None)  # (configure runs in __init__ before it is set)
        if hangs is not None:
            hangs.configure(settings.deadlock_check_ms, settings.task_stuck_ms)

    # -- the pulse -----------------------------------------------------------------------------

    def _make_pulse(self, loop: asyncio.AbstractEventLoop) -> Any:
        """A select pulse for asyncio's loops, a heartbeat for the others (uvloop)."""
        selector: Any = (
            getattr(loop, "_selector", None) if isinstance(loop, BaseEventLoop) else None
        )
        inner: Any = getattr(selector, "_selector", None)
        if (
            ACCEL is not None
            and type(inner) is _EPOLL
            and isinstance(selector, selectors.EpollSelector)
        ):
            # Poll mode (the common case on Linux): the pulse stands in for the selector's epoll
            # object, around its poll (see _accel.c); select() itself is left as it is. (The
            # selector's __dict__ is never asked for: a dict made for it would cost each later
            # lookup of an attribute of the selector its specialization.)
            pulse = ACCEL.Pulse(inner.poll, self.period, self.first_check, self.alarm, inner)
            cast(Any, selector)._selector = pulse
            self._selector_ref = weakref.ref(selector)
            return pulse
        real = getattr(selector, "select", None)
        if selector is not None and real is not None and hasattr(selector, "__dict__"):
            cls = ACCEL.Pulse if ACCEL is not None else SelectPulse
            pulse = cls(real, self.period, self.first_check, self.alarm)
            pulse._prev = selector.__dict__.get("select", _ABSENT)
            try:
                selector.select = pulse
            except (AttributeError, TypeError):
                pulse = None
            else:
                self._selector_ref = weakref.ref(selector)
                return pulse
        return Heartbeat(self.period, self.first_check, self.alarm)

    def _remove_pulse(self) -> None:
        pulse = self.pulse
        pulse.active = False
        if isinstance(pulse, Heartbeat | _Unborn):
            return
        selector: Any = self._selector_ref()
        target = getattr(pulse, "target", None)
        if target is not None:
            if selector is not None and getattr(selector, "_selector", None) is pulse:
                selector._selector = target
            return
        if selector is not None and selector.__dict__.get("select") is pulse:
            previous = pulse._prev
            if previous is _ABSENT:
                del selector.__dict__["select"]
            else:
                selector.select = previous
        # Otherwise something wrapped the pulse since (looptime does): it stays, passing through.

    # -- the loop's side (runs in the loop thread) ----------------------------------------

    def run_started(self, depth: int = 2) -> None:
        """The loop is about to run (``run_forever`` entered, or watched while running).

        ``depth``: how many frames up the last frame outside the loop is. From the compiled
        run_forever hook (no frame of its own) it is whatever called run_forever, two up; from
        the pure-Python hook it is the hook's own frame, one up, since the loop's callbacks run
        in frames called from it (uvloop's loop has no frame of its own: see _sample)."""
        self.thread_id = threading.get_ident()
        try:
            self.boundary = sys._getframe(depth)
        except ValueError:
            self.boundary = None
        if self.tasks is not None:
            self.tasks.boundary = self.boundary
        self._origin_before = -1
        if self.origin_depth and sys.get_coroutine_origin_tracking_depth() < self.origin_depth:
            # Per thread, for this run only: where never-awaited coroutines were created
            # (creation_stack > 1). Set back when the run ends.
            self._origin_before = sys.get_coroutine_origin_tracking_depth()
            sys.set_coroutine_origin_tracking_depth(self.origin_depth)
        self.gen += 1
        pulse = self.pulse
        if isinstance(pulse, _Unborn):
            loop = self._loop_ref()
            if loop is not None:
                self.pulse = pulse = self._make_pulse(loop)
        if isinstance(pulse, Heartbeat):
            loop = self._loop_ref()
            if loop is not None:
                pulse.start(loop)
            if self._cpu_clock is None and hasattr(time, "pthread_getcpuclockid"):
                with contextlib.suppress(OSError):
                    self._cpu_clock = time.pthread_getcpuclockid(self.thread_id)
            self._cpu_at_start = time.thread_time()
        else:
            pulse.woke = pulse.entered = monotonic()
            pulse.idle = False
        self.running = True
        hangs = self.hangs
        if hangs is not None:
            # The hang checks are due every DEADLOCK_CHECK_MS while the loop runs: the watchdog
            # is woken only if it would sleep past the first (once, not at every run).
            due = hangs.run_started(monotonic())
            if self.wake_by is not None:
                self.wake_by(due)
        if self.alarm is None:
            self._wake()  # a deadline-driven watchdog must learn the new deadline

    def run_stopped(self) -> None:
        now = monotonic()
        self.stopped_at = now
        self.running = False
        self.boundary = None
        if self.tasks is not None:
            self.tasks.boundary = None
        if self._origin_before >= 0:
            sys.set_coroutine_origin_tracking_depth(self._origin_before)
            self._origin_before = -1
        pulse = self.pulse
        if isinstance(pulse, Heartbeat):
            pulse.stop()
            self._cpu_busy += max(time.thread_time() - self._cpu_at_start, 0.0)
        else:
            pulse.block_open = False
            pulse.idle = False
            pulse.release()
        block = self.block
        if block is not None and claim(block.token):
            # A block at the very end of a run: reported now, before the program goes on (or
            # exits), from this thread.
            self.block = None
            end = pulse.block_end if pulse.block_end >= block.first_seen else now
            self._report(block, max(end, block.last_seen) - block.start)
        # What this run found is written before the program goes on: it may end with os._exit.
        self._settle()

    def step_finished(self, took: float, end: float) -> None:
        """A task step of at least half the threshold just ended (loop thread; from its proxy).

        If the watchdog is following this very step, the loop thread reports it, with its exact
        duration and the stack the watchdog took. If the watchdog never saw it (its thread could
        not run: a C call held the GIL), it is reported from here, placed where the task is now
        suspended, with no stack taken during the block.
        """
        loop = self._loop_ref()
        task = asyncio.current_task(loop) if loop is not None else None
        if task is None or not self.active:
            return
        # The step began after the pulse last saw the loop start an iteration (or its timer
        # run): a step cannot have lasted longer than that, whatever its clock says (the
        # compiled proxy times steps with the processor's counter, see _accel.c).
        took = min(took, max(monotonic() - self.pulse.woke, 0.0))
        # The long steps of tasks made and run eagerly inside this one are theirs: this step is
        # reported for its own time only (else one block is reported once per task it nests in).
        whole = took
        if self._accounted:
            took = max(took - self._nested(end - took, end), 0.0)
        if whole > took or took >= self.threshold:
            self._account(end, whole)  # (for a step that holds this one)
        step = step_of(task)  # the proxy counts this step once this call has returned
        step = step if step is not None else -1
        # First: from now on the watchdog takes a sample of this step for this step, and never
        # starts following it (see check); then, if it follows it already, take it over.
        self.exact = _Exact(id(task), step, end)
        block = self.block
        if block is not None and block.task_id == id(task) and block.step == step:
            if claim(block.token):
                self.block = None
                if took >= self.threshold:
                    self._emit_slow(block, took)
            return
        if took >= self.threshold:
            self.emit(
                SlowCallback(
                    duration_s=round(took, 6),
                    threshold_s=self.threshold,
                    task=task.get_name(),
                    coroutine=coroutine_name(task.get_coro()),
                    location=suspended_place(task),
                    stack=(),
                    loop=self.kind,
                    origin=origin_of_codes(chain_codes(task.get_coro())),
                    **about(task, threading.get_ident()),
                )
            )

    def _nested(self, start: float, end: float) -> float:
        """The time of the accounted steps that ran between ``start`` and ``end`` (taken off the
        list: the step that held them stands for them now)."""
        inside = 0.0
        kept = []
        for at, took in self._accounted:
            # (A millisecond's play: a compiled proxy's durations come from another clock.)
            if start < at <= end + 1e-3 and at - took >= start - 1e-3:
                inside += took
            else:
                kept.append((at, took))
        self._accounted = kept
        return inside

    def _account(self, end: float, took: float) -> None:
        accounted = self._accounted
        accounted.append((end, took))
        if len(accounted) > 16:  # (steps that no later step held: nothing will ask for them)
            del accounted[0]

    def detach(self) -> None:
        """Stop watching. Safe from any thread."""
        self.active = False
        self.running = False
        self._remove_pulse()
        self.pulse.alarm = None  # no push to a descriptor the watchdog is about to close
        alarm = self.alarm
        if alarm is not None:
            alarm.disarm()

    # -- the watchdog's side (runs in the watchdog thread) --------------------------------

    def check_hangs(self, now: float) -> float:
        """Look for hangs (cancellations ignored, deadlocks, stuck tasks); return when to look
        again."""
        tracker = self.tasks
        if tracker is None or not self.active:
            return INF
        due = tracker.overdue_cancels(now, self.pulse.box)
        loop = self._loop_ref()
        hangs = self.hangs
        if loop is None or hangs is None or not self.running:
            return due
        return min(due, hangs.check(loop, tracker, self.pulse.box, now))

    def check(self, now: float) -> float:
        """Look at the loop once; return when to look again."""
        pulse = self.pulse
        if pulse.failed is not None and not self._said_failure:
            self._said_failure = True
            raise RuntimeError(f"its pulse failed ({type(pulse.failed).__name__}: {pulse.failed})")
        block = self.block
        if block is not None and not block.token:
            self.block = block = None  # reported by the loop thread
        if not self.running or not self.active:
            if block is not None:
                self._finish(block, self.stopped_at if self.stopped_at >= block.last_seen else now)
            return INF
        if block is not None and (pulse.block_end >= block.first_seen or block.gen != self.gen):
            # The loop waited again (or stopped and started again): the block is over.
            self._finish(block, pulse.block_end if block.gen == self.gen else self.stopped_at)
            block = None
        if pulse.idle:
            # Waiting for I/O: healthy. Without an alarm, look again in a while.
            return INF if self.alarm is not None else now + self.first_check
        woke = pulse.woke
        if now - woke < self.first_check:
            # Healthy. An alarm pending covers the next check; otherwise a deadline does.
            if self.alarm is not None and pulse.armed_at + self.first_check > now:
                return INF
            return float(woke + self.first_check)
        sample = self._sample(now, pulse)
        if sample is None:
            return now + self.period
        if block is not None and block.same(sample):
            block.last_seen = now
            sink = _context.block_sink
            if sink is not None and not block.told and now - block.start >= self.threshold:
                # Still blocked, and a finding already: the task's span is still open now.
                block.told = True
                sink(block, now - block.start, self.threshold, self.kind)
            if not block.stalled and now - block.start >= self.stall:
                block.stalled = True
                self._emit_stall(block, sample, now)
        elif self._exact_covers(sample):
            pass  # taken just before that step ended, and it was reported with its exact time
        else:
            # A block cannot have begun before the loop's iteration did, nor before the end of a
            # step already reported with its exact time.
            exact = self.exact
            start = max(woke, exact.end if exact is not None else 0.0)
            if block is not None:
                # Something else is running now: the previous callback ended in between.
                self._finish(block, (block.last_seen + now) / 2.0)
                start = (block.last_seen + now) / 2.0
            if sample.key is not None:
                block = _Block(
                    gen=self.gen,
                    key=sample.key,
                    task_id=sample.task_id,
                    step=sample.step,
                    first_seen=sample.at,
                    last_seen=sample.at,
                    start=start
                    if not isinstance(pulse, Heartbeat)
                    else _heartbeat_start(start, woke, self.period, sample.at),
                    task_name=sample.task_name,
                    coroutine=sample.coroutine,
                    location=sample.location,
                    stack=sample.stack,
                    origin=sample.origin,
                    self_timed=sample.self_timed,
                    route=sample.route,
                    context=sample.context,
                )
                self.block = block
                pulse.block_open = True
                if self._exact_covers(sample) and claim(block.token):
                    self.block = None  # the step ended as it was sampled: reported by its proxy
        # Keep sampling at the pulse's period; a loop stalled for good is looked at less often.
        return now + (self.period if not (self.block and self.block.stalled) else 0.1)

    def _exact_covers(self, sample: _Sample) -> bool:
        exact = self.exact
        return (
            exact is not None
            and sample.task_id == exact.task_id
            and sample.step == exact.step
            and sample.at <= exact.end
        )

    def _sample(self, now: float, pulse: Any) -> _Sample | None:
        tid = self.thread_id
        loop = self._loop_ref()
        if tid is None or loop is None:
            return None
        frame = _thread_frame(tid)
        if frame is None:
            return None
        frames = _places.frames_outermost_first(frame)
        # Every frame and the task sampled are released by the loop's own thread (see the module
        # docstring): they go in the pulse's box before anything else is done with them.
        pulse.box.append(frames)
        del frame
        try:
            task = asyncio.current_task(loop)
        except RuntimeError:
            task = None
        if task is not None:
            pulse.box.append(task)
        boundary = self.boundary
        pulse.box.append(boundary)
        if isinstance(pulse, Heartbeat) and boundary is not None and boundary in frames:
            # uvloop calls a callback from its compiled loop: the callback's frame is the next
            # one in from the frame that called run_forever.
            at = frames.index(boundary) + 1
            entry = frames[at] if at < len(frames) else None
        else:
            entry = _places.callback_entry(frames)
        del boundary
        self_timed = False
        if task is not None and (step := step_of(task)) is not None:
            key: tuple[Any, ...] | None = ("step", id(task), step)
            proxy = getattr(task, "_coro", None)
            self_timed = bool(getattr(proxy, "_timing", True)) and (
                getattr(getattr(proxy, "_cfg", None), "on_slow", None) == self.step_finished
            )
        elif entry is not None:
            key = ("frame", id(entry), pulse.iterations)
        elif frames and frames[-1].f_code is _HANDLE_RUN:
            # A callback with no Python frame of its own (a C function) on stock asyncio: the
            # handle's _run frame is new for each callback, so it identifies this one.
            key = ("frame", id(frames[-1]), pulse.iterations)
        else:
            key = None  # the loop's own code between callbacks: not a callback of the program
            step = None
        own = _places.innermost_own(frames)
        coroutine = None
        if task is not None:
            coroutine = coroutine_name(task.get_coro(), entry)
            if entry is not None and _places.is_runner_code(entry.f_code):
                # A test runner's task: the test it runs is the next coroutine frame in.
                inner = frames[frames.index(entry) + 1 :]
                test = next((f for f in inner if f.f_code.co_flags & inspect.CO_COROUTINE), None)
                if test is not None:
                    coroutine = test.f_code.co_qualname
        return _Sample(
            at=now,
            key=key,
            task_id=id(task) if task is not None else None,
            step=key[2] if key is not None and key[0] == "step" else None,
            task_name=task.get_name() if task is not None else None,
            coroutine=coroutine,
            location=_places.frame_place(own) if own is not None else None,
            stack=tuple(_places.frame_place(f) for f in frames),
            origin=origin_of_frames(_callback_frames(frames, entry)),
            self_timed=self_timed,
            **about(task, tid),
        )

    def _emit_stall(self, block: _Block, sample: _Sample, now: float) -> None:
        waiting: list[tuple[str, str | None, float]] = []
        loop = self._loop_ref()
        if self.hangs is not None and loop is not None and not self._waiting_failed:
            try:
                waiting = self.hangs.longest_waiting(loop, self.tasks, self.pulse.box, now)
            except Exception as exc:  # noqa: BLE001 - the stall is reported without them
                self._waiting_failed = True
                report(
                    f"loopwatch: listing the waiting tasks of a stalled loop failed "
                    f"({type(exc).__name__}: {exc}); stalls are reported without them"
                )
        self.emit(
            LoopStalled(
                blocked_s=round(now - block.start, 6),
                task=block.task_name,
                coroutine=block.coroutine,
                location=sample.location or block.location,
                stack=sample.stack,
                loop=self.kind,
                origin=block.origin,
                route=block.route,
                context=block.context,
                waiting_tasks=tuple(w[0] for w in waiting),
                waiting_at=tuple(w[1] for w in waiting),
                waiting_s=tuple(w[2] for w in waiting),
            )
        )

    def _finish(self, block: _Block, end: float) -> None:
        if self.block is block:
            self.block = None
        if claim(block.token):
            self._report(block, max(end, block.last_seen) - block.start)

    def _report(self, block: _Block, duration: float) -> None:
        if block.self_timed:
            # Its proxy reported it already if it lasted half the threshold or more (its exact
            # duration: the step_finished path); otherwise it was short. The watchdog's own
            # estimate starts at the iteration's start at the earliest, which is far too early
            # for a short step first sampled late in a long iteration of a saturated loop.
            return
        self._emit_slow(block, duration)

    def _emit_slow(self, block: _Block, duration: float) -> None:
        if duration >= self.threshold:
            self.emit(
                SlowCallback(
                    duration_s=round(duration, 6),
                    threshold_s=self.threshold,
                    task=block.task_name,
                    coroutine=block.coroutine,
                    location=block.location,
                    stack=block.stack,
                    loop=self.kind,
                    origin=block.origin,
                    route=block.route,
                    context=block.context,
                )
            )

    def busy_seconds(self) -> float:
        """Time this loop spent running callbacks rather than waiting for I/O, so far.

        asyncio's loops: exact, from the select pulse (each iteration's wake to its next wait).
        uvloop waits in C with no hook, so there it is the CPU time of the loop's thread while the
        loop ran: a blocking call that sleeps (``time.sleep``, a lock) is busy for the loop but
        uses no CPU, so this is a lower bound, exact for a loop that never sleeps in a callback."""
        pulse = self.pulse
        if isinstance(pulse, Heartbeat):
            busy = self._cpu_busy
            clock = self._cpu_clock
            if self.running and clock is not None:
                with contextlib.suppress(OSError):  # the thread ended meanwhile
                    busy += max(time.clock_gettime(clock) - self._cpu_at_start, 0.0)
            return busy
        busy = float(getattr(pulse, "busy", 0.0))
        if self.running and not pulse.idle:
            busy += max(monotonic() - pulse.woke, 0.0)
        return busy

    def lag_histogram(self) -> tuple[list[int], float]:
        """(per-bucket counts, sum) of this loop's lag."""
        pulse = self.pulse
        lag = pulse.lag
        if isinstance(lag, Histogram):
            return list(lag.counts), lag.sum
        counts, total = lag  # the compiled pulse's (counts, sum)
        return list(counts), float(total)


def _complete(loop: asyncio.AbstractEventLoop) -> bool:
    """Whether the loop is built far enough for its pulse (an asyncio loop has its selector)."""
    return not isinstance(loop, BaseEventLoop) or getattr(loop, "_selector", None) is not None


class _Unborn:
    """The pulse of a loop that has not run yet: idle, nothing measured."""

    def __init__(self) -> None:
        self.failed: BaseException | None = None
        self.active = True
        self.idle = True
        self.woke = self.entered = self.armed_at = self.block_end = 0.0
        self.busy = 0.0
        self.iterations = 0
        self.block_open = False
        self.lag = Histogram()
        self.box: deque[Any] = deque()
        self.period = self.first_check = 0.0

    def release(self) -> None:
        self.box.clear()


def _heartbeat_start(start: float, beat: float, period: float, at: float) -> float:
    """A heartbeat only bounds when the block began: on a loop that is not saturated it began
    within one period of the last beat; take the middle of that window."""
    if start > beat:
        return start
    return beat + min(period, at - beat) / 2.0


_ABSENT = object()
_EPOLL = getattr(select, "epoll", None)
_thread_frame: Callable[[int], FrameType | None] = _thread_frame_py


def use_compiled_sampler() -> None:
    global _thread_frame
    _thread_frame = _load_thread_frame()


class Watchdog:
    """The one sampler thread. It blocks in ``select`` on each loop's alarm (see ``_alarm``) and
    a wake pipe, so a healthy loop never wakes it; it wakes on deadlines only while it follows a
    block, or for loops that have no alarm (where timerfd is not available)."""

    def __init__(self, say: Callable[[str], None]) -> None:
        self._lock = threading.Lock()  # the watchdog's own: the loops' threads never take it
        self._states: list[LoopState] = []
        self._retired: list[Alarm] = []
        self._say = say
        self._wake_r, self._wake_w = _pipe()
        # When the thread will look again by itself (what it sleeps until, in select).
        self.sleep_until = 0.0
        self.worker = Worker("watchdog", self._run, self.wake, failure="block detection is off")

    @property
    def states(self) -> list[LoopState]:
        return list(self._states)

    def add(self, state: LoopState) -> None:
        with self._lock:
            if state not in self._states:
                self._states.append(state)
        self.worker.start()
        self.wake()

    def remove(self, state: LoopState) -> None:
        with self._lock:
            if state in self._states:
                self._states.remove(state)
            alarm, state.alarm = state.alarm, None
            if alarm is not None:
                alarm.disarm()
                # Closed by the thread, which may be in select() on it right now.
                self._retired.append(alarm)
            last = not self._states
        self.wake()
        if last:
            # The last loop is gone (closed): let the thread end now, not at its next wake-up.
            self.worker.stop(timeout=1.0)
            self._close_retired()

    def wake(self) -> None:
        with contextlib.suppress(OSError):  # a full pipe already means "wake up"
            os.write(self._wake_w, b"x")

    def wake_by(self, deadline: float) -> None:
        """Make the thread look by ``deadline`` (a write to its pipe only if it would sleep past
        it: at most once per deadline, however many tasks are cancelled meanwhile)."""
        if deadline < self.sleep_until:
            self.sleep_until = deadline
            self.wake()

    def stop(self) -> None:
        with self._lock:
            states, self._states = self._states, []
        self.worker.stop(timeout=5.0)
        for state in states:
            if state.alarm is not None:
                state.alarm.close()
                state.alarm = None
        self._close_retired()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        # A thread still ending must not write to a number the program's next file may get.
        self._wake_r = self._wake_w = -1

    def _close_retired(self) -> None:
        if self.worker.running:
            return
        retired, self._retired = self._retired, []
        for alarm in retired:
            alarm.close()

    def after_fork_in_child(self) -> None:
        """A forked child has none of its parent's threads, loops or timers."""
        self._lock = threading.Lock()
        states, self._states = self._states, []
        for state in states:
            if state.alarm is not None:
                state.alarm.close()
                state.alarm = None
        for alarm in self._retired:
            alarm.close()
        self._retired = []
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._wake_r, self._wake_w = _pipe()

    def _run(self, keep_going: Callable[[], bool]) -> None:
        while keep_going():
            with self._lock:
                states = list(self._states)
                retired, self._retired = self._retired, []
            for alarm in retired:
                alarm.close()
            now = monotonic()
            deadline = now + 60.0
            fds = [self._wake_r]
            for state in states:
                try:
                    deadline = min(deadline, state.check(now), state.check_hangs(now))
                except Exception as exc:  # noqa: BLE001 - one loop's failure stays with that loop
                    self._say(
                        f"loopwatch: watching a loop failed ({type(exc).__name__}: {exc}); "
                        "that loop is no longer watched"
                    )
                    state.detach()
                    with self._lock:
                        if state in self._states:
                            self._states.remove(state)
                    continue
                if state.alarm is not None:
                    fds.append(state.alarm.fd)
            self.sleep_until = deadline
            timeout = max(0.0, deadline - monotonic())
            try:
                # As select, and a busy loop hands this thread the GIL as it wakes (_threads).
                ready = _threads.wait_readable(fds, timeout)
            except (OSError, ValueError):  # an alarm closed under us: look again
                continue
            for fd in ready:
                if fd == self._wake_r:
                    with contextlib.suppress(OSError):
                        os.read(self._wake_r, 4096)
                else:
                    for state in states:
                        if state.alarm is not None and state.alarm.fd == fd:
                            state.alarm.clear()


def _pipe() -> tuple[int, int]:
    read, write = os.pipe()
    os.set_blocking(read, False)
    os.set_blocking(write, False)
    return read, write
