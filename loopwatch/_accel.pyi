# Types of loopwatch._accel, the optional compiled hot paths (_accel.c). Private: loopwatch's own
# modules use it through loopwatch._native.ACCEL, which is None when it is not there.
from collections.abc import Callable, Sequence
from types import CodeType, FrameType
from typing import Any

API: int

def configure(
    task_type: type,
    cancelled: type[BaseException],
    machinery: dict[str, bool],
    handle_run: CodeType,
    duration_bounds: Sequence[float],
    latency_bounds: Sequence[float],
) -> None: ...
def set_driver(code: CodeType | None) -> None: ...
def set_task_type(task_type: type) -> None: ...
def thread_frame(ident: int) -> FrameType | None: ...
def thread_context(ident: int, /) -> Any: ...
def resume_later(fn: Callable[[], None], /) -> None: ...
def wake_due(t: float, /) -> None: ...
def woken() -> None: ...
def want() -> None: ...
def reset_handoff() -> None: ...
def thread_starting() -> None: ...
def thread_started() -> None: ...
def forget_wakeups() -> None: ...
def wait_readable(fds: list[int], timeout: float | None, /) -> list[int]: ...
def handoff_if_due() -> None: ...

class TaskCounts:
    created: int
    ok: int
    error: int
    cancelled: int
    gone: int
    leaked: int
    orphaned: int
    unretrieved: int
    _rows: dict[str, Any] | None
    _table: Any

class Row:
    count: int
    errors: int
    cancelled: int
    steps: int
    slow_steps: int
    timed: int
    wall: float
    max_wall: float
    busy: float
    max_step: float
    wall_counts: list[int]
    busy_counts: list[int]

class Timed:
    _coro: Any
    _cfg: Any
    _owner: Any
    _sink: TaskCounts | None
    _label: str | None
    _code: CodeType | None
    _stack: tuple[Any, ...] | None
    _by: str | None
    _lasti: int
    _leaked: bool
    _timing: bool
    _ended: bool
    busy_now: float  # busy, with the step under way counted to now
    _watch: float
    born: float
    busy: float
    max_step: float
    steps: int
    slow_steps: int
    def __init__(
        self, coro: Any, cfg: Any = ..., owner: Any = ..., label: str | None = ..., /
    ) -> None: ...
    def send(self, value: Any, /) -> Any: ...
    def throw(self, *args: Any) -> Any: ...
    def close(self) -> None: ...
    def __next__(self) -> Any: ...
    def __iter__(self) -> Timed: ...
    def __await__(self) -> Timed: ...

class Factory:
    inner: Callable[..., Any] | None
    boundary: FrameType | None
    timing: int
    depth: int
    fallback: Callable[..., Any]
    def __init__(
        self, tracker: Any, counts: TaskCounts, watch: Any, fallback: Callable[..., Any], /
    ) -> None: ...
    def __call__(self, loop: Any, coro: Any, **kwargs: Any) -> Any: ...

class Pulse:
    select: Callable[..., Any]
    _prev: Any
    box: Any
    alarm: Any
    lag: tuple[list[int], float]
    failed: BaseException | None
    woke: float
    entered: float
    busy: float
    period: float
    first_check: float
    armed_at: float
    lag_due: float
    block_end: float
    iterations: int
    active: bool
    idle: bool
    block_open: bool
    def __init__(
        self, select: Callable[..., Any], period: float, first_check: float, alarm: Any = ...
    ) -> None: ...
    def __call__(self, timeout: float | None = ...) -> Any: ...
    def release(self) -> None: ...

class MethodHook:
    __wrapped__: Callable[..., Any]
    def __init__(
        self,
        original: Callable[..., Any],
        enter: Callable[[Any], Any],
        leave: Callable[[Any], Any],
        /,
    ) -> None: ...
    def __call__(self, *args: Any, **kwargs: Any) -> Any: ...

class Thread:
    def __init__(self, fn: Callable[[], None], /) -> None: ...
    def join(self, timeout: float, /) -> bool: ...
    def done(self) -> bool: ...
