"""``loopwatch demo``: run the bundled service in a child process with ``LOOPWATCH=1``."""

from __future__ import annotations

import os
import socket
import subprocess
import sys


def _free_port() -> int:
    # Ask the kernel for a free loopback port. Another process could take it before the child
    # binds it; loopwatch then says so in one line and the demo runs on without metrics.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def main(*, uvloop: bool = False, pause: float = 2.0) -> int:
    env = dict(os.environ, LOOPWATCH="1", PYTHONUNBUFFERED="1")
    env.setdefault("LOOPWATCH_LOG", "logging")
    env.setdefault("LOOPWATCH_STALL_MS", "1000")
    env.setdefault("LOOPWATCH_SUMMARY", "1")
    env.setdefault("LOOPWATCH_METRICS_PORT", str(_free_port()))
    command = [sys.executable, "-m", "loopwatch.demo.service", "--pause", str(pause)]
    if uvloop:
        command.append("--uvloop")
    shown = " ".join(
        f"{k}={env[k]}"
        for k in ("LOOPWATCH", "LOOPWATCH_STALL_MS", "LOOPWATCH_SUMMARY", "LOOPWATCH_METRICS_PORT")
    )
    print(f"$ {shown} python -m loopwatch.demo.service" + (" --uvloop" if uvloop else ""))
    sys.stdout.flush()
    return subprocess.call(command, env=env)
