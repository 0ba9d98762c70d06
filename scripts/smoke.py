"""A smoke test of an installed loopwatch (a built wheel or sdist, in a fresh environment): a
program run with LOOPWATCH=1 has a block reported at its line, and its metrics served.

    python scripts/smoke.py        # exit 0 and one "smoke: ok" line, or 1 and what failed

It uses only the installed package and the standard library, from a directory outside the
source tree, so it tests what was installed, not the checkout.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

PROGRAM = """
import asyncio, os, sys, time, urllib.request

async def handler():
    time.sleep(0.3)  # BLOCK

async def main():
    await asyncio.create_task(handler(), name="smoke-task")
    url = "http://127.0.0.1:" + os.environ["LOOPWATCH_METRICS_PORT"] + "/metrics"
    text = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=10).read().decode())
    print([line for line in text.splitlines() if line.startswith("loopwatch_slow_callbacks_total")])

asyncio.run(main())
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        program = Path(tmp) / "program.py"
        program.write_text(textwrap.dedent(PROGRAM))
        log = Path(tmp) / "events.jsonl"
        env = {k: v for k, v in os.environ.items() if not k.startswith("LOOPWATCH")}
        env.update(
            LOOPWATCH="1",
            LOOPWATCH_LOG="json",
            LOOPWATCH_LOG_FILE=str(log),
            LOOPWATCH_METRICS_PORT=str(free_port()),
        )
        env.pop("PYTHONPATH", None)
        proc = subprocess.run(
            [sys.executable, str(program)],
            cwd=tmp,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        events = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
        import loopwatch

        where = os.path.dirname(loopwatch.__file__)
        problems = []
        if proc.returncode != 0:
            problems.append(f"the program exited with {proc.returncode}: {proc.stderr.strip()}")
        if proc.stdout.strip() != "['loopwatch_slow_callbacks_total 1.0']":
            problems.append(f"metrics: {proc.stdout.strip()!r}")
        blocks = [(e["event"], e["task"], e["location"]) for e in events]
        expected = [("loopwatch.slow_callback", "smoke-task", f"{program}:5 in handler")]
        if blocks != expected:
            problems.append(f"events: {blocks!r}, expected {expected!r}")
        if problems:
            print(f"smoke: FAILED (loopwatch from {where})", *problems, sep="\n  ", file=sys.stderr)
            return 1
        from loopwatch._native import ACCEL

        kind = "compiled" if ACCEL is not None else "pure Python"
        print(f"smoke: ok (loopwatch {loopwatch.__version__}, {kind}, from {where})")
        return 0


if __name__ == "__main__":
    sys.exit(main())
