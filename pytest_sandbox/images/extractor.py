"""Extracting a layer tar into an overlay-format directory, safely (see :mod:`.layertar`).

Paths are resolved one component at a time from a descriptor of the destination with
``O_NOFOLLOW``: a symlink is never followed on the host, so a layer cannot write, link or create
anything outside the destination.  Every refusal is a
:class:`~pytest_sandbox.core.errors.LayerTarError` naming the entry.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import BinaryIO

from ..core.errors import InvalidSpecError, LayerTarError
from ..host.cleanup import remove_tree_at
from ..host.fstree import DIR_FLAGS
from .manifest import LayerDigest
from .tarformat import (
    BLOCK,
    BLOCKDEV,
    CHAR,
    CHUNK,
    DIR,
    FIFO,
    HARDLINK,
    HINT,
    MAX_OPEN_DIRS,
    MAX_PATH,
    OPAQUE_MARKER,
    OPAQUE_XATTR,
    REGULAR,
    SYMLINK,
    WHITEOUT_META_PREFIX,
    WHITEOUT_PREFIX,
    Entry,
    Reader,
    carried_xattr,
    components,
    decompressed,
    entries,
    is_whiteout,
)

# Failures of the machine, not of the tar: reported as they are.
_HOST_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EMFILE, errno.ENFILE, errno.ENOMEM}


def _refuse_type(entry: Entry) -> None:
    if entry.typeflag in (CHAR, BLOCKDEV):
        kind = "character" if entry.typeflag == CHAR else "block"
        raise LayerTarError(
            f"layer tar entry {entry.shown!r} is a {kind} device {entry.devmajor}:{entry.devminor}; "
            "device nodes in layers are refused",
            hint="remove device nodes from the image; a container gets its /dev from the runtime",
        )
    raise LayerTarError(
        f"layer tar entry {entry.shown!r} has an unsupported type {entry.typeflag!r}", hint=HINT
    )


class _Extractor:
    """Applies entries to the destination, resolving every path from its descriptor."""

    def __init__(self, root: int, reader: Reader) -> None:
        self.root = root
        self.reader = reader
        # the directory chain of the last entry: (name, fd), fd -1 where not held open
        self.stack: list[tuple[bytes, int]] = []
        self.dir_times: dict[tuple[bytes, ...], int] = {}
        self.linkable: set[tuple[bytes, ...]] = set()

    def close(self) -> None:
        for _, fd in self.stack:
            if fd >= 0:
                os.close(fd)
        self.stack = []

    # -- resolution ---------------------------------------------------------------------------

    def _open_child_dir(self, parent: int, name: bytes, entry: Entry) -> int:
        """``parent/name`` as a directory fd, made if missing; never through a symlink."""
        try:
            return os.open(name, DIR_FLAGS, dir_fd=parent)
        except FileNotFoundError:
            os.mkdir(name, 0o755, dir_fd=parent)
            return os.open(name, DIR_FLAGS, dir_fd=parent)
        except OSError as e:
            if e.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise
        st = os.stat(name, dir_fd=parent, follow_symlinks=False)
        if is_whiteout(st):  # a deletion earlier in this layer, now a directory again
            os.unlink(name, dir_fd=parent)
            os.mkdir(name, 0o755, dir_fd=parent)
            fd = os.open(name, DIR_FLAGS, dir_fd=parent)
            os.setxattr(fd, OPAQUE_XATTR, b"y")
            return fd
        shown = name.decode("utf-8", "backslashreplace")
        if stat.S_ISLNK(st.st_mode):
            raise LayerTarError(
                f"layer tar entry {entry.shown!r}: {shown!r} is a symlink in this layer, and writing "
                "through it is refused (it could point outside the layer)",
                hint="a layer must name the real path of each entry, not a path through a symlink",
            )
        raise LayerTarError(
            f"layer tar entry {entry.shown!r}: {shown!r} is not a directory in this layer", hint=HINT
        )

    def _dir(self, parts: list[bytes], entry: Entry) -> int:
        """The fd of directory ``parts`` (made if missing), reusing the open chain of the last entry."""
        keep = 0
        while keep < len(self.stack) and keep < len(parts) and self.stack[keep][0] == parts[keep]:
            keep += 1
        while keep and self.stack[keep - 1][1] < 0:  # not held open: walk again from one that is
            keep -= 1
        for _, fd in self.stack[keep:]:
            if fd >= 0:
                os.close(fd)
        del self.stack[keep:]
        current = self.stack[-1][1] if self.stack else self.root
        for part in parts[keep:]:
            fd = self._open_child_dir(current, part, entry)
            if len(self.stack) > MAX_OPEN_DIRS:  # hold the first levels and the last one only
                name, held = self.stack[-1]
                os.close(held)
                self.stack[-1] = (name, -1)
            self.stack.append((part, fd))
            current = fd
        return current

    def _lstat(self, parent: int, name: bytes) -> os.stat_result | None:
        try:
            return os.stat(name, dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def _clear(self, parent: int, name: bytes, st: os.stat_result | None) -> None:
        if st is None:
            return
        if stat.S_ISDIR(st.st_mode):
            remove_tree_at(parent, name)  # iterative: a layer may nest 2,000 levels
        else:
            os.unlink(name, dir_fd=parent)

    # -- entries ------------------------------------------------------------------------------

    def run(self) -> None:
        for entry in entries(self.reader):
            data_left = entry.size if entry.typeflag in REGULAR else 0
            try:
                data_left = self._apply(entry, data_left)
            except LayerTarError:
                raise
            except OSError as e:
                # EPERM without root: chown/mknod/setxattr of a valid entry (the store says so).
                if e.errno in _HOST_ERRNOS or (e.errno == errno.EPERM and os.geteuid() != 0):
                    raise
                raise LayerTarError(
                    f"layer tar entry {entry.shown!r} cannot be extracted: {e.strerror or e}", hint=HINT
                ) from None
            except (ValueError, OverflowError) as e:  # a value the OS interface cannot take
                raise LayerTarError(
                    f"layer tar entry {entry.shown!r} cannot be extracted: {e}", hint=HINT
                ) from None
            if data_left:
                self._skip(data_left)
            if entry.typeflag in REGULAR:
                # umoci 0.4 ends its layers without padding or end blocks: a short pad is the end
                self.reader.read(-entry.size % BLOCK)
        self.close()
        for parts, mtime_ns in sorted(self.dir_times.items(), key=lambda kv: -len(kv[0])):
            fd = self._dir(list(parts), Entry(b"/".join(parts), DIR, 0, 0, 0, 0, 0, b"", 0, 0, {}))
            os.utime(fd, ns=(mtime_ns, mtime_ns))
        self.close()

    def _skip(self, n: int) -> None:
        while n:
            got = len(self.reader.exact(min(n, CHUNK), "entry data"))
            n -= got

    def _apply(self, entry: Entry, data_left: int) -> int:
        """Apply one entry; return how many of its data bytes are still unread."""
        parts = components(entry.name, entry.shown)
        for part in parts[:-1]:
            if part.startswith(WHITEOUT_PREFIX):
                raise LayerTarError(
                    f"layer tar entry {entry.shown!r}: a whiteout name ({part.decode(errors='replace')!r}) "
                    "used as a directory is malformed",
                    hint=HINT,
                )
        if not parts:
            self._apply_root(entry)
        elif parts[-1].startswith(WHITEOUT_PREFIX):
            self._whiteout(entry, parts)
        else:
            parent = self._dir(parts[:-1], entry)
            existing = self._lstat(parent, parts[-1])
            self.linkable.discard(tuple(parts))
            if entry.typeflag == DIR:
                self._apply_dir(entry, parent, tuple(parts), existing)
            else:
                data_left = self._apply_non_dir(entry, parent, tuple(parts), existing, data_left)
        return data_left

    def _apply_root(self, entry: Entry) -> None:
        if entry.typeflag != DIR:
            raise LayerTarError(
                f"layer tar entry {entry.shown!r} names the layer root but is not a directory "
                "(a symlink there would redirect every later entry)",
                hint=HINT,
            )
        self._set_dir_meta(self.root, (), entry)

    def _apply_dir(
        self, entry: Entry, parent: int, key: tuple[bytes, ...], existing: os.stat_result | None
    ) -> None:
        base = key[-1]
        if existing is not None and stat.S_ISDIR(existing.st_mode):
            fd = os.open(base, DIR_FLAGS, dir_fd=parent)
        else:
            was_whiteout = existing is not None and is_whiteout(existing)
            self._clear(parent, base, existing)
            os.mkdir(base, 0o700, dir_fd=parent)
            fd = os.open(base, DIR_FLAGS, dir_fd=parent)
            if was_whiteout:
                os.setxattr(fd, OPAQUE_XATTR, b"y")
        try:
            self._set_dir_meta(fd, key, entry)
        finally:
            os.close(fd)

    def _apply_non_dir(
        self,
        entry: Entry,
        parent: int,
        key: tuple[bytes, ...],
        existing: os.stat_result | None,
        data_left: int,
    ) -> int:
        """A file, link or node replaces whatever this layer had at its name."""
        base = key[-1]
        if existing is not None and stat.S_ISDIR(existing.st_mode):
            self._forget_dir(key)
        self._clear(parent, base, existing)
        typeflag = entry.typeflag
        if typeflag in REGULAR:
            data_left = self._write_regular(entry, parent, base, data_left)
        elif typeflag == SYMLINK:
            if b"\0" in entry.linkname or not entry.linkname or len(entry.linkname) > MAX_PATH:
                raise LayerTarError(f"layer tar entry {entry.shown!r}: malformed symlink target", hint=HINT)
            os.symlink(entry.linkname, base, dir_fd=parent)
            os.chown(base, entry.uid, entry.gid, dir_fd=parent, follow_symlinks=False)
            os.utime(base, ns=(entry.mtime_ns, entry.mtime_ns), dir_fd=parent, follow_symlinks=False)
        elif typeflag == HARDLINK:
            self._hardlink(entry, parent, base)
        elif typeflag == FIFO:
            os.mkfifo(base, 0o600, dir_fd=parent)
            self._set_node_meta(parent, base, entry)
        elif typeflag == CHAR and entry.devmajor == 0 and entry.devminor == 0:
            os.mknod(base, stat.S_IFCHR | 0o600, 0, dir_fd=parent)  # already overlay format
            self._set_node_meta(parent, base, entry)
            return data_left  # a whiteout: nothing can link to it
        else:
            _refuse_type(entry)
        self.linkable.add(key)
        return data_left

    def _forget_dir(self, key: tuple[bytes, ...]) -> None:
        """The directory ``key`` and all it held are gone: forget their times and link targets."""
        self.dir_times.pop(key, None)
        for sub in [k for k in self.dir_times if k[: len(key)] == key]:
            del self.dir_times[sub]
        self.linkable -= {k for k in self.linkable if k[: len(key)] == key}

    def _write_regular(self, entry: Entry, parent: int, base: bytes, data_left: int) -> int:
        fd = os.open(
            base,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
            dir_fd=parent,
        )
        try:
            size = data_left
            while data_left:
                data = self.reader.exact(min(data_left, CHUNK), f"entry {entry.shown!r}")
                data_left -= len(data)
                if data.count(0) == len(data):  # zeros: a hole (a tar stores a sparse file dense)
                    os.lseek(fd, len(data), os.SEEK_CUR)
                    continue
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
            os.ftruncate(fd, size)  # the file's length, after a trailing hole
            os.fchown(fd, entry.uid, entry.gid)
            os.fchmod(fd, entry.mode)
            self._set_xattrs(fd, entry)
            os.utime(fd, ns=(entry.mtime_ns, entry.mtime_ns))
        finally:
            os.close(fd)
        return data_left

    def _set_node_meta(self, parent: int, base: bytes, entry: Entry) -> None:
        # The node was just made by us in a directory only we write: following is not possible.
        os.chown(base, entry.uid, entry.gid, dir_fd=parent, follow_symlinks=False)
        os.chmod(base, entry.mode & 0o777, dir_fd=parent)
        os.utime(base, ns=(entry.mtime_ns, entry.mtime_ns), dir_fd=parent, follow_symlinks=False)

    def _set_dir_meta(self, fd: int, key: tuple[bytes, ...], entry: Entry) -> None:
        os.fchown(fd, entry.uid, entry.gid)
        os.fchmod(fd, entry.mode)
        self._set_xattrs(fd, entry)
        self.dir_times[key] = entry.mtime_ns

    def _set_xattrs(self, fd: int, entry: Entry) -> None:
        for name, value in entry.xattrs.items():
            if not carried_xattr(name):
                continue  # never take overlayfs' (or any trusted) metadata from a tar
            try:
                os.setxattr(fd, name, value)
            except OSError as e:
                if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
                    continue
                raise LayerTarError(
                    f"layer tar entry {entry.shown!r}: xattr {name!r} cannot be set: {e.strerror}",
                    hint=HINT,
                ) from None

    def _hardlink(self, entry: Entry, parent: int, base: bytes) -> None:
        target = components(entry.linkname, entry.shown, "hardlink target")
        if tuple(target) not in self.linkable:
            raise LayerTarError(
                f"layer tar entry {entry.shown!r}: hardlink to "
                f"{entry.linkname.decode('utf-8', 'backslashreplace')!r}, which is not an earlier file "
                "of this layer, is refused",
                hint="a hardlink in a layer must point to a file the same layer tar wrote before it",
            )
        tparent = self.root
        opened: list[int] = []
        try:
            for part in target[:-1]:
                tparent = os.open(part, DIR_FLAGS, dir_fd=tparent)
                opened.append(tparent)
            os.link(target[-1], base, src_dir_fd=tparent, dst_dir_fd=parent, follow_symlinks=False)
        finally:
            for fd in opened:
                os.close(fd)

    def _whiteout(self, entry: Entry, parts: list[bytes]) -> None:
        base = parts[-1]
        if entry.typeflag not in REGULAR and entry.typeflag != HARDLINK:
            raise LayerTarError(
                f"layer tar entry {entry.shown!r}: a whiteout must be an empty regular file", hint=HINT
            )
        if base == OPAQUE_MARKER:
            if len(parts) == 1:
                raise LayerTarError(
                    f"layer tar entry {entry.shown!r}: an opaque whiteout of the layer root is not "
                    "supported (overlayfs cannot hide a lower root)",
                    hint="build the image without a root-level .wh..wh..opq",
                )
            fd = self._dir(parts[:-1], entry)
            os.setxattr(fd, OPAQUE_XATTR, b"y")
            return
        if base.startswith(WHITEOUT_META_PREFIX):
            raise LayerTarError(
                f"layer tar entry {entry.shown!r}: AUFS metadata (.wh..wh.*) is not supported", hint=HINT
            )
        name = base[len(WHITEOUT_PREFIX) :]
        if not name or name in (b".", b".."):
            raise LayerTarError(
                f"layer tar entry {entry.shown!r} is a malformed whiteout (it names "
                f"{'nothing' if not name else repr(name.decode())}); a bare '.wh.' would delete its "
                "whole parent directory",
                hint=HINT,
            )
        parent = self._dir(parts[:-1], entry)
        existing = self._lstat(parent, name)
        if existing is None or is_whiteout(existing):
            if existing is not None:
                os.unlink(name, dir_fd=parent)
            os.mknod(name, stat.S_IFCHR | 0o600, 0, dir_fd=parent)
            self._set_node_meta(parent, name, entry)
            self.linkable.discard((*parts[:-1], name))
        elif stat.S_ISDIR(existing.st_mode):
            # this layer's own directory of that name stays; the lower one is hidden
            fd = os.open(name, DIR_FLAGS, dir_fd=parent)
            try:
                os.setxattr(fd, OPAQUE_XATTR, b"y")
            finally:
                os.close(fd)
        # a non-directory of this layer already hides the lower entry


def extract_layer_tar(stream: BinaryIO, dest_dir: str) -> LayerDigest:
    """Unpack a plain or gzip layer tar into the empty directory ``dest_dir``, in overlay format.

    Returns the ``diff_id`` (sha256 of the uncompressed tar, read to its end) and its size.
    Hostile or malformed input raises :class:`~pytest_sandbox.core.errors.LayerTarError` naming the
    entry; ``dest_dir`` then holds a partial tree, which the caller removes.
    """
    try:
        root = os.open(dest_dir, DIR_FLAGS)
    except OSError as e:
        raise InvalidSpecError(
            f"extraction target {dest_dir!r}: {e.strerror}", hint="pass an empty directory you created"
        ) from None
    try:
        if os.listdir(root):
            raise InvalidSpecError(
                f"extraction target {dest_dir!r} is not empty", hint="extract each layer into a new directory"
            )
        reader = Reader(decompressed(stream))
        extractor = _Extractor(root, reader)
        try:
            extractor.run()
        finally:
            extractor.close()
        reader.drain()
        return reader.digest()
    finally:
        os.close(root)
