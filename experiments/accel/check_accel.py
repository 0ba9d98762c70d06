"""Correctness checks of the compiled proxy (prototype): run with the interpreter it was built for.

    python experiments/accel/check_accel.py [--churn 1000000]

Each check runs on stock asyncio and on uvloop (when installed), and compares what a program
sees through the proxy with what it sees with no proxy. Exits 1 if any check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import collections.abc
import contextlib
import gc
import os
import sys
import time
import traceback
import tracemalloc
import weakref
from types import CoroutineType

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import _lwaccel  # noqa: E402

Timed = _lwaccel.Timed
collections.abc.Coroutine.register(Timed)

try:
    import uvloop
except ImportError:  # pragma: no cover
    uvloop = None

FAILED: list[str] = []


def check(name: str, ok: bool, detail: object = "") -> None:
    print(f"{'ok  ' if ok else 'FAIL'} {name}{'' if ok else f': {detail}'}")
    if not ok:
        FAILED.append(name)


class Watch:
    """A StepWatch look-alike (loopwatch._timing.StepWatch has the same three fields)."""

    def __init__(self, threshold: float = float("inf"), on_slow=None) -> None:
        self.threshold = threshold
        self.half = threshold / 2.0
        self.on_slow = on_slow


class Owner:
    def __init__(self) -> None:
        self.ends: list[tuple[object, object]] = []

    def proxy_ended(self, proxy, exc) -> None:
        self.ends.append((proxy, exc))


def ends_of(owner: Owner, name: str) -> list:
    """The end hook calls for proxies of coroutine `name`."""
    return [e for e in owner.ends if e[0]._label.split(".")[-1] == name]


def new_loop(kind: str) -> asyncio.AbstractEventLoop:
    return asyncio.SelectorEventLoop() if kind == "asyncio" else uvloop.new_event_loop()


def run(
    kind: str, coro_fn, *, proxy: bool, owner: Owner | None = None, watch=None, eager: bool = False
):
    """Run coro_fn() as the main coroutine of a fresh loop whose task factory wraps every
    coroutine in Timed (proxy=True) or not."""
    owner = owner if owner is not None else Owner()
    watch = watch if watch is not None else Watch()

    def factory(loop, coro, **kwargs):
        if proxy and type(coro) is CoroutineType:
            coro = Timed(coro, watch, owner, coro.cr_code.co_qualname)
        if eager:
            kwargs["eager_start"] = True
        return asyncio.Task(coro, loop=loop, **kwargs)

    loop = new_loop(kind)
    loop.set_task_factory(factory)
    try:
        return loop.run_until_complete(coro_fn()), owner
    finally:
        loop.close()


# -- scenarios -------------------------------------------------------------------------------


async def returns(n):
    for _ in range(n):
        await asyncio.sleep(0)
    return ("value", n)


async def inner_fails():
    await asyncio.sleep(0)
    raise ValueError("boom")


async def fails():
    await asyncio.sleep(0)
    await inner_fails()


async def sleeper(started: asyncio.Event | None = None):
    if started is not None:
        started.set()
    await asyncio.sleep(10)


async def swallows_cancel():
    try:
        await asyncio.sleep(10)
    except asyncio.CancelledError:
        return "swallowed"


def tb_names(exc: BaseException) -> list[str]:
    return [f.name for f in traceback.extract_tb(exc.__traceback__)]


def checks_for(kind: str) -> None:
    p = f"[{kind}]"

    # Return values, and one end hook call with None (a return).
    async def main_return():
        t = asyncio.create_task(returns(3), name="t")
        return await t, t

    before = _lwaccel.counts()
    (res, task), owner = run(kind, main_return, proxy=True)
    after = _lwaccel.counts()
    delta = {k: after[k] - before[k] for k in after}
    check(
        f"{p} the C Task steps the proxy through am_send only: {delta}",
        delta["am_send"] > 0 and delta["__next__"] == delta["send"] == 0,
        delta,
    )
    ends = ends_of(owner, "returns")
    check(f"{p} return value", res == ("value", 3), res)
    check(f"{p} end hook once, exc None on return", len(ends) == 1 and ends[0][1] is None, ends)
    check(f"{p} steps counted", ends and ends[0][0].steps == 4, ends and ends[0][0].steps)
    check(
        f"{p} busy > 0, max_step <= busy",
        ends and 0 < ends[0][0].max_step <= ends[0][0].busy,
        ends and ends[0][0].busy,
    )
    check(f"{p} get_coro() is the proxy", type(task.get_coro()) is Timed, type(task.get_coro()))

    # Exceptions: the same exception object, the same traceback frames as with no proxy.
    async def main_fail():
        t = asyncio.create_task(fails(), name="t")
        try:
            await t
        except ValueError as exc:
            return exc

    (exc_p, owner), (exc_n, _) = run(kind, main_fail, proxy=True), run(kind, main_fail, proxy=False)
    ends = ends_of(owner, "fails")
    check(f"{p} exception propagates", isinstance(exc_p, ValueError), exc_p)
    check(f"{p} end hook once with the exception", len(ends) == 1 and ends[0][1] is exc_p, ends)
    check(
        f"{p} traceback frames as with no proxy",
        tb_names(exc_p) == tb_names(exc_n),
        (tb_names(exc_p), tb_names(exc_n)),
    )

    # Cancellation: Task.cancel() -> throw(CancelledError) through the proxy.
    async def main_cancel():
        started = asyncio.Event()
        t = asyncio.create_task(sleeper(started), name="t")
        await started.wait()
        before = _lwaccel.counts()["throw"]
        t.cancel("stop")
        with contextlib.suppress(asyncio.CancelledError):
            await t
        return t, _lwaccel.counts()["throw"] - before

    (task, throws), owner = run(kind, main_cancel, proxy=True)
    ends = ends_of(owner, "sleeper")
    check(f"{p} cancel: task cancelled", task.cancelled(), task)
    # (one throw into the cancelled task, one into the main task awaiting it)
    check(f"{p} cancel: went through throw", throws == 2, throws)
    check(
        f"{p} cancel: end hook once with CancelledError",
        len(ends) == 1 and isinstance(ends[0][1], asyncio.CancelledError),
        ends,
    )

    async def main_swallow():
        t = asyncio.create_task(swallows_cancel(), name="t")
        await asyncio.sleep(0)
        t.cancel()
        return await t

    res, owner = run(kind, main_swallow, proxy=True)
    ends = ends_of(owner, "swallows_cancel")
    check(
        f"{p} cancel swallowed: return value through throw's StopIteration", res == "swallowed", res
    )
    check(
        f"{p} cancel swallowed: end hook once, exc None",
        len(ends) == 1 and ends[0][1] is None,
        ends,
    )

    # repr(task) and task.get_stack(), pending and done, as with no proxy.
    async def main_repr():
        t = asyncio.create_task(sleeper(), name="t")
        await asyncio.sleep(0)
        pending = repr(t)
        stack = [(f.f_code.co_name, f.f_lineno) for f in t.get_stack()]
        t.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await t
        t2 = asyncio.create_task(returns(0), name="t2")
        await t2
        return pending, stack, repr(t2), repr(t2.get_coro())

    (rp, _), (rn, _) = run(kind, main_repr, proxy=True), run(kind, main_repr, proxy=False)
    check(f"{p} repr(pending task) as with no proxy", rp[0] == rn[0], (rp[0], rn[0]))
    check(f"{p} get_stack() as with no proxy", rp[1] == rn[1] and rp[1], (rp[1], rn[1]))
    check(f"{p} repr(done task) as with no proxy", rp[2] == rn[2], (rp[2], rn[2]))
    check(
        f"{p} repr(proxy) is repr(coroutine)",
        rp[3].split(" at ")[0] == rn[3].split(" at ")[0],
        (rp[3], rn[3]),
    )

    # Eager tasks (3.12+): the coroutine's first step runs inside create_task.
    if sys.version_info >= (3, 12):

        async def main_eager():
            t1 = asyncio.create_task(returns(0))
            done_at_once = t1.done()
            t2 = asyncio.create_task(returns(2))
            pending_at_once = not t2.done()
            t3 = asyncio.create_task(fails())
            r3 = await asyncio.gather(t3, return_exceptions=True)
            return done_at_once, t1.result(), pending_at_once, await t2, r3

        (d1, r1, p2, r2, r3), owner = run(kind, main_eager, proxy=True, eager=True)
        labels = sorted(e[0]._label for e in owner.ends if not e[0]._label.endswith("main_eager"))
        check(f"{p} eager: finished inside create_task", d1 and r1 == ("value", 0), (d1, r1))
        check(f"{p} eager: suspended task finishes", p2 and r2 == ("value", 2), (p2, r2))
        check(f"{p} eager: exception", isinstance(r3[0], ValueError), r3)
        check(
            f"{p} eager: one end hook per task", labels == ["fails", "returns", "returns"], labels
        )

    # A long step: on_slow(took, now), slow_steps, max_step; now on perf_counter's clock.
    heard: list[tuple[float, float]] = []

    async def blocks():
        time.sleep(0.03)  # at least half the threshold: told, not slow
        await asyncio.sleep(0)
        time.sleep(0.07)  # at least the threshold: slow
        return time.perf_counter()

    async def main_slow():
        return await asyncio.create_task(blocks())

    end, owner = run(
        kind, main_slow, proxy=True, watch=Watch(0.06, lambda took, now: heard.append((took, now)))
    )
    proxy = ends_of(owner, "blocks")[0][0]
    check(
        f"{p} on_slow heard both long steps",
        len(heard) == 2 and heard[0][0] >= 0.03 and heard[1][0] >= 0.07,
        heard,
    )
    check(
        f"{p} slow_steps 1, max_step the longest",
        proxy.slow_steps == 1 and proxy.max_step == heard[-1][0],
        (proxy.slow_steps, proxy.max_step),
    )
    check(
        f"{p} on_slow's now is perf_counter's clock",
        heard and abs(heard[-1][1] - end) < 0.01,
        (heard, end),
    )

    # A failing hook is reported as unraisable and the program carries on.
    class BadOwner(Owner):
        def proxy_ended(self, proxy, exc):
            raise RuntimeError("hook failed")

    seen: list[object] = []
    old = sys.unraisablehook
    sys.unraisablehook = lambda u: seen.append(u.exc_value)
    try:
        res, _ = run(kind, lambda: returns(1), proxy=True, owner=BadOwner())
    finally:
        sys.unraisablehook = old
    check(
        f"{p} failing end hook: result intact, reported unraisable",
        res == ("value", 1) and seen and isinstance(seen[0], RuntimeError),
        (res, seen),
    )

    # Cycles are collected: a task whose coroutine holds its own task.
    async def holds_self(box):
        box.append(asyncio.current_task())
        await asyncio.sleep(0)

    async def main_cycle():
        box: list[object] = []
        t = asyncio.create_task(holds_self(box))
        await t
        return weakref.ref(t)

    ref, _ = run(kind, main_cycle, proxy=True)
    gc.collect()
    check(f"{p} task <-> coroutine cycle collected", ref() is None, ref())


def checks_plain() -> None:
    async def coro():
        x = await asyncio.sleep(0, "v")
        return x

    c = coro()
    t = Timed(c)
    check("asyncio.iscoroutine(proxy)", asyncio.iscoroutine(t))
    check("isinstance(proxy, collections.abc.Coroutine)", isinstance(t, collections.abc.Coroutine))
    check(
        "__name__/__qualname__/cr_code forwarded",
        (t.__name__, t.__qualname__, t.cr_code) == (c.__name__, c.__qualname__, c.cr_code),
    )
    check(
        "cr_frame/cr_running/cr_await/cr_origin forwarded",
        t.cr_frame is c.cr_frame
        and t.cr_running is False
        and t.cr_await is None
        and t.cr_origin == c.cr_origin,
    )
    check("cr_suspended forwarded", t.cr_suspended is bool(getattr(c, "cr_suspended", False)))
    check("__await__/__iter__ return the proxy", t.__await__() is t and iter(t) is t)
    # Driven by hand, as Python code would: __next__, send, StopIteration carries the value.
    check("__next__ yields what the coroutine yields", next(t) is None)
    try:
        t.send("sent")
        check("send: StopIteration with the value", False, "no StopIteration")
    except StopIteration as e:
        check("send: StopIteration with the value", e.value == "v", e.value)
    check("steps counted by hand", t.steps == 2, t.steps)
    # Tuple and exception return values survive StopIteration.
    for value in ((1, 2), ValueError("as value"), None):

        async def r(v=value):
            return v

        try:
            Timed(r()).send(None)
        except StopIteration as e:
            check(f"StopIteration value {type(value).__name__}", e.value is value, e.value)
    # throw by hand; close.
    c2 = returns(1)
    t2 = Timed(c2)
    next(t2)
    try:
        t2.throw(KeyError("k"))
    except KeyError:
        check("throw by hand raises out", True)
    c3 = returns(1)
    t3 = Timed(c3)
    next(t3)
    t3.close()
    check("close closes the coroutine", c3.cr_frame is None)

    # await proxy from Python code (the SEND opcode, via am_send).
    async def awaits():
        return await Timed(returns(2))

    check("await proxy in Python code", asyncio.run(awaits()) == ("value", 2))


# -- leaks ---------------------------------------------------------------------------------


async def short():
    return 1


async def short_fail():
    raise ValueError


async def churn(n: int, fn, batch: int = 500) -> None:
    create = asyncio.create_task
    for _ in range(n // batch):
        await asyncio.gather(*[create(fn()) for _ in range(batch)], return_exceptions=True)


async def churn_cancel(n: int, batch: int = 500) -> None:
    create = asyncio.create_task
    for _ in range(n // batch):
        ts = [create(sleeper()) for _ in range(batch)]
        await asyncio.sleep(0)
        for t in ts:
            t.cancel()
        await asyncio.gather(*ts, return_exceptions=True)


class CountingOwner:
    __slots__ = ("n",)

    def __init__(self):
        self.n = 0

    def proxy_ended(self, proxy, exc):
        self.n += 1


def leak_check(kind: str, label: str, make, n: int) -> None:
    """Run the churn twice with the proxy; the second run must leave the allocated block count
    about as the first one did: an object kept per task would show as n blocks or more. A churn
    moves the count by up to a few hundred blocks with no proxy too (asyncio's and the
    allocator's own caches), which the message shows for comparison; the limit is n / 2000."""
    plain = blocks_grown(kind, make, n, proxy=False)
    grown, ends = blocks_grown(kind, make, n, proxy=True)
    check(
        f"[{kind}] no leak, {label} x{n}: allocated blocks {grown:+d} with the proxy "
        f"({plain[0]:+d} without), {ends} end hook calls",
        grown < max(100, n // 2000) and ends >= n,
        grown,
    )


def blocks_grown(kind: str, make, n: int, *, proxy: bool) -> tuple[int, int]:
    owner = CountingOwner()
    watch = Watch(1.0)

    def factory(loop, coro, **kwargs):
        if proxy and type(coro) is CoroutineType:
            coro = Timed(coro, watch, owner, "x")
        return asyncio.Task(coro, loop=loop, **kwargs)

    def once(count):
        loop = new_loop(kind)
        loop.set_task_factory(factory)
        loop.run_until_complete(make(count))
        loop.close()
        gc.collect()

    once(n)  # warm up
    before = sys.getallocatedblocks()
    owner.n = 0
    once(n)
    after = sys.getallocatedblocks()
    return after - before, owner.n


def tracemalloc_check(kind: str, n: int) -> None:
    owner = CountingOwner()

    def factory(loop, coro, **kwargs):
        if type(coro) is CoroutineType:
            coro = Timed(coro, Watch(1.0), owner, "x")
        return asyncio.Task(coro, loop=loop, **kwargs)

    def once(count):
        loop = new_loop(kind)
        loop.set_task_factory(factory)
        loop.run_until_complete(churn(count, short))
        loop.close()
        gc.collect()

    once(n)
    tracemalloc.start()
    once(2000)
    s1 = tracemalloc.take_snapshot()
    once(n)
    s2 = tracemalloc.take_snapshot()
    tracemalloc.stop()
    grown = sum(d.size_diff for d in s2.compare_to(s1, "filename"))
    check(f"[{kind}] tracemalloc, churn x{n}: {grown:+d} bytes", abs(grown) < 20_000, grown)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--churn", type=int, default=1_000_000)
    args = ap.parse_args()
    print(f"Python {sys.version.split()[0]}, uvloop {getattr(uvloop, '__version__', '-')}")
    checks_plain()
    kinds = ["asyncio"] + (["uvloop"] if uvloop is not None else [])
    for kind in kinds:
        checks_for(kind)
    for kind in kinds:
        leak_check(kind, "returns", lambda n: churn(n, short), args.churn)
        leak_check(kind, "raises", lambda n: churn(n, short_fail), args.churn // 10)
        leak_check(kind, "cancelled", churn_cancel, args.churn // 10)
        tracemalloc_check(kind, args.churn // 10)
    print(f"{len(FAILED)} failed" if FAILED else "all passed")
    sys.exit(1 if FAILED else 0)


if __name__ == "__main__":
    main()
