"""``loopwatch tasks`` and ``loopwatch top``: the live view of another process, read through its
socket (by PID) or its metrics endpoint's ``/tasks`` (served by loopwatch's own thread there, so it
answers while that process's loop is blocked). Only the standard library, plain text; the
interactive ``top`` in a terminal is drawn with Rich when it is installed (the ``top`` extra),
imported only there."""

from __future__ import annotations

import contextlib
import json
import os
import select
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from ._live import _short, top_text, tree_text

if TYPE_CHECKING:
    from rich.console import RenderableType

_KEYS = {"b": "busy", "a": "age", "s": "steps", "w": "waiting"}
_FIELDS = {"busy": "busy_s", "age": "age_s", "steps": "steps", "waiting": "waiting_s"}
_HELP = "(b a s w: sort, q: quit)"

# Shows one frame: the snapshot, the sort key, and the snapshot before it (for the busy share).
Show = Callable[[dict[str, Any], str, dict[str, Any] | None], None]


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


def top(target: str, *, once: bool, sort: str, interval: float, plain: bool = False) -> int:
    """``loopwatch top``: one frame with ``once``, else a frame a second until ``q``. ``plain``
    keeps the plain text in a terminal where Rich would draw it."""
    try:
        snap = fetch(target)
    except TargetError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    if once:
        print(top_text(snap, sort=sort))
        return 0
    previous: dict[str, Any] | None = None
    with _keys() as read_key, _screen(plain) as show:
        while True:
            show(snap, sort, previous)
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
                error = str(exc)
                break
    print(error, file=sys.stderr)  # (after the screen is given back, where it stays readable)
    return 1


@contextlib.contextmanager
def _screen(plain: bool) -> Iterator[Show]:
    """Where the frames go: Rich's full-screen view when Rich is installed and standard output is
    a terminal (and not ``plain``); else the plain text, each frame after clearing the screen."""
    if not plain and sys.stdout.isatty():
        try:
            from rich.console import Console  # (deferred: optional, and only for this view)
            from rich.live import Live  # (deferred: as above)
        except ImportError:
            pass  # (the plain text below: Rich is the ``top`` extra's)
        else:
            console = Console(highlight=False)
            # Drawn only when a frame is ready (no refresh thread); standard error is not
            # redirected: a last error is printed after the screen is given back.
            with Live(
                console=console,
                screen=True,
                auto_refresh=False,
                redirect_stdout=False,
                redirect_stderr=False,
            ) as live:

                def draw(snap: dict[str, Any], sort: str, previous: dict[str, Any] | None) -> None:
                    size = console.size
                    frame = rich_frame(snap, sort, previous, width=size.width, height=size.height)
                    live.update(frame, refresh=True)

                yield draw
            return

    def write(snap: dict[str, Any], sort: str, previous: dict[str, Any] | None) -> None:
        rows = os.get_terminal_size().lines - 6 if sys.stdout.isatty() else 30
        frame = top_text(snap, sort=sort, previous=previous, limit=max(rows, 5))
        sys.stdout.write("\x1b[H\x1b[2J" + frame + "\n" + _HELP + "\n")
        sys.stdout.flush()

    yield write


def _busy_share(entry: dict[str, Any], previous: dict[str, Any] | None, now: float) -> str:
    """The share of the time since the previous snapshot the loop spent running callbacks."""
    if previous is None or now <= previous["time"]:
        return "-"
    for old in previous["loops"]:
        if (old["loop"], old["thread"]) == (entry["loop"], entry["thread"]):
            share = (entry["busy_s"] - old["busy_s"]) / (now - previous["time"])
            return f"{min(max(share, 0.0), 1.0) * 100:.0f}%"
    return "-"


def rich_frame(
    snap: dict[str, Any],
    sort: str,
    previous: dict[str, Any] | None,
    *,
    width: int,
    height: int,
) -> RenderableType:
    """One frame of ``loopwatch top`` for Rich: the title, loop health and task columns of
    :func:`loopwatch._live.top_text`, as tables fitted to ``width`` x ``height``."""
    from rich import box  # (deferred: as in _screen)
    from rich.console import Group  # (deferred: as above)
    from rich.table import Table  # (deferred: as above)
    from rich.text import Text  # (deferred: as above)

    def table(
        heads: tuple[str, ...],
        cells: list[list[str]],
        last: Callable[[int, int], Text],
        title: str | None = None,
    ) -> Table:
        """A table of ``cells`` and a last column, ``last(row, room)``, given the room the other
        columns leave of the width (they are 3 apart; names are cut at 24)."""
        found = Table(
            box=box.SIMPLE_HEAD,
            show_edge=False,
            pad_edge=False,
            header_style="bold",
            title=title,
            title_justify="left",
            title_style="bold",
        )
        widths = []
        for i, head in enumerate(heads[:-1]):
            numeric = head in _NUMERIC
            widths.append(max([len(head)] + [len(row[i]) for row in cells]))
            if not numeric:
                widths[-1] = min(widths[-1], 24)
            found.add_column(
                head, justify="right" if numeric else "left", no_wrap=True, max_width=widths[-1]
            )
        found.add_column(heads[-1], no_wrap=True)
        room = max(width - sum(widths) - 3 * len(widths), 16)
        for n, row in enumerate(cells):
            # Every cell is a Text: a task's name is the program's, and a str cell would be
            # read as Rich markup ("[bold]" in a name would vanish, a "[/x]" would raise).
            found.add_row(*(Text(c, _STYLES.get(c, "")) for c in row), last(n, room))
        return found

    loops = snap["loops"]

    def health(n: int, room: int) -> Text:
        blocked = loops[n]["blocked_s"]
        if blocked is None:
            return Text("not blocked", "green")
        said = f"BLOCKED {blocked:.3f}s at "
        place = _short(loops[n].get("blocked_at"), max(room - len(said), 16))
        return Text(said + place, "bold red")

    parts: list[RenderableType] = [
        Text(f"loopwatch top - pid {snap['pid']} - sorted by {sort}", "bold"),
        Text(""),
        table(
            ("LOOP", "THREAD", "TASKS", "MEAN LAG", "BUSY", "BUSY SHARE", "HEALTH"),
            [
                [
                    entry["loop"],
                    entry["thread"] or "?",
                    str(len(entry["tasks"])),
                    f"{entry['lag_s'] * 1000:.2f}ms",
                    f"{entry['busy_s']:.3f}s",
                    _busy_share(entry, previous, snap["time"]),
                ]
                for entry in loops
            ],
            health,
        ),
    ]
    # Lines left for task rows, shared by the loops: the title, a blank line, the health table
    # (2 + a line a loop), the help line; and per loop a blank line, a title, 2 lines of header
    # and "... more".
    left = height - 5 - len(loops) - 5 * len(loops)
    limit = max(left // max(len(loops), 1), 3)
    key = _FIELDS[sort]
    for entry in loops:
        rows = sorted(entry["tasks"], key=lambda r: (-r[key], r["id"]))[:limit]

        def awaiting(n: int, room: int, rows: list[dict[str, Any]] = rows) -> Text:
            # Cut on the left: the line and the function are at the end.
            return Text(_short(rows[n]["awaiting"], room))

        tasks = table(
            ("TASK", "COROUTINE", "STATE", "AGE s", "BUSY ms", "STEPS", "WAIT s", "AWAITING"),
            [
                [
                    row["task"],
                    row["coroutine"],
                    row["state"],
                    f"{row['age_s']:.1f}",
                    f"{row['busy_s'] * 1000:.1f}",
                    str(row["steps"]),
                    f"{row['waiting_s']:.1f}",
                ]
                for row in rows
            ],
            awaiting,
            title=f"{entry['loop']} (thread {entry['thread'] or '?'})",
        )
        if len(entry["tasks"]) > limit:
            tasks.caption = f"... and {len(entry['tasks']) - limit} more"
            tasks.caption_justify = "left"
        parts += [Text(""), tasks]
    parts.append(Text(_HELP, "dim"))
    return Group(*parts)


_NUMERIC = {"TASKS", "MEAN LAG", "BUSY", "BUSY SHARE", "AGE s", "BUSY ms", "STEPS", "WAIT s"}
# Styles by a cell's text: a task's state (a name that is a state is coloured too, no harm).
_STYLES = {"running": "green", "cancelling": "yellow"}


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
