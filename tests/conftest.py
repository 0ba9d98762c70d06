"""Shared fixtures: every loop test runs on stock asyncio and uvloop and leaves nothing behind."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import loopwatch
from loopwatch import _api, _runtime, _threads
from loopwatch._events import Event, SlowCallback
from loopwatch._loops import Loops

LOOP_FACTORIES: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": loopwatch.new_event_loop,
    "uvloop": loopwatch.new_uvloop_event_loop,
}


@pytest.fixture(params=sorted(LOOP_FACTORIES))
def kind(request: pytest.FixtureRequest) -> str:
    """The loop under test: ``asyncio`` or ``uvloop``."""
    return str(request.param)


@pytest.fixture
def factory(kind: str) -> Callable[[], asyncio.AbstractEventLoop]:
    return LOOP_FACTORIES[kind]


class Recorder(list[Event]):
    """Events as the dispatcher hands them out, with the monotonic time each one arrived."""

    def __init__(self) -> None:
        super().__init__()
        self.arrived: list[float] = []

    def __call__(self, event: Event) -> None:
        self.arrived.append(time.monotonic())
        self.append(event)

    def named(self, name: str) -> list[Event]:
        return [e for e in self if e.event == name]

    def wait_for(self, count: int, name: str | None = None, timeout: float = 3.0) -> list[Event]:
        """Wait until ``count`` events (of ``name``) arrived, then a little more for strays."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.named(name) if name else self) >= count:
                break
            time.sleep(0.01)
        time.sleep(0.15)
        return self.named(name) if name else list(self)


def registry() -> Loops:
    """The active runtime's registry of watched loops (loopwatch must be on)."""
    runtime = _runtime.current()
    assert runtime is not None, "loopwatch is not active"
    return runtime.loops


@pytest.fixture
def events() -> Recorder:
    """Activate loopwatch quietly and record every event it dispatches."""
    recorder = Recorder()
    _api.activate(log="off").dispatcher.add_sink(recorder)
    return recorder


@pytest.fixture(autouse=True)
def _uninstall_after() -> Iterator[None]:
    yield
    loopwatch.uninstall()
    assert _runtime.current() is None  # one object holds all of loopwatch's state: it is gone
    assert [w.name for w in _threads._all if w.running] == []
    # loopwatch's threads are never in threading's list, even while they call the program's code
    # (a log handler): no name of theirs, and no dummy entry left behind.
    assert [
        t.name for t in threading.enumerate() if t.name.startswith(("loopwatch", "Dummy"))
    ] == []


def run_on(factory: Callable[[], asyncio.AbstractEventLoop], coro: Any) -> Any:
    """``asyncio.run(coro, loop_factory=factory)``, which Python 3.11 spells with a Runner."""
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coro)


# One slow_callback with fixed fields, for exporter tests that check exact output.
EVENT = SlowCallback(
    duration_s=0.25,
    threshold_s=0.1,
    task="Task-7",
    coroutine="handler",
    location="/srv/app.py:12 in handler",
    stack=("/srv/app.py:30 in main", "/srv/app.py:12 in handler"),
    loop="uvloop",
    time=1700000000.0,
    pid=42,
)


def run_program(source: str) -> subprocess.CompletedProcess[str]:
    """``python -c source`` in a process of its own, with none of this run's LOOPWATCH_*."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOPWATCH")}
    return subprocess.run(
        [sys.executable, "-c", source], env=env, capture_output=True, text=True, timeout=60
    )


def line_of(path: str | Path, marker: str) -> int:
    """The line number of the one line in ``path`` that ends with ``# marker``."""
    lines = Path(path).read_text().splitlines()
    found = [i for i, line in enumerate(lines, 1) if line.rstrip().endswith(f"# {marker}")]
    assert len(found) == 1, f"marker {marker!r} found {len(found)} times"
    return found[0]


def place(path: str | Path, marker: str, function: str) -> str:
    return f"{path}:{line_of(path, marker)} in {function}"
