"""``loopwatch tasks`` and ``loopwatch top``: the live view of another process, read from its
metrics endpoint's ``/tasks`` (served by loopwatch's own thread there, so it answers while that
process's loop is blocked). Only the standard library: a plain-text terminal view."""

from __future__ import annotations

import contextlib
import json
import os
import select
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

from ._live import top_text, tree_text

_KEYS = {"b": "busy", "a": "age", "s": "steps", "w": "waiting"}


class TargetError(Exception):
    """The target cannot be read: the message is the one line the command prints."""


def tasks_url(target: str) -> str:
    """``http://HOST:PORT/tasks`` for a target given as a base URL, ``.../metrics`` or
    ``.../tasks``."""
    if not target.startswith(("http://", "https://")):
        raise TargetError(f"loopwatch: {target!r} is not a URL (http://HOST:PORT)")
    base = target.rstrip("/")
    for suffix in ("/metrics", "/tasks"):
        base = base.removesuffix(suffix)
    return base + "/tasks"


def fetch(target: str, timeout: float = 5.0) -> dict[str, Any]:
    if target.isdigit():
        return fetch_pid(int(target), timeout)
    url = tasks_url(target)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            data = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        raise TargetError(f"loopwatch: {url} answered {exc.code}: is it loopwatch's?") from None
    except (OSError, ValueError) as exc:
        raise TargetError(f"loopwatch: cannot read {url} ({exc})") from None
    if not isinstance(data, dict) or "loops" not in data:
        raise TargetError(f"loopwatch: {url} did not answer with loopwatch's tasks")
    return data


def fetch_pid(pid: int, timeout: float) -> dict[str, Any]:
    """The snapshot of a process of this user's, through its socket (see exporters/console)."""
    from .exporters import console  # (deferred: start-up cost of the other commands)

    try:
        data = console.read(pid, timeout)
    except FileNotFoundError:
        raise TargetError(_why_not(pid)) from None
    except ConnectionRefusedError:
        raise TargetError(f"loopwatch: process {pid} is not watched by loopwatch") from None
    except PermissionError:
        raise TargetError(
            f"loopwatch: process {pid} is not yours: it answers only its user"
        ) from None
    except (OSError, ValueError) as exc:
        raise TargetError(f"loopwatch: cannot read process {pid} ({exc})") from None
    if not isinstance(data, dict) or "loops" not in data:
        raise TargetError(f"loopwatch: process {pid} did not answer with loopwatch's tasks")
    return data


def _why_not(pid: int) -> str:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return f"loopwatch: there is no process {pid}"
    except PermissionError:
        return f"loopwatch: process {pid} is not yours: loopwatch answers only its own user"
    return (
        f"loopwatch: process {pid} is not watched by loopwatch (start it with LOOPWATCH=1, or "
        "give the URL of its metrics endpoint)"
    )


def tasks(target: str) -> int:
    try:
        snap = fetch(target)
    except TargetError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    print(tree_text(snap))
    return 0


def top(target: str, *, once: bool, sort: str, interval: float) -> int:
    try:
        snap = fetch(target)
    except TargetError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    if once:
        print(top_text(snap, sort=sort))
        return 0
    previous: dict[str, Any] | None = None
    with _keys() as read_key:
        while True:
            rows = os.get_terminal_size().lines - 6 if sys.stdout.isatty() else 30
            frame = top_text(snap, sort=sort, previous=previous, limit=max(rows, 5))
            sys.stdout.write("\x1b[H\x1b[2J" + frame + "\n(b a s w: sort, q: quit)\n")
            sys.stdout.flush()
            deadline = time.monotonic() + interval
            while (left := deadline - time.monotonic()) > 0:
                key = read_key(left)
                if key == "q":
                    return 0
                if key in _KEYS:
                    sort = _KEYS[key]
                    break
            previous = snap
            try:
                snap = fetch(target)
            except TargetError as exc:
                print(str(exc), file=sys.stderr)
                return 1


@contextlib.contextmanager
def _keys() -> Iterator[Any]:
    """A function that waits up to ``timeout`` for one key press (None if none came)."""
    if not sys.stdin.isatty():

        def wait(timeout: float) -> str | None:
            time.sleep(timeout)
            return None

        yield wait
        return
    import termios  # (deferred: Unix only, and only for the interactive view)
    import tty  # (deferred: as above)

    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    tty.setcbreak(fd)

    def read(timeout: float) -> str | None:
        ready, _, _ = select.select([fd], [], [], timeout)
        return os.read(fd, 1).decode(errors="replace").lower() if ready else None

    try:
        yield read
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)
