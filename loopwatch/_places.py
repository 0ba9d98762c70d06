"""Places in code: ``path:line in function``, and which files are the program's own.

Classifying a file costs a few string operations; each file name is classified once and cached
(a dict lookup afterwards, ~30 ns), so walking a stack of 50 frames stays in the microseconds.
Classifying never touches the file system: it runs on the loop's thread (inside ``create_task``)
where a ``getcwd`` or ``stat`` is a blocking call (blockbuster says so, rightly). File names are
compared as strings, made absolute against the working directory read once at import, and
normalized with ``posixpath``-style string operations only.
"""

from __future__ import annotations

import asyncio
import os
import sys
import sysconfig
from types import CodeType, FrameType
from typing import Final

from ._native import ACCEL


def _absolute(path: str) -> str:
    """``os.path.abspath`` without its ``getcwd()``: the working directory of the import."""
    if not os.path.isabs(path):
        path = os.path.join(_CWD, path)
    return os.path.normpath(path)


def _cwd() -> str:
    try:  # once, at import (never on a running loop's thread afterwards)
        return os.getcwd()
    except OSError:  # a working directory that was removed
        return os.sep


_CWD: Final = _cwd()

_LOOPWATCH_DIR: Final = os.path.dirname(_absolute(__file__)) + os.sep
LOOPWATCH_DIR: Final = _LOOPWATCH_DIR
# The bundled demo plays the part of a user's program: its frames are "own code".
_DEMO_DIR: Final = _LOOPWATCH_DIR + "demo" + os.sep
_ASYNCIO_DIR: Final = os.path.dirname(_absolute(asyncio.__file__)) + os.sep


def _library_dirs() -> tuple[str, ...]:
    dirs: set[str] = set()
    for key in ("stdlib", "platstdlib", "purelib", "platlib"):
        path = sysconfig.get_paths().get(key)
        if path:
            dirs.add(_absolute(path) + os.sep)
    for path in (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix):
        # The interpreter's own folders: its libraries, and bin/ where entry-point scripts
        # (pytest, uvicorn, gunicorn) live; none of that is the program's own code.
        for sub in ("lib", "lib64", "bin", "Scripts"):
            dirs.add(os.path.join(_absolute(path), sub) + os.sep)
    return tuple(sorted(dirs))


_LIBRARY_DIRS: Final = _library_dirs()
_MACHINERY_DIRS: list[str] = [_ASYNCIO_DIR, _LOOPWATCH_DIR]
# uvloop's compiled code reports its Cython sources by relative name ("uvloop/loop.pyx").
_UVLOOP_CYTHON: Final = "uvloop" + os.sep
_own_cache: dict[str, bool] = {}
_machinery_cache: dict[str, bool] = {}


def _machinery_dirs() -> list[str]:
    """asyncio's and loopwatch's folders, and uvloop's once it has been imported."""
    if len(_MACHINERY_DIRS) == 2:
        uvloop = sys.modules.get("uvloop")
        path = getattr(uvloop, "__file__", None)
        if path:
            _MACHINERY_DIRS.append(os.path.dirname(_absolute(path)) + os.sep)
            _machinery_cache.clear()
            if ACCEL is not None:
                ACCEL.forget_kinds()  # the compiled cache in front of this one
    return _MACHINERY_DIRS


def machinery_cache() -> dict[str, bool]:
    """The file-name cache behind :func:`is_machinery`, for hot loops that inline the lookup.
    It is only ever cleared in place, so a reference to it stays valid."""
    return _machinery_cache


def is_machinery(filename: str) -> bool:
    """True for asyncio's, uvloop's and loopwatch's own files: frames a finding looks past."""
    dirs = _machinery_dirs()  # first: it empties the cache when uvloop has just arrived
    known = _machinery_cache.get(filename)
    if known is None:
        path = _absolute(filename) if not filename.startswith("<") else filename
        known = (
            path.startswith(tuple(dirs)) and not path.startswith(_DEMO_DIR)
        ) or filename.startswith(_UVLOOP_CYTHON)
        _machinery_cache[filename] = known
    return known


def is_own_code(filename: str) -> bool:
    """True for the program's own files: not the standard library, site-packages or loopwatch."""
    known = _own_cache.get(filename)
    if known is None:
        if filename.startswith("<"):
            known = False
        else:
            path = _absolute(filename)
            known = path.startswith(_DEMO_DIR) or not (
                path.startswith(_LOOPWATCH_DIR)
                or path.startswith(_LIBRARY_DIRS)
                or f"{os.sep}site-packages{os.sep}" in path
                or f"{os.sep}dist-packages{os.sep}" in path
            )
        _own_cache[filename] = known
    return known


def is_program(filename: str) -> bool:
    """Whether a frame of this file makes a finding the program's (``origin``): its own code, or
    code with no file of its own that it typed or generated (``<string>``, ``<stdin>``), but not
    the interpreter's frozen modules."""
    if filename.startswith("<"):
        return not filename.startswith("<frozen")
    return is_own_code(filename)


# Coroutines a test runner runs each test in, in a task it keeps for as long as it runs and
# cancels when it closes (file name ending, qualified name): the task is never a leak of the
# test's or of the runner's, and a finding in it is named after the test's coroutine.
RUNNER_CODES: Final = frozenset(
    {("anyio/_backends/_asyncio.py", "TestRunner._run_tests_and_fixtures")}
)


def is_runner_code(code: CodeType) -> bool:
    filename = code.co_filename.replace("\\", "/")
    return any(filename.endswith(f) and code.co_qualname == q for f, q in RUNNER_CODES)


def place(code: CodeType, lineno: int | None) -> str:
    """``path:line in function`` for a code object and a line."""
    return f"{code.co_filename}:{lineno if lineno is not None else '?'} in {code.co_name}"


def frame_place(frame: FrameType) -> str:
    return place(frame.f_code, frame.f_lineno)


def frames_outermost_first(frame: FrameType | None) -> list[FrameType]:
    frames: list[FrameType] = []
    while frame is not None:
        frames.append(frame)
        frame = frame.f_back
    frames.reverse()
    return frames


def innermost_own(frames: list[FrameType]) -> FrameType | None:
    """The innermost frame of the program's own code, else the innermost non-machinery frame."""
    for frame in reversed(frames):
        if is_own_code(frame.f_code.co_filename):
            return frame
    for frame in reversed(frames):
        if not is_machinery(frame.f_code.co_filename):
            return frame
    return frames[-1] if frames else None


def callback_entry(frames: list[FrameType]) -> FrameType | None:
    """The frame where the loop handed control to the running callback or task step.

    The loop thread's stack reads, outermost first: whatever started the loop, then the loop's
    own machinery (asyncio or uvloop, and loopwatch's run wrapper), then the callback. The first
    frame after the outermost run of machinery is the callback's: a fresh frame object for every
    plain callback, and the coroutine's own frame for a task step.
    """
    in_machinery = False
    for frame in frames:
        if is_machinery(frame.f_code.co_filename):
            in_machinery = True
        elif in_machinery:
            return frame
    return None
