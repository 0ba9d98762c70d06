"""How an event reads as text: one line, place and duration first, then the stack below it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .._events import Event
from .._places import is_own_code

# Shown first, in this order, when the event has them: what a person scans for. ``folded`` (how
# many events a folded line stands for) comes right after the place it counts.
_FIRST = (
    "duration_s",
    "blocked_s",
    "location",
    "created_at",
    "folded",
    "tasks",
    "task",
    "coroutine",
)
_SKIP = frozenset({"event", "time", "pid", "stack", "waiting_tasks", "waiting_at", "waiting_s"})


def _value(value: Any) -> str:
    if isinstance(value, dict):
        text = ",".join(f"{k}:{v}" for k, v in value.items())
        return repr(text) if " " in text else text
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value)
    if isinstance(value, float):
        return f"{value:.3f}" if value >= 0.001 else f"{value:.6f}"
    text = str(value)
    return repr(text) if (" " in text or not text) else text


def filename_of(place: str) -> str:
    """The file of a ``path:line in function`` place."""
    return place.rsplit(" in ", 1)[0].rsplit(":", 1)[0]


def shown_stack(stack: Sequence[str], *, full_stack: bool = False) -> list[str]:
    """The places a person is shown: the program's own frames, or all when none is its own."""
    if full_stack:
        return list(stack)
    return [p for p in stack if is_own_code(filename_of(p))] or list(stack)


def render(event: Event, *, full_stack: bool = False) -> str:
    """``name key=value ...`` on one line, then the stack indented, the program's frames only."""
    data = event.as_dict()
    keys = [k for k in _FIRST if k in data] + [
        k for k in data if k not in _FIRST and k not in _SKIP
    ]
    # An empty stack says nothing, and most findings are the program's: origin shows when not.
    shown = [
        k for k in keys if data[k] not in (None, [], ()) and (k, data[k]) != ("origin", "program")
    ]
    head = " ".join([event.event] + [f"{k}={_value(data[k])}" for k in shown])
    stack = shown_stack(data.get("stack") or [], full_stack=full_stack)
    lines = [head, *(f"    {p}" for p in stack)]
    waiting = data.get("waiting_tasks") or []
    if waiting:
        # A stall's other tasks, below its stack: one line each, longest waiting first.
        lines.append("  waiting longest:")
        for name, at, waited in zip(waiting, data["waiting_at"], data["waiting_s"], strict=False):
            lines.append(f"    {name} {waited:.3f} s at {at or '?'}")
    return "\n".join(lines)
