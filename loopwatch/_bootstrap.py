"""The start-up check behind ``LOOPWATCH=1``: cheap, idempotent, and silent when off.

``loopwatch.pth`` (and, for Python 3.15+, ``loopwatch.start`` per PEP 829) calls :func:`start` in
every interpreter of the environment. With ``LOOPWATCH`` unset the ``.pth`` line does not even
import this module. With it set, :func:`start` installs a post-import hook and nothing else (it
imports only ``os`` and ``sys``, already loaded): a process that never imports asyncio pays about
a millisecond. When asyncio arrives, the settings are read (bad values reported once, on standard
error, before the first loop exists) and every loop from then on is watched; uvloop, when
imported, is hooked too.
"""

from __future__ import annotations

import os
import sys
from types import ModuleType

_started = False
_OFF = ("", "0", "false", "no", "off")
_ON = ("1", "true", "yes", "on")


def start() -> None:
    """Turn on zero-code watching if ``LOOPWATCH`` says so. Safe to call more than once."""
    global _started
    raw = os.environ.get("LOOPWATCH", "")
    word = raw.strip().lower()
    if _started or word in _OFF:
        return
    # Set first: site can process one site-packages folder twice (through a lib64 link), and a
    # bad value is reported once whatever happens next.
    _started = True
    if word not in _ON:
        _say(
            f"loopwatch: LOOPWATCH={raw!r} is not accepted; "
            "expected 1 to turn it on or 0 to keep it off; loopwatch stays off"
        )
        return
    try:
        from ._import_hooks import (
            when_imported,  # (deferred: start-up cost, paid in every process the .pth line runs in)
        )

        when_imported("asyncio", _on_asyncio)
        when_imported("uvloop", _on_uvloop)
    except Exception as exc:  # noqa: BLE001 - start-up must never stop the host program
        _say(f"loopwatch: could not start ({type(exc).__name__}: {exc}); loopwatch is off")


def _say(line: str) -> None:
    try:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
    except Exception:  # noqa: BLE001 - a closed or broken stderr is not the host's problem
        pass


def _on_asyncio(_: ModuleType) -> None:
    # (deferred: start-up cost; these load the whole of loopwatch, needed only now)
    from . import _config
    from ._api import enable_global

    _config.environ_settings()  # reports bad values once, now, before the first loop
    enable_global(serve_pid=True)  # a process run with LOOPWATCH=1 answers loopwatch tasks PID


def _on_uvloop(_: ModuleType) -> None:
    from ._api import patch_uvloop  # (deferred: start-up cost, as above)

    patch_uvloop()
