#!/usr/bin/env python3
"""Run popular asyncio libraries' own test suites with and without loopwatch, test by test.

Purpose: prove that a program watched by loopwatch behaves exactly as it does unwatched, and that
what loopwatch reports is true. Each library's own test suite, taken from its PyPI sdist, is run
in several modes, each a separate pytest process with the same Python and the same venv:

``plain``
    no loopwatch: ``LOOPWATCH`` unset, ``pytest -p no:loopwatch``.
``watched``
    ``LOOPWATCH=1`` (zero-code activation through loopwatch's ``.pth`` file), stock asyncio,
    ``-p no:loopwatch``, ``LOOPWATCH_LOG=json`` and ``LOOPWATCH_LOG_FILE=<file>``: every finding
    of the run (and of its subprocesses, which inherit the variables) is one JSON line there.
``plain-uvloop``
    as ``plain``, but every loop the suite makes through the event loop policy is a uvloop loop
    (see "How uvloop is forced" below). Not asked for by loopwatch's contract, but needed: uvloop
    alone changes the outcome of some tests (looptime cannot fake a uvloop loop's clock), and
    ``watched-uvloop`` must be compared with the same run without loopwatch, not with ``plain``.
``watched-uvloop``
    as ``watched``, on uvloop as in ``plain-uvloop``.
``plugin``
    ``pytest --loopwatch`` (loopwatch's pytest plugin fails each async test with a finding),
    ``LOOPWATCH`` unset. Findings are read from the failure messages (each block starts with the
    event name, then ``place:``), and from the "Captured loopwatch call" sections pytest prints
    for tests that failed on their own.

Outcomes come from ``--junitxml``. Each mode is compared test by test with its baseline, the same
run without loopwatch: ``plain`` for ``watched`` and ``plugin``, ``plain-uvloop`` for
``watched-uvloop`` (``plain`` if ``plain-uvloop`` was not run). A test whose outcome differs is
rerun alone (by node id) ``--reruns`` times in the baseline and in that mode. It is a *real*
difference only when it reproduces: every rerun of each mode agrees with itself and the two modes
still disagree. Anything else is *flaky* (or depends on the tests run before it). A pytest
process that dies (a signal, or CPython's "Fatal Python error") is a real difference whatever the
reruns of its missing tests say, listed first as "(the whole run)". What
``plain-uvloop`` changes against ``plain`` is listed (verdict ``uvloop``), not rerun.

How uvloop is forced (``plain-uvloop``, ``watched-uvloop``)
-----------------------------------------------------------
Without touching the suite: the script writes ``realworld_uvloop.pth`` and ``realworld_uvloop.py``
into the corpus venv's site-packages. The ``.pth`` line imports the module only when
``REALWORLD_UVLOOP=1``; the module sets ``uvloop.EventLoopPolicy()`` as the process's policy (what
``uvloop.install()`` does, without its deprecation warning on 3.12+). Every loop made through the
policy is then a uvloop loop: ``asyncio.new_event_loop()``, ``asyncio.run``, ``asyncio.Runner``
without ``loop_factory``, pytest-asyncio 1.x (its runner takes loops from the policy), anyio's
pytest plugin (``asyncio.Runner`` with the backend option ``loop_factory`` unset) and
``unittest.IsolatedAsyncioTestCase`` (``asyncio.Runner(debug=True)``). Before the suite, a probe
test is written into the suite's tree (next to its conftest, so its own configuration applies), run
once in ``watched-uvloop`` mode, and deleted; it prints ``type(asyncio.get_running_loop())`` and its
MRO, which is stored in the results (``probe``) and shown in the summary. It shows ``uvloop.Loop``
for pytest-asyncio (janus, async-lru, aiofiles, asgiref), anyio's plugin (anyio, starlette, httpx),
IsolatedAsyncioTestCase (aiosqlite) and aiohttp's own pytest plugin (its ``loop`` fixture's default
factory is ``asyncio.new_event_loop``). Where the policy cannot take effect, or uvloop alone breaks
the suite, the uvloop modes are not run (``Suite.no_uvloop`` says why):

- aiostream: its tests run on its own ``TimeTrackingTestLoop`` (a ``BaseEventLoop`` subclass that
  its conftest's ``pytest_asyncio_loop_factories`` hook names), whatever the policy; the probe
  shows that class;
- looptime: the probe shows a plain ``uvloop.Loop`` (looptime's fake clock is not applied to it),
  and looptime's own time tests fail, some hanging past pytest-timeout, with uvloop alone.

anyio's parameters ``asyncio+uvloop`` and ``asyncio+eager`` pass their own ``loop_factory`` (the
policy does not apply); they are deselected (see the anyio entry), uvloop being covered by the
uvloop modes instead.

Set-up (done by the script, so that a fresh clone can rerun it)
--------------------------------------------------------------
Per library: ``pip download --no-binary :all: --no-deps LIB==VERSION`` into ``.realworld/sdists``,
unpacked into ``.realworld/src``; a venv ``.realworld/venvs/<lib>-<X.Y>`` made with ``--python``,
into which go the library from its sdist (aiohttp: its binary wheel, see ``Suite.wheel``), its test
requirements, the common tools (``TOOLS``) and loopwatch itself, editable from this repository
(``pip install -e``), so every run tests the working tree as it is. ``--ref COMMIT`` tests a commit
instead, and ``--ref worktree`` a copy of the working tree taken when the script starts (both under
``.realworld/loopwatch/``), so that a long run is not disturbed by edits made meanwhile; loopwatch's
C accelerator is compiled for ``--python`` in that tree when it is older than its source. Venvs that
exist (with a matching stamp) are reused. Nothing of the libraries' code is ever kept in the
repository: ``.realworld/`` is git-ignored.

Tests run from the unpacked sdist with ``python -m pytest`` (it is pytest's rootdir, so the suite's
own ini file and conftest apply), one pytest process at a time, never in parallel (no xdist): the
machine is shared. ``python -m`` puts the unpacked sdist first on ``sys.path``, so a library whose
package sits at the top of its sdist (janus, async_lru, asgiref, aiosqlite, httpx, starlette,
looptime, aiostream) is imported from there, not from site-packages, as in most projects' own CI:
loopwatch then counts its frames as the program's own code (``origin: "program"``), not as an
installed library's. aiohttp is the exception: its package there is Cython source without its
compiled modules, so its wheel is installed and its runs have ``PYTHONSAFEPATH=1``, which keeps the
sdist's top off ``sys.path`` (pytest still puts ``tests/`` there for the suite's conftest).
pytest-timeout stops a single hanging test (``--test-timeout``); ``--timeout`` bounds a whole pytest
run (SIGINT, so that pytest still writes its junit XML, then SIGKILL); after ``plain``, a mode's run
is given at most max(300 s, 8 x plain's time).

What each suite runs, and what is left out and why, is in ``SUITES`` below. Where a suite's own
``addopts`` asks for coverage (pytest-cov), it is replaced by the same options without it:
coverage tracing slows every line, which would make loopwatch's timings (and so its findings)
those of a traced program, and is not what is being compared.

Usage::

    python scripts/realworld.py                      # all suites, all modes, Python 3.12
    python scripts/realworld.py --libs janus,aiostream --modes plain,watched
    python scripts/realworld.py --python /root/.pyenv/versions/3.13.0/bin/python3.13

Results: ``.realworld/results-<X.Y>.json`` and ``.realworld/summary-<X.Y>.md`` unless ``--json``
and ``--markdown`` say otherwise; raw junit XML, pytest output and JSON logs of each run are kept
under ``.realworld/runs/<X.Y>/<lib>/``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import hashlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent  # the loopwatch repository (scripts/..)
WORK = REPO / ".realworld"  # git-ignored: sdists, sources, venvs, runs, results
DEFAULT_PYTHON = "/root/.pyenv/versions/3.12.1/bin/python3.12"
MODES = ("plain", "plain-uvloop", "watched", "watched-uvloop", "plugin")
UVLOOP_MODES = ("plain-uvloop", "watched-uvloop")
LOG_MODES = ("watched", "watched-uvloop")

# Installed in every corpus venv, pinned so that runs on different days compare.
TOOLS = (
    "pytest==9.2.0",
    "pytest-asyncio==1.5.0",
    "pytest-timeout==2.4.0",
    "uvloop==0.23.0",
)

# Outcomes, from the worst: when pytest writes two <testcase> entries for one test (a failure in
# the call and an error in teardown), the test's outcome is the worse one.
OUTCOME_ORDER = ("error", "failed", "xpassed", "passed", "xfailed", "skipped")


# -- the suites ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Suite:
    """One library's test suite, as run here."""

    name: str  # the PyPI name
    version: str  # a release whose sdist ships the tests and that runs green here
    kind: str  # what runs its async tests (shown in the summary)
    deps: tuple[str, ...] = ()  # test requirements, besides TOOLS
    extras: str = ""  # extras of the library itself, e.g. "full"
    paths: tuple[str, ...] = ("tests",)  # what pytest is given, relative to the unpacked sdist
    args: tuple[str, ...] = ()  # extra pytest arguments (replaced addopts, -m, -k)
    # (what, why): tests left out, each with the reason. `what` is a node id (--deselect), or
    # "-m EXPR" / "-k EXPR" (pytest allows one of each, so not also in `args`).
    deselect: tuple[tuple[str, str], ...] = ()
    probe: str = "pytest-asyncio"  # which probe test shows the loop type (see PROBES)
    # Why the uvloop modes are not run for this suite ("" = they are); the probe still runs.
    no_uvloop: str = ""
    probe_dir: str = "tests"  # where the probe is written, relative to the unpacked sdist
    notes: str = ""  # what else to know about this suite here
    # Install the library as NAME==VERSION from the index (its binary wheel) instead of from its
    # sdist, and run pytest with PYTHONSAFEPATH=1 (Python 3.11+: `python -m` and `python -c`,
    # in the suite's subprocesses too, do not put the working directory on sys.path), so that
    # the uncompiled package at the top of the sdist does not shadow the installed one. The
    # suite's own conftest still applies: pytest puts the tests' folder (not the sdist's top)
    # on sys.path for it.
    wheel: bool = False

    @property
    def dist(self) -> str:
        return f"{self.name}-{self.version}"

    def pytest_args(self) -> list[str]:
        """`args`, then the deselections as pytest arguments."""
        out = list(self.args)
        for what, _ in self.deselect:
            if what.startswith(("-m ", "-k ")):
                out += [what[:2], what[3:]]
            else:
                out += ["--deselect", what]
        return out


SUITES: tuple[Suite, ...] = (
    Suite(
        # A fake-clock loop: looptime's own suite. Its tests make loops with
        # looptime.patch_event_loop(asyncio.new_event_loop()) or the plugin's
        # @pytest.mark.looptime, which replace loop.time() by a fake clock that jumps to the next
        # timer whenever the loop would wait. A timer of loopwatch's own on such a loop would make
        # the clock jump, so this suite is the check that loopwatch adds none.
        name="looptime",
        version="0.9",
        kind="pytest-asyncio + fake clock (looptime)",
        deps=("pytest-mock==3.17.0", "async-timeout==5.0.1"),
        probe="looptime",
        no_uvloop=(
            "looptime cannot fake a uvloop loop's clock: its time tests fail, and some hang past "
            "pytest-timeout, with uvloop alone (plain-uvloop), so there is nothing to compare"
        ),
        notes="looptime registers its own pytest plugins (entry points) in its venv.",
    ),
    Suite(
        # A time-tracking fake-clock loop: aiostream's tests run on aiostream.test_utils.
        # TimeTrackingTestLoop (a BaseEventLoop subclass whose time() only moves when nothing is
        # ready: it jumps to the next timer), given to pytest-asyncio by the
        # pytest_asyncio_loop_factories hook of its conftest. Tests assert the exact fake times
        # (loop.steps), so a timer of loopwatch's own would show as a wrong step.
        name="aiostream",
        version="0.8.1",
        kind="pytest-asyncio + fake clock (TimeTrackingTestLoop)",
        args=("-o", "addopts=--strict-markers"),  # the suite's addopts add --cov
        probe="pytest-asyncio",
        no_uvloop=(
            "the policy cannot change its loop: its pytest_asyncio_loop_factories hook names "
            "the loop class (the probe shows TimeTrackingTestLoop), so the uvloop modes would "
            "repeat plain and watched"
        ),
    ),
    Suite(
        # anyio's own suite on anyio's own pytest plugin, asyncio backend only.
        name="anyio",
        version="4.16.0",
        kind="anyio pytest plugin",
        deps=(
            "blockbuster==1.5.29",
            "hypothesis==6.170.17",
            "psutil==7.2.2",
            "pytest-mock==3.17.0",
            "sniffio==1.3.1",
            "trustme==1.2.1",
            "truststore==0.10.5",
        ),
        # Only the parameter "asyncio" of anyio_backend: the trio backend is not installed (its
        # tests would be skips), and "asyncio+uvloop" / "asyncio+eager" (loops made by explicit
        # factories) would triple the run time; watched-uvloop covers uvloop instead.
        args=("-k", "not trio and not uvloop and not eager and not ipv6"),
        deselect=(
            ("-m not network", "tests marked network need the internet"),
            (
                "tests/test_sockets.py::TestTCPStream::test_happy_eyeballs[asyncio-dualstack]",
                "needs IPv6 on loopback, which this machine lacks (also -k 'not ipv6')",
            ),
            (
                "tests/test_sockets.py::TestTCPStream::test_connection_refused[asyncio-multi]",
                "needs IPv6 on loopback, which this machine lacks",
            ),
        ),
        probe="anyio",
        notes=(
            "The whole suite, asyncio backend only (-k 'not trio and not uvloop and not eager'): "
            "its other anyio_backend parameters pass their own loop_factory. Also -k 'not "
            "ipv6': this machine has no IPv6 on loopback."
        ),
    ),
    Suite(
        # anyio's pytest plugin again, on a web framework: most tests drive the app through
        # TestClient, which runs the app on an anyio blocking portal (a loop in another thread).
        name="starlette",
        version="1.10.0",
        kind="anyio pytest plugin + TestClient (loop in a thread)",
        extras="full",
        # httpx2[zstd]: its dev group's; the header tests expect zstd in accept-encoding.
        deps=(
            "blockbuster==1.5.29",
            "httpx2[zstd]",
            "trio",
            "opentelemetry-sdk",
            "importlib-metadata",
        ),
        # pytest-asyncio (installed in every venv) is not in its CI, and warns at start-up,
        # which its filterwarnings=error makes an internal error: -p no:asyncio.
        args=("-p", "no:asyncio", "-k", "not trio"),
        deselect=(
            (
                "tests/test_staticfiles.py::"
                "test_staticfiles_with_invalid_dir_permissions_returns_401[asyncio]",
                "fails as root (here): root reads a directory whatever its permissions",
            ),
        ),
        probe="anyio",
        notes=(
            "asyncio backend only (-k 'not trio'); trio is installed because test modules "
            "import it. blockbuster is installed, as in its CI (its autouse fixture checks for "
            "blocking calls in the loop)."
        ),
    ),
    Suite(
        # anyio's pytest plugin, with a real uvicorn server (in a thread) for the client tests.
        name="httpx",
        version="0.28.1",
        kind="anyio pytest plugin + uvicorn server thread",
        extras="brotli,zstd,http2,socks,cli",
        # Pinned to the releases of its time: newer chardet guesses other encodings, newer
        # uvicorn logs differently (the logging tests), newer click warns (filterwarnings=error).
        deps=(
            "uvicorn==0.32.1",
            "chardet==5.2.0",
            "click==8.1.8",
            "trustme",
            "cryptography",
            "trio",
        ),
        args=("-p", "no:asyncio", "-k", "not trio"),  # as for starlette
        deselect=(
            ("-m not network", "tests marked network need the internet"),
            (
                "tests/test_utils.py::test_logging_request",
                "fails in plain here: uvicorn's access log lines reach caplog before httpx's",
            ),
            (
                "tests/test_utils.py::test_logging_redirect_chain",
                "fails in plain here, as test_logging_request",
            ),
        ),
        probe="anyio",
        notes="asyncio backend only (-k 'not trio'); trio is installed because tests import it.",
    ),
    Suite(
        # unittest.IsolatedAsyncioTestCase: aiosqlite's tests are one such class (in the package).
        name="aiosqlite",
        version="0.22.1",
        kind="unittest.IsolatedAsyncioTestCase",
        paths=("aiosqlite/tests/smoke.py",),
        probe="unittest",
        probe_dir="aiosqlite/tests",
    ),
    Suite(
        name="janus",
        version="2.0.0",
        kind="pytest-asyncio (strict)",
        deps=("pytest-codspeed==5.0.4",),  # its benchmarks take the `benchmark` fixture
        args=("-o", "addopts="),  # the suite's addopts add --cov-branch
    ),
    Suite(
        name="async-lru",
        version="2.4.0",
        kind="pytest-asyncio (auto)",
        # The suite's addopts: -s --keep-duplicates --cache-clear --verbose plus coverage. Its
        # ini file leaves asyncio_default_fixture_loop_scope unset, which pytest-asyncio 1.x
        # warns about, and its filterwarnings=error turns that into an internal error.
        args=(
            "-o",
            "addopts=--keep-duplicates",
            "-o",
            "asyncio_default_fixture_loop_scope=function",
        ),
    ),
    Suite(
        name="aiofiles",
        version="25.1.0",
        kind="pytest-asyncio (auto)",
        deselect=(
            (
                "tests/test_os.py::test_access",
                "fails as root (here): it expects os.access to deny what chmod took away",
            ),
        ),
    ),
    Suite(
        name="asgiref",
        version="3.13.0",
        kind="pytest-asyncio (strict)",
        deps=("packaging", "pytest-codspeed==5.0.4"),
    ),
    Suite(
        # aiohttp's server side, on aiohttp's own pytest plugin (aiohttp.pytest_plugin, which its
        # conftest loads): its `loop` fixture makes each test's loop with the factory of the
        # parameter "pyloop", asyncio.new_event_loop, i.e. through the policy, so the uvloop
        # modes give it uvloop loops with the same node ids (its --aiohttp-loop=uvloop would
        # call uvloop.new_event_loop directly, under other ids, and so compare with nothing).
        # Servers, clients and the request handler run in the test's loop, which exercises
        # loopwatch's aiohttp request hook on a real RequestHandler.
        name="aiohttp",
        version="3.14.5",
        kind="aiohttp pytest plugin (aiohttp_client, aiohttp_server)",
        deps=(
            "blockbuster==1.5.29",
            "brotli==1.2.1",
            # Not for coverage (no pytest-cov): a filterwarnings line of its ini names
            # coverage.exceptions.CoverageWarning, which pytest must import. aiohttp's own pin.
            "coverage==7.14.1",
            "freezegun==1.5.5",
            "gunicorn==27.0.1",
            "isal==1.9.1",
            "pytest-mock==3.17.0",
            "re-assert==1.1.0",
            "trustme==1.2.1",
            "zlib-ng==1.1.0",
        ),
        # Its sdist has the package (Cython sources, no compiled modules) at its top: the
        # binary wheel is installed and the sdist gives only the tests (see `wheel`).
        wheel=True,
        paths=tuple(
            f"tests/{name}.py"
            for name in (
                "test_web_functional",
                "test_web_protocol",
                "test_web_request_handler",
                "test_web_server",
                "test_web_app",
                "test_web_middleware",
                "test_web_urldispatcher",
                "test_web_runner",
                "test_run_app",
                "test_web_sendfile_functional",
                "test_web_response",
                "test_web_request",
                "test_web_exceptions",
                "test_classbasedview",
                "test_test_utils",
                "test_pytest_plugin",
            )
        ),
        # The suite's addopts add xdist (--numprocesses=auto), coverage and --doctest-modules;
        # its own filterwarnings (error, with its ignores) and markers stay. pytest-asyncio
        # (installed in every venv) is not in its CI: its async tests are aiohttp's plugin's.
        args=("-o", "addopts=--strict-markers", "-p", "no:asyncio"),
        deselect=(
            (
                "-m not dev_mode and not autobahn and not internal",
                "the suite's own default (its addopts): those need its CI's set-up",
            ),
            (
                "tests/test_web_urldispatcher.py::"
                "test_static_directory_without_read_permission[pyloop-]",
                "fails as root (here): it expects 403 for a directory root can read anyway",
            ),
            (
                "tests/test_web_urldispatcher.py::"
                "test_static_directory_without_read_permission[pyloop-my_file.txt]",
                "fails as root (here), as the one above",
            ),
            (
                "tests/test_web_urldispatcher.py::test_static_file_without_read_permission[pyloop]",
                "fails as root (here): it expects 403 for a file root can read anyway",
            ),
        ),
        probe="aiohttp",
        notes=(
            "The server-side test files only (the client, parser and websocket ones are left "
            "out). aiohttp 3.14.5 from its binary wheel, the tests from its sdist. "
            "test_web_functional.py::test_keepalive_expires_on_time[pyloop] fails on uvloop "
            "alone (it mocks loop.time, which uvloop's timers do not use): a plain-uvloop "
            "difference, the same in watched-uvloop."
        ),
    ),
)


# -- the probe tests (is the loop really uvloop's?) --------------------------------------------

PROBE_FILE = "test_zz_realworld_probe.py"
PROBE_PRINT = """
def _say(loop):
    names = [f"{c.__module__}.{c.__qualname__}" for c in type(loop).__mro__]
    print("REALWORLD_PROBE " + " ".join(names), flush=True)
"""
PROBES: dict[str, str] = {
    "pytest-asyncio": PROBE_PRINT
    + """
import asyncio
import pytest

@pytest.mark.asyncio
async def test_realworld_probe():
    _say(asyncio.get_running_loop())
""",
    "looptime": PROBE_PRINT
    + """
import asyncio
import pytest

@pytest.mark.asyncio
@pytest.mark.looptime
async def test_realworld_probe():
    _say(asyncio.get_running_loop())
""",
    "anyio": PROBE_PRINT
    + """
import asyncio
import pytest

@pytest.fixture
def anyio_backend():
    return "asyncio"  # the plain backend, no loop_factory: the loop comes from the policy

@pytest.mark.anyio
async def test_realworld_probe():
    _say(asyncio.get_running_loop())
""",
    "aiohttp": PROBE_PRINT
    + """
import asyncio

async def test_realworld_probe(loop):  # run by aiohttp's pytest plugin, in its `loop` fixture
    _say(asyncio.get_running_loop())
""",
    "unittest": PROBE_PRINT
    + """
import asyncio
import unittest

class RealworldProbe(unittest.IsolatedAsyncioTestCase):
    async def test_realworld_probe(self):
        _say(asyncio.get_running_loop())
""",
}

# Written into each corpus venv's site-packages (see "How uvloop is forced" above).
UVLOOP_PTH = (
    'import os; os.environ.get("REALWORLD_UVLOOP") == "1" and __import__("realworld_uvloop")\n'
)
UVLOOP_MODULE = '''"""From loopwatch's scripts/realworld.py: uvloop loops when REALWORLD_UVLOOP=1.

Sets uvloop's event loop policy for the process, as uvloop.install() does (without its deprecation
warning on Python 3.12+), so that every loop made through the policy is a uvloop loop.
"""
import asyncio
import warnings

import uvloop

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)  # the policy API is deprecated on 3.14+
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
'''


# -- small helpers -----------------------------------------------------------------------------


def say(message: str) -> None:
    """A progress line, with the time since the script started."""
    print(f"[{time.monotonic() - START:7.1f}s] {message}", flush=True)


START = time.monotonic()


class SetupError(RuntimeError):
    """A set-up step failed: the suite is reported as failed, the others still run."""


def run(cmd: Sequence[str | Path], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run a set-up command; SetupError with its output's tail if it fails."""
    proc = subprocess.run(
        [str(c) for c in cmd], text=True, capture_output=True, check=False, **kwargs
    )
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
        raise SetupError(f"failed ({proc.returncode}): {' '.join(map(str, cmd))}\n{tail}")
    return proc


def python_version(python: str) -> str:
    """'3.12' for the interpreter at `python`."""
    out = run([python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"]).stdout
    return out.strip()


def clean_env() -> dict[str, str]:
    """This process's environment without anything that would change a run behind our back."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("LOOPWATCH", "REALWORLD_", "PYTEST_", "VIRTUAL_ENV", "COV_"))
        and k
        not in (
            "PYTHONPATH",
            "PYTHONSAFEPATH",
            "PYTHONSTARTUP",
            "PYTHONASYNCIODEBUG",
            "PYTHONDEVMODE",
        )
    }
    env["PYTHONUNBUFFERED"] = "1"
    return env


# -- set-up: sdist, source, venv -----------------------------------------------------------------


class Env:
    """Where one suite's files are, for one Python."""

    def __init__(self, suite: Suite, python: str, version: str, loopwatch: Path) -> None:
        self.suite = suite
        self.loopwatch = loopwatch  # the loopwatch tree installed editable (see --ref)
        self.python = python
        self.version = version
        self.sdists = WORK / "sdists"
        self.src = WORK / "src" / suite.dist
        self.venv = WORK / "venvs" / f"{suite.name}-{version}"
        self.bin = self.venv / "bin"
        self.py = self.bin / "python"
        self.runs = WORK / "runs" / version / suite.name

    def stamp(self) -> str:
        """What the venv was made from: when it changes, the venv is made again."""
        made_from = [self.python, self.suite.dist, self.suite.extras, self.suite.deps, TOOLS, 1]
        if self.suite.wheel:  # only then, so that the other suites' venvs keep their stamps
            made_from.append("wheel")
        text = json.dumps(made_from)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def sdist(self) -> Path:
        """The library's sdist, downloaded once into .realworld/sdists."""
        self.sdists.mkdir(parents=True, exist_ok=True)
        for path in self.sdists.glob("*"):
            if _sdist_matches(path.name, self.suite):
                return path
        say(f"{self.suite.name}: downloading the sdist of {self.suite.dist}")
        run(
            [
                self.python,
                "-m",
                "pip",
                "download",
                "--no-binary",
                ":all:",
                "--no-deps",
                "-q",
                "-d",
                self.sdists,
                f"{self.suite.name}=={self.suite.version}",
            ],
        )
        for path in self.sdists.glob("*"):
            if _sdist_matches(path.name, self.suite):
                return path
        raise SetupError(f"no sdist for {self.suite.dist} in {self.sdists}")

    def source(self) -> Path:
        """The unpacked sdist (unpacked once; its top folder renamed to <name>-<version>)."""
        if self.src.is_dir():
            return self.src
        sdist = self.sdist()
        tmp = self.src.with_name(self.src.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        with tarfile.open(sdist) as tar:
            if hasattr(tarfile, "data_filter"):
                tar.extractall(tmp, filter="data")
            else:  # pragma: no cover - Python 3.11.0 to 3.11.3
                tar.extractall(tmp)  # an sdist from PyPI
        (top,) = tmp.iterdir()
        top.rename(self.src)
        tmp.rmdir()
        return self.src

    def ensure(self) -> None:
        """Make the venv unless one with the same stamp exists; write the uvloop hook."""
        self.source()
        stamp_file = self.venv / "realworld-stamp"
        pip = [self.py, "-m", "pip", "install", "-q"]
        if not (stamp_file.is_file() and stamp_file.read_text().strip() == self.stamp()):
            say(f"{self.suite.name}: making {self.venv.relative_to(REPO)}")
            shutil.rmtree(self.venv, ignore_errors=True)
            run([self.python, "-m", "venv", self.venv])
            run([*pip, "--upgrade", "pip"])
            binary: list[str] = []
            if self.suite.wheel:
                if tuple(map(int, self.version.split("."))) < (3, 11):
                    raise SetupError(f"{self.suite.name}: PYTHONSAFEPATH needs Python 3.11+")
                library = f"{self.suite.name}=={self.suite.version}"
                binary = ["--only-binary", self.suite.name]
            else:
                library = str(self.sdist())
            if self.suite.extras:
                library += f"[{self.suite.extras}]"
            run([*pip, *binary, library, *self.suite.deps, *TOOLS])
            stamp_file.write_text(self.stamp() + "\n")
        # loopwatch, editable, from the tree under test; again whenever that tree changes.
        installed = self.venv / "realworld-loopwatch"
        if not installed.is_file() or installed.read_text().strip() != str(self.loopwatch):
            say(f"{self.suite.name}: pip install -e {self.loopwatch}")
            installed.unlink(missing_ok=True)
            run([*pip, "-e", self.loopwatch])
            installed.write_text(f"{self.loopwatch}\n")
        self.write_uvloop_hook()

    def write_uvloop_hook(self) -> None:
        """realworld_uvloop.pth and .py in site-packages (see "How uvloop is forced")."""
        out = run([self.py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
        site = Path(out.stdout.strip())
        (site / "realworld_uvloop.pth").write_text(UVLOOP_PTH)
        (site / "realworld_uvloop.py").write_text(UVLOOP_MODULE)


def _sdist_matches(filename: str, suite: Suite) -> bool:
    """Whether `filename` is the sdist of `suite` (PyPI normalises '-' to '_' in file names)."""
    stem = filename.removesuffix(".tar.gz").removesuffix(".zip")
    norm = re.sub(r"[-_.]+", "_", suite.name).lower()
    return stem.lower() in (f"{norm}-{suite.version}", f"{suite.name.lower()}-{suite.version}")


# -- one pytest run ----------------------------------------------------------------------------


@dataclasses.dataclass
class RunResult:
    """What one pytest process gave."""

    mode: str
    outcomes: dict[str, str]  # node id -> outcome
    failures: dict[str, str]  # node id -> failure/error text
    times: dict[str, float]  # node id -> seconds, as junit says
    returncode: int | None
    elapsed_s: float
    timed_out: bool
    xml: Path
    output: Path
    log: Path | None

    def counts(self) -> dict[str, int]:
        counter = Counter(self.outcomes.values())
        return {name: counter.get(name, 0) for name in OUTCOME_ORDER}


def mode_env(mode: str, log: Path | None) -> dict[str, str]:
    """The environment of a pytest run in `mode`."""
    env = clean_env()
    if mode in LOG_MODES:
        env["LOOPWATCH"] = "1"
        env["LOOPWATCH_LOG"] = "json"
        assert log is not None
        env["LOOPWATCH_LOG_FILE"] = str(log)
    if mode in UVLOOP_MODES:
        env["REALWORLD_UVLOOP"] = "1"
    return env


def mode_args(mode: str) -> list[str]:
    return ["--loopwatch"] if mode == "plugin" else ["-p", "no:loopwatch"]


def pytest_run(
    env: Env,
    mode: str,
    targets: Sequence[str],
    tag: str,
    *,
    timeout: float,
    test_timeout: float,
    extra: Sequence[str] = (),
) -> RunResult:
    """Run pytest once in `mode` on `targets`; outcomes from its junit XML."""
    env.runs.mkdir(parents=True, exist_ok=True)
    xml = env.runs / f"{tag}.xml"
    output = env.runs / f"{tag}.out"
    log = env.runs / f"{tag}.jsonl" if mode in LOG_MODES else None
    for path in (xml, output, log):
        if path is not None:
            path.unlink(missing_ok=True)
    cmd = [
        str(env.py),
        "-m",
        "pytest",
        *targets,
        *env.suite.pytest_args(),
        *mode_args(mode),
        *extra,
        f"--junitxml={xml}",
        "-o",
        "junit_family=xunit2",
        "-o",
        "junit_logging=no",
        "-p",
        "no:cacheprovider",
        f"--timeout={test_timeout:g}",
        "-q",
        "-rfE",
        "--rootdir",
        str(env.src),
    ]
    process_env = mode_env(mode, log)
    if env.suite.wheel:
        process_env["PYTHONSAFEPATH"] = "1"  # see Suite.wheel
    process_env["PATH"] = f"{env.bin}{os.pathsep}{process_env.get('PATH', '')}"
    started = time.monotonic()
    timed_out = False
    with open(output, "w") as out:
        out.write("$ " + " ".join(cmd) + "\n")
        out.flush()
        proc = subprocess.Popen(
            cmd,
            cwd=env.src,
            env=process_env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            # SIGINT first: pytest stops as on ^C and still writes its junit XML.
            timed_out = True
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        except BaseException:
            # ^C or SIGTERM of this script: take the pytest run (its own session) with it.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            raise
    elapsed = time.monotonic() - started
    outcomes, failures, times = parse_junit(xml, env.src)
    return RunResult(
        mode, outcomes, failures, times, proc.returncode, elapsed, timed_out, xml, output, log
    )


def parse_junit(xml: Path, root: Path) -> tuple[dict[str, str], dict[str, str], dict[str, float]]:
    """Per node id: the outcome, the text of a failure or error, and the time."""
    outcomes: dict[str, str] = {}
    failures: dict[str, str] = {}
    times: dict[str, float] = {}
    if not xml.is_file():
        return outcomes, failures, times
    try:
        tree = ET.parse(xml)
    except ET.ParseError:
        return outcomes, failures, times
    for case in tree.iter("testcase"):
        nodeid = nodeid_of(root, case.get("classname", ""), case.get("name", ""))
        with contextlib.suppress(ValueError):
            times[nodeid] = times.get(nodeid, 0.0) + float(case.get("time", "0"))
        outcome, text = "passed", ""
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = "failed" if child.tag == "failure" else "error"
                # The body is the whole report; the message attribute repeats its start.
                text = child.text or child.get("message", "")
            elif child.tag == "skipped":
                outcome = "xfailed" if child.get("type") == "pytest.xfail" else "skipped"
        previous = outcomes.get(nodeid)
        if previous is None or OUTCOME_ORDER.index(outcome) < OUTCOME_ORDER.index(previous):
            outcomes[nodeid] = outcome
        if text:
            failures[nodeid] = (failures.get(nodeid, "") + "\n" + text).strip()
    return outcomes, failures, times


def nodeid_of(root: Path, classname: str, name: str) -> str:
    """The pytest node id behind a junit (classname, name) pair.

    pytest writes the node id ``a/b/test_x.py::TestC::test_f[p]`` as classname ``a.b.test_x.TestC``
    and name ``test_f[p]``; the file is the shortest dotted prefix that names a file under `root`.
    A collection error has an empty classname and the dotted module path as name.
    """
    if not classname:
        parts, tail = name.split("."), []
    else:
        parts, tail = classname.split("."), [name]
    for i in range(1, len(parts) + 1):
        path = "/".join(parts[:i]) + ".py"
        if (root / path).is_file():
            return "::".join([path, *parts[i:], *tail])
    return "::".join([classname, name]) if classname else name


# -- findings ----------------------------------------------------------------------------------


def place_of(event: dict[str, Any]) -> str:
    """Where a finding points: the creation site of a task, the place of a block or coroutine."""
    for key in ("created_at", "location"):
        if event.get(key):
            return str(event[key])
    if event.get("cycle"):
        return " -> ".join(map(str, event["cycle"]))
    if event.get("awaiting"):
        return f"(awaiting) {event['awaiting']}"
    return "(no place)"


def findings_from_log(log: Path | None) -> list[dict[str, Any]]:
    """Findings of a watched run, grouped by (event, place, origin), from its JSON lines."""
    groups: dict[tuple[str, str, str], dict[str, Any]] = {}
    if log is None or not log.is_file():
        return []
    with open(log, errors="replace") as lines:
        for line in lines:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if not isinstance(event, dict) or "event" not in event:
                continue
            key = (str(event["event"]), place_of(event), str(event.get("origin", "")))
            group = groups.setdefault(
                key,
                {
                    "event": key[0],
                    "place": key[1],
                    "origin": key[2] or None,
                    "count": 0,
                    "example": _example(event),
                },
            )
            group["count"] += 1
    return sorted(groups.values(), key=lambda g: (-g["count"], g["event"], g["place"]))


def _example(event: dict[str, Any]) -> dict[str, Any]:
    """The fields of one finding worth keeping as an example (no stack, no times)."""
    keep = (
        "task",
        "coroutine",
        "awaiting",
        "awaits",
        "exception",
        "location",
        "created_at",
        "duration_s",
        "blocked_s",
        "loop",
        "route",
        "tasks",
    )
    return {k: event[k] for k in keep if k in event}


_BLOCK_START = re.compile(r"^(loopwatch\.[a-z_]+)\s*$")
_FIELD = re.compile(r"^    ([a-z_]+): (.*)$")


def findings_from_text(text: str) -> list[dict[str, str]]:
    """Findings in the plugin's report: blocks of 'loopwatch.EVENT' then '    field: value'."""
    found: list[dict[str, str]] = []
    current: dict[str, str] | None = None
    for line in text.splitlines():
        match = _BLOCK_START.match(line)
        if match:
            current = {"event": match.group(1)}
            found.append(current)
            continue
        field = _FIELD.match(line)
        if current is not None and field:
            current.setdefault(field.group(1), field.group(2))
        elif current is not None and line.strip() and not line.startswith("    "):
            current = None
    return found


_SECTION = re.compile(r"^-+ Captured loopwatch (setup|call|teardown) -+$")
_HEADER = re.compile(r"^_{3,} (.+?) _{3,}$")


def findings_from_plugin(result: RunResult) -> list[dict[str, Any]]:
    """Findings of a plugin run, grouped by (event, place, origin), with the tests they failed.

    From the junit failure texts (tests the plugin failed), and from the 'Captured loopwatch'
    sections of pytest's output (tests that failed on their own; these are named by pytest's
    headline for the test, not by node id).
    """
    groups: dict[tuple[str, str, str], dict[str, Any]] = {}

    def add(finding: dict[str, str], test: str) -> None:
        place = finding.get("place", "(no place)")
        key = (finding["event"], place, finding.get("origin", ""))
        group = groups.setdefault(
            key,
            {
                "event": key[0],
                "place": place,
                "origin": key[2] or None,
                "count": 0,
                "tests": [],
                "example": {
                    k: v
                    for k, v in finding.items()
                    if k in ("task", "coroutine", "awaiting", "awaits", "exception", "duration_s")
                },
            },
        )
        group["count"] += 1
        if test not in group["tests"]:
            group["tests"].append(test)

    for nodeid, text in result.failures.items():
        for finding in findings_from_text(text):
            add(finding, nodeid)
    if result.output.is_file():
        test, in_section, section = "?", False, []
        for line in result.output.read_text(errors="replace").splitlines():
            header = _HEADER.match(line)
            if _SECTION.match(line):
                in_section, section = True, []
                continue
            if in_section and (header or re.match(r"^[-=_]{5,}", line)):
                for finding in findings_from_text("\n".join(section)):
                    add(finding, f"(failed on its own) {test}")
                in_section = False
            if header:
                test = header.group(1)
            elif in_section:
                section.append(line)
    return sorted(groups.values(), key=lambda g: (-g["count"], g["event"], g["place"]))


# -- comparing modes -----------------------------------------------------------------------------


def key_lines(text: str, limit: int = 12) -> list[str]:
    """The lines of a failure that say what went wrong: pytest's 'E' lines, else the first ones."""
    lines = text.splitlines()
    marked = [line for line in lines if line.startswith("E ")]
    chosen = marked or [line for line in lines if line.strip()]
    return [line[:200] for line in chosen[:limit]]


def baseline_of(mode: str, modes: Iterable[str]) -> str | None:
    """What `mode` is compared with: the same run without loopwatch.

    ``watched-uvloop`` is compared with ``plain-uvloop`` when that ran (uvloop alone changes some
    suites' outcomes, which is not loopwatch's doing), otherwise with ``plain``; ``plain-uvloop``
    itself is compared with ``plain``, to show what uvloop alone changes.
    """
    if mode == "plain":
        return None
    if mode == "watched-uvloop" and "plain-uvloop" in modes:
        return "plain-uvloop"
    return "plain" if "plain" in modes else None


def crashed(result: RunResult) -> str | None:
    """How a pytest process died (a signal, or CPython's fatal error), or None."""
    if result.timed_out:
        return None
    text = ""
    with contextlib.suppress(OSError):
        text = result.output.read_text(errors="replace")
    fatal = re.search(r"Fatal Python error: [^\n]*", text)
    if fatal:
        return fatal.group(0)
    if result.returncode is not None and result.returncode < 0:
        return f"killed by signal {-result.returncode}"
    return None


def compare(
    env: Env,
    base: RunResult,
    other: RunResult,
    *,
    reruns: int,
    max_reruns: int,
    test_timeout: float,
) -> list[dict[str, Any]]:
    """Tests whose outcome in `other` is not the one in `base`, each rerun alone to judge it.

    A difference is "real" when every rerun of each mode agrees with itself and the two modes
    still disagree; otherwise "flaky" (it does not reproduce alone). ``plain-uvloop`` against
    ``plain`` is uvloop's doing, not loopwatch's: listed, not rerun.
    """
    differences: list[dict[str, Any]] = []
    died = crashed(other)
    if died and not crashed(base):
        # The process died: the tests it never ran may well pass alone, but the crash is real
        # whatever the reruns say, and is listed first.
        differences.append(
            {
                "test": "(the whole run)",
                "base": base.mode,
                "base_outcome": f"exit {base.returncode}",
                "outcome": died,
                "cause": "outcome",
                "key_lines": [died],
                "reruns": {"base": [], "mode": []},
                "verdict": "real",
            }
        )
    for nodeid in sorted(set(base.outcomes) | set(other.outcomes)):
        a = base.outcomes.get(nodeid, "missing")
        b = other.outcomes.get(nodeid, "missing")
        if a == b:
            continue
        text = other.failures.get(nodeid) or base.failures.get(nodeid, "")
        # In plugin mode a test failed *by* the plugin, for findings, is the plugin doing its job
        # (whether the findings are true is judged from the findings table); anything else the
        # plugin changed is a difference like any other.
        cause = "outcome"
        if other.mode == "plugin" and re.match(
            r"(loopwatch\.[a-z_]+ at |\d+ loopwatch findings: )", other.failures.get(nodeid, "")
        ):
            cause = "loopwatch findings"
        differences.append(
            {
                "test": nodeid,
                "base": base.mode,
                "base_outcome": a,
                "outcome": b,
                "cause": cause,
                "key_lines": key_lines(text),
                "reruns": {"base": [], "mode": []},
                "verdict": "flaky",
            }
        )
    done = 0
    for diff in differences:
        nodeid = diff["test"]
        if other.mode == "plain-uvloop":
            diff["verdict"] = "uvloop"
            continue
        if done >= max_reruns:
            diff["verdict"] = "not rerun"
            continue
        done += 1
        # A test that hangs in one mode is not given the whole --test-timeout again.
        alone = min(test_timeout, max(20.0, 5 * base.times.get(nodeid, 0.0)))
        for i in range(reruns):
            for role, mode in (("base", base.mode), ("mode", other.mode)):
                tag = f"rerun-{other.mode}-{done}-{mode}-{i}"
                result = pytest_run(
                    env, mode, [nodeid], tag, timeout=alone + 120, test_timeout=alone
                )
                diff["reruns"][role].append(result.outcomes.get(nodeid, "missing"))
                if role == "mode" and result.failures.get(nodeid):
                    diff["rerun_key_lines"] = key_lines(result.failures[nodeid])
        a_runs, b_runs = diff["reruns"]["base"], diff["reruns"]["mode"]
        if len(set(a_runs)) == 1 and len(set(b_runs)) == 1 and a_runs[0] != b_runs[0]:
            diff["verdict"] = "real"
        say(
            f"  {env.suite.name} {other.mode}: {nodeid}: {base.mode} {diff['base_outcome']} vs "
            f"{diff['outcome']}; alone {a_runs} vs {b_runs}: {diff['verdict']}"
        )
    return differences


# -- the probe -----------------------------------------------------------------------------------


def run_probe(env: Env, *, timeout: float) -> dict[str, Any]:
    """Which loop class a test of this suite's kind gets in watched-uvloop mode."""
    where = env.src / env.suite.probe_dir
    path = where / PROBE_FILE
    path.write_text(PROBES[env.suite.probe])
    try:
        result = pytest_run(
            env,
            "watched-uvloop",
            [str(path.relative_to(env.src))],
            "probe",
            timeout=timeout,
            test_timeout=60,
            extra=["-s"],
        )
    finally:
        path.unlink(missing_ok=True)
    text = result.output.read_text(errors="replace")
    found = re.search(r"^REALWORLD_PROBE (.+)$", text, re.MULTILINE)
    mro = found.group(1).split() if found else []
    return {
        "kind": env.suite.probe,
        "loop_type": mro[0] if mro else None,
        "mro": mro,
        "uvloop": any(name.startswith("uvloop.") for name in mro),
        "outcome": next(iter(result.outcomes.values()), "missing"),
    }


# -- one suite -----------------------------------------------------------------------------------


def run_suite(env: Env, modes: Sequence[str], opts: argparse.Namespace) -> dict[str, Any]:
    """All modes of one suite, compared with plain."""
    suite = env.suite
    started = time.monotonic()
    env.ensure()
    setup_s = time.monotonic() - started
    out: dict[str, Any] = {
        "version": suite.version,
        "kind": suite.kind,
        "venv": str(env.venv.relative_to(REPO)),
        "targets": list(suite.paths),
        "args": list(suite.args),
        "deselected": [{"what": what, "why": why} for what, why in suite.deselect],
        "notes": suite.notes,
        "setup_s": round(setup_s, 1),
        "modes": {},
        "differences": {},
    }
    if any(m in UVLOOP_MODES for m in modes):
        out["probe"] = probe = run_probe(env, timeout=opts.timeout)
        say(
            f"{suite.name}: uvloop probe ({probe['kind']}): {probe['loop_type']} "
            f"(uvloop: {probe['uvloop']})"
        )
    results: dict[str, RunResult] = {}
    if suite.no_uvloop:
        out["modes_not_run"] = {m: suite.no_uvloop for m in modes if m in UVLOOP_MODES}
        modes = [m for m in modes if m not in UVLOOP_MODES]
    for mode in modes:
        say(f"{suite.name} {mode}: running")
        timeout = opts.timeout
        if "plain" in results and mode != "plain":
            # A hang that pytest-timeout cannot stop (a loop spinning in C never runs its
            # SIGALRM handler) should not take the whole --timeout in every mode.
            timeout = min(timeout, max(300.0, 8 * results["plain"].elapsed_s))
        result = pytest_run(
            env, mode, suite.paths, mode, timeout=timeout, test_timeout=opts.test_timeout
        )
        results[mode] = result
        counts = result.counts()
        if mode == "plugin":
            findings = findings_from_plugin(result)
        else:
            findings = findings_from_log(result.log)
        out["modes"][mode] = {
            "tests": len(result.outcomes),
            "counts": counts,
            "elapsed_s": round(result.elapsed_s, 1),
            "returncode": result.returncode,
            "timed_out": result.timed_out,
            "xml": str(result.xml.relative_to(REPO)),
            "output": str(result.output.relative_to(REPO)),
            "log": str(result.log.relative_to(REPO)) if result.log else None,
            "findings": findings,
        }
        shown = ", ".join(f"{n} {k}" for k, n in counts.items() if n)
        say(
            f"{suite.name} {mode}: {len(result.outcomes)} tests: {shown or 'none'}; "
            f"{sum(f['count'] for f in findings)} findings; {result.elapsed_s:.1f}s"
            + (" (TIMED OUT)" if result.timed_out else "")
        )
    for mode, result in results.items():
        base = baseline_of(mode, results)
        if base is None:
            continue
        diffs = compare(
            env,
            results[base],
            result,
            reruns=opts.reruns,
            max_reruns=opts.max_reruns,
            test_timeout=opts.test_timeout,
        )
        out["differences"][mode] = diffs
        out["modes"][mode]["compared_with"] = base
        real = sum(d["verdict"] == "real" for d in diffs)
        say(f"{suite.name} {mode} vs {base}: {len(diffs)} differences, {real} real")
    out["elapsed_s"] = round(time.monotonic() - started, 1)
    return out


# -- the summary ---------------------------------------------------------------------------------


def markdown(report: dict[str, Any]) -> str:
    """The Markdown summary: a table per suite, its real differences, its findings by place."""
    lines = [
        "# loopwatch on real-world test suites",
        "",
        f"Python {report['python_version']} ({report['python']}), loopwatch "
        f"{report['loopwatch']} (+ means a changed working tree; compiled hot paths: "
        f"{report['accel']}), {report['started']}; {report['elapsed_s'] / 60:.1f} min in all. "
        f"Modes: {', '.join(report['modes'])}. Generated by `scripts/realworld.py`.",
        "",
    ]
    for name, s in report["suites"].items():
        lines += [f"## {name} {s['version']} ({s['kind']})", ""]
        if s.get("error"):
            lines += [f"Set-up or run failed: `{s['error']}`", ""]
            continue
        lines += [
            "| mode | tests | passed | failed | error | skipped | xfailed | vs | differences "
            "(real / other) | findings | time |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- | ---: | ---: |",
        ]
        for mode, m in s["modes"].items():
            c = m["counts"]
            diffs = s["differences"].get(mode, [])
            real = sum(d["verdict"] == "real" for d in diffs)
            diff_cell = f"{real} / {len(diffs) - real}" if m.get("compared_with") else "-"
            by_findings = sum(d["verdict"] == "real" and d.get("cause") != "outcome" for d in diffs)
            if by_findings:
                diff_cell += f" ({by_findings} real: failed by the plugin for findings)"
            timed = " (timed out)" if m["timed_out"] else ""
            lines.append(
                f"| {mode} | {m['tests']} | {c['passed']} | {c['failed']} | {c['error']} | "
                f"{c['skipped']} | {c['xfailed']} | {m.get('compared_with') or '-'} | "
                f"{diff_cell} | {sum(f['count'] for f in m['findings'])} | "
                f"{m['elapsed_s']:.0f}s{timed} |"
            )
        lines.append("")
        probe = s.get("probe")
        if probe:
            lines += [
                f"uvloop probe ({probe['kind']}): `{probe['loop_type']}`"
                f"{'' if probe['uvloop'] else ' (not uvloop)'}.",
                "",
            ]
        not_run = s.get("modes_not_run", {})
        if not_run:
            lines.append(f"- not run: {', '.join(not_run)}: {next(iter(not_run.values()))}.")
        if s["deselected"] or s["notes"]:
            for d in s["deselected"]:
                lines.append(f"- left out: `{d['what']}`: {d['why']}")
            if s["notes"]:
                lines.append(f"- {s['notes']}")
            lines.append("")
        for mode, diffs in s["differences"].items():
            for n, d in enumerate(diffs):
                if n == LISTED:
                    lines.append(f"- ... and {len(diffs) - LISTED} more in {mode} (see the JSON)")
                    break
                alone = ""
                if d["reruns"]["base"]:
                    alone = f"; alone: {d['reruns']['base']} vs {d['reruns']['mode']}"
                cause = (
                    " (failed by the plugin for findings)" if d.get("cause") != "outcome" else ""
                )
                lines.append(
                    f"- **{d['verdict']}** in {mode} (vs {d['base']}): `{d['test']}`: "
                    f"{d['base_outcome']} -> {d['outcome']}{cause}{alone}"
                )
                if d["verdict"] == "real":
                    for line in (d.get("rerun_key_lines") or d["key_lines"])[:6]:
                        lines.append(f"    - `{line}`")
        if any(s["differences"].values()):
            lines.append("")
        rows = [(mode, f) for mode, m in s["modes"].items() for f in m["findings"]]
        if rows:
            lines += [
                "| mode | event | place | origin | count |",
                "| --- | --- | --- | --- | ---: |",
            ]
            for mode, f in rows:
                place = _short(f["place"])
                lines.append(
                    f"| {mode} | {f['event'].removeprefix('loopwatch.')} | `{place}` | "
                    f"{f['origin'] or '-'} | {f['count']} |"
                )
            lines.append("")
    return "\n".join(lines) + "\n"


LISTED = 15  # differences listed per suite and mode in the Markdown summary


def _short(place: str) -> str:
    """A place with the long prefixes of .realworld/ and site-packages cut."""
    place = place.replace(str(WORK) + "/", "")
    return re.sub(r"\S*/site-packages/", "site-packages/", place)


# -- the loopwatch under test ------------------------------------------------------------------


def loopwatch_tree(ref: str | None) -> tuple[Path, str]:
    """The loopwatch tree to install editable, and what it is (a commit, '+' if changed).

    Without --ref: this repository's working tree, as it is. With --ref COMMIT: that commit of
    this repository, exported once (git archive) into .realworld/loopwatch/<commit>. With
    --ref worktree: a copy of the working tree as it is now (tracked and untracked files, not
    the ignored ones) in .realworld/loopwatch/worktree-<digest>. Either way a long run is not
    disturbed by edits made in the working tree meanwhile.
    """
    if ref == "worktree":
        return snapshot_worktree()
    if not ref:
        dirty = bool(git("status", "--porcelain", "--", "loopwatch", "startup", "pyproject.toml"))
        return REPO, git("rev-parse", "--short=12", "HEAD") + ("+" if dirty else "")
    sha = git("rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}")
    if not sha:
        raise SystemExit(f"--ref {ref}: not a commit of {REPO}")
    dest = WORK / "loopwatch" / sha[:12]
    if not dest.is_dir():
        tmp = dest.with_name(dest.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", "--format=tar", sha],
            capture_output=True,
            check=True,
        ).stdout
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            if hasattr(tarfile, "data_filter"):
                tar.extractall(tmp, filter="data")
            else:  # pragma: no cover - Python 3.11.0 to 3.11.3
                tar.extractall(tmp)  # our own commit
        tmp.rename(dest)
    return dest, sha[:12]


def snapshot_worktree() -> tuple[Path, str]:
    """Copy the working tree's files (not the ignored ones) once per distinct content."""
    listed = git("ls-files", "--cached", "--others", "--exclude-standard", "-z")
    names = sorted(n for n in listed.split("\0") if n and (REPO / n).is_file())
    digest = hashlib.sha256()
    for name in names:
        digest.update(name.encode() + b"\0" + (REPO / name).read_bytes() + b"\0")
    head = git("rev-parse", "--short=12", "HEAD")
    dest = WORK / "loopwatch" / f"worktree-{head}-{digest.hexdigest()[:12]}"
    if not dest.is_dir():
        tmp = dest.with_name(dest.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        for name in names:
            if name.startswith(".realworld/"):
                continue
            target = tmp / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, target)
        tmp.rename(dest)
    return dest, f"{head}+worktree-{digest.hexdigest()[:12]}"


def build_accel(python: str, tree: Path) -> bool:
    """Compile the tree's loopwatch/_accel.c in place for `python` (as an editable install does).

    Done once per run, so that the compiled hot paths match the C source being tested; when they
    cannot be built, loopwatch runs its pure-Python hot paths (and says so).
    """
    builder, source = tree / "hatch_build.py", tree / "loopwatch" / "_accel.c"
    if not builder.is_file() or not source.is_file():
        return False
    suffix = run([python, "-c", "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))"])
    module = tree / "loopwatch" / ("_accel" + suffix.stdout.strip())
    if module.is_file() and module.stat().st_mtime >= source.stat().st_mtime:
        return True  # up to date: leave it (the working tree may be someone's work in progress)
    proc = subprocess.run(
        [python, str(builder), str(tree)], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        say(f"loopwatch's C accelerator not built: {proc.stderr.strip().splitlines()[:1]}")
    return proc.returncode == 0


# -- main ----------------------------------------------------------------------------------------


def git(*args: str) -> str:
    proc = subprocess.run(
        ["git", "-C", str(REPO), *args], text=True, capture_output=True, check=False
    )
    return proc.stdout.strip()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Run asyncio libraries' own test suites plain, watched by loopwatch "
        "(stock asyncio and uvloop) and under loopwatch's pytest plugin; compare test by test.",
    )
    names = [s.name for s in SUITES]
    parser.add_argument(
        "--libs",
        default=",".join(names),
        help=f"comma-separated suites (default: all: {','.join(names)})",
    )
    parser.add_argument(
        "--modes",
        default=",".join(MODES),
        help=f"comma-separated modes (default: {','.join(MODES)})",
    )
    parser.add_argument(
        "--python",
        default=DEFAULT_PYTHON,
        help=f"the interpreter for the venvs (default: {DEFAULT_PYTHON})",
    )
    parser.add_argument(
        "--ref",
        default=None,
        help="test this commit of the repository, or 'worktree' for a copy of the working tree "
        "as it is now (either goes to .realworld/loopwatch/), instead of the working tree itself",
    )
    parser.add_argument(
        "--reruns",
        type=int,
        default=2,
        help="reruns of a differing test alone, in each mode (default: 2)",
    )
    parser.add_argument(
        "--max-reruns",
        type=int,
        default=15,
        help="differing tests rerun per suite and mode, at most; the others are listed as "
        "'not rerun' (default: 15)",
    )
    parser.add_argument(
        "--timeout", type=float, default=900, help="seconds one pytest run may take (default: 900)"
    )
    parser.add_argument(
        "--test-timeout",
        type=float,
        default=60,
        help="seconds one test may take, through pytest-timeout (default: 60)",
    )
    parser.add_argument(
        "--json",
        type=Path,
        default=None,
        help="the JSON result file (default: .realworld/results-X.Y.json)",
    )
    parser.add_argument(
        "--markdown",
        type=Path,
        default=None,
        help="the Markdown summary (default: .realworld/summary-X.Y.md)",
    )
    parser.add_argument(
        "--tables",
        type=Path,
        default=None,
        metavar="RESULTS_JSON",
        help="print the condensed tables of docs/realworld.md from a results file, and exit",
    )
    opts = parser.parse_args(argv)
    opts.lib_list = [n.strip() for n in opts.libs.split(",") if n.strip()]
    opts.mode_list = [m.strip() for m in opts.modes.split(",") if m.strip()]
    for name in opts.lib_list:
        if name not in names:
            parser.error(f"unknown suite {name!r}; known: {', '.join(names)}")
    for mode in opts.mode_list:
        if mode not in MODES:
            parser.error(f"unknown mode {mode!r}; known: {', '.join(MODES)}")
    return opts


def tables(report: dict[str, Any]) -> str:
    """The two tables of docs/realworld.md: outcomes per suite and mode, and the findings by
    place (which modes reported each, and how often)."""
    modes = list(report["modes"])
    out = [
        f"Python {report['python_version']}, loopwatch {report['loopwatch']}, "
        f"{report['started'][:10]}, {report['elapsed_s'] / 60:.0f} min. A cell: tests passed / "
        "failed (+ errors); then the real differences with its baseline, and how many of those "
        "the plugin failed for findings.",
        "",
        "| suite | runner | tests | " + " | ".join(modes) + " |",
        "| --- | --- | ---: |" + " --- |" * len(modes),
    ]
    for name, s in report["suites"].items():
        cells = []
        tests = 0
        for mode in modes:
            m = s["modes"].get(mode)
            if m is None:
                cells.append("not run")
                continue
            tests = max(tests, m["tests"])
            c = m["counts"]
            cell = f"{c['passed']} / {c['failed']}" + (f" (+{c['error']})" if c["error"] else "")
            diffs = [d for d in s["differences"].get(mode, []) if d["verdict"] == "real"]
            if m.get("compared_with"):
                plugin = sum(d.get("cause") != "outcome" for d in diffs)
                cell += f"; {len(diffs)} real" + (f" ({plugin} for findings)" if plugin else "")
            cells.append(cell)
        out.append(f"| {name} {s['version']} | {s['kind']} | {tests} | " + " | ".join(cells) + " |")
    out += [
        "",
        "| event | place | origin | " + " | ".join(m for m in modes if "plain" not in m) + " |",
        "| --- | --- | --- |" + " ---: |" * sum("plain" not in m for m in modes),
    ]
    watched = [m for m in modes if "plain" not in m]
    for s in report["suites"].values():
        seen: dict[tuple[str, str, str], dict[str, int]] = {}
        for mode in watched:
            for f in s["modes"].get(mode, {}).get("findings", []):
                place = _short(f["place"]).removeprefix("(awaiting) ")
                key = (f["event"].removeprefix("loopwatch."), place, f["origin"])
                seen.setdefault(key, {})[mode] = f["count"]
        for (event, place, origin), counts in seen.items():
            place = re.sub(r"/tmp/pytest-of-\w+/pytest-\d+/", "<tmp>/", place)
            out.append(
                f"| {event} | `{place}` | {origin} | "
                + " | ".join(str(counts.get(m, "")) for m in watched)
                + " |"
            )
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    if opts.tables:
        print(tables(json.loads(opts.tables.read_text())))
        return 0
    version = python_version(opts.python)
    json_path = opts.json or WORK / f"results-{version}.json"
    md_path = opts.markdown or WORK / f"summary-{version}.md"
    WORK.mkdir(exist_ok=True)
    # SIGTERM ends the script as ^C does: the pytest run under way is killed with it.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    # Started in the background by a shell without job control (`cmd &`), this process has
    # SIGINT ignored, and so would every pytest it starts: tests that raise SIGINT (anyio's
    # test_keyboard_interrupt_does_not_resume_test) would fail, and a run that times out could
    # not be stopped with SIGINT. A handler of our own makes the children start with SIG_DFL.
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    tree, what = loopwatch_tree(opts.ref)
    accel = build_accel(opts.python, tree)
    say(f"loopwatch under test: {what} ({tree}), compiled hot paths: {accel}")
    report: dict[str, Any] = {
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "python": opts.python,
        "python_version": version,
        "loopwatch": what,
        "loopwatch_tree": str(tree),
        "accel": accel,
        "modes": opts.mode_list,
        "tools": list(TOOLS),
        "suites": {},
    }
    suites = [s for s in SUITES if s.name in opts.lib_list]
    try:
        for suite in suites:
            env = Env(suite, opts.python, version, tree)
            try:
                report["suites"][suite.name] = run_suite(env, opts.mode_list, opts)
            except (SetupError, OSError, subprocess.SubprocessError) as exc:
                say(f"{suite.name}: FAILED: {exc}")
                report["suites"][suite.name] = {
                    "version": suite.version,
                    "kind": suite.kind,
                    "error": str(exc)[:2000],
                }
            report["elapsed_s"] = round(time.monotonic() - START, 1)
            write_results(report, json_path, md_path)  # after each suite: partial results
    finally:
        report["elapsed_s"] = round(time.monotonic() - START, 1)
        write_results(report, json_path, md_path)
    print_summary(report)
    say(f"results: {json_path} and {md_path}")
    return 0


def write_results(report: dict[str, Any], json_path: Path, md_path: Path) -> None:
    for path in (json_path, md_path):
        path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    md_path.write_text(markdown(report))


def print_summary(report: dict[str, Any]) -> None:
    """One line per suite and mode, then every real difference."""
    print("\n== summary ==")
    for name, s in report["suites"].items():
        if s.get("error"):
            print(f"{name} {s['version']}: FAILED: {s['error'].splitlines()[0]}")
            continue
        for mode, m in s["modes"].items():
            c = m["counts"]
            diffs: list[dict[str, Any]] = s["differences"].get(mode, [])
            real = sum(d["verdict"] == "real" and d.get("cause") == "outcome" for d in diffs)
            by_findings = sum(d["verdict"] == "real" for d in diffs) - real
            print(
                f"{name} {s['version']:<8} {mode:<15} {m['tests']:5d} tests "
                f"{c['passed']:5d} passed {c['failed']:3d} failed {c['error']:3d} error "
                f"{c['skipped']:4d} skipped  real differences {real} (+{by_findings} plugin "
                f"failures for findings)  "
                f"findings {sum(f['count'] for f in m['findings'])}  {m['elapsed_s']:.0f}s"
            )
    for name, s in report["suites"].items():
        for mode, diffs in s.get("differences", {}).items():
            for d in diffs:
                if d["verdict"] == "real":
                    why = " (plugin: findings)" if d.get("cause") != "outcome" else ""
                    print(
                        f"REAL {name} {mode}: {d['test']}: {d['base']} {d['base_outcome']}, "
                        f"{mode} {d['outcome']}{why}"
                    )
    print(f"elapsed: {report['elapsed_s'] / 60:.1f} min")


if __name__ == "__main__":
    sys.exit(main())
