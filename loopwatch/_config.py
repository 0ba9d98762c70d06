"""The one settings object, and the only place that reads the environment.

Why one place: loopwatch is switched on from the environment of a process it did not write
(``LOOPWATCH=1``), so every variable it honours must be listed, validated and documented together.
``docs/reference/configuration.md`` is generated from ``SPECS`` below, so the two cannot drift.
Nothing outside ``LOOPWATCH*`` is ever read.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

PREFIX: Final = "LOOPWATCH"
LOG_MODES: Final = ("auto", "structlog", "logging", "json", "off")
LOG_STACKS: Final = ("own", "full")
_TRUE: Final = frozenset({"1", "true", "yes", "on"})
_FALSE: Final = frozenset({"", "0", "false", "no", "off"})


class SettingError(ValueError):
    """A setting has a value loopwatch cannot use; the message names it and what is accepted."""


@dataclass(frozen=True, slots=True)
class Settings:
    """Every knob loopwatch has. Environment: ``LOOPWATCH_<NAME>``; keyword: ``<name>``."""

    slow_callback_ms: float = 100.0
    stall_ms: float = 2000.0
    metrics_port: int | None = None
    metrics_addr: str = "127.0.0.1"
    log: str = "auto"
    log_file: str | None = None
    creation_stack: int = 1
    log_stack: str = "own"
    log_fold_ms: float = 5000.0
    tasks: bool = True
    exception_messages: bool = True
    step_timing: bool = True
    summary: bool = False
    routes: bool = True
    otel: bool = False
    coroutine_labels: int = 50
    cancel_grace_ms: float = 5000.0
    task_stuck_ms: float | None = None
    deadlock_check_ms: float = 1000.0

    @property
    def slow_callback_s(self) -> float:
        return self.slow_callback_ms / 1000.0

    @property
    def stall_s(self) -> float:
        return self.stall_ms / 1000.0

    @property
    def cancel_grace_s(self) -> float:
        return self.cancel_grace_ms / 1000.0

    def replace(self, **overrides: Any) -> Settings:
        """Return a copy with keyword overrides, each validated as the environment would be.

        Raises ``TypeError`` for an unknown name and ``SettingError`` for a bad value: in code, a
        mistake is the caller's to see at once (the environment path only reports and goes on).
        """
        if not overrides:
            return self
        values: dict[str, Any] = {}
        for name, value in overrides.items():
            spec = SPECS.get(name)
            if spec is None:
                known = ", ".join(sorted(SPECS))
                raise TypeError(f"loopwatch: unknown setting {name!r}; known settings: {known}")
            values[name] = spec.coerce(value, name)
        return dataclasses.replace(self, **values)


@dataclass(frozen=True, slots=True)
class Spec:
    """How one setting is parsed and documented."""

    name: str
    parse: Callable[[str], Any]
    accepted: str
    doc: str

    @property
    def env(self) -> str:
        return f"{PREFIX}_{self.name.upper()}"

    def coerce(self, value: Any, label: str) -> Any:
        if value is None and SPECS_OPTIONAL.get(self.name, False):
            return None
        text = value if isinstance(value, str) else repr(value)
        if isinstance(value, bool):
            value = "1" if value else "0"
        elif not isinstance(value, str):
            # Keyword arguments may be numbers already; run them through the same rules.
            value = str(value)
        try:
            return self.parse(value)
        except (ValueError, TypeError):
            raise SettingError(
                f"loopwatch: {label}={text!r} is not accepted; expected {self.accepted}"
            ) from None


def _positive_ms(text: str) -> float:
    value = float(text.strip())
    if not value > 0 or value != value or value == float("inf"):
        raise ValueError(text)
    return value


def _optional_ms(text: str) -> float | None:
    return None if text.strip() == "" else _positive_ms(text)


def _port(text: str) -> int | None:
    text = text.strip()
    if text == "":
        return None
    port = int(text, 10)
    if not 0 <= port <= 65535:
        raise ValueError(text)
    return port


def _addr(text: str) -> str:
    text = text.strip()
    if not text or any(c.isspace() for c in text):
        raise ValueError(text)
    return text


def _log_mode(text: str) -> str:
    mode = text.strip().lower()
    if mode not in LOG_MODES:
        raise ValueError(text)
    return mode


def _nonnegative_ms(text: str) -> float:
    value = float(text.strip())
    if not value >= 0 or value == float("inf"):
        raise ValueError(text)
    return value


def _log_stack(text: str) -> str:
    word = text.strip().lower()
    if word not in LOG_STACKS:
        raise ValueError(text)
    return word


def _depth(text: str) -> int:
    depth = int(text.strip(), 10)
    if not 1 <= depth <= 64:
        raise ValueError(text)
    return depth


def _bool(text: str) -> bool:
    word = text.strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE - {""}:
        return False
    raise ValueError(text)


def _labels(text: str) -> int:
    cap = int(text.strip(), 10)
    if not 1 <= cap <= 10000:
        raise ValueError(text)
    return cap


def _path(text: str) -> str | None:
    return text if text.strip() else None


SPECS: Final[dict[str, Spec]] = {
    s.name: s
    for s in (
        Spec(
            "slow_callback_ms",
            _positive_ms,
            "a number of milliseconds above 0",
            "A callback or task step that holds the loop this long is reported "
            "(`loopwatch.slow_callback`).",
        ),
        Spec(
            "stall_ms",
            _positive_ms,
            "a number of milliseconds above 0",
            "A loop still blocked this long is reported while it is still blocked "
            "(`loopwatch.loop_stalled`).",
        ),
        Spec(
            "metrics_port",
            _port,
            "a port number from 0 to 65535 (0 picks a free port)",
            "Serve Prometheus metrics at `http://ADDR:PORT/metrics`. Unset: no endpoint.",
        ),
        Spec(
            "metrics_addr",
            _addr,
            "an address to bind, such as 127.0.0.1 or 0.0.0.0",
            "Address of the metrics endpoint. Keep the default unless the endpoint must be "
            "reached from another host.",
        ),
        Spec(
            "log",
            _log_mode,
            "one of " + ", ".join(LOG_MODES),
            "Where events go: `auto` (structlog if the program configured it, else stdlib "
            "logging), `structlog`, `logging`, `json` (JSON lines), `off`.",
        ),
        Spec(
            "log_file",
            _path,
            "a file path",
            "With `json`: append the JSON lines to this file instead of standard error.",
        ),
        Spec(
            "creation_stack",
            _depth,
            "a whole number of frames from 1 to 64",
            "How many frames of the place that created a task are kept (`created_at` is the "
            "first; more go to `created_stack`). Above 1 it also turns on coroutine origin "
            "tracking, so never-awaited coroutines are placed where they were created. Each "
            "frame costs about 200 ns per task created.",
        ),
        Spec(
            "tasks",
            _bool,
            "1 or 0 (also true/false, yes/no, on/off)",
            "Follow tasks: creation sites, leaks, orphans, lost exceptions, counts and coroutine "
            "timing. Off: the watchdog (blocks, stalls) and loop lag only, with no task factory.",
        ),
        Spec(
            "exception_messages",
            _bool,
            "1 or 0 (also true/false, yes/no, on/off)",
            "Whether `loopwatch.task_exception_unretrieved` carries the exception's message "
            "(`ValueError: bad input`) or only its type (`ValueError`), for messages that may "
            "hold data.",
        ),
        Spec(
            "step_timing",
            _bool,
            "1 or 0 (also true/false, yes/no, on/off)",
            "Time each task step, for busy time per coroutine and exact durations of slow task "
            "steps. Off: wall time and counts stay, and no clock is read per step (the compiled "
            "hot paths keep a proxy that only forwards each step and sees the task end; the "
            "pure-Python ones leave the coroutine unwrapped and add a done callback).",
        ),
        Spec(
            "summary",
            _bool,
            "1 or 0 (also true/false, yes/no, on/off)",
            "At exit, print to standard error a table of the coroutines that held the loop "
            "longest (busy time), with counts, steps and wall time.",
        ),
        Spec(
            "routes",
            _bool,
            "1 or 0 (also true/false, yes/no, on/off)",
            "With `LOOPWATCH=1` (or `install()` outside a loop), label each request's task of a "
            "Starlette/FastAPI or aiohttp service by its route template: findings carry `route`, "
            "and `loopwatch_request_busy_seconds{route}` counts each request's busy time. (Off, "
            "aiohttp's request tasks are still tracked where no task factory sees them.)",
        ),
        Spec(
            "otel",
            _bool,
            "1 or 0 (also true/false, yes/no, on/off)",
            "Publish through OpenTelemetry (the `otel` extra): metrics through the program's "
            "MeterProvider, or by OTLP/HTTP from the standard `OTEL_EXPORTER_OTLP_*` variables "
            "if it set none; each finding as a log record (the program's LoggerProvider, or "
            "OTLP), and as an event on the span current in its task.",
        ),
        Spec(
            "coroutine_labels",
            _labels,
            "a whole number from 1 to 10000",
            "How many coroutine names get their own row and `coroutine` label; the rest are "
            "counted under `other`.",
        ),
        Spec(
            "log_stack",
            _log_stack,
            "one of " + ", ".join(LOG_STACKS),
            "Which frames of a block's stack a log line shows below it: `own` (the program's "
            "own code, not the standard library or site-packages) or `full`. JSON lines always "
            "carry the whole stack.",
        ),
        Spec(
            "log_fold_ms",
            _nonnegative_ms,
            "a number of milliseconds, 0 or more",
            "Repeats of an event at the same place within this time are folded into one line "
            "saying how many (`folded`), so a flood does not flood the log; metrics still count "
            "every event. 0 logs every event.",
        ),
        Spec(
            "cancel_grace_ms",
            _positive_ms,
            "a number of milliseconds above 0",
            "A task still pending this long after its cancellation arrived is reported while it "
            "still is (`loopwatch.cancel_ignored`): the cancellation was caught and ignored, and "
            "whoever waits for the task (a shutdown, `asyncio.run`) waits for ever.",
        ),
        Spec(
            "task_stuck_ms",
            _optional_ms,
            "a number of milliseconds above 0 (empty: off)",
            "A task suspended at the same `await` this long is reported "
            "(`loopwatch.task_stuck`), once per task and place. Unset: off. For services whose "
            "requests must finish in a known time.",
        ),
        Spec(
            "deadlock_check_ms",
            _positive_ms,
            "a number of milliseconds above 0",
            "How often each loop's tasks are searched, from the watchdog's thread, for a cycle of "
            "tasks waiting on each other (`loopwatch.deadlock`).",
        ),
    )
}
SPECS_OPTIONAL: Final = {"metrics_port": True, "log_file": True, "task_stuck_ms": True}
_ENV_NAMES: Final = frozenset(spec.env for spec in SPECS.values())


def enabled(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether ``LOOPWATCH`` asks for zero-code activation. Unknown words say so and stay off."""
    raw = environ.get(PREFIX, "")
    word = raw.strip().lower()
    if word in _TRUE:
        return True
    if word not in _FALSE:
        report(
            f"loopwatch: {PREFIX}={raw!r} is not accepted; "
            "expected 1 to turn it on or 0 to keep it off; loopwatch stays off"
        )
    return False


# LOOPWATCH_* names that are not settings but are read by loopwatch's own tools: the compiled
# module switch, the build hook's, and the test script's choice of Pythons and of workers.
OTHER_NAMES: Final = frozenset(
    {"LOOPWATCH_ACCEL", "LOOPWATCH_BUILD_ACCEL", "LOOPWATCH_PYTHONS", "LOOPWATCH_TEST_JOBS"}
)


def from_environ(
    environ: Mapping[str, str] = os.environ,
    *,
    on_error: Callable[[str], None] | None = None,
) -> Settings:
    """Read every ``LOOPWATCH_*`` variable. A bad value is reported once and its default kept; a
    name that is no setting is reported with the closest one (a typo is not a silent default)."""
    say = on_error or report
    values: dict[str, Any] = {}
    for spec in SPECS.values():
        raw = environ.get(spec.env)
        if raw is None:
            continue
        try:
            values[spec.name] = spec.coerce(raw, spec.env)
        except SettingError as exc:
            if spec.name == "metrics_port":
                say(f"{exc}; no metrics endpoint")
            else:
                default = getattr(Settings(), spec.name)
                say(f"{exc}; using the default ({default!r})")
    for name in sorted(environ):
        if name.startswith(PREFIX + "_") and name not in _ENV_NAMES and name not in OTHER_NAMES:
            say(unknown_name(name))
    return Settings(**values)


def unknown_name(name: str) -> str:
    """The line for a ``LOOPWATCH_*`` variable that is no setting: with the closest known name."""
    import difflib  # (deferred: start-up cost; needed only for a misspelled name)

    close = difflib.get_close_matches(name, sorted(_ENV_NAMES | OTHER_NAMES), n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]}?)" if close else " (`loopwatch run --help` lists them)"
    return f"loopwatch: {name} is not a setting of loopwatch{hint}; it is ignored"


_environ_cache: tuple[tuple[tuple[str, str], ...], Settings] | None = None


def environ_settings() -> Settings:
    """``from_environ()`` for this process, read once: a bad value is reported once, not per loop.

    Read again only if the ``LOOPWATCH_*`` variables changed since (tests change them).
    """
    global _environ_cache
    # Only LOOPWATCH* values are read: os.environ.items() would read every variable's value.
    key = tuple(sorted((k, os.environ[k]) for k in os.environ if k.startswith(PREFIX + "_")))
    cached = _environ_cache
    if cached is not None and cached[0] == key:
        return cached[1]
    settings = from_environ()
    _environ_cache = (key, settings)
    return settings


ACCEL_ENV: Final = f"{PREFIX}_ACCEL"


def accel_wanted() -> bool:
    """``LOOPWATCH_ACCEL``: use the compiled hot paths when they are installed (default yes).

    Read once, when loopwatch's timing module is first imported: the choice is the process's,
    not a per-``install()`` setting. A bad value is reported and the default kept.
    """
    text = os.environ.get(ACCEL_ENV)
    if text is None or not text.strip():
        return True
    try:
        return _bool(text)
    except ValueError:
        report(
            f"loopwatch: {ACCEL_ENV}={text!r} is not 1 or 0 (also true/false, yes/no, on/off); "
            "using the compiled hot paths"
        )
        return True


def report(line: str) -> None:
    """One line on standard error: how loopwatch tells a person that it changed course."""
    try:
        sys.stderr.write(line.rstrip("\n") + "\n")
        sys.stderr.flush()
    except Exception:  # noqa: BLE001 - a closed or broken stderr is not the host's problem
        pass


def env_for(settings: Mapping[str, Any]) -> dict[str, str]:
    """The environment variables that carry these keyword settings (for ``loopwatch run``)."""
    out: dict[str, str] = {}
    for name, value in settings.items():
        if value is None:
            continue
        out[SPECS[name].env] = str(value)
    return out


def otel_export_interval(environ: Mapping[str, str] = os.environ) -> float:
    """``OTEL_METRIC_EXPORT_INTERVAL`` in seconds, as OpenTelemetry's SDK reads it (milliseconds,
    60000 by default): how often ``LOOPWATCH_OTEL=1`` exports its metrics by OTLP itself."""
    raw = environ.get("OTEL_METRIC_EXPORT_INTERVAL", "").strip()
    if not raw:
        return 60.0
    try:
        value = float(raw) / 1000.0
    except ValueError:
        value = -1.0
    if not value > 0 or value != value or value == float("inf"):
        report(
            f"loopwatch: OTEL_METRIC_EXPORT_INTERVAL={raw!r} is not a positive number of "
            "milliseconds; using 60000"
        )
        return 60.0
    return value
