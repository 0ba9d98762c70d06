"""The live view by PID, with no port opened: a Unix socket per process, as the JDK's ``jcmd``.

Each process loopwatch watches listens on ``/tmp/loopwatch-UID/PID.sock``, the directory made with
mode 0700 (and refused if it is not the user's alone), the socket itself 0600. A client of the same
user (``loopwatch tasks PID``) connects, says ``tasks``, and reads the snapshot as JSON; the server
checks the peer's user id (``SO_PEERCRED``) and answers nobody else. The socket is made, served and
removed by a thread of loopwatch's (no file system call on the program's threads; at exit, the
program has left its loops); a forked child serves its own, under its own PID, from its first
watched loop; the socket goes when the runtime closes or the process exits.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import socket
import stat
import struct
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .. import _live
from .._config import report
from .._threads import Worker, discard, wait_readable

if TYPE_CHECKING:
    from .._runtime import Runtime

REQUEST = b"tasks\n"
_TIMEOUT = 5.0


def directory() -> str:
    """Where the sockets of this user's processes are. A fixed place, so that every process of
    the user finds it whatever its environment (and loopwatch reads nothing but ``LOOPWATCH*``
    from the environment)."""
    return f"/tmp/loopwatch-{os.getuid()}"


def socket_path(pid: int) -> str | None:
    """The socket of process ``pid`` of this user, if there is one."""
    path = os.path.join(directory(), f"{pid}.sock")
    return path if os.path.exists(path) else None


def _private_directory() -> str:
    """The directory this process's socket goes in: made 0700 if need be, refused if it is not
    this user's alone."""
    path = directory()
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise PermissionError(f"{path} is not a directory of this user's alone (mode 0700)")
    return path


class Console:
    """The socket of one runtime, served by a thread of loopwatch's."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.path: str | None = None
        self._pid = os.getpid()
        self._closing = False
        self._wake_r, self._wake_w = socket.socketpair()
        self.worker = Worker("console", self._serve, self._wake, failure="loopwatch tasks PID")
        atexit.register(self._remove)

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")

    def _listen(self) -> socket.socket:
        private = _private_directory()
        _remove_stale(private)
        path = os.path.join(private, f"{os.getpid()}.sock")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # a socket left by an earlier process with this PID
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            server.bind(path)
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        server.listen(8)
        server.setblocking(False)
        self.path, self._pid = path, os.getpid()
        return server

    def _serve(self, keep_going: Callable[[], bool]) -> None:
        try:
            server = self._listen()
        except OSError as exc:
            report(f"loopwatch: the live view by PID is off ({type(exc).__name__}: {exc})")
            return
        try:
            fds = [server.fileno(), self._wake_r.fileno()]
            while keep_going():
                # As select, and a busy loop hands this thread the GIL as it wakes (_threads).
                for fd in wait_readable(fds, None):
                    if fd == fds[1]:
                        with contextlib.suppress(OSError):
                            self._wake_r.recv(4096)
                        continue
                    if keep_going():
                        self._answer(server)
        finally:
            # The file goes when the runtime closes; it stays while the thread is stopped for the
            # length of a fork (it starts again on the same path after it).
            server.close()
            if self._closing:
                self._remove()

    def _answer(self, server: socket.socket) -> None:
        try:
            conn, _ = server.accept()
        except OSError:
            return
        with conn:
            try:
                conn.settimeout(_TIMEOUT)
                if not _same_user(conn):
                    return  # another user's process: no answer
                request = conn.recv(64)
                if request != REQUEST:
                    return
                body = json.dumps(_live.snapshot(self.runtime)).encode()
                conn.sendall(body)
            except OSError:
                return

    def _remove(self) -> None:
        path = self.path
        if path is not None and os.getpid() == self._pid:
            self.path = None
            with contextlib.suppress(OSError):
                os.unlink(path)

    def close(self) -> None:
        self._closing = True
        self.worker.stop(timeout=5.0)  # (the thread removes the file as it ends)
        discard(self.worker)
        if self.path is not None and not self.worker.running:
            self._remove()  # the thread never ran or could not end: done here
        atexit.unregister(self._remove)
        for sock in (self._wake_r, self._wake_w):
            sock.close()

    def after_fork_in_child(self) -> None:
        """The parent's socket stays the parent's: the child serves its own from its first
        watched loop (the worker starts with the loop's others)."""
        self.path = None
        self._wake_r.close()
        self._wake_w.close()
        self._wake_r, self._wake_w = socket.socketpair()


def _remove_stale(private: str) -> None:
    """Sockets of processes that are gone (killed before they could remove their own)."""
    for name in os.listdir(private):
        pid = name.removesuffix(".sock")
        if not pid.isdigit() or not name.endswith(".sock"):
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(private, name))
        except OSError:
            continue


def _same_user(conn: socket.socket) -> bool:
    if sys.platform != "linux":  # pragma: no cover - SO_PEERCRED is Linux's
        return True  # the directory's mode 0700 keeps others out
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _, uid, _ = struct.unpack("3i", creds)
    return bool(uid == os.getuid())


def read(pid: int, timeout: float = _TIMEOUT) -> Any:
    """The snapshot process ``pid`` serves (``OSError`` if it cannot be read)."""
    path = socket_path(pid)
    if path is None:
        raise FileNotFoundError(pid)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        for attempt in range(10):
            try:
                sock.connect(path)
                break
            except ConnectionRefusedError:
                # Nobody listens: the process is gone, or its thread is stopped for a fork.
                if attempt == 9:
                    raise
                time.sleep(0.1)
        sock.sendall(REQUEST)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return json.loads(b"".join(chunks))
