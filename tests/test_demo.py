"""`loopwatch demo` runs the bundled service on each loop and shows every kind of finding."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

SERVICE = os.path.join(os.path.dirname(__import__("loopwatch").__file__), "demo", "service.py")


@pytest.mark.parametrize("kind", ["asyncio", "uvloop"])
def test_demo_shows_each_finding_and_ends_by_itself(kind: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOPWATCH")}
    command = [sys.executable, "-m", "loopwatch", "demo", "--pause", "0.2"]
    if kind == "uvloop":
        command.append("--uvloop")
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert f"({kind} loop)" in out
    findings = [
        line.split()[1] for line in out.splitlines() if line.startswith("loopwatch loopwatch.")
    ]
    assert findings == [
        "loopwatch.slow_callback",
        "loopwatch.loop_stalled",
        "loopwatch.slow_callback",
        "loopwatch.task_exception_unretrieved",
        "loopwatch.task_orphaned",
        "loopwatch.coroutine_never_awaited",
        "loopwatch.task_leaked",
    ], out
    assert f"location='{SERVICE}:" in out
    # The summary at exit puts the handler first: it held the loop for 1.8 s in all.
    # (Python's own never-awaited warning comes first on stderr, pointing at the demo's line.)
    err = proc.stderr.splitlines()
    assert f"{SERVICE}:" in err[0] and "coroutine 'audit' was never awaited" in err[0]
    summary = err[err.index(next(line for line in err if line.startswith("loopwatch: top"))) :]
    assert summary[2].split()[:2] == ["handle", "7"]
