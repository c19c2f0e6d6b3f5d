"""Building layer tars in tests (with :mod:`tarfile`, an independent writer) and looking at trees."""

from __future__ import annotations

import io
import os
import stat
import tarfile
from pathlib import Path

Member = tuple[tarfile.TarInfo, bytes | None]


def reg(name: str, data: bytes = b"", mode: int = 0o644, **kw: object) -> Member:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = mode
    info.mtime = 1_600_000_000
    for k, v in kw.items():
        setattr(info, k, v)
    return info, data


def dirm(name: str, mode: int = 0o755) -> Member:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    info.mode = mode
    info.mtime = 1_600_000_000
    return info, None


def sym(name: str, target: str) -> Member:
    info = tarfile.TarInfo(name)
    info.type = tarfile.SYMTYPE
    info.linkname = target
    info.mode = 0o777
    return info, None


def hard(name: str, target: str) -> Member:
    info = tarfile.TarInfo(name)
    info.type = tarfile.LNKTYPE
    info.linkname = target
    return info, None


def dev(name: str, kind: bytes, major: int, minor: int) -> Member:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.devmajor, info.devminor = major, minor
    return info, None


def build(*members: Member, fmt: int = tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def snapshot(root: Path) -> dict[str, tuple[object, ...]]:
    """Every entry under ``root`` (not following symlinks): type, mode, ids, size, mtime, content,
    link target, xattrs and link count -- what "unchanged on disk" means in these tests."""
    out: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames, ""] if dirpath == str(root) else [*dirnames, *filenames]:
            path = os.path.join(dirpath, name) if name else dirpath
            st = os.lstat(path)
            content: object = None
            if stat.S_ISREG(st.st_mode):
                content = Path(path).read_bytes()
            elif stat.S_ISLNK(st.st_mode):
                content = os.readlink(path)
            xattrs: tuple[tuple[str, bytes], ...] = ()
            if not stat.S_ISLNK(st.st_mode):
                xattrs = tuple(sorted((n, os.getxattr(path, n)) for n in os.listxattr(path)))
            rel = os.path.relpath(path, root)
            out[rel] = (
                stat.S_IFMT(st.st_mode),
                stat.S_IMODE(st.st_mode),
                st.st_uid,
                st.st_gid,
                st.st_rdev,
                st.st_nlink,
                st.st_mtime_ns,
                st.st_ino,
                content,
                xattrs,
            )
    return out


def tree(root: Path) -> dict[str, str]:
    """A readable view of a (merged) tree: path -> "dir", "file:<content>" or "link:<target>"."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            st = os.lstat(path)
            if stat.S_ISDIR(st.st_mode):
                out[rel] = "dir"
            elif stat.S_ISLNK(st.st_mode):
                out[rel] = "link:" + os.readlink(path)
            elif stat.S_ISREG(st.st_mode):
                out[rel] = "file:" + Path(path).read_text()
            else:
                out[rel] = f"other:{stat.S_IFMT(st.st_mode):o}:{st.st_rdev}"
    return out


def text_layer(parent: Path, name: str, content: str) -> Path:
    """A layer directory ``parent/name`` holding one file, ``<name>.txt``, with ``content``."""
    d = parent / name
    d.mkdir()
    (d / f"{name}.txt").write_text(content)
    return d
