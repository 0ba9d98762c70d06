"""The compiled hot paths (``loopwatch._accel``, built from ``_accel.c``), where they are safe.

``ACCEL`` is the compiled module, or None: then the pure-Python twins in ``_timing``, ``_tasks``,
``_pulse`` and ``_watchdog`` do the same work, and report the same findings. The module is loaded
only on the interpreters it is built and tested for: CPython 3.11, 3.12 and 3.13 with the GIL.
Anywhere else (3.14 and later, a free-threaded build, PyPy) a compiled module that happens to be
there is not loaded, and loopwatch says so in one line: native code that was never tested on an
interpreter is never run on it. ``LOOPWATCH_ACCEL=0`` turns it off anywhere.
"""

from __future__ import annotations

import sys
import sysconfig
from types import ModuleType
from typing import Any

from . import _config

API = 16  # the loopwatch._accel.API this code is written for
TESTED = ((3, 11), (3, 12), (3, 13))


def supported(
    version: tuple[int, ...] | None = None,
    implementation: str | None = None,
    free_threaded: bool | None = None,
) -> bool:
    """Whether this interpreter is one the compiled module is built and tested for."""
    version = tuple(sys.version_info[:2]) if version is None else tuple(version[:2])
    implementation = sys.implementation.name if implementation is None else implementation
    if free_threaded is None:
        free_threaded = bool(sysconfig.get_config_var("Py_GIL_DISABLED"))
    return implementation == "cpython" and version in TESTED and not free_threaded


def describe_interpreter() -> str:
    version = ".".join(str(p) for p in sys.version_info[:2])
    name = sys.implementation.name
    threads = " free-threaded" if sysconfig.get_config_var("Py_GIL_DISABLED") else ""
    return f"{name} {version}{threads}"


def _load() -> ModuleType | None:
    if not _config.accel_wanted():
        return None
    if not supported():
        try:
            import importlib.util  # (deferred: start-up cost; only on untested Pythons)

            present = importlib.util.find_spec(__package__ + "._accel") is not None
        except (ImportError, ValueError):
            present = False
        if present:
            _config.report(
                f"loopwatch: the compiled hot paths are tested on CPython 3.11 to 3.13 with the "
                f"GIL, not on {describe_interpreter()}; using the pure-Python ones"
            )
        return None
    try:
        from . import _accel  # an optional compiled module: absent where it was not built
    except ImportError:
        return None
    if getattr(_accel, "API", None) != API:
        _config.report(
            "loopwatch: the compiled module loopwatch._accel is from another version of "
            "loopwatch (reinstall loopwatch); using the pure-Python hot paths"
        )
        return None
    return _accel


ACCEL: Any = _load()
