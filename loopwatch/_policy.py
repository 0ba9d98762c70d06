"""``loopwatch.EventLoopPolicy``: the compatibility path for code that sets a policy.

Event-loop policies are deprecated from Python 3.14 and go in 3.16; loop factories
(``loopwatch.new_event_loop``) are the primary path. This module is imported only when a user asks
for the policy, so nobody else touches a deprecated asyncio name.
"""

from __future__ import annotations

import asyncio
import asyncio.events
from typing import Any

from ._api import attach

# 3.14 keeps the abstract policy under a private name and warns on the public one; the user asked
# for a policy, so on older versions the public name is the right one.
_Base: Any = getattr(asyncio.events, "_AbstractEventLoopPolicy", None)
if _Base is None:
    _Base = asyncio.AbstractEventLoopPolicy


def _default_policy() -> Any:
    cls = getattr(asyncio, "_DefaultEventLoopPolicy", None) or asyncio.DefaultEventLoopPolicy
    return cls()


class EventLoopPolicy(_Base):  # type: ignore[misc]
    """Wraps another policy (``base``, by default asyncio's) and watches every loop it makes.

    ``asyncio.set_event_loop_policy(loopwatch.EventLoopPolicy(uvloop.EventLoopPolicy()))``
    watches uvloop loops; everything but ``new_event_loop`` is the base policy's own.
    """

    def __init__(self, base: Any = None) -> None:
        self._base = base if base is not None else _default_policy()

    @property
    def base(self) -> Any:
        return self._base

    def new_event_loop(self) -> asyncio.AbstractEventLoop:
        loop = self._base.new_event_loop()
        attach(loop)
        return loop  # type: ignore[no-any-return]

    def get_event_loop(self) -> asyncio.AbstractEventLoop:
        return self._base.get_event_loop()  # type: ignore[no-any-return]

    def set_event_loop(self, loop: asyncio.AbstractEventLoop | None) -> None:
        self._base.set_event_loop(loop)

    def __getattr__(self, name: str) -> Any:
        # get_child_watcher/set_child_watcher (3.11, 3.12) and whatever a base policy adds.
        return getattr(self._base, name)
