#!/usr/bin/env python3
"""loopwatch overhead benchmarks: what watching a loop costs, as a ratio to the same loop unwatched.

Run ``python benchmarks/bench.py --quick`` (about 1 minute on 2 cores) or
``python benchmarks/bench.py`` (about 8 minutes); see ``benchmarks/README.md`` for how to read the
output.

Every measurement runs in a fresh interpreter (this file, re-run with ``--worker``), so loopwatch's
process-wide state and imports never leak from one variant into another. Variants are interleaved
round by round, so slow drift of the machine falls on all of them alike, and the conclusions are
drawn from ratios to the unwatched loop of the same kind, never from absolute numbers.

Adding a variant (say, one with the task factory on) is one entry in ``VARIANTS``: a loop factory
per loop kind, made inside the worker, plus a check that the variant really is what it claims.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib.metadata
import importlib.util
import io
import json
import math
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

LoopFactory = Callable[[], asyncio.AbstractEventLoop]
Measured = tuple[float, int]  # (seconds, operations) of one timed run
HERE = Path(__file__).resolve()
REPO = HERE.parent.parent
LOOP_KINDS = ("asyncio", "uvloop")
BASELINE = "off"

# --------------------------------------------------------------------------------------------
# Workloads. Each runs on whatever loop it is awaited on and returns (seconds, operations); only
# the part after the set-up is timed.
# --------------------------------------------------------------------------------------------

SLEEP0_TASKS = 200
ECHO_CLIENTS = 8
ECHO_MESSAGE = b"x" * 64
CHURN_BATCH = 500


async def sleep0(iterations: int) -> Measured:
    """SLEEP0_TASKS tasks, each awaiting ``asyncio.sleep(0)`` ``iterations`` times."""

    async def spin() -> None:
        for _ in range(iterations):
            await asyncio.sleep(0)

    start = time.perf_counter()
    await asyncio.gather(*(spin() for _ in range(SLEEP0_TASKS)))
    return time.perf_counter() - start, SLEEP0_TASKS * iterations


async def _echo_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    finally:
        writer.close()


async def echo(round_trips: int) -> Measured:
    """ECHO_CLIENTS loopback clients, each sending a small message and reading it back."""
    server = await asyncio.start_server(_echo_handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    clients = [await asyncio.open_connection("127.0.0.1", port) for _ in range(ECHO_CLIENTS)]
    size = len(ECHO_MESSAGE)

    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in range(round_trips):
            writer.write(ECHO_MESSAGE)
            await writer.drain()
            await reader.readexactly(size)

    start = time.perf_counter()
    await asyncio.gather(*(client(r, w) for r, w in clients))
    elapsed = time.perf_counter() - start
    for _, writer in clients:
        writer.close()
        await writer.wait_closed()
    server.close()
    await server.wait_closed()
    return elapsed, ECHO_CLIENTS * round_trips


async def _nothing() -> None:
    pass


async def churn(batches: int) -> Measured:
    """``batches`` batches of CHURN_BATCH trivial tasks, created and gathered."""
    create_task = asyncio.create_task
    start = time.perf_counter()
    for _ in range(batches):
        await asyncio.gather(*[create_task(_nothing()) for _ in range(CHURN_BATCH)])
    return time.perf_counter() - start, batches * CHURN_BATCH


async def pingpong(round_trips: int) -> Measured:
    """Two tasks waking each other through futures: ping resolves pong's, pong resolves ping's."""
    loop = asyncio.get_running_loop()
    futures = [loop.create_future(), loop.create_future()]

    async def player(me: int) -> None:
        other = 1 - me
        for _ in range(round_trips):
            await futures[me]
            futures[me] = loop.create_future()
            futures[other].set_result(None)

    start = time.perf_counter()
    players = asyncio.gather(player(0), player(1))
    futures[0].set_result(None)
    await players
    return time.perf_counter() - start, round_trips


@dataclass(frozen=True, slots=True)
class Workload:
    name: str
    run: Callable[[int], Coroutine[Any, Any, Measured]]
    unit: str
    higher_is_better: bool  # a rate (operations/s) or a cost (ns/operation)
    quick_size: int
    full_size: int
    doc: str

    def value(self, seconds: float, operations: int) -> float:
        return operations / seconds if self.higher_is_better else seconds * 1e9 / operations

    def cost_ratio(self, value: float, baseline: float) -> float:
        """Time per operation of ``value`` relative to ``baseline`` (> 1: slower)."""
        return baseline / value if self.higher_is_better else value / baseline


WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        Workload(
            "sleep0",
            sleep0,
            "steps/s",
            True,
            800,
            2000,
            f"{SLEEP0_TASKS} tasks looping on `await asyncio.sleep(0)`; size = steps per task",
        ),
        Workload(
            "echo",
            echo,
            "round trips/s",
            True,
            1500,
            2500,
            f"TCP echo on 127.0.0.1, {ECHO_CLIENTS} clients, {len(ECHO_MESSAGE)}-byte messages;"
            " size = round trips per client",
        ),
        Workload(
            "churn",
            churn,
            "ns/task",
            False,
            100,
            250,
            f"create_task of a trivial coroutine, gathered {CHURN_BATCH} at a time; size = batches",
        ),
        Workload(
            "pingpong",
            pingpong,
            "round trips/s",
            True,
            50_000,
            100_000,
            "two tasks passing a future back and forth; size = round trips",
        ),
    )
}

# --------------------------------------------------------------------------------------------
# Variants: name -> how to make a loop factory for each loop kind. The set-up runs in the worker,
# so a variant's imports and global state exist only in its own process.
# --------------------------------------------------------------------------------------------


def _stock_loop() -> LoopFactory:
    return asyncio.SelectorEventLoop


def _uvloop_loop() -> LoopFactory:
    import uvloop

    factory: LoopFactory = uvloop.new_event_loop
    return factory


def _watched_stock_loop() -> LoopFactory:
    import loopwatch

    return loopwatch.new_event_loop


def _watched_uvloop_loop() -> LoopFactory:
    import loopwatch

    return loopwatch.new_uvloop_event_loop


def _with_timer(make: Callable[[], LoopFactory]) -> Callable[[], LoopFactory]:
    """Control: the plain loop plus a self re-arming 10 ms timer, as loopwatch's heartbeat."""

    def setup() -> LoopFactory:
        base = make()

        def factory() -> asyncio.AbstractEventLoop:
            loop = base()
            stamps = [0.0]

            def beat() -> None:
                stamps[0] = time.monotonic()
                loop.call_later(0.01, beat)

            loop.call_soon(beat)
            return loop

        return factory

    return setup


_control_stop = threading.Event()


def _with_thread(make: Callable[[], LoopFactory]) -> Callable[[], LoopFactory]:
    """Control: the plain loop plus a daemon thread waking every 20 ms (as the watchdog does on a
    healthy loop: every heartbeat period to 50 ms) and taking the GIL for a moment."""

    def setup() -> LoopFactory:
        def run() -> None:
            while not _control_stop.wait(0.02):
                time.monotonic()

        threading.Thread(target=run, name="bench-control", daemon=True).start()
        return make()

    return setup


def _stop_thread() -> None:
    _control_stop.set()


def _check_unwatched(loop: asyncio.AbstractEventLoop) -> None:
    if "loopwatch" in sys.modules:
        raise RuntimeError("the baseline imported loopwatch (is LOOPWATCH set?)")


def _check_watched(loop: asyncio.AbstractEventLoop) -> None:
    # Private names on purpose: a benchmark of "the watchdog" that silently measured a loop with
    # no heartbeat or no thread would be worse than one that fails.
    from loopwatch import _loops, _runtime

    state = _loops.state_of(loop)
    runtime = _runtime.current()
    thread = runtime.watchdog.thread if runtime is not None else None
    if state is None or not state.running or thread is None or not thread.is_alive():
        raise RuntimeError("the watchdog variant is not watching its loop")


def _uninstall() -> None:
    import loopwatch

    loopwatch.uninstall()


def _no_teardown() -> None:
    pass


@dataclass(frozen=True, slots=True)
class Variant:
    name: str
    factories: Mapping[str, Callable[[], LoopFactory]]  # loop kind -> set-up returning a factory
    check: Callable[[asyncio.AbstractEventLoop], None]  # called on the running loop; raises
    teardown: Callable[[], None]
    doc: str


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant(
            BASELINE,
            {"asyncio": _stock_loop, "uvloop": _uvloop_loop},
            _check_unwatched,
            _no_teardown,
            "plain loop: `asyncio.SelectorEventLoop` / `uvloop.new_event_loop`, loopwatch not"
            " imported",
        ),
        Variant(
            "watchdog",
            {"asyncio": _watched_stock_loop, "uvloop": _watched_uvloop_loop},
            _check_watched,
            _uninstall,
            "`loopwatch.new_event_loop` / `loopwatch.new_uvloop_event_loop`: heartbeat timer"
            " and watchdog thread",
        ),
        # Controls, run only when asked for (--variants): no loopwatch, one of its costs each.
        Variant(
            "timer-only",
            {"asyncio": _with_timer(_stock_loop), "uvloop": _with_timer(_uvloop_loop)},
            _check_unwatched,
            _no_teardown,
            "control, no loopwatch: the plain loop plus a 10 ms self re-arming `call_later`",
        ),
        Variant(
            "thread-only",
            {"asyncio": _with_thread(_stock_loop), "uvloop": _with_thread(_uvloop_loop)},
            _check_unwatched,
            _stop_thread,
            "control, no loopwatch: the plain loop plus a daemon thread waking every 20 ms",
        ),
    )
}

DEFAULT_VARIANTS = (BASELINE, "watchdog")

# Overhead budgets: (variant, workload) -> largest accepted overhead in percent, on every loop.
BUDGETS: dict[tuple[str, str], float] = {
    ("watchdog", "echo"): 2.0,
    ("watchdog", "sleep0"): 5.0,
}

# --------------------------------------------------------------------------------------------
# The worker: one process, one (workload, variant, loop kind), a warm-up then timed runs.
# --------------------------------------------------------------------------------------------


def worker(spec: Mapping[str, Any]) -> dict[str, Any]:
    workload = WORKLOADS[spec["workload"]]
    variant = VARIANTS[spec["variant"]]
    factory = variant.factories[spec["loop"]]()
    size = int(spec["size"])
    values: list[float] = []

    async def check() -> None:
        variant.check(asyncio.get_running_loop())

    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(check())
        for i in range(int(spec["warmup"]) + int(spec["repeats"])):
            gc.collect()
            seconds, operations = runner.run(workload.run(size))
            if i >= int(spec["warmup"]):
                values.append(workload.value(seconds, operations))
    variant.teardown()
    module = sys.modules.get("loopwatch")
    return {
        "value": statistics.median(values),
        "runs": values,
        "loopwatch": getattr(module, "__file__", None) if module is not None else None,
    }


def child_env(source: Path | None) -> dict[str, str]:
    """The environment of every child: this one without LOOPWATCH*, loopwatch's log off.

    Bytecode is cached under the temporary directory (``PYTHONPYCACHEPREFIX``), even when
    ``PYTHONDONTWRITEBYTECODE`` is set: an installed package has its ``.pyc`` files, and recompiling
    loopwatch in every process would be charged to it. With ``source`` (a ``--ref`` snapshot), that
    copy of loopwatch comes first on the path, before the installed one.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOPWATCH")}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = str(Path(tempfile.gettempdir()) / "loopwatch-bench-pycache")
    env["LOOPWATCH_LOG"] = "off"
    if source is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(source), env.get("PYTHONPATH")]))
    return env


def run_worker(
    script: Path, spec: Mapping[str, Any], env: Mapping[str, str], source: Path | None
) -> float:
    command = [sys.executable, str(script), "--worker", json.dumps(dict(spec))]
    done = subprocess.run(
        command, env=dict(env), capture_output=True, text=True, timeout=300, check=False
    )
    if done.returncode != 0 or done.stderr.strip():
        raise RuntimeError(
            f"worker {dict(spec)} failed (exit {done.returncode}):\n{done.stderr}{done.stdout}"
        )
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    imported = result["loopwatch"]
    if source is not None and imported is not None and not Path(imported).is_relative_to(source):
        raise RuntimeError(f"worker {dict(spec)} imported {imported}, not the snapshot {source}")
    return float(result["value"])


@contextmanager
def workspace(ref: str | None) -> Iterator[tuple[Path, Path | None, str]]:
    """A temporary directory holding a copy of this script (workers run the copy, so editing
    ``bench.py`` during a run changes nothing) and, with ``ref``, ``loopwatch/`` as of that git
    ref. Yields the script, the loopwatch source to use (None: as installed) and a description."""
    with tempfile.TemporaryDirectory(prefix="loopwatch-bench-") as tmp:
        script = Path(tmp) / HERE.name
        shutil.copy2(HERE, script)
        if ref is None:
            spec = importlib.util.find_spec("loopwatch")
            where = Path(spec.origin).parent if spec is not None and spec.origin else "not found"
            yield (
                script,
                None,
                f"{_version('loopwatch')} as installed ({where}; git {_git_state()})",
            )
            return
        commit = _git("rev-parse", "--verify", f"{ref}^{{commit}}")
        source = Path(tmp) / "source"
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", "--format=tar", commit, "loopwatch"],
            capture_output=True,
            check=True,
        ).stdout
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(source, filter="data")
        yield script, source, f"git {commit[:12]} ({ref}), exported from {REPO}"


# --------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------


def spread(values: Sequence[float]) -> tuple[float, float, str]:
    """The interquartile range with 5 values or more, else min-max; and which one it is."""
    if len(values) >= 5:
        q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
        return q1, q3, "IQR"
    return min(values), max(values), "min-max"


def median_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """A distribution-free confidence interval for the median (from the sign test): the k-th
    smallest and k-th largest values, k as large as keeps the coverage at ``level`` or above.
    Returns (low, high, coverage); with few values the coverage is lower (3 values: 75%)."""
    ordered = sorted(values)
    n = len(ordered)

    def coverage(k: int) -> float:  # P(x_(k) <= median <= x_(n+1-k)) = 1 - 2 P(Bin(n, 1/2) < k)
        return 1.0 - 2.0 * sum(math.comb(n, i) for i in range(k)) / 2.0**n

    k = 1
    while k + 1 <= (n + 1) // 2 and coverage(k + 1) >= level:
        k += 1
    return ordered[k - 1], ordered[n - k], coverage(k)


@dataclass(slots=True)
class Cell:
    """All rounds of one (workload, loop kind, variant)."""

    workload: str
    loop: str
    variant: str
    values: list[float] = field(default_factory=list)  # one per round, in round order

    @property
    def median(self) -> float:
        return statistics.median(self.values)


@dataclass(frozen=True, slots=True)
class Comparison:
    """A variant against the baseline of the same workload and loop kind."""

    ratio: float  # variant median / baseline median, in the workload's own unit
    overhead: float  # extra time per operation that ratio means, percent (> 0: slower)
    # The overhead within each round (the variant against the baseline run next to it in time):
    # its median and a confidence interval for that median.
    paired: float
    ci_low: float
    ci_high: float
    ci_level: float


def compare(workload: Workload, cell: Cell, base: Cell) -> Comparison:
    paired = [
        (workload.cost_ratio(v, b) - 1.0) * 100.0
        for v, b in zip(cell.values, base.values, strict=True)
    ]
    low, high, level = median_interval(paired)
    return Comparison(
        ratio=cell.median / base.median,
        overhead=(workload.cost_ratio(cell.median, base.median) - 1.0) * 100.0,
        paired=statistics.median(paired),
        ci_low=low,
        ci_high=high,
        ci_level=level,
    )


# --------------------------------------------------------------------------------------------
# Start-up: what the .pth line costs a process that does not ask for loopwatch, and one that does.
# --------------------------------------------------------------------------------------------

STARTUP_SNIPPETS = ("pass", "import asyncio")
STARTUP_SETTINGS = ("unset", "1")


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


def measure_startup(
    env: Mapping[str, str], wall_runs: int, importtime_runs: int
) -> list[StartupRow]:
    rows = {(s, v): StartupRow(s, v) for s in STARTUP_SNIPPETS for v in STARTUP_SETTINGS}
    envs = {v: dict(env) if v == "unset" else {**env, "LOOPWATCH": v} for v in STARTUP_SETTINGS}
    order = list(rows)
    log(f"start-up: {wall_runs} wall-time runs and {importtime_runs} -X importtime runs each")
    for row in rows.values():  # warm-up: fill the bytecode cache, the page cache
        for _ in range(2):
            subprocess.run([sys.executable, "-c", row.snippet], env=envs[row.setting], check=True)
    for i in range(max(wall_runs, importtime_runs)):
        for key in order if i % 2 == 0 else reversed(order):
            row = rows[key]
            env = envs[row.setting]
            if i < wall_runs:
                start = time.perf_counter()
                subprocess.run(
                    [sys.executable, "-c", row.snippet],
                    env=env,
                    check=True,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                row.wall_ms.append((time.perf_counter() - start) * 1000.0)
            if i < importtime_runs:
                done = subprocess.run(
                    [sys.executable, "-X", "importtime", "-c", row.snippet],
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


# --------------------------------------------------------------------------------------------
# The run and its report
# --------------------------------------------------------------------------------------------


@dataclass(slots=True)
class Results:
    meta: dict[str, Any]
    workloads: list[str]
    loops: list[str]
    variants: list[str]
    cells: dict[tuple[str, str, str], Cell]
    startup: list[StartupRow]


def _git(*args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(REPO), *args], capture_output=True, text=True, check=True
    ).stdout.strip()


def _git_state() -> str:
    try:
        head = _git("rev-parse", "--short=12", "HEAD")
        dirty = _git("status", "--porcelain", "--", "loopwatch")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{head} plus uncommitted changes in loopwatch/" if dirty else head


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine_info(
    mode: str, rounds: int, warmup: int, repeats: int, loopwatch: str
) -> dict[str, Any]:
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "executable": sys.executable,
        "loopwatch": loopwatch,
        "uvloop": _version("uvloop"),
        "mode": mode,
        "rounds": rounds,
        "warmup": warmup,
        "repeats": repeats,
    }


def run_all(args: argparse.Namespace) -> Results:
    with workspace(args.ref) as (script, source, description):
        return _run_all(args, script, child_env(source), source, description)


def _run_all(
    args: argparse.Namespace,
    script: Path,
    env: Mapping[str, str],
    source: Path | None,
    description: str,
) -> Results:
    mode = "quick" if args.quick else "full"
    rounds = args.rounds or (3 if args.quick else 15)
    warmup, repeats = 1, 3
    workloads = args.workloads
    variants = [BASELINE, *[v for v in args.variants if v != BASELINE]]
    loops = [k for k in args.loops if k != "uvloop" or importlib.util.find_spec("uvloop")]
    if loops != args.loops:
        log("uvloop is not installed: its rows are skipped")
    cells = {(w, k, v): Cell(w, k, v) for w in workloads for k in loops for v in variants}
    started = time.monotonic()
    meta = machine_info(mode, rounds, warmup, repeats, description)
    log(f"loopwatch: {description}")
    rng = random.Random(20240601)
    for r in range(rounds):
        for w in workloads:
            workload = WORKLOADS[w]
            size = workload.quick_size if args.quick else workload.full_size
            for k in loops:
                # A B, then B A, ...: within a round both orders are used equally over the run.
                order = variants[:] if r % 2 == 0 else variants[::-1]
                if len(order) > 2:
                    rng.shuffle(order)
                for v in order:
                    spec = {
                        "workload": w,
                        "variant": v,
                        "loop": k,
                        "size": size,
                        "warmup": warmup,
                        "repeats": repeats,
                    }
                    cells[(w, k, v)].values.append(run_worker(script, spec, env, source))
        log(f"round {r + 1}/{rounds} done ({time.monotonic() - started:.0f} s)")
    startup = (
        []
        if args.no_startup
        else measure_startup(
            env, wall_runs=20 if args.quick else 40, importtime_runs=5 if args.quick else 10
        )
    )
    meta["elapsed_s"] = round(time.monotonic() - started, 1)
    return Results(meta, workloads, loops, variants, cells, startup)


def _num(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:,.2f}"


def _pct(value: float) -> str:
    return f"{value:+.1f}%"


def budget_lines(results: Results) -> list[tuple[bool, str]]:
    lines: list[tuple[bool, str]] = []
    for (variant, w), limit in BUDGETS.items():
        if variant not in results.variants or w not in results.workloads:
            continue
        workload = WORKLOADS[w]
        for k in results.loops:
            c = compare(workload, results.cells[(w, k, variant)], results.cells[(w, k, BASELINE)])
            met = c.overhead <= limit
            if c.ci_high <= limit or c.ci_low > limit:
                sure = "clearly: the whole interval is on this side"
            else:
                sure = "not clearly: the interval straddles the budget, more rounds would tell"
            lines.append(
                (
                    met,
                    f"**{'met' if met else 'MISSED'}**: {variant} overhead on {w}, {k}:"
                    f" {c.overhead:+.2f}% (budget <= {limit:g}%); paired {c.paired:+.2f}%,"
                    f" {c.ci_level:.0%} CI {_pct(c.ci_low)} to {_pct(c.ci_high)}; {sure}",
                )
            )
    return lines


def render_markdown(results: Results) -> str:
    m = results.meta
    out = [
        "# loopwatch benchmarks",
        "",
        f"- Date: {m['date']}",
        f"- Machine: {m['cpu_count']} CPUs ({m['cpu']}), {m['platform']}",
        f"- Python: {m['python']} ({m['executable']})",
        f"- loopwatch {m['loopwatch']}; uvloop {m['uvloop']}",
        f"- Mode: {m['mode']}: {m['rounds']} rounds; each value is one fresh process"
        f" ({m['warmup']} warm-up run, median of {m['repeats']} timed runs); variants interleaved"
        f" within each round; {m['elapsed_s']} s in all",
        "",
        "## Budgets",
        "",
    ]
    out += [f"- {text}" for _, text in budget_lines(results)] or ["- (no budgeted pair was run)"]
    out += [
        "",
        "## Overhead",
        "",
        "`median` and its spread (IQR from 5 rounds on, else min to max) are over the rounds."
        " `vs off` is the variant's median over the `off` median of the same loop, in the"
        " workload's unit; `overhead` is the extra time per operation that implies (positive:"
        " slower). `paired` is the median of the overhead computed within each round (against"
        " the `off` run next to it in time), with a distribution-free confidence interval for"
        " that median: the uncertainty of the overhead.",
        "",
        "| workload | loop | variant | median | spread of rounds | vs off | overhead"
        " | paired (CI) |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for w in results.workloads:
        workload = WORKLOADS[w]
        for k in results.loops:
            base = results.cells[(w, k, BASELINE)]
            for v in results.variants:
                cell = results.cells[(w, k, v)]
                low, high, kind = spread(cell.values)
                rel = (high - low) / cell.median * 100.0
                row = [
                    w,
                    k,
                    v,
                    f"{_num(cell.median)} {workload.unit}",
                    f"{_num(low)} - {_num(high)} ({kind}, {rel:.1f}%)",
                ]
                if v == BASELINE:
                    row += ["1", "", ""]
                else:
                    c = compare(workload, cell, base)
                    row += [
                        f"{c.ratio:.3f}",
                        _pct(c.overhead),
                        f"{_pct(c.paired)} ({c.ci_level:.0%}: {_pct(c.ci_low)} to"
                        f" {_pct(c.ci_high)})",
                    ]
                out.append("| " + " | ".join(row) + " |")
    out += ["", "Workloads:", ""]
    out += [f"- `{w}`: {WORKLOADS[w].doc}" for w in results.workloads]
    out += ["", "Variants:", ""]
    out += [f"- `{v}`: {VARIANTS[v].doc}" for v in results.variants]
    if results.startup:
        out += render_startup(results.startup)
    return "\n".join(out) + "\n"


def render_startup(rows: list[StartupRow]) -> list[str]:
    out = [
        "",
        "## Start-up",
        "",
        f"Wall time of a whole `python -c ...` process (median, IQR over {len(rows[0].wall_ms)}"
        " interleaved runs) and, from `python -X importtime`, the import time of loopwatch's own"
        " modules (`self`) and of everything the outermost loopwatch imports pulled in"
        f" (`cumulative`), median of {len(rows[0].self_us)} runs.",
        "",
        "| command | LOOPWATCH | wall time | loopwatch self | loopwatch cumulative |",
        "|---|---|---:|---:|---:|",
    ]
    walls: dict[tuple[str, str], float] = {}
    for row in rows:
        q1, q3, _ = spread(row.wall_ms)
        wall = walls[(row.snippet, row.setting)] = statistics.median(row.wall_ms)
        out.append(
            f'| `python -c "{row.snippet}"` | {row.setting} | {wall:.1f} ms ({q1:.1f} - {q3:.1f})'
            f" | {statistics.median(row.self_us):,.0f} us"
            f" | {statistics.median(row.cumulative_us):,.0f} us |"
        )
    out.append("")
    for snippet in STARTUP_SNIPPETS:
        base, on = walls[(snippet, "unset")], walls[(snippet, "1")]
        out.append(
            f'- `python -c "{snippet}"`: LOOPWATCH=1 costs {on - base:+.1f} ms'
            f" ({(on / base - 1.0) * 100.0:+.1f}%) over LOOPWATCH unset."
        )
    for row in rows:
        if row.modules:
            names = ", ".join(f"`{n}`" for n in row.modules)
            out.append(f"- Imported by `{row.snippet}` with LOOPWATCH={row.setting}: {names}.")
        elif row.setting == "unset":
            out.append(f"- `{row.snippet}` with LOOPWATCH unset imports no loopwatch module.")
    return out


def results_json(results: Results) -> dict[str, Any]:
    return {
        "meta": results.meta,
        "budgets": [{"met": met, "text": text} for met, text in budget_lines(results)],
        "cells": [
            {
                "workload": c.workload,
                "loop": c.loop,
                "variant": c.variant,
                "unit": WORKLOADS[c.workload].unit,
                "values": c.values,
                "median": c.median,
            }
            for c in results.cells.values()
        ],
        "startup": [
            {
                "snippet": r.snippet,
                "loopwatch": r.setting,
                "wall_ms": r.wall_ms,
                "self_us": r.self_us,
                "cumulative_us": r.cumulative_us,
                "modules": r.modules,
            }
            for r in results.startup
        ],
    }


def results_from_json(data: Mapping[str, Any]) -> Results:
    """The inverse of :func:`results_json`, to render a saved run again (``--report``)."""
    cells: dict[tuple[str, str, str], Cell] = {}
    for c in data["cells"]:
        cells[(c["workload"], c["loop"], c["variant"])] = Cell(
            c["workload"], c["loop"], c["variant"], [float(v) for v in c["values"]]
        )
    startup = [
        StartupRow(
            r["snippet"],
            r["loopwatch"],
            r["wall_ms"],
            r["self_us"],
            r["cumulative_us"],
            r["modules"],
        )
        for r in data["startup"]
    ]
    return Results(
        meta=dict(data["meta"]),
        workloads=list(dict.fromkeys(w for w, _, _ in cells)),
        loops=list(dict.fromkeys(k for _, k, _ in cells)),
        variants=list(dict.fromkeys(v for _, _, v in cells)),
        cells=cells,
        startup=startup,
    )


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _names(known: Sequence[str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        names = [n.strip() for n in text.split(",") if n.strip()]
        unknown = [n for n in names if n not in known]
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(known)}")
        return names

    return parse


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="3 rounds, small sizes (~1 min; the default full run ~8 min)",
    )
    parser.add_argument("--rounds", type=int, help="override the number of rounds")
    parser.add_argument("--json", metavar="OUT", type=Path, help="write raw results as JSON")
    parser.add_argument("--markdown", metavar="FILE", type=Path, help="also write the table")
    parser.add_argument(
        "--workloads",
        type=_names(list(WORKLOADS)),
        default=list(WORKLOADS),
        help=f"comma-separated subset of {','.join(WORKLOADS)}",
    )
    parser.add_argument(
        "--variants",
        type=_names(list(VARIANTS)),
        default=list(DEFAULT_VARIANTS),
        help=f"comma-separated, from {','.join(VARIANTS)} (default"
        f" {','.join(DEFAULT_VARIANTS)}; {BASELINE} is always run)",
    )
    parser.add_argument(
        "--ref",
        help="measure loopwatch as of this git ref (exported to a"
        " temporary directory) instead of the installed working tree",
    )
    parser.add_argument(
        "--loops",
        type=_names(list(LOOP_KINDS)),
        default=list(LOOP_KINDS),
        help="comma-separated subset of asyncio,uvloop",
    )
    parser.add_argument("--no-startup", action="store_true", help="skip the start-up section")
    parser.add_argument(
        "--report",
        metavar="JSON",
        type=Path,
        help="render a run saved with --json again instead of running anything",
    )
    parser.add_argument("--worker", metavar="SPEC", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    if args.report:
        results = results_from_json(json.loads(args.report.read_text()))
    else:
        results = run_all(args)
    text = render_markdown(results)
    sys.stdout.write(text)
    if args.markdown:
        args.markdown.write_text(text)
    if args.json:
        args.json.write_text(json.dumps(results_json(results), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
