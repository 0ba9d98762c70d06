"""``loopwatch demo``: run the bundled service in a child process with ``LOOPWATCH=1``."""

from __future__ import annotations

import os
import subprocess
import sys


def main(*, uvloop: bool = False, pause: float = 2.0) -> int:
    env = dict(os.environ, LOOPWATCH="1", PYTHONUNBUFFERED="1")
    env.setdefault("LOOPWATCH_LOG", "logging")
    env.setdefault("LOOPWATCH_STALL_MS", "1000")
    env.setdefault("LOOPWATCH_SUMMARY", "1")
    command = [sys.executable, "-m", "loopwatch.demo.service", "--pause", str(pause)]
    if uvloop:
        command.append("--uvloop")
    shown = " ".join(
        f"{k}={env[k]}" for k in ("LOOPWATCH", "LOOPWATCH_STALL_MS", "LOOPWATCH_SUMMARY")
    )
    print(f"$ {shown} python -m loopwatch.demo.service" + (" --uvloop" if uvloop else ""))
    sys.stdout.flush()
    return subprocess.call(command, env=env)
