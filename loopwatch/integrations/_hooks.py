"""The framework hooks of ``loopwatch.integrations``: set when the framework is imported, undone
by ``uninstall()``. Each hook calls the framework's own function and looks at what it returned:
no frame of loopwatch's is on the stack while a request's handler runs. A hook that fails is put
back to the framework's own and said once; the request goes on."""

from __future__ import annotations

import asyncio
import sys
import weakref
from time import monotonic as _monotonic
from types import CoroutineType, ModuleType
from typing import Any

from .. import _config, _import_hooks, _runtime
from .._native import ACCEL
from .._timing import PyTimed, StepWatch
from . import label_request, route_of

# (owner, attribute, the framework's own): what uninstall puts back.
_patched: list[tuple[Any, str, Any]] = []
_undo: list[Any] = []  # and what else it undoes
_watching = False
_routes = True  # (with the routers hooked, or aiohttp's request tasks alone)
_current_task = asyncio.current_task
_get_running_loop = asyncio._get_running_loop
_compiled_proxy = ACCEL.Timed if ACCEL is not None else None
# The compiled hooks (``_accel.FrameworkHook``: Starlette's route, aiohttp's request), or the
# Python ones.
_FrameworkHook = getattr(ACCEL, "FrameworkHook", None)
_HOOK_ROUTE, _HOOK_REQUEST, _HOOK_TASK = 0, 1, 2
# How they find the running task: asyncio.current_task, compiled from 3.12; on 3.11 a Python
# function (a frame per request), so the running loop and asyncio's own dict of current tasks.
_current_tasks = getattr(asyncio.tasks, "_current_tasks", None)
_task_source: Any = (
    (asyncio.get_running_loop, _current_tasks)
    if sys.version_info < (3, 12) and type(_current_tasks) is dict
    else _current_task
)


def hook_frameworks(*, routes: bool = True) -> None:
    """Hook Starlette's and aiohttp's routers now if imported, else when they are (``routes``);
    with or without them, aiohttp's request tasks where no task factory sees them (Python 3.12+),
    so that they are tracked and timed as every other task."""
    global _watching, _routes
    if _watching and _routes == routes:
        return
    if _watching:
        unhook_frameworks()
    _watching, _routes = True, routes
    if routes:
        _import_hooks.when_imported("starlette.routing", _hook_starlette)
        _import_hooks.when_imported("fastapi.routing", _hook_fastapi)
        _import_hooks.when_imported("aiohttp.web_urldispatcher", _hook_aiohttp)
    _import_hooks.when_imported("aiohttp.web_protocol", _hook_aiohttp_protocol)


def unhook_frameworks() -> None:
    """Put every framework function back (uninstall)."""
    global _watching
    _watching = False
    while _undo:
        _undo.pop()()
    while _patched:
        owner, name, original = _patched.pop()
        if vars(owner).get(name) is not original:
            setattr(owner, name, original)


def _patch(owner: Any, name: str, hook: Any, original: Any) -> None:
    hook.__wrapped__ = original
    hook.__loopwatch__ = True
    _patched.append((owner, name, original))
    setattr(owner, name, hook)


def _failed(what: str, exc: BaseException) -> None:
    routes = _routes
    unhook_frameworks()
    failure = f"({type(exc).__name__}: {exc})"
    _config.report(
        f"loopwatch: labelling {what} requests by route failed {failure}; routes are off"
        if routes
        else f"loopwatch: following {what}'s request tasks failed {failure}; they are untracked"
    )


def _label(route: str, *, first_only: bool = False) -> None:
    try:
        task = _current_task()
    except RuntimeError:
        return
    if task is None or (first_only and route_of(task) is not None):
        return
    label_request(route, task)


# -- Starlette (and FastAPI) ---------------------------------------------------------------


def _hook_starlette(module: ModuleType) -> None:
    if not _watching or not _routes:  # (a hook asked for before routes were turned off)
        return
    route_cls = getattr(module, "Route", None)
    router_cls = getattr(module, "Router", None)
    if route_cls is None or router_cls is None:
        return
    handle = route_cls.__dict__.get("handle")
    not_found = router_cls.__dict__.get("not_found")
    if handle is None or getattr(handle, "__loopwatch__", False) or not_found is None:
        return

    # Route.handle is called once per request, on the route the router chose (a partial match
    # too: the 405 it answers). A plain function that labels the task and returns the route's
    # own coroutine, which the router awaits: no frame of loopwatch's is left on the stack.
    def route_handle(self: Any, scope: Any, receive: Any, send: Any) -> Any:
        # Once per request: kept to a few lookups and stores (the request's cost, measured by
        # benchmarks/bench.py --variants default,routes).
        try:
            if scope.get("type") == "http":
                # A route inside a Mount: the mount's part of the path comes first.
                root = scope.get("root_path")
                prefix = root[len(scope.get("app_root_path", "")) :] if root else ""
                route = f"{scope.get('method', '')} {prefix}{self.path}"
                task = _current_task()
                proxy: Any = getattr(task, "_coro", None)
                if type(proxy) is _compiled_proxy and proxy._owner is not None:
                    proxy._route = route  # the proxy tells its busy time when the task ends
                elif task is not None:
                    label_request(route, task)
        except Exception as exc:  # noqa: BLE001 - never into the request
            _failed("Starlette", exc)
        return handle(self, scope, receive, send)

    def router_not_found(self: Any, scope: Any, receive: Any, send: Any) -> Any:
        try:
            if scope.get("type") == "http":
                _label(f"{scope.get('method', '')} <unmatched>", first_only=True)
        except Exception as exc:  # noqa: BLE001
            _failed("Starlette", exc)
        return not_found(self, scope, receive, send)  # its coroutine: awaited by the router

    if _FrameworkHook is not None:
        # The same, compiled: no frame, a few hundred instructions a request.
        route_handle = _FrameworkHook(
            _HOOK_ROUTE, handle, _task_source, label_request,
            lambda exc: _failed("Starlette", exc), None,
        )  # fmt: skip
    _patch(route_cls, "handle", route_handle, handle)
    _patch(router_cls, "not_found", router_not_found, not_found)


# FastAPI 0.16x resolves routes of included routers without Route.matches, and says which
# route it selected, template and all, through fastapi.routing._route_selected (for its own
# telemetry). A Mount's part comes first, so it is kept per task until the route that follows.
_mount_prefix: weakref.WeakKeyDictionary[asyncio.Task[Any], str] = weakref.WeakKeyDictionary()


def _hook_fastapi(module: ModuleType) -> None:
    if not _watching or not _routes:  # (a hook asked for before routes were turned off)
        return
    selected = module.__dict__.get("_route_selected")
    if selected is None or getattr(selected, "__loopwatch__", False):
        return

    def route_selected(*, scope: Any, path: str | None, mount: bool = False) -> None:
        try:
            if path is not None and scope.get("type") == "http":
                task = _current_task()
                if task is not None:
                    prefix = _mount_prefix.get(task, "")
                    if mount:
                        _mount_prefix[task] = prefix + path.removesuffix("/{path}")
                    else:
                        _mount_prefix.pop(task, None)
                        label_request(f"{scope.get('method', '')} {prefix}{path}", task)
        except Exception as exc:  # noqa: BLE001 - never into the request
            _failed("FastAPI", exc)
        return selected(scope=scope, path=path, mount=mount)  # type: ignore[no-any-return]

    _patch(module, "_route_selected", route_selected, selected)


# -- aiohttp -------------------------------------------------------------------------------


def _hook_aiohttp_protocol(module: ModuleType) -> None:
    # Each request's task runs RequestHandler._handle_request (routing, middlewares, handler and
    # the response). aiohttp 3.10+ on Python 3.12+ makes that task with asyncio.Task(...,
    # eager_start=True), which no task factory sees: its coroutine is put in the proxy the
    # running loop's task factory would have made (its adopt), so the task is tracked and timed
    # as any other, routes or not. With routes, the proxy also carries the request (on a loop not
    # watched, a bare proxy does) and, compiled, that is all done per request: the route is read
    # from the request's match (request._match_info, put there by Application._handle once its
    # router resolved it) when the task ends or a finding asks. In pure Python, the router's
    # resolve is hooked too and labels the task.
    if not _watching:
        return
    handler_cls = getattr(module, "RequestHandler", None)
    handle = handler_cls.__dict__.get("_handle_request") if handler_cls is not None else None
    if handle is None or getattr(handle, "__loopwatch__", False):
        return
    routes = _routes
    adopts = sys.version_info >= (3, 12)
    if not routes and not adopts:
        return  # (on 3.11 the task factory sees these tasks: nothing to do without routes)
    hook: Any
    if _FrameworkHook is not None:
        assert ACCEL is not None
        if routes:
            ACCEL.set_request_routes(_aiohttp_route, _aiohttp_failed)
            _undo.append(lambda: ACCEL.set_request_routes(None, None))
        hook = _FrameworkHook(
            _HOOK_REQUEST if routes else _HOOK_TASK, handle, _task_source,
            (_get_running_loop, _tracker_of) if adopts else None, _aiohttp_failed, _WATCH,
        )  # fmt: skip
    elif adopts:

        def hook(self: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
            coro = handle(self, request, *args, **kwargs)
            if type(coro) is not CoroutineType:
                return coro
            try:
                proxy = _adopt(coro)
                if proxy is coro and routes:
                    proxy = PyTimed(coro, _WATCH)
                    proxy.born = _monotonic()  # (its age, in the live view)
                return proxy
            except Exception as exc:  # noqa: BLE001 - the request runs as without loopwatch
                _aiohttp_failed(exc)
                return coro

    else:
        return  # (pure Python on 3.11: the task factory's own proxy times the request's task)
    _patch(handler_cls, "_handle_request", hook, handle)


def _tracker_of(loop: asyncio.AbstractEventLoop) -> Any:
    """The task tracker of ``loop`` if it is watched, else None."""
    runtime = _runtime.current()
    return runtime.loops.tracker_of(loop) if runtime is not None else None


def _adopt(coro: Any) -> Any:
    """The proxy the running loop's task factory would make for the task of ``coro``, about to
    be made where it does not see it; ``coro`` itself where the loop is not watched."""
    loop = _get_running_loop()
    tracker = _tracker_of(loop) if loop is not None else None
    return tracker.adopt(coro) if tracker is not None else coro


def _hook_aiohttp(module: ModuleType) -> None:
    # Pure Python only: the router's own coroutine, awaited through, labels the request's task
    # when it returns its match (this frame is on the stack while the router resolves, never
    # while the handler runs).
    if not _watching or not _routes or _FrameworkHook is not None:
        return
    dispatcher_cls = getattr(module, "UrlDispatcher", None)
    resolve = dispatcher_cls.__dict__.get("resolve") if dispatcher_cls is not None else None
    if resolve is None or getattr(resolve, "__loopwatch__", False):
        return

    async def dispatcher_resolve(self: Any, request: Any) -> Any:
        match_info = await resolve(self, request)
        try:
            _label_aiohttp(request, match_info)
        except Exception as exc:  # noqa: BLE001 - never into the request
            _aiohttp_failed(exc)
        return match_info

    _patch(dispatcher_cls, "resolve", dispatcher_resolve, resolve)


def _aiohttp_failed(exc: BaseException) -> None:
    _failed("aiohttp", exc)


_WATCH = StepWatch()


def _aiohttp_canonical(match_info: Any, route: Any) -> str | None:
    """The canonical path of the route aiohttp matched (``/users/{user_id}``), or None for a
    request no route matched (the compiled path asks once per route object)."""
    resource = getattr(route, "resource", None)
    canonical = getattr(resource, "canonical", None) if resource is not None else None
    if canonical is None or getattr(match_info, "http_exception", None) is not None:
        return None
    return canonical  # type: ignore[no-any-return]


def _aiohttp_route(match_info: Any, route: Any) -> tuple[str | None, str | None]:
    """For the compiled path, asked once per route object: its canonical path (as
    ``_aiohttp_canonical``) and the one method it serves (aiohttp's own ``ResourceRoute`` of a
    method: its resources match it for that method only), or None for a route of any method
    (``*``) or of another class (a request of such a route has its method read from it)."""
    canonical = _aiohttp_canonical(match_info, route)
    dispatcher = sys.modules.get("aiohttp.web_urldispatcher")
    own = getattr(dispatcher, "ResourceRoute", None)
    if canonical is None or own is None or type(route) is not own:
        return canonical, None
    method = getattr(route, "method", None)
    return canonical, method if type(method) is str and method != "*" else None


def _label_aiohttp(request: Any, match_info: Any) -> None:
    canonical = _aiohttp_canonical(match_info, getattr(match_info, "route", None))
    route = f"{getattr(request, 'method', '')} {canonical or '<unmatched>'}"
    try:
        task = _current_task()
    except RuntimeError:
        return
    if task is not None:
        label_request(route, task)
