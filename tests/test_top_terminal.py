"""``loopwatch top PID`` in a real terminal: a tmux server of the test's own runs the view against
a watched program (stock asyncio and uvloop), types its keys and reads its screen, drawn with
Rich and as plain text. Also one Rich frame exactly, and that Rich is imported only there."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import shutil
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import line_of

from loopwatch.exporters import console

TMUX = shutil.which("tmux")
HAS_RICH = importlib.util.find_spec("rich") is not None
DEADLINE = 20.0  # seconds for anything to show: generous, for a loaded machine

PROGRAM = """
import asyncio, sys, time

async def burn(stop):
    while not stop.is_set():
        end = time.perf_counter() + 0.02
        while time.perf_counter() < end:  # holding the loop 20 ms a step
            pass
        await asyncio.sleep(0.05)

async def idle(stop):
    await stop.wait()  # TOP:idle

async def main():
    stop = asyncio.Event()
    # 0.3 s apart, so that the order by age is the order of creation.
    await asyncio.sleep(0.3)
    tasks = [asyncio.create_task(idle(stop), name="idle-old")]
    await asyncio.sleep(0.3)
    tasks.append(asyncio.create_task(burn(stop), name="burner"))
    await asyncio.sleep(0.3)
    tasks.append(asyncio.create_task(idle(stop), name="idle-new"))
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until stdin closes
    stop.set()
    await asyncio.gather(*tasks)

if sys.argv[1] == "uvloop":
    import uvloop
    uvloop.run(main())
else:
    asyncio.run(main())
"""
COROUTINES = {"Task-1": "main", "idle-old": "idle", "burner": "burn", "idle-new": "idle"}
HELP = "(b a s w: sort, q: quit)"


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without loopwatch's settings, an enclosing tmux, or a size or colour
    forced on Rich."""
    dropped = ("LOOPWATCH", "TMUX", "COLUMNS", "LINES", "NO_COLOR", "FORCE_COLOR", "TTY_")
    return {k: v for k, v in os.environ.items() if not k.startswith(dropped)} | extra


@pytest.fixture
def watched(tmp_path: Path, kind: str) -> Iterator[tuple[subprocess.Popen[str], Path]]:
    """The program under watch, answering on its socket; it ends when its stdin closes."""
    script = tmp_path / "watched.py"
    script.write_text(textwrap.dedent(PROGRAM))
    proc = subprocess.Popen(
        [sys.executable, str(script), kind],
        env=clean_env(LOOPWATCH="1", LOOPWATCH_LOG="off"),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        deadline = time.monotonic() + DEADLINE
        while console.socket_path(proc.pid) is None and time.monotonic() < deadline:
            time.sleep(0.02)
        yield proc, script
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            proc.wait(timeout=DEADLINE)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Terminal:
    """A tmux server on a socket of its own, with one 160x40 window running one command, kept
    on the screen when the command ends."""

    def __init__(self, env: dict[str, str], directory: Path) -> None:
        self.name = f"loopwatch-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.env = env
        self.status = directory / f"{self.name}.status"

    def tmux(self, *args: str) -> str:
        assert TMUX is not None
        return subprocess.run(
            [TMUX, "-L", self.name, "-f", "/dev/null", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=DEADLINE,
            check=True,
        ).stdout

    def run(self, argv: list[str], cwd: Path) -> None:
        # The exit status goes to a file, through a shell: tmux 3.3a's own (pane_dead_status)
        # never came in 2 to 5 runs out of 10 here, its command left a zombie, unreaped.
        # remain-on-exit is set before the window is made: a command that ends at once is kept.
        wrapped = ["sh", "-c", 'out=$1; shift; "$@"; echo $? > "$out"', "sh", str(self.status)]
        self.tmux(
            *("set-option", "-g", "remain-on-exit", "on", ";"),
            *("new-session", "-d", "-x", "160", "-y", "40", "-c", str(cwd), *wrapped, *argv),
        )

    def screen(self, history: bool = False) -> list[str]:
        return self.tmux("capture-pane", "-p", *(["-S", "-"] if history else [])).splitlines()

    def show(self, variable: str) -> str:
        return self.tmux("display", "-p", f"#{{{variable}}}").strip()

    def wait(self, seen: Callable[[list[str]], bool], what: str) -> list[str]:
        """The screen, once ``seen`` holds of it; a failure showing the screen after DEADLINE."""
        deadline = time.monotonic() + DEADLINE
        while True:
            screen = self.screen()
            if seen(screen):
                return screen
            if time.monotonic() > deadline:
                shown = "\n".join(screen)
                pytest.fail(f"{what}: not seen in {DEADLINE:.0f} s. The screen:\n{shown}")
            time.sleep(0.05)

    def exit_status(self) -> int:
        """The status the command exited with, once it has."""
        deadline = time.monotonic() + DEADLINE
        while not (self.status.exists() and self.status.read_text().endswith("\n")):
            if time.monotonic() > deadline:
                shown = "\n".join(self.screen())
                pytest.fail(f"the command did not end in {DEADLINE:.0f} s. The screen:\n{shown}")
            time.sleep(0.05)
        return int(self.status.read_text())

    def close(self) -> None:
        """Ends the server, and whatever still runs in it, and removes the socket file tmux
        leaves behind."""
        assert TMUX is not None
        tmux = [TMUX, "-L", self.name, "-f", "/dev/null"]
        socket = subprocess.run(
            [*tmux, "display", "-p", "#{socket_path}", ";", "kill-server"],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=DEADLINE,
        ).stdout.strip()
        if socket:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(socket)


@pytest.fixture
def terminal_for(tmp_path: Path) -> Iterator[Callable[[dict[str, str]], Terminal]]:
    """Makes terminals with an environment of the test's; each tmux server is killed at the end."""
    if TMUX is None:
        pytest.skip("tmux is not installed (apt-get install tmux): no terminal to run top in")
    made: list[Terminal] = []

    def make(env: dict[str, str]) -> Terminal:
        made.append(Terminal(env, tmp_path))
        return made[-1]

    try:
        yield make
    finally:
        for terminal in made:
            terminal.close()


def task_rows(screen: list[str]) -> list[list[str]]:
    """The task rows on the screen, as words: the lines starting with a task's name."""
    return [words for line in screen if (words := line.split()) and words[0] in COROUTINES]


def order(screen: list[str]) -> list[str]:
    return [words[0] for words in task_rows(screen)]


def sorted_by(key: str, pid: int, first: list[str]) -> Callable[[list[str]], bool]:
    """The frame of ``key``'s order, whole (its help line drawn), with ``first`` on top."""
    title = f"loopwatch top - pid {pid} - sorted by {key}"

    def seen(screen: list[str]) -> bool:
        return (
            bool(screen)
            and screen[0] == title
            and HELP in screen
            and order(screen)[: len(first)] == first
        )

    return seen


@pytest.mark.parametrize("view", ["rich", "plain", "without-rich"])
def test_top_in_a_terminal_sorts_by_each_key_and_quits(
    watched: tuple[subprocess.Popen[str], Path],
    terminal_for: Callable[[dict[str, str]], Terminal],
    tmp_path: Path,
    kind: str,
    view: str,
) -> None:
    """``loopwatch top PID`` draws the loop and every task with its coroutine, each key sorts by
    its field, and ``q`` ends it with status 0: drawn with Rich when it is installed, as plain
    text with ``--plain`` or when Rich cannot be imported."""
    proc, script = watched
    argv = [sys.executable, "-m", "loopwatch", "top", str(proc.pid)]
    env = clean_env()
    if view == "rich" and not HAS_RICH:
        pytest.skip("Rich is not installed (pip install '.[top]'): only the plain view to test")
    if view == "plain":
        argv.append("--plain")
    if view == "without-rich":
        shadow = tmp_path / "shadow" / "rich"
        shadow.mkdir(parents=True)
        (shadow / "__init__.py").write_text("raise ImportError('no Rich here')\n")
        env["PYTHONPATH"] = str(shadow.parent)
    terminal = terminal_for(env)
    terminal.run(argv, cwd=tmp_path)

    # Sorted by busy time at first: the task burning 20 ms a step on top.
    screen = terminal.wait(sorted_by("busy", proc.pid, ["burner"]), "the first frame")
    assert sorted(order(screen)) == sorted(COROUTINES)
    rows = {words[0]: words for words in task_rows(screen)}
    assert {name: words[1] for name, words in rows.items()} == COROUTINES
    assert {name: words[2] for name, words in rows.items() if name != "burner"} == dict.fromkeys(
        ("Task-1", "idle-old", "idle-new"), "pending"
    )
    assert rows["burner"][2] in ("pending", "running")  # (running if read during a step)
    idle_at = f"{script.name}:{line_of(script, 'TOP:idle')} in idle"
    assert next(line for line in screen if line.split()[:1] == ["idle-old"]).endswith(idle_at)
    rich_header = ["LOOP", "THREAD", "TASKS", "MEAN", "LAG", "BUSY", "BUSY", "SHARE", "HEALTH"]
    if view == "rich":
        assert rich_header in [line.split() for line in screen]
        assert [kind, "MainThread", "4"] in [line.split()[:3] for line in screen]
        assert not any(line.startswith("loop ") for line in screen)
        assert terminal.show("alternate_on") == "1"  # (the screen is given back at the end)
    else:
        loop_line = f"loop {kind} (thread MainThread): "
        assert next(line for line in screen if line.startswith("loop ")).startswith(loop_line)
        assert rich_header not in [line.split() for line in screen]
        assert terminal.show("alternate_on") == "0"
    assert ["TASK", "COROUTINE", "STATE", "AGE", "s", "BUSY", "ms", "STEPS", "WAIT", "s"] in [
        line.split()[:10] for line in screen
    ]

    # Each key re-sorts at once. By age: the oldest first, in the order they were made.
    terminal.tmux("send-keys", "a")
    by_age = ["Task-1", "idle-old", "burner", "idle-new"]
    assert order(terminal.wait(sorted_by("age", proc.pid, by_age), "sorted by age")) == by_age
    # By steps: the burner steps every 70 ms, main stepped 4 times, each idle task once.
    terminal.tmux("send-keys", "s")
    terminal.wait(sorted_by("steps", proc.pid, ["burner", "Task-1"]), "sorted by steps")
    # By waiting (age less busy time): the burner, busy 20 ms in 70, falls below idle-new (0.3 s
    # younger) once it has been busy for 0.3 s.
    terminal.tmux("send-keys", "w")
    by_waiting = ["Task-1", "idle-old", "idle-new", "burner"]
    terminal.wait(sorted_by("waiting", proc.pid, by_waiting), "sorted by waiting")
    terminal.tmux("send-keys", "b")
    terminal.wait(sorted_by("busy", proc.pid, ["burner"]), "sorted by busy again")

    terminal.tmux("send-keys", "q")
    assert terminal.exit_status() == 0
    assert terminal.show("alternate_on") == "0"
    assert proc.poll() is None, "the watched program runs on"


@pytest.mark.parametrize("view", ["rich", "plain"])
def test_top_of_a_process_that_ends_says_so_in_one_line(
    watched: tuple[subprocess.Popen[str], Path],
    terminal_for: Callable[[dict[str, str]], Terminal],
    tmp_path: Path,
    view: str,
) -> None:
    """When the watched program ends under the view, ``loopwatch top`` gives the screen back,
    says so in one line, and exits with status 1."""
    if view == "rich" and not HAS_RICH:
        pytest.skip("Rich is not installed (pip install '.[top]'): only the plain view to test")
    proc, _ = watched
    argv = [sys.executable, "-m", "loopwatch", "top", str(proc.pid)]
    terminal = terminal_for(clean_env())
    terminal.run(argv + (["--plain"] if view == "plain" else []), cwd=tmp_path)
    terminal.wait(sorted_by("busy", proc.pid, ["burner"]), "the first frame")
    assert proc.stdin is not None
    proc.stdin.close()  # the program ends
    assert terminal.exit_status() == 1
    assert terminal.show("alternate_on") == "0"
    said = [line for line in terminal.screen(history=True) if line.startswith("loopwatch: ")]
    # (Its socket is gone; the process is not reaped yet: this test is its parent.)
    assert len(said) == 1
    assert said[0].startswith(f"loopwatch: process {proc.pid} is not watched by loopwatch")


def test_top_of_a_process_without_loopwatch_is_one_line(
    terminal_for: Callable[[dict[str, str]], Terminal], tmp_path: Path
) -> None:
    """``loopwatch top PID`` of a process not run with LOOPWATCH=1, in a terminal: one line that
    says so and how to start it, and exit status 1 (no screen taken, nothing else drawn)."""
    plain = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], env=clean_env())
    try:
        terminal = terminal_for(clean_env())
        terminal.run([sys.executable, "-m", "loopwatch", "top", str(plain.pid)], cwd=tmp_path)
        status = terminal.exit_status()
        screen = terminal.screen(history=True)
    finally:
        plain.kill()
        plain.wait()
    assert status == 1
    assert [line for line in screen if line and not line.startswith("Pane is dead")] == [
        f"loopwatch: process {plain.pid} is not watched by loopwatch (start it with "
        "LOOPWATCH=1, or give the URL of its metrics endpoint)"
    ]


def test_rich_is_imported_only_by_the_interactive_view(
    watched: tuple[subprocess.Popen[str], Path],
) -> None:
    """Neither ``import loopwatch``, nor a loop it watches, nor ``loopwatch top --once`` imports
    anything of Rich."""
    proc, _ = watched
    probe = textwrap.dedent(
        f"""
        import asyncio, sys
        def rich(): return sorted(m for m in sys.modules if m.split('.')[0] == 'rich')
        import loopwatch
        seen = [rich()]
        asyncio.run(asyncio.sleep(0.05))
        seen.append(rich())
        from loopwatch._cli import main
        status = main(['top', '--once', '{proc.pid}'])
        print(status, *seen, rich())
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", probe],
        env=clean_env(LOOPWATCH="1"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    lines = done.stdout.splitlines()
    assert (done.returncode, lines[0], lines[-1]) == (
        0,
        f"loopwatch top - pid {proc.pid} - sorted by busy",
        "0 [] [] []",
    )


# -- one Rich frame, exactly ------------------------------------------------------------------


def task(name: str, age: float, busy: float, steps: int, awaiting: str | None) -> dict[str, Any]:
    return {
        "task": name,
        "id": int(age * 1000),
        "coroutine": "handle",
        "state": "pending",
        "age_s": age,
        "created_at": None,
        "awaiting": awaiting,
        "await_chain": [],
        "awaited_by": [],
        "steps": steps,
        "busy_s": busy,
        "waiting_s": round(age - busy, 6),
    }


def test_a_rich_frame_shows_health_then_the_tasks_fitted_to_the_terminal() -> None:
    """A blocked loop, the busy share since the previous snapshot, the tasks by the key as many
    as the height allows, places cut on the left to the width, names never read as markup."""
    pytest.importorskip("rich", reason="Rich is not installed (pip install '.[top]')")
    from rich.console import Console

    from loopwatch._view import rich_frame

    deep = "/srv/app/" + "deep/" * 12
    loop = {
        "loop": "uvloop",
        "thread": "MainThread",
        "running": True,
        "blocked_s": 0.25,
        "blocked_at": deep + "report.py:12 in build",
        "lag_s": 0.0015,
        "busy_s": 3.5,
        "tasks": [
            task("[bold]odd", 9.0, 0.002, 3, "/srv/app/app.py:6 in fetch"),
            task("report", 5.0, 2.5, 40, "/srv/app/report.py:12 in build") | {"state": "running"},
            task("query-1", 4.0, 0.0, 1, deep + "db.py:40 in query"),
            task("query-2", 3.0, 0.0, 1, deep + "db.py:40 in query"),
            task("query-3", 2.0, 0.0, 1, None),
        ],
    }
    previous = {"pid": 42, "time": 100.0, "loops": [loop | {"busy_s": 3.0}]}
    snap = {"pid": 42, "time": 101.0, "loops": [loop]}
    out = Console(file=io.StringIO(), width=100, color_system=None, legacy_windows=False)
    out.print(rich_frame(snap, "busy", previous, width=100, height=15))
    lines = out.file.getvalue().splitlines()
    assert [line.rstrip() for line in lines] == FRAME.splitlines()
    assert max(len(line) for line in lines) == 100


FRAME = """\
loopwatch top - pid 42 - sorted by busy

LOOP     THREAD       TASKS   MEAN LAG     BUSY   BUSY SHARE   HEALTH
────────────────────────────────────────────────────────────────────────────────────────────────────
uvloop   MainThread       5     1.50ms   3.500s          50%   BLOCKED 0.250s at ...t.py:12 in build

uvloop (thread MainThread)
TASK        COROUTINE   STATE     AGE s   BUSY ms   STEPS   WAIT s   AWAITING
────────────────────────────────────────────────────────────────────────────────────────────────────
report      handle      running     5.0    2500.0      40      2.5   /srv/app/report.py:12 in build
[bold]odd   handle      pending     9.0       2.0       3      9.0   /srv/app/app.py:6 in fetch
query-3     handle      pending     2.0       0.0       1      2.0   -
query-2     handle      pending     3.0       0.0       1      3.0   .../deep/deep/db.py:40 in query
... and 1 more
(b a s w: sort, q: quit)
"""
