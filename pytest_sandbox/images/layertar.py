"""Layer tars: a deterministic writer, its digest, and a hostile-input-safe extractor.

A stored layer is an *overlay-format directory* (what overlayfs wants as a lower layer): a
whiteout is a character device 0:0 with the deleted name, an opaque directory carries the xattr
``trusted.overlay.opaque=y``.  A layer *tar* (OCI image-spec "layer", ``docker save``) says the
same with names instead: ``DIR/.wh.NAME`` deletes ``NAME``, ``DIR/.wh..wh..opq`` hides the lower
contents of ``DIR``.  This module maps one onto the other, both ways.

* :func:`write_layer_tar` writes a directory as a tar that depends only on the tree: entries
  sorted by name (parents first), PAX format, numeric ids with empty user and group names, whole
  second mtimes, xattrs (not ``trusted.*`` nor ``user.overlay.*``: what the extractor would
  drop) as ``SCHILY.xattr.*`` records, no padding to a record size.  Its sha256 is the layer's
  OCI ``diff_id``; :func:`digest_dir` computes just that.
* :func:`extract_layer_tar` unpacks a plain or gzip tar into an empty directory and returns the
  ``diff_id`` of the uncompressed bytes.  The tar is parsed here, not by :mod:`tarfile`, so that
  every header is bounded (1 MiB for PAX and GNU long-name data, as Go's archive/tar) and every
  name is checked before it touches the disk.  Paths are resolved one component at a time from
  a descriptor of the destination with ``O_NOFOLLOW``: a symlink is never followed on the host,
  so a layer cannot write, link or create anything outside the destination (absolute names are
  read relative to it, as docker does).  Refused with a
  :class:`~pytest_sandbox.core.errors.LayerTarError` naming the entry: ``..`` components, NUL or
  newline in a name, writes through a symlink (or a non-directory), hardlinks to anything but
  an earlier entry of the same tar, device nodes other than whiteouts, bare or
  malformed whiteouts (``.wh.``, ``.wh..``, a ``.wh.`` directory), AUFS metadata, sparse files,
  oversized headers, bad checksums, truncated archives, mtimes no ``time_t`` holds and malformed
  xattr names.  On error the destination holds a partial tree: the caller removes it (it made
  the directory).
* Kept as the tar says, as docker and containerd keep them: ownership, setuid/setgid/sticky bits
  and ``security.*`` xattrs (file capabilities) -- an image's ``su`` or ``ping`` needs them.  A
  layer is therefore as dangerous as any setuid program: the store keeps its root 0700 so that
  no other host user can reach one (moby's CVE-2021-41091).  Never taken from a tar: ``trusted.*``
  xattrs, among them overlayfs' own (``trusted.overlay.*``, and ``user.overlay.*``, which
  overlayfs reads instead when mounted with ``userxattr``): a layer cannot forge an opaque
  directory, a redirect or a metacopy.
* Depth costs neither fds nor recursion: at most :data:`MAX_OPEN_DIRS` directories are held open
  (deeper ones are reached again by name, or by ``..`` with an identity check), and trees are
  removed iteratively, so a 2,047-level layer (all PATH_MAX allows) extracts and writes under a
  256-fd limit.  Memory is bounded too (1 MiB reads); the uncompressed size is not: like docker,
  a layer may fill the disk, which is reported as the host's ENOSPC.

Whiteouts follow the image spec: they hide entries of *lower* layers only.  A whiteout for a name
this layer also creates (before or after it) therefore makes that directory opaque, and a file or
directory that replaces a whiteout in the same layer simply takes its place.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import BinaryIO

from ..core.errors import InvalidSpecError, LayerTarError
from ..host.fstree import DIR_FLAGS, Frame, close_frames, reopen_parent
from .extractor import extract_layer_tar
from .manifest import HashingWriter, LayerDigest
from .tarformat import (
    BLOCK,
    BLOCKDEV,
    CHAR,
    CHUNK,
    DIR,
    FIFO,
    HARDLINK,
    MAX_OPEN_DIRS,
    OPAQUE_MARKER,
    OPAQUE_XATTR,
    REGULAR,
    SYMLINK,
    WHITEOUT_PREFIX,
    carried_xattr,
    emit,
    is_whiteout,
    pad,
    tar_files,
)

__all__ = [
    "MAX_OPEN_DIRS",
    "LayerDigest",
    "digest_dir",
    "extract_layer_tar",
    "tar_files",
    "write_layer_tar",
]


def write_layer_tar(src_dir: str, out: BinaryIO) -> LayerDigest:
    """Write overlay-format directory ``src_dir`` to ``out`` as a deterministic OCI layer tar.

    The same tree (names, contents, modes, ids, whole-second mtimes, xattrs) always gives the same
    bytes.  Whiteouts become ``.wh.NAME`` entries, opaque directories a ``DIR/.wh..wh..opq``
    entry; the root directory itself is not an entry (as in ``docker save``).
    """
    sink = HashingWriter(out)
    _write_tree(src_dir, sink)
    return sink.digest()


def digest_dir(src_dir: str) -> LayerDigest:
    """The ``diff_id`` and size :func:`write_layer_tar` would produce, without keeping the tar."""
    sink = HashingWriter(None)
    _write_tree(src_dir, sink)
    return sink.digest()


def _xattrs(target: int | str) -> dict[str, bytes]:
    """The xattrs to carry in a tar (never overlayfs' own); ``target`` is an fd or a /proc path."""
    follow = isinstance(target, int)
    try:
        names = os.listxattr(target, follow_symlinks=follow)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
            return {}
        raise
    return {n: os.getxattr(target, n, follow_symlinks=follow) for n in names if carried_xattr(n)}


def _sorted_names(fd: int) -> list[bytes]:
    return sorted(os.fsencode(n) for n in os.listdir(fd))


def _write_tree(src_dir: str, sink: HashingWriter) -> None:
    try:
        root = os.open(src_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise InvalidSpecError(
            f"layer directory {src_dir!r}: {e.strerror}", hint="pass an existing, readable directory"
        ) from None
    _TreeWriter(src_dir, sink).run(root)
    sink.write(b"\0" * (2 * BLOCK))


class _TreeWriter:
    """One walk of :func:`_write_tree`: entries sorted by name, parents first.

    At most :data:`MAX_OPEN_DIRS` directories are held open: a frame deeper down lets its
    parent's fd go (-1), and the parent is reopened through ``..`` on the way back up, its
    identity checked (a directory moved meanwhile is an error, not a wrong tar).
    """

    def __init__(self, src_dir: str, sink: HashingWriter) -> None:
        self.src_dir = src_dir
        self.sink = sink
        self.links: dict[tuple[int, int], bytes] = {}
        self.stack: list[Frame[bytes]] = []

    def run(self, root: int) -> None:
        try:
            self.stack.append(Frame(root, b"", os.fstat(root), iter(_sorted_names(root))))
        except BaseException:
            os.close(root)
            raise
        try:
            while self.stack:
                self._step()
        finally:
            close_frames(self.stack)

    def _step(self) -> None:
        top = self.stack[-1]
        name = next(top.names, None)
        if name is None:
            self._leave(top)
            return
        path = top.rel + name
        st = os.stat(name, dir_fd=top.fd, follow_symlinks=False)
        if name.startswith(WHITEOUT_PREFIX):
            raise LayerTarError(
                f"layer directory {self.src_dir!r}: {os.fsdecode(path)!r} starts with '.wh.', which in a "
                "layer tar means a deletion",
                hint="rename the file; deletions in a layer directory are character devices 0:0",
            )
        self._entry(top, name, path, st)

    def _leave(self, top: Frame[bytes]) -> None:
        """Done with ``top``: climb back to its parent, reopening it if it was let go."""
        self.stack.pop()
        try:
            parent = self.stack[-1] if self.stack else None
            if parent is not None and parent.fd < 0:
                fd = reopen_parent(parent, top.fd)
                if fd is None:
                    raise LayerTarError(
                        f"layer directory {self.src_dir!r}: {os.fsdecode(parent.rel)!r} changed while "
                        "the layer was written",
                        hint="do not modify a layer directory while it is stored or exported",
                    )
                parent.fd = fd
        finally:
            top.close()

    def _entry(self, top: Frame[bytes], name: bytes, path: bytes, st: os.stat_result) -> None:
        sink, fd, mode = self.sink, top.fd, st.st_mode
        if stat.S_ISDIR(mode):
            self._enter_dir(top, name, path, st)
        elif stat.S_ISREG(mode):
            key = (st.st_dev, st.st_ino)
            if st.st_nlink > 1 and key in self.links:
                emit(sink, path, st, HARDLINK, linkname=self.links[key])
                return
            if st.st_nlink > 1:
                self.links[key] = path
            _write_file(sink, fd, name, path, st)
        elif stat.S_ISLNK(mode):
            target = os.fsencode(os.readlink(name, dir_fd=fd))
            emit(sink, path, st, SYMLINK, linkname=target)
        elif is_whiteout(st):
            emit(sink, top.rel + WHITEOUT_PREFIX + name, st, REGULAR[0], mode=mode & 0o777)
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode):
            typeflag = CHAR if stat.S_ISCHR(mode) else BLOCKDEV if stat.S_ISBLK(mode) else FIFO
            proc = f"/proc/self/fd/{fd}/{os.fsdecode(name)}"
            emit(sink, path, st, typeflag, xattrs=_xattrs(proc))
        # sockets are not content (as docker save): skipped

    def _enter_dir(self, top: Frame[bytes], name: bytes, path: bytes, st: os.stat_result) -> None:
        sub = os.open(name, DIR_FLAGS, dir_fd=top.fd)
        try:
            xattrs = _xattrs(sub)
            opaque = _opaque(sub)
            children = _sorted_names(sub)
        except BaseException:
            os.close(sub)
            raise
        if len(self.stack) >= max(MAX_OPEN_DIRS, 2):  # hold the first levels (and root) and the deepest
            os.close(top.fd)
            top.fd = -1
        self.stack.append(Frame(sub, path + b"/", st, iter(children)))
        emit(self.sink, path + b"/", st, DIR, xattrs=xattrs)
        if opaque:
            emit(self.sink, path + b"/" + OPAQUE_MARKER, st, REGULAR[0], mode=st.st_mode & 0o777)


def _opaque(fd: int) -> bool:
    try:
        return os.getxattr(fd, OPAQUE_XATTR) == b"y"
    except OSError:
        return False


def _write_file(sink: HashingWriter, dir_fd: int, name: bytes, path: bytes, st: os.stat_result) -> None:
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=dir_fd)
    try:
        fst = os.fstat(fd)
        if not stat.S_ISREG(fst.st_mode):
            raise LayerTarError(f"{os.fsdecode(path)!r} changed while the layer was written")
        size = fst.st_size
        emit(sink, path, fst, REGULAR[0], size=size, xattrs=_xattrs(fd))
        left = size
        while left:
            data = os.read(fd, min(left, CHUNK))
            if not data:
                break
            sink.write(data)
            left -= len(data)
        if left or os.read(fd, 1):
            raise LayerTarError(
                f"{os.fsdecode(path)!r} changed size while the layer was written",
                hint="do not modify a layer directory while it is stored or exported",
            )
        sink.write(pad(size))
    finally:
        os.close(fd)
