"""Flood folding: repeats of an event at one place become one line that says how many.

A program that blocks its loop in one handler a thousand times a second must not write a thousand
log lines a second about it. :class:`Fold` wraps a log exporter: the first event of a name at a
place goes through at once; repeats at that place within the window are held back and counted,
and when the window ends the last of them goes through as a :class:`Folded` event whose
``folded`` field says how many events it stands for. A steady flood thus costs one line per place
per window. Counting happens in the dispatcher before any exporter, so metrics stay exact.

Cost: a dict lookup and a clock read per event under a lock; one short-lived timer thread per
window only while something is being held back (nothing at all when no event repeats).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .._config import report
from .._dispatch import Exporter, _describe
from .._events import Event


@dataclass(frozen=True, slots=True, kw_only=True)
class Folded(Event):
    """The last of ``folded`` events of one name at one place, standing for all of them."""

    last: Event
    folded: int

    @property  # the folded event's name, not a name of its own
    def event(self) -> str:  # type: ignore[override]
        return self.last.event

    @property
    def place(self) -> str | None:
        return self.last.place

    def as_dict(self) -> dict[str, Any]:
        """The last event's fields with ``folded`` added after its name."""
        data = self.last.as_dict()
        return {"event": data.pop("event"), "folded": self.folded, **data}

    def __getattr__(self, name: str) -> Any:
        # The folded event's own fields (``duration_s``, ``stack``...) read through. Never for
        # ``last`` itself or dunders: copy and pickle probe those before ``last`` is set.
        if name == "last" or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.last, name)


class _Window:
    __slots__ = ("count", "ends_at", "last")

    def __init__(self, ends_at: float) -> None:
        self.ends_at = ends_at
        self.count = 0  # events held back in this window
        self.last: Event | None = None


Key = tuple[str, str | None]


class Fold:
    """Pass the first event per (name, place) at once; fold its repeats within ``window_s``."""

    def __init__(
        self,
        inner: Exporter,
        window_s: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        timer: bool = True,
    ) -> None:
        self.inner = inner
        self.name = getattr(inner, "name", None) or type(inner).__name__
        self.window_s = window_s
        self._clock = clock
        self._use_timer = timer
        self._lock = threading.Lock()
        self._windows: dict[Key, _Window] = {}
        self._timer: threading.Timer | None = None
        self._timer_due = 0.0
        self._earliest = float("inf")  # no window ends before this: most events skip the scan
        self._broken = False

    def __call__(self, event: Event) -> None:
        if self._broken:
            return
        now = self._clock()
        key = (event.event, event.place)
        with self._lock:
            due = self._take_due(now)
            window = self._windows.get(key)
            if window is None:
                self._windows[key] = _Window(now + self.window_s)
                self._earliest = min(self._earliest, now + self.window_s)
            else:
                window.count += 1
                window.last = event
                self._arm(window.ends_at)
        self._send(due)
        if window is None:
            try:
                self.inner(event)
            except BaseException:
                self._break()
                raise  # the dispatcher disables the fold and says so once

    def flush_due(self) -> None:
        """Send the folded lines of every window that has ended (the timer calls this)."""
        with self._lock:
            self._timer = None
            due = self._take_due(self._clock())
            pending = [w.ends_at for w in self._windows.values() if w.count]
            if pending:
                self._arm(min(pending))
        self._send(due, from_timer=True)

    def _take_due(self, now: float) -> list[Folded]:
        """Close the windows that have ended; those that held events back start anew."""
        due: list[Folded] = []
        if now < self._earliest:
            return due
        earliest = float("inf")
        for key, window in list(self._windows.items()):
            if window.ends_at > now:
                earliest = min(earliest, window.ends_at)
                continue
            if window.count and window.last is not None:
                due.append(Folded(last=window.last, folded=window.count))
                self._windows[key] = _Window(now + self.window_s)
                earliest = min(earliest, now + self.window_s)
            else:
                del self._windows[key]
        self._earliest = earliest
        return due

    def _arm(self, at: float) -> None:
        if not self._use_timer or (self._timer is not None and self._timer_due <= at):
            return
        if self._timer is not None:
            self._timer.cancel()
        timer = threading.Timer(max(at - self._clock(), 0.0) + 0.001, self.flush_due)
        timer.name = "loopwatch-fold"
        timer.daemon = True
        self._timer, self._timer_due = timer, at
        timer.start()

    def _send(self, due: list[Folded], *, from_timer: bool = False) -> None:
        for folded in due:
            if self._broken:
                return
            try:
                self.inner(folded)
            except BaseException as exc:
                self._break()
                if not from_timer:
                    raise  # the dispatcher disables the fold and says so once
                report(f"loopwatch: exporter {self.name} failed ({_describe(exc)}); it is disabled")

    def _break(self) -> None:
        self._broken = True
        with self._lock:
            timer, self._timer = self._timer, None
            self._windows.clear()
        if timer is not None:
            timer.cancel()

    def close(self) -> None:
        """Send what is still held back, then close the wrapped exporter."""
        with self._lock:
            timer, self._timer = self._timer, None
            due = [
                Folded(last=w.last, folded=w.count)
                for w in self._windows.values()
                if w.count and w.last is not None
            ]
            self._windows.clear()
            self._earliest = float("inf")
        if timer is not None:
            timer.cancel()
            if timer is not threading.current_thread():
                timer.join(timeout=1.0)
        self._send(due, from_timer=True)
        close = getattr(self.inner, "close", None)
        if close is not None:
            close()

    def after_fork_in_child(self) -> None:
        """The parent reports what it held back; the child starts with nothing and no timer."""
        self._lock = threading.Lock()
        self._windows = {}
        self._earliest = float("inf")
        self._timer = None
        hook = getattr(self.inner, "after_fork_in_child", None)
        if hook is not None:
            hook()
