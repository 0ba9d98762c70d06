"""Each program of docs/pitfalls.md, on each loop, gives exactly the findings the page shows."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import place
from test_zero_code import env_with, read_events

PITFALLS = Path(__file__).resolve().parent.parent / "docs" / "pitfalls"


def expected(name: str, kind: str) -> list[dict[str, Any]]:
    """The findings docs/pitfalls.md shows for ``name``: the fields that identify each one."""
    path = PITFALLS / f"{name}.py"
    if name == "blocking":
        return [
            {
                "event": "loopwatch.slow_callback",
                "task": "request-1",
                "coroutine": "handle_request",
                "location": place(path, "blocks the loop", "load_prices"),
                "loop": kind,
            }
        ]
    if name == "threads":
        return [
            {
                "event": "loopwatch.slow_callback",
                "task": "request-1",
                "coroutine": "handle_request",
                "location": place(
                    path, "waits in this thread: this loop is blocked meanwhile", "handle_request"
                ),
                "loop": kind,
            }
        ]
    if name == "shutdown":
        return [
            {
                "event": "loopwatch.task_leaked",
                "task": "Task-2",
                "coroutine": "flush_audit_log",
                "created_at": place(path, "started, never awaited", "main"),
                "awaiting": place(path, "writing to a remote store", "flush_audit_log"),
                "awaits": "sleep",
            }
        ]
    if name == "fire_and_forget":
        return [
            {
                "event": "loopwatch.task_exception_unretrieved",
                "task": "Task-2",
                "coroutine": "send_receipt",
                "created_at": place(path, "fire and forget: its error goes nowhere", "main"),
                "exception": "ConnectionError: mail server refused the receipt for A-17",
            },
            {
                "event": "loopwatch.task_orphaned",
                "task": "Task-3",
                "coroutine": "wait_for_payment",
                "created_at": place(path, "nobody keeps a reference to it", "main"),
            },
        ]
    if name == "forgotten_await":
        return [
            {
                "event": "loopwatch.coroutine_never_awaited",
                "coroutine": "save",
                "location": place(path, "the await is missing", "main"),
            }
        ]
    # race, swallowed_cancel: bugs of logic that loopwatch cannot see (the page says why).
    return []


# What the two programs with no finding print: the bug is there all the same.
STDOUT = {
    "race": "balance: -60\n",
    "swallowed_cancel": "result None after 0.9 s, with a 0.5 s timeout\n",
}


def test_every_program_is_tested() -> None:
    """A new program in docs/pitfalls/ needs its findings listed here (and on the page)."""
    names = {
        "blocking",
        "race",
        "threads",
        "shutdown",
        "fire_and_forget",
        "forgotten_await",
        "swallowed_cancel",
    }
    assert {p.stem for p in PITFALLS.glob("*.py")} == names
    page = (PITFALLS.parent / "pitfalls.md").read_text()
    assert [n for n in sorted(names) if f"pitfalls/{n}.py" not in page] == []


@pytest.mark.parametrize("name", sorted(p.stem for p in PITFALLS.glob("*.py")))
def test_pitfall_findings(tmp_path: Path, name: str, kind: str) -> None:
    """LOOPWATCH=1 python docs/pitfalls/NAME.py [--uvloop]: exactly the findings on the page."""
    log = tmp_path / "events.jsonl"
    command = [sys.executable, str(PITFALLS / f"{name}.py")]
    if kind == "uvloop":
        command.append("--uvloop")
    proc = subprocess.run(
        command,
        env=env_with(LOOPWATCH="1", LOOPWATCH_LOG="json", LOOPWATCH_LOG_FILE=str(log)),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    # Sorted by name: a failed task and an orphan collected in the same garbage collection are
    # finalized in no set order (Python 3.11 on uvloop reports the orphan first).
    want = sorted(expected(name, kind), key=lambda e: str(e["event"]))
    got = sorted(read_events(log), key=lambda e: str(e["event"]))
    assert [{k: e.get(k) for k in w} for w, e in zip(want, got, strict=False)] == want, got
    assert len(got) == len(want), got
    if name in STDOUT:
        assert proc.stdout == STDOUT[name]
    # The page shows these same places, with the checkout's path shortened to "...".
    page = (PITFALLS.parent / "pitfalls.md").read_text()
    root = str(PITFALLS.parent.parent)
    for w in want:
        for key in ("location", "created_at", "awaiting"):
            if key in w:
                assert f"{key}='{w[key].replace(root, '...')}'" in page, (key, w[key])
    assert "Traceback" not in proc.stderr or name == "fire_and_forget", proc.stderr


def test_the_example_tests_fail_with_their_lines(tmp_path: Path) -> None:
    """pytest --loopwatch on docs/examples/test_checkout.py: both tests fail, at their lines."""
    example = PITFALLS.parent / "examples" / "test_checkout.py"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "--loopwatch", "-p", "no:cacheprovider", str(example)],
        cwd=tmp_path,
        env=env_with(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1, proc.stdout
    heads = [
        line
        for line in proc.stdout.splitlines()
        if line.startswith("loopwatch.") and " at " in line
    ]
    blocked = place(example, "a synchronous PDF library", "render_invoice")
    leaked = place(example, "never stopped", "test_prices")
    assert heads == [
        f"loopwatch.slow_callback at {blocked}",
        f"loopwatch.task_leaked at {leaked}",
    ], proc.stdout


def test_the_readme_pytest_example_runs_clean_with_only_what_it_installs() -> None:
    """As the README runs it, from the repository root, with only pytest and pytest-asyncio:
    no warning about the project's own options (pytest-timeout's `timeout` is not installed)."""
    root = PITFALLS.parent.parent
    proc = subprocess.run(
        [
            *(sys.executable, "-m", "pytest", "--loopwatch", "-p", "no:cacheprovider"),
            *("-p", "no:timeout", "-p", "no:xdist", "docs/examples/test_checkout.py"),
        ],
        cwd=root,
        env=env_with(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1, proc.stdout
    assert (
        "configfile: pytest.ini" in proc.stdout
        and "rootdir: " + str(root / "docs" / "examples") in proc.stdout
    ), proc.stdout
    assert "Warning" not in proc.stdout + proc.stderr, proc.stdout
    assert "2 failed" in proc.stdout
