"""A kernel timer that a loop's heartbeat keeps pushing back: it fires only if the beat stops.

Why: any Python thread that wakes up needs the GIL, and a busy event loop releases and retakes
the GIL at every ``epoll`` call, so a thread waiting for it is woken in vain again and again; a
watchdog that merely checks on a timer measurably slows a saturated loop (5-9% on a ``sleep(0)``
workload, see ``benchmarks/results-issue2.md``). With a Linux ``timerfd`` the watchdog thread
blocks in ``select`` with the GIL released, and each heartbeat re-arms the timer (one syscall,
about 1 us with ctypes, every 10 ms): while the loop is healthy the thread never runs at all.

Python 3.13 has ``os.timerfd_create``; before it, libc is called through ctypes. Where neither
works (not Linux), :func:`new_alarm` returns None and the watchdog wakes on deadlines instead.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any

# ctypes only where os.timerfd_* is missing (before 3.13): importing it costs ~5 ms at start-up.
if not hasattr(os, "timerfd_create"):
    import ctypes
    import ctypes.util

_CLOCK_MONOTONIC = getattr(time, "CLOCK_MONOTONIC", 1)
_TFD_NONBLOCK = getattr(os, "TFD_NONBLOCK", 0o4000)
_TFD_CLOEXEC = getattr(os, "TFD_CLOEXEC", 0o2000000)


if not hasattr(os, "timerfd_create"):

    class _Timespec(ctypes.Structure):
        _fields_ = (("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long))

    class _Itimerspec(ctypes.Structure):
        _fields_ = (("it_interval", _Timespec), ("it_value", _Timespec))

    _libc: Any = None

    def _load_libc() -> Any:
        global _libc
        if _libc is None:
            try:  # glibc's name, without find_library's subprocess
                libc = ctypes.CDLL("libc.so.6", use_errno=True)
            except OSError:
                libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
            libc.timerfd_create.argtypes = (ctypes.c_int, ctypes.c_int)
            libc.timerfd_settime.argtypes = (
                ctypes.c_int,
                ctypes.c_int,
                ctypes.POINTER(_Itimerspec),
                ctypes.c_void_p,
            )
            _libc = libc
        return _libc


class Alarm:
    """One timerfd. ``arm(s)`` (re)sets it to fire in ``s`` seconds; ``disarm()`` stops it."""

    def __init__(self) -> None:
        if hasattr(os, "timerfd_create"):
            self.fd: int = os.timerfd_create(_CLOCK_MONOTONIC, flags=_TFD_NONBLOCK | _TFD_CLOEXEC)
            self._spec: Any = None
        else:
            libc = _load_libc()
            fd = libc.timerfd_create(_CLOCK_MONOTONIC, _TFD_NONBLOCK | _TFD_CLOEXEC)
            if fd < 0:
                raise OSError(ctypes.get_errno(), "timerfd_create failed")
            self.fd = fd
            self._spec = _Itimerspec()
            self._settime = libc.timerfd_settime
            self._ref = ctypes.byref(self._spec)

    def arm(self, seconds: float) -> None:
        spec = self._spec
        if spec is None:
            os.timerfd_settime(self.fd, initial=seconds)  # type: ignore[attr-defined]
            return
        whole = int(seconds)
        spec.it_value.tv_sec = whole
        spec.it_value.tv_nsec = int((seconds - whole) * 1e9) or 1  # 0/0 would disarm it
        self._settime(self.fd, 0, self._ref, None)

    def disarm(self) -> None:
        spec = self._spec
        if spec is None:
            os.timerfd_settime(self.fd, initial=0)  # type: ignore[attr-defined]
            return
        spec.it_value.tv_sec = 0
        spec.it_value.tv_nsec = 0
        self._settime(self.fd, 0, self._ref, None)

    def clear(self) -> None:
        """Consume a pending expiry, so ``select`` stops reporting it."""
        with contextlib.suppress(OSError):
            os.read(self.fd, 8)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


_works: bool | None = None


def new_alarm() -> Alarm | None:
    """An alarm, or None where timerfd is not available (then the watchdog polls on deadlines)."""
    global _works
    if _works is False:
        return None
    try:
        alarm = Alarm()
        if _works is None:
            alarm.arm(0.5)
            alarm.disarm()
            _works = True
        return alarm
    except (OSError, AttributeError, TypeError, ValueError):
        _works = False
        return None
