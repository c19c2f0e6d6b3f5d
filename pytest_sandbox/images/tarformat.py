"""The tar format of layers, below the filesystem: headers written, archives parsed (bounded).

:mod:`.layertar` maps directories to layer tars and back with these; :mod:`.archive` lists the
files of a ``docker save`` tarball with :func:`tar_files`.  The tar is parsed here, not by
:mod:`tarfile`, so that every header is bounded (1 MiB for PAX and GNU long-name data, as Go's
archive/tar) and every name is checked (:func:`components`) before anyone acts on it: NUL or
newline in a name, ``..`` components, over-long names, sparse files, bad checksums, truncated
archives, numbers out of range and malformed xattr names are a
:class:`~pytest_sandbox.core.errors.LayerTarError` naming the entry.
"""

from __future__ import annotations

import gzip
import io
import os
import stat
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from ..core.errors import LayerTarError
from .manifest import HashingWriter, LayerDigest, Readable, VerifiedReader

BLOCK = 512
MAX_SPECIAL = 1 << 20  # PAX / GNU long-name data, as Go's archive/tar (maxSpecialFileSize)
MAX_PATH = 4095
MAX_COMPONENT = 255
MAX_MTIME_NS = 2**63 * 10**9  # a 64-bit time_t, in ns (exclusive); filesystems clamp within it
CHUNK = 1 << 20

REGULAR = (b"0", b"\0", b"7")
HARDLINK, SYMLINK, CHAR, BLOCKDEV, DIR, FIFO = b"1", b"2", b"3", b"4", b"5", b"6"
_PAX, _PAX_GLOBAL, _GNU_LONGNAME, _GNU_LONGLINK = b"x", b"g", b"L", b"K"

HINT = "the layer tar is malformed or hostile; re-create it with a standard tool (tar, docker save, skopeo)"


# -- the layer conventions: a layer tar (OCI image-spec) <-> an overlay lower directory ---------

WHITEOUT_PREFIX = b".wh."
WHITEOUT_META_PREFIX = b".wh..wh."
OPAQUE_MARKER = b".wh..wh..opq"
OPAQUE_XATTR = "trusted.overlay.opaque"
# Directories held open at once while extracting or writing a layer: a deeper tree (up to 2047
# levels fit in PATH_MAX) is walked by reopening, so no layer can exhaust RLIMIT_NOFILE.
MAX_OPEN_DIRS = 32


def carried_xattr(name: str) -> bool:
    """Whether a tar carries xattr ``name`` (both ways).  Not ``trusted.*``: overlayfs reads its
    whiteouts, opaque dirs, redirects and metacopy from ``trusted.overlay.*`` (and from
    ``user.overlay.*`` when mounted with ``userxattr``, so not those either) -- a layer must not
    forge them, and the rest of ``trusted.*`` means nothing to an image."""
    return not name.startswith(("trusted.", "user.overlay."))


def is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


# -- writing -----------------------------------------------------------------------------------


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


def pad(size: int) -> bytes:
    return b"\0" * (-size % BLOCK)


def emit(
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
        sink.write(data + pad(len(data)))
    dev = st.st_rdev if typeflag in (CHAR, BLOCKDEV) else 0
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


# -- reading ---------------------------------------------------------------------------------


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


def decompressed(stream: Readable) -> Readable:
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


class Reader:
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
            raise LayerTarError(f"the layer's compressed stream is corrupt ({e})", hint=HINT) from None

    def read(self, n: int) -> bytes:
        """Up to ``n`` bytes; fewer only at the end of the stream."""
        parts: list[bytes] = []
        left = n
        while left:
            data = self._read(min(left, CHUNK))
            if not data:
                break
            parts.append(data)
            left -= len(data)
        return b"".join(parts)

    def exact(self, n: int, what: str) -> bytes:
        """Exactly ``n`` bytes, or a LayerTarError: the archive ended inside an entry."""
        data = self.read(n)
        if len(data) != n:
            raise LayerTarError(f"the layer tar is truncated (in {what})", hint=HINT)
        return data

    def drain(self) -> None:
        while self.read(CHUNK):
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
        raise LayerTarError(f"the layer tar has a malformed {what} field {field!r}", hint=HINT) from None


def _cstr(field: bytes) -> bytes:
    return field.split(b"\0", 1)[0]


def _parse_pax(data: bytes) -> dict[bytes, bytes]:
    records: dict[bytes, bytes] = {}
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos)
        if space < 0 or not data[pos:space].isdigit():
            raise LayerTarError("the layer tar has a malformed PAX header", hint=HINT)
        length = int(data[pos:space])
        end = pos + length
        if length <= space - pos + 1 or end > len(data) or data[end - 1 : end] != b"\n":
            raise LayerTarError("the layer tar has a malformed PAX record", hint=HINT)
        key, eq, value = data[space + 1 : end - 1].partition(b"=")
        if not eq or not key:
            raise LayerTarError("the layer tar has a malformed PAX record", hint=HINT)
        records[key] = value
        pos = end
    return records


@dataclass
class Entry:
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


class _Extended:
    """What the extended headers before an entry said: PAX records, GNU long name and link."""

    def __init__(self) -> None:
        self.pax: dict[bytes, bytes] = {}
        self.long_name: bytes | None = None
        self.long_link: bytes | None = None

    def read(self, reader: Reader, typeflag: bytes, size: int) -> None:
        """Read one extended header's data (bounded) and keep what it says for the next entry."""
        if size > MAX_SPECIAL:
            raise LayerTarError(
                f"the layer tar has a {size}-byte {'PAX' if typeflag in (_PAX, _PAX_GLOBAL) else 'GNU'} "
                f"header (the limit is {MAX_SPECIAL} bytes)",
                hint=HINT,
            )
        data = reader.exact(size + (-size % BLOCK), "an extended header")[:size]
        if typeflag == _PAX:
            for key, value in _parse_pax(data).items():
                if value:
                    self.pax[key] = value
                else:
                    self.pax.pop(key, None)
        elif typeflag == _GNU_LONGNAME:
            self.long_name = _cstr(data)
        elif typeflag == _GNU_LONGLINK:
            self.long_link = _cstr(data)
        # global PAX headers carry nothing we use

    def names(self, block: bytes) -> tuple[bytes, bytes]:
        """The entry's name and link name: ustar's, unless a GNU or PAX header gave longer ones."""
        name = _cstr(block[0:100])
        if block[257:263] == b"ustar\x00":
            prefix = _cstr(block[345:500])
            if prefix:
                name = prefix + b"/" + name
        if self.long_name is not None:
            name = self.long_name
        name = self.pax.get(b"path", name)
        linkname = _cstr(block[157:257])
        if self.long_link is not None:
            linkname = self.long_link
        return name, self.pax.get(b"linkpath", linkname)

    def xattrs(self, shown: str) -> dict[str, bytes]:
        xattrs: dict[str, bytes] = {}
        for key, value in self.pax.items():
            if key.startswith(b"SCHILY.xattr."):
                xname = key[len(b"SCHILY.xattr.") :]
                if not xname or b"\0" in xname or len(xname) > 255:
                    raise LayerTarError(
                        f"layer tar entry {shown!r}: malformed xattr name {xname[:300]!r}", hint=HINT
                    )
                xattrs[xname.decode("utf-8", "surrogateescape")] = value
        return xattrs


def _header_block(reader: Reader) -> bytes | None:
    """The next header block, its checksum checked; None at the end of the archive."""
    block = reader.read(BLOCK)
    if not block:
        return None
    if len(block) != BLOCK:
        raise LayerTarError("the layer tar is truncated (in a header)", hint=HINT)
    if block == b"\0" * BLOCK:
        return None
    stored = _number(block[148:156], "checksum")
    unsigned = sum(block[:148]) + 8 * 32 + sum(block[156:])
    if stored != unsigned and stored != unsigned - 256 * sum(
        1 for b in block[:148] + block[156:] if b > 127
    ):  # some old writers summed signed chars
        raise LayerTarError(
            f"the layer is not a tar, or is corrupt: bad header checksum at byte {reader.size - BLOCK}",
            hint=HINT,
        )
    return block


def entries(reader: Reader) -> Iterator[Entry]:
    """Every entry of the tar, PAX and GNU long names applied; stops at the end-of-archive block.

    The caller consumes the data of regular files (``size`` bytes, then padding) itself.
    """
    ext = _Extended()
    while (block := _header_block(reader)) is not None:
        typeflag = block[156:157]
        size = _number(block[124:136], "size")
        if size < 0:
            raise LayerTarError("the layer tar has a negative entry size", hint=HINT)
        if typeflag in (_PAX, _PAX_GLOBAL, _GNU_LONGNAME, _GNU_LONGLINK):
            ext.read(reader, typeflag, size)
            continue
        yield _entry(block, typeflag, size, ext)
        ext = _Extended()


def _entry(block: bytes, typeflag: bytes, size: int, ext: _Extended) -> Entry:
    """One entry from its header block and the extended headers before it, every field checked."""
    name, linkname = ext.names(block)
    pax = ext.pax
    shown = name.decode("utf-8", "backslashreplace")
    if any(k.startswith(b"GNU.sparse.") for k in pax) or typeflag == b"S":
        raise LayerTarError(
            f"layer tar entry {shown!r} is a sparse file, which layers do not support", hint=HINT
        )
    try:
        uid = int(pax[b"uid"]) if b"uid" in pax else _number(block[108:116], "uid")
        gid = int(pax[b"gid"]) if b"gid" in pax else _number(block[116:124], "gid")
        if b"size" in pax:
            size = int(pax[b"size"])
        mtime_ns = _pax_time(pax[b"mtime"]) if b"mtime" in pax else _number(block[136:148], "mtime") * 10**9
    except ValueError:
        raise LayerTarError(f"layer tar entry {shown!r}: malformed PAX number", hint=HINT) from None
    if not (0 <= uid < 2**32 - 1 and 0 <= gid < 2**32 - 1 and size >= 0):
        raise LayerTarError(f"layer tar entry {shown!r}: uid, gid or size out of range", hint=HINT)
    if not -MAX_MTIME_NS <= mtime_ns < MAX_MTIME_NS:
        # a time_t cannot hold it: utimensat would fail with an OverflowError, not an OSError
        raise LayerTarError(f"layer tar entry {shown!r}: mtime out of range", hint=HINT)
    if typeflag == b"\0" and name.endswith(b"/"):
        typeflag = DIR  # a pre-POSIX directory (as tarfile and Go's archive/tar read it)
    return Entry(
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
        xattrs=ext.xattrs(shown),
    )


def _pax_time(value: bytes) -> int:
    whole, _, frac = value.partition(b".")
    negative = whole.startswith(b"-")
    ns = abs(int(whole)) * 10**9 + int((frac + b"000000000")[:9] or b"0")
    return -ns if negative else ns


def components(raw: bytes, entry: str, what: str = "name") -> list[bytes]:
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


def tar_files(stream: BinaryIO) -> dict[str, tuple[int, int]]:
    """Every regular file of an uncompressed tar read from its start: name -> (data offset, size).

    For reading an archive in place (``docker save`` tarballs): names are checked as in
    :func:`extract_layer_tar` and normalised (no ``./``); a symlink or hardlink to a file of the
    archive is listed as that file, links that leave the archive are dropped.
    """
    reader = Reader(stream)
    files: dict[str, tuple[int, int]] = {}
    links: dict[str, str] = {}
    for entry in entries(reader):
        name = "/".join(os.fsdecode(p) for p in components(entry.name, entry.shown))
        if entry.typeflag in REGULAR:
            files[name] = (reader.size, entry.size)
            left = entry.size
            while left:
                left -= len(reader.exact(min(left, CHUNK), f"entry {entry.shown!r}"))
            reader.read(-entry.size % BLOCK)
        elif entry.typeflag in (HARDLINK, SYMLINK):
            target = os.fsdecode(entry.linkname)
            if entry.typeflag == SYMLINK:  # relative to the link's directory
                target = os.path.normpath(os.path.join(os.path.dirname(name), target))
            links[name] = target
    for name, first in links.items():
        target, hops = first, 0
        while target in links and hops < 8:
            target, hops = links[target], hops + 1
        if target in files:
            files[name] = files[target]
    return files
