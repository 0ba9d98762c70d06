"""What a test runner needs of loopwatch: the scope of one test, and the report of its findings.

Shared by the pytest plugin (``pytest_plugin``) and :class:`IsolatedAsyncioTestCase`, for tests run
by ``python -m unittest``. Nothing here imports pytest.
"""

from __future__ import annotations

import gc
import os
import sys
import time
import unittest
import weakref
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Final

from ._config import Settings, environ_settings, report
from ._events import Event

if TYPE_CHECKING:
    import asyncio

    from ._runtime import Runtime
    from ._tasks import TaskStats

# -- the scope of one test -----------------------------------------------------------------


class TestScope:
    """The loopwatch scope of one test (the value of the pytest ``loopwatch`` fixture).

    It is open while the test runs: ``events`` holds every event dispatched meanwhile, in order,
    with the tasks the test left pending added when it ends. ``findings`` are those that fail the
    test when it is checked: the program's (``origin`` program; also the libraries' with
    ``library_fails``) and not allowed. ``settings`` are those the test's loops ran with.
    """

    __test__ = False  # "Test..." is a scope, not a test class to collect

    def __init__(
        self,
        nodeid: str,
        *,
        overrides: dict[str, Any] | None = None,
        allow: Iterable[str] = (),
        check: bool = True,
        library_fails: bool = False,
    ) -> None:
        self.nodeid = nodeid
        self.check = check
        self.library_fails = library_fails
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
        """The events that fail this test, in order: not allowed, and the program's (or any,
        with ``library_fails``)."""
        return [
            e
            for e in self.events
            if e.event not in self.allow and (self.library_fails or e.origin == "program")
        ]

    def _collect(self, event: Event) -> None:
        self.events.append(event)  # one append: atomic, from whichever thread emits

    def open(self) -> None:
        """Start watching: the test's settings on every open watched loop, events collected."""
        runtime = ensure_runtime()
        loops = runtime.loops
        self._runtime = runtime
        self._previous = runtime.settings
        settings = self.settings = runtime.settings.replace(**self._overrides)
        runtime.settings = settings  # for loops the test makes itself
        for loop in loops.watched_loops():
            state = loops.state_of(loop)
            if state is None or loop.is_closed():
                continue
            self._loops.append((weakref.ref(loop), state.settings))
            loops.attach(loop, settings)
        runtime.dispatcher.add_sink(self._collect)
        self._open = True
        self._tasks_before = loops.task_totals()
        self._since = time.monotonic()

    def check_leaks(self) -> None:
        """Report, now, what the test left behind on its loops (still open, stopped)."""
        try:
            if self._unsettled_tasks():
                gc.collect()
            self._report_leaks()
        except Exception as exc:  # noqa: BLE001 - never breaks the test run
            report(f"loopwatch: checking {self.nodeid} failed ({type(exc).__name__}: {exc})")

    def close(self) -> list[Event]:
        """Stop watching; report what the test left behind. Returns the findings."""
        if not self._open:
            return self.findings
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
                if runtime is None or loop is None or loop.is_closed():
                    continue
                if runtime.loops.state_of(loop):
                    runtime.loops.attach(loop, previous)
            self._loops.clear()
            self._runtime = None
        return self.findings

    def _unsettled_tasks(self) -> bool:
        """Whether a task made during the test is still pending or ended in an error."""
        runtime = self._runtime
        before = self._tasks_before
        if before is None or runtime is None:
            return True
        after = runtime.loops.task_totals()
        errors = after.error - before.error
        ended = after.ok - before.ok + after.cancelled - before.cancelled + errors
        return errors > 0 or after.created - before.created > ended

    def _report_leaks(self) -> None:
        """Tasks created since the test began and still pending on a stopped, open loop."""
        import asyncio  # (deferred: this module is imported before any loop exists)

        runtime = self._runtime
        if runtime is None:
            return
        loops = runtime.loops
        for loop in loops.watched_loops():
            if loop.is_closed() or loop.is_running():
                continue  # closed: reported when it closed; running: another thread's, not done
            tracker = loops.tracker_of(loop)
            if tracker is not None:
                tracker.report_leaks(asyncio.all_tasks(loop), since=self._since)


# -- the process-wide part -----------------------------------------------------------------

_created_runtime: Runtime | None = None


def take_created_runtime() -> Runtime | None:
    """The runtime made for tests (by ensure_runtime), handed over once (to be uninstalled)."""
    global _created_runtime
    created, _created_runtime = _created_runtime, None
    return created


def ensure_runtime() -> Runtime:
    """The active runtime; if there is none, one made for tests.

    Findings go to the test report, so a runtime made here logs nothing unless ``LOOPWATCH_LOG``
    asks for a particular exporter (``auto``, the default, would send every finding to the
    ``loopwatch`` logger and so print it a second time in the captured log).
    """
    global _created_runtime
    from . import _api, _runtime  # (deferred: loopwatch starts only when a test asks for it)

    runtime = _runtime.current()
    if runtime is not None:
        return runtime
    overrides: dict[str, Any] = {"log": "off"} if environ_settings().log == "auto" else {}
    runtime = _created_runtime = _api.activate(**overrides)
    return runtime


def enable_global() -> bool:
    """Global mode on, if it is not already; True if this call turned it on."""
    from . import _runtime  # (deferred: loopwatch starts only when a test asks for it)

    runtime = _runtime.current()
    if runtime is not None and runtime.loops.global_mode:
        return False  # LOOPWATCH=1, or already on: use it, install nothing twice
    ensure_runtime().loops.enable_global()
    if "uvloop" not in sys.modules:
        from ._import_hooks import when_imported  # (deferred: as above)

        when_imported("uvloop", _on_uvloop)
    return True


def _on_uvloop(_: object) -> None:
    from . import _api  # (deferred: loopwatch starts only when a test asks for it)

    _api.patch_uvloop()  # does nothing unless global mode is on when uvloop arrives


def disable_global() -> None:
    from . import _runtime  # (deferred: loopwatch starts only when a test asks for it)

    runtime = _runtime.current()
    if runtime is not None:
        runtime.loops.disable_global()


# -- unittest ----------------------------------------------------------------------------------

# The scope a runner (the pytest plugin) opened for the test that runs now, if any.
active: list[TestScope] = []


class IsolatedAsyncioTestCase(unittest.IsolatedAsyncioTestCase):
    """``unittest.IsolatedAsyncioTestCase`` that fails a test whose loop loopwatch finds blocked,
    or that leaves a task pending, loses a task's exception or never awaits a coroutine.

    For tests run by ``python -m unittest`` (under ``pytest --loopwatch`` the plugin checks every
    ``IsolatedAsyncioTestCase`` itself). Settings for a class: ``loopwatch_settings`` (as
    ``loopwatch.install()`` takes them, e.g. ``{"slow_callback_ms": 50}``) and
    ``loopwatch_allow`` (event names not to fail for). The failure lists each finding with its
    place, as the pytest plugin does.
    """

    loopwatch_settings: dict[str, Any] = {}  # noqa: RUF012 - read, never changed
    loopwatch_allow: tuple[str, ...] = ()

    def run(self, result: unittest.TestResult | None = None) -> unittest.TestResult | None:
        if active:  # a runner checks this test already
            return super().run(result)
        allow = frozenset(
            name if name.startswith("loopwatch.") else "loopwatch." + name
            for name in self.loopwatch_allow
        )
        scope = TestScope(self.id(), overrides=dict(self.loopwatch_settings), allow=allow)
        turned_on = enable_global()
        scope.open()
        # Cleanups run last in, first out: this one after every cleanup of the test's own, and
        # before the test's loop is closed (its pending tasks are still there to be seen).
        self.addCleanup(self._loopwatch_check, scope)
        try:
            return super().run(result)
        finally:
            scope.close()
            if turned_on:
                disable_global()

    def _loopwatch_check(self, scope: TestScope) -> None:
        scope.check_leaks()
        findings = scope.findings
        if findings:
            self.fail(render(findings))


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
    from ._places import is_own_code  # (deferred: pytest sessions that never watch a loop)

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
