"""Blocks seen while they happen: a heartbeat on each loop, one sampler thread for all of them.

A blocked loop cannot report on itself, and on uvloop no callback hook sees I/O callbacks such as
``data_received``. So each watched loop runs a heartbeat, a timer that re-arms itself every
``period`` (a tenth of the slow-callback threshold, 10 ms by default) and writes the time it ran.
Cost on the loop: one timer callback per period, about 2 us, so 0.02% of a core at the default.

One daemon thread watches every loop. It sleeps until the earliest moment a loop could be half a
threshold late (``beat + threshold/2``), so a healthy loop wakes it about 20 times a second and it
never polls on a tight timer that would fight the loop for the GIL. When a heartbeat is that late,
it samples the loop thread's stack (``sys._current_frames``) and running task every ``period``
until the heartbeat runs again:

- The sample's *signature* is the frame where the loop entered the running callback (a new frame
  object for each plain callback, the coroutine's own frame for a task step) and the running task.
  A heartbeat that is late because one loop iteration ran thousands of short callbacks shows a
  different signature at each sample, so it is not mistaken for one callback blocking.
- A block starts after the last heartbeat (or after the last sample that showed something else)
  and ends when the heartbeat runs again, when a different callback is seen, or when the loop
  stops. Its duration is good to about one period.
- The first sample is taken at most half a threshold (plus one GIL switch interval, 5 ms) after the
  block began, comfortably inside the 1.25 x threshold budget.

The thread holds a reference to the sampled frame and task only while the block lasts.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import select
import sys
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType
from typing import TYPE_CHECKING, Any

from . import _places
from ._alarm import Alarm, new_alarm
from ._config import Settings, report
from ._events import Event, LoopStalled, SlowCallback
from ._stats import Histogram

if TYPE_CHECKING:
    from ._tasks import TaskTracker

INF = float("inf")
_HANDLE_RUN = asyncio.Handle._run.__code__
monotonic = time.monotonic


def loop_kind(loop: asyncio.AbstractEventLoop) -> str:
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"


def coroutine_name(coro: Any, entry: FrameType | None = None) -> str:
    """The coroutine's qualified name, looking through the loop's own wrappers.

    ``uvloop.run`` wraps ``main()`` in a coroutine of its own; naming that would tell the user
    nothing, so a machinery coroutine is named after the frame it is running instead.
    """
    code = getattr(coro, "cr_code", None) or getattr(coro, "gi_code", None)
    if code is not None and _places.is_machinery(code.co_filename):
        if entry is not None and entry.f_code.co_flags & inspect.CO_COROUTINE:
            return entry.f_code.co_qualname
        frame = getattr(coro, "cr_frame", None)
        inner = frame.f_locals.get("main") if frame is not None else None
        if inner is not None and hasattr(inner, "__qualname__"):
            return str(inner.__qualname__)
    name = getattr(coro, "__qualname__", None)
    return str(name) if name else type(coro).__qualname__


def suspended_place(task: asyncio.Task[Any]) -> str | None:
    """Where a task's own coroutine is suspended now (its outermost frame's line)."""
    frame = getattr(task.get_coro(), "cr_frame", None)
    return _places.frame_place(frame) if frame is not None else None


@dataclass(slots=True)
class _Sample:
    at: float
    entry: FrameType | None
    key: FrameType | None
    task: asyncio.Task[Any] | None
    frame: FrameType


@dataclass(slots=True)
class _Block:
    """One callback (or task step) seen holding the loop, while the watchdog follows it."""

    gen: int
    beat: float
    key: FrameType | None
    task: asyncio.Task[Any] | None
    first_seen: float
    last_seen: float
    start: float
    task_name: str | None
    coroutine: str | None
    location: str | None
    stack: tuple[str, ...]
    stalled: bool = False
    # Set by the loop thread: when the first heartbeat after the block ran (its precise end).
    ended: float | None = None

    def same(self, sample: _Sample) -> bool:
        # A sample with no key (taken inside the loop's own code, between callbacks) is never
        # "the same": merging those would turn a run of tiny callbacks into one long block.
        return self.key is not None and sample.key is self.key and sample.task is self.task


class LoopState:
    """What the watchdog knows of one loop: written by the loop's thread, read by the watchdog."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        settings: Settings,
        *,
        lag: Histogram,
        emit: Callable[[Event], None],
        wake: Callable[[], None],
    ) -> None:
        self._loop_ref = weakref.ref(loop)
        self.kind = loop_kind(loop)
        self.lag = lag
        self.emit = emit
        self._wake = wake
        self.thread_id: int | None = None
        self.running = False
        self.active = True
        self.gen = 0
        self.beat = 0.0
        self.due = 0.0
        self.stopped_at = 0.0
        self._handle: asyncio.TimerHandle | None = None
        # Pushed back by every heartbeat; wakes the watchdog only if the beat stops (None where
        # timerfd is not available: then the watchdog wakes on deadlines).
        self.alarm: Alarm | None = new_alarm()
        # Guards ``block``: the watchdog follows it, and the loop thread finishes it when the
        # loop stops (so a block at the very end of a program is reported before it exits).
        self._lock = threading.Lock()
        self.block: _Block | None = None
        self.tasks: TaskTracker | None = None  # set by _loops.attach, which configures again
        # The last task step timed exactly and reported from the loop thread, so the watchdog
        # does not report it a second time from a sample it took just before the step ended.
        self.exact_task: asyncio.Task[Any] | None = None
        self.exact_end = 0.0
        self._origin_before = -1  # coroutine origin tracking depth to restore at the run's end
        self.configure(settings)

    def configure(self, settings: Settings) -> None:
        self.settings = settings
        self.threshold = settings.slow_callback_s
        self.stall = settings.stall_s
        # Heartbeat period: a tenth of the threshold, kept between 1 ms and 100 ms.
        self.origin_depth = settings.creation_stack if settings.creation_stack > 1 else 0
        self.period = min(max(self.threshold / 10.0, 0.001), 0.1)
        self.first_check = self.threshold / 2.0
        tracker = self.tasks
        if tracker is not None:
            tracker.timing = settings.step_timing
            tracker.exception_messages = settings.exception_messages
            tracker.depth = settings.creation_stack
            watch = tracker.step_watch
            watch.threshold = self.threshold
            watch.half = self.threshold / 2.0
            watch.on_slow = self.step_finished

    # -- the loop's side (runs in the loop thread) ----------------------------------------
    # ``_heartbeat`` is the only code here that runs while the loop is healthy: a clock read, a
    # bisect into the lag histogram, a few attribute stores and one timer, every ``period``.

    def run_started(self) -> None:
        """The loop is about to run (``run_forever`` entered, or watched while running)."""
        self.thread_id = threading.get_ident()
        self._origin_before = -1
        if self.origin_depth and sys.get_coroutine_origin_tracking_depth() < self.origin_depth:
            # Per thread, for this run only: where never-awaited coroutines were created
            # (creation_stack > 1). Set back when the run ends.
            self._origin_before = sys.get_coroutine_origin_tracking_depth()
            sys.set_coroutine_origin_tracking_depth(self.origin_depth)
        now = monotonic()
        self.beat = now
        self.gen += 1
        self.running = True
        self._arm(now)
        if self.alarm is None:
            self._wake()  # a deadline-driven watchdog must learn the new deadline

    def run_stopped(self) -> None:
        self.stopped_at = now = monotonic()
        self.running = False
        if self._origin_before >= 0:
            sys.set_coroutine_origin_tracking_depth(self._origin_before)
            self._origin_before = -1
        handle, self._handle = self._handle, None
        if handle is not None:
            handle.cancel()
        alarm = self.alarm
        if alarm is not None:
            alarm.disarm()
        if self.block is not None:
            with self._lock:
                block = self.block
                if block is not None:
                    self._finish(block, block.ended if block.ended is not None else now)

    def _arm(self, now: float) -> None:
        loop = self._loop_ref()
        if loop is None or not self.active or loop.is_closed():
            return
        self.due = now + self.period
        self._handle = loop.call_later(self.period, self._heartbeat)
        alarm = self.alarm
        if alarm is not None:
            alarm.arm(self.first_check)

    def _heartbeat(self) -> None:
        # Hot-ish path: once per period. A clock read, a bisect, three stores and a timer.
        now = monotonic()
        late = now - self.due
        self.lag.observe(late if late > 0.0 else 0.0)
        self.beat = now
        block = self.block
        if block is not None and block.ended is None:
            block.ended = now
        if self.running:
            self._arm(now)

    def step_finished(self, took: float, end: float) -> None:
        """A task step of at least half the threshold just ended (loop thread; from ``Timed``).

        If the watchdog is following it as a block, the step's exact duration replaces the
        estimate (and a step that was not slow after all is not reported). If the watchdog never
        saw it (its thread could not run: a C call held the GIL), it is reported from here,
        placed where the task is now suspended, with no stack taken during the block.
        """
        loop = self._loop_ref()
        task = asyncio.current_task(loop) if loop is not None else None
        if task is None or not self.active:
            return
        with self._lock:
            block = self.block
            self.exact_task, self.exact_end = task, end
            if block is not None and block.task is task and block.ended is None:
                self.block = None
                if took >= self.threshold:
                    self.emit(self._slow_event(block, took))
                return
        if took >= self.threshold:
            place = suspended_place(task)
            self.emit(
                SlowCallback(
                    duration_s=round(took, 6),
                    threshold_s=self.threshold,
                    task=task.get_name(),
                    coroutine=coroutine_name(task.get_coro()),
                    location=place,
                    stack=(),
                    loop=self.kind,
                )
            )

    def detach(self) -> None:
        """Stop watching. Safe from any thread: the pending heartbeat runs once more, as a no-op."""
        self.active = False
        self.running = False
        alarm = self.alarm
        if alarm is not None:
            alarm.disarm()

    # -- the watchdog's side (runs in the watchdog thread) --------------------------------

    def check(self, now: float) -> float:
        """Look at the loop once; return when to look again."""
        with self._lock:
            return self._check(now)

    def _check(self, now: float) -> float:
        block = self.block
        if not self.running or not self.active:
            if block is not None:
                self._finish(block, self.stopped_at if self.stopped_at >= block.last_seen else now)
            return INF
        gen, beat = self.gen, self.beat
        if block is not None and (block.ended is not None or block.gen != gen):
            # The heartbeat ran again (or the loop stopped and started again): the block is over.
            end = block.ended
            if end is None:
                end = self.stopped_at
            self._finish(block, end)
            block = None
        if now - beat < self.first_check:
            # Healthy. With an alarm the watchdog need not look again until it fires.
            return beat + self.first_check if self.alarm is None else INF
        sample = self._sample(now)
        if sample is None:
            return now + self.period
        if block is not None and block.same(sample):
            block.last_seen = now
            if not block.stalled and now - block.start >= self.stall:
                block.stalled = True
                self._emit_stall(block, sample, now)
        elif (
            sample.task is not None
            and sample.task is self.exact_task
            and sample.at <= self.exact_end
        ):
            pass  # taken just before that step ended, and it was reported with its exact time
        else:
            # A block cannot have begun before the last heartbeat, nor before the end of a step
            # already reported with its exact time (the heartbeat may not have run since).
            start_after = max(beat, self.exact_end)
            if block is not None:
                # Something else is running now: the previous callback ended in between.
                self._finish(block, (block.last_seen + now) / 2.0)
                start_after = block.last_seen
            self.block = self._new_block(gen, beat, sample, start_after)
        # Keep sampling at the heartbeat's period; a loop stalled for good is looked at less often.
        return now + (self.period if not (self.block and self.block.stalled) else 0.1)

    def _sample(self, now: float) -> _Sample | None:
        tid = self.thread_id
        loop = self._loop_ref()
        if tid is None or loop is None:
            return None
        frame = sys._current_frames().get(tid)
        if frame is None:
            return None
        try:
            task = asyncio.current_task(loop)
        except RuntimeError:
            task = None
        frames = _places.frames_outermost_first(frame)
        entry = _places.callback_entry(frames)
        key = entry
        if key is None and frames[-1].f_code is _HANDLE_RUN:
            # A callback with no Python frame of its own (a C function) on stock asyncio: the
            # handle's _run frame is new for each callback, so it identifies this one.
            key = frames[-1]
        return _Sample(now, entry, key, task, frame)

    def _new_block(self, gen: int, beat: float, sample: _Sample, start_after: float) -> _Block:
        frames = _places.frames_outermost_first(sample.frame)
        own = _places.innermost_own(frames)
        task = sample.task
        if start_after == beat:
            # Nothing else was seen since the last heartbeat. On a loop that is not saturated the
            # block began within one period of it: take the middle of that window.
            start = beat + min(self.period, sample.at - beat) / 2.0
        else:
            start = (start_after + sample.at) / 2.0
        return _Block(
            gen=gen,
            beat=beat,
            key=sample.key,
            task=task,
            first_seen=sample.at,
            last_seen=sample.at,
            start=start,
            task_name=task.get_name() if task is not None else None,
            coroutine=coroutine_name(task.get_coro(), sample.entry) if task is not None else None,
            location=_places.frame_place(own) if own is not None else None,
            stack=tuple(_places.frame_place(f) for f in frames),
        )

    def _emit_stall(self, block: _Block, sample: _Sample, now: float) -> None:
        frames = _places.frames_outermost_first(sample.frame)
        own = _places.innermost_own(frames)
        self.emit(
            LoopStalled(
                blocked_s=round(now - block.start, 6),
                task=block.task_name,
                coroutine=block.coroutine,
                location=_places.frame_place(own) if own is not None else block.location,
                stack=tuple(_places.frame_place(f) for f in frames),
                loop=self.kind,
            )
        )

    def _finish(self, block: _Block, end: float) -> None:
        self.block = None
        duration = max(end, block.last_seen) - block.start
        if duration >= self.threshold:
            self.emit(self._slow_event(block, duration))

    def _slow_event(self, block: _Block, duration: float) -> SlowCallback:
        return SlowCallback(
            duration_s=round(duration, 6),
            threshold_s=self.threshold,
            task=block.task_name,
            coroutine=block.coroutine,
            location=block.location,
            stack=block.stack,
            loop=self.kind,
        )


class Watchdog:
    """The one sampler thread. It blocks in ``select`` on each loop's alarm (see ``_alarm``) and
    a wake pipe, so a healthy loop never wakes it; it wakes on deadlines only while it follows a
    block, or for loops that have no alarm (where timerfd is not available)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._states: list[LoopState] = []
        self._retired: list[Alarm] = []
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._failed = False  # the thread died once: said once, never started again
        self._wake_r, self._wake_w = _pipe()

    @property
    def thread(self) -> threading.Thread | None:
        return self._thread

    def add(self, state: LoopState) -> None:
        with self._lock:
            if state not in self._states:
                self._states.append(state)
            self._ensure_thread()
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
            thread = self._thread
        self.wake()
        if last and thread is not None and thread is not threading.current_thread():
            # The last loop is gone (closed): let the thread end now, not at its next wake-up,
            # so that a fork() right after asyncio.run() finds a single-threaded process.
            thread.join(timeout=1.0)

    def wake(self) -> None:
        with contextlib.suppress(OSError):  # a full pipe already means "wake up"
            os.write(self._wake_w, b"x")

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            states, self._states = self._states, []
            thread = self._thread
        self.wake()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5.0)
        self._thread = None
        for state in states:
            if state.alarm is not None:
                state.alarm.close()
                state.alarm = None
        for alarm in self._retired:
            alarm.close()
        self._retired.clear()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    def stopping(self) -> bool:
        return self._stopping

    def after_fork_in_child(self) -> None:
        """A forked child has none of its parent's threads, and must not share its timers."""
        self._lock = threading.Lock()
        self._thread = None
        self._wake_r, self._wake_w = _pipe()
        for state in self._states:
            state.alarm = new_alarm()

    def _ensure_thread(self) -> None:
        if self._stopping or self._failed:
            return
        if self._thread is not None and self._thread.is_alive():
            return
        thread = threading.Thread(target=self._run, name="loopwatch-watchdog", daemon=True)
        self._thread = thread
        thread.start()

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # noqa: BLE001 - the watchdog must never take the host down
            self._failed = True
            report(
                f"loopwatch: the watchdog thread failed ({type(exc).__name__}: {exc}); "
                "block detection is off"
            )

    def _loop(self) -> None:
        while True:
            with self._lock:
                if self._stopping:
                    return
                states = list(self._states)
                retired, self._retired = self._retired, []
                if not states:
                    # No loop left to watch: the thread ends (add() starts another), so a
                    # program that forks after asyncio.run() has returned is single-threaded.
                    self._thread = None
            for alarm in retired:
                alarm.close()
            if not states:
                return
            now = monotonic()
            deadline = now + 60.0
            fds = [self._wake_r]
            for state in states:
                try:
                    deadline = min(deadline, state.check(now))
                except Exception as exc:  # noqa: BLE001 - one loop's failure stays with that loop
                    report(
                        f"loopwatch: watching a loop failed ({type(exc).__name__}: {exc}); "
                        "that loop is no longer watched"
                    )
                    state.detach()
                    self.remove(state)
                    continue
                if state.alarm is not None:
                    fds.append(state.alarm.fd)
            timeout = max(0.0, deadline - monotonic())
            try:
                ready, _, _ = select.select(fds, [], [], timeout)
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
