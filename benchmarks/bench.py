#!/usr/bin/env python3
"""loopwatch overhead benchmarks: what watching a loop costs, as a ratio to the same loop unwatched.

Run ``python benchmarks/bench.py --quick`` (about 8 minutes on 2 cores, 3 without the HTTP
services) or ``python benchmarks/bench.py`` (about 45 minutes); see ``benchmarks/README.md`` for
how to read the output. Besides speed, it measures memory (per live task, and after a million
tasks have come and gone), start-up (what the ``.pth`` line costs with LOOPWATCH unset and set),
two HTTP services under wrk, and the alternatives users run today, with a probe of what each one
really detects.

Every measurement runs in a fresh interpreter (this file, re-run with ``--worker``), so loopwatch's
process-wide state and imports never leak from one variant into another. Variants are interleaved
round by round, so slow drift of the machine falls on all of them alike, and the conclusions are
drawn from ratios to the unwatched loop of the same kind, never from absolute numbers.

Adding a variant is one entry in ``VARIANTS``, in ``lwbench/variants.py``: a loop factory per loop
kind, made inside the worker, plus a check that the variant really is what it claims. The parts
(workloads, variants, the worker and the harness, statistics, the report) are the modules of
``lwbench/``, beside this file; this file is the command line.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

# The package beside this file (benchmarks/lwbench/, or the workers' copy of both), importable
# from any working directory.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from lwbench import common
from lwbench.common import BASELINE, LOOP_KINDS, WITHIN
from lwbench.docs import write_docs
from lwbench.harness import run_all
from lwbench.report import render_markdown, results_from_json, results_json
from lwbench.variants import DEFAULT_VARIANTS, VARIANTS
from lwbench.worker import worker
from lwbench.workloads import DEFAULT_WORKLOADS, WORKLOADS


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
        help="3 rounds (HTTP: 2), small sizes (~8 min on 2 cores; the default full run:"
        " 12 rounds, HTTP 6, ~45 min)",
    )
    parser.add_argument("--rounds", type=int, help="override the number of rounds")
    parser.add_argument(
        "--within",
        choices=list(WITHIN),
        help="each process's value from its timed runs: the fastest (best, the default: other"
        " programs on the machine only ever slow a run down) or the median; with --report, the"
        " run's own choice unless given",
    )
    parser.add_argument("--json", metavar="OUT", type=Path, help="write raw results as JSON")
    parser.add_argument("--markdown", metavar="FILE", type=Path, help="also write the table")
    parser.add_argument(
        "--workloads",
        type=_names(list(WORKLOADS)),
        default=list(DEFAULT_WORKLOADS),
        help=f"comma-separated, from {','.join(WORKLOADS)} (default {','.join(DEFAULT_WORKLOADS)})",
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
    parser.add_argument("--no-memory", action="store_true", help="skip the memory section")
    parser.add_argument(
        "--report",
        metavar="JSON",
        type=Path,
        help="render a run saved with --json again instead of running anything",
    )
    parser.add_argument(
        "--python",
        metavar="PATH",
        help="run the workers and start-up measurements with this interpreter (another venv's"
        " python, with loopwatch installed) instead of this one",
    )
    parser.add_argument(
        "--http-rounds",
        type=int,
        help="rounds of the HTTP workloads (default: at most 2 with --quick, 6 otherwise)",
    )
    parser.add_argument(
        "--no-probe", action="store_true", help="skip the probe of what each variant detects"
    )
    parser.add_argument(
        "--docs",
        metavar="PAGE",
        type=Path,
        help="write the documentation page (e.g. docs/benchmarks.md) and its chart"
        " (assets/benchmarks.png next to it)",
    )
    parser.add_argument(
        "--also",
        metavar="JSON",
        type=Path,
        action="append",
        default=[],
        help="with --docs: runs saved with --json on other Pythons, for a cross-Python summary",
    )
    parser.add_argument("--worker", metavar="SPEC", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.python:
        common.PYTHON = str(Path(args.python).absolute())  # one setting for the whole run
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    if args.report:
        results = results_from_json(json.loads(args.report.read_text()), args.within)
    else:
        args.within = args.within or "best"
        results = run_all(args)
    text = render_markdown(results)
    sys.stdout.write(text)
    if args.markdown:
        args.markdown.write_text(text)
    if args.json:
        args.json.write_text(json.dumps(results_json(results), indent=2) + "\n")
    if args.docs:
        others = [results_from_json(json.loads(path.read_text())) for path in args.also]
        write_docs(results, others, args.docs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
