"""The start-up check behind ``LOOPWATCH=1``: cheap, idempotent, and silent when off.

``loopwatch.pth`` (and, for Python 3.15+, ``loopwatch.start`` per PEP 829) calls :func:`start` in
every interpreter of the environment. With ``LOOPWATCH`` unset the ``.pth`` line does not even
import this module; with it set, :func:`start` reads the settings (reporting bad ones at once),
then waits for the program to import asyncio: a process that never uses asyncio pays nothing
more, and one that does is watched from its first loop on. uvloop, when imported, is hooked too.
"""

from __future__ import annotations

import os
from types import ModuleType

_started = False
_OFF = ("", "0", "false", "no", "off")


def start() -> None:
    """Turn on zero-code watching if ``LOOPWATCH`` says so. Safe to call more than once."""
    global _started
    if _started or os.environ.get("LOOPWATCH", "").strip().lower() in _OFF:
        return
    # Set first: site can process one site-packages folder twice (through a lib64 link), and
    # a setting is reported once whatever happens next.
    _started = True
    from . import _config

    if not _config.enabled():
        return
    _config.environ_settings()  # reports bad values once, now, where the user will see them
    try:
        from ._import_hooks import when_imported

        when_imported("asyncio", _on_asyncio)
        when_imported("uvloop", _on_uvloop)
    except Exception as exc:  # noqa: BLE001 - start-up must never stop the host program
        _config.report(
            f"loopwatch: could not start ({type(exc).__name__}: {exc}); loopwatch is off"
        )


def _on_asyncio(_: ModuleType) -> None:
    from ._loops import enable_global

    enable_global()


def _on_uvloop(_: ModuleType) -> None:
    from ._loops import patch_uvloop

    patch_uvloop()
