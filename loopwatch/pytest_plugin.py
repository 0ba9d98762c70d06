"""The pytest plugin: ``--loopwatch``, ``@pytest.mark.loopwatch(...)``, the ``loopwatch`` fixture.

Loaded through the ``pytest11`` entry point (``-p no:loopwatch`` turns it off). Unless asked, it
only registers its options, its marker and its fixture, and imports nothing of loopwatch's
machinery: a suite that does not use it pays one dictionary lookup per test.

What a test is checked for: a callback or task step that held the loop
(``loopwatch.slow_callback``, ``loopwatch.loop_stalled``), a task the test left pending
(``loopwatch.task_leaked``), a task dropped while pending (``loopwatch.task_orphaned``), an
exception nobody retrieved (``loopwatch.task_exception_unretrieved``) and a coroutine never awaited
(``loopwatch.coroutine_never_awaited``). Any of them, unless allowed, fails the test with a report
that gives each finding's event name, task, coroutine and place, and for a block the stack.

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

import gc
import inspect
import os
import sys
import time
import weakref
from collections.abc import Callable, Generator, Iterable
from typing import TYPE_CHECKING, Any, Final

import pytest

from ._config import SPECS, SettingError, Settings, environ_settings, report
from ._events import EVENT_NAMES, Event

if TYPE_CHECKING:
    import asyncio

    from ._runtime import Runtime
    from ._tasks import TaskStats

# Settings that make sense for one test: they configure the loops the test runs on. The others
# (log, metrics endpoint, summary) belong to the process and are read from the environment.
PER_TEST_SETTINGS: Final = ("slow_callback_ms", "stall_ms", "creation_stack")
_MARKER_ARGS: Final = ("allow", *PER_TEST_SETTINGS)
_PREFIX: Final = "loopwatch."


# -- the scope of one test -----------------------------------------------------------------


class TestScope:
    """The loopwatch scope of one test (the value of the ``loopwatch`` fixture).

    It is open while the test function runs: ``events`` holds every event dispatched meanwhile, in
    order, with the tasks the test left pending added when it ends. ``findings`` are those not
    allowed; when the test is checked (``--loopwatch``, the ``loopwatch`` ini option, or the
    marker), any finding fails it. ``settings`` are those the test's loops ran with.
    """

    __test__ = False  # "Test..." is a scope, not a test class to collect

    def __init__(
        self,
        nodeid: str,
        *,
        overrides: dict[str, Any] | None = None,
        allow: Iterable[str] = (),
        check: bool = True,
    ) -> None:
        self.nodeid = nodeid
        self.check = check
        self.allow: frozenset[str] = frozenset(allow)
        self.events: list[Event] = []
        self.settings: Settings | None = None
        self._overrides = dict(overrides or {})
        self._since = 0.0
        self._tasks_before: TaskStats | None = None
        self._open = False
        self._runtime: Runtime | None = None
        self._previous: Settings | None = None
        self._loops: list[tuple[weakref.ref[asyncio.AbstractEventLoop], Settings]] = []

    def __repr__(self) -> str:
        return f"<loopwatch test scope {self.nodeid} events={len(self.events)}>"

    @property
    def findings(self) -> list[Event]:
        """The events that are not allowed for this test, in order."""
        return [e for e in self.events if e.event not in self.allow]

    def _collect(self, event: Event) -> None:
        self.events.append(event)  # one append: atomic, from whichever thread emits

    def open(self) -> None:
        """Start watching: the test's settings on every open watched loop, events collected."""
        from . import _loops

        runtime = ensure_runtime()
        self._runtime = runtime
        self._previous = runtime.settings
        settings = self.settings = runtime.settings.replace(**self._overrides)
        runtime.settings = settings  # for loops the test makes itself
        for loop in _loops.watched_loops():
            state = _loops.state_of(loop)
            if state is None or loop.is_closed():
                continue
            self._loops.append((weakref.ref(loop), state.settings))
            _loops.attach(loop, settings)
        runtime.dispatcher.add_sink(self._collect)
        self._open = True
        self._tasks_before = _loops.task_totals()
        self._since = time.monotonic()

    def close(self) -> list[Event]:
        """Stop watching; report what the test left behind. Returns the findings."""
        if not self._open:
            return self.findings
        from . import _loops

        self._open = False
        try:
            if self._unsettled_tasks():
                # A task dropped while pending, or one whose exception nobody retrieved, is only
                # reported when the collector frees it: free it now, while the test's scope is
                # open, or a collection during a later test would report it there. A full
                # collection of a pytest process costs 3 to 15 ms and grows with the session,
                # so it is paid only by a test that left such a task; a clean test's tasks all
                # ended ok or cancelled, which the task counts say for free.
                gc.collect()
            self._report_leaks()
        except Exception as exc:  # noqa: BLE001 - the plugin never breaks the test run
            report(f"loopwatch: checking {self.nodeid} failed ({type(exc).__name__}: {exc})")
        finally:
            runtime = self._runtime
            if runtime is not None:
                runtime.dispatcher.remove_sink(self._collect)
                if runtime.settings is self.settings and self._previous is not None:
                    runtime.settings = self._previous
            for ref, previous in self._loops:
                loop = ref()
                if loop is not None and not loop.is_closed() and _loops.state_of(loop):
                    _loops.attach(loop, previous)
            self._loops.clear()
            self._runtime = None
        return self.findings

    def _unsettled_tasks(self) -> bool:
        """Whether a task made during the test is still pending or ended in an error."""
        from . import _loops

        before, after = self._tasks_before, _loops.task_totals()
        if before is None:
            return True
        errors = after.error - before.error
        ended = after.ok - before.ok + after.cancelled - before.cancelled + errors
        return errors > 0 or after.created - before.created > ended

    def _report_leaks(self) -> None:
        """Tasks created since the test began and still pending on a stopped, open loop."""
        import asyncio

        from . import _loops

        for loop in _loops.watched_loops():
            if loop.is_closed() or loop.is_running():
                continue  # closed: reported when it closed; running: another thread's, not done
            tracker = _loops.tracker_of(loop)
            if tracker is not None:
                tracker.report_leaks(asyncio.all_tasks(loop), since=self._since)


# -- the process-wide part -----------------------------------------------------------------

_created_runtime: Runtime | None = None


def ensure_runtime() -> Runtime:
    """The active runtime; if there is none, one made for tests.

    Findings go to the test report, so a runtime made here logs nothing unless ``LOOPWATCH_LOG``
    asks for a particular exporter (``auto``, the default, would send every finding to the
    ``loopwatch`` logger and so print it a second time in the captured log).
    """
    global _created_runtime
    from . import _runtime

    runtime = _runtime.current()
    if runtime is not None:
        return runtime
    overrides = {"log": "off"} if environ_settings().log == "auto" else {}
    runtime = _created_runtime = _runtime.activate(**overrides)
    return runtime


def _enable_global() -> bool:
    """Global mode on, if it is not already; True if this call turned it on."""
    from . import _loops

    if _loops.global_enabled():
        return False  # LOOPWATCH=1, or already on: use it, install nothing twice
    ensure_runtime()
    _loops.enable_global()
    if "uvloop" not in sys.modules:
        from ._import_hooks import when_imported

        when_imported("uvloop", _on_uvloop)
    return True


def _on_uvloop(_: object) -> None:
    from . import _loops

    _loops.patch_uvloop()  # does nothing unless global mode is on when uvloop arrives


def _disable_global() -> None:
    from . import _loops

    _loops.disable_global()


def _teardown() -> None:
    """At the end of the session: undo whatever the plugin installed, and only that."""
    global _created_runtime
    created, _created_runtime = _created_runtime, None
    if created is None:
        return
    from . import _loops, _runtime

    if _runtime.current() is created:
        _loops.uninstall()


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


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "loopwatch(slow_callback_ms=None, stall_ms=None, creation_stack=None, allow=()): check "
        "this test with loopwatch, with these settings; allow: event names not to fail it for.",
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
    asyncio_plugin = sys.modules.get("pytest_asyncio")
    is_async_test = getattr(asyncio_plugin, "is_async_test", None)
    if is_async_test is not None and is_async_test(item):
        return True
    return inspect.iscoroutinefunction(getattr(item, "function", None))


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
        settings = ", ".join(f"{k}={v:g}" for k, v in self.overrides.items())
        allowed = ", ".join(sorted(self.allow)) or "nothing"
        settings = settings or "default settings"
        return f"loopwatch: checking every async test ({settings}; allowed: {allowed})"

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
        turned_on = _enable_global()
        try:
            return (yield)
        finally:
            if turned_on:
                _disable_global()

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_setup(self, item: pytest.Item) -> None:
        plan = item.stash.get(_PLAN, None)
        if plan is None:
            return
        try:
            overrides, allow = _marker_settings(item)
        except ValueError as exc:
            pytest.fail(str(exc), pytrace=False)
        plan.scope = TestScope(
            item.nodeid,
            overrides={**self.overrides, **overrides},
            allow=self.allow | allow,
            check=plan.check,
        )

    @pytest.hookimpl(wrapper=True)
    def pytest_pyfunc_call(self, pyfuncitem: pytest.Function) -> Generator[None, object, object]:
        plan = pyfuncitem.stash.get(_PLAN, None)
        scope = plan.scope if plan is not None else None
        if scope is None:
            return (yield)
        # Global mode is on for a planned item; this covers a scope asked for with
        # request.getfixturevalue("loopwatch") only once the test has started.
        turned_on = _enable_global()
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
                    pyfuncitem.add_report_section("call", "loopwatch", render(findings))
                raise
            findings = scope.close()
        finally:
            if turned_on:
                _disable_global()
        if findings and scope.check:
            pytest.fail(render(findings), pytrace=False)
        return result

    def pytest_unconfigure(self) -> None:
        _teardown()


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


# -- the report ----------------------------------------------------------------------------

# Fields shown by their own rule, or not at all (time and pid say nothing about the test).
_NOT_LISTED: Final = frozenset(
    {"event", "time", "pid", "task", "coroutine", "location", "created_at", "stack"}
)


def render(findings: list[Event]) -> str:
    """The failure report: a headline, then one block per finding."""
    if len(findings) == 1:
        headline = f"{findings[0].event} at {findings[0].place or 'an unknown place'}"
    else:
        names = ", ".join(dict.fromkeys(e.event for e in findings))
        headline = f"{len(findings)} loopwatch findings: {names}"
    lines = [headline]
    for event in findings:
        lines += ["", *_block(event)]
    lines += [
        "",
        "(to allow a finding: @pytest.mark.loopwatch(allow=[...event names...]) "
        "or the loopwatch_allow ini option)",
    ]
    return "\n".join(lines)


def _block(event: Event) -> list[str]:
    fields = event.as_dict()
    lines = [event.event]
    for name in ("task", "coroutine"):
        if name in fields:
            lines.append(f"    {name}: {_value(fields[name])}")
    lines.append(f"    place: {_value(event.place)}")
    for name, value in fields.items():
        if name in _NOT_LISTED or name == "created_stack":
            continue
        if isinstance(value, float) and name.endswith("_s"):
            lines.append(f"    {name}: {value:.3f}")
        else:
            lines.append(f"    {name}: {_value(value)}")
    stack = fields.get("stack")
    if stack:
        lines.append("    stack (program frames, outermost first):")
        lines += [f"        {place}" for place in program_frames(stack)]
    created = fields.get("created_stack")
    if created:
        lines.append("    created from (innermost first):")
        lines += [f"        {place}" for place in created]
    return lines


def _value(value: object) -> str:
    return "none" if value is None else str(value)


def program_frames(stack: list[str]) -> list[str]:
    """The places of a stack in the program's own code (all of them, if none is).

    Besides what loopwatch counts as library code, this leaves out the interpreter's and the
    environment's own scripts (``.venv/bin/pytest``), which start every stack under pytest.
    """
    from ._places import is_own_code

    own = [place for place in stack if _is_program_file(_path_of(place), is_own_code)]
    return own or list(stack)


_PREFIXES: Final = tuple(
    {os.path.join(os.path.abspath(p), "") for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)}
)


def _is_program_file(path: str, is_own_code: Callable[[str], bool]) -> bool:
    return is_own_code(path) and not os.path.abspath(path).startswith(_PREFIXES)


def _path_of(place: str) -> str:
    """The file of a ``path:line in function`` place."""
    return place.rpartition(" in ")[0].rpartition(":")[0]
