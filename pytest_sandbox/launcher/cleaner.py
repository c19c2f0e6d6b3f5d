"""The launcher's cleaner: state directories deleted in a child, off the launcher's loop (stdlib only)."""

from __future__ import annotations

import contextlib
import os
import signal
import sys

from ..host import libc
from ..host.cleanup import remove_tree
from ..host.rootfs import empty_held_writable


class Cleaner:
    """A child process that deletes state directories, off the launcher's critical path.

    Deleting a container's upper layer can take a millisecond or (after a test wrote 10,000 files)
    far more; done in the launcher's loop it would delay the next container's start.  Requests
    and completions are lines on two pipes; the launcher answers ``remove`` when a line comes back.
    If the cleaner is gone or its pipe is full, :meth:`submit` says so and the launcher deletes the
    directory itself; if it dies with requests pending, :meth:`take_back` returns them.
    """

    def __init__(self, keep: set[int]) -> None:
        req_r, self._req_w = os.pipe()
        self.done_fd, done_w = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:
            try:
                signal.set_wakeup_fd(-1)
                libc.close_fds_except({req_r, done_w, 2} | keep)
                libc.set_process_name("psbx-cleaner")
                for line in os.fdopen(req_r, "r"):
                    token, _, path = line.rstrip("\n").partition(" ")
                    empty_writable_quietly(path)
                    remove_quietly(path)
                    os.write(done_w, f"{token}\n".encode())
            finally:
                os._exit(0)
        os.close(req_r)
        os.close(done_w)
        os.set_blocking(self._req_w, False)  # a full pipe must not stall the launcher's loop
        self._waiting: dict[int, tuple[str, list[int]]] = {}
        self._serial = 0
        self._buf = b""
        self.alive = True

    def submit(self, path: str, rids: list[int]) -> bool:
        """Queue ``path`` for deletion; False if the cleaner cannot take it now."""
        if not self.alive:
            return False
        self._serial += 1
        try:
            os.write(self._req_w, f"{self._serial} {path}\n".encode())
        except (BlockingIOError, BrokenPipeError):
            return False
        self._waiting[self._serial] = (path, list(rids))
        return True

    def done(self) -> list[tuple[str, list[int]]] | None:
        """The paths and rids of finished deletions; None once the cleaner has exited."""
        data = os.read(self.done_fd, 65536)
        if not data:
            self.alive = False
            return None
        self._buf += data
        *lines, self._buf = self._buf.split(b"\n")
        return [self._waiting.pop(int(token), ("", [])) for token in lines if token]

    def take_back(self) -> list[tuple[str, list[int]]]:
        """What a dead cleaner had not confirmed."""
        pending, self._waiting = list(self._waiting.values()), {}
        return pending

    def close(self) -> None:
        """Let it finish what was asked, then wait for it."""
        os.close(self._req_w)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)


def empty_writable_quietly(path: str) -> None:
    """Empty a state directory's writable tmpfs (see rootfs.empty_held_writable); never raises."""
    try:
        empty_held_writable(path)
    except Exception as e:  # the launcher's close frees it anyway, only more slowly
        print(f"psbx-launcher: cannot empty the writable layer of {path}: {e!r}", file=sys.stderr)


def remove_quietly(path: str) -> None:
    """Delete a state directory; a failure is logged, never raised (the launcher must go on)."""
    try:
        remove_tree(path)
    except Exception as e:  # anything: the next session's sweep retries
        print(f"psbx-launcher: cannot remove {path}: {e!r}", file=sys.stderr)
