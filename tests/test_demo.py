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
    findings = [line.split()[0] for line in out.splitlines() if line.startswith("loopwatch.")]
    assert findings == [
        "loopwatch.slow_callback",
        "loopwatch.loop_stalled",
        "loopwatch.slow_callback",
        "loopwatch.task_exception_unretrieved",
        "loopwatch.task_orphaned",
        "loopwatch.coroutine_never_awaited",
        "loopwatch.cancel_swallowed",
        "loopwatch.task_leaked",
    ], out
    assert f"location='{SERVICE}:" in out
    # The metrics URL is shown at the start, and the counters read from it before shutdown
    # (the leak is found at shutdown, after the scrape).
    url = next(line for line in out.splitlines() if "loopwatch metrics at" in line).split()[-1]
    assert url.startswith("http://127.0.0.1:") and url.endswith("/metrics")
    scraped = out[out.index(f"--- GET {url}: the counters so far") :].splitlines()[1:7]
    assert scraped == [
        "loopwatch_slow_callbacks_total 2.0",
        "loopwatch_loop_stalls_total 1.0",
        "loopwatch_tasks_leaked_total 0.0",
        "loopwatch_tasks_orphaned_total 1.0",
        "loopwatch_task_exceptions_unretrieved_total 1.0",
        "loopwatch_coroutines_never_awaited_total 1.0",
    ], out
    # The summary at exit puts the handler first: it held the loop for 1.8 s in all.
    # (Python's own never-awaited warning comes first on stderr, pointing at the demo's line.)
    err = proc.stderr.splitlines()
    assert f"{SERVICE}:" in err[0] and "coroutine 'audit' was never awaited" in err[0]
    summary = err[err.index(next(line for line in err if line.startswith("loopwatch: top"))) :]
    assert summary[2].split()[:2] == ["handle", "8"]
