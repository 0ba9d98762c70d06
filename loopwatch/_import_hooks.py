"""Post-import hooks: run a function once a module has been imported, without importing it.

Used by the zero-code start-up so that ``LOOPWATCH=1`` in a process that never imports asyncio
costs nothing beyond reading the settings.
"""

from __future__ import annotations

import sys
from types import ModuleType

# Only what start-up already has: importlib.abc would pull in importlib.resources, tempfile and
# shutil (milliseconds); a meta path finder and a loader need no base class.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from importlib.machinery import ModuleSpec
    from typing import Any

_hooks: dict[str, list[Callable[[ModuleType], None]]] = {}
# Hooks whose module arrived while a loopwatch module was itself being imported (the program
# imported loopwatch before asyncio, say): they use loopwatch's modules, which are not whole
# yet, so they run once those imports are done (see flush_deferred).
_deferred: list[tuple[str, Callable[[ModuleType], None], ModuleType, bool]] = []


def when_imported(name: str, hook: Callable[[ModuleType], None]) -> None:
    """Call ``hook(module)`` once ``name`` is imported (now, if it already is)."""
    module = sys.modules.get(name)
    if module is not None:
        _call_or_defer(name, [hook], module, whole=not _initializing(module))
        return
    _hooks.setdefault(name, []).append(hook)
    if not any(isinstance(f, _PostImportFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _PostImportFinder())


def _loopwatch_importing() -> bool:
    """Whether a loopwatch module is being imported right now (on the stack below us)."""
    for key, module in list(sys.modules.items()):
        if (key == "loopwatch" or key.startswith("loopwatch.")) and getattr(
            getattr(module, "__spec__", None), "_initializing", False
        ):
            return True
    return False


def _initializing(module: ModuleType) -> bool:
    return bool(getattr(getattr(module, "__spec__", None), "_initializing", False))


def _call_or_defer(
    name: str,
    hooks: list[Callable[[ModuleType], None]],
    module: ModuleType,
    *,
    whole: bool = True,
) -> None:
    # Put off while a loopwatch module is being imported, and while the hooked module itself is
    # (``whole`` false: it is in sys.modules half made, as when `import starlette.routing`
    # imports asyncio, which starts loopwatch, which hooks starlette.routing before its Route
    # exists). A module our loader just ran is whole, though importlib still says initializing.
    if hooks and (_loopwatch_importing() or not whole):
        _deferred.extend((name, hook, module, whole) for hook in hooks)
        return
    for hook in hooks:
        _call(name, hook, module)


def flush_deferred() -> None:
    """Run the hooks put off by :func:`_call_or_defer`, once no loopwatch import is under way
    and their module is whole. Called at each import that passes through loopwatch's finder, by
    ``loopwatch``'s lazy attributes, and when a loop is watched."""
    if not _deferred or _loopwatch_importing():
        return
    waiting = []
    while _deferred:
        name, hook, module, whole = _deferred.pop(0)
        if not whole and _initializing(module):
            waiting.append((name, hook, module, whole))
        else:
            _call(name, hook, module)
    _deferred.extend(waiting)


def _call(name: str, hook: Callable[[ModuleType], None], module: ModuleType) -> None:
    try:
        hook(module)
    except Exception as exc:  # noqa: BLE001
        from ._config import report  # (deferred: start-up cost, as this module's imports)

        report(f"loopwatch: hooking {name} failed ({type(exc).__name__}: {exc}); it is not watched")


class _PostImportFinder:
    """Finds nothing itself: lets the other finders find a hooked module, then wraps its loader."""

    def __init__(self) -> None:
        self._busy: set[str] = set()

    def find_spec(
        self, fullname: str, path: Any = None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if _deferred:
            flush_deferred()
        if fullname not in _hooks or fullname in self._busy:
            return None
        self._busy.add(fullname)
        try:
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    break
            else:
                return None
        finally:
            self._busy.discard(fullname)
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _HookedLoader(spec.loader, fullname)  # type: ignore[assignment]
        return spec


class _HookedLoader:
    def __init__(self, loader: Any, name: str) -> None:
        self._loader = loader
        self._name = name

    def create_module(self, spec: ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)  # type: ignore[no-any-return]

    def exec_module(self, module: ModuleType) -> None:
        # Put the real loader back first: importlib.resources and friends read spec.loader.
        if module.__spec__ is not None:
            module.__spec__.loader = self._loader
        module.__loader__ = self._loader
        self._loader.exec_module(module)
        _call_or_defer(self._name, _hooks.pop(self._name, []), module)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)
