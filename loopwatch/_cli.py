"""The ``loopwatch`` command: ``loopwatch run [OPTIONS] -- COMMAND``, ``loopwatch demo``, and the
live view of a running process, ``loopwatch tasks TARGET`` and ``loopwatch top TARGET``."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections.abc import Sequence

from . import __version__
from ._config import PREFIX, SPECS, SettingError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loopwatch",
        description="An event-loop watchdog for asyncio and uvloop.",
    )
    parser.add_argument("--version", action="version", version=f"loopwatch {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = commands.add_parser(
        "run",
        help="run a command with loopwatch on (LOOPWATCH=1)",
        description=(
            "Run COMMAND with LOOPWATCH=1 and each option below turned into its LOOPWATCH_* "
            "variable. Every Python process it starts from this environment is watched, "
            "subprocesses included. A bare 'python' or 'python3' runs this interpreter."
        ),
        usage="loopwatch run [OPTIONS] -- COMMAND [ARGS...]",
    )
    for spec in SPECS.values():
        run.add_argument(
            "--" + spec.name.replace("_", "-"),
            dest=spec.name,
            metavar=spec.name.split("_")[-1].upper(),
            help=f"{spec.doc} Sets {spec.env}. Accepts {spec.accepted}.",
        )
    run.add_argument("argv", nargs=argparse.REMAINDER, metavar="COMMAND", help="what to run")

    demo = commands.add_parser(
        "demo",
        help="run a small service with six asyncio mistakes and show what loopwatch finds",
        description=(
            "Start a small HTTP service on 127.0.0.1 under LOOPWATCH=1, send it one request per "
            "classic asyncio mistake (about 20 seconds), and show each finding as it appears."
        ),
    )
    demo.add_argument("--uvloop", action="store_true", help="run the service on uvloop")
    demo.add_argument(
        "--pause", type=float, default=2.0, metavar="S", help="seconds between requests (2)"
    )

    target_help = (
        "the PID of a process of yours run with LOOPWATCH=1 (no port needed), or the URL of a "
        "process's metrics endpoint (LOOPWATCH_METRICS_PORT), as http://HOST:PORT, .../metrics "
        "or .../tasks"
    )
    tasks = commands.add_parser(
        "tasks",
        help="print every task of a running process as a tree, each under the task awaiting it",
        description="Print every task of a watched process, each under the task that awaits it.",
    )
    tasks.add_argument("target", metavar="TARGET", help=target_help)
    top = commands.add_parser(
        "top",
        help="a live view of a running process's loops and tasks (q quits)",
        description=(
            "Loop health on top (blocked, lag, busy share), then the tasks sorted by busy time. "
            "Refreshes every second; keys: b, a, s, w sort by busy, age, steps, waiting; q quits. "
            "In a terminal it is drawn with Rich when Rich is installed (pip install "
            "'loopwatch[top]'), else as plain text."
        ),
    )
    top.add_argument("target", metavar="TARGET", help=target_help)
    top.add_argument("--once", action="store_true", help="print one frame and exit")
    top.add_argument("--sort", choices=("busy", "age", "steps", "waiting"), default="busy")
    top.add_argument(
        "--interval", type=float, default=1.0, metavar="S", help="seconds between frames (1)"
    )
    top.add_argument(
        "--plain", action="store_true", help="plain text frames, even where Rich is installed"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "run":
        return _run(parser, args)
    if args.command == "demo":
        from ._demo import main as demo_main  # (deferred: start-up cost of other commands)

        return demo_main(uvloop=args.uvloop, pause=args.pause)
    if args.command in ("tasks", "top"):
        from . import _view  # (deferred: start-up cost of other commands)

        try:
            if args.command == "tasks":
                return _view.tasks(args.target)
            return _view.top(
                args.target,
                once=args.once,
                sort=args.sort,
                interval=args.interval,
                plain=args.plain,
            )
        except KeyboardInterrupt:  # Ctrl-C quits the view as q does, without a traceback
            return 130
    parser.print_help()
    return 2


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    command = list(args.argv)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        parser.error("run needs a command after --, e.g. loopwatch run -- python app.py")
    env = dict(os.environ)
    env[PREFIX] = "1"
    for spec in SPECS.values():
        value = getattr(args, spec.name)
        if value is None:
            continue
        try:
            spec.coerce(value, "--" + spec.name.replace("_", "-"))
        except SettingError as exc:
            print(str(exc), file=sys.stderr)
            return 2
        env[spec.env] = value
    if command[0] in ("python", "python3"):
        command[0] = sys.executable
    program = shutil.which(command[0], path=env.get("PATH"))
    if program is None:
        print(f"loopwatch: command not found: {command[0]}", file=sys.stderr)
        return 127
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvpe(program, command, env)
