"""Faults in loopwatch itself never reach the host (issue 8.2).

Each fault runs in a real process, on stock asyncio and on uvloop, twice: without loopwatch and
with ``LOOPWATCH=1``. The host's standard output and exit code must be the same; standard error
may differ by exactly the lines given (one line saying what loopwatch disabled, or none); nothing
hangs (every process has a timeout).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

RUN = {"asyncio": "asyncio.run(main())", "uvloop": "import uvloop; uvloop.run(main())"}
FAULTS: list[str] = []  # names of the faults injected, for the report


def env_with(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOPWATCH")}
    env.update(extra)
    return env


def run(
    tmp_path: Path, source: str, kind: str, timeout: float = 30, **env: str
) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "host.py"
    path.write_text(textwrap.dedent(source).replace("{run}", RUN[kind]))
    return subprocess.run(
        [sys.executable, str(path)],
        env=env_with(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def same_host(
    tmp_path: Path, name: str, source: str, kind: str, extra_err: list[str], **env: str
) -> tuple[subprocess.CompletedProcess[str], subprocess.CompletedProcess[str]]:
    """Run ``source`` without and with loopwatch; the same stdout and exit code, and the watched
    stderr is the plain one plus exactly ``extra_err`` (lines starting with a given prefix
    when an entry ends with ``...``)."""
    FAULTS.append(f"{name}/{kind}")
    plain = run(tmp_path, source, kind)
    assert "Traceback" not in plain.stderr, plain.stderr
    watched = run(tmp_path, source, kind, LOOPWATCH="1", **env)
    assert (watched.stdout, watched.returncode) == (plain.stdout, plain.returncode), watched.stderr
    extra = [line for line in watched.stderr.splitlines() if line.startswith("loopwatch")]
    others = [line for line in watched.stderr.splitlines() if not line.startswith("loopwatch")]
    assert others == plain.stderr.splitlines(), watched.stderr
    assert len(extra) == len(extra_err), watched.stderr
    for line, want in zip(extra, extra_err, strict=True):
        if want.endswith("..."):
            assert line.startswith(want[:-3]), line
        else:
            assert line == want
    return plain, watched


def events_in(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


BLOCKS = """
import asyncio, sys, time

async def main():
    for i in range(3):
        await asyncio.sleep(0.01)
        time.sleep(0.15)
        print("step", i, flush=True)

{run}
print("done")
sys.exit(3)
"""


@pytest.fixture(params=sorted(RUN))
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_an_exporter_that_raises(tmp_path: Path, kind: str) -> None:
    """A logging filter of the program that raises breaks the logging exporter: one line."""
    source = (
        "import logging\n"
        "class Bad(logging.Filter):\n"
        "    def filter(self, record):\n"
        "        raise RuntimeError('filter broke')\n"
        "logging.getLogger('loopwatch').addFilter(Bad())\n" + textwrap.dedent(BLOCKS)
    )
    plain, _ = same_host(
        tmp_path,
        "exporter raises",
        source,
        kind,
        ["loopwatch: exporter logging failed (RuntimeError: filter broke); it is disabled"],
        LOOPWATCH_LOG="logging",
    )
    assert (plain.stdout, plain.returncode) == ("step 0\nstep 1\nstep 2\ndone\n", 3)


def test_structlog_misconfigured(tmp_path: Path, kind: str) -> None:
    """A structlog configuration whose processor raises: loopwatch's log is off, one line."""
    source = (
        "import structlog\n"
        "def broken(logger, name, event_dict):\n"
        "    raise ValueError('bad processor')\n"
        "structlog.configure(processors=[broken])\n" + textwrap.dedent(BLOCKS)
    )
    same_host(
        tmp_path,
        "structlog misconfigured",
        source,
        kind,
        ["loopwatch: exporter auto failed (ValueError: bad processor); it is disabled"],
    )


def test_metrics_port_taken(tmp_path: Path, kind: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        same_host(
            tmp_path,
            "metrics port taken",
            BLOCKS,
            kind,
            [
                f"loopwatch: LOOPWATCH_METRICS_PORT={port} is not accepted: the port is in use "
                "on 127.0.0.1; expected a free port; the metrics endpoint is off"
            ],
            LOOPWATCH_METRICS_PORT=str(port),
            LOOPWATCH_LOG="off",
        )


def test_registry_already_has_the_names(tmp_path: Path, kind: str) -> None:
    """The program registered loopwatch's names first: loopwatch does not register, one line."""
    source = (
        "import prometheus_client\n"
        "mine = prometheus_client.Counter('loopwatch_slow_callbacks', 'the program own')\n"
        "mine.inc()\n" + textwrap.dedent(BLOCKS)
    )
    source += (
        "print(prometheus_client.REGISTRY.get_sample_value('loopwatch_slow_callbacks_total'))\n"
    )
    source = source.replace('print("done")\nsys.exit(3)\n', "") + 'print("done")\nsys.exit(3)\n'
    _, watched = same_host(
        tmp_path,
        "registry has the names",
        source,
        kind,
        ["loopwatch: metrics not registered in the registry (Duplicated timeseries..."],
        LOOPWATCH_LOG="off",
    )
    assert watched.stdout.endswith("1.0\ndone\n")


WATCHDOG_DIES = """
import asyncio, sys, time
import loopwatch._watchdog as watchdog

def broken(fds, timeout):
    raise RuntimeError("injected")

watchdog._threads.wait_readable = broken  # the watchdog's wait

async def main():
    await asyncio.sleep(0.01)
    time.sleep(0.25)
    await asyncio.sleep(0.01)
    print("ran", flush=True)

{run}
{run}
print("done")
sys.exit(4)
"""


def watchdog_dies(tmp_path: Path, kind: str, runs: int) -> None:
    log = tmp_path / "events.jsonl"
    source = WATCHDOG_DIES.replace("{run}\n{run}\n", "{run}\n" * runs)
    same_host(
        tmp_path,
        f"watchdog thread dies ({runs} loop{'s' if runs > 1 else ''})",
        source,
        kind,
        ["loopwatch: the watchdog thread failed (RuntimeError: injected); block detection is off"],
        LOOPWATCH_LOG="json",
        LOOPWATCH_LOG_FILE=str(log),
    )
    # Blocks are no longer seen by the watchdog (a task step still times itself exactly).
    assert {e["event"] for e in events_in(log)} <= {"loopwatch.slow_callback"}


def test_following_a_run_that_fails(tmp_path: Path, kind: str) -> None:
    """Starting to follow a loop's run raises (an internal error of loopwatch's, injected): the
    program runs and exits as it would, that loop is no longer watched, one line; not Python's
    "Exception ignored" at every run."""
    source = (
        "import asyncio\n"
        "from loopwatch import _watchdog\n"
        "def broken(self, depth=2):\n"
        "    raise RuntimeError('run_started broke')\n"
        "_watchdog.LoopState.run_started = broken\n" + textwrap.dedent(BLOCKS)
    )
    plain, _ = same_host(
        tmp_path,
        "following a run fails",
        source,
        kind,
        [
            "loopwatch: watching a loop's run failed (RuntimeError: run_started broke); that "
            "loop is no longer watched"
        ],
    )
    assert (plain.stdout, plain.returncode) == ("step 0\nstep 1\nstep 2\ndone\n", 3)


def test_the_watchdog_thread_dying(tmp_path: Path, kind: str) -> None:
    watchdog_dies(tmp_path, kind, runs=1)


def test_the_watchdog_thread_dying_is_said_once_for_later_loops(tmp_path: Path, kind: str) -> None:
    watchdog_dies(tmp_path, kind, runs=2)


CLOSE_WHILE_SAMPLING = """
import asyncio, sys, threading, time
{imports}

def one(i):
    loop = new_loop()
    async def block():
        time.sleep(0.06 + (i % 3) * 0.01)  # around the threshold, so the watchdog is sampling
    loop.run_until_complete(block())
    loop.close()                       # closed at once: the watchdog may be mid-sample
    return i

results = []
threads = [threading.Thread(target=lambda i=i: results.append(one(i))) for i in range(6)]
for t in threads:
    t.start()
for i in range(6):
    one(i)
for t in threads:
    t.join()
print(sorted(results))
sys.exit(5)
"""


def test_loops_closed_while_the_watchdog_samples(tmp_path: Path, kind: str) -> None:
    imports = (
        "import uvloop; new_loop = uvloop.new_event_loop"
        if kind == "uvloop"
        else "new_loop = asyncio.new_event_loop"
    )
    log = tmp_path / "events.jsonl"
    source = CLOSE_WHILE_SAMPLING.replace("{imports}", imports)
    plain, _ = same_host(
        tmp_path,
        "loop closed while sampled",
        source,
        kind,
        [],
        LOOPWATCH_LOG="json",
        LOOPWATCH_LOG_FILE=str(log),
        LOOPWATCH_SLOW_CALLBACK_MS="50",
    )
    assert plain.stdout == "[0, 1, 2, 3, 4, 5]\n"
    found = events_in(log)
    assert found and {e["event"] for e in found} == {"loopwatch.slow_callback"}


SHUTDOWN_OPEN = """
import asyncio, sys, threading, time
{imports}

async def forever():
    await asyncio.sleep(3600)

loop = new_loop()
task = loop.create_task(forever())
loop.run_until_complete(asyncio.sleep(0.01))   # never closed, a task still pending

def in_thread():
    other = new_loop()
    async def blocked():
        await asyncio.sleep(0)
        time.sleep(10)                           # still blocked when the interpreter exits
    other.run_until_complete(blocked())

threading.Thread(target=in_thread, daemon=True).start()
time.sleep(0.3)
print("leaving")
sys.exit(6)
"""


def test_interpreter_shutdown_with_a_loop_open(tmp_path: Path, kind: str) -> None:
    imports = (
        "import uvloop; new_loop = uvloop.new_event_loop"
        if kind == "uvloop"
        else "new_loop = asyncio.new_event_loop"
    )
    log = tmp_path / "events.jsonl"
    plain, _ = same_host(
        tmp_path,
        "shutdown with a loop open",
        SHUTDOWN_OPEN.replace("{imports}", imports),
        kind,
        [],
        LOOPWATCH_LOG="json",
        LOOPWATCH_LOG_FILE=str(log),
    )
    assert (plain.stdout, plain.returncode) == ("leaving\n", 6)


FORK = """
import asyncio, os, sys, time
{imports}

async def warm():
    await asyncio.sleep(0.01)

async def work(n):
    await asyncio.sleep(0.01)
    time.sleep(0.15)
    return n * 2

run(warm())                      # the master imports and runs a loop first (--preload)
children = []
for n in range(2):
    pid = os.fork()
    if pid == 0:
        os.write(1, f"child {run(work(n))}\\n".encode())
        os._exit(10 + n)
    children.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))  # one at a time: output order
codes = sorted(children)
print("master", codes)
sys.exit(7)
"""


def fork_after_preload(tmp_path: Path, kind: str, **env: str) -> None:
    imports = "import uvloop; run = uvloop.run" if kind == "uvloop" else "run = asyncio.run"
    log = tmp_path / "events.jsonl"
    plain, _ = same_host(
        tmp_path,
        "fork after preload",
        FORK.replace("{imports}", imports),
        kind,
        [],
        LOOPWATCH_LOG="json",
        LOOPWATCH_LOG_FILE=str(log),
        **env,
    )
    assert plain.stdout.splitlines() == ["child 0", "child 2", "master [10, 11]"]
    found = events_in(log)
    assert [e["event"] for e in found] == ["loopwatch.slow_callback"] * 2
    assert len({e["pid"] for e in found}) == 2


def test_fork_after_preload(tmp_path: Path, kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Children watched on their own; the same output (Python's fork warning aside: below)."""
    monkeypatch.setenv("PYTHONWARNINGS", "ignore::DeprecationWarning")
    fork_after_preload(tmp_path, kind)


def test_fork_after_preload_adds_no_warning(tmp_path: Path, kind: str) -> None:
    fork_after_preload(tmp_path, kind)


KEYBOARD_INTERRUPT = """
import asyncio, os, signal, sys, threading, time

# (Python leaves SIGINT ignored when it starts with it ignored, as a shell's background job does.)
signal.signal(signal.SIGINT, signal.default_int_handler)

async def main():
    await asyncio.sleep(0.01)
    threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT)).start()
    time.sleep(0.6)                  # the interrupt arrives during this block
    await asyncio.sleep(5)
    print("not reached")

try:
    {run}
except KeyboardInterrupt:
    print("interrupted")
    sys.exit(130)
"""


def test_keyboard_interrupt_during_a_block(tmp_path: Path, kind: str) -> None:
    log = tmp_path / "events.jsonl"
    plain, _ = same_host(
        tmp_path,
        "KeyboardInterrupt in a block",
        KEYBOARD_INTERRUPT,
        kind,
        [],
        LOOPWATCH_LOG="json",
        LOOPWATCH_LOG_FILE=str(log),
    )
    assert (plain.stdout, plain.returncode) == ("interrupted\n", 130)
    assert [e["event"] for e in events_in(log)] == ["loopwatch.slow_callback"]


SIGNALS = """
import asyncio, os, signal, sys, time

got = []

async def main():
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGUSR1, got.append, "usr1")
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    signal.signal(signal.SIGUSR2, lambda *a: got.append("usr2"))
    await asyncio.sleep(0.01)
    os.kill(os.getpid(), signal.SIGUSR1)
    os.kill(os.getpid(), signal.SIGUSR2)
    time.sleep(0.15)                 # blocked while signals are pending
    os.kill(os.getpid(), signal.SIGTERM)
    await asyncio.wait_for(stop.wait(), 5)
    print(sorted(got))

{run}
sys.exit(8)
"""


def test_signals(tmp_path: Path, kind: str) -> None:
    log = tmp_path / "events.jsonl"
    plain, _ = same_host(
        tmp_path,
        "signals",
        SIGNALS,
        kind,
        [],
        LOOPWATCH_LOG="json",
        LOOPWATCH_LOG_FILE=str(log),
    )
    assert (plain.stdout, plain.returncode) == ("['usr1', 'usr2']\n", 8)


def test_report_the_faults(capsys: pytest.CaptureFixture[str]) -> None:
    """Runs last in this file: says how many faults were injected."""
    if not FAULTS:
        pytest.skip("no fault test ran")
    with capsys.disabled():
        print(f"\nfaults injected: {len(FAULTS)} ({', '.join(FAULTS)})")
