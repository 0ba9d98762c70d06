"""The pytest plugin: ``--loopwatch``, ``@pytest.mark.loopwatch(...)``, the ``loopwatch`` fixture.

Loaded through the ``pytest11`` entry point (``-p no:loopwatch`` turns it off). Unless asked, it
only registers its options, its marker and its fixture, and imports nothing of loopwatch's
machinery: a suite that does not use it pays one dictionary lookup per test.

What a test is checked for: a callback or task step that held the loop
(``loopwatch.slow_callback``, ``loopwatch.loop_stalled``), a task the test left pending
(``loopwatch.task_leaked``), a task dropped while pending (``loopwatch.task_orphaned``), an
exception nobody retrieved (``loopwatch.task_exception_unretrieved``) and a coroutine never awaited
(``loopwatch.coroutine_never_awaited``). Any of them, unless allowed, fails the test with a report
that gives each finding's event name, task, coroutine and place, and for a block the stack. A
finding of an installed library's own task (``origin`` library: made and run by libraries only)
is kept in the test's events without failing it, unless ``loopwatch_library = fail`` (ini) or
``@pytest.mark.loopwatch(library="fail")`` asks.

Runners: pytest-asyncio (every loop scope), anyio's plugin (its own runner task, kept across tests
and cancelled when the runner closes, is never a finding) and ``unittest.IsolatedAsyncioTestCase``
(judged around the whole call, which pytest makes for a unittest case instead of
``pytest_pyfunc_call``; its runner's loop is closed inside that call, so every task it leaves is
reported there).

Where the test is judged, and why there
---------------------------------------
pytest-asyncio 1.x runs an async test in the *call* phase: its ``runtest`` swaps the test function
for a synchronous wrapper that runs the test's coroutine to completion on the loop of the test's
loop scope (``Runner.run`` from 1.1 on, ``run_until_complete`` in 1.0) and returns. The loop is
closed later, in the teardown of the fixture that owns it: right after the test for the function
scope, but only after the last test of the module, package or session for the wider scopes. A
leak judged when the loop closes is therefore blamed on whichever test happens to be last, and a
finding raised in a teardown is an error of the teardown, not a failure of the test.

So the plugin judges in a hook wrapper around ``pytest_pyfunc_call``, the hook that calls the
test function. When it resumes, the test's coroutine has finished and its loop has stopped but is
still open, whatever its scope, with every task the test left behind still pending on it. At that
point:

- every block the test caused has been reported already: a watched loop finishes the block under
  way when ``run_forever`` returns (a block of an earlier step was finished by the watchdog or the
  next heartbeat);
- a garbage collection turns tasks dropped while pending into ``task_orphaned``, and lost
  exceptions and never-awaited coroutines caught in reference cycles into their events;
- each open, stopped, watched loop is asked for the tasks still pending that were created since
  the call began. Tasks of the fixtures (created during set-up) are not the test's and are not
  counted, so a module-scoped server fixture does not make every test fail.

The other candidates were worse. An autouse fixture runs its teardown in an order relative to
pytest-asyncio's runner fixture that the plugin does not control, and only produces errors. Wrapping
the test coroutine itself needs to know pytest-asyncio's synchronisation target, which changed
between 1.0 and 1.1 and differs for Hypothesis tests; judging from outside needs none of it. It
also means the test task has ended, and the loop is not running, so nothing moves while it is
judged.

Which loops: while an async test (or a test that asked for loopwatch) is set up, run and torn down,
global mode is on (as with ``LOOPWATCH=1``), so each loop made then is watched from birth however it
was made: pytest-asyncio's default loops, its loop factories (``pytest_asyncio_loop_factories``,
e.g. uvloop), or a custom event-loop policy. Global mode is off again for sync tests, which are not
touched. With ``LOOPWATCH=1`` already on in the pytest process, the plugin uses what is there and
installs nothing a second time.
"""

from __future__ import annotations

import inspect
import sys
import unittest
from collections.abc import Generator, Iterable
from typing import TYPE_CHECKING, Any, Final

import pytest

from ._config import SPECS, SettingError, report
from ._events import EVENT_NAMES
from ._testing import (
    TestScope,
    active,
    disable_global,
    enable_global,
    render,
    take_created_runtime,
)

if TYPE_CHECKING:
    pass

# Settings that make sense for one test: they configure the loops the test runs on. The others
# (log, metrics endpoint, summary) belong to the process and are read from the environment.
PER_TEST_SETTINGS: Final = ("slow_callback_ms", "stall_ms", "creation_stack")
_MARKER_ARGS: Final = ("allow", "library", *PER_TEST_SETTINGS)
LIBRARY_CHOICES: Final = ("report", "fail")
_PREFIX: Final = "loopwatch."


def _teardown() -> None:
    """At the end of the session: undo whatever the plugin installed, and only that."""
    created = take_created_runtime()
    if created is None:
        return
    from . import _api, _runtime  # (deferred: loopwatch's runtime only if a test started it)

    if _runtime.current() is created:
        _api.uninstall()


# -- options, markers, per-test plans ------------------------------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("loopwatch", "loopwatch (asyncio event-loop watchdog)")
    group.addoption(
        "--loopwatch",
        action="store_true",
        default=False,
        help="check every async test: fail it if it blocked the loop, left a task pending, "
        "lost a task's exception or never awaited a coroutine.",
    )
    parser.addini(
        "loopwatch", type="bool", default=False, help="check every async test (as --loopwatch)."
    )
    for name in PER_TEST_SETTINGS:
        spec = SPECS[name]
        parser.addini(f"loopwatch_{name}", type="string", default="", help=spec.doc)
    parser.addini(
        "loopwatch_allow",
        type="args",
        default=[],
        help="event names not to fail a test for, e.g. loopwatch.task_leaked (or task_leaked).",
    )
    parser.addini(
        "loopwatch_library",
        type="string",
        default="report",
        help="findings of installed libraries' own tasks (origin library): report (in the "
        "loopwatch fixture's events, not failing the test) or fail.",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "loopwatch(slow_callback_ms=None, stall_ms=None, creation_stack=None, allow=(), "
        "library='report'): check this test with loopwatch, with these settings; allow: event "
        "names not to fail it for; library='fail': fail it on findings of libraries' own tasks "
        "too.",
    )
    config.pluginmanager.register(_Plugin(config), "loopwatch-session")


def event_names(value: object, where: str) -> frozenset[str]:
    """``allow`` as full event names; a short name (``task_leaked``) gets its ``loopwatch.``."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, Iterable):
        raise ValueError(f"{where}: allow must be a list of event names, not {value!r}")
    names = set()
    for item in items:
        name = str(item).strip()
        full = name if name.startswith(_PREFIX) else _PREFIX + name
        if full not in EVENT_NAMES:
            known = ", ".join(EVENT_NAMES)
            raise ValueError(f"{where}: unknown event {name!r} in allow; known events: {known}")
        names.add(full)
    return frozenset(names)


def library_fails(value: object, where: str) -> bool:
    """``library``: ``report`` (default) or ``fail``."""
    word = str(value).strip().lower()
    if word not in LIBRARY_CHOICES:
        raise ValueError(f"{where}: library={value!r} is not accepted; expected report or fail")
    return word == "fail"


def _ini_settings(config: pytest.Config) -> tuple[dict[str, Any], frozenset[str]]:
    overrides: dict[str, Any] = {}
    for name in PER_TEST_SETTINGS:
        raw = str(config.getini(f"loopwatch_{name}")).strip()
        if raw:
            try:
                overrides[name] = SPECS[name].coerce(raw, f"loopwatch_{name}")
            except SettingError as exc:
                raise pytest.UsageError(str(exc)) from None
    try:
        allow = event_names(config.getini("loopwatch_allow"), "loopwatch_allow")
        overrides["library"] = library_fails(config.getini("loopwatch_library"), "loopwatch")
    except ValueError as exc:
        raise pytest.UsageError(f"loopwatch: {exc}") from None
    return overrides, allow


def _marker_settings(item: pytest.Item) -> tuple[dict[str, Any], frozenset[str]]:
    """The settings and allow-list of the item's markers; the closest marker wins a setting,
    allow-lists add up. Raises ValueError with a message for the user."""
    overrides: dict[str, Any] = {}
    allow: frozenset[str] = frozenset()
    where = f"{item.nodeid}: @pytest.mark.loopwatch"
    for mark in reversed(list(item.iter_markers("loopwatch"))):  # farthest first
        if mark.args:
            raise ValueError(f"{where} takes keyword arguments only, not {mark.args!r}")
        for name, value in mark.kwargs.items():
            if name == "allow":
                allow |= event_names(value, where)
            elif name == "library":
                overrides["library"] = library_fails(value, where)
            elif name in PER_TEST_SETTINGS:
                try:
                    overrides[name] = SPECS[name].coerce(value, name)
                except SettingError as exc:
                    raise ValueError(f"{where}: {exc}") from None
            else:
                accepted = ", ".join(_MARKER_ARGS)
                raise ValueError(f"{where}: unknown argument {name!r}; accepted: {accepted}")
    return overrides, allow


def _is_async(item: pytest.Item) -> bool:
    """An async test: pytest-asyncio's, anyio's (its marker or its backend fixture), or a method
    of a ``unittest.IsolatedAsyncioTestCase``."""
    asyncio_plugin = sys.modules.get("pytest_asyncio")
    is_async_test = getattr(asyncio_plugin, "is_async_test", None)
    if is_async_test is not None and is_async_test(item):
        return True
    if _is_unittest_async(item):
        return True
    if item.get_closest_marker("anyio") is not None:
        return True
    if "anyio_backend" in getattr(item, "fixturenames", ()):
        return True
    return inspect.iscoroutinefunction(getattr(item, "function", None))


def _is_unittest_async(item: pytest.Item) -> bool:
    cls = getattr(item, "cls", None)
    return (
        isinstance(cls, type)
        and issubclass(cls, unittest.IsolatedAsyncioTestCase)
        and type(item).__name__ == "TestCaseFunction"
    )


class _Plan:
    """What the plugin does for one item, decided at collection."""

    __slots__ = ("check", "scope")

    def __init__(self, check: bool) -> None:
        self.check = check
        self.scope: TestScope | None = None


_PLAN = pytest.StashKey[_Plan]()
# Items during which global mode is on: async tests and watched tests, once anything is watched.
_GLOBAL = pytest.StashKey[bool]()
_FIXTURE = "loopwatch"


class _Plugin:
    """The session's hooks (registered by ``pytest_configure``)."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.every_async_test = bool(config.getoption("loopwatch") or config.getini("loopwatch"))
        self.overrides, self.allow = _ini_settings(config)

    def pytest_report_header(self, config: pytest.Config) -> str | None:
        if not self.every_async_test:
            return None
        settings = ", ".join(
            f"{k}={v:g}" for k, v in self.overrides.items() if k in PER_TEST_SETTINGS
        )
        allowed = ", ".join(sorted(self.allow)) or "nothing"
        settings = settings or "default settings"
        library = "failing" if self.overrides.get("library") else "reported"
        return (
            f"loopwatch: checking every async test ({settings}; allowed: {allowed}; "
            f"libraries' findings {library})"
        )

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        planned = []
        for item in items:
            is_async = _is_async(item)
            check = item.get_closest_marker("loopwatch") is not None or (
                self.every_async_test and is_async
            )
            if check or _FIXTURE in getattr(item, "fixturenames", ()):
                item.stash[_PLAN] = _Plan(check)
                planned.append(item)
            elif is_async:
                planned.append(item)  # its loop may serve a later watched test
        if any(_PLAN in item.stash for item in planned):
            for item in planned:
                item.stash[_GLOBAL] = True

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_protocol(self, item: pytest.Item) -> Generator[None, object, object]:
        if not item.stash.get(_GLOBAL, False):
            return (yield)
        turned_on = enable_global()
        try:
            return (yield)
        finally:
            if turned_on:
                disable_global()

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_setup(self, item: pytest.Item) -> None:
        plan = item.stash.get(_PLAN, None)
        if plan is None:
            return
        try:
            overrides, allow = _marker_settings(item)
        except ValueError as exc:
            pytest.fail(str(exc), pytrace=False)
        settings = {**self.overrides, **overrides}
        library = bool(settings.pop("library", False))
        plan.scope = TestScope(
            item.nodeid,
            overrides=settings,
            allow=self.allow | allow,
            check=plan.check,
            library_fails=library,
        )

    @pytest.hookimpl(wrapper=True)
    def pytest_pyfunc_call(self, pyfuncitem: pytest.Function) -> Generator[None, object, object]:
        plan = pyfuncitem.stash.get(_PLAN, None)
        scope = plan.scope if plan is not None else None
        if scope is None:
            return (yield)
        return (yield from _judged(pyfuncitem, scope))

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_call(self, item: pytest.Item) -> Generator[None, object, object]:
        """unittest's test cases: pytest runs them whole (set-up, test, clean-ups, and the loop
        of an ``IsolatedAsyncioTestCase``, closed by its runner), with no ``pytest_pyfunc_call``:
        they are judged around the whole call."""
        plan = item.stash.get(_PLAN, None)
        scope = plan.scope if plan is not None else None
        if scope is None or not _is_unittest_async(item):
            return (yield)
        return (yield from _judged(item, scope))

    def pytest_unconfigure(self) -> None:
        _teardown()


def _judged(item: pytest.Item, scope: TestScope) -> Generator[None, object, object]:
    """Run the test (``yield``) inside its scope; fail it on its findings."""
    # Global mode is on for a planned item; this covers a scope asked for with
    # request.getfixturevalue("loopwatch") only once the test has started.
    turned_on = enable_global()
    active.append(scope)
    try:
        try:
            scope.open()
        except Exception as exc:  # noqa: BLE001 - the plugin never breaks the test run
            report(f"loopwatch: watching {scope.nodeid} failed ({type(exc).__name__}: {exc})")
        try:
            result = yield
        except BaseException:
            findings = scope.close()
            if findings:
                item.add_report_section("call", "loopwatch", render(findings))
            raise
        findings = scope.close()
    finally:
        active.remove(scope)
        if turned_on:
            disable_global()
    if findings and scope.check:
        pytest.fail(render(findings), pytrace=False)
    return result


@pytest.fixture(name="loopwatch")
def _loopwatch_fixture(request: pytest.FixtureRequest) -> TestScope:
    """The loopwatch scope of the current test: ``.events`` holds what loopwatch saw while the test
    ran (and the tasks it left pending, once it ends), ``.findings`` those not allowed.

    Asking for it watches the test even without ``--loopwatch``; the test then fails on findings
    only if it is also checked (``--loopwatch``, the ini option or the marker).
    """
    item: pytest.Item = request.node
    plan = item.stash.get(_PLAN, None)
    if plan is None:  # asked for with request.getfixturevalue(): watch, do not check
        plan = item.stash[_PLAN] = _Plan(check=False)
    if plan.scope is None:
        plan.scope = TestScope(item.nodeid, check=plan.check)
    return plan.scope


# -- the report: see _testing ---------------------------------------------------------------
