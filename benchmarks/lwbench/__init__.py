"""The parts of the loopwatch overhead benchmark; ``benchmarks/bench.py`` is the command.

- ``common``: what every part shares (loop kinds, the baseline, paths, the workers' interpreter)
- ``workloads``: what is timed, the HTTP services under wrk included
- ``setups``: how loopwatch's variants, the controls and the diagnostics make and check a loop
- ``alternatives``: the same for the tools users run today, with their reports counted
- ``variants``: the table of variants (``VARIANTS``), the default set, the per-unit pairs
- ``budgets``: the budgets, and their met / MISSED lines
- ``worker``: what one ``bench.py --worker`` process measures (speed, memory, or the probe)
- ``harness``: the parent: the workers' copy and environment, interleaved rounds, ``run_all``
- ``stats``: medians, spreads, paired comparisons and their confidence intervals
- ``startup``: what the ``.pth`` line and ``LOOPWATCH=1`` cost a fresh interpreter
- ``report``: the Markdown report, and the run as JSON and back
- ``chart``, ``docs``: the documentation page (``--docs``) and its chart
"""
