"""Start-up: what the .pth line costs a process that does not ask for loopwatch, and one that
does; wall time and ``-X importtime`` of fresh interpreters.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from . import common
from .common import log

STARTUP_SNIPPETS = ("pass", "import asyncio", "import asyncio; asyncio.run(asyncio.sleep(0))")
STARTUP_SETTINGS = ("unset", "1")
# With LOOPWATCH unset, loopwatch's whole start-up cost is the line of loopwatch.pth: timed here
# in a child with that environment, in nanoseconds per execution (best of 5 repeats).
PTH_TIMER = """
import sysconfig, timeit
from pathlib import Path
pth = Path(sysconfig.get_paths()["purelib"]) / "loopwatch.pth"
lines = [x for x in pth.read_text().splitlines() if x.startswith("import")] if pth.exists() else []
n = 100_000
print(min(timeit.repeat(lines[0], number=n, repeat=5)) / n * 1e9 if lines else "none")
"""


def loopwatch_import_times(stderr: str) -> tuple[int, int, list[str]]:
    """From ``-X importtime`` output: summed self time of loopwatch modules, summed cumulative time
    of the outermost loopwatch imports (what they pulled in included), and their names."""
    rows: list[tuple[int, int, int, str]] = []
    for line in stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        parts = line[len("import time:") :].split("|")
        if len(parts) != 3 or not parts[0].strip().isdigit():
            continue  # the header line
        name = parts[2].rstrip()
        depth = (len(name) - len(name.lstrip())) // 2
        rows.append((int(parts[0]), int(parts[1]), depth, name.strip()))
    own_self = own_cumulative = 0
    names: list[str] = []
    ancestors: list[tuple[int, str]] = []
    # A module's line comes after those of the imports it triggered: walk backwards, so that each
    # line's enclosing imports are on the stack when it is reached.
    for self_us, cumulative_us, depth, name in reversed(rows):
        while ancestors and ancestors[-1][0] >= depth:
            ancestors.pop()
        if name.split(".")[0] == "loopwatch":
            names.append(name)
            own_self += self_us
            if not any(a.split(".")[0] == "loopwatch" for _, a in ancestors):
                own_cumulative += cumulative_us
        ancestors.append((depth, name))
    return own_self, own_cumulative, sorted(names)


@dataclass(slots=True)
class StartupRow:
    snippet: str
    setting: str
    wall_ms: list[float] = field(default_factory=list)
    self_us: list[int] = field(default_factory=list)
    cumulative_us: list[int] = field(default_factory=list)
    modules: list[str] = field(default_factory=list)


def pth_line_ns(env: Mapping[str, str]) -> float | None:
    """What the ``loopwatch.pth`` line costs a process with LOOPWATCH unset, in ns (None: the
    environment has no ``loopwatch.pth``)."""
    done = subprocess.run(
        [common.PYTHON, "-c", PTH_TIMER], env=dict(env), capture_output=True, text=True, check=True
    )
    out = done.stdout.strip()
    return None if out == "none" else float(out)


def measure_startup(
    env: Mapping[str, str], wall_runs: int, importtime_runs: int
) -> list[StartupRow]:
    rows = {(s, v): StartupRow(s, v) for s in STARTUP_SNIPPETS for v in STARTUP_SETTINGS}
    envs = {v: dict(env) if v == "unset" else {**env, "LOOPWATCH": v} for v in STARTUP_SETTINGS}
    order = list(rows)
    log(f"start-up: {wall_runs} wall-time runs and {importtime_runs} -X importtime runs each")
    for row in rows.values():  # warm-up: fill the bytecode cache, the page cache
        for _ in range(2):
            subprocess.run([common.PYTHON, "-c", row.snippet], env=envs[row.setting], check=True)
    for i in range(max(wall_runs, importtime_runs)):
        for key in order if i % 2 == 0 else reversed(order):
            row = rows[key]
            env = envs[row.setting]
            if i < wall_runs:
                start = time.perf_counter()
                subprocess.run(
                    [common.PYTHON, "-c", row.snippet],
                    env=env,
                    check=True,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                row.wall_ms.append((time.perf_counter() - start) * 1000.0)
            if i < importtime_runs:
                done = subprocess.run(
                    [common.PYTHON, "-X", "importtime", "-c", row.snippet],
                    env=env,
                    check=True,
                    capture_output=True,
                    text=True,
                )
                own_self, own_cumulative, names = loopwatch_import_times(done.stderr)
                row.self_us.append(own_self)
                row.cumulative_us.append(own_cumulative)
                row.modules = names
    return list(rows.values())
