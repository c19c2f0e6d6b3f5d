"""An optional timing trace of container starts (stdlib only).

Set ``PYTEST_SANDBOX_TRACE=/path/file`` and every process on a container's start path (client,
launcher, first process, init, command) appends ``<monotonic ns> <pid> <event>`` lines to that
file, so a slow start can be taken apart phase by phase (``bench/trace_report.py`` summarises it).
Disabled, each call is one global lookup and a comparison.
"""

from __future__ import annotations

import contextlib
import os
import time

ENV = "PYTEST_SANDBOX_TRACE"
_fd = -1


def enable(path: str | None = None) -> None:
    """Open the trace file (``$PYTEST_SANDBOX_TRACE`` by default); forked children inherit it."""
    global _fd
    path = path or os.environ.get(ENV)
    if path and _fd < 0:
        _fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)


def fds() -> set[int]:
    """The fd to keep open when a child closes everything else."""
    return {_fd} if _fd >= 0 else set()


def event(name: str) -> None:
    if _fd >= 0:
        with contextlib.suppress(OSError):
            os.write(_fd, f"{time.monotonic_ns()} {os.getpid()} {name}\n".encode())
