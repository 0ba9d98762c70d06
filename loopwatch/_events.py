"""The event records: one frozen, slotted class per finding.

Slots because a flood of events must stay cheap to hold; frozen because an event is handed to
several exporters, in several threads, and none of them may change what the others see.
Every field is plain data (str, float, list of str): an event never holds a frame, a task, a
coroutine or an exception, so keeping one keeps nothing of the program alive.

``origin`` says whose finding it is: ``"program"``, or ``"library"`` when the task (or callback)
was both made and run by installed libraries only, with no frame of the program's own code (see
``_places.is_own_code``). The pytest plugin fails a test on the program's findings.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

_LAST = frozenset({"origin", "route", "context"})


@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    """A finding. ``event`` is its name; the other attributes are its fields."""

    event: ClassVar[str] = "loopwatch.event"
    time: float = field(default_factory=time.time)
    pid: int = field(default_factory=os.getpid)
    origin: str = "program"
    # Which request: the route template of the task's request, and the task's context (its
    # structlog keys, its OpenTelemetry trace_id/span_id). Only in findings about a task that
    # has them; left out of as_dict() otherwise.
    route: str | None = None
    context: dict[str, Any] | None = field(default=None, hash=False, compare=False)

    def as_dict(self) -> dict[str, Any]:
        """The name under ``event`` and every field, in declaration order; lists are copied.
        ``route`` and ``context`` come just before ``origin``, and only when set."""
        out: dict[str, Any] = {"event": self.event}
        for f in fields(self):
            if f.name not in _LAST:
                value = getattr(self, f.name)
                out[f.name] = list(value) if isinstance(value, tuple) else value
        if self.route is not None:
            out["route"] = self.route
        if self.context:
            out["context"] = dict(self.context)
        out["origin"] = self.origin  # last: what a reader of a line needs least often
        return out

    @property
    def place(self) -> str | None:
        """Where in the program this finding points: the block's location or the creation site."""
        return None


@dataclass(frozen=True, slots=True, kw_only=True)
class SlowCallback(Event):
    """A callback or task step held the loop for ``threshold_s`` or more (reported when it ends)."""

    event: ClassVar[str] = "loopwatch.slow_callback"
    duration_s: float
    threshold_s: float
    task: str | None
    coroutine: str | None
    location: str | None
    stack: tuple[str, ...]
    loop: str

    @property
    def place(self) -> str | None:
        return self.location


@dataclass(frozen=True, slots=True, kw_only=True)
class LoopStalled(Event):
    """The loop has been blocked for ``blocked_s`` and still is (reported while it is)."""

    event: ClassVar[str] = "loopwatch.loop_stalled"
    blocked_s: float
    task: str | None
    coroutine: str | None
    location: str | None
    stack: tuple[str, ...]
    loop: str
    # What the rest of the program was doing: the tasks that have waited longest (at most five,
    # longest first), the place each waits at, and for how long (age less busy time).
    waiting_tasks: tuple[str, ...] = ()
    waiting_at: tuple[str | None, ...] = ()
    waiting_s: tuple[float, ...] = ()

    @property
    def place(self) -> str | None:
        return self.location


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskLeaked(Event):
    """A task was still pending when its loop, scope or test ended."""

    event: ClassVar[str] = "loopwatch.task_leaked"
    task: str
    coroutine: str
    created_at: str | None
    age_s: float
    awaiting: str | None
    awaits: str | None = None
    created_stack: tuple[str, ...] = ()
    # Set when the task was made by asyncio or uvloop itself (``created_at`` is then None): what
    # made it, such as "asyncio: async generator finalizer".
    created_by: str | None = None
    # The task's chain of coroutines, suspended: their places, outermost first, ending at
    # ``awaiting``.
    await_chain: tuple[str, ...] = ()

    @property
    def place(self) -> str | None:
        # Made by asyncio itself (no creation site of the program's): where it waits says most.
        return self.created_at or self.awaiting


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskOrphaned(Event):
    """A pending task was destroyed by the garbage collector: nobody held it."""

    event: ClassVar[str] = "loopwatch.task_orphaned"
    task: str
    coroutine: str
    created_at: str | None
    created_by: str | None = None

    @property
    def place(self) -> str | None:
        return self.created_at


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskExceptionUnretrieved(Event):
    """A task ended with an exception that nobody retrieved."""

    event: ClassVar[str] = "loopwatch.task_exception_unretrieved"
    task: str
    coroutine: str
    created_at: str | None
    exception: str
    raised_at: str | None = None
    created_by: str | None = None

    @property
    def place(self) -> str | None:
        return self.created_at


@dataclass(frozen=True, slots=True, kw_only=True)
class CoroutineNeverAwaited(Event):
    """A coroutine object was created and dropped without being awaited."""

    event: ClassVar[str] = "loopwatch.coroutine_never_awaited"
    coroutine: str
    location: str | None
    defined_at: str | None = None

    @property
    def place(self) -> str | None:
        return self.location


@dataclass(frozen=True, slots=True, kw_only=True)
class CancelSwallowed(Event):
    """A cancelled task ended without ``CancelledError`` while its ``cancelling()`` count was
    still above 0: the cancellation was swallowed (``asyncio.timeout`` and ``TaskGroup`` then
    misbehave, and a shutdown that waits for the task sees it finish as if nothing happened)."""

    event: ClassVar[str] = "loopwatch.cancel_swallowed"
    task: str
    coroutine: str
    created_at: str | None
    # The line the task was suspended at when the cancellation arrived.
    location: str | None
    # How the task ended instead: "returned", or the exception it raised.
    ended: str = "returned"
    created_by: str | None = None

    @property
    def place(self) -> str | None:
        return self.location


@dataclass(frozen=True, slots=True, kw_only=True)
class CancelIgnored(Event):
    """A task still pending ``CANCEL_GRACE_MS`` after its cancellation arrived (reported while it
    still is, once per task)."""

    event: ClassVar[str] = "loopwatch.cancel_ignored"
    task: str
    coroutine: str
    created_at: str | None
    awaiting: str | None
    await_chain: tuple[str, ...]
    since_cancel_s: float
    # The line the task was suspended at when the cancellation arrived.
    cancelled_at: str | None = None
    created_by: str | None = None

    @property
    def place(self) -> str | None:
        return self.awaiting or self.created_at


@dataclass(frozen=True, slots=True, kw_only=True)
class Deadlock(Event):
    """Tasks that wait on each other in a cycle (reported while it lasts, once per cycle)."""

    event: ClassVar[str] = "loopwatch.deadlock"
    tasks: tuple[str, ...]  # the tasks' names, in cycle order: each waits on the next
    cycle: tuple[str | None, ...]  # for each task, the place it is suspended at
    coroutines: tuple[str, ...] = ()

    @property
    def place(self) -> str | None:
        return next((p for p in self.cycle if p), None)


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskStuck(Event):
    """With ``TASK_STUCK_MS`` set: a task suspended at the same ``await`` that long (once per task
    and place)."""

    event: ClassVar[str] = "loopwatch.task_stuck"
    task: str
    coroutine: str
    created_at: str | None
    awaiting: str | None
    await_chain: tuple[str, ...]
    waiting_s: float
    created_by: str | None = None

    @property
    def place(self) -> str | None:
        return self.awaiting or self.created_at


EVENT_TYPES: tuple[type[Event], ...] = (
    SlowCallback,
    LoopStalled,
    TaskLeaked,
    TaskOrphaned,
    TaskExceptionUnretrieved,
    CoroutineNeverAwaited,
    CancelSwallowed,
    CancelIgnored,
    Deadlock,
    TaskStuck,
)
EVENT_NAMES: tuple[str, ...] = tuple(t.event for t in EVENT_TYPES)
