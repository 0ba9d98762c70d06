"""The loop thread's side of block detection: a pulse written at every loop iteration.

A blocked loop cannot report on itself, so the watchdog thread watches a *pulse*: when the loop
last left its wait for I/O (``woke``), whether it is waiting now (``idle``), how many iterations it
ran. How the pulse is written depends on the loop, and on neither is anything put in the program's
loop:

- asyncio's loops (``BaseEventLoop`` and its subclasses, fake-clock test loops included) wait for
  I/O in ``self._selector.select(timeout)`` once per iteration. The compiled pulse
  (``_accel.Pulse``) stands in for an epoll selector's epoll object and times its ``poll``
  ("poll mode", see ``_watchdog.Watchdog._make_pulse``); otherwise :class:`SelectPulse` (or the
  compiled pulse) wraps ``select``, as an instance attribute of the *selector* (never of the
  loop, and nothing in its ``_scheduled`` or ``_ready``): entering it, the loop's callbacks for
  this iteration are done;
  leaving it, they start. So the pulse is exact, and it also measures the loop's busy time (the
  time between a wake and the next wait) and its lag. The compiled twin (``_accel.Pulse``) costs
  about 40 ns per iteration; this pure-Python one about 400 ns.
- uvloop runs its iterations in C with no hook a program can reach, so :class:`Heartbeat` is a
  timer in uvloop's own timer heap (``call_later``), re-armed every ``period``: invisible to the
  program (uvloop has no fake clocks and exposes no timer list) and about 2 us per period.

Either way, every ``period`` while the loop runs the pulse pushes back the watchdog's alarm (a
Linux timerfd): it fires only when the loop stayed away from its wait for ``first_check``, so a
healthy loop never wakes the watchdog thread.

Lag: as the old heartbeat measured it, "how late would a callback due every ``period`` run": a
virtual timer, due every ``period``. One that falls due while the loop waits runs on time (0); one
that falls due while the loop runs callbacks runs when they end, at the next wait, that late.

Two more jobs, both for the watchdog: ``block_end`` is when the iteration it is following ended,
and ``box`` holds every frame (and task) the watchdog sampled, until the loop's own thread lets
go of them at the next wait. The watchdog never drops a program's object itself: the program's
finalizers run on the program's thread, as they would unwatched.

Nothing here raises into the program: a failure turns the pulse off (``failed``) and the
watchdog says so once.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Any

from . import _threads
from ._alarm import Alarm
from ._stats import Histogram

_monotonic = time.monotonic
_FIRST_BEAT = 0.001  # seconds from a run's start to the heartbeat's first beat


class SelectPulse:
    """``selector.select`` of a watched asyncio loop: the pulse, then the real ``select``."""

    __slots__ = (
        "_prev",
        "active",
        "alarm",
        "armed_at",
        "block_end",
        "block_open",
        "box",
        "busy",
        "entered",
        "failed",
        "first_check",
        "idle",
        "iterations",
        "lag",
        "lag_due",
        "period",
        "select",
        "woke",
    )

    def __init__(self, select: Any, period: float, first_check: float, alarm: Alarm | None) -> None:
        now = _monotonic()
        self.select = select
        self._prev: Any = None
        self.active = True
        self.failed: BaseException | None = None
        self.alarm = alarm
        self.period = period
        self.first_check = first_check
        self.armed_at = -1e9
        self.woke = self.entered = now
        self.busy = 0.0
        self.idle = False
        self.iterations = 0
        self.lag = Histogram()
        self.lag_due = now + period
        self.block_open = False
        self.block_end = 0.0
        self.box: deque[Any] = deque()

    def __call__(self, timeout: Any = None) -> Any:
        if not self.active:
            return self._call_select(timeout)
        try:
            now = _monotonic()
            self.entered = now
            self.busy += now - self.woke
            self.idle = True
            if now >= self.lag_due:
                # A virtual timer fell due while the loop ran callbacks: it runs now, that late.
                self.lag.observe(now - self.lag_due)
                self.lag_due = now + self.period
            if self.block_open:
                self.block_open = False
                self.block_end = now
            if self.box:
                self.box.clear()  # the watchdog's samples: let go of them here, on this thread
        except Exception as exc:  # noqa: BLE001 - the pulse never raises into the loop
            self._fail(exc)
        ready = self._call_select(timeout)
        if self.active:
            self._wake()
        return ready

    def _call_select(self, timeout: Any) -> Any:
        try:
            return self.select(timeout)
        except BaseException as exc:
            # The program's exception (a signal handler's KeyboardInterrupt, say) goes on as it
            # came, without this frame in its traceback; the pulse still leaves its wait.
            tb = exc.__traceback__
            if tb is not None and tb.tb_frame.f_code is _CALL_SELECT:
                exc.__traceback__ = tb.tb_next
            if self.active:
                self._wake()
            raise

    def _wake(self) -> None:
        try:
            now = _monotonic()
            self.idle = False
            self.woke = now
            self.iterations += 1
            due = self.lag_due
            if now >= due:
                # Virtual timers that fell due while the loop waited ran on time.
                missed = int((now - due) / self.period) + 1
                self.lag.observe_zeros(missed)
                self.lag_due = due + missed * self.period
            alarm = self.alarm
            if alarm is not None and now - self.armed_at >= self.period:
                self.armed_at = now
                alarm.arm(self.first_check)
            if _threads.pending:  # a fork in this process: loopwatch's threads start again
                _threads.resume_paused()
            _threads.handoff_if_due()
        except Exception as exc:  # noqa: BLE001
            self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        self.active = False
        self.idle = False
        self.failed = exc

    def release(self) -> None:
        """Let go of the watchdog's samples (the loop's thread, when its run ends)."""
        self.box.clear()

    # The selector attribute this pulse replaced (another wrapper's, say), put back on detach.
    @property
    def previous(self) -> Any:
        return self._prev


_CALL_SELECT = SelectPulse._call_select.__code__


class Heartbeat:
    """The pulse of a loop with no selector to wrap (uvloop): a timer re-armed every period."""

    __slots__ = (
        "_handle",
        "_loop",
        "active",
        "alarm",
        "armed_at",
        "block_end",
        "block_open",
        "box",
        "busy",
        "due",
        "failed",
        "first_check",
        "idle",
        "iterations",
        "lag",
        "period",
        "running",
        "woke",
    )

    def __init__(self, period: float, first_check: float, alarm: Alarm | None) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handle: asyncio.TimerHandle | None = None
        self.active = True
        self.running = False
        self.failed: BaseException | None = None
        self.alarm = alarm
        self.period = period
        self.first_check = first_check
        self.armed_at = -1e9
        self.woke = self.due = _monotonic()
        self.busy = 0.0
        self.idle = False  # never known: the loop's wait is in C
        self.iterations = 0
        self.lag = Histogram()
        self.block_open = False
        self.block_end = 0.0
        self.box: deque[Any] = deque()

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """The loop's run begins (loop thread)."""
        self._loop = loop
        self.running = True
        now = _monotonic()
        self.woke = now
        # The first beat comes soon: a thread of loopwatch's started or woken by this run start
        # is handed the GIL there (see _threads), not left to wait for it a whole period.
        self._arm(now, min(self.period, _FIRST_BEAT))

    def stop(self) -> None:
        """The loop's run ends (loop thread)."""
        self.running = False
        self._loop = None
        handle, self._handle = self._handle, None
        if handle is not None:
            handle.cancel()
        self.box.clear()

    def _arm(self, now: float, delay: float = 0.0) -> None:
        # No loop.is_closed() here: a program's test may count the calls of its loop's methods
        # (janus's does); a closed loop's call_later raises instead, and the pulse stops.
        loop = self._loop
        if loop is None or not self.active:
            return
        delay = delay or self.period
        self.due = now + delay
        try:
            self._handle = loop.call_later(delay, self._beat)
        except RuntimeError:  # the loop is closed
            self._handle = None
            return
        alarm = self.alarm
        if alarm is not None:
            self.armed_at = now
            alarm.arm(self.first_check)

    def _beat(self) -> None:
        # Once per period: a clock read, a bisect, a few stores and one timer.
        try:
            now = _monotonic()
            late = now - self.due
            self.lag.observe(late if late > 0.0 else 0.0)
            self.woke = now
            self.iterations += 1
            if self.block_open:
                self.block_open = False
                self.block_end = now
            if self.box:
                self.box.clear()
            if _threads.pending:
                _threads.resume_paused()
            _threads.handoff_if_due()  # a thread of loopwatch's woke: it gets the GIL now
            if self.running:
                self._arm(now)
        except Exception as exc:  # noqa: BLE001 - the pulse never raises into the loop
            self.active = False
            self.failed = exc

    def release(self) -> None:
        self.box.clear()
