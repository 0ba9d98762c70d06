"""Same behaviour with and without loopwatch: a generated corpus of asyncio programs (issue 8.1).

A program is data: a small tree of operations (sleeps, awaits, tasks, cancellations, exceptions,
timeouts, TaskGroups, gather, queues, executors; eager tasks as a whole-program switch), drawn by
hypothesis and run by one interpreter, :func:`interpret`. Each program runs on a plain loop and
on a watched loop, stock asyncio and uvloop, and gives a trace: the value or exception (type and
message, groups with their members) of the root, and every completion, in order.

Determinism: programs made of ``sleep(0)`` steps only are scheduled identically on every run of a
loop (the ready queue is FIFO), so their completion order is compared exactly. Programs with real
time in them (millisecond sleeps, executor calls, timeouts that fire) are compared as the same
results, exceptions and cancellations, and the same completions in any order; the generator makes
them deterministic in that sense (:func:`settle`: where a timed child runs concurrently with one
that may raise, each child's exception is caught in place, so no race decides what is cancelled).

None of these programs leaks, orphans, blocks or loses an exception. One thing they can lose is
a cancellation, where asyncio itself loses it: Python 3.11 and 3.12 let a TaskGroup's errors take
the place of an outside cancellation, and a ``catch`` node around the group then returns with
``cancelling()`` still above 0 (3.13 cancels the task again instead). So the watched run may report
``cancel_swallowed`` for a task that the plain run shows ending that way (not cancelled, its
``cancelling()`` above 0, the same way: returned or the same exception), and nothing else.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
import uvloop
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import loopwatch
from loopwatch import _api
from loopwatch._events import CancelSwallowed, Event

Node = tuple[Any, ...]
Factory = Callable[[], asyncio.AbstractEventLoop]

PLAIN: dict[str, Factory] = {"asyncio": asyncio.SelectorEventLoop, "uvloop": uvloop.new_event_loop}
WATCHED: dict[str, Factory] = {
    "asyncio": loopwatch.new_event_loop,
    "uvloop": loopwatch.new_uvloop_event_loop,
}
# Eager tasks arrived in 3.12, but 3.12.1 itself hangs (plain asyncio, no loopwatch) on some
# eager programs that cancel a task group's parent; the corpus uses them from 3.13 on.
EAGER = sys.version_info >= (3, 13)
# uvloop 0.23 on Python 3.13+ hands eager_start to every task factory, which asyncio's
# eager_task_factory refuses; there, create_task(eager_start=True) is the way in.
EAGER_KWARG = sys.version_info >= (3, 13)

COUNTS = {"programs": 0, "cases": 0, "timed": 0, "exact_order": 0, "nodes": 0, "findings": 0}

# -- the generator ------------------------------------------------------------------------------

EXCEPTIONS = {"ValueError": ValueError, "KeyError": KeyError, "RuntimeError": RuntimeError}
values = st.integers(0, 99)
yields = st.integers(0, 3)

pure_leaves = st.one_of(
    st.tuples(st.just("yield"), yields, values),
    st.tuples(
        st.just("raise"),
        yields,
        st.sampled_from(sorted(EXCEPTIONS)),
        st.text("abc", min_size=0, max_size=3),
    ),
    st.tuples(
        st.just("queue"),
        st.lists(st.integers(0, 3), max_size=3),
        st.integers(1, 2),
        st.integers(0, 2),
    ),
)
timed_leaves = st.one_of(
    st.tuples(st.just("sleep"), st.integers(0, 2), values),
    st.tuples(st.just("exec"), values),
    st.tuples(st.just("tfire"), st.integers(1, 2), st.sampled_from(["timeout", "wait_for"])),
)


def _composites(children: st.SearchStrategy[Node], cancellable: st.SearchStrategy[Node]) -> Any:
    several = st.lists(children, min_size=1, max_size=4).map(tuple)
    return st.one_of(
        st.tuples(st.just("seq"), several),
        st.tuples(st.just("task"), st.booleans(), children),
        st.tuples(st.just("gather"), st.booleans(), several),
        st.tuples(st.just("group"), several),
        st.tuples(st.just("catch"), children),
        st.tuples(st.just("tok"), children),
        st.tuples(st.just("cancel"), yields, cancellable),
    )


pure: st.SearchStrategy[Node] = st.recursive(
    pure_leaves, lambda kids: _composites(kids, kids), max_leaves=8
)
anything: st.SearchStrategy[Node] = st.recursive(
    st.one_of(pure_leaves, timed_leaves), lambda kids: _composites(kids, pure), max_leaves=14
)
programs = st.tuples(anything, st.booleans() if EAGER else st.just(False))


def timed(node: Node) -> bool:
    op = node[0]
    if op in ("sleep", "exec", "tfire"):
        return True
    if op in ("seq", "gather", "group"):
        return any(timed(c) for c in node[-1])
    if op in ("task", "catch", "tok"):
        return timed(node[-1])
    return False  # yield, raise, queue; cancel's child is drawn from the pure grammar


def may_raise(node: Node) -> bool:
    op = node[0]
    if op in ("raise", "tfire"):
        return True
    if op in ("seq", "group") or (op == "gather" and not node[1]):
        return any(may_raise(c) for c in node[-1])
    if op in ("task", "tok", "cancel"):
        return may_raise(node[-1])
    return False  # yield, sleep, exec, queue, catch, gather(return_exceptions=True)


def settle(node: Node) -> Node:
    """The same program, with no race between real time and a failure (see module docstring)."""
    op = node[0]
    if op in ("seq", "gather", "group"):
        kids = tuple(settle(c) for c in node[-1])
        concurrent = op == "group" or (op == "gather" and not node[1])
        if concurrent and len(kids) > 1 and any(map(timed, kids)) and any(map(may_raise, kids)):
            kids = tuple(("catch", k) for k in kids)
        return (*node[:-1], kids)
    if op in ("task", "catch", "tok", "cancel"):
        return (*node[:-1], settle(node[-1]))
    return node


def size(node: Node) -> int:
    op = node[0]
    if op in ("seq", "gather", "group"):
        return 1 + sum(size(c) for c in node[-1])
    if op in ("task", "catch", "tok", "cancel"):
        return 1 + size(node[-1])
    return 1


# -- the interpreter ----------------------------------------------------------------------------


def describe(exc: BaseException) -> tuple[Any, ...]:
    if isinstance(exc, asyncio.CancelledError):
        return ("cancelled",)
    if isinstance(exc, BaseExceptionGroup):
        return (
            "group",
            type(exc).__name__,
            exc.message,
            tuple(describe(e) for e in exc.exceptions),
        )
    return ("raised", type(exc).__name__, str(exc))


def _work(value: int) -> int:
    time.sleep(0.0005)
    return value + 1000


class Interpreter:
    def __init__(self, eager: bool) -> None:
        self.log: list[Any] = []
        self.tasks: list[asyncio.Task[Any]] = []
        self.uncancelled: list[str] = []
        self.kwargs: dict[str, Any] = {}
        self.eager = eager

    def spawn(self, coro: Any, name: str | None = None) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=name, **self.kwargs)
        self.tasks.append(task)
        return task

    async def main(self, root: Node) -> tuple[Any, ...]:
        loop = asyncio.get_running_loop()
        if self.eager:
            if isinstance(loop, asyncio.BaseEventLoop) or not EAGER_KWARG:
                loop.set_task_factory(asyncio.eager_task_factory)  # type: ignore[attr-defined]
            else:
                self.kwargs = {"eager_start": True}
        try:
            outcome: tuple[Any, ...] = ("ok", await self.run(root))
        except Exception as exc:
            outcome = describe(exc)
        while pending := [t for t in self.tasks if not t.done()]:
            _, still = await asyncio.wait(pending, timeout=10.0)
            assert not still, f"the interpreter left tasks hanging: {still}"
        for task in self.tasks:
            # A cancel node's child can fail while its parent is cancelled from above; nobody
            # awaits it then. Retrieved here: these programs lose no exception.
            if not task.cancelled():
                task.exception()
        # How each task that ended neither cancelled nor with its cancellations withdrawn ended.
        self.uncancelled = sorted(
            "returned" if task.exception() is None else type(task.exception()).__name__
            for task in self.tasks
            if not task.cancelled() and task.cancelling() > 0
        )
        return outcome

    async def run(self, node: Node) -> Any:
        op = node[0]
        if op == "yield":
            for _ in range(node[1]):
                await asyncio.sleep(0)
            self.log.append(("yield", node[2]))
            return node[2]
        if op == "raise":
            for _ in range(node[1]):
                await asyncio.sleep(0)
            self.log.append(("raise", node[2], node[3]))
            raise EXCEPTIONS[node[2]](node[3])
        if op == "sleep":
            await asyncio.sleep(node[1] / 1000)
            self.log.append(("sleep", node[2]))
            return node[2]
        if op == "exec":
            result = await asyncio.get_running_loop().run_in_executor(None, _work, node[1])
            self.log.append(("exec", result))
            return result
        if op == "tfire":
            try:
                if node[2] == "timeout":
                    async with asyncio.timeout(node[1] / 1000):
                        await asyncio.Event().wait()
                else:
                    await asyncio.wait_for(asyncio.Event().wait(), node[1] / 1000)
            finally:
                self.log.append(("tfire", node[2]))
        if op == "seq":
            return [await self.run(c) for c in node[1]]
        if op == "task":
            name = "named" if node[1] else None
            task = self.spawn(self.run(node[2]), name)
            result = await task
            return (task.get_name(), result) if name else result
        if op == "gather":
            tasks = [self.spawn(self.run(c)) for c in node[2]]
            results = await asyncio.gather(*tasks, return_exceptions=node[1])
            return [describe(r) if isinstance(r, BaseException) else r for r in results]
        if op == "group":
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(self.run(c)) for c in node[1]]
                self.tasks.extend(tasks)  # (for how each ended: see main)
            return [t.result() for t in tasks]
        if op == "catch":
            try:
                return ("ok", await self.run(node[1]))
            except Exception as exc:
                return describe(exc)
        if op == "tok":
            async with asyncio.timeout(5.0):
                return await self.run(node[1])
        if op == "cancel":
            # (Compared with its count before: a TaskGroup of Python 3.11 can leave it above 0.)
            current = asyncio.current_task()
            assert current is not None
            before = current.cancelling()
            task = self.spawn(self.hang_after(node[2]))
            try:
                for _ in range(node[1]):
                    await asyncio.sleep(0)
            finally:
                task.cancel()  # also when this task is cancelled first: nothing left hanging
            try:
                await task
            except asyncio.CancelledError:
                if current.cancelling() > before:
                    raise  # this task is being cancelled too, from above: not ours to swallow
                self.log.append(("cancelled",))
                return ("cancelled", task.cancelled())
            raise AssertionError("a hanging task returned")
        if op == "queue":
            return await self.queue(node[1], node[2], node[3])
        raise AssertionError(op)

    async def hang_after(self, node: Node) -> None:
        await self.run(node)
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            # Cancelled while a gather it awaited was failing: gather hands on the failure, not
            # the cancellation (asyncio does so, watched or not). Hanging now would be forever.
            raise asyncio.CancelledError
        await asyncio.Event().wait()

    async def queue(self, counts: list[int], consumers: int, maxsize: int) -> list[list[int]]:
        queue: asyncio.Queue[int | None] = asyncio.Queue(maxsize)
        got: list[list[int]] = [[] for _ in range(consumers)]

        async def produce(p: int, count: int) -> None:
            for i in range(count):
                await queue.put(p * 10 + i)
                await asyncio.sleep(0)

        async def consume(j: int) -> None:
            while (item := await queue.get()) is not None:
                got[j].append(item)
                self.log.append(("got", j, item))

        readers = [self.spawn(consume(j)) for j in range(consumers)]
        try:
            await asyncio.gather(*(self.spawn(produce(p, c)) for p, c in enumerate(counts)))
            for _ in readers:
                await queue.put(None)
            await asyncio.gather(*readers)
        except asyncio.CancelledError:
            for reader in readers:
                reader.cancel()
            raise
        return got


def run_program(factory: Factory, root: Node, eager: bool) -> tuple[Any, list[Any], list[str]]:
    interpreter = Interpreter(eager)
    with asyncio.Runner(loop_factory=factory) as runner:
        try:
            outcome = runner.run(interpreter.main(root))
        except (Exception, asyncio.CancelledError) as exc:
            # What escapes the program's main task (a CancelledError, say): the same on both.
            outcome = ("escaped", describe(exc))
    return outcome, interpreter.log, interpreter.uncancelled


# -- the tests ----------------------------------------------------------------------------------


@settings(
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(programs)
# A cancellation lost to a TaskGroup's errors that a catch node takes (3.11, 3.12), or not (3.13):
# in a task awaited by the cancelled one, and in a task of the cancelled one's own TaskGroup.
@example(
    (("cancel", 2, ("task", False, ("catch", ("group", (("raise", 0, "KeyError", ""),))))), False)
)
@example(
    (("cancel", 1, ("group", (("catch", ("group", (("raise", 0, "KeyError", ""),))),))), False)
)
def test_watched_programs_behave_as_unwatched(program: tuple[Node, bool]) -> None:
    drawn, eager = program
    root = settle(drawn)
    exact = not timed(root)
    COUNTS["programs"] += 1
    COUNTS["nodes"] += size(root)
    COUNTS["timed" if not exact else "exact_order"] += 1
    findings: list[Event] = []
    runtime = _api.activate(log="off", slow_callback_ms=500)
    runtime.dispatcher.add_sink(findings.append)
    try:
        for kind in sorted(PLAIN):
            plain = run_program(PLAIN[kind], root, eager)
            watched = run_program(WATCHED[kind], root, eager)
            COUNTS["cases"] += 1
            assert watched[0] == plain[0], (kind, root)
            if exact:
                assert watched[1] == plain[1], (kind, root)
            else:
                assert sorted(watched[1], key=repr) == sorted(plain[1], key=repr), (kind, root)
            assert watched[2] == plain[2], (kind, root)
            # Only a cancellation asyncio loses unwatched too, and no more than it loses.
            swallowed = Counter(
                f.ended.split(":", 1)[0] for f in findings if isinstance(f, CancelSwallowed)
            )
            assert all(isinstance(f, CancelSwallowed) for f in findings), (kind, root, findings)
            assert swallowed <= Counter(plain[2]), (kind, root, findings, plain[2])
            COUNTS["findings"] += len(findings)
            findings.clear()
    finally:
        runtime.dispatcher.remove_sink(findings.append)


def test_the_generator_settles_races_and_keeps_pure_programs_exact() -> None:
    racy: Node = ("group", (("sleep", 1, 5), ("raise", 0, "ValueError", "a")))
    assert settle(racy) == (
        "group",
        (("catch", ("sleep", 1, 5)), ("catch", ("raise", 0, "ValueError", "a"))),
    )
    pure_group: Node = ("group", (("yield", 1, 5), ("raise", 0, "ValueError", "a")))
    assert settle(pure_group) == pure_group and not timed(pure_group)


def test_a_known_program_gives_its_known_trace() -> None:
    """The interpreter itself, on one hand-written program, on both loops, watched or not."""
    root: Node = (
        "seq",
        (
            ("gather", True, (("yield", 2, 1), ("raise", 0, "KeyError", "k"), ("yield", 0, 3))),
            ("catch", ("group", (("yield", 1, 4), ("raise", 1, "ValueError", "v")))),
            ("cancel", 1, ("yield", 0, 7)),
            ("catch", ("tfire", 1, "timeout")),
            ("queue", [2, 1], 1, 1),
            ("task", True, ("yield", 0, 9)),
        ),
    )
    expected = (
        "ok",
        [
            [1, ("raised", "KeyError", "'k'"), 3],
            (
                "group",
                "ExceptionGroup",
                "unhandled errors in a TaskGroup",
                (("raised", "ValueError", "v"),),
            ),
            ("cancelled", True),
            ("raised", "TimeoutError", ""),
            [[0, 1, 10]],
            ("named", 9),
        ],
    )
    for kind in sorted(PLAIN):
        for factories in (PLAIN, WATCHED):
            outcome, log, uncancelled = run_program(factories[kind], root, eager=False)
            assert outcome == expected, (kind, outcome)
            # (gather) 3 first: no yield; "k" raised; 1 after two yields; then the group...
            assert log[:3] == [("raise", "KeyError", "k"), ("yield", 3), ("yield", 1)]
            assert uncancelled == [], (kind, uncancelled)


def test_report_the_corpus(capsys: pytest.CaptureFixture[str]) -> None:
    """Runs last in this file: says how many programs and cases were compared."""
    if COUNTS["programs"] == 0:
        pytest.skip("the differential test did not run")
    with capsys.disabled():
        print(
            f"\ndifferential corpus: {COUNTS['programs']} programs ({COUNTS['nodes']} operations; "
            f"{COUNTS['exact_order']} compared in exact order, {COUNTS['timed']} with real time), "
            f"{COUNTS['cases']} cases (program x loop kind), plain vs watched, "
            f"{COUNTS['findings']} findings (each a cancellation lost unwatched too)"
        )
    assert COUNTS["cases"] == 2 * COUNTS["programs"]
