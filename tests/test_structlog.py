"""structlog and the log exporters: never configured by loopwatch, `auto`, JSON lines, folding."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from conftest import EVENT, Recorder, place, run_on
from prometheus_client import REGISTRY
from structlog.testing import LogCapture

import loopwatch
from loopwatch import _config, _runtime
from loopwatch._dispatch import Dispatcher
from loopwatch._events import Event, SlowCallback, TaskLeaked
from loopwatch.exporters import AutoExporter, from_settings
from loopwatch.exporters._fold import Fold, Folded
from loopwatch.exporters.logging import LoggingExporter
from loopwatch.exporters.structlog import JsonExporter, StructlogExporter

Factory = Callable[[], asyncio.AbstractEventLoop]
HERE = __file__

MESSAGE = (
    "loopwatch.slow_callback duration_s=0.250 location='/srv/app.py:12 in handler' "
    "task=Task-7 coroutine=handler threshold_s=0.100 loop=uvloop\n"
    "    /srv/app.py:30 in main\n"
    "    /srv/app.py:12 in handler"
)


@pytest.fixture(autouse=True)
def _structlog_as_shipped() -> Iterator[None]:
    """Every test starts and ends with structlog unconfigured, as a fresh program has it."""
    structlog.reset_defaults()
    yield
    structlog.reset_defaults()


def slow(location: str, duration: float = 0.25, task: str = "Task-1") -> SlowCallback:
    return SlowCallback(
        duration_s=duration,
        threshold_s=0.1,
        task=task,
        coroutine="handler",
        location=location,
        stack=(location,),
        loop="asyncio",
    )


async def blocks() -> None:
    await asyncio.sleep(0.01)
    time.sleep(0.15)  # BLOCK:structlog
    await asyncio.sleep(0.03)


def wait_for(check: Callable[[], Any], timeout: float = 3.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (result := check()) and time.monotonic() < deadline:
        time.sleep(0.01)
    return result


# -- auto, structlog, logging ----------------------------------------------------------------


def test_auto_without_structlog_configured_logs_through_logging(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Logger ``loopwatch``, the name first, the fields readable, the stack below."""
    assert not structlog.is_configured()
    with caplog.at_level(logging.WARNING, logger="loopwatch"):
        AutoExporter()(EVENT)
    assert [(r.name, r.levelno, r.getMessage()) for r in caplog.records] == [
        ("loopwatch", logging.WARNING, MESSAGE)
    ]


def test_auto_follows_the_structlog_configuration_of_the_program(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Once the program configured structlog (even after loopwatch started), events go there:
    the name as the event, the fields as key/values, nothing through ``logging``."""
    exporter = AutoExporter()
    capture = LogCapture()
    structlog.configure(processors=[capture])
    with caplog.at_level(logging.WARNING, logger="loopwatch"):
        exporter(EVENT)
    assert caplog.records == []
    assert capture.entries == [
        {
            "event": "loopwatch.slow_callback",
            "log_level": "warning",
            "time": 1700000000.0,
            "pid": 42,
            "duration_s": 0.25,
            "threshold_s": 0.1,
            "task": "Task-7",
            "coroutine": "handler",
            "location": "/srv/app.py:12 in handler",
            "stack": "    /srv/app.py:30 in main\n    /srv/app.py:12 in handler",
            "loop": "uvloop",
            "origin": "program",
        }
    ]


def test_console_renderer_shows_the_stack_on_the_lines_below() -> None:
    """With the program's ConsoleRenderer, a person reads one line, then the stack."""
    out = io.StringIO()
    structlog.configure(
        processors=[structlog.dev.ConsoleRenderer(colors=False)],
        logger_factory=structlog.PrintLoggerFactory(out),
    )
    StructlogExporter()(EVENT)
    first, *below = out.getvalue().splitlines()
    assert first.startswith("loopwatch.slow_callback ")
    assert "duration_s=0.25" in first
    assert "location=" in first and "/srv/app.py:12 in handler" in first  # quoted or not
    assert below == ["    /srv/app.py:30 in main", "    /srv/app.py:12 in handler"]


def test_log_structlog_forces_structlog_even_unconfigured(
    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """``LOOPWATCH_LOG=structlog``: structlog's own defaults (its console, on stdout)."""
    (exporter,) = from_settings(_config.Settings(log="structlog", log_fold_ms=0))
    assert isinstance(exporter, StructlogExporter)
    exporter(EVENT)
    out = capsys.readouterr().out
    assert "loopwatch.slow_callback" in out
    assert out.splitlines()[-2:] == ["    /srv/app.py:30 in main", "    /srv/app.py:12 in handler"]
    assert caplog.records == []
    assert not structlog.is_configured()


@pytest.mark.parametrize("mode", ["auto", "structlog", "json", "logging"])
def test_loopwatch_never_configures_structlog(
    mode: str, factory: Factory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Whatever the mode, on both loops: structlog's configuration is the program's alone."""
    before = structlog.get_config()
    loopwatch.install(log=mode, log_file=str(tmp_path / "x.jsonl"))
    run_on(factory, blocks())
    assert wait_for(lambda: _counts().get("loopwatch.slow_callback", 0) >= 1)
    loopwatch.uninstall()
    assert not structlog.is_configured()
    assert structlog.get_config() == before


def _counts() -> dict[str, int]:
    runtime = _runtime.current()
    return dict(runtime.dispatcher.counts) if runtime is not None else {}


def test_slow_callback_through_the_program_structlog(factory: Factory, kind: str) -> None:
    """A real block on each loop, as a structlog event of the program's configuration."""
    capture = LogCapture()
    structlog.configure(processors=[capture])
    loopwatch.install()  # LOOPWATCH_LOG=auto
    run_on(factory, blocks())
    (entry,) = wait_for(lambda: capture.entries)
    where = place(HERE, "BLOCK:structlog", "blocks")
    assert entry["event"] == "loopwatch.slow_callback"
    assert (entry["location"], entry["loop"], entry["coroutine"]) == (where, kind, "blocks")
    assert entry["stack"].splitlines()[-1] == f"    {where}"


def test_log_stack_full_shows_every_frame(
    factory: Factory, caplog: pytest.LogCaptureFixture
) -> None:
    """``own`` (the default) shows the program's frames only; ``full`` adds asyncio's."""
    messages = {}
    where = place(HERE, "BLOCK:structlog", "blocks")
    head = f"location='{where}'"
    for stack in ("own", "full"):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="loopwatch"):
            loopwatch.install(log="logging", log_stack=stack)
            run_on(factory, blocks())
            assert wait_for(lambda: any(head in r.getMessage() for r in caplog.records))
            loopwatch.uninstall()
        # Only the block: the garbage of earlier tests may be reported meanwhile (orphans).
        (message,) = [r.getMessage() for r in caplog.records if head in r.getMessage()]
        messages[stack] = message.splitlines()

    def libraries(lines: list[str]) -> list[str]:
        return [line for line in lines if "site-packages" in line or "/asyncio/" in line]

    assert messages["own"][-1] == messages["full"][-1] == f"    {where}"
    assert libraries(messages["own"]) == []
    assert libraries(messages["full"]) != []
    assert set(messages["own"][1:]) < set(messages["full"][1:])


# -- JSON lines --------------------------------------------------------------------------------


def test_json_lines_parse_whatever_the_program_configured(
    tmp_path: Path, factory: Factory, kind: str
) -> None:
    """The program's structlog processors never reach loopwatch's private logger."""

    def add_app(_: Any, __: str, event_dict: dict[str, Any]) -> dict[str, Any]:
        event_dict["app"] = "theirs"
        return event_dict

    structlog.configure(
        processors=[add_app, structlog.dev.ConsoleRenderer(colors=False)],
        wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL),
    )
    before = structlog.get_config()
    path = tmp_path / "events.jsonl"
    where = place(HERE, "BLOCK:structlog", "blocks")
    loopwatch.install(log="json", log_file=str(path), log_fold_ms=0)
    run_on(factory, blocks())
    run_on(factory, blocks())
    assert wait_for(lambda: path.exists() and path.read_text().count(where) >= 2)
    loopwatch.uninstall()
    lines = [json.loads(line) for line in path.read_text().splitlines()]  # every line parses
    assert all(next(iter(e)) == "event" and "app" not in e for e in lines)
    ours = [e for e in lines if e.get("location") == where]
    assert [(e["event"], e["loop"], type(e["stack"])) for e in ours] == [
        ("loopwatch.slow_callback", kind, list)
    ] * 2
    assert structlog.get_config() == before


def test_json_exporter_renders_every_field(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    exporter = JsonExporter(str(path))
    exporter(EVENT)
    exporter(Folded(last=EVENT, folded=12))
    exporter.close()
    first, folded = (json.loads(line) for line in path.read_text().splitlines())
    assert first == {
        "event": "loopwatch.slow_callback",
        "time": 1700000000.0,
        "pid": 42,
        "duration_s": 0.25,
        "threshold_s": 0.1,
        "task": "Task-7",
        "coroutine": "handler",
        "location": "/srv/app.py:12 in handler",
        "stack": ["/srv/app.py:30 in main", "/srv/app.py:12 in handler"],
        "loop": "uvloop",
        "origin": "program",
    }
    assert list(first)[-1] == "origin"
    assert list(folded)[:2] == ["event", "folded"]
    assert folded == {**first, "folded": 12}


# -- flood folding -----------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def lines_of(sent: list[Event]) -> list[tuple[str | None, int]]:
    return [(e.place, e.folded if isinstance(e, Folded) else 1) for e in sent]


def test_fold_passes_the_first_few_and_says_how_many_it_folded() -> None:
    """5000 events at A and 3 at B in one window: the first three of each place at once, one
    line for A's other 4997 when the window ends, naming the tasks; nothing is lost."""
    clock = Clock()
    sent: list[Event] = []
    fold = Fold(sent.append, 5.0, clock=clock)
    for i in range(5000):
        fold(slow("a.py:1 in a", duration=0.1 + i / 1e6, task=f"T{i % 12}"))
        if i < 3:
            fold(slow("b.py:2 in b"))
        clock.now += 0.0009
    assert lines_of(sent) == [("a.py:1 in a", 1), ("b.py:2 in b", 1)] * 3
    assert fold.due() == 105.0
    assert fold.flush(104.9) == []
    (folded,) = fold.flush(105.1)
    assert (folded.place, folded.folded) == ("a.py:1 in a", 4997)
    assert folded.duration_s == pytest.approx(0.1 + 4999 / 1e6)  # the last one, shown
    assert folded.tasks == tuple(f"T{i}" for i in (3, 4, 5, 6, 7, 8, 9, 10, 11, 0))  # ten
    assert folded.as_dict()["tasks"] == list(folded.tasks)
    # A flood that goes on: one line per window (folding from its first repeat); a place quiet
    # for a window starts afresh, its first events on their own again.
    clock.now = 106.0
    fold(slow("a.py:1 in a"))
    assert lines_of(fold.flush(110.2)) == [("a.py:1 in a", 1)]
    clock.now = 116.0
    fold(slow("a.py:1 in a"))
    assert lines_of(sent)[6:] == [("a.py:1 in a", 1)]
    assert fold.flush(130.0, everything=True) == []


def test_a_folded_line_reads_well(caplog: pytest.LogCaptureFixture) -> None:
    """``folded=N`` right after the place: this line stands for N events, the last shown."""
    with caplog.at_level(logging.WARNING, logger="loopwatch"):
        LoggingExporter()(Folded(last=EVENT, folded=4999, tasks=("Task-7", "Task-9")))
    (record,) = caplog.records
    assert record.getMessage() == (
        "loopwatch.slow_callback duration_s=0.250 location='/srv/app.py:12 in handler' "
        "folded=4999 tasks=Task-7,Task-9 task=Task-7 coroutine=handler threshold_s=0.100 "
        "loop=uvloop\n"
        "    /srv/app.py:30 in main\n"
        "    /srv/app.py:12 in handler"
    )
    leaked = TaskLeaked(task="T", coroutine="c", created_at="x.py:1 in f", age_s=2, awaiting=None)
    folded = Folded(last=leaked, folded=3)
    assert (folded.event, folded.place, folded.coroutine) == (
        "loopwatch.task_leaked",
        "x.py:1 in f",
        "c",
    )


def test_the_reporter_sends_the_folded_line_when_the_window_ends(events: Recorder) -> None:
    """No further event needed: the summary comes about one window after the flood began, from
    loopwatch's own thread, which the program never sees."""
    sent: list[Event] = []
    dispatcher = Dispatcher()
    fold = Fold(sent.append, 0.2)
    dispatcher.add_exporter(fold)
    dispatcher.start()
    started = time.monotonic()
    for _ in range(10):
        dispatcher.emit(slow("a.py:1 in a"))
    assert wait_for(lambda: len(sent) == 4)
    assert 0.15 < time.monotonic() - started < 2.0
    assert lines_of(sent) == [("a.py:1 in a", 1)] * 3 + [("a.py:1 in a", 7)]
    assert threading.active_count() == 1
    dispatcher.close()


def test_closing_sends_what_is_held_back() -> None:
    """uninstall() and exit close the dispatcher: what a fold held back is written then."""
    sent: list[Event] = []
    dispatcher = Dispatcher()
    dispatcher.add_exporter(Fold(sent.append, 60.0))
    dispatcher.start()
    for _ in range(8):
        dispatcher.emit(slow("a.py:1 in a"))
    dispatcher.close()
    assert lines_of(sent) == [("a.py:1 in a", 1)] * 3 + [("a.py:1 in a", 5)]
    assert not dispatcher.worker.running


def test_held_back_lines_are_written_at_exit(tmp_path: Path, kind: str) -> None:
    """Eight blocks at one place, then the program exits at once: the JSON log accounts for all
    eight (three lines, then one folded line standing for five)."""
    path = tmp_path / "events.jsonl"
    app = tmp_path / "app.py"
    app.write_text(
        "import asyncio, time, uvloop\n"
        "async def main():\n"
        "    for _ in range(8):\n"
        "        time.sleep(0.12)  # BLOCK:exit\n"
        "        await asyncio.sleep(0)\n"
        f"{'uvloop' if kind == 'uvloop' else 'asyncio'}.run(main())\n"
    )
    done = subprocess.run(
        [sys.executable, str(app)],
        env={
            **os.environ,
            "LOOPWATCH": "1",
            "LOOPWATCH_LOG": "json",
            "LOOPWATCH_LOG_FILE": str(path),
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    where = place(app, "BLOCK:exit", "main")
    assert [(e["location"], e.get("folded", 1)) for e in lines] == [(where, 1)] * 3 + [(where, 5)]


def test_a_failing_log_exporter_under_a_fold_is_said_once(
    capfd: pytest.CaptureFixture[str],
) -> None:
    calls = []

    def broken(event: Event) -> None:
        calls.append(event)
        raise OSError("disk full")

    broken.name = "json"  # type: ignore[attr-defined]
    dispatcher = Dispatcher()
    dispatcher.add_exporter(Fold(broken, 0.05))
    dispatcher.start()
    for _ in range(5):
        dispatcher.emit(slow("a.py:1 in a"))
    time.sleep(0.2)
    dispatcher.emit(slow("b.py:1 in b"))
    assert dispatcher.wait_idle()
    dispatcher.close()
    assert len(calls) == 1
    assert dispatcher.counts["loopwatch.slow_callback"] == 6
    assert capfd.readouterr().err == (
        "loopwatch: exporter json failed (OSError: disk full); it is disabled\n"
    )


def test_settings_choose_the_exporter_and_the_fold() -> None:
    (default,) = from_settings(_config.Settings())
    assert isinstance(default, Fold) and isinstance(default.inner, AutoExporter)
    assert default.window_s == 5.0
    (unfolded,) = from_settings(_config.Settings(log="logging", log_fold_ms=0))
    assert isinstance(unfolded, LoggingExporter)
    assert from_settings(_config.Settings(log="off")) == []
    errors: list[str] = []
    settings = _config.from_environ(
        {"LOOPWATCH_LOG_STACK": "most", "LOOPWATCH_LOG_FOLD_MS": "-1"}, on_error=errors.append
    )
    assert (settings.log_stack, settings.log_fold_ms) == ("own", 5000.0)
    assert errors == [
        "loopwatch: LOOPWATCH_LOG_STACK='most' is not accepted; expected one of own, full; "
        "using the default ('own')",
        "loopwatch: LOOPWATCH_LOG_FOLD_MS='-1' is not accepted; expected a number of "
        "milliseconds, 0 or more; using the default (5000.0)",
    ]


async def flood() -> None:
    await asyncio.sleep(0.01)
    for _ in range(60):
        time.sleep(0.008)  # BLOCK:flood
        await asyncio.sleep(0)
    await asyncio.sleep(0.02)


def test_a_real_flood_is_folded_and_counted_exactly(
    factory: Factory, kind: str, tmp_path: Path
) -> None:
    """Dozens of slow steps from one line, on each loop: two JSON lines for that place (the
    first, then one with ``folded``), while the metric counts every event."""
    path = tmp_path / "events.jsonl"
    loopwatch.install(log="json", log_file=str(path), slow_callback_ms=3, log_fold_ms=60_000)
    run_on(factory, flood())
    time.sleep(0.2)
    counted = _counts()["loopwatch.slow_callback"]
    assert REGISTRY.get_sample_value("loopwatch_slow_callbacks_total") == counted
    loopwatch.uninstall()  # sends what the fold held back
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    slow_lines = [e for e in lines if e["event"] == "loopwatch.slow_callback"]
    assert sum(e.get("folded", 1) for e in slow_lines) == counted
    where = place(HERE, "BLOCK:flood", "flood")
    here = [e.get("folded", 1) for e in slow_lines if e["location"] == where]
    assert len(here) == 4 and here[:3] == [1, 1, 1]
    assert here[3] >= 20, f"only {counted} slow steps seen"
    assert len(slow_lines) < counted / 5
