"""loopwatch: an event-loop watchdog for asyncio, on stock asyncio and uvloop alike.

Only re-exports live here. They are loaded on first use (PEP 562), so that the start-up check
behind ``LOOPWATCH=1`` can import ``loopwatch._bootstrap`` without importing asyncio.

PYTEST_DONT_REWRITE: with ``LOOPWATCH=1`` this package is imported before pytest starts, and it
has no assertions worth rewriting.
"""

import importlib as _importlib
import sys as _sys

# Not ``typing.TYPE_CHECKING``: importing typing would cost ~5 ms at every start-up through the
# .start entry point. Type checkers treat any name TYPE_CHECKING as true.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from ._api import (
        coroutine_stats,
        install,
        metrics_url,
        new_event_loop,
        new_uvloop_event_loop,
        snapshot,
        uninstall,
    )
    from ._config import Settings
    from ._dispatch import Exporter
    from ._events import (
        CancelIgnored,
        CancelSwallowed,
        CoroutineNeverAwaited,
        Deadlock,
        Event,
        LoopStalled,
        SlowCallback,
        TaskExceptionUnretrieved,
        TaskLeaked,
        TaskOrphaned,
        TaskStuck,
    )
    from ._policy import EventLoopPolicy
    from ._scope import watch
    from ._testing import IsolatedAsyncioTestCase
    from ._timing import CoroutineStats, timed
    from .exporters.prometheus import MetricsCollector, aiohttp_metrics_handler, metrics_app
    from .integrations import label_request

__all__ = [
    "CancelIgnored",
    "CancelSwallowed",
    "CoroutineNeverAwaited",
    "CoroutineStats",
    "Deadlock",
    "Event",
    "EventLoopPolicy",
    "Exporter",
    "IsolatedAsyncioTestCase",
    "LoopStalled",
    "MetricsCollector",
    "Settings",
    "SlowCallback",
    "TaskExceptionUnretrieved",
    "TaskLeaked",
    "TaskOrphaned",
    "TaskStuck",
    "__version__",
    "aiohttp_metrics_handler",
    "coroutine_stats",
    "install",
    "label_request",
    "metrics_app",
    "metrics_url",
    "new_event_loop",
    "new_uvloop_event_loop",
    "snapshot",
    "timed",
    "uninstall",
    "watch",
]

__version__ = "0.1.0"

# name -> module that defines it
_LAZY = {
    "CancelIgnored": "._events",
    "CancelSwallowed": "._events",
    "CoroutineNeverAwaited": "._events",
    "CoroutineStats": "._timing",
    "Deadlock": "._events",
    "TaskStuck": "._events",
    "coroutine_stats": "._api",
    "timed": "._timing",
    "Event": "._events",
    "EventLoopPolicy": "._policy",
    "Exporter": "._dispatch",
    "IsolatedAsyncioTestCase": "._testing",
    "LoopStalled": "._events",
    "MetricsCollector": ".exporters.prometheus",
    "Settings": "._config",
    "SlowCallback": "._events",
    "TaskExceptionUnretrieved": "._events",
    "TaskLeaked": "._events",
    "TaskOrphaned": "._events",
    "aiohttp_metrics_handler": ".exporters.prometheus",
    "install": "._api",
    "label_request": ".integrations",
    "metrics_app": ".exporters.prometheus",
    "metrics_url": "._api",
    "new_event_loop": "._api",
    "new_uvloop_event_loop": "._api",
    "snapshot": "._api",
    "uninstall": "._api",
    "watch": "._scope",
}


def __getattr__(name: str) -> "Any":
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'loopwatch' has no attribute {name!r}")
    value = getattr(_importlib.import_module(module, __name__), name)
    globals()[name] = value
    hooks = _sys.modules.get(__name__ + "._import_hooks")
    if hooks is not None:  # LOOPWATCH=1: run what that import had to put off (see there)
        hooks.flush_deferred()
    return value


def __dir__() -> list[str]:
    return list(__all__)
