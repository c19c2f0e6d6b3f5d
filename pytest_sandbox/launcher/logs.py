"""Container output: pipes in, capped and rotated files out; every read bounded (stdlib only).

Why pipes: a container that held its log file open could do anything a file allows --
``ftruncate(1, 1 << 40)`` made a 1 TiB sparse log at no cost to it, and reading it back took
pytest down (issue 9, item 2).  So a command's stdout and stderr are the write ends of pipes; the
launcher holds the read ends and copies what comes into files it alone opens (:class:`LogPipe`, in
its single-threaded loop), as Docker's json-file driver does with ``log-opts``: a file reaching
``max_size`` bytes is rotated (``stdout`` -> ``stdout.1`` ...), at most ``max_file`` files are
kept (with ``max_file=1`` the file starts over), the oldest is deleted.

The loop stays fair: a ready pipe gets one read of :data:`CHUNK` bytes per turn, so a chatty
container waits for its turn (its writes block on the full pipe) and cannot starve the other
containers or the socket.  A write error (a full disk: ENOSPC) drops the data, counted, and the
pipe is still drained: nothing waits on the disk.

The readers (pytest's side: :func:`read_tail`, :class:`LogFollower`) never read more than they
are asked for, whatever size a file claims.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
from typing import NamedTuple

CHUNK = 1 << 16  # one pipe's worth (the default pipe size): one read per ready pipe per loop turn
DRAIN_BUDGET = 1 << 20  # at an exit: what is in the pipe, and no more than this from late writers
DEFAULT_MAX_SIZE = 64 << 20
DEFAULT_MAX_FILE = 1
MAX_FILES = 100  # more files than this is a typo; each reader walks them all
_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC


class LogLimits(NamedTuple):
    """daemon.json's ``log-opts``: ``max-size`` (bytes per file) and ``max-file`` (files kept)."""

    max_size: int = DEFAULT_MAX_SIZE
    max_file: int = DEFAULT_MAX_FILE


def rotated_paths(path: str, max_file: int) -> list[str]:
    """A stream's files, oldest first: ``path.{max_file-1}`` ... ``path.1``, ``path``."""
    return [f"{path}.{i}" for i in range(max_file - 1, 0, -1)] + [path]


def output_pipes() -> tuple[tuple[int, int], tuple[int, int]]:
    """((stdout read, stderr read), (stdout write, stderr write)); the read ends non-blocking."""
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    os.set_blocking(out_r, False)
    os.set_blocking(err_r, False)
    return (out_r, err_r), (out_w, err_w)


class LogPipe:
    """The read end of one output pipe, copied into a capped, rotated set of files.

    After :meth:`stop_writing` what still comes is read and dropped, until EOF: a background
    process of an exec that still holds the pipe must neither block on it nor get SIGPIPE.
    """

    def __init__(self, fd: int, path: str, limits: LogLimits) -> None:
        self.fd = fd
        self.path = path
        self.limits = limits
        self.size = 0
        self.dropped = 0  # bytes lost to write errors (a full disk)
        self.file = -1
        with contextlib.suppress(OSError):
            self.file = os.open(path, _FILE_FLAGS, 0o644)

    def pump(self) -> bool:
        """One bounded read, written out; False at EOF (the caller closes the pipe) or once closed."""
        if self.fd < 0:
            return False
        try:
            data = os.read(self.fd, CHUNK)
        except BlockingIOError:
            return True
        if data:
            self._write(data)
        return bool(data)

    def drain(self, budget: int = DRAIN_BUDGET) -> bool:
        """Read what the pipe holds now, at most ``budget`` bytes; False at EOF or once closed."""
        while budget > 0 and self.fd >= 0:
            try:
                data = os.read(self.fd, min(CHUNK, budget))
            except BlockingIOError:
                return True
            if not data:
                return False
            self._write(data)
            budget -= len(data)
        return self.fd >= 0

    def stop_writing(self) -> None:
        """Close the file; what comes later is dropped."""
        if self.file >= 0:
            os.close(self.file)
        self.file = -1

    def close(self) -> None:
        self.stop_writing()
        if self.fd >= 0:
            os.close(self.fd)
        self.fd = -1

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view and self.file >= 0:
            if self.size >= self.limits.max_size:
                self._rotate()
                continue
            piece = view[: self.limits.max_size - self.size]
            try:
                written = os.write(self.file, piece)
            except OSError:  # ENOSPC, EIO, EFBIG: never retried, never waited on
                break
            self.size += written
            view = view[written:]
        self.dropped += len(view)

    def _rotate(self) -> None:
        """A fresh file under ``path``, the full one kept as ``path.1`` if ``max_file`` > 1.

        ``path`` always exists (the fresh file is renamed over it), so a reader never finds the
        stream missing; the oldest file is overwritten or unlinked.
        """
        paths = rotated_paths(self.path, self.limits.max_file)
        fresh = self.path + ".next"
        try:
            fd = os.open(fresh, _FILE_FLAGS, 0o644)
        except OSError:
            self.stop_writing()
            return
        try:
            for older, newer in itertools.pairwise(paths[:-1]):  # path.{n-2} -> path.{n-1} ...
                with contextlib.suppress(FileNotFoundError):
                    os.rename(newer, older)
            if len(paths) > 1:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(paths[-2])
                os.link(self.path, paths[-2])
            os.rename(fresh, self.path)
        except OSError:
            os.close(fd)
            self.stop_writing()
            return
        os.close(self.file)
        self.file, self.size = fd, 0


# --------------------------------------------------------------------------------------------
# pytest's side: bounded reads


def _open(path: str) -> int | None:
    try:
        return os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None


def _pread_tail(fd: int, limit: int) -> bytes:
    """At most the last ``limit`` bytes of the file (its size as fstat says it now)."""
    size = os.fstat(fd).st_size
    take = min(size, limit)
    return os.pread(fd, take, size - take) if take > 0 else b""


def read_tail(path: str, limits: LogLimits, limit: int | None = None) -> bytes:
    """The newest ``limit`` bytes of a stream (default: ``max_size``), across its rotated files.

    Newest file first, going back through ``path.1``... until ``limit`` bytes are read.  A
    rotation while this reads (``path`` replaced) starts it over, a few times at most.
    """
    want = limits.max_size if limit is None else limit
    for _ in range(3):
        chunks, rotated = _read_newest_first(path, limits.max_file, want)
        if not rotated:
            break
    return b"".join(reversed(chunks))


def read_logs(directory: str, limits: LogLimits, limit: int | None = None) -> tuple[bytes, bytes]:
    """The newest output of a container's command, stdout and stderr, at most ``limit`` bytes
    of each (default: ``max_size``)."""
    out, err = (read_tail(os.path.join(directory, stream), limits, limit) for stream in ("stdout", "stderr"))
    return out, err


def check_stream(stream: str) -> tuple[str, ...]:
    """``"stdout"``, ``"stderr"`` or ``"both"`` -> the streams it names."""
    if stream not in ("stdout", "stderr", "both"):
        raise ValueError(f"stream={stream!r}: expected 'stdout', 'stderr' or 'both'")
    return ("stdout", "stderr") if stream == "both" else (stream,)


def newest(data: bytes, limit: int | None) -> bytes:
    """The last ``limit`` bytes of ``data`` (all of it for None)."""
    return data if limit is None or limit >= len(data) else data[len(data) - limit :]


def _read_newest_first(path: str, max_file: int, want: int) -> tuple[list[bytes], bool]:
    chunks: list[bytes] = []
    current = _open(path)
    if current is None:
        return chunks, False
    try:
        inode = os.fstat(current).st_ino
        chunks.append(_pread_tail(current, want))
    finally:
        os.close(current)
    for older in reversed(rotated_paths(path, max_file)[:-1]):
        want -= len(chunks[-1])
        fd = _open(older) if want > 0 else None
        if fd is None:
            break
        try:
            chunks.append(_pread_tail(fd, want))
        finally:
            os.close(fd)
    try:
        rotated = os.stat(path).st_ino != inode
    except FileNotFoundError:
        rotated = False
    return chunks, rotated


class LogFollower:
    """Reads a stream's new bytes as they come, into a window of at most ``2 * window`` bytes.

    It starts with the stream's last ``window`` bytes and holds the file open: when the launcher
    rotates it, the rest of the old file is read through that descriptor, then the new one from
    its start.  (What scrolls through more than one whole rotation between two polls is skipped.)
    """

    def __init__(self, path: str, window: int) -> None:
        self.path = path
        self.window = window
        self.fd = _open(path)
        self.text = b""
        self.offset = 0
        if self.fd is not None:
            # One size for both: a second fstat could see bytes written after the read, and the
            # follower would then start past them and never see them.
            size = os.fstat(self.fd).st_size
            take = min(size, window)
            self.text = os.pread(self.fd, take, size - take) if take > 0 else b""
            self.offset = size - take + len(self.text)

    def search(self, regex: re.Pattern[bytes]) -> re.Match[bytes] | None:
        """Read what is new (in pieces of ``window`` bytes); the first match in the window."""
        m = regex.search(self.text)
        while m is None and self._read_more():
            m = regex.search(self.text)
        return m

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
        self.fd = None

    def _read_more(self) -> bool:
        if self.fd is not None:
            piece = os.pread(self.fd, self.window, self.offset)
            if piece:
                self.offset += len(piece)
                self.text = self.text[-self.window :] + piece
                return True
        fresh = _open(self.path)  # nothing new here: has the stream moved on to a new file?
        if fresh is None:
            return False
        if self.fd is not None and os.fstat(fresh).st_ino == os.fstat(self.fd).st_ino:
            os.close(fresh)
            return False
        self.close()
        self.fd, self.offset = fresh, 0
        return True
