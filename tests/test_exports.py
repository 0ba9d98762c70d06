"""The public surface: what loopwatch exports is exactly what CONTRACT.md names (plus additions)."""

from __future__ import annotations

import importlib
import subprocess
import sys

import loopwatch

CONTRACT_API = {
    "install",
    "uninstall",
    "new_event_loop",
    "new_uvloop_event_loop",
    "EventLoopPolicy",
    "metrics_url",
    "snapshot",
}


def test_all_is_sorted_and_every_name_resolves() -> None:
    assert loopwatch.__all__ == sorted(loopwatch.__all__)
    for name in loopwatch.__all__:
        assert getattr(loopwatch, name) is not None, name


def test_contract_api_is_exported() -> None:
    assert set(loopwatch.__all__) >= CONTRACT_API


def test_no_private_module_is_reexported_by_accident() -> None:
    # Not identifiers: the names pytest's assertion rewriting adds to the modules of a
    # distribution that has a pytest11 entry point (loopwatch's plugin), e.g. '@py_builtins'.
    public = {n for n in vars(loopwatch) if n.isidentifier() and not n.startswith("_")}
    submodules = {"exporters", "demo", "integrations", "pytest_plugin"}  # public submodules
    assert public - set(loopwatch.__all__) <= submodules | {"TYPE_CHECKING"}
    assert dir(loopwatch) == loopwatch.__all__


def test_unknown_attribute_raises_attribute_error() -> None:
    try:
        loopwatch.no_such_thing  # type: ignore[attr-defined]  # noqa: B018
    except AttributeError as exc:
        assert "no_such_thing" in str(exc)
    else:
        raise AssertionError("expected AttributeError")


def test_importing_loopwatch_imports_no_asyncio() -> None:
    """The package itself is light: the start-up hook imports it in every process."""
    code = "import sys, loopwatch, loopwatch._bootstrap; print('asyncio' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout == "False\n"


def test_event_classes_carry_their_contract_names() -> None:
    events = importlib.import_module("loopwatch._events")
    assert events.EVENT_NAMES == (
        "loopwatch.slow_callback",
        "loopwatch.loop_stalled",
        "loopwatch.task_leaked",
        "loopwatch.task_orphaned",
        "loopwatch.task_exception_unretrieved",
        "loopwatch.coroutine_never_awaited",
        "loopwatch.cancel_swallowed",
        "loopwatch.cancel_ignored",
        "loopwatch.deadlock",
        "loopwatch.task_stuck",
    )
