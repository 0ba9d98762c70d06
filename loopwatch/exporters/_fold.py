"""Flood folding: repeats of an event at one place become one line that says how many.

A program that blocks its loop in one handler a thousand times a second must not write a thousand
log lines a second about it. :class:`Fold` wraps a log exporter. The first ``PASS`` events of a
name at a place go through at once, each on its own line; further repeats at that place within
the window are held back and counted, and when the window ends they go out as one
:class:`Folded` line: the last of them, with ``folded`` (how many events it stands for) and
``tasks`` (the tasks they concern, at most ``TASKS``). A steady flood thus costs one line per
place per window. Counting happens in the dispatcher before any exporter, so metrics stay exact.

Nothing is lost: the reporter thread asks :meth:`Fold.due` when the next window ends and calls
:meth:`Fold.flush` then, and everything still held back is written when loopwatch closes (at exit
and on ``uninstall()``). A forked child starts with nothing held (what the parent held is the
parent's to write). Only the reporter thread calls a fold, so it needs no lock.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .._dispatch import Exporter
from .._events import Event

PASS = 3  # events of a name at a place written one by one before folding begins
TASKS = 10  # task names a folded line lists at most


@dataclass(frozen=True, slots=True, kw_only=True)
class Folded(Event):
    """The last of ``folded`` events of one name at one place, standing for all of them."""

    last: Event
    folded: int
    tasks: tuple[str, ...] = ()

    @property  # the folded event's name, not a name of its own
    def event(self) -> str:  # type: ignore[override]
        return self.last.event

    @property
    def place(self) -> str | None:
        return self.last.place

    def as_dict(self) -> dict[str, Any]:
        """The last event's fields with ``folded`` (and ``tasks``) added after its name."""
        data = self.last.as_dict()
        head: dict[str, Any] = {"event": data.pop("event"), "folded": self.folded}
        if self.tasks:
            head["tasks"] = list(self.tasks)
        return {**head, **data}

    def __getattr__(self, name: str) -> Any:
        # The folded event's own fields (``duration_s``, ``stack``...) read through. Never for
        # ``last`` itself or dunders: copy and pickle probe those before ``last`` is set.
        if name == "last" or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.last, name)


class _Window:
    __slots__ = ("ends_at", "held", "last", "passed", "tasks")

    def __init__(self, ends_at: float, passed: int) -> None:
        self.ends_at = ends_at
        self.passed = passed  # events of this window written on their own
        self.held = 0  # events held back
        self.last: Event | None = None
        self.tasks: list[str] = []

    def hold(self, event: Event) -> None:
        self.held += 1
        self.last = event
        task = getattr(event, "task", None)
        if isinstance(task, str) and task not in self.tasks and len(self.tasks) < TASKS:
            self.tasks.append(task)

    def folded(self) -> Folded | None:
        if not self.held or self.last is None:
            return None
        return Folded(last=self.last, folded=self.held, tasks=tuple(self.tasks))


Key = tuple[str, str | None]


class Fold:
    """Pass the first ``PASS`` events per (name, place); fold their repeats within ``window_s``."""

    def __init__(
        self,
        inner: Exporter,
        window_s: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        passes: int = PASS,
    ) -> None:
        self.inner = inner
        self.name = getattr(inner, "name", None) or type(inner).__name__
        self.window_s = window_s
        self.passes = max(passes, 1)
        self._clock = clock
        self._windows: dict[Key, _Window] = {}

    def __call__(self, event: Event) -> None:
        now = self._clock()
        key = (event.event, event.place)
        window = self._windows.get(key)
        if window is not None and window.ends_at <= now:
            # Its time is over: what it held goes out first, in order, then this event is judged
            # against a window of its own.
            del self._windows[key]
            folded = window.folded()
            if folded is not None:
                self.inner(folded)
                window = self._windows[key] = _Window(now + self.window_s, self.passes)
            else:
                window = None
        if window is None:
            self._windows[key] = _Window(now + self.window_s, 1)
            self.inner(event)
        elif window.passed < self.passes and not window.held:
            window.passed += 1
            self.inner(event)
        else:
            window.hold(event)

    def due(self) -> float:
        """When the next window that holds events back ends (``inf``: none does)."""
        return min((w.ends_at for w in self._windows.values() if w.held), default=float("inf"))

    def flush(self, now: float, *, everything: bool = False) -> list[Folded]:
        """The folded lines of the windows that ended (or of all of them), oldest place first.

        A window that held events back starts again, folding from its first repeat (a flood goes
        on as one line per window); one that held nothing is forgotten."""
        out: list[Folded] = []
        for key, window in list(self._windows.items()):
            if window.ends_at > now and not everything:
                continue
            folded = window.folded()
            if folded is not None:
                out.append(folded)
                if not everything:
                    self._windows[key] = _Window(now + self.window_s, self.passes)
                    continue
            del self._windows[key]
        return out

    def close(self) -> None:
        close = getattr(self.inner, "close", None)
        if close is not None:
            close()

    def after_fork_in_child(self) -> None:
        """What the parent held back is the parent's to write; the child starts with nothing."""
        self._windows = {}
        hook = getattr(self.inner, "after_fork_in_child", None)
        if hook is not None:
            hook()
