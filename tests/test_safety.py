"""What loopwatch exposes, and what it never does (issue 8.5; docs/security.md).

- The metrics endpoint binds to 127.0.0.1 unless told otherwise.
- Events carry places (file, line, function), never local variables, arguments or exception
  values beyond the exception's message.
- Nothing is read from the environment beyond ``LOOPWATCH*``.
- ``LOOPWATCH_LOG_FILE`` is opened for appending: what is there stays, and a file truncated
  under it (logrotate's copytruncate) is written at its new end, with no hole.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import re
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Recorder, run_on

import loopwatch
from loopwatch import _api, _runtime
from loopwatch._config import Settings
from loopwatch._events import SlowCallback
from loopwatch.exporters.structlog import JsonExporter

PACKAGE = Path(loopwatch.__file__).parent
Factory = Callable[[], asyncio.AbstractEventLoop]
SECRET = "hunter2-s3cr3t-t0ken"


# -- the metrics endpoint ---------------------------------------------------------------------


def bound_address() -> tuple[str, int]:
    runtime = _runtime.current()
    assert runtime is not None and runtime.metrics is not None
    endpoint = runtime.metrics.endpoint
    assert endpoint is not None
    host, port = endpoint.server.socket.getsockname()[:2]
    return str(host), int(port)


def test_the_metrics_endpoint_binds_to_loopback_by_default() -> None:
    assert Settings().metrics_addr == "127.0.0.1"
    loopwatch.install(metrics_port=0, log="off")
    host, port = bound_address()
    assert host == "127.0.0.1"
    # Not reachable on another address of this host.
    others = {
        info[4][0]
        for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)
        if not info[4][0].startswith("127.")
    }
    for addr in others:
        with socket.socket() as probe:
            probe.settimeout(1.0)
            assert probe.connect_ex((addr, port)) != 0, addr


def test_the_metrics_endpoint_binds_elsewhere_only_when_told(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """And says so once: the endpoint is reachable from other hosts."""
    loopwatch.install(metrics_port=0, metrics_addr="0.0.0.0", log="off")
    host, port = bound_address()
    assert host == "0.0.0.0"
    said = [line for line in capsys.readouterr().err.splitlines() if "other hosts" in line]
    assert said == [
        f"loopwatch: the metrics endpoint on 0.0.0.0:{port} can be reached from other hosts "
        "(metrics and /tasks, no authentication); LOOPWATCH_METRICS_ADDR=127.0.0.1 keeps it on "
        "this host"
    ]


def test_the_zero_code_endpoint_binds_to_loopback(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text(
        textwrap.dedent(
            """
            import asyncio
            from loopwatch import _runtime
            async def main():
                await asyncio.sleep(0.01)
                print(_runtime.current().metrics.endpoint.server.socket.getsockname()[0])
            asyncio.run(main())
            """
        )
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOPWATCH")}
    env.update(LOOPWATCH="1", LOOPWATCH_METRICS_PORT="0", LOOPWATCH_LOG="off")
    proc = subprocess.run(
        [sys.executable, str(probe)], env=env, capture_output=True, text=True, timeout=30
    )
    assert (proc.stdout, proc.returncode) == ("127.0.0.1\n", 0)
    assert proc.stderr.startswith("loopwatch: metrics at http://127.0.0.1:")  # port 0: said


# -- what events carry --------------------------------------------------------------------------


async def forgotten(token: str) -> None:
    await asyncio.sleep(0)


async def hangs(token: str) -> None:
    password = token  # noqa: F841 - a local the event must not carry
    await asyncio.get_running_loop().create_future()


async def fails(token: str) -> None:
    credentials = {"password": token}  # noqa: F841
    await asyncio.sleep(0)
    raise ValueError("could not log in")


def blocks(token: str) -> None:
    api_key = token  # noqa: F841
    time.sleep(0.15)


def test_events_carry_places_never_locals_arguments_or_exception_values(
    factory: Factory, events: Recorder, tmp_path: Path
) -> None:
    log = tmp_path / "events.jsonl"
    runtime = _api.activate(stall_ms=100)
    runtime.dispatcher.add_exporter(JsonExporter(str(log)))

    async def main() -> None:
        loop = asyncio.get_running_loop()
        held = loop.create_task(hangs(SECRET), name="leaks")  # leaked at the end
        orphan = loop.create_task(hangs(SECRET), name="orphan")
        loop.create_task(fails(SECRET), name="fails")
        forgotten(SECRET)  # type: ignore[unused-coroutine]  # never awaited
        await asyncio.sleep(0.01)
        loop.call_soon(blocks, SECRET)
        await asyncio.sleep(0.2)
        del orphan
        gc.collect()
        await asyncio.sleep(0.01)
        assert held is not None

    with pytest.warns(RuntimeWarning):
        run_on(factory, main())
    gc.collect()
    found = events.wait_for(6)
    names = sorted({e.event for e in found})
    assert names == [
        "loopwatch.coroutine_never_awaited",
        "loopwatch.loop_stalled",
        "loopwatch.slow_callback",
        "loopwatch.task_exception_unretrieved",
        "loopwatch.task_leaked",
        "loopwatch.task_orphaned",
    ]
    for event in found:
        text = json.dumps(event.as_dict(), default=repr)
        assert SECRET not in text, text
        for value in event.as_dict().values():
            # Only plain data: numbers, names, places, lists of places.
            assert value is None or isinstance(value, int | float | str | list), (event, value)
    (unretrieved,) = events.named("loopwatch.task_exception_unretrieved")
    assert unretrieved.exception == "ValueError: could not log in"
    place = re.compile(r"^.+:\d+ in [\w.<>]+$")
    for event in found:
        for field in ("location", "created_at", "awaiting", "raised_at", "defined_at"):
            value = getattr(event, field, None)
            assert value is None or place.match(value), (event.event, field, value)
        for value in getattr(event, "stack", ()):
            assert place.match(value), value
    assert SECRET not in log.read_text()
    assert len(log.read_text().splitlines()) == len(found)


def test_a_setting_drops_exception_messages(factory: Factory, events: Recorder) -> None:
    _api.activate(exception_messages=False)  # proposed: LOOPWATCH_EXCEPTION_MESSAGES=0

    async def main() -> None:
        asyncio.get_running_loop().create_task(fails(SECRET))
        await asyncio.sleep(0.01)

    run_on(factory, main())
    gc.collect()
    (event,) = events.wait_for(1, "loopwatch.task_exception_unretrieved")
    assert event.exception == "ValueError"


# -- the environment ---------------------------------------------------------------------------

# Where loopwatch may touch os.environ, and why:
ENVIRON_ALLOWED = {
    "_config.py": "the one reader of LOOPWATCH_* settings",
    "_bootstrap.py": "reads LOOPWATCH at start-up",
    "_cli.py": "`loopwatch run` copies the environment for the command it starts",
    "_demo.py": "the demo copies the environment for the service it starts",
    "demo/service.py": "the demo service reads LOOPWATCH_METRICS_PORT",
}


def test_only_config_and_bootstrap_read_the_environment() -> None:
    pattern = re.compile(r"os\.environ|getenv|environb|putenv")
    users = {
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        if pattern.search(path.read_text())
    }
    assert users <= set(ENVIRON_ALLOWED), users - set(ENVIRON_ALLOWED)
    # And where they do, outside _config/_bootstrap, only LOOPWATCH names are looked up by key.
    for name in users - {"_config.py", "_bootstrap.py", "_cli.py", "_demo.py"}:
        keys = re.findall(r"environ(?:\.get\(|\[)\s*['\"]([^'\"]+)", (PACKAGE / name).read_text())
        assert all(k.startswith("LOOPWATCH") for k in keys), (name, keys)


ENV_PROBE = """
import os, sys

LOOPWATCH_DIR = {package!r}
PLUMBING = ("<frozen _collections_abc>", "<frozen os>", "/_collections_abc.py", "/os.py")
looked_up, iterated = set(), set()

class Recording(type(os.environ)):
    def __getitem__(self, key):
        frame, through = sys._getframe(1), set()
        # Past the mapping's own plumbing (get, items...), the caller says who is reading: the
        # standard library reading its own variables (PYTHONASYNCIODEBUG...) is not loopwatch.
        while frame is not None and frame.f_code.co_filename.endswith(PLUMBING):
            through.add(frame.f_code.co_name)
            frame = frame.f_back
        code = frame.f_code if frame is not None else None
        if (
            code is not None
            and code.co_filename.startswith(LOOPWATCH_DIR)
            # A loop's own constructor, called through loopwatch's wrapper of __init__, reads
            # its own variables (uvloop's compiled Loop: PYTHONASYNCIODEBUG).
            and not (code.co_name == "__init__" and code.co_filename.endswith("_loops.py"))
        ):
            (iterated if "__iter__" in through else looked_up).add(key)
        return super().__getitem__(key)

os.environ.__class__ = Recording
os.environ["SECRET_TOKEN"] = "x"

import asyncio, time, uvloop, prometheus_client, structlog, logging

async def main():
    await asyncio.sleep(0.01)
    time.sleep(0.15)
    asyncio.get_running_loop().create_task(asyncio.sleep(10))

asyncio.run(main())
uvloop.run(main())
print(sorted(looked_up))
print(sorted(iterated))
"""


def environment_reads(tmp_path: Path) -> tuple[list[str], list[str]]:
    """Run a process with LOOPWATCH=1 that records each environment variable whose value
    loopwatch's code read (settings, logging, metrics, both loops, leaks): those it looked up
    by name, and those whose value it read while going through the whole environment."""
    probe = tmp_path / "probe.py"
    probe.write_text(ENV_PROBE.format(package=str(PACKAGE)))
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOPWATCH")}
    env.update(LOOPWATCH="1", LOOPWATCH_LOG="off", LOOPWATCH_METRICS_PORT="0")
    proc = subprocess.run(
        [sys.executable, str(probe)], env=env, capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 0, proc.stderr
    looked_up, iterated = (eval(line) for line in proc.stdout.splitlines())
    return looked_up, iterated


def test_only_loopwatch_variables_are_looked_up(tmp_path: Path) -> None:
    looked_up, _ = environment_reads(tmp_path)
    assert "LOOPWATCH_METRICS_PORT" in looked_up, "the probe did not record"
    assert [k for k in looked_up if not k.startswith("LOOPWATCH")] == []


def test_no_other_variable_value_is_read(tmp_path: Path) -> None:
    _, iterated = environment_reads(tmp_path)
    assert [k for k in iterated if not k.startswith("LOOPWATCH")] == []


# -- the log file -------------------------------------------------------------------------------


def slow(location: str) -> SlowCallback:
    return SlowCallback(
        duration_s=0.2,
        threshold_s=0.1,
        task=None,
        coroutine=None,
        location=location,
        stack=(location,),
        loop="asyncio",
    )


def test_the_log_file_is_appended_to_and_survives_truncation(tmp_path: Path) -> None:
    log = tmp_path / "events.jsonl"
    log.write_text("kept line\n")
    runtime = _api.activate(log="json", log_file=str(log), log_fold_ms=0)
    runtime.dispatcher.emit(slow("a.py:1 in f"))
    assert runtime.dispatcher.wait_idle()
    assert log.read_text().splitlines()[0] == "kept line"
    assert json.loads(log.read_text().splitlines()[1])["location"] == "a.py:1 in f"
    # logrotate copytruncate: the file is emptied under the open descriptor.
    os.truncate(log, 0)
    runtime.dispatcher.emit(slow("b.py:2 in g"))
    assert runtime.dispatcher.wait_idle()
    data = log.read_bytes()
    assert b"\x00" not in data, "written at the old offset: a hole of NULs"
    assert [json.loads(line)["location"] for line in data.decode().splitlines()] == ["b.py:2 in g"]


def test_the_log_file_is_never_created_with_more_than_owner_write(tmp_path: Path) -> None:
    log = tmp_path / "new.jsonl"
    old = os.umask(0o022)
    try:
        runtime = _api.activate(log="json", log_file=str(log), log_fold_ms=0)
        runtime.dispatcher.emit(slow("a.py:1 in f"))
        assert runtime.dispatcher.wait_idle()
    finally:
        os.umask(old)
    assert log.stat().st_mode & 0o022 == 0
