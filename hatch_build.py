"""Hatchling build hook: compile loopwatch/_accel.c, the optional C accelerator.

Registered in pyproject.toml under ``[tool.hatch.build.targets.wheel.hooks.custom]``, so it runs
for ``pip install .``, ``pip install -e .``, ``pip wheel .`` and ``python -m build`` (the wheel
step; the sdist step ships the C source and compiles nothing).

The extension is compiled for the interpreter running the build (``sys.executable``: pip runs the
build backend with the interpreter it installs for) by calling its C compiler directly, with no
setuptools: ``CC`` (the environment's, else sysconfig's), the interpreter's include directory and
its ``EXT_SUFFIX``. The result goes to ``loopwatch/_accel{EXT_SUFFIX}`` in the source tree, which is
what an editable install imports (it puts the project root on sys.path); a standard wheel also
gets the file at that path and becomes a platform wheel (``cp3XX-cp3XX-linux_x86_64``).

The accelerator is optional. The hook builds a pure-Python wheel instead, and prints one line on
stderr starting with ``loopwatch:``, when the platform is not Linux, the interpreter is not
CPython, ``LOOPWATCH_BUILD_ACCEL=0`` is set, there is no C compiler, or the compile fails (the
compiler's last lines follow the warning). A failed compile never fails the build. A
``loopwatch/_accel{EXT_SUFFIX}`` left from an earlier build is then deleted, so that an old binary
is never picked up by mistake; the ones built for other interpreters (other suffixes) are kept.

pip shows a build backend's output only with ``-v`` (or when the build fails), so the warning is
seen with ``pip install -v .``, ``pip wheel -v .`` and ``python -m build``; it is also why a
quiet install that fell back to pure Python looks like any other.

Extra compiler flags can be passed in the ``CFLAGS`` and ``LDFLAGS`` environment variables.
``LOOPWATCH_REQUIRE_ACCEL=1`` (the release's wheel builds) makes a failed compile fail the build.

Run as a script, ``python hatch_build.py ROOT`` compiles ``ROOT/loopwatch/_accel.c`` in place for
that interpreter, with no hatchling needed (``benchmarks/bench.py --ref`` builds its snapshot of
loopwatch so); it exits 1, after the warning, when the module is not built.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from typing import Any

try:
    from hatchling.builders.hooks.plugin.interface import BuildHookInterface
except ImportError:  # run as a script, outside a build: only build_in_place() is used
    BuildHookInterface = object

SOURCE = "loopwatch/_accel.c"
MODULE = "loopwatch/_accel"  # + EXT_SUFFIX, relative to the project root
FLAGS = ["-O2", "-g0", "-fPIC", "-shared", "-Wall", "-fno-strict-aliasing", "-DNDEBUG"]
OFF_VALUES = {"0", "false", "no", "off"}
TAIL_LINES = 15
COMPILE_TIMEOUT = 300  # seconds


def _module_path() -> str:
    """loopwatch/_accel{EXT_SUFFIX}, relative to the project root, for this interpreter."""
    return MODULE + (sysconfig.get_config_var("EXT_SUFFIX") or ".so")


def _warn(message: str, details: str = "") -> None:
    """One line on stderr starting with "loopwatch:", then `details`' last lines, indented."""
    print(f"loopwatch: {message}", file=sys.stderr, flush=True)
    for line in details.rstrip().splitlines()[-TAIL_LINES:]:
        print(f"    {line}", file=sys.stderr, flush=True)


class Skip(Exception):
    """The accelerator is not built: why, and what the compiler said (if it ran)."""

    def __init__(self, reason: str, details: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.details = details


class AccelBuildHook(BuildHookInterface):  # type: ignore[type-arg]
    """Compile loopwatch._accel for the building interpreter, or fall back to pure Python."""

    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if self.target_name != "wheel":  # registered for the wheel target only; be safe anyway
            return

        relative = _module_path()
        target = build_in_place(self.root)
        if target is None:
            if os.environ.get("LOOPWATCH_REQUIRE_ACCEL", "").strip() == "1":
                # A release build of the compiled wheels (cibuildwheel): a pure wheel here would
                # ship under a platform tag, so fail instead (the warning above says why).
                raise RuntimeError("loopwatch: LOOPWATCH_REQUIRE_ACCEL=1 and _accel was not built")
            return

        if version == "editable":
            # An editable wheel puts the project root on sys.path (a .pth file), so the module
            # compiled in place above is what gets imported; the wheel itself stays pure and
            # must not carry a copy (one in site-packages/loopwatch/ would be a second,
            # half-empty `loopwatch` directory).
            return

        # A standard wheel: ship the module. force_include also reserves the path, so hatchling's
        # own file walk skips it (and .gitignore ignores loopwatch/*.so): it is added once.
        build_data["force_include"][target] = relative
        build_data["pure_python"] = False
        build_data["infer_tag"] = True

    def clean(self, versions: list[str]) -> None:
        """``hatch build --clean``: delete the module built for this interpreter."""
        relative = _module_path()
        stale = _remove_stale(os.path.join(self.root, *relative.split("/")))
        if stale.startswith("could not"):
            _warn(stale)


def build_in_place(root: str) -> str | None:
    """Compile ``root``'s loopwatch/_accel.c next to it: the module's path, or None (warned)."""
    relative = _module_path()
    target = os.path.join(root, *relative.split("/"))
    try:
        _compile(root, target)
    except Skip as skip:
        message = f"{skip.reason}; building without the C accelerator (pure Python)"
        stale = _remove_stale(target)
        if stale:
            message += f"; {stale}"
        _warn(message, skip.details)
        return None
    return target


def _compile(root: str, target: str) -> None:
    """Build `target` from SOURCE, or raise Skip."""
    setting = os.environ.get("LOOPWATCH_BUILD_ACCEL", "")
    if setting.strip().lower() in OFF_VALUES:
        raise Skip(f"LOOPWATCH_BUILD_ACCEL={setting} is set")
    if sys.platform != "linux":
        raise Skip(f"the C accelerator is built on Linux only (this is {sys.platform})")
    if sys.implementation.name != "cpython":
        raise Skip(f"the C accelerator needs CPython (this is {sys.implementation.name})")

    source = os.path.join(root, *SOURCE.split("/"))
    if not os.path.isfile(source):
        raise Skip(f"{SOURCE} not found")

    paths = sysconfig.get_paths()
    include = paths.get("include") or ""
    if not os.path.isfile(os.path.join(include, "Python.h")):
        raise Skip(f"Python.h not found in {include!r} (no Python development headers)")
    includes = [f"-I{include}"]
    platinclude = paths.get("platinclude")
    if platinclude and platinclude != include:  # pyconfig.h, on some distributions' Pythons
        includes.append(f"-I{platinclude}")

    cc_setting = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    try:
        cc = shlex.split(cc_setting)
    except ValueError:
        cc = []
    if not cc or shutil.which(cc[0]) is None:
        raise Skip(f"no C compiler found (CC={cc_setting!r})")

    try:
        extra = [
            *shlex.split(os.environ.get("CFLAGS", "")),
            *shlex.split(os.environ.get("LDFLAGS", "")),
        ]
    except ValueError as exc:
        raise Skip(f"cannot parse CFLAGS/LDFLAGS ({exc})") from None

    # Compile next to the target, then rename: an import never sees a half-written module,
    # and a failed compile leaves nothing behind. (The name starts with a dot, so it can
    # never be imported, and ends in .so, so .gitignore and the sdist exclude it.)
    try:
        fd, partial = tempfile.mkstemp(
            prefix=".tmp-_accel-", suffix=".so", dir=os.path.dirname(target)
        )
    except OSError as exc:
        raise Skip(f"cannot write to {os.path.dirname(target)!r} ({exc})") from None
    os.close(fd)
    command = [*cc, *FLAGS, *includes, *extra, source, "-o", partial]
    try:
        try:
            result = subprocess.run(
                command,
                cwd=root,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                errors="replace",
                timeout=COMPILE_TIMEOUT,
                check=False,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            raise Skip(f"could not run the C compiler {cc[0]!r} ({exc})") from None
        if result.returncode != 0 or os.path.getsize(partial) == 0:
            status = f"exit status {result.returncode}" if result.returncode else "no output file"
            output = (result.stderr or "") + (result.stdout or "")
            raise Skip(
                f"compiling {SOURCE} failed ({shlex.join(cc)}: {status})",
                output if output.strip() else "(the compiler printed nothing)",
            )
        try:
            os.chmod(partial, 0o755)
            os.replace(partial, target)
        except OSError as exc:
            raise Skip(f"cannot write {os.path.basename(target)!r} ({exc})") from None
    finally:
        if os.path.exists(partial):
            os.unlink(partial)


def _remove_stale(target: str) -> str:
    """Delete a module left by an earlier build; what was done, for the warning, or ""."""
    if not os.path.exists(target):
        return ""
    name = f"loopwatch/{os.path.basename(target)}"
    try:
        os.unlink(target)
    except OSError as exc:
        return f"could not delete the old {name} ({exc}): delete it by hand"
    return f"deleted the old {name}"


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python hatch_build.py PROJECT_ROOT")
    sys.exit(0 if build_in_place(sys.argv[1]) else 1)
