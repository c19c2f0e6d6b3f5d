"""Filesystem trees, walked by descriptor: snapshots, copies, and files written atomically.

Every walk here (and the layer tar writer's, :mod:`pytest_sandbox.images.layertar`) is fd-based
and iterative: a directory is opened ``O_NOFOLLOW`` relative to its parent's descriptor, so no
symlink is ever followed on the walked side (a running container cannot redirect a copy of its
upper layer), and depth costs no recursion.  One frame type, :class:`Frame`, is a directory being
walked.

* :func:`stat_snapshot` -- a digest of every entry's stat: "is this tree unchanged?" without
  reading a file's contents (the store's cache key for a directory).
* :func:`copy_tree` / :func:`copy_file_at` -- a tree copied as an overlay layer holds it: modes,
  numeric owners (shifted by an :data:`IdMap`), mtimes, hardlinks, xattrs, whiteouts.
* :class:`AtomicFile` / :func:`write_atomic` -- a file that appears whole or not at all.
* :func:`root_required` -- the error for a copy only root may make (someone else's files).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import stat
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import AnyStr, Generic

from ..core import naming
from ..core.errors import (
    InvalidSpecError,
    LayerNotADirectoryError,
    LayerNotFoundError,
    LayerTooLargeError,
    RootRequiredError,
)
from .cleanup import remove_tree

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_KEEP_OVERLAY_XATTRS = frozenset({"trusted.overlay.opaque"})
_REFUSED_OVERLAY_XATTRS = frozenset({"trusted.overlay.metacopy", "trusted.overlay.redirect"})
_CHUNK = 1 << 20


# -- walking -----------------------------------------------------------------------------------


@dataclass
class Frame(Generic[AnyStr]):
    """A directory being walked.

    ``fd`` is its descriptor (-1 while a walk that bounds its open fds lets it go, see
    :func:`reopen_parent`), ``rel`` its path below the root, ``names`` the entries still to
    visit, ``st`` its stat (identity, owner, mode, times), ``dst`` the descriptor of its twin
    when the walk writes a copy (-1 otherwise).
    """

    fd: int
    rel: AnyStr
    st: os.stat_result
    names: Iterator[AnyStr] = field(default_factory=lambda: iter(()))
    dst: int = -1

    def close(self) -> None:
        for fd in (self.fd, self.dst):
            if fd >= 0:
                os.close(fd)
        self.fd = self.dst = -1


def close_frames(stack: list[Frame[str]] | list[Frame[bytes]]) -> None:
    """Close what the frames of an abandoned walk still hold."""
    for frame in stack:
        frame.close()


def reopen_parent(frame: Frame[AnyStr], child_fd: int) -> int | None:
    """Open ``frame``'s directory again, as the parent (``..``) of the child just walked; None if
    it is no longer that directory (moved meanwhile: its identity differs)."""
    fd = os.open("..", DIR_FLAGS, dir_fd=child_fd)
    st = os.fstat(fd)
    if (st.st_dev, st.st_ino) != (frame.st.st_dev, frame.st.st_ino):
        os.close(fd)
        return None
    return fd


# -- stat snapshots ----------------------------------------------------------------------------


def stat_snapshot(path: str) -> str:
    """A digest of every entry's stat below ``path`` (lstat, never following a symlink).

    Unchanged tree -> same value, without reading any file's contents.  The ctime catches every
    change to an inode (a content write, chmod, chown, xattr, utime -- and cannot be set back),
    the inode number a replacement, the entry list a create, delete or rename.  One fstatat per
    entry is the whole cost (~1.5 us each on a VM with retpolines).
    """
    root = os.open(path, DIR_FLAGS)
    try:
        st = os.fstat(root)
    except BaseException:
        os.close(root)
        raise
    h = hashlib.sha256()
    h.update(repr((st.st_dev, st.st_ino, st.st_mode, st.st_ctime_ns, st.st_mtime_ns)).encode())
    stack = [Frame(root, "", st)]
    try:
        while stack:
            frame = stack.pop()
            try:
                h.update(_snapshot_rows(frame, stack))
            finally:
                frame.close()
    finally:
        close_frames(stack)
    return h.hexdigest()


def _snapshot_rows(frame: Frame[str], stack: list[Frame[str]]) -> bytes:
    """One directory's share of a snapshot; its subdirectories are pushed on ``stack``."""
    rows = []
    for name in os.listdir(frame.fd):
        s = os.stat(name, dir_fd=frame.fd, follow_symlinks=False)
        rows.append((name, s.st_ino, s.st_ctime_ns, s.st_mtime_ns, s.st_size, s.st_mode))
        if stat.S_ISDIR(s.st_mode):
            stack.append(Frame(os.open(name, DIR_FLAGS, dir_fd=frame.fd), f"{frame.rel}/{name}", s))
    rows.sort()
    return repr((frame.rel, rows)).encode("utf-8", "surrogateescape")


def file_snapshot(path: str) -> str:
    s = os.lstat(path)
    return repr((s.st_dev, s.st_ino, s.st_mode, s.st_uid, s.st_gid, s.st_size, s.st_mtime_ns, s.st_ctime_ns))


# -- copying trees -----------------------------------------------------------------------------

IdMap = Callable[[int], int]


OVERFLOW_ID = 65534  # the kernel's default overflowuid/overflowgid: how it shows an unmapped id


def shift_ids(base: int, size: int = naming.ID_RANGE) -> IdMap:
    """Host ids ``base..base+size-1`` back to container ids ``0..size-1``.

    An id below ``size`` outside that range is kept: a lower layer's own id, copied up where the
    layer's filesystem could not be idmapped.  Any other id -- a host user's, another
    container's range -- means nothing in the container (it saw "nobody"): it becomes
    :data:`OVERFLOW_ID`, so a committed layer never carries (or exports) a host id.
    """

    def shift(x: int) -> int:
        if base <= x < base + size:
            return x - base
        return x if x < size else OVERFLOW_ID

    return shift


def _copy_xattrs(src_fd: int, dst_fd: int) -> None:
    try:
        names = os.listxattr(src_fd)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return
        raise
    for name in names:
        if name in _REFUSED_OVERLAY_XATTRS:
            # Dropping the mark would store a file without its data (metacopy: the data is in a
            # lower layer) or a renamed directory without its contents (redirect): refuse.
            raise InvalidSpecError(
                f"an entry carries {name}: it is an overlayfs upper entry that needs the lower "
                "layers it was made on, and cannot become a layer of its own",
                hint="mount overlays with metacopy=off,redirect_dir=off (the kernel's default) "
                "or copy the merged view instead of the upper directory",
            )
        if name.startswith("trusted.overlay.") and name not in _KEEP_OVERLAY_XATTRS:
            continue  # origin, impure, nlink...: bookkeeping about the container's lower layers
        os.setxattr(dst_fd, name, os.getxattr(src_fd, name))


def _copy_data(src_fd: int, dst_fd: int, size: int) -> None:
    """Copy ``size`` bytes, keeping holes: only the data extents are copied (SEEK_DATA/SEEK_HOLE,
    lseek(2)), and the file gets its length at the end.  A 2 GiB sparse file stays a few blocks."""
    offset = 0
    while offset < size:
        try:
            start = os.lseek(src_fd, offset, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # no data from offset to the end: one hole
                break
            if e.errno != errno.EINVAL:  # EINVAL: a filesystem without SEEK_DATA, copy it all
                raise
            start = offset
        end = min(size, _hole_after(src_fd, start, size))
        _copy_range(src_fd, dst_fd, start, end)
        offset = end
    os.ftruncate(dst_fd, size)  # the trailing hole (and a file that shrank while copied)


def _hole_after(fd: int, start: int, size: int) -> int:
    try:
        return os.lseek(fd, start, os.SEEK_HOLE)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENXIO):
            raise
        return size


def _copy_range(src_fd: int, dst_fd: int, start: int, end: int) -> None:
    """Bytes ``start..end`` of ``src_fd`` to the same offsets of ``dst_fd``."""
    os.lseek(dst_fd, start, os.SEEK_SET)
    offset = start
    while offset < end:
        try:
            n = os.sendfile(dst_fd, src_fd, offset, min(end - offset, _CHUNK << 3))
        except OSError as e:
            if e.errno not in (errno.EINVAL, errno.ENOSYS):
                raise
            n = len(chunk := os.pread(src_fd, min(end - offset, _CHUNK), offset))
            os.write(dst_fd, chunk)
        if n == 0:  # the file shrank meanwhile (a running container)
            return
        offset += n


def copy_tree(
    src: str,
    dest: str,
    *,
    ids: IdMap | None = None,
    owner: tuple[int, int] | None = None,
    skip: Callable[[str], bool] | None = None,
    src_fd: int | None = None,
    max_bytes: int | None = None,
) -> int:
    """Copy the tree at ``src`` to ``dest`` (created; must not exist), as an overlay layer holds it.

    ``src_fd``: a descriptor of ``src`` opened and checked earlier (``O_PATH`` will do); the copy
    starts from that very directory instead of looking ``src`` up again.

    fd-based and iterative: no symlink is ever followed on the source side (a running container
    cannot redirect the copy), depth costs no recursion.  Kept: modes (setuid too), numeric owners
    (through ``ids``, or all ``owner``), mtimes, hardlinks, xattrs (of ``trusted.overlay.*`` only
    the opaque mark), whiteouts (character devices 0:0), fifos.  Sockets are skipped; any other
    device node is refused.  ``skip(rel)`` leaves out an entry (``rel`` is ``a/b``, no leading /).
    Holes are kept (see :func:`_copy_data`).  ``max_bytes``: raise :class:`LayerTooLargeError` as
    soon as the tree's tar would be larger (a 512-byte header per entry, each file's apparent size:
    a sparse file counts in full, as it does in a tar) -- checked before each file is copied, so a
    container's 1 TiB sparse file costs nothing to refuse.  Returns that count for the whole tree.
    """
    copy = _TreeCopy(src, ids, owner, skip, max_bytes)
    copy.run(dest, src_fd)
    return copy.tar_bytes


class _TreeCopy:
    """One :func:`copy_tree`: the stack of directories being copied, and the hardlinks seen."""

    def __init__(
        self,
        src: str,
        ids: IdMap | None,
        owner: tuple[int, int] | None,
        skip: Callable[[str], bool] | None,
        max_bytes: int | None = None,
    ) -> None:
        self.src = src
        self.max_bytes = max_bytes
        self.tar_bytes = 0
        self.idmap = ids or (lambda x: x)
        self.owner = owner
        self.skip = skip
        self.links: dict[tuple[int, int], str] = {}
        self.stack: list[Frame[str]] = []
        self.dst_root = -1

    def own(self, s: os.stat_result) -> tuple[int, int]:
        return self.owner if self.owner is not None else (self.idmap(s.st_uid), self.idmap(s.st_gid))

    def run(self, dest: str, src_fd: int | None = None) -> None:
        src_root = os.open(self.src, DIR_FLAGS) if src_fd is None else os.open(".", DIR_FLAGS, dir_fd=src_fd)
        self.dst_root = _mkdir_open(dest, dir_fd=None, or_close=src_root)
        try:
            self._push(src_root, self.dst_root, "")
            while self.stack:
                self._step()
        finally:
            close_frames(self.stack)

    def _push(self, sfd: int, dfd: int, rel: str) -> None:
        """Push a directory to copy; on error (listing it) both of its fds are closed here.

        Every fd the copy opens is owned by exactly one place at any time -- the helper that
        opened it until it returns, then the stack -- so no error path (an existing target,
        ENOSPC, EMFILE) leaks one.
        """
        try:
            frame = Frame(sfd, rel, os.fstat(sfd), iter(sorted(os.listdir(sfd))), dst=dfd)
        except BaseException:
            os.close(sfd)
            os.close(dfd)
            raise
        self.stack.append(frame)

    def _step(self) -> None:
        frame = self.stack[-1]
        name = next(frame.names, None)
        if name is None:
            self.stack.pop()
            try:
                self._finish_dir(frame)
            finally:
                frame.close()
            return
        path = f"{frame.rel}/{name}" if frame.rel else name
        if self.skip is not None and self.skip(path):
            return
        try:
            s = os.stat(name, dir_fd=frame.fd, follow_symlinks=False)
        except FileNotFoundError:
            return  # deleted meanwhile (a running container)
        self._charge(path, s)
        self._copy_entry(frame, name, path, s)

    def _charge(self, path: str, s: os.stat_result) -> None:
        """Count the entry's share of the tree's tar size; over ``max_bytes``, refuse the tree."""
        self.tar_bytes += 512
        if stat.S_ISREG(s.st_mode) and not (s.st_nlink > 1 and (s.st_dev, s.st_ino) in self.links):
            self.tar_bytes += -(-s.st_size // 512) * 512
        if self.max_bytes is not None and self.tar_bytes > self.max_bytes:
            raise LayerTooLargeError(
                f"{self.src}: more than {self.max_bytes} bytes as a layer tar "
                f"({self.tar_bytes} counted at {path})",
                size=self.tar_bytes,
                limit=self.max_bytes,
                path=f"{self.src}/{path}",
            )

    def _finish_dir(self, frame: Frame[str]) -> None:
        """A directory's own metadata, set once its entries are in (they change its mtime)."""
        os.fchown(frame.dst, *self.own(frame.st))
        os.fchmod(frame.dst, stat.S_IMODE(frame.st.st_mode))
        _copy_xattrs(frame.fd, frame.dst)
        os.utime(frame.dst, ns=(frame.st.st_atime_ns, frame.st.st_mtime_ns))

    def _copy_entry(self, frame: Frame[str], name: str, path: str, s: os.stat_result) -> None:
        sfd, dfd, mode = frame.fd, frame.dst, s.st_mode
        if stat.S_ISDIR(mode):
            sub = os.open(name, DIR_FLAGS, dir_fd=sfd)
            self._push(sub, _mkdir_open(name, dir_fd=dfd, or_close=sub), path)
        elif stat.S_ISREG(mode):
            self._copy_file(frame, name, path, s)
        elif stat.S_ISLNK(mode):
            os.symlink(os.readlink(name, dir_fd=sfd), name, dir_fd=dfd)
            os.chown(name, *self.own(s), dir_fd=dfd, follow_symlinks=False)
            os.utime(name, ns=(s.st_atime_ns, s.st_mtime_ns), dir_fd=dfd, follow_symlinks=False)
        elif (stat.S_ISCHR(mode) and s.st_rdev == 0) or stat.S_ISFIFO(mode):
            if stat.S_ISFIFO(mode):
                os.mkfifo(name, 0o600, dir_fd=dfd)
            else:
                os.mknod(name, stat.S_IFCHR | 0o600, 0, dir_fd=dfd)
            os.chown(name, *self.own(s), dir_fd=dfd, follow_symlinks=False)
            os.chmod(name, stat.S_IMODE(mode), dir_fd=dfd)  # a device or fifo we made: no symlink
            os.utime(name, ns=(s.st_atime_ns, s.st_mtime_ns), dir_fd=dfd, follow_symlinks=False)
        elif stat.S_ISSOCK(mode):
            return  # a socket is a live endpoint, not content (docker commit drops them too)
        else:
            raise InvalidSpecError(
                f"{self.src}/{path}: a device node ({os.major(s.st_rdev)}:{os.minor(s.st_rdev)}); "
                "a layer may hold only whiteouts (character devices 0:0)"
            )

    def _copy_file(self, frame: Frame[str], name: str, path: str, s: os.stat_result) -> None:
        key = (s.st_dev, s.st_ino)
        if s.st_nlink > 1 and key in self.links:
            root = self.dst_root
            os.link(self.links[key], path, src_dir_fd=root, dst_dir_fd=root, follow_symlinks=False)
            return
        copy_file_at(frame.fd, name, frame.dst, name, owner=self.own(s))
        if s.st_nlink > 1:
            self.links[key] = path


def _mkdir_open(path: str, *, dir_fd: int | None, or_close: int) -> int:
    """mkdir ``path`` (0700 until its own mode is set last) and open it; on error close ``or_close``."""
    try:
        os.mkdir(path, 0o700, dir_fd=dir_fd)
        return os.open(path, DIR_FLAGS, dir_fd=dir_fd)
    except BaseException:
        os.close(or_close)
        raise


def copy_file_at(
    sfd: int,
    name: str,
    dfd: int,
    dest_name: str,
    *,
    owner: tuple[int, int] | None = None,
    ids: IdMap | None = None,
) -> None:
    """Copy regular file ``name`` (in directory ``sfd``, not followed if a symlink) to ``dest_name``."""
    src = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=sfd)
    try:
        copy_open_file(src, name, dfd, dest_name, owner=owner, ids=ids)
    finally:
        os.close(src)


def copy_open_file(
    src: int,
    what: str,
    dfd: int,
    dest_name: str,
    *,
    owner: tuple[int, int] | None = None,
    ids: IdMap | None = None,
) -> None:
    """Copy the file open as ``src`` (``what`` names it in errors) to ``dest_name`` in ``dfd``;
    InvalidSpecError unless it is a regular file."""
    s = os.fstat(src)
    if not stat.S_ISREG(s.st_mode):
        raise InvalidSpecError(f"{what!r} is not a regular file (it changed while being copied?)")
    if owner is None:
        idmap = ids or (lambda x: x)
        owner = (idmap(s.st_uid), idmap(s.st_gid))
    dst = os.open(
        dest_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dfd
    )
    try:
        _copy_data(src, dst, s.st_size)
        os.fchown(dst, *owner)
        os.fchmod(dst, stat.S_IMODE(s.st_mode))  # after chown, which clears setuid/setgid
        _copy_xattrs(src, dst)  # after chown, which drops security.capability
        os.utime(dst, ns=(s.st_atime_ns, s.st_mtime_ns))
    finally:
        os.close(dst)


# -- checks and modes --------------------------------------------------------------------------


def check_dir(path: object, what: str) -> str:
    """The resolved path of an existing directory (not the host's root), or a typed error naming ``what``."""
    if isinstance(path, os.PathLike):
        path = os.fspath(path)
    if not isinstance(path, str) or not path or "\0" in path:
        raise InvalidSpecError(f"{what}={path!r}: expected a directory path")
    real = os.path.realpath(path)
    try:
        st = os.stat(real)
    except FileNotFoundError:
        raise LayerNotFoundError(f"{what}: {path!r} does not exist", path=path, errno=errno.ENOENT) from None
    if not stat.S_ISDIR(st.st_mode):
        raise LayerNotADirectoryError(f"{what}: {path!r} is not a directory", path=path, errno=errno.ENOTDIR)
    if real == "/":
        raise InvalidSpecError(f"{what}: {path!r} is the host's root")
    return real


def make_private(root: str) -> None:
    """Make a store's root 0700 when it is ours.

    Layers hold whole systems owned by (container) root, setuid programs among them -- a pulled
    image's ``su``, a committed ``chmod u+s`` -- and where a container's ids are not idmapped
    those stay owned by the host's root.  Overlayfs reaches layers as root whatever this
    directory's mode, so nobody else needs a way in; left world-traversable (a data root in
    /var/tmp, say), any local user could run them.
    """
    st = os.stat(root)
    if st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) & 0o077:
        os.chmod(root, stat.S_IMODE(st.st_mode) & 0o700)


# -- atomic files ------------------------------------------------------------------------------


class AtomicFile:
    """A new file at ``final``, written under a temporary name and renamed into place only if
    the block succeeds: a reader never sees half of it, a failure leaves nothing.

    ``final`` may be set inside the block (a blob named by the digest of what was written).  The
    temporary file goes in ``tmp_dir`` (default: ``final``'s directory), which must be on the same
    filesystem -- the store puts it in its owner directory, which a sweep removes if we die.
    """

    def __init__(self, final: str = "", *, tmp_dir: str | None = None, mode: int = 0o644) -> None:
        self.final = final
        self.mode = mode
        fd, self.tmp = tempfile.mkstemp(dir=tmp_dir or os.path.dirname(final), prefix=naming.PREFIX + "-w-")
        self.file = os.fdopen(fd, "wb")

    def __enter__(self) -> AtomicFile:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        try:
            self.file.close()
            if exc_type is None:
                os.chmod(self.tmp, self.mode)
                os.rename(self.tmp, self.final)
                return
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(self.tmp)
            raise
        with contextlib.suppress(OSError):
            os.unlink(self.tmp)


def write_atomic(path: str, data: bytes, *, tmp_dir: str | None = None) -> None:
    """Write ``data`` to ``path`` (0644) via a temporary file in ``tmp_dir`` and a rename."""
    with AtomicFile(path, tmp_dir=tmp_dir) as out:
        out.file.write(data)


def root_required(what: str, cause: OSError | None = None) -> RootRequiredError:
    """Storing a layer whose files need an owner other than this user's: only root may chown a file
    to another user, make a device node (a whiteout) or set a ``trusted.*`` attribute (an opaque
    directory) -- chown(2), mknod(2), xattr(7); a layer's files are owned by container root, host
    uid 0, whenever the image (or a build step) says so."""
    why = f" ({cause.strerror}: {cause.filename})" if cause is not None and cause.filename else ""
    return RootRequiredError(
        f"{what} needs root: stored layers keep their files' owners (container root is host uid 0), "
        f"device nodes and trusted.* attributes, which only root can set (running as uid {os.geteuid()})"
        + why,
        call="geteuid",
        errno=errno.EPERM,
        hint="run as root (CI runners, a container or VM where you are root); rootless mode "
        "(layers owned by a subordinate uid range) is not supported yet",
    )


@contextlib.contextmanager
def root_needed_for_others_files(what: str, *, tmp: str) -> Iterator[None]:
    """EPERM from a copy made without root into ``tmp`` (chown, mknod or setxattr of someone
    else's files) as a :func:`root_required` error; ``tmp`` is removed, and its parent (the
    writer's own directory) too if that leaves it empty: nothing is left of the attempt."""
    try:
        yield
    except PermissionError as e:
        if e.errno != errno.EPERM or os.geteuid() == 0:
            raise
        remove_tree(tmp)
        with contextlib.suppress(OSError):  # not empty: another thread's write is under way
            os.rmdir(os.path.dirname(tmp))
        raise root_required(what, e) from e
