"""The store's snapshot cache: a directory's (or file's) digest, remembered against its stat snapshot.

Reusing an unchanged directory reads no file contents: its digest is kept in
``cache/dirs/<key>.json`` with the :func:`~pytest_sandbox.host.fstree.stat_snapshot` it was
computed under, and is good for as long as the snapshot is the same.  A digest is remembered
only if the snapshot did not change while it was computed (a tree being written meanwhile is
not cached).
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Callable

from ..core.errors import InvalidSpecError
from ..core.imagemodel import canonical_json
from ..core.reference import is_digest
from ..host.fstree import file_snapshot, stat_snapshot


def snapshot_of(real: str, st: os.stat_result) -> str:
    """A directory's stat snapshot, or a file's own stat."""
    return stat_snapshot(real) if stat.S_ISDIR(st.st_mode) else file_snapshot(real)


class SnapshotCache:
    """Digests by key (``dir\\0<path>``, ``content\\0<path>``), each valid for one snapshot."""

    def __init__(self, directory: str, write: Callable[[str, bytes], None]) -> None:
        self.directory = directory
        self.write = write  # the store's atomic write (its temporary files are swept if we die)

    def _path(self, key: str) -> str:
        name = hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()
        return os.path.join(self.directory, name + ".json")

    def get(self, key: str, snap: str) -> str | None:
        try:
            with open(self._path(key), "rb") as f:
                data = json.load(f)
        except (OSError, ValueError):
            return None
        digest = data.get("digest")
        if data.get("snapshot") != snap or not isinstance(digest, str) or not is_digest(digest):
            return None
        return digest

    def put(self, key: str, snap: str, digest: str) -> None:
        self.write(self._path(key), canonical_json({"key": key, "snapshot": snap, "digest": digest}))

    def content_digest(self, raw: str, real: str, st: os.stat_result, fd: int | None = None) -> str:
        """The digest of a file's or directory's content, from the cache if it is unchanged."""
        key = "content\0" + real
        snap = snapshot_of(real, st)
        hit = self.get(key, snap)
        if hit is not None:
            return hit
        # fd: read that very object (its /proc/self/fd magic link), never the path again.
        digest = _content_digest(raw, real if fd is None else f"/proc/self/fd/{fd}", st)
        if snapshot_of(real, st) == snap:
            self.put(key, snap, digest)
        return digest


def _content_digest(raw: str, real: str, st: os.stat_result) -> str:
    from .layertar import digest_dir  # late: layertar's, looked up when called

    if stat.S_ISDIR(st.st_mode):
        return digest_dir(real).diff_id
    if stat.S_ISREG(st.st_mode):
        h = hashlib.sha256(f"{stat.S_IMODE(st.st_mode):o}\0".encode())
        # O_NONBLOCK: a FIFO swapped in after the stat must not block the open (a hung pytest);
        # then fstat: only the regular file that was stat'ed is read (not /dev/zero, forever).
        fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            now = os.fstat(fd)
            if not stat.S_ISREG(now.st_mode) or (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
                raise InvalidSpecError(f"{raw!r}: changed while it was read; copy it again")
            while chunk := os.read(fd, 1 << 20):
                h.update(chunk)
        finally:
            os.close(fd)
        return "sha256:" + h.hexdigest()
    raise InvalidSpecError(f"{raw!r}: only files and directories can be copied into an image")
