"""The pytest plugin, run as real pytest sessions (subprocesses) over small files of real tests.

Each session is a few hundred milliseconds of pytest start-up, so each one checks a whole scenario:
every test's outcome, and for each failure the exact findings (event name and place) it lists.
"""

from __future__ import annotations

import os
import re
import sys
import textwrap
from pathlib import Path

import pytest
import pytest_asyncio

pytest_plugins = ["pytester"]

EVENTS = (
    "loopwatch.slow_callback",
    "loopwatch.loop_stalled",
    "loopwatch.task_leaked",
    "loopwatch.task_orphaned",
    "loopwatch.task_exception_unretrieved",
    "loopwatch.coroutine_never_awaited",
)
# pytest_asyncio_loop_factories arrived in pytest-asyncio 1.4.
HAS_LOOP_FACTORIES = hasattr(pytest_asyncio.plugin, "_collect_hook_loop_factories")
needs_uvloop = pytest.mark.skipif(sys.platform == "win32", reason="uvloop is not on Windows")


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The sessions start without LOOPWATCH*, whatever the outer run has."""
    for name in list(os.environ):
        if name.startswith("LOOPWATCH"):
            monkeypatch.delenv(name)


class Session:
    """One finished pytest run: outcome per test id, and the failure text per test name."""

    def __init__(self, result: pytest.RunResult, path: Path) -> None:
        self.result = result
        self.path = path
        self.text = result.stdout.str()
        self.outcomes = {
            m.group(2): m.group(1)
            for m in re.finditer(r"^(PASSED|FAILED|ERROR|XFAIL|XPASS) (\S+)", self.text, re.M)
        }

    def section(self, name: str) -> str:
        """The failure (or error) report of test ``name``, up to the next one."""
        lines = self.text.splitlines()
        header = re.compile(rf"^_+ (?:ERROR at setup of )?{re.escape(name)} _+$")
        start = next(i for i, line in enumerate(lines) if header.match(line))
        end = next(
            (
                i
                for i in range(start + 1, len(lines))
                if re.match(r"^_{3,} \S.* _{3,}$", lines[i]) or lines[i].startswith("====")
            ),
            len(lines),
        )
        return "\n".join(lines[start + 1 : end])

    def findings(self, name: str) -> list[tuple[str, str]]:
        """(event name, place) of each finding in the report of test ``name``."""
        found: list[list[str]] = []
        for line in self.section(name).splitlines():
            if line in EVENTS:
                found.append([line, ""])
            elif line.startswith("    place: ") and found:
                found[-1][1] = line.removeprefix("    place: ")
        return [(event, place) for event, place in found]

    def place(self, filename: str, marker: str, function: str) -> str:
        """``path:line in function`` of the line of ``filename`` that ends with ``# marker``."""
        path = self.path / filename
        lines = path.read_text().splitlines()
        (line,) = [i for i, text in enumerate(lines, 1) if text.rstrip().endswith(f"# {marker}")]
        return f"{path}:{line} in {function}"


def run(pytester: pytest.Pytester, *args: str) -> Session:
    # looptime (installed for test_invisible) brings a plugin these sessions do not want.
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "-p", "no:looptime_plugin", "-rA", *args, timeout=120
    )
    return Session(result, pytester.path)


def write(pytester: pytest.Pytester, **files: str) -> None:
    for name, text in files.items():
        path = pytester.path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip())


INI = """
[pytest]
asyncio_mode = {mode}
asyncio_default_fixture_loop_scope = function
{extra}
"""

# Reports the plugin's process-wide state once the session is over (after the plugin's own
# pytest_unconfigure), so a test can tell that it cleaned up, or left LOOPWATCH=1's set-up alone.
STATE_CONFTEST = """
import threading
from pathlib import Path

import pytest


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    from loopwatch import _api, _runtime, _threads

    threads = [w.name for w in _threads._all if w.name == "watchdog" and w.running]
    threads += [t.name for t in threading.enumerate() if t.name != "MainThread"]
    state = f"runtime={_runtime.current() is not None} global={_api.global_enabled()} {threads}"
    Path(config.rootpath, "state.txt").write_text(state)
"""

HELPERS = """
import asyncio
import time


async def worker():
    await asyncio.sleep(3600)  # worker sleeps


def crunch():
    time.sleep(0.2)  # crunch
"""

STOCK_TESTS = """
import asyncio
import sys
import time

import pytest

from helpers import crunch, worker


async def fetch():
    return 1


async def boom():
    raise ValueError("lost")


@pytest.mark.asyncio
async def test_clean():
    task = asyncio.create_task(worker())
    await asyncio.sleep(0)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


@pytest.mark.asyncio
async def test_leaks():
    asyncio.create_task(worker())  # leak
    await asyncio.sleep(0)


@pytest.mark.asyncio
async def test_blocks():
    await asyncio.sleep(0)
    crunch()  # block


@pytest.mark.asyncio
async def test_never_awaited():
    fetch()  # never awaited


@pytest.mark.asyncio
async def test_unretrieved():
    asyncio.create_task(boom())  # lost
    await asyncio.sleep(0.01)


@pytest.mark.asyncio
async def test_orphaned():
    async def wait():
        await asyncio.get_running_loop().create_future()

    asyncio.ensure_future(wait())  # orphan
    await asyncio.sleep(0)


@pytest.mark.asyncio
async def test_fails_and_leaks():
    asyncio.create_task(worker())  # leak before failing
    assert 1 == 2


@pytest.mark.asyncio
@pytest.mark.loopwatch(allow=["task_leaked", "loopwatch.slow_callback"])
async def test_allowed():
    asyncio.create_task(worker())
    time.sleep(0.15)


@pytest.mark.asyncio
@pytest.mark.loopwatch(allow=["slow_callback"])
async def test_fixture_sees_events(loopwatch):
    time.sleep(0.15)
    await asyncio.sleep(0.05)
    assert [e.event for e in loopwatch.events] == ["loopwatch.slow_callback"]
    assert loopwatch.findings == []
    assert loopwatch.settings.slow_callback_ms == 100


def test_sync_untouched():
    from loopwatch import _api, _runtime

    assert not _api.global_enabled()
    loop = asyncio.new_event_loop()
    try:
        runtime = _runtime.current()
        assert runtime is None or runtime.loops.state_of(loop) is None
    finally:
        loop.close()
"""


def test_every_async_test_on_stock_asyncio(pytester: pytest.Pytester) -> None:
    """--loopwatch: each kind of finding fails its test at the right line; the rest pass."""
    write(
        pytester,
        **{
            "pytest.ini": INI.format(mode="strict", extra=""),
            "conftest.py": STATE_CONFTEST,
            "helpers.py": HELPERS,
            "test_stock.py": STOCK_TESTS,
        },
    )
    session = run(pytester, "--loopwatch")
    f = "test_stock.py::"
    assert session.outcomes == {
        f + "test_clean": "PASSED",
        f + "test_leaks": "FAILED",
        f + "test_blocks": "FAILED",
        f + "test_never_awaited": "FAILED",
        f + "test_unretrieved": "FAILED",
        f + "test_orphaned": "FAILED",
        f + "test_fails_and_leaks": "FAILED",
        f + "test_allowed": "PASSED",
        f + "test_fixture_sees_events": "PASSED",
        f + "test_sync_untouched": "PASSED",
    }
    place = session.place
    assert session.findings("test_leaks") == [
        ("loopwatch.task_leaked", place("test_stock.py", "leak", "test_leaks"))
    ]
    assert session.findings("test_blocks") == [
        ("loopwatch.slow_callback", place("helpers.py", "crunch", "crunch"))
    ]
    assert session.findings("test_never_awaited") == [
        (
            "loopwatch.coroutine_never_awaited",
            place("test_stock.py", "never awaited", "test_never_awaited"),
        )
    ]
    assert session.findings("test_unretrieved") == [
        (
            "loopwatch.task_exception_unretrieved",
            place("test_stock.py", "lost", "test_unretrieved"),
        )
    ]
    assert session.findings("test_orphaned") == [
        ("loopwatch.task_orphaned", place("test_stock.py", "orphan", "test_orphaned"))
    ]
    assert session.findings("test_fails_and_leaks") == [
        (
            "loopwatch.task_leaked",
            place("test_stock.py", "leak before failing", "test_fails_and_leaks"),
        )
    ]

    leak = session.section("test_leaks")
    assert leak.splitlines()[0] == (
        f"loopwatch.task_leaked at {place('test_stock.py', 'leak', 'test_leaks')}"
    )
    assert "    coroutine: worker" in leak
    assert f"    awaiting: {place('helpers.py', 'worker sleeps', 'worker')}" in leak
    block = session.section("test_blocks").splitlines()
    assert "    coroutine: test_blocks" in block
    assert "    loop: asyncio" in block
    stack = block.index("    stack (program frames, outermost first):")
    assert block[stack + 1 : stack + 3] == [
        f"        {place('test_stock.py', 'block', 'test_blocks')}",
        f"        {place('helpers.py', 'crunch', 'crunch')}",
    ]
    assert "    exception: ValueError: lost" in session.section("test_unretrieved")
    # A test that fails on its own keeps its failure; the findings come as a report section.
    failed = session.section("test_fails_and_leaks")
    assert "AssertionError" in failed
    assert "Captured loopwatch call" in failed
    # The plugin undid all it installed.
    assert (pytester.path / "state.txt").read_text() == "runtime=False global=False []"


MODULE_SCOPE_TESTS = """
import asyncio
import time

import pytest
import pytest_asyncio

pytestmark = pytest.mark.asyncio(loop_scope="module")
LOOPS = []
LEAKED = []


async def worker():
    await asyncio.sleep(3600)


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def ticker():
    async def tick():
        while True:
            await asyncio.sleep(0.005)

    task = asyncio.create_task(tick())
    yield task
    task.cancel()


@pytest.mark.loopwatch
async def test_1_leaks():
    LOOPS.append(asyncio.get_running_loop())
    LEAKED.append(asyncio.create_task(worker()))  # module leak


@pytest.mark.loopwatch
async def test_2_clean_after_a_leak():
    LOOPS.append(asyncio.get_running_loop())
    await asyncio.sleep(0.01)
    assert LOOPS[0] is LOOPS[1]  # the same loop, and the task leaked before is still pending
    assert not LEAKED[0].done()


async def test_3_blocks_unchecked():
    time.sleep(0.15)


@pytest.mark.loopwatch(slow_callback_ms=50)
async def test_4_blocks_past_its_threshold():
    time.sleep(0.08)  # 80 ms


@pytest.mark.loopwatch(allow=["nope"])
async def test_5_bad_marker():
    pass


async def test_6_fixture_only(loopwatch):
    time.sleep(0.12)
    await asyncio.sleep(0.05)
    assert [e.event for e in loopwatch.events] == ["loopwatch.slow_callback"]


@pytest.mark.loopwatch
async def test_7_module_fixture_task_is_not_the_tests(ticker):
    await asyncio.sleep(0.02)
    assert not ticker.done()
"""


def test_marker_and_fixture_with_module_loop_scope(pytester: pytest.Pytester) -> None:
    """Without --loopwatch only marked tests are checked; a module-scoped loop's leak is blamed
    on the test that made it, not the next one; --strict-markers passes; a bad marker errors."""
    write(
        pytester,
        **{
            "pytest.ini": INI.format(mode="auto", extra=""),
            "test_module_scope.py": MODULE_SCOPE_TESTS,
        },
    )
    session = run(pytester, "--strict-markers")
    f = "test_module_scope.py::"
    assert session.outcomes == {
        f + "test_1_leaks": "FAILED",
        f + "test_2_clean_after_a_leak": "PASSED",
        f + "test_3_blocks_unchecked": "PASSED",
        f + "test_4_blocks_past_its_threshold": "FAILED",
        f + "test_5_bad_marker": "ERROR",
        f + "test_6_fixture_only": "PASSED",
        f + "test_7_module_fixture_task_is_not_the_tests": "PASSED",
    }
    assert session.findings("test_1_leaks") == [
        (
            "loopwatch.task_leaked",
            session.place("test_module_scope.py", "module leak", "test_1_leaks"),
        )
    ]
    assert session.findings("test_4_blocks_past_its_threshold") == [
        (
            "loopwatch.slow_callback",
            session.place("test_module_scope.py", "80 ms", "test_4_blocks_past_its_threshold"),
        )
    ]
    assert "    threshold_s: 0.050" in session.section("test_4_blocks_past_its_threshold")
    assert (
        f"{f}test_5_bad_marker: @pytest.mark.loopwatch: unknown event 'nope' in allow; "
        "known events: loopwatch.slow_callback, "
    ) in session.section("test_5_bad_marker")


FACTORY_CONFTEST = """
import asyncio

import uvloop


def pytest_asyncio_loop_factories(config, item):
    return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
"""

FACTORY_TESTS = """
import asyncio
import time

from helpers import worker


async def fetch():
    return 1


async def test_clean():
    await asyncio.sleep(0.01)


async def test_leaks():
    asyncio.create_task(worker())  # leak


async def test_blocks():
    time.sleep(0.12)  # block


async def test_never_awaited_is_allowed():
    fetch()


async def test_loop_kind(request):
    kind = "uvloop" if "uvloop" in type(asyncio.get_running_loop()).__module__ else "asyncio"
    assert request.node.name == f"test_loop_kind[{kind}]"
"""


@needs_uvloop
@pytest.mark.skipif(not HAS_LOOP_FACTORIES, reason="loop factories need pytest-asyncio 1.4+")
def test_loop_factories_and_ini_options(pytester: pytest.Pytester) -> None:
    """pytest-asyncio's loop factories (stock and uvloop); ini: loopwatch, threshold, allow."""
    extra = (
        "loopwatch = true\n"
        "loopwatch_slow_callback_ms = 50\n"
        "loopwatch_allow = coroutine_never_awaited\n"
    )
    write(
        pytester,
        **{
            "pytest.ini": INI.format(mode="auto", extra=extra),
            "conftest.py": FACTORY_CONFTEST,
            "helpers.py": HELPERS,
            "test_factories.py": FACTORY_TESTS,
        },
    )
    session = run(pytester)
    expected = {}
    for kind in ("asyncio", "uvloop"):
        f = "test_factories.py::"
        expected |= {
            f"{f}test_clean[{kind}]": "PASSED",
            f"{f}test_leaks[{kind}]": "FAILED",
            f"{f}test_blocks[{kind}]": "FAILED",
            f"{f}test_never_awaited_is_allowed[{kind}]": "PASSED",
            f"{f}test_loop_kind[{kind}]": "PASSED",
        }
        assert session.findings(f"test_leaks[{kind}]") == [
            ("loopwatch.task_leaked", session.place("test_factories.py", "leak", "test_leaks"))
        ]
        assert session.findings(f"test_blocks[{kind}]") == [
            ("loopwatch.slow_callback", session.place("test_factories.py", "block", "test_blocks"))
        ]
        block = session.section(f"test_blocks[{kind}]")
        assert f"    loop: {kind}" in block
        assert "    threshold_s: 0.050" in block
    assert session.outcomes == expected
    assert (
        "loopwatch: checking every async test (slow_callback_ms=50; "
        "allowed: loopwatch.coroutine_never_awaited; libraries' findings reported)"
    ) in session.text


POLICY_CONFTEST = """
import asyncio
import warnings

import uvloop

import loopwatch

LOOPS = []
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    asyncio.set_event_loop_policy({policy})
"""

SESSION_TESTS_A = """
import asyncio

import conftest
from helpers import worker


async def test_a_leaks():
    conftest.LOOPS.append(asyncio.get_running_loop())
    asyncio.create_task(worker())  # session leak
"""

SESSION_TESTS_B = """
import asyncio

import conftest


async def test_b_clean_on_the_same_uvloop():
    loop = asyncio.get_running_loop()
    assert type(loop).__module__.startswith("uvloop")
    assert conftest.LOOPS == [loop]
    await asyncio.sleep(0.01)
"""


@needs_uvloop
@pytest.mark.parametrize(
    "policy",
    ["uvloop.EventLoopPolicy()", "loopwatch.EventLoopPolicy(uvloop.EventLoopPolicy())"],
    ids=["uvloop-policy", "loopwatch-policy"],
)
def test_custom_policy_and_session_loop_scope(pytester: pytest.Pytester, policy: str) -> None:
    """uvloop through a custom event-loop policy, one session-scoped loop for two modules."""
    extra = "asyncio_default_test_loop_scope = session"
    write(
        pytester,
        **{
            "pytest.ini": INI.format(mode="auto", extra=extra),
            "conftest.py": POLICY_CONFTEST.format(policy=policy),
            "helpers.py": HELPERS,
            "test_a.py": SESSION_TESTS_A,
            "test_b.py": SESSION_TESTS_B,
        },
    )
    session = run(pytester, "--loopwatch")
    assert session.outcomes == {
        "test_a.py::test_a_leaks": "FAILED",
        "test_b.py::test_b_clean_on_the_same_uvloop": "PASSED",
    }
    assert session.findings("test_a_leaks") == [
        ("loopwatch.task_leaked", session.place("test_a.py", "session leak", "test_a_leaks"))
    ]


XDIST_TESTS = """
import asyncio
import time

from helpers import worker


async def test_clean_1():
    await asyncio.sleep(0)


async def test_leaks():
    asyncio.create_task(worker())  # leak


async def test_blocks():
    time.sleep(0.15)  # block


async def test_clean_2():
    await asyncio.sleep(0)
"""


def test_xdist(pytester: pytest.Pytester) -> None:
    """Under pytest-xdist each worker checks its own tests; the reports come back whole."""
    write(
        pytester,
        **{
            "pytest.ini": INI.format(mode="auto", extra=""),
            "helpers.py": HELPERS,
            "test_x.py": XDIST_TESTS,
        },
    )
    session = run(pytester, "--loopwatch", "-n", "2")
    assert session.outcomes == {
        "test_x.py::test_clean_1": "PASSED",
        "test_x.py::test_leaks": "FAILED",
        "test_x.py::test_blocks": "FAILED",
        "test_x.py::test_clean_2": "PASSED",
    }
    assert session.findings("test_leaks") == [
        ("loopwatch.task_leaked", session.place("test_x.py", "leak", "test_leaks"))
    ]
    assert session.findings("test_blocks") == [
        ("loopwatch.slow_callback", session.place("test_x.py", "block", "test_blocks"))
    ]
    assert "2 workers" in session.text


ENV_TESTS = """
import asyncio
import threading
from asyncio.base_events import BaseEventLoop

from helpers import worker


async def test_installed_once():
    loop = asyncio.get_running_loop()
    assert loop.get_task_factory() is None  # the program's own: no second loopwatch layer
    assert getattr(loop._task_factory, "__loopwatch__", False)  # the one the loop calls
    assert not getattr(BaseEventLoop.__init__.__wrapped__, "__loopwatch__", False)
    from loopwatch import _threads

    assert [w.name for w in _threads._all if w.name == "watchdog" and w.running] == ["watchdog"]
    assert threading.enumerate() == [threading.main_thread()]  # and it cannot be seen


async def test_leaks():
    asyncio.create_task(worker())  # leak
"""


def test_with_loopwatch_env_already_on(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """LOOPWATCH=1 in the pytest process: the plugin uses that set-up, installs nothing twice,
    reports each finding once, and leaves the set-up on at the end."""
    write(
        pytester,
        **{
            "pytest.ini": INI.format(mode="auto", extra=""),
            "conftest.py": STATE_CONFTEST,
            "helpers.py": HELPERS,
            "test_env.py": ENV_TESTS,
        },
    )
    monkeypatch.setenv("LOOPWATCH", "1")
    monkeypatch.setenv("LOOPWATCH_LOG", "off")
    session = run(pytester, "--loopwatch")
    assert session.outcomes == {
        "test_env.py::test_installed_once": "PASSED",
        "test_env.py::test_leaks": "FAILED",
    }
    assert session.findings("test_leaks") == [
        ("loopwatch.task_leaked", session.place("test_env.py", "leak", "test_leaks"))
    ]
    state = (pytester.path / "state.txt").read_text()
    # The set-up stays on; the watchdog thread ended with the last loop (the next one starts it).
    assert state == "runtime=True global=True []"


OFF_TESTS = """
import asyncio
import sys

import pytest


async def worker():
    await asyncio.sleep(3600)


@pytest.mark.loopwatch
async def test_leaks_unseen():
    asyncio.create_task(worker())


def test_plugin_not_loaded():
    assert "loopwatch.pytest_plugin" not in sys.modules
"""


def test_disabled_with_p_no_loopwatch(pytester: pytest.Pytester) -> None:
    """-p no:loopwatch: the plugin is not even imported, and its marker is unknown."""
    write(
        pytester,
        **{"pytest.ini": INI.format(mode="auto", extra=""), "test_off.py": OFF_TESTS},
    )
    session = run(pytester, "-p", "no:loopwatch")
    assert session.outcomes == {
        "test_off.py::test_leaks_unseen": "PASSED",
        "test_off.py::test_plugin_not_loaded": "PASSED",
    }
    assert "Unknown pytest.mark.loopwatch" in session.text


def test_bad_ini_value_is_a_usage_error(pytester: pytest.Pytester) -> None:
    """A threshold loopwatch cannot use stops the session with one line naming it."""
    write(pytester, **{"pytest.ini": INI.format(mode="auto", extra="loopwatch_stall_ms = soon")})
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", timeout=60)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert (
        "ERROR: loopwatch: loopwatch_stall_ms='soon' is not accepted; "
        "expected a number of milliseconds above 0"
    ) in result.stderr.lines


# -- anyio's pytest plugin ---------------------------------------------------------------------

ANYIO_CONFTEST = """
import pytest


@pytest.fixture(
    scope="session",
    params=[
        pytest.param(("asyncio", {}), id="asyncio"),
        pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop"),
    ],
)
def anyio_backend(request):
    return request.param
"""

ANYIO_TESTS = """
import asyncio
import time

import anyio
import pytest

from helpers import worker

pytestmark = pytest.mark.anyio


@pytest.fixture
async def function_fixture():
    await anyio.sleep(0)
    yield "function"
    await anyio.sleep(0)


@pytest.fixture(scope="module")
async def module_fixture(anyio_backend):
    await anyio.sleep(0)
    yield "module"


@pytest.fixture(scope="session")
async def session_fixture(anyio_backend):
    await anyio.sleep(0)
    yield "session"


async def test_clean():
    async with anyio.create_task_group() as tg:
        tg.start_soon(anyio.sleep, 0.01)


async def test_clean_with_fixtures(function_fixture, module_fixture, session_fixture):
    assert (function_fixture, module_fixture, session_fixture) == ("function", "module", "session")
    await anyio.sleep(0.01)


async def test_leaks():
    asyncio.get_running_loop().create_task(worker())  # leak


async def test_leaks_with_fixtures(function_fixture, module_fixture, session_fixture):
    asyncio.get_running_loop().create_task(worker())  # fixture-leak


async def test_blocks():
    await anyio.sleep(0)
    time.sleep(0.2)  # anyio-block
    await anyio.sleep(0)


async def test_loop_kind(anyio_backend):
    name, options = anyio_backend
    kind = type(asyncio.get_running_loop()).__module__.split(".")[0]
    assert kind == ("uvloop" if options.get("use_uvloop") else "asyncio")
"""


def test_anyio_runner_is_a_first_class_runner(pytester: pytest.Pytester) -> None:
    """``@pytest.mark.anyio`` on the asyncio and asyncio+uvloop backends, with no, function- and
    module-scoped async fixtures: anyio's own runner task is never a finding; a task a test leaks
    and a block it makes are, at the test's own lines."""
    write(
        pytester,
        **{
            "pytest.ini": "[pytest]\n",
            "conftest.py": ANYIO_CONFTEST,
            "helpers.py": HELPERS,
            "test_anyio_runner.py": ANYIO_TESTS,
        },
    )
    session = run(pytester, "--loopwatch", "-p", "no:asyncio")
    expected = {}
    for backend in ("asyncio", "uvloop"):
        for name, outcome in (
            ("test_clean", "PASSED"),
            ("test_clean_with_fixtures", "PASSED"),
            ("test_leaks", "FAILED"),
            ("test_leaks_with_fixtures", "FAILED"),
            ("test_blocks", "FAILED"),
            ("test_loop_kind", "PASSED"),
        ):
            expected[f"test_anyio_runner.py::{name}[{backend}]"] = outcome
    assert session.outcomes == expected, session.text
    for backend in ("asyncio", "uvloop"):
        assert session.findings(f"test_leaks[{backend}]") == [
            ("loopwatch.task_leaked", session.place("test_anyio_runner.py", "leak", "test_leaks"))
        ]
        assert session.findings(f"test_leaks_with_fixtures[{backend}]") == [
            (
                "loopwatch.task_leaked",
                session.place("test_anyio_runner.py", "fixture-leak", "test_leaks_with_fixtures"),
            )
        ]
        assert session.findings(f"test_blocks[{backend}]") == [
            (
                "loopwatch.slow_callback",
                session.place("test_anyio_runner.py", "anyio-block", "test_blocks"),
            )
        ]
    assert "TestRunner._run_tests_and_fixtures" not in session.text


# -- unittest's IsolatedAsyncioTestCase ----------------------------------------------------------

UNITTEST_TESTS = """
import asyncio
import time
import unittest

from helpers import worker


class Plain(unittest.IsolatedAsyncioTestCase):
    async def asyncSetUp(self):
        await asyncio.sleep(0)

    async def test_clean(self):
        await asyncio.sleep(0.01)

    async def test_leaks(self):
        asyncio.create_task(worker())  # unittest-leak

    async def test_blocks(self):
        await asyncio.sleep(0)
        time.sleep(0.2)  # unittest-block
"""


def test_isolated_asyncio_test_cases_are_judged_under_pytest(pytester: pytest.Pytester) -> None:
    """pytest runs a unittest case whole, with no pytest_pyfunc_call: the plugin judges it around
    the call, blocks and leaks at the test's lines."""
    write(
        pytester,
        **{
            "pytest.ini": "[pytest]\n",
            "helpers.py": HELPERS,
            "test_cases.py": UNITTEST_TESTS,
        },
    )
    session = run(pytester, "--loopwatch", "-p", "no:asyncio")
    assert session.outcomes == {
        "test_cases.py::Plain::test_blocks": "FAILED",
        "test_cases.py::Plain::test_clean": "PASSED",
        "test_cases.py::Plain::test_leaks": "FAILED",
    }, session.text
    assert session.findings("Plain.test_leaks") == [
        ("loopwatch.task_leaked", session.place("test_cases.py", "unittest-leak", "test_leaks"))
    ]
    assert session.findings("Plain.test_blocks") == [
        ("loopwatch.slow_callback", session.place("test_cases.py", "unittest-block", "test_blocks"))
    ]


def test_python_m_unittest_with_the_base_class(pytester: pytest.Pytester) -> None:
    """``loopwatch.IsolatedAsyncioTestCase`` for ``python -m unittest``: the same findings fail
    the same tests, the report listing each with its place."""
    write(
        pytester,
        **{
            "helpers.py": HELPERS,
            "test_cases.py": UNITTEST_TESTS.replace(
                "import unittest\n", "import unittest\n\nimport loopwatch\n"
            ).replace("unittest.IsolatedAsyncioTestCase", "loopwatch.IsolatedAsyncioTestCase"),
        },
    )
    done = pytester.run(sys.executable, "-m", "unittest", "-v", "test_cases", timeout=120)
    text = done.stdout.str() + done.stderr.str()
    assert done.ret == 1, text
    assert "test_clean (test_cases.Plain.test_clean) ... ok" in text
    failed = re.findall(r"^FAIL: (\S+) ", text, re.M)
    assert failed == ["test_blocks", "test_leaks"], text
    place = Session(done, pytester.path).place
    assert (
        "loopwatch.task_leaked at " + place("test_cases.py", "unittest-leak", "test_leaks") in text
    )
    assert (
        "loopwatch.slow_callback at " + place("test_cases.py", "unittest-block", "test_blocks")
        in text
    )
    assert "FAILED (failures=2)" in text


# -- origin: the program's findings fail a test, the libraries' are reported ----------------------

LIBRARY = """
import asyncio


async def poll():
    await asyncio.sleep(3600)


def start():
    return asyncio.get_running_loop().create_task(poll())
"""

LIBRARY_TESTS = """
import asyncio

import pytest
import somelib


async def test_library_leaks(loopwatch):
    somelib.start()
    await asyncio.sleep(0)


@pytest.mark.loopwatch(library="fail")
async def test_library_leaks_and_fails():
    somelib.start()
    await asyncio.sleep(0)
"""

LIBRARY_CONFTEST = """
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "site-packages"))


def pytest_runtest_teardown(item):
    scope = item.funcargs.get("loopwatch")
    if scope is not None:
        Path("library.txt").write_text(
            repr([(e.event, e.coroutine, e.origin) for e in scope.events])
        )
"""


def test_library_findings_are_reported_and_fail_only_when_asked(
    pytester: pytest.Pytester,
) -> None:
    write(
        pytester,
        **{
            "pytest.ini": INI.format(mode="auto", extra=""),
            "site-packages/somelib.py": LIBRARY,
            "conftest.py": LIBRARY_CONFTEST,
            "test_library.py": LIBRARY_TESTS,
        },
    )
    session = run(pytester, "--loopwatch")
    assert session.outcomes == {
        "test_library.py::test_library_leaks": "PASSED",
        "test_library.py::test_library_leaks_and_fails": "FAILED",
    }, session.text
    assert (pytester.path / "library.txt").read_text() == (
        "[('loopwatch.task_leaked', 'poll', 'library')]"
    )
    assert session.findings("test_library_leaks_and_fails") == [
        ("loopwatch.task_leaked", f"{pytester.path}/site-packages/somelib.py:9 in start")
    ]
