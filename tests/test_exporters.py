"""Exporters: JSON lines, stdlib logging, and a failing exporter that is disabled once."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import EVENT, Recorder, place, run_on

import loopwatch
from loopwatch import _api
from loopwatch._events import Event
from loopwatch.exporters.jsonlines import JsonLines
from loopwatch.exporters.logging import LoggingExporter

HERE = __file__


def test_json_lines_appends_one_object_per_event(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text('{"earlier": "line"}\n')
    exporter = JsonLines(str(path))
    exporter(EVENT)
    exporter(EVENT)
    exporter.close()
    lines = path.read_text().splitlines()
    assert lines[0] == '{"earlier": "line"}'
    assert [json.loads(line) for line in lines[1:]] == [
        {
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
    ] * 2


def test_logging_message_starts_with_the_name_and_reads_well(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="loopwatch"):
        LoggingExporter()(EVENT)
    (record,) = caplog.records
    assert record.name == "loopwatch"
    assert record.levelno == logging.WARNING
    assert record.getMessage() == (
        "loopwatch.slow_callback duration_s=0.250 location='/srv/app.py:12 in handler' "
        "task=Task-7 coroutine=handler threshold_s=0.100 loop=uvloop\n"
        "    /srv/app.py:30 in main\n"
        "    /srv/app.py:12 in handler"
    )
    assert record.loopwatch["location"] == "/srv/app.py:12 in handler"  # type: ignore[attr-defined]


async def blocks() -> None:
    await asyncio.sleep(0.01)
    time.sleep(0.15)  # BLOCK:exporters
    await asyncio.sleep(0.03)


def test_a_failing_exporter_is_disabled_and_said_once(
    factory: Callable[[], asyncio.AbstractEventLoop],
    events: Recorder,
    capfd: pytest.CaptureFixture[str],
) -> None:
    """The program runs on, the other exporters keep their events, one line says what happened."""
    calls: list[Event] = []

    def broken(event: Event) -> None:
        calls.append(event)
        raise RuntimeError("disk full")

    broken.name = "broken"  # type: ignore[attr-defined]
    _api.activate().dispatcher.add_exporter(broken)
    assert run_on(factory, blocks()) is None
    assert run_on(factory, blocks()) is None
    assert len(events.wait_for(2)) == 2
    assert len(calls) == 1
    err = capfd.readouterr().err
    assert err == "loopwatch: exporter broken failed (RuntimeError: disk full); it is disabled\n"


def test_log_json_through_install_writes_the_file(
    tmp_path: Path, factory: Callable[[], asyncio.AbstractEventLoop], kind: str
) -> None:
    path = tmp_path / "out.jsonl"
    loopwatch.install(log="json", log_file=str(path))
    run_on(factory, blocks())
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline and not path.exists():
        time.sleep(0.02)
    loopwatch.uninstall()
    (line,) = path.read_text().splitlines()
    data = json.loads(line)
    assert data["location"] == place(HERE, "BLOCK:exporters", "blocks")
    assert data["loop"] == kind


def test_a_log_file_that_cannot_be_written_is_said_at_start(tmp_path: Path) -> None:
    """LOOPWATCH_LOG_FILE in a missing directory: one line when loopwatch starts (before any
    finding), and the findings go to standard error instead of being lost; the program's own
    output and exit code are unchanged."""
    import os
    import subprocess
    import sys

    path = tmp_path / "missing" / "events.jsonl"
    program = (
        "import asyncio, sys, time\n"
        "async def main():\n"
        "    await asyncio.sleep(0.2)\n"
        "    print('before the block', flush=True)\n"
        "    time.sleep(0.15)  # BLOCK\n"
        "asyncio.run(main())\n"
        "sys.exit(3)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOPWATCH")}
    env.update(LOOPWATCH="1", LOOPWATCH_LOG="json", LOOPWATCH_LOG_FILE=str(path))
    proc = subprocess.run(
        [sys.executable, "-c", program], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 3 and proc.stdout == "before the block\n"
    lines = proc.stderr.splitlines()
    assert lines[0] == (
        f"loopwatch: LOOPWATCH_LOG_FILE={path} cannot be written (FileNotFoundError: No such file "
        "or directory); expected a file this process can append to; findings go to standard "
        "error instead"
    )
    events = [json.loads(line) for line in lines[1:]]
    assert [(e["event"], e["location"]) for e in events] == [
        ("loopwatch.slow_callback", "<string>:5 in main")
    ]
    assert not path.parent.exists()
