"""Per-step and per-coroutine timing: wall time, busy time (the sum of a task's steps), steps.

Busy time is measured by :class:`Timed`, a proxy the task factory puts between a task and its
coroutine. The task drives the proxy exactly as it would drive the coroutine (``__next__`` for a
step, ``throw`` to cancel), and the proxy forwards everything a program reads from a coroutine
(``__qualname__``, ``cr_frame``, ``cr_code``, ``cr_await``...), so ``repr(task)``,
``task.get_stack()`` and ``task.get_coro().__qualname__`` read as before. Each step costs two
``perf_counter`` reads and a Python-level call the C task cannot inline, measured in
``benchmarks/``. Wall time and counts come from the done callback and need no proxy, so they
stay when step timing is switched off (``LOOPWATCH_STEP_TIMING=0``).

Totals are kept per coroutine name in one table, capped at ``coroutine_labels`` names (the rest
count under ``other``), under a lock taken once per task end, never per step.
"""

from __future__ import annotations

import asyncio
import collections
import collections.abc
import functools
import inspect
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar, overload

from ._stats import LATENCY_BUCKETS, Histogram

_perf = time.perf_counter
OTHER = "other"
# Task lifetimes run longer than loop latencies: the same edges, then minutes.
DURATION_BUCKETS: tuple[float, ...] = (*LATENCY_BUCKETS, 30.0, 60.0, 300.0)


def _strip_own_frame(exc: BaseException) -> None:
    """Drop the proxy's own frame from the head of a traceback: the program sees its frames only.

    Called in an ``except`` block followed by a bare ``raise``, which re-raises without adding
    the frame back (RERAISE does not extend the traceback).
    """
    tb = exc.__traceback__
    if tb is not None and tb.tb_frame.f_code in _OWN_CODES:
        exc.__traceback__ = tb.tb_next


class StepWatch:
    """What the proxies of one loop share: the threshold, and who hears of long steps."""

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


_NO_WATCH = StepWatch()


class Timed:
    """Drives one coroutine for its task and adds up the time each step holds the loop."""

    # Eight slots (~100 bytes per live task), the bound ``send`` kept to save a lookup per step.
    __slots__ = ("_cfg", "_coro", "_send", "_watch", "busy", "max_step", "slow_steps", "steps")

    def __init__(self, coro: Coroutine[Any, Any, Any], cfg: StepWatch = _NO_WATCH) -> None:
        self._coro = coro
        self._send = coro.send
        self._cfg = cfg
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
            result = self._send(None)
        except BaseException as exc:
            self._step_done(start)
            if type(exc) is not StopIteration:
                _strip_own_frame(exc)
            raise
        took = _perf() - start
        self.busy += took
        self.steps += 1
        if took > self._watch:
            self._long_step(took)
        return result

    def send(self, value: Any) -> Any:
        start = _perf()
        try:
            result = self._send(value)
        except BaseException as exc:
            self._step_done(start)
            if type(exc) is not StopIteration:
                _strip_own_frame(exc)
            raise
        self._step_done(start)
        return result

    def throw(self, *args: Any) -> Any:
        start = _perf()
        try:
            result = self._coro.throw(*args)
        except BaseException as exc:
            self._step_done(start)
            if type(exc) is not StopIteration:
                _strip_own_frame(exc)
            raise
        self._step_done(start)
        return result

    def _step_done(self, start: float) -> None:
        took = _perf() - start
        self.busy += took
        self.steps += 1
        if took > self._watch:
            self._long_step(took)

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
        self._coro.close()

    def __iter__(self) -> Timed:
        return self

    def __await__(self) -> Timed:
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


collections.abc.Coroutine.register(Timed)
_OWN_CODES = frozenset(f.__code__ for f in (Timed.__next__, Timed.send, Timed.throw))


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


class _Row:
    __slots__ = (
        "busy",
        "busy_hist",
        "cancelled",
        "count",
        "errors",
        "max_step",
        "max_wall",
        "slow_steps",
        "steps",
        "wall",
        "wall_hist",
    )

    def __init__(self) -> None:
        self.count = self.errors = self.cancelled = self.steps = self.slow_steps = 0
        self.wall = self.max_wall = self.busy = self.max_step = 0.0
        self.wall_hist = Histogram(DURATION_BUCKETS)
        self.busy_hist = Histogram(LATENCY_BUCKETS)


class Table:
    """Per-coroutine totals, capped at ``cap`` names; the rest are counted under ``other``.

    A task's end is only queued (:meth:`ended`: one tuple and a deque append, about 100 ns,
    safe from any thread); the rows are brought up to date in batches of ``BATCH``, and whenever
    someone reads them. Taking the lock, finding the row and filling two histograms for every task
    would cost about a microsecond per task.
    """

    BATCH = 512

    def __init__(self, cap: int = 50) -> None:
        self.cap = cap
        self._rows: dict[str, _Row] = {}
        self._lock = threading.Lock()
        self._ended: collections.deque[tuple[Any, ...]] = collections.deque()

    def ended(self, record: tuple[Any, ...]) -> None:
        """Queue ``(name, wall, outcome[, busy, steps, slow_steps, max_step])`` of a task."""
        ended = self._ended
        ended.append(record)
        if len(ended) >= self.BATCH:
            self.flush()

    def flush(self) -> None:
        """Fold queued task ends into the rows (each popped once, whichever thread flushes)."""
        ended = self._ended
        with self._lock:
            while True:
                try:
                    rec = ended.popleft()
                except IndexError:
                    return
                self._record(*rec)

    def _record(
        self,
        name: str,
        wall: float,
        outcome: str,
        busy: float | None = None,
        steps: int = 0,
        slow_steps: int = 0,
        max_step: float = 0.0,
    ) -> None:
        row = self._rows.get(name)
        if row is None:
            if len(self._rows) >= self.cap and name != OTHER:
                name = OTHER
                row = self._rows.get(OTHER)
            if row is None:
                row = self._rows[name] = _Row()
        row.count += 1
        if outcome == "error":
            row.errors += 1
        elif outcome == "cancelled":
            row.cancelled += 1
        row.wall += wall
        if wall > row.max_wall:
            row.max_wall = wall
        row.wall_hist.observe(wall)
        if busy is not None:
            row.busy += busy
            row.steps += steps
            row.slow_steps += slow_steps
            if max_step > row.max_step:
                row.max_step = max_step
            row.busy_hist.observe(busy)

    def record(
        self,
        name: str,
        *,
        wall: float,
        outcome: str,
        timed: Timed | None,
    ) -> None:
        """Record one call at once (``@timed``): queued ends first, to keep their order."""
        self.flush()
        with self._lock:
            if timed is None:
                self._record(name, wall, outcome)
            else:
                self._record(
                    name, wall, outcome, timed.busy, timed.steps, timed.slow_steps, timed.max_step
                )

    def stats(self) -> list[CoroutineStats]:
        self.flush()
        with self._lock:
            rows = list(self._rows.items())
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
                for name, row in rows
            ]
        out.sort(key=lambda s: (-s.busy_s, -s.wall_s, s.name))
        return out

    def histograms(self) -> tuple[dict[str, Any], dict[str, Any]]:
        from ._metrics import HistogramSnapshot

        self.flush()
        with self._lock:
            wall = {n: HistogramSnapshot.of(r.wall_hist) for n, r in self._rows.items()}
            busy = {
                n: HistogramSnapshot.of(r.busy_hist)
                for n, r in self._rows.items()
                if r.busy_hist.count
            }
        return wall, busy

    def clear(self) -> None:
        with self._lock:
            self._rows.clear()
            self._ended.clear()

    def after_fork_in_child(self) -> None:
        """The lock may have been held by a thread that does not exist in the child."""
        self._lock = threading.Lock()


TABLE = Table()


def histograms() -> tuple[dict[str, Any], dict[str, Any]]:
    """(wall time per coroutine label, busy time per coroutine label), for the exporters."""
    return TABLE.histograms()


def coroutine_stats() -> list[CoroutineStats]:
    """Totals per coroutine name, the busiest first: what ``LOOPWATCH_SUMMARY=1`` prints.

    Counted since loopwatch was installed (``uninstall()`` starts them again), over every
    watched loop, for tasks that have ended and for ``@loopwatch.timed`` calls.
    """
    return TABLE.stats()


def summary(stats: list[CoroutineStats] | None = None, *, top: int = 15) -> str:
    """A table a person can read, of the coroutines that held the loop longest."""
    stats = coroutine_stats() if stats is None else stats
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
                TABLE.record(label, wall=_perf() - start, outcome=outcome, timed=proxy)

        _WRAPPER_CODES.add(wrapper.__code__)  # type: ignore[attr-defined]
        return wrapper

    return decorate


_WRAPPER_CODES: set[Any] = set()


def _strip_wrapper_frame(exc: BaseException) -> None:
    tb = exc.__traceback__
    if tb is not None and tb.tb_frame.f_code in _WRAPPER_CODES:
        exc.__traceback__ = tb.tb_next
