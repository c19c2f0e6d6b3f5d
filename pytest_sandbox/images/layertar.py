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
import gzip
import io
import os
import stat
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from ..core.errors import InvalidSpecError, LayerTarError
from ..host.cleanup import remove_tree_at
from ..host.fstree import DIR_FLAGS, Frame, close_frames, reopen_parent
from .manifest import HashingWriter, LayerDigest, Readable, VerifiedReader

__all__ = [
    "MAX_OPEN_DIRS",
    "LayerDigest",
    "digest_dir",
    "extract_layer_tar",
    "tar_files",
    "write_layer_tar",
]

WHITEOUT_PREFIX = b".wh."
WHITEOUT_META_PREFIX = b".wh..wh."
OPAQUE_MARKER = b".wh..wh..opq"
OPAQUE_XATTR = "trusted.overlay.opaque"
OVERLAY_XATTR_PREFIX = "trusted.overlay."

BLOCK = 512
MAX_SPECIAL = 1 << 20  # PAX / GNU long-name data, as Go's archive/tar (maxSpecialFileSize)
MAX_PATH = 4095
MAX_COMPONENT = 255
MAX_MTIME_NS = 2**63 * 10**9  # a 64-bit time_t, in ns (exclusive); filesystems clamp within it
# Directories held open at once while extracting or writing a layer: a deeper tree (up to 2047
# levels fit in PATH_MAX) is walked by reopening, so no layer can exhaust RLIMIT_NOFILE.
MAX_OPEN_DIRS = 32
_CHUNK = 1 << 20

_REGULAR = (b"0", b"\0", b"7")
_HARDLINK, _SYMLINK, _CHAR, _BLOCKDEV, _DIR, _FIFO = b"1", b"2", b"3", b"4", b"5", b"6"
_PAX, _PAX_GLOBAL, _GNU_LONGNAME, _GNU_LONGLINK = b"x", b"g", b"L", b"K"

# Failures of the machine, not of the tar: reported as they are.
_HOST_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EMFILE, errno.ENFILE, errno.ENOMEM}

_HINT = "the layer tar is malformed or hostile; re-create it with a standard tool (tar, docker save, skopeo)"


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


def _octal(value: int, width: int) -> bytes:
    return b"%0*o\0" % (width - 1, value)


def _pax_record(key: bytes, value: bytes) -> bytes:
    body = b" " + key + b"=" + value + b"\n"
    length = len(body) + len(str(len(body)))
    if len(str(length)) + len(body) != length:
        length = len(str(length)) + len(body)
    return b"%d" % length + body


def _header(
    name: bytes,
    *,
    mode: int,
    uid: int,
    gid: int,
    size: int,
    mtime: int,
    typeflag: bytes,
    linkname: bytes = b"",
    devmajor: int = 0,
    devminor: int = 0,
) -> bytes:
    buf = bytearray(BLOCK)
    buf[0:100] = name[:100].ljust(100, b"\0")
    buf[100:108] = _octal(mode, 8)
    buf[108:116] = _octal(uid, 8)
    buf[116:124] = _octal(gid, 8)
    buf[124:136] = _octal(size, 12)
    buf[136:148] = _octal(mtime, 12)
    buf[148:156] = b" " * 8
    buf[156:157] = typeflag
    buf[157:257] = linkname[:100].ljust(100, b"\0")
    buf[257:265] = b"ustar\x0000"
    buf[329:337] = _octal(devmajor, 8)
    buf[337:345] = _octal(devminor, 8)
    buf[148:156] = b"%06o\0 " % sum(buf)
    return bytes(buf)


def _pad(size: int) -> bytes:
    return b"\0" * (-size % BLOCK)


def _emit(
    sink: HashingWriter,
    name: bytes,
    st: os.stat_result,
    typeflag: bytes,
    *,
    mode: int | None = None,
    size: int = 0,
    linkname: bytes = b"",
    xattrs: dict[str, bytes] | None = None,
) -> None:
    """One entry's headers (a PAX header first when any field does not fit ustar)."""
    pax: list[tuple[bytes, bytes]] = []
    if len(name) > 100 or not name.isascii():
        pax.append((b"path", name))
    if len(linkname) > 100 or not linkname.isascii():
        pax.append((b"linkpath", linkname))
    uid, gid = st.st_uid, st.st_gid
    if uid >= 8**7:
        pax.append((b"uid", b"%d" % uid))
        uid = 0
    if gid >= 8**7:
        pax.append((b"gid", b"%d" % gid))
        gid = 0
    if size >= 8**11:
        pax.append((b"size", b"%d" % size))
    mtime = st.st_mtime_ns // 1_000_000_000
    if not 0 <= mtime < 8**11:
        pax.append((b"mtime", b"%d" % mtime))
        mtime = 0
    for key in sorted(xattrs or {}):
        pax.append((b"SCHILY.xattr." + os.fsencode(key), (xattrs or {})[key]))
    if pax:
        try:
            name.decode("utf-8")
            linkname.decode("utf-8")
        except UnicodeDecodeError:
            pax.insert(0, (b"hdrcharset", b"BINARY"))
        data = b"".join(_pax_record(k, v) for k, v in pax)
        sink.write(
            _header(b"././@PaxHeader", mode=0o644, uid=0, gid=0, size=len(data), mtime=0, typeflag=_PAX)
        )
        sink.write(data + _pad(len(data)))
    dev = st.st_rdev if typeflag in (_CHAR, _BLOCKDEV) else 0
    sink.write(
        _header(
            name,
            mode=(st.st_mode & 0o7777) if mode is None else mode,
            uid=uid,
            gid=gid,
            size=size if size < 8**11 else 0,
            mtime=mtime,
            typeflag=typeflag,
            linkname=linkname,
            devmajor=os.major(dev),
            devminor=os.minor(dev),
        )
    )


def _carried_xattr(name: str) -> bool:
    """Whether a tar carries xattr ``name`` (both ways).  Not ``trusted.*``: overlayfs reads its
    whiteouts, opaque dirs, redirects and metacopy from ``trusted.overlay.*`` (and from
    ``user.overlay.*`` when mounted with ``userxattr``, so not those either) -- a layer must not
    forge them, and the rest of ``trusted.*`` means nothing to an image."""
    return not name.startswith(("trusted.", "user.overlay."))


def _xattrs(target: int | str) -> dict[str, bytes]:
    """The xattrs to carry in a tar (never overlayfs' own); ``target`` is an fd or a /proc path."""
    follow = isinstance(target, int)
    try:
        names = os.listxattr(target, follow_symlinks=follow)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
            return {}
        raise
    return {n: os.getxattr(target, n, follow_symlinks=follow) for n in names if _carried_xattr(n)}


def _is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


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
                _emit(sink, path, st, _HARDLINK, linkname=self.links[key])
                return
            if st.st_nlink > 1:
                self.links[key] = path
            _write_file(sink, fd, name, path, st)
        elif stat.S_ISLNK(mode):
            target = os.fsencode(os.readlink(name, dir_fd=fd))
            _emit(sink, path, st, _SYMLINK, linkname=target)
        elif _is_whiteout(st):
            _emit(sink, top.rel + WHITEOUT_PREFIX + name, st, _REGULAR[0], mode=mode & 0o777)
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode):
            typeflag = _CHAR if stat.S_ISCHR(mode) else _BLOCKDEV if stat.S_ISBLK(mode) else _FIFO
            proc = f"/proc/self/fd/{fd}/{os.fsdecode(name)}"
            _emit(sink, path, st, typeflag, xattrs=_xattrs(proc))
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
        _emit(self.sink, path + b"/", st, _DIR, xattrs=xattrs)
        if opaque:
            _emit(self.sink, path + b"/" + OPAQUE_MARKER, st, _REGULAR[0], mode=st.st_mode & 0o777)


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
        _emit(sink, path, fst, _REGULAR[0], size=size, xattrs=_xattrs(fd))
        left = size
        while left:
            data = os.read(fd, min(left, _CHUNK))
            if not data:
                break
            sink.write(data)
            left -= len(data)
        if left or os.read(fd, 1):
            raise LayerTarError(
                f"{os.fsdecode(path)!r} changed size while the layer was written",
                hint="do not modify a layer directory while it is stored or exported",
            )
        sink.write(_pad(size))
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


class _Prepend:
    """A stream with some already-read bytes put back in front."""

    def __init__(self, head: bytes, rest: Readable) -> None:
        self.head = head
        self.rest = rest

    def read(self, n: int = -1) -> bytes:
        if self.head:
            if n < 0 or n >= len(self.head):
                data, self.head = self.head, b""
                return data
            data, self.head = self.head[:n], self.head[n:]
            return data
        return self.rest.read(n)

    def seek(self, n: int, /) -> int:
        raise io.UnsupportedOperation("a layer stream is read once, front to back")


def _decompressed(stream: Readable) -> Readable:
    head = b""
    while len(head) < 6:
        more = stream.read(6 - len(head))
        if not more:
            break
        head += more
    if head.startswith(b"\x1f\x8b"):
        return gzip.GzipFile(fileobj=_Prepend(head, stream), mode="rb")
    for magic, kind in ((b"\x28\xb5\x2f\xfd", "zstd"), (b"\xfd7zXZ\x00", "xz"), (b"BZh", "bzip2")):
        if head.startswith(magic):
            raise LayerTarError(
                f"the layer is {kind}-compressed; only plain and gzip layer tars are supported",
                hint=f"convert it: {kind} -dc layer | gzip > layer.tar.gz (or skopeo copy to a gzip image)",
            )
    return _Prepend(head, stream)


class _Reader:
    """The uncompressed tar stream: exact reads, hashed as they go (the layer's diff_id)."""

    def __init__(self, raw: Readable) -> None:
        self.hashed = VerifiedReader(raw)

    @property
    def size(self) -> int:
        """How many bytes were read so far."""
        return self.hashed.seen

    def _read(self, n: int) -> bytes:
        try:
            return self.hashed.read(n)
        except (OSError, EOFError, zlib.error) as e:
            raise LayerTarError(f"the layer's compressed stream is corrupt ({e})", hint=_HINT) from None

    def read(self, n: int) -> bytes:
        """Up to ``n`` bytes; fewer only at the end of the stream."""
        parts: list[bytes] = []
        left = n
        while left:
            data = self._read(min(left, _CHUNK))
            if not data:
                break
            parts.append(data)
            left -= len(data)
        return b"".join(parts)

    def exact(self, n: int, what: str) -> bytes:
        """Exactly ``n`` bytes, or a LayerTarError: the archive ended inside an entry."""
        data = self.read(n)
        if len(data) != n:
            raise LayerTarError(f"the layer tar is truncated (in {what})", hint=_HINT)
        return data

    def drain(self) -> None:
        while self.read(_CHUNK):
            pass

    def digest(self) -> LayerDigest:
        return self.hashed.digest()


def _number(field: bytes, what: str) -> int:
    if field and field[0] & 0x80:  # base-256 (GNU / star)
        if field[0] == 0xFF:
            return int.from_bytes(field, "big", signed=True)
        return int.from_bytes(bytes([field[0] & 0x7F]) + field[1:], "big")
    text = field.split(b"\0", 1)[0].strip(b" ")
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError:
        raise LayerTarError(f"the layer tar has a malformed {what} field {field!r}", hint=_HINT) from None


def _cstr(field: bytes) -> bytes:
    return field.split(b"\0", 1)[0]


def _parse_pax(data: bytes) -> dict[bytes, bytes]:
    records: dict[bytes, bytes] = {}
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos)
        if space < 0 or not data[pos:space].isdigit():
            raise LayerTarError("the layer tar has a malformed PAX header", hint=_HINT)
        length = int(data[pos:space])
        end = pos + length
        if length <= space - pos + 1 or end > len(data) or data[end - 1 : end] != b"\n":
            raise LayerTarError("the layer tar has a malformed PAX record", hint=_HINT)
        key, eq, value = data[space + 1 : end - 1].partition(b"=")
        if not eq or not key:
            raise LayerTarError("the layer tar has a malformed PAX record", hint=_HINT)
        records[key] = value
        pos = end
    return records


@dataclass
class _Entry:
    name: bytes
    typeflag: bytes
    mode: int
    uid: int
    gid: int
    size: int
    mtime_ns: int
    linkname: bytes
    devmajor: int
    devminor: int
    xattrs: dict[str, bytes]

    @property
    def shown(self) -> str:
        return self.name.decode("utf-8", "backslashreplace")


def _entries(reader: _Reader) -> Iterator[_Entry]:
    """Every entry of the tar, PAX and GNU long names applied; stops at the end-of-archive block.

    The caller consumes the data of regular files (``size`` bytes, then padding) itself.
    """
    pax: dict[bytes, bytes] = {}
    long_name: bytes | None = None
    long_link: bytes | None = None
    while True:
        block = reader.read(BLOCK)
        if not block:
            return
        if len(block) != BLOCK:
            raise LayerTarError("the layer tar is truncated (in a header)", hint=_HINT)
        if block == b"\0" * BLOCK:
            return
        stored = _number(block[148:156], "checksum")
        unsigned = sum(block[:148]) + 8 * 32 + sum(block[156:])
        if stored != unsigned and stored != unsigned - 256 * sum(
            1 for b in block[:148] + block[156:] if b > 127
        ):  # some old writers summed signed chars
            raise LayerTarError(
                f"the layer is not a tar, or is corrupt: bad header checksum at byte {reader.size - BLOCK}",
                hint=_HINT,
            )
        typeflag = block[156:157]
        size = _number(block[124:136], "size")
        if size < 0:
            raise LayerTarError("the layer tar has a negative entry size", hint=_HINT)
        if typeflag in (_PAX, _PAX_GLOBAL, _GNU_LONGNAME, _GNU_LONGLINK):
            if size > MAX_SPECIAL:
                raise LayerTarError(
                    f"the layer tar has a {size}-byte {'PAX' if typeflag in (_PAX, _PAX_GLOBAL) else 'GNU'} "
                    f"header (the limit is {MAX_SPECIAL} bytes)",
                    hint=_HINT,
                )
            data = reader.exact(size + (-size % BLOCK), "an extended header")[:size]
            if typeflag == _PAX:
                for key, value in _parse_pax(data).items():
                    if value:
                        pax[key] = value
                    else:
                        pax.pop(key, None)
            elif typeflag == _GNU_LONGNAME:
                long_name = _cstr(data)
            elif typeflag == _GNU_LONGLINK:
                long_link = _cstr(data)
            continue  # global PAX headers carry nothing we use
        magic = block[257:263]
        name = _cstr(block[0:100])
        if magic == b"ustar\x00":
            prefix = _cstr(block[345:500])
            if prefix:
                name = prefix + b"/" + name
        if long_name is not None:
            name = long_name
        if b"path" in pax:
            name = pax[b"path"]
        linkname = _cstr(block[157:257])
        if long_link is not None:
            linkname = long_link
        if b"linkpath" in pax:
            linkname = pax[b"linkpath"]
        shown = name.decode("utf-8", "backslashreplace")
        if any(k.startswith(b"GNU.sparse.") for k in pax) or typeflag == b"S":
            raise LayerTarError(
                f"layer tar entry {shown!r} is a sparse file, which layers do not support", hint=_HINT
            )
        try:
            uid = int(pax[b"uid"]) if b"uid" in pax else _number(block[108:116], "uid")
            gid = int(pax[b"gid"]) if b"gid" in pax else _number(block[116:124], "gid")
            if b"size" in pax:
                size = int(pax[b"size"])
            mtime_ns = (
                _pax_time(pax[b"mtime"]) if b"mtime" in pax else _number(block[136:148], "mtime") * 10**9
            )
        except ValueError:
            raise LayerTarError(f"layer tar entry {shown!r}: malformed PAX number", hint=_HINT) from None
        if not (0 <= uid < 2**32 - 1 and 0 <= gid < 2**32 - 1 and size >= 0):
            raise LayerTarError(f"layer tar entry {shown!r}: uid, gid or size out of range", hint=_HINT)
        if not -MAX_MTIME_NS <= mtime_ns < MAX_MTIME_NS:
            # a time_t cannot hold it: utimensat would fail with an OverflowError, not an OSError
            raise LayerTarError(f"layer tar entry {shown!r}: mtime out of range", hint=_HINT)
        if typeflag == b"\0" and name.endswith(b"/"):
            typeflag = _DIR  # a pre-POSIX directory (as tarfile and Go's archive/tar read it)
        xattrs: dict[str, bytes] = {}
        for key, value in pax.items():
            if key.startswith(b"SCHILY.xattr."):
                xname = key[len(b"SCHILY.xattr.") :]
                if not xname or b"\0" in xname or len(xname) > 255:
                    raise LayerTarError(
                        f"layer tar entry {shown!r}: malformed xattr name {xname[:300]!r}", hint=_HINT
                    )
                xattrs[xname.decode("utf-8", "surrogateescape")] = value
        yield _Entry(
            name=name,
            typeflag=typeflag,
            mode=_number(block[100:108], "mode") & 0o7777,
            uid=uid,
            gid=gid,
            size=size,
            mtime_ns=mtime_ns,
            linkname=linkname,
            devmajor=_number(block[329:337], "devmajor"),
            devminor=_number(block[337:345], "devminor"),
            xattrs=xattrs,
        )
        pax = {}
        long_name = long_link = None


def _pax_time(value: bytes) -> int:
    whole, _, frac = value.partition(b".")
    negative = whole.startswith(b"-")
    ns = abs(int(whole)) * 10**9 + int((frac + b"000000000")[:9] or b"0")
    return -ns if negative else ns


def _components(raw: bytes, entry: str, what: str = "name") -> list[bytes]:
    """The checked components of an archive path (empty list: the layer root).

    An absolute name is relative to the layer root, as docker and containerd read it (umoci writes
    its root as ``/``): it is confined, not refused.
    """
    if b"\0" in raw or b"\n" in raw:
        raise LayerTarError(
            f"layer tar entry {entry!r}: the {what} contains a NUL or newline character",
            hint="rename the file in the image; such names are refused as hostile",
        )
    if len(raw) > MAX_PATH:
        raise LayerTarError(f"layer tar entry {entry!r}: the {what} is longer than {MAX_PATH} bytes")
    parts = [p for p in raw.split(b"/") if p not in (b"", b".")]
    for part in parts:
        if part == b"..":
            raise LayerTarError(
                f"layer tar entry {entry!r}: '..' in a {what} is refused (it could leave the layer)",
                hint="re-create the tar without '..' components",
            )
        if len(part) > MAX_COMPONENT:
            raise LayerTarError(
                f"layer tar entry {entry!r}: a component is longer than {MAX_COMPONENT} bytes"
            )
    return parts


class _Extractor:
    """Applies entries to the destination, resolving every path from its descriptor."""

    def __init__(self, root: int, reader: _Reader) -> None:
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

    def _open_child_dir(self, parent: int, name: bytes, entry: _Entry) -> int:
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
        if _is_whiteout(st):  # a deletion earlier in this layer, now a directory again
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
            f"layer tar entry {entry.shown!r}: {shown!r} is not a directory in this layer", hint=_HINT
        )

    def _dir(self, parts: list[bytes], entry: _Entry) -> int:
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
        for entry in _entries(self.reader):
            data_left = entry.size if entry.typeflag in _REGULAR else 0
            try:
                data_left = self._apply(entry, data_left)
            except LayerTarError:
                raise
            except OSError as e:
                if e.errno in _HOST_ERRNOS:
                    raise
                raise LayerTarError(
                    f"layer tar entry {entry.shown!r} cannot be extracted: {e.strerror or e}", hint=_HINT
                ) from None
            except (ValueError, OverflowError) as e:  # a value the OS interface cannot take
                raise LayerTarError(
                    f"layer tar entry {entry.shown!r} cannot be extracted: {e}", hint=_HINT
                ) from None
            if data_left:
                self._skip(data_left)
            if entry.typeflag in _REGULAR:
                # umoci 0.4 ends its layers without padding or end blocks: a short pad is the end
                self.reader.read(-entry.size % BLOCK)
        self.close()
        for parts, mtime_ns in sorted(self.dir_times.items(), key=lambda kv: -len(kv[0])):
            fd = self._dir(list(parts), _Entry(b"/".join(parts), _DIR, 0, 0, 0, 0, 0, b"", 0, 0, {}))
            os.utime(fd, ns=(mtime_ns, mtime_ns))
        self.close()

    def _skip(self, n: int) -> None:
        while n:
            got = len(self.reader.exact(min(n, _CHUNK), "entry data"))
            n -= got

    def _apply(self, entry: _Entry, data_left: int) -> int:
        """Apply one entry; return how many of its data bytes are still unread."""
        parts = _components(entry.name, entry.shown)
        for part in parts[:-1]:
            if part.startswith(WHITEOUT_PREFIX):
                raise LayerTarError(
                    f"layer tar entry {entry.shown!r}: a whiteout name ({part.decode(errors='replace')!r}) "
                    "used as a directory is malformed",
                    hint=_HINT,
                )
        if not parts:
            if entry.typeflag != _DIR:
                raise LayerTarError(
                    f"layer tar entry {entry.shown!r} names the layer root but is not a directory "
                    "(a symlink there would redirect every later entry)",
                    hint=_HINT,
                )
            self._set_dir_meta(self.root, (), entry)
            return data_left
        base = parts[-1]
        if base.startswith(WHITEOUT_PREFIX):
            self._whiteout(entry, parts)
            return data_left
        parent = self._dir(parts[:-1], entry)
        existing = self._lstat(parent, base)
        key = tuple(parts)
        self.linkable.discard(key)
        typeflag = entry.typeflag
        if typeflag == _DIR:
            if existing is not None and stat.S_ISDIR(existing.st_mode):
                fd = os.open(base, DIR_FLAGS, dir_fd=parent)
            else:
                was_whiteout = existing is not None and _is_whiteout(existing)
                self._clear(parent, base, existing)
                os.mkdir(base, 0o700, dir_fd=parent)
                fd = os.open(base, DIR_FLAGS, dir_fd=parent)
                if was_whiteout:
                    os.setxattr(fd, OPAQUE_XATTR, b"y")
            try:
                self._set_dir_meta(fd, key, entry)
            finally:
                os.close(fd)
            return data_left
        if existing is not None and stat.S_ISDIR(existing.st_mode):
            # the directory and all it held are gone: forget their times and link targets
            self.dir_times.pop(key, None)
            for sub in [k for k in self.dir_times if k[: len(key)] == key]:
                del self.dir_times[sub]
            self.linkable -= {k for k in self.linkable if k[: len(key)] == key}
        self._clear(parent, base, existing)
        if typeflag in _REGULAR:
            fd = os.open(
                base,
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o600,
                dir_fd=parent,
            )
            try:
                while data_left:
                    data = self.reader.exact(min(data_left, _CHUNK), f"entry {entry.shown!r}")
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view) :]
                    data_left -= len(data)
                os.fchown(fd, entry.uid, entry.gid)
                os.fchmod(fd, entry.mode)
                self._set_xattrs(fd, entry)
                os.utime(fd, ns=(entry.mtime_ns, entry.mtime_ns))
            finally:
                os.close(fd)
            self.linkable.add(key)
        elif typeflag == _SYMLINK:
            if b"\0" in entry.linkname or not entry.linkname or len(entry.linkname) > MAX_PATH:
                raise LayerTarError(f"layer tar entry {entry.shown!r}: malformed symlink target", hint=_HINT)
            os.symlink(entry.linkname, base, dir_fd=parent)
            os.chown(base, entry.uid, entry.gid, dir_fd=parent, follow_symlinks=False)
            os.utime(base, ns=(entry.mtime_ns, entry.mtime_ns), dir_fd=parent, follow_symlinks=False)
            self.linkable.add(key)
        elif typeflag == _HARDLINK:
            self._hardlink(entry, parent, base)
            self.linkable.add(key)
        elif typeflag == _FIFO:
            os.mkfifo(base, 0o600, dir_fd=parent)
            self._set_node_meta(parent, base, entry)
            self.linkable.add(key)
        elif typeflag == _CHAR and entry.devmajor == 0 and entry.devminor == 0:
            os.mknod(base, stat.S_IFCHR | 0o600, 0, dir_fd=parent)  # already overlay format
            self._set_node_meta(parent, base, entry)
        elif typeflag in (_CHAR, _BLOCKDEV):
            kind = "character" if typeflag == _CHAR else "block"
            raise LayerTarError(
                f"layer tar entry {entry.shown!r} is a {kind} device {entry.devmajor}:{entry.devminor}; "
                "device nodes in layers are refused",
                hint="remove device nodes from the image; a container gets its /dev from the runtime",
            )
        else:
            raise LayerTarError(
                f"layer tar entry {entry.shown!r} has an unsupported type {entry.typeflag!r}", hint=_HINT
            )
        return data_left

    def _set_node_meta(self, parent: int, base: bytes, entry: _Entry) -> None:
        # The node was just made by us in a directory only we write: following is not possible.
        os.chown(base, entry.uid, entry.gid, dir_fd=parent, follow_symlinks=False)
        os.chmod(base, entry.mode & 0o777, dir_fd=parent)
        os.utime(base, ns=(entry.mtime_ns, entry.mtime_ns), dir_fd=parent, follow_symlinks=False)

    def _set_dir_meta(self, fd: int, key: tuple[bytes, ...], entry: _Entry) -> None:
        os.fchown(fd, entry.uid, entry.gid)
        os.fchmod(fd, entry.mode)
        self._set_xattrs(fd, entry)
        self.dir_times[key] = entry.mtime_ns

    def _set_xattrs(self, fd: int, entry: _Entry) -> None:
        for name, value in entry.xattrs.items():
            if not _carried_xattr(name):
                continue  # never take overlayfs' (or any trusted) metadata from a tar
            try:
                os.setxattr(fd, name, value)
            except OSError as e:
                if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
                    continue
                raise LayerTarError(
                    f"layer tar entry {entry.shown!r}: xattr {name!r} cannot be set: {e.strerror}",
                    hint=_HINT,
                ) from None

    def _hardlink(self, entry: _Entry, parent: int, base: bytes) -> None:
        target = _components(entry.linkname, entry.shown, "hardlink target")
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

    def _whiteout(self, entry: _Entry, parts: list[bytes]) -> None:
        base = parts[-1]
        if entry.typeflag not in _REGULAR and entry.typeflag != _HARDLINK:
            raise LayerTarError(
                f"layer tar entry {entry.shown!r}: a whiteout must be an empty regular file", hint=_HINT
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
                f"layer tar entry {entry.shown!r}: AUFS metadata (.wh..wh.*) is not supported", hint=_HINT
            )
        name = base[len(WHITEOUT_PREFIX) :]
        if not name or name in (b".", b".."):
            raise LayerTarError(
                f"layer tar entry {entry.shown!r} is a malformed whiteout (it names "
                f"{'nothing' if not name else repr(name.decode())}); a bare '.wh.' would delete its "
                "whole parent directory",
                hint=_HINT,
            )
        parent = self._dir(parts[:-1], entry)
        existing = self._lstat(parent, name)
        if existing is None or _is_whiteout(existing):
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


def tar_files(stream: BinaryIO) -> dict[str, tuple[int, int]]:
    """Every regular file of an uncompressed tar read from its start: name -> (data offset, size).

    For reading an archive in place (``docker save`` tarballs): names are checked as in
    :func:`extract_layer_tar` and normalised (no ``./``); a symlink or hardlink to a file of the
    archive is listed as that file, links that leave the archive are dropped.
    """
    reader = _Reader(stream)
    files: dict[str, tuple[int, int]] = {}
    links: dict[str, str] = {}
    for entry in _entries(reader):
        name = "/".join(os.fsdecode(p) for p in _components(entry.name, entry.shown))
        if entry.typeflag in _REGULAR:
            files[name] = (reader.size, entry.size)
            left = entry.size
            while left:
                left -= len(reader.exact(min(left, _CHUNK), f"entry {entry.shown!r}"))
            reader.read(-entry.size % BLOCK)
        elif entry.typeflag in (_HARDLINK, _SYMLINK):
            target = os.fsdecode(entry.linkname)
            if entry.typeflag == _SYMLINK:  # relative to the link's directory
                target = os.path.normpath(os.path.join(os.path.dirname(name), target))
            links[name] = target
    for name, first in links.items():
        target, hops = first, 0
        while target in links and hops < 8:
            target, hops = links[target], hops + 1
        if target in files:
            files[name] = files[target]
    return files


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
        reader = _Reader(_decompressed(stream))
        extractor = _Extractor(root, reader)
        try:
            extractor.run()
        finally:
            extractor.close()
        reader.drain()
        return reader.digest()
    finally:
        os.close(root)
