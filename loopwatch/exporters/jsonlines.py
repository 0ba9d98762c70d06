"""Publish each event as one JSON object per line, on standard error or appended to a file."""

from __future__ import annotations

import json
import os
import sys
import threading
from typing import IO

from .._config import report
from .._events import Event


class JsonLines:
    name = "json"

    def __init__(self, path: str | None = None) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._file: IO[str] | None = None

    def _stream(self) -> IO[str]:
        if self.path is None:
            return sys.stderr
        if self._file is None:
            # O_APPEND: every line lands at the end, even with other writers or a rotation by
            # truncation; never opened for writing from the start, so nothing is overwritten.
            flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
            fd = os.open(self.path, flags, 0o644)
            self._file = os.fdopen(fd, "a", encoding="utf-8", buffering=1)
        return self._file

    def prepare(self) -> None:
        """Open the file now (the reporter's thread, as it starts), so that a path that cannot be
        written is said at start, not when the first finding is lost: the lines then go to
        standard error."""
        if self.path is None:
            return
        with self._lock:
            try:
                self._stream()
            except OSError as exc:
                report(
                    f"loopwatch: LOOPWATCH_LOG_FILE={self.path} cannot be written "
                    f"({type(exc).__name__}: {exc.strerror or exc}); expected a file this process "
                    "can append to; findings go to standard error instead"
                )
                self.path = None

    def __call__(self, event: Event) -> None:
        line = json.dumps(event.as_dict(), default=str, separators=(",", ":")) + "\n"
        with self._lock:
            stream = self._stream()
            stream.write(line)
            stream.flush()

    def after_fork_in_child(self) -> None:
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None
