"""Generate reference documentation from the code, so the docs cannot drift from it.

``python -m loopwatch._docs`` rewrites ``docs/reference/configuration.md`` and
``docs/reference/events.md``; a test checks that the committed files are what this produces.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from ._config import ACCEL_ENV, SPECS, Settings
from ._events import EVENT_TYPES, Event

# What each event field means. The names, types and order come from the event classes; a field
# added there without a line here makes ``events_markdown()`` raise, so the reference stays whole.
FIELD_DOCS: dict[str, str] = {
    "time": "when the event was made, seconds since the epoch",
    "pid": "the process it happened in",
    "origin": (
        "`program`, or `library` when the task (or callback) was both made and run by installed "
        "libraries only, with no frame of the program's own code; last in a JSON line, and shown "
        "in a text line only when `library`"
    ),
    "route": (
        "in a finding about a task serving a request: its route template (`GET /users/{id}`), "
        "from the framework's router (Starlette, FastAPI, aiohttp, with `LOOPWATCH=1`) or "
        "`loopwatch.label_request`; left out of a JSON line when there is none"
    ),
    "context": (
        "in a finding about a task: the keys it bound with `structlog.contextvars`, and "
        "`trace_id` and `span_id` of the OpenTelemetry span current in it (an object; left out "
        "when empty). A block's is the context of the task that was running; on Python 3.11 "
        "only a running task's context can be read (with the compiled module)"
    ),
    "created_by": (
        "what made the task when asyncio or uvloop did (then `created_at` is null): "
        "`asyncio.streams: StreamReaderProtocol.connection_made`, `asyncio: async generator "
        "finalizer ...`; null otherwise"
    ),
    "duration_s": "how long the callback or task step held the loop, in seconds",
    "blocked_s": "how long the loop had been blocked when this was reported, in seconds",
    "waiting_tasks": "the tasks that have waited longest (at most five, longest first; the "
    "running task left out): what the rest of the program was doing during the stall",
    "waiting_at": "for each of `waiting_tasks`, the place it waits at",
    "threshold_s": "`LOOPWATCH_SLOW_CALLBACK_MS`, in seconds",
    "task": "the task's name (`Task-7`, or the `name=` it was given)",
    "coroutine": "the coroutine's qualified name (`handle`, `Worker.run`)",
    "location": (
        "`path:line in function`: the innermost frame of the program's own code (not the standard "
        "library, not site-packages) seen while the loop was blocked"
    ),
    "stack": (
        "the places, outermost first, captured while the loop was blocked (logs show the "
        "program's own frames unless `LOOPWATCH_LOG_STACK=full`)"
    ),
    "loop": "`asyncio` or `uvloop`",
    "created_at": (
        "`path:line in function`: the first frame outward from `create_task`/`ensure_future` that "
        "is not in asyncio, uvloop or loopwatch; null for a task made without the loop's factory, "
        "or made by asyncio or uvloop itself (see `created_by`)"
    ),
    "age_s": "seconds from the task's creation to the moment it was found pending",
    "awaiting": "`path:line in function`: where the task is suspended, in the program's own code",
    "awaits": "what it waits on there: `sleep`, `Event.wait`, `Future`, ...",
    "created_stack": (
        "the creation stack, outermost first, when `LOOPWATCH_CREATION_STACK` is above 1; "
        "otherwise empty"
    ),
    "exception": "`Type: message` (the message is left out with `LOOPWATCH_EXCEPTION_MESSAGES=0`)",
    "raised_at": "`path:line in function`: the innermost frame of the traceback",
    "defined_at": "`path:line in function`: where the coroutine function is defined",
    "await_chain": (
        "the task's chain of suspended coroutines, as places, outermost first, ending at "
        "`awaiting`: `worker` -> `fetch` -> the line it waits at"
    ),
    "ended": (
        "how the task ended instead of being cancelled: `returned`, or the exception it raised "
        "(`Type: message`)"
    ),
    "since_cancel_s": (
        "seconds since the cancellation arrived (at least `LOOPWATCH_CANCEL_GRACE_MS`)"
    ),
    "waiting_s": "seconds the task has been suspended at that same `await` (at least that long)",
    "cycle": (
        "for each task of `tasks`, the `path:line in function` it is suspended at (the innermost "
        "frame of the program's own code)"
    ),
    "coroutines": "for each task of `tasks`, its coroutine's qualified name",
    "cancelled_at": (
        "`path:line in function`: the line the task was suspended at when its cancellation arrived"
    ),
}

# Where a field means something more precise for one event: "event name:field".
EVENT_FIELD_DOCS: dict[str, str] = {
    "loopwatch.loop_stalled:waiting_s": "for each of `waiting_tasks`, how long it has waited: "
    "its age less its busy time, in seconds",
    "loopwatch.slow_callback:task": FIELD_DOCS["task"] + "; null if no task was running",
    "loopwatch.slow_callback:coroutine": FIELD_DOCS["coroutine"] + "; null if no task was running",
    "loopwatch.loop_stalled:task": FIELD_DOCS["task"] + "; null if no task was running",
    "loopwatch.loop_stalled:coroutine": FIELD_DOCS["coroutine"] + "; null if no task was running",
    "loopwatch.deadlock:tasks": (
        "the names of the tasks in the cycle, each waiting on the next and the last on the first "
        "(through `await task`, `gather`, `shield`, or a future another task's done-callback "
        "completes); told from the name that sorts first"
    ),
    "loopwatch.cancel_swallowed:location": (
        "`path:line in function`: the line the task was suspended at when its cancellation "
        "arrived (the `await` whose `except` swallowed it); null when no step-timing proxy saw it "
        "arrive (pure Python with `LOOPWATCH_STEP_TIMING=0`)"
    ),
    "loopwatch.coroutine_never_awaited:location": (
        "`path:line in function`: where the coroutine was created when `LOOPWATCH_CREATION_STACK` "
        "is above 1, otherwise where it was dropped (for `fetch()` with no `await`, the same line)"
    ),
}


def field_doc(event: str, name: str) -> str:
    """What field ``name`` of event ``event`` means (``KeyError`` if nobody wrote it down)."""
    return EVENT_FIELD_DOCS.get(f"{event}:{name}") or FIELD_DOCS[name]


_TYPES = {
    "float": "number",
    "int": "integer",
    "str": "string",
    "str | None": "string or null",
    "tuple[str, ...]": "list of strings",
    "tuple[str | None, ...]": "list of strings or nulls",
    "tuple[float, ...]": "list of numbers",
    "dict[str, Any] | None": "object or null",
}


def configuration_markdown() -> str:
    defaults = Settings()
    rows = [
        "# Configuration reference",
        "",
        "<!-- Generated by `python -m loopwatch._docs` from loopwatch/_config.py: do not edit. -->",
        "",
        "Every setting is an environment variable (read once, at start-up or at the first",
        "`install()`), and the same name in lower case without the prefix is a keyword argument of",
        "`loopwatch.install()` (keywords win over the environment).",
        "",
        "`LOOPWATCH=1` (or `true`, `yes`, `on`) turns on zero-code watching of every event loop in",
        "the process; unset, empty or `0` leaves loopwatch off, with nothing imported.",
        "",
        "A bad value in the environment is reported in one line on standard error, naming the",
        "variable, the value and what is accepted; loopwatch goes on with the default. A bad",
        "keyword argument raises `ValueError` (an unknown one, `TypeError`).",
        "",
        "| variable | keyword | default | accepts | meaning |",
        "| --- | --- | --- | --- | --- |",
    ]
    for spec in SPECS.values():
        default = getattr(defaults, spec.name)
        shown = (
            "unset"
            if default is None
            else f"`{default:g}`"
            if isinstance(default, float)
            else f"`{default}`"
        )
        rows.append(f"| `{spec.env}` | `{spec.name}` | {shown} | {spec.accepted} | {spec.doc} |")
    rows += [
        "",
        "One more variable is read once per process, when loopwatch is first imported, and has no",
        "keyword:",
        "",
        "| variable | default | accepts | meaning |",
        "| --- | --- | --- | --- |",
        f"| `{ACCEL_ENV}` | `1` | 1 or 0 (also true/false, yes/no, on/off) | Use the compiled hot"
        " paths (`loopwatch._accel`: the task factory, the step-timing proxy, the accounting when a"
        " task ends) when the install built them (Linux, CPython, a C compiler at install time)."
        " `0`: the pure-Python ones, which report the same and cost more per task and per step"
        " (see [Benchmarks](../benchmarks.md)). |",
    ]
    return "\n".join(rows) + "\n"


def events_markdown() -> str:
    common = [f.name for f in dataclasses.fields(Event)]
    rows = [
        "# Events reference",
        "",
        "<!-- Generated by `python -m loopwatch._docs` from loopwatch/_events.py: do not edit. -->",
        "",
        "Each finding is one event. With `LOOPWATCH_LOG=json` it is one JSON object per line, the",
        "name under `event` and then the fields below, in this order; with structlog the name is",
        "the event and the fields are key/values; with `logging` the logger is `loopwatch` and the",
        "message starts with the name. In code (`watch()`, the pytest fixture, an exporter), an",
        "event is a frozen object with the attribute `event` and one attribute per field; its",
        "`as_dict()` gives the JSON form.",
        "",
        "Every event also has:",
        "",
        *(f"- `{name}`: {FIELD_DOCS[name]}." for name in common),
        "",
        "A line that stands for several events of one name at one place (flood folding, see",
        "`LOOPWATCH_LOG_FOLD_MS`) is the last of them with two more fields: `folded`, how many",
        "events it stands for, and `tasks`, the names of the tasks they concern (at most ten).",
    ]
    for cls in EVENT_TYPES:
        doc = " ".join((cls.__doc__ or "").split()).replace("``", "`")
        rows += [
            "",
            f"## `{cls.event}`",
            "",
            f"{doc} Class `loopwatch.{cls.__name__}`.",
            "",
            "| field | type | meaning |",
            "| --- | --- | --- |",
        ]
        for f in dataclasses.fields(cls):
            if f.name in common:
                continue
            kind = _TYPES[str(f.type)]
            rows.append(f"| `{f.name}` | {kind} | {field_doc(cls.event, f.name)} |")
    return "\n".join(rows) + "\n"


def main() -> int:
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("docs")
    for name, render in (
        ("configuration.md", configuration_markdown),
        ("events.md", events_markdown),
    ):
        target = root / "reference" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(render())
        print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
