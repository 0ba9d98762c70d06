"""Per-step and per-coroutine timing: wall time, busy time (the sum of a task's steps), steps.

Busy time is measured by :class:`Timed`, a proxy the task factory puts between a task and its
coroutine. The task drives the proxy exactly as it would drive the coroutine (a step, or
``throw`` to cancel), and the proxy forwards everything a program reads from a coroutine
(``__qualname__``, ``cr_frame``, ``cr_code``, ``cr_await``...), so ``repr(task)``,
``task.get_stack()`` and ``task.get_coro().__qualname__`` read as before. The proxy also sees the
coroutine end, so a task's wall time and outcome are taken there with no done callback.

:class:`PyTimed` is the pure-Python proxy: each step costs two ``perf_counter`` reads and a
Python-level ``__next__`` call the C task cannot inline (about 300 ns on 3.13, more on 3.11), a
return is a ``StopIteration``, and with step timing off (``LOOPWATCH_STEP_TIMING=0``) there is no
proxy and a done callback takes the end instead.

Totals are kept per coroutine name, capped at ``coroutine_labels`` names (the rest count under
``other``): each loop adds into rows of its own, with no lock, and readers add the loops up.

The hot paths have a compiled twin, ``loopwatch._accel`` (``_accel.c``), built at install time
where a C compiler is found: its proxy is driven through the ``am_send`` slot (a step is a C call,
about 40 ns, and a return makes no ``StopIteration``), and it updates the task counts and the
coroutine's row itself when the coroutine ends. ``ACCEL`` is that module, or None (not built, or
``LOOPWATCH_ACCEL=0``): then the pure-Python classes here do the same work.
"""

from __future__ import annotations

import asyncio
import collections
import collections.abc
import contextlib
import functools
import inspect
import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar, overload

from . import _context, _places
from ._native import ACCEL
from ._stats import LATENCY_BUCKETS, HistogramSnapshot

_perf = time.perf_counter
OTHER = "other"
# Task lifetimes run longer than loop latencies: the same edges, then minutes.
DURATION_BUCKETS: tuple[float, ...] = (*LATENCY_BUCKETS, 30.0, 60.0, 300.0)


def _configure_accel() -> Any:
    """The compiled hot paths (``_native.ACCEL``), configured with asyncio's types and buckets."""
    if ACCEL is not None:
        ACCEL.configure(
            asyncio.Task,
            asyncio.CancelledError,
            _places.machinery_cache(),
            asyncio.Handle._run.__code__,
            DURATION_BUCKETS,
            LATENCY_BUCKETS,
        )
    return ACCEL


_configure_accel()


def _strip_own_frame(exc: BaseException) -> None:
    """Drop the proxy's own frame from the head of a traceback: the program sees its frames only.

    Called in an ``except`` block followed by a bare ``raise``, which re-raises without adding
    the frame back (RERAISE does not extend the traceback).
    """
    tb = exc.__traceback__
    if tb is not None and tb.tb_frame.f_code in _OWN_CODES:
        exc.__traceback__ = tb.tb_next


class PyStepWatch:
    """What the proxies of one loop share: the threshold, and who hears of long steps.

    (The compiled proxies read the compiled ``StepWatch``'s fields directly: a task's first step
    always compares itself with them.)
    """

    __slots__ = ("half", "on_slow", "threshold")

    def __init__(
        self,
        threshold: float = float("inf"),
        on_slow: Callable[[float, float], None] | None = None,
    ) -> None:
        self.threshold = threshold
        # Steps of at least half the threshold are told to the watchdog, which may be following
        # one of them as a block and can then use its exact duration.
        self.half = threshold / 2.0
        self.on_slow = on_slow


StepWatch: Any = PyStepWatch if ACCEL is None else ACCEL.StepWatch
# request_end(route, busy): a task labelled with a route ended (set by loopwatch.integrations).
request_end: Callable[[str, float], None] | None = None
_NO_WATCH = StepWatch()


class PyTimed:
    """Drives one coroutine for its task and adds up the time each step holds the loop.

    A proxy made by the task factory also carries its task's bookkeeping (when it was created,
    its label and creation site: ``_owner`` is the loop's tracker), and tells the tracker when the
    coroutine ends, so a task's end costs no done callback. One made by ``@timed`` has no owner.
    """

    # Slots only: about 180 bytes per live task with the floats of the first step.
    __slots__ = (
        "__weakref__",
        "_by",
        "_cfg",
        "_code",
        "_coro",
        "_label",
        "_lasti",
        "_leaked",
        "_owner",
        "_stack",
        "_watch",
        "born",
        "busy",
        "max_step",
        "slow_steps",
        "steps",
    )
    # Set by the task factory only (a proxy of ``@timed`` has no owner and leaves them unset).
    _by: str | None
    _code: Any
    _label: str | None
    _lasti: int | None
    _leaked: bool
    _owner: Any
    _stack: tuple[Any, ...] | None
    born: float

    def __init__(self, coro: Coroutine[Any, Any, Any], cfg: PyStepWatch = _NO_WATCH) -> None:
        # The task factory builds its proxies without this call (see TaskTracker): what is set
        # here is set there too.
        self._coro = coro
        self._cfg = cfg
        self._owner = None
        # One comparison per step: a step longer than this is a new maximum or a long one.
        self._watch = 0.0
        self.busy = 0.0
        self.max_step = 0.0
        self.steps = 0
        self.slow_steps = 0

    # -- driving (the hot path: once per task step) ----------------------------------------

    def __next__(self) -> Any:
        start = _perf()
        try:
            result = self._coro.send(None)
        except BaseException as exc:
            self._end(start, exc)
            raise
        took = _perf() - start
        self.busy += took
        if took > self._watch:
            self._long_step(took)  # while ``steps`` still numbers this step (see _watchdog)
        self.steps += 1
        return result

    def send(self, value: Any) -> Any:
        start = _perf()
        try:
            result = self._coro.send(value)
        except BaseException as exc:
            self._end(start, exc)
            raise
        self._step_done(start)
        return result

    def throw(self, *args: Any) -> Any:
        owner = self._owner
        if owner is not None and args and _is_cancellation(args[0]):
            owner.cancel_arrived(self, args[0])  # the task's cancellation arrives (TaskTracker)
        start = _perf()
        try:
            result = self._coro.throw(*args)
        except BaseException as exc:
            self._end(start, exc)
            raise
        self._step_done(start)
        return result

    @property
    def busy_now(self) -> float:
        """``busy`` (the pure-Python proxy does not keep when the step under way began: its
        requests' busy time leaves out the parts of their first and last steps)."""
        return self.busy

    def _step_done(self, start: float) -> None:
        took = _perf() - start
        self.busy += took
        if took > self._watch:
            self._long_step(took)
        self.steps += 1

    def _end(self, start: float, exc: BaseException) -> None:
        """The coroutine raised: it has ended (``StopIteration`` is its return).

        Once per task: the last step is counted here without ``_step_done`` (a call less), and
        only a new maximum or a long step goes on to ``_long_step``."""
        took = _perf() - start
        self.busy += took
        if took > self._watch:  # as in __next__: a new maximum, or a long step
            if took < self._cfg.half:
                self.max_step = took
            else:
                self._long_step(took)
        self.steps += 1
        if type(exc) is not StopIteration:
            _strip_own_frame(exc)
        # A request's task (its route in _context's weak map: no slot here, 8 bytes a task).
        route = _context.proxy_routes.get(self) if _context.proxy_routes_held else None
        if route is not None and request_end is not None:
            # A request's task: its busy time, by route (never into the program, as compiled).
            with contextlib.suppress(Exception):
                request_end(route, self.busy)
        owner = self._owner
        if owner is not None:
            self._owner = None  # ended: told once (see _ended)
            owner.proxy_ended(self, exc)

    def _long_step(self, took: float) -> None:
        cfg = self._cfg
        if took > self.max_step:
            self.max_step = took
        self._watch = min(self.max_step, cfg.half)
        if took >= cfg.half:
            if took >= cfg.threshold:
                self.slow_steps += 1
            if cfg.on_slow is not None:
                cfg.on_slow(took, _perf())

    def close(self) -> None:
        try:
            self._coro.close()
        finally:
            owner = self._owner
            if owner is not None:
                # Closed midway: its task will never end on its own. Counted gone, no outcome.
                self._owner = None
                owner.proxy_abandoned(self)

    # Whether the tracker was told this proxy's task is over. Not a slot (8 bytes a live task):
    # a proxy lets go of its owner when it has told it.
    @property
    def _ended(self) -> bool:
        return self._owner is None

    @_ended.setter
    def _ended(self, value: bool) -> None:
        if value:
            self._owner = None

    def __iter__(self) -> PyTimed:
        return self

    def __await__(self) -> PyTimed:
        return self

    # -- what a program reads from a coroutine ---------------------------------------------

    @property
    def __wrapped__(self) -> Coroutine[Any, Any, Any]:
        return self._coro

    @property
    def __name__(self) -> str:
        return self._coro.__name__  # type: ignore[attr-defined,no-any-return]

    def __getattr__(self, name: str) -> Any:
        # Only reached when normal lookup fails: ``__qualname__`` cannot be a property in the
        # class body (Python would take it as the class's own name).
        if name == "__qualname__":
            return self._coro.__qualname__  # type: ignore[attr-defined]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def cr_frame(self) -> Any:
        return getattr(self._coro, "cr_frame", None)

    @property
    def cr_code(self) -> Any:
        return getattr(self._coro, "cr_code", None)

    @property
    def cr_await(self) -> Any:
        return getattr(self._coro, "cr_await", None)

    @property
    def cr_running(self) -> bool:
        return bool(getattr(self._coro, "cr_running", False))

    @property
    def cr_suspended(self) -> bool:
        return bool(getattr(self._coro, "cr_suspended", False))

    @property
    def cr_origin(self) -> Any:
        return getattr(self._coro, "cr_origin", None)

    def __repr__(self) -> str:
        return repr(self._coro)


def _is_cancellation(exc: Any) -> bool:
    """A ``CancelledError``, as an instance or a class (``throw`` takes either)."""
    return isinstance(exc, asyncio.CancelledError) or (
        isinstance(exc, type) and issubclass(exc, asyncio.CancelledError)
    )


_OWN_CODES = frozenset(f.__code__ for f in (PyTimed.__next__, PyTimed.send, PyTimed.throw))
# The proxy in use: the compiled one when there is one. It has the same attributes, adds no
# frame to tracebacks, and reports its end itself (see the module docstring).
Timed: Any = PyTimed if ACCEL is None else ACCEL.Timed
_context.proxy_types = (PyTimed,) if ACCEL is None else (ACCEL.Timed, PyTimed)
collections.abc.Coroutine.register(Timed)


def unwrap(coro: Any) -> Any:
    """The program's own coroutine behind a :class:`Timed` proxy (or the object itself)."""
    return coro._coro if type(coro) is Timed else coro


# -- the per-coroutine table ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CoroutineStats:
    """Totals for one coroutine name, as returned by ``loopwatch.coroutine_stats()``."""

    name: str
    count: int
    errors: int
    cancelled: int
    wall_s: float
    max_wall_s: float
    busy_s: float
    steps: int
    slow_steps: int
    max_step_s: float

    @property
    def mean_wall_s(self) -> float:
        return self.wall_s / self.count if self.count else 0.0

    @property
    def mean_busy_s(self) -> float:
        return self.busy_s / self.count if self.count else 0.0


class _PyRowFields:
    """A row's numbers as Python attributes (the compiled ``Row`` keeps them as C numbers)."""

    __slots__ = (
        "busy",
        "busy_counts",
        "cancelled",
        "count",
        "errors",
        "max_step",
        "max_wall",
        "slow_steps",
        "steps",
        "timed",
        "wall",
        "wall_counts",
    )

    def __init__(self) -> None:
        self.count = self.errors = self.cancelled = self.steps = self.slow_steps = self.timed = 0
        self.wall = self.max_wall = self.busy = self.max_step = 0.0
        self.wall_counts = [0] * (len(DURATION_BUCKETS) + 1)
        self.busy_counts = [0] * (len(LATENCY_BUCKETS) + 1)


if TYPE_CHECKING:
    _RowFields = _PyRowFields
else:
    _RowFields = _PyRowFields if ACCEL is None else ACCEL.Row


class Row(_RowFields):
    """One coroutine name's totals, kept by one loop's thread (or under the table's lock).

    ``wall_counts`` / ``busy_counts`` are histogram buckets (``DURATION_BUCKETS`` /
    ``LATENCY_BUCKETS``, the last one +Inf); their sums and counts are ``wall``/``count`` and
    ``busy``/``timed``. A reader in another thread may see a row half-updated, which a scrape
    tolerates; it never sees a row go backwards.
    """

    __slots__ = ()

    def add(
        self,
        wall: float,
        outcome: str,
        timed: Any,
    ) -> None:
        """One ended call (the task factory's proxies inline this: see TaskTracker)."""
        self.count += 1
        if outcome == "error":
            self.errors += 1
        elif outcome == "cancelled":
            self.cancelled += 1
        self.wall += wall
        if wall > self.max_wall:
            self.max_wall = wall
        self.wall_counts[bisect_left(DURATION_BUCKETS, wall)] += 1
        if timed is not None:
            self.timed += 1
            self.busy += timed.busy
            self.busy_counts[bisect_left(LATENCY_BUCKETS, timed.busy)] += 1
            self.steps += timed.steps
            self.slow_steps += timed.slow_steps
            if timed.max_step > self.max_step:
                self.max_step = timed.max_step

    def merge(self, other: Row) -> None:
        self.count += other.count
        self.errors += other.errors
        self.cancelled += other.cancelled
        self.steps += other.steps
        self.slow_steps += other.slow_steps
        self.timed += other.timed
        self.wall += other.wall
        self.busy += other.busy
        self.max_wall = max(self.max_wall, other.max_wall)
        self.max_step = max(self.max_step, other.max_step)
        self.wall_counts = [a + b for a, b in zip(self.wall_counts, other.wall_counts, strict=True)]
        self.busy_counts = [a + b for a, b in zip(self.busy_counts, other.busy_counts, strict=True)]


Rows = dict[str, Row]


class Table:
    """Per-coroutine totals, capped at ``cap`` names; the rest are counted under ``other``.

    Each watched loop keeps its own rows (:meth:`rows_for`), written by its thread alone, with no
    lock and nothing queued: a task's end costs a few hundred nanoseconds of additions. Readers
    add the rows of every loop up (:meth:`stats`, :meth:`histograms`); the rows of a loop no
    longer watched are folded in once (:meth:`retire`). Which names get a row of their own is
    decided once per name and loop, under the lock, so the cap holds over all loops.
    """

    def __init__(self, cap: int = 50) -> None:
        self.cap = cap
        self._lock = threading.Lock()
        self._names: set[str] = set()  # names with a row of their own, over every loop
        self._own = Rows()  # @timed calls and retired loops
        self._loops: list[Rows] = []  # the rows of each watched loop

    def rows_for(self) -> Rows:
        """A new loop's rows, counted in from now on."""
        rows = Rows()
        with self._lock:
            self._loops.append(rows)
        return rows

    def retire(self, rows: Rows) -> None:
        """Fold a loop's rows into the table's own (the loop is no longer watched)."""
        with self._lock:
            if any(r is rows for r in self._loops):
                self._loops = [r for r in self._loops if r is not rows]
                seen: set[int] = set()
                for name, row in list(rows.items()):
                    if id(row) not in seen:  # aliases of OTHER share a row
                        seen.add(id(row))
                        self._merge_into(self._own, self._canonical(name, row, rows), row)
            rows.clear()

    @staticmethod
    def _canonical(name: str, row: Row, rows: Rows) -> str:
        return OTHER if rows.get(OTHER) is row else name

    @staticmethod
    def _merge_into(into: Rows, name: str, row: Row) -> None:
        mine = into.get(name)
        if mine is None:
            mine = into[name] = Row()
        mine.merge(row)

    def row(self, rows: Rows, name: str) -> Row:
        """The row of ``name`` in ``rows`` (a loop's, or the table's own), made on first use."""
        with self._lock:
            row = rows.get(name)
            if row is not None:
                return row
            if name not in self._names:
                if len(self._names) < self.cap or name == OTHER:
                    self._names.add(name)
                else:
                    other = rows.get(OTHER)
                    if other is None:
                        other = rows[OTHER] = Row()
                        self._names.add(OTHER)
                    if len(rows) < 4 * max(self.cap, 1):
                        rows[name] = other  # later ends of this name find it at once
                    return other
            row = rows[name] = Row()
            return row

    def record(
        self,
        name: str,
        *,
        wall: float,
        outcome: str,
        timed: Any,
    ) -> None:
        """Record one call at once (``@timed``), in the table's own rows."""
        row = self.row(self._own, name)
        with self._lock:
            row.add(wall, outcome, timed)

    def _merged(self) -> Rows:
        with self._lock:
            sources = [self._own, *self._loops]
            merged = Rows()
            for rows in sources:
                seen: set[int] = set()
                for name, row in list(rows.items()):
                    if id(row) not in seen:
                        seen.add(id(row))
                        self._merge_into(merged, self._canonical(name, row, rows), row)
        return merged

    def stats(self) -> list[CoroutineStats]:
        out = [
            CoroutineStats(
                name=name,
                count=row.count,
                errors=row.errors,
                cancelled=row.cancelled,
                wall_s=row.wall,
                max_wall_s=row.max_wall,
                busy_s=row.busy,
                steps=row.steps,
                slow_steps=row.slow_steps,
                max_step_s=row.max_step,
            )
            for name, row in self._merged().items()
        ]
        out.sort(key=lambda s: (-s.busy_s, -s.wall_s, s.name))
        return out

    def histograms(self) -> tuple[dict[str, HistogramSnapshot], dict[str, HistogramSnapshot]]:
        """(wall time per coroutine label, busy time per coroutine label), for the exporters."""
        snapshot = HistogramSnapshot.of_counts
        merged = self._merged()
        wall = {n: snapshot(DURATION_BUCKETS, r.wall_counts, r.wall) for n, r in merged.items()}
        busy = {
            n: snapshot(LATENCY_BUCKETS, r.busy_counts, r.busy)
            for n, r in merged.items()
            if r.timed
        }
        return wall, busy

    def clear(self) -> None:
        with self._lock:
            self._own.clear()
            self._names.clear()
            for rows in self._loops:
                rows.clear()

    def after_fork_in_child(self) -> None:
        """The lock may have been held by a thread that does not exist in the child."""
        self._lock = threading.Lock()


# Where ``@loopwatch.timed`` records: the active runtime's table (``Runtime`` sets it and takes it
# back). A decorated call has no loop of its own to ask, so this one pointer is how it finds the
# runtime; with loopwatch off it records nothing.
_decorated: Table | None = None


def record_timed_calls(table: Table | None) -> None:
    global _decorated
    _decorated = table


def summary(stats: list[CoroutineStats], *, top: int = 15) -> str:
    """A table a person can read, of the coroutines that held the loop longest."""
    if not stats:
        return "loopwatch: no coroutine timing recorded"
    header = (
        f"{'coroutine':<40} {'count':>7} {'busy s':>9} {'mean busy':>10} "
        f"{'max step':>9} {'slow':>5} {'wall s':>9} {'max wall':>9}"
    )
    lines = [f"loopwatch: top {min(top, len(stats))} coroutines by busy time", header]
    for s in stats[:top]:
        name = s.name if len(s.name) <= 40 else "..." + s.name[-37:]
        lines.append(
            f"{name:<40} {s.count:>7} {s.busy_s:>9.3f} {s.mean_busy_s * 1e3:>8.2f}ms "
            f"{s.max_step_s * 1e3:>7.1f}ms {s.slow_steps:>5} {s.wall_s:>9.3f} "
            f"{s.max_wall_s:>8.3f}s"
        )
    if len(stats) > top:
        lines.append(f"... and {len(stats) - top} more")
    return "\n".join(lines)


# -- @loopwatch.timed ----------------------------------------------------------------------

T = TypeVar("T")
CoroFn = Callable[..., Coroutine[Any, Any, T]]


@overload
def timed(name: CoroFn[T]) -> CoroFn[T]: ...
@overload
def timed(name: str | None = None) -> Callable[[CoroFn[T]], CoroFn[T]]: ...


def timed(name: Any = None) -> Any:
    """Time every call of a coroutine function under ``name`` (default: its qualified name).

    Recorded whether or not automatic step timing is on, and whether or not the call runs as
    its own task: ``@loopwatch.timed("db.fetch")`` on ``async def fetch(...)``.
    """
    if callable(name):
        return timed(None)(name)

    def decorate(fn: CoroFn[T]) -> CoroFn[T]:
        if not inspect.iscoroutinefunction(fn):
            raise TypeError(f"loopwatch.timed needs a coroutine function, not {fn!r}")
        label = name or fn.__qualname__

        @functools.wraps(fn)
        async def wrapper(*args: Any, **kwargs: Any) -> T:
            proxy = Timed(fn(*args, **kwargs))
            start = _perf()
            outcome = "error"
            try:
                result: T = await proxy
                outcome = "ok"
                return result
            except asyncio.CancelledError as exc:
                outcome = "cancelled"
                _strip_wrapper_frame(exc)
                raise
            except BaseException as exc:
                _strip_wrapper_frame(exc)
                raise
            finally:
                table = _decorated
                if table is not None:
                    table.record(label, wall=_perf() - start, outcome=outcome, timed=proxy)

        _WRAPPER_CODES.add(wrapper.__code__)  # type: ignore[attr-defined]
        return wrapper

    return decorate


_WRAPPER_CODES: set[Any] = set()


def _strip_wrapper_frame(exc: BaseException) -> None:
    tb = exc.__traceback__
    if tb is not None and tb.tb_frame.f_code in _WRAPPER_CODES:
        exc.__traceback__ = tb.tb_next
