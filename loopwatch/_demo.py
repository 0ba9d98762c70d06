"""``loopwatch demo``: run the bundled service in a child process with ``LOOPWATCH=1``."""

from __future__ import annotations

import os
import subprocess
import sys


def main(*, uvloop: bool = False, requests: int = 6) -> int:
    env = dict(os.environ, LOOPWATCH="1", PYTHONUNBUFFERED="1")
    env.setdefault("LOOPWATCH_LOG", "logging")
    command = [sys.executable, "-m", "loopwatch.demo.service", "--requests", str(requests)]
    if uvloop:
        command.append("--uvloop")
    print("$ LOOPWATCH=1 python -m loopwatch.demo.service" + (" --uvloop" if uvloop else ""))
    sys.stdout.flush()
    return subprocess.call(command, env=env)
