"""From detectors to scopes and exporters, without ever holding up the program.

An exporter is any callable that takes an event (``Callable[[Event], None]``), as a structlog
processor is any callable of a documented shape. Events come from the loop's thread, the
watchdog's thread and the garbage collector (which runs finalizers inside any allocation, on any
thread, possibly while loopwatch itself is half-way through something). So emitting is made of
steps that cannot wait, deadlock or fail:

- the event is counted with an atomic counter (one C call, no lock);
- the sinks see it at once: scopes (``watch()``, a test's scope) only append it to a list;
- it is appended to a queue (a C ``deque``: atomic, no lock) for the reporter thread, which is
  woken by releasing a lock it waits on (no allocation, no system call, never blocks).

The reporter thread (one per process, invisible: see ``_threads``) calls the exporters, one event
at a time, with no lock of loopwatch's held. An exporter that raises is removed and the failure
said once on standard error. Exporters that hold events back (flood folding) are asked when they
next need a call (``due``) and flushed then, at exit and on ``uninstall()``. Nothing the program's
thread runs here writes to a file or a socket.
"""

from __future__ import annotations

import _thread
import atexit
import contextlib
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from ._config import report
from ._events import EVENT_NAMES, Event
from ._stats import Counter
from ._threads import Worker, hidden_call, wake_due, want, woken

Exporter = Callable[[Event], None]
_monotonic = time.monotonic
_INF = float("inf")


class Line(str):
    """A line for standard error, queued like an event (a failure said from a hook)."""

    __slots__ = ()


class Dispatcher:
    """Counts every event exactly, shows it to each sink, and queues it for the exporters."""

    def __init__(self) -> None:
        self._exporters: tuple[Exporter, ...] = ()
        self._sinks: tuple[Callable[[Event], None], ...] = ()
        self._counters: dict[str, Counter] = {name: Counter() for name in EVENT_NAMES}
        self._queue: deque[Event | Line] = deque()
        # Released to wake the reporter; it is held (locked) while the reporter may sleep on it.
        self._bell = _thread.allocate_lock()
        self._bell.acquire()
        self._handled = 0  # items the reporter has finished with (it alone writes it)
        self._queued = Counter()
        self._said: set[str] = set()
        self._closed = False
        self._final = False  # closing: the reporter writes everything held back before it ends
        self.worker = Worker(
            "reporter", self._run, self._ring, failure="findings are no longer written"
        )
        atexit.register(self._at_exit)

    # -- configuration -------------------------------------------------------------------------

    @property
    def exporters(self) -> tuple[Exporter, ...]:
        return self._exporters

    def add_exporter(self, exporter: Exporter) -> None:
        if exporter not in self._exporters:
            self._exporters = (*self._exporters, exporter)

    def remove_exporter(self, exporter: Exporter) -> None:
        self._exporters = tuple(e for e in self._exporters if e is not exporter)

    def add_sink(self, sink: Callable[[Event], None]) -> None:
        self._sinks = (*self._sinks, sink)

    def remove_sink(self, sink: Callable[[Event], None]) -> None:
        self._sinks = tuple(s for s in self._sinks if s != sink)

    @property
    def counts(self) -> dict[str, int]:
        """Events dispatched so far, by name (every name, zeros included)."""
        return {name: counter.value for name, counter in self._counters.items()}

    # -- the emitting side: any thread, a finalizer, the collector; never waits ------------------

    def emit(self, event: Event) -> None:
        counter = self._counters.get(event.event)
        if counter is None:  # an event class of someone else's: counted from now on
            counter = self._counters.setdefault(event.event, Counter())
        counter.add()
        for sink in self._sinks:
            try:
                sink(event)
            except Exception as exc:  # noqa: BLE001 - a scope's failure stays with that scope
                self.remove_sink(sink)
                self.say(f"loopwatch: a scope failed ({describe(exc)}); it is disabled")
        if self._exporters and not self._closed:
            self._queue.append(event)
            self._queued.add()
            self._ring()

    def say(self, line: str, *, once: str | None = None) -> None:
        """A line for standard error, written by the reporter (``once``: a key said only once)."""
        if once is not None:
            if once in self._said:
                return
            self._said.add(once)
        if self._closed or not self.worker.running:
            report(line)
            return
        self._queue.append(Line(line))
        self._queued.add()
        self._ring()

    def _ring(self) -> None:
        if self._bell.locked():
            want()  # the reporter wakes: the loop's next pulse hands it the GIL (_threads)
            try:  # noqa: SIM105 - no context manager object made on an emitting path
                self._bell.release()
            except RuntimeError:  # another thread rang it first
                pass

    # -- the reporter's side ---------------------------------------------------------------------

    def start(self) -> None:
        """Start the reporter thread (when the first loop is watched)."""
        if not self._closed:
            self.worker.start()

    def _run(self, keep_going: Callable[[], bool]) -> None:
        for exporter in self._exporters:
            # An exporter's set-up that touches files or sockets (a log file opened, so a bad
            # path is said at start): here, on this thread, never on a loop's.
            prepare = getattr(getattr(exporter, "inner", exporter), "prepare", None)
            if prepare is not None:
                self._call(exporter, None, call=prepare)
        while True:
            due = self._next_due()
            timeout = -1.0 if due == _INF else max(due - _monotonic(), 0.0)
            if due != _INF:
                wake_due(due)  # a busy loop hands this thread the GIL then (_threads)
            self._bell.acquire(True, timeout)
            woken()
            self._drain()
            going = keep_going()
            self._flush_due(_monotonic(), everything=not going and self._final)
            if not going:
                return

    def _drain(self) -> None:
        queue = self._queue
        while queue:
            try:
                item = queue.popleft()
            except IndexError:
                return
            try:
                if isinstance(item, Line):
                    report(item)
                else:
                    for exporter in self._exporters:
                        self._call(exporter, item)
            finally:
                self._handled += 1

    def _call(self, exporter: Exporter, event: Any, call: Any = None) -> None:
        try:
            if call is not None:
                hidden_call(lambda _: call(), None)
            else:
                hidden_call(exporter, event)
        except Exception as exc:  # noqa: BLE001 - see the module docstring
            self.remove_exporter(exporter)
            name = getattr(exporter, "name", None) or type(exporter).__name__
            report(f"loopwatch: exporter {name} failed ({describe(exc)}); it is disabled")
        except BaseException:  # noqa: BLE001 - SystemExit from a handler: this event only
            pass

    def _next_due(self) -> float:
        due = _INF
        for exporter in self._exporters:
            when = getattr(exporter, "due", None)
            if when is not None:
                due = min(due, when())
        return due

    def _flush_due(self, now: float, *, everything: bool = False) -> None:
        for exporter in self._exporters:
            flush = getattr(exporter, "flush", None)
            if flush is None:
                continue
            try:
                for held in flush(now, everything=everything):
                    inner = getattr(exporter, "inner", exporter)
                    self._call(inner, held)
            except Exception as exc:  # noqa: BLE001
                self.remove_exporter(exporter)
                report(f"loopwatch: exporter {exporter!r} failed ({describe(exc)}); it is disabled")

    def settle(self, timeout: float = 0.5) -> None:
        """Give the reporter a moment to write what is queued (a loop's run just ended: the program
        may now exit with ``os._exit``, which runs no exit handler). Costs nothing when nothing is
        queued, which is almost always."""
        if self._handled < self._queued.value and self.worker.running:
            self.wait_idle(timeout)

    def wait_idle(self, timeout: float = 5.0) -> bool:
        """Wait until the reporter has handled every queued event (for tests and shutdown)."""
        deadline = _monotonic() + timeout
        while self._handled < self._queued.value:
            if not self.worker.running:
                self._drain()
                return True
            if _monotonic() > deadline:
                return False
            time.sleep(0.002)
        return True

    # -- endings -------------------------------------------------------------------------------

    def stop_idle(self, timeout: float = 2.0) -> None:
        """Let the reporter end once it has written what is queued (the last loop went away).
        Events that come later wait for the next loop, ``uninstall()`` or exit."""
        if self.worker.running:
            self.worker.stop(timeout)

    def close(self, timeout: float = 2.0) -> None:
        """Write what is queued and what exporters hold back, then close them (``uninstall()``,
        exit). Bounded: a reporter stuck in a program's log handler is left behind."""
        if self._closed:
            return
        atexit.unregister(self._at_exit)
        was_running = self.worker.running
        self._final = True
        self.worker.stop(timeout)
        self._closed = True
        if not was_running:
            self._drain()
            self._flush_due(_monotonic(), everything=True)
        exporters, self._exporters = self._exporters, ()
        for exporter in exporters:
            close = getattr(exporter, "close", None)
            if close is not None:
                with contextlib.suppress(Exception):  # closing is best effort
                    close()

    def _at_exit(self) -> None:
        self.close()

    def after_fork_in_child(self) -> None:
        """What the parent queued or held back is the parent's to write; the child starts empty."""
        self._queue = deque()
        self._bell = _thread.allocate_lock()
        self._bell.acquire()
        self._handled = 0
        self._queued = Counter()
        for exporter in self._exporters:
            hook = getattr(exporter, "after_fork_in_child", None)
            if hook is not None:
                hook()


def describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# Older name, kept for the modules that import it.
_describe = describe
