"""The package's shape: its import graph has no cycle, and each module imports only its layer
or the layers below (docs/architecture.md draws them). Imports inside functions count; those
under ``TYPE_CHECKING`` do not (they never run)."""

from __future__ import annotations

import ast
from pathlib import Path

import loopwatch

PACKAGE = Path(loopwatch.__file__).parent

# The layers, from the bottom up. A new module goes in one of them (the test says so if not).
LAYERS: dict[str, int] = {
    # 1. settings, events, statistics, and what every layer uses (threads, places, the sink)
    **dict.fromkeys(
        (
            "_config",
            "_context",
            "_events",
            "_stats",
            "_native",
            "_places",
            "_threads",
            "_alarm",
            "_import_hooks",
            "_docs",
            "_demo",
            "_dispatch",
        ),
        1,
    ),
    # 2. the detectors: they receive their sink and settings
    **dict.fromkeys(("_pulse", "_timing", "_watchdog", "_tasks", "_hangs"), 2),
    # 3. attaching to loops: the registry of watched loops and its hooks
    "_loops": 3,
    # 4. the runtime: the one owner of the process state
    "_runtime": 4,
    # 5. the read side: snapshots of a runtime
    "_metrics": 5,
    "_live": 5,
    # 6. the exporters: events and snapshots out; never a detector
    **dict.fromkeys(
        (
            "exporters",
            "exporters._fold",
            "exporters.console",
            "exporters._text",
            "exporters.jsonlines",
            "exporters.logging",
            "exporters.otel",
            "exporters.prometheus",
            "exporters.structlog",
        ),
        6,
    ),
    # 7. the entry points: the public face, the ways in
    **dict.fromkeys(
        (
            "",  # loopwatch/__init__.py (re-exports, loaded lazily)
            "__main__",
            "_api",
            "_bootstrap",
            "_cli",
            "_view",
            "_policy",
            "_scope",
            "_testing",
            "pytest_plugin",
            "demo",
            "demo.service",
            "integrations",
            "integrations._hooks",
        ),
        7,
    ),
}
DETECTORS = {name for name, layer in LAYERS.items() if layer == 2}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _target(name: str) -> str | None:
    """The package's module that ``name`` (relative to the package) is, or lives in."""
    while name not in MODULES:
        if "." not in name:
            return None
        name = name.rsplit(".", 1)[0]
    return name


def imports_of(name: str) -> dict[str, list[tuple[int, bool]]]:
    """The package's modules ``name`` imports: target -> [(line, inside a function)]."""
    path = MODULES[name]
    is_package = path.name == "__init__.py"
    here = name.split(".") if name else []
    found: dict[str, list[tuple[int, bool]]] = {}

    def add(target: str | None, line: int, nested: bool) -> None:
        if target is not None and target != name:
            found.setdefault(target, []).append((line, nested))

    def walk(node: ast.AST, nested: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                for stmt in child.orelse:
                    walk(stmt, nested)
                continue
            inner = nested or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            if isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name == "loopwatch" or alias.name.startswith("loopwatch."):
                        add(
                            _target(alias.name.removeprefix("loopwatch").lstrip(".")),
                            child.lineno,
                            inner,
                        )
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = here if is_package else here[:-1]
                    base = base[: len(base) - (child.level - 1)]
                    module = ".".join([*base, *([child.module] if child.module else [])])
                elif child.module and child.module.split(".")[0] == "loopwatch":
                    module = child.module.removeprefix("loopwatch").lstrip(".")
                else:
                    continue
                for alias in child.names:
                    sub = f"{module}.{alias.name}" if module else alias.name
                    if sub in MODULES:
                        add(sub, child.lineno, inner)
                    elif (PACKAGE / f"{sub.replace('.', '/')}.pyi").exists():
                        continue  # the compiled module (_accel): no Python imports of its own
                    else:
                        add(_target(module), child.lineno, inner)
            walk(child, inner)

    walk(ast.parse(path.read_text(encoding="utf-8")), False)
    return found


GRAPH = {name: imports_of(name) for name in MODULES}


def test_every_module_has_a_layer() -> None:
    """A new module is placed in a layer here and in docs/architecture.md."""
    assert sorted(set(MODULES) - set(LAYERS)) == []
    assert sorted(set(LAYERS) - set(MODULES)) == []


def test_the_import_graph_has_no_cycle() -> None:
    """No module reaches itself through imports, counting those inside functions."""
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(name: str) -> None:
        state[name] = 1
        path.append(name)
        for target in sorted(GRAPH[name]):
            if state.get(target) == 1:
                cycles.append([*path[path.index(target) :], target])
            elif target not in state:
                visit(target)
        path.pop()
        state[name] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name)
    assert cycles == []


def test_each_module_imports_only_its_layer_and_below() -> None:
    """Upward imports, as ``module -> target (its layer)``: none."""
    upward = [
        f"{name or '__init__'}:{line} -> {target} (layer {LAYERS[target]} > {LAYERS[name]})"
        for name, targets in GRAPH.items()
        for target, places in targets.items()
        for line, _ in places
        if LAYERS[target] > LAYERS[name]
    ]
    assert upward == []


def test_exporters_never_import_a_detector() -> None:
    """Exporters take events and snapshots; what a detector is stays out of their reach."""
    reached = [
        f"{name} -> {target}"
        for name, targets in GRAPH.items()
        if name.startswith("exporters")
        for target in targets
        if target in DETECTORS or target == "_loops"
    ]
    assert reached == []


def test_imports_inside_functions_say_why() -> None:
    """An import inside a function is there to defer start-up cost or an optional package,
    and says which in a comment on its line or above it."""
    silent = []
    for name in MODULES:
        lines = MODULES[name].read_text(encoding="utf-8").splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for inner in ast.walk(node):
                if isinstance(inner, ast.Import | ast.ImportFrom):
                    statement = lines[inner.lineno - 1 : inner.end_lineno]
                    # (one comment may stand above a group of imports)
                    j = inner.lineno - 2
                    while j >= 0 and lines[j].strip().startswith(("from ", "import ")):
                        j -= 1
                    above = lines[j].strip() if j >= 0 else ""
                    if not any("#" in line for line in statement) and not above.startswith("#"):
                        first = statement[0].strip()
                        silent.append(f"{name or '__init__'}:{inner.lineno}: {first}")
    assert sorted(set(silent)) == []
