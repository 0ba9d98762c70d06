"""Routes, with no code change: each request's task is labelled by its route template.

With ``LOOPWATCH=1`` (or ``install()`` outside a loop), loopwatch hooks the routers of the
frameworks a service imports, when it imports them:

- Starlette (and FastAPI, whose routes are Starlette's): ``Route.handle`` and
  ``Router.not_found`` of ``starlette.routing`` (and FastAPI's ``_route_selected``);
- aiohttp: ``RequestHandler._handle_request`` of ``aiohttp.web_protocol``, the coroutine of each
  request's task, which carries the request; the route is read from the request's match
  (``request.match_info``) when the task ends or a finding asks (and, in pure Python,
  ``UrlDispatcher.resolve`` labels the task). Where no task factory sees that task (aiohttp 3.10+
  on Python 3.12+), the coroutine is put in the proxy loopwatch's task factory would have made,
  routes or not (``LOOPWATCH_ROUTES=0`` keeps that part, so the task is tracked as any other).

Each hook runs once per request, at routing time (aiohttp's when the request's task is made);
with the compiled module it has no frame at all, and in pure Python it is gone from the stack
before the request's handler runs: a handler's traceback has no frame of loopwatch's. A request
is labelled ``METHOD /template`` (``GET /users/{user_id}``), never with its raw path; a request
no route matched is labelled ``METHOD <unmatched>``.

Then the findings of that task carry ``route``, and when the task ends its busy time (the sum of
its steps) goes to ``loopwatch_request_busy_seconds{route}``. Servers run each request in a task
of its own (uvicorn, aiohttp 3.8 and later), so a task's busy time is its request's.

By hand (another framework, or a service that starts loopwatch with ``install(loop)``):
:func:`label_request` from a middleware, in the request's task.
"""

from __future__ import annotations

import asyncio
from typing import Any

from .. import _context, _runtime, _timing
from .._native import ACCEL


def request_busy(route: str, busy: float) -> None:
    """A labelled request's task ended (its proxy calls this): its busy time, by route."""
    runtime = _runtime._current
    if runtime is not None:
        runtime.requests.observe(route, busy)


if ACCEL is not None:
    ACCEL.set_request_end(request_busy)
_timing.request_end = request_busy


def label_request(route: str, task: asyncio.Task[Any] | None = None) -> None:
    """Label the task serving a request (the current task by default) with its route template.

    Its findings then carry ``route``, and its busy time goes to
    ``loopwatch_request_busy_seconds{route}`` when it ends. Call it once routing is done, with the
    template, never the raw path (``"GET /users/{id}"``): each distinct value is a series of its
    own (at most ``LOOPWATCH_COROUTINE_LABELS``; the rest share ``other``). Labelling the same
    task again changes its route; outside a watched loop's task it does nothing."""
    if task is None:
        try:
            task = asyncio.current_task()
        except RuntimeError:  # no running loop
            return
        if task is None:
            return
    _context.set_route(task, route)


def route_of(task: asyncio.Task[Any] | None = None) -> str | None:
    """The route a task (the current one by default) is labelled with, or None."""
    if task is None:
        try:
            task = asyncio.current_task()
        except RuntimeError:
            return None
    return _context.route_of(task)
