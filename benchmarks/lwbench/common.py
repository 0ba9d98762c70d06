"""What every part of the benchmark shares: the loop kinds and the baseline, where the files are,
the interpreter of the child processes, and ``log`` (progress, to standard error)."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from pathlib import Path

LoopFactory = Callable[[], asyncio.AbstractEventLoop]
# How one process's value is taken from its timed runs (--within), as the report words it.
WITHIN = {"best": "the fastest", "median": "the median"}
Measured = tuple[float, int]  # (seconds, operations) of one timed run
# This package, bench.py beside it (the script the workers run, in their copy), and the repository.
PACKAGE = Path(__file__).resolve().parent
BENCHMARKS = PACKAGE.parent
SCRIPT = BENCHMARKS / "bench.py"
REPO = BENCHMARKS.parent
# The interpreter of the workers and start-up runs (--python; by default this one). bench.py sets
# it for the whole run, so read it as ``common.PYTHON`` when it is used, never imported by name.
PYTHON = sys.executable
LOOP_KINDS = ("asyncio", "uvloop")
BASELINE = "off"
REQUIREMENTS_HINT = "python -m pip install -r benchmarks/requirements.txt"


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
