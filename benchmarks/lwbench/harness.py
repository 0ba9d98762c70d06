"""The parent side of a run: the workers' copy of the benchmark and their environment, the
interleaved rounds of worker processes, the probe and memory passes, and what is recorded of
the machine and the interpreter. ``run_all`` returns the ``Results``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import io
import json
import os
import platform
import random
import shutil
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from . import common
from .common import BASELINE, PACKAGE, REPO, REQUIREMENTS_HINT, SCRIPT, log
from .startup import StartupRow, measure_startup, pth_line_ns
from .stats import Cell
from .variants import VARIANTS
from .workloads import HTTP_CONNECTIONS, HTTP_PLAN, HTTP_THREADS, WORKLOADS, WRK_INSTALL


@dataclass(slots=True)
class Results:
    meta: dict[str, Any]
    workloads: list[str]
    loops: list[str]
    variants: list[str]
    cells: dict[tuple[str, str, str], Cell]
    startup: list[StartupRow]
    memory: list[dict[str, Any]] = field(default_factory=list)  # one per (variant, loop kind)
    probes: list[dict[str, Any]] = field(default_factory=list)  # one per (variant, loop kind)


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
) -> dict[str, Any]:
    command = [common.PYTHON, str(script), "--worker", json.dumps(dict(spec))]
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
    return result


@contextmanager
def workspace(ref: str | None) -> Iterator[tuple[Path, Path | None, str]]:
    """A temporary directory holding a copy of ``bench.py`` and of this package (workers run the
    copy, so editing either during a run changes nothing) and, with ``ref``, ``loopwatch/`` as of
    that git ref. Yields the script, the loopwatch source to use (None: as installed) and a
    description."""
    with tempfile.TemporaryDirectory(prefix="loopwatch-bench-") as tmp:
        script = Path(tmp) / SCRIPT.name
        shutil.copy2(SCRIPT, script)
        shutil.copytree(
            PACKAGE, Path(tmp) / PACKAGE.name, ignore=shutil.ignore_patterns("__pycache__")
        )
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
        paths = ["loopwatch"]
        if _git("ls-tree", "--name-only", commit, "hatch_build.py"):
            paths.append("hatch_build.py")
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", "--format=tar", commit, *paths],
            capture_output=True,
            check=True,
        ).stdout
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(source, filter="data")
        compiled = ""
        if (source / "hatch_build.py").exists():
            # The snapshot's compiled hot paths, built as an install would build them, for the
            # workers' interpreter; without them the compiled variants fail their check.
            built = subprocess.run(
                [common.PYTHON, str(source / "hatch_build.py"), str(source)], check=False
            )
            compiled = (
                ", with its compiled module built"
                if built.returncode == 0
                else ", its compiled module NOT built (the warning above says why)"
            )
        yield script, source, f"git {commit[:12]} ({ref}), exported from {REPO}{compiled}"


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


def _load() -> str:
    """The 1, 5 and 15 minute load averages: how busy the machine was besides this run."""
    try:
        return " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine_info(
    mode: str, rounds: int, warmup: int, repeats: int, loopwatch: str, target: Mapping[str, Any]
) -> dict[str, Any]:
    return {
        "load_start": _load(),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": target["python"],
        "executable": common.PYTHON,
        "loopwatch": loopwatch,
        "uvloop": target["versions"].get("uvloop") or "not installed",
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
    rounds = args.rounds or (3 if args.quick else 12)
    warmup, repeats = 1, 3
    http_warmup, http_repeats, http_cap = HTTP_PLAN[mode]
    http_rounds = min(rounds, args.http_rounds or http_cap)
    target = interpreter_info(
        sorted({m for v in VARIANTS.values() for m in v.requires} | set(HTTP_MODULES) | {"uvloop"})
    )
    workloads = [w for w in args.workloads if _workload_runs(w, target)]
    variants = [BASELINE, *[v for v in args.variants if v != BASELINE]]
    for v in variants[:]:
        missing = [m for m in VARIANTS[v].requires if not target["importable"][m]]
        if missing:
            log(f"variant {v} skipped: {', '.join(missing)} not installed ({REQUIREMENTS_HINT})")
            variants.remove(v)
    loops = [k for k in args.loops if k != "uvloop" or target["importable"]["uvloop"]]
    if loops != args.loops:
        log("uvloop is not installed: its rows are skipped")
    cells = {(w, k, v): Cell(w, k, v) for w in workloads for k in loops for v in variants}
    started = time.monotonic()
    meta = machine_info(mode, rounds, warmup, repeats, description, target)
    meta["within"] = args.within
    meta["http"] = {
        "rounds": http_rounds,
        "warmup": http_warmup,
        "repeats": http_repeats,
        "seconds": WORKLOADS["http-aiohttp"].quick_size
        if args.quick
        else WORKLOADS["http-aiohttp"].full_size,
        "connections": HTTP_CONNECTIONS,
        "threads": HTTP_THREADS,
        "wrk": _wrk_version(),
        "packages": target["versions"],
    }
    log(f"loopwatch: {description}; Python {target['python']} ({common.PYTHON})")
    probes = [] if args.no_probe else run_probes(script, env, source, variants, loops)
    rng = random.Random(20240601)
    for r in range(rounds):
        for w in workloads:
            workload = WORKLOADS[w]
            if workload.http and r >= http_rounds:
                continue
            size = workload.quick_size if args.quick else workload.full_size
            for k in loops:
                # A B, then B A, ...: within a round both orders are used equally over the run.
                order = variants[:] if r % 2 == 0 else variants[::-1]
                if len(order) > 2:
                    rng.shuffle(order)
                for v in order:
                    scale = 1.0 if workload.http else VARIANTS[v].scale
                    spec = {
                        "workload": w,
                        "variant": v,
                        "loop": k,
                        "size": max(1, round(size * scale)),
                        "warmup": http_warmup if workload.http else warmup,
                        "repeats": http_repeats if workload.http else repeats,
                    }
                    result = run_worker(script, spec, env, source)
                    runs = [float(x) for x in result["runs"]]
                    cell = cells[(w, k, v)]
                    cell.runs.append(runs)
                    value = workload.within(runs, args.within)
                    cell.values.append(value)
                    cell.wakes.append(result.get("wakes_per_s"))
                    if result.get("latency"):
                        chosen = min(range(len(runs)), key=lambda i: abs(runs[i] - value))
                        cell.latency.append(result["latency"][chosen])
        log(f"round {r + 1}/{rounds} done ({time.monotonic() - started:.0f} s)")
    memory = (
        []
        if args.no_memory
        else measure_memory(script, env, source, variants, loops, quick=args.quick)
    )
    startup = (
        []
        if args.no_startup
        else measure_startup(
            env, wall_runs=20 if args.quick else 40, importtime_runs=5 if args.quick else 10
        )
    )
    if not args.no_startup:
        meta["pth_line_ns"] = pth_line_ns(env)
    meta["load_end"] = _load()
    meta["elapsed_s"] = round(time.monotonic() - started, 1)
    return Results(meta, workloads, loops, variants, cells, startup, memory, probes)


HTTP_MODULES = ("aiohttp", "uvicorn", "starlette")


def _workload_runs(name: str, target: Mapping[str, Any]) -> bool:
    """Whether ``name`` can run here (an HTTP workload needs wrk and its server packages)."""
    if not WORKLOADS[name].http:
        return True
    needed = ("aiohttp",) if name == "http-aiohttp" else ("uvicorn", "starlette")
    missing = [m for m in needed if not target["importable"][m]]
    if missing:
        log(f"workload {name} skipped: {', '.join(missing)} not installed ({REQUIREMENTS_HINT})")
        return False
    if shutil.which("wrk") is None:
        log(f"workload {name} skipped: wrk, the load generator, is not installed: {WRK_INSTALL}")
        return False
    return True


def _wrk_version() -> str:
    if shutil.which("wrk") is None:
        return "not installed"
    done = subprocess.run(["wrk", "--version"], capture_output=True, text=True, check=False)
    return (done.stdout or done.stderr).split("\n")[0].strip() or "unknown"


INTERPRETER_QUERY = """
import importlib.metadata, importlib.util, json, platform, sys
def ok(m):
    try:
        return importlib.util.find_spec(m) is not None
    except ModuleNotFoundError:
        return False
def version(d):
    try:
        return importlib.metadata.version(d)
    except importlib.metadata.PackageNotFoundError:
        return None
names = sys.argv[1:]
print(json.dumps({
    "python": f"{platform.python_implementation()} {platform.python_version()}",
    "importable": {m: ok(m) for m in names},
    "versions": {d: version(d) for d in ("uvloop", "aiohttp", "uvicorn", "starlette", "httptools",
        "aiodebug", "pyleak", "opentelemetry-instrumentation-asyncio", "opentelemetry-sdk")},
}))
"""


def interpreter_info(modules: Sequence[str]) -> dict[str, Any]:
    """The Python that runs the workers (``--python``): its version, which of ``modules`` it
    can import, and the versions of the packages the benchmark drives."""
    done = subprocess.run(
        [common.PYTHON, "-c", INTERPRETER_QUERY, *modules],
        capture_output=True,
        text=True,
        check=True,
    )
    info: dict[str, Any] = json.loads(done.stdout)
    return info


def run_probes(
    script: Path,
    env: Mapping[str, str],
    source: Path | None,
    variants: Sequence[str],
    loops: Sequence[str],
) -> list[dict[str, Any]]:
    """One process per (variant, loop kind), the thresholds lowered: does the variant report a
    callback that blocked past the slow-callback threshold, and a loop still blocked past the
    stall threshold while it is?"""
    probed = [v for v in variants if VARIANTS[v].group in ("loopwatch", "alternative")]
    log(f"probe: what {len(probed)} variants detect, on {len(loops)} loops")
    rows = []
    for k in loops:
        for v in probed:
            result = run_worker(script, {"kind": "probe", "variant": v, "loop": k}, env, source)
            rows.append({"variant": v, "loop": k, **{x: result[x] for x in PROBE_KEYS}})
    return rows


PROBE_KEYS = ("slow", "slow_block_stalls", "stall_while_blocked", "otel_coroutines")


# Memory: what loopwatch keeps per live task, and what is left after many tasks have come and
# gone, measured by one worker per (variant, loop kind).
# Pending tasks at once, smallest first (each set is finished before the next). loopwatch's
# live-task dict is part of the cost per task, and that part depends on where N falls between
# two resizes of the dict: several N show the range.
LIVE_TASKS = {"quick": (10_000, 30_000), "full": (10_000, 30_000, 100_000)}
CHURN_TASKS = {"quick": 100_000, "full": 1_000_000}
TRACED_TASKS = {"quick": 10_000, "full": 20_000}


def measure_memory(
    script: Path,
    env: Mapping[str, str],
    source: Path | None,
    variants: Sequence[str],
    loops: Sequence[str],
    *,
    quick: bool,
) -> list[dict[str, Any]]:
    """One fresh process per (variant, loop kind): tracemalloc bytes of N pending tasks, then
    the churn workload for many tasks with the state before and after. Allocation counts do not
    drift with the machine's load the way times do, so one process each is enough."""
    mode = "quick" if quick else "full"
    pending = " / ".join(f"{n:,}" for n in LIVE_TASKS[mode])
    log(
        f"memory: {pending} pending tasks, {CHURN_TASKS[mode]:,} churned"
        f" (+2 x {TRACED_TASKS[mode]:,} traced) per variant and loop"
    )
    rows: list[dict[str, Any]] = []
    for k in loops:
        for v in variants:
            spec = {
                "kind": "memory",
                "variant": v,
                "loop": k,
                "live_tasks": list(LIVE_TASKS[mode]),
                "churn_tasks": CHURN_TASKS[mode],
                "traced_tasks": TRACED_TASKS[mode],
            }
            result = run_worker(script, spec, env, source)
            rows.append({"variant": v, "loop": k, "live": result["live"], "churn": result["churn"]})
    return rows
