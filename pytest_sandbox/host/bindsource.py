"""Bind-mount sources, opened once by pytest and mounted from that very descriptor (stdlib only).

A source is resolved once, at ``run()`` (:func:`pytest_sandbox.core.spec.parse_mounts`: its
canonical path, no symlink in it, and its ``(st_dev, st_ino)``).  Just before the create request
goes out, :func:`opened_sources` opens each source again with ``openat2(RESOLVE_NO_SYMLINKS)``
(``O_PATH``: nothing is read, a device is not opened) and refuses one that is no longer the object
resolved; the descriptors travel to the launcher with the request (``SCM_RIGHTS``) and on to the
container's first process, which clones exactly that object (``open_tree(fd, "", AT_EMPTY_PATH |
OPEN_TREE_CLONE)``, :func:`pytest_sandbox.host.rootfs.clone_binds`) and checks its identity again.
No path is looked up after this: a container holding a read-write bind of a parent directory can
plant a symlink there (``ln -s / shared/cache``) or swap one in between two lookups
(``renameat2(RENAME_EXCHANGE)``), and a path followed then would mount the host's root (issue 9,
item 1).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
from collections.abc import Iterator

from ..core.errors import InvalidSpecError, SetupError
from ..core.spec import BindMount, ContainerSpec
from . import libc


def open_source(m: BindMount) -> tuple[int, BindMount]:
    """An ``O_PATH`` fd of ``m.source`` and ``m`` with the identity found; refused if it changed."""
    try:
        fd = libc.open_no_symlinks(m.source)
    except SetupError as e:
        if e.errno == errno.ELOOP:
            when = "after run() resolved it" if m.identity is not None else "(give its resolved path)"
            raise InvalidSpecError(
                f"mounts: source {m.source!r} is reached through a symlink {when}; refusing to follow "
                "it (a container that can write a directory on its way may have planted it)"
            ) from None
        raise InvalidSpecError(f"mounts: source {m.source!r}: {os.strerror(e.errno or 0)}") from None
    try:
        st = os.fstat(fd)
        found = (st.st_dev, st.st_ino)
        if m.identity is not None and found != m.identity:
            raise InvalidSpecError(
                f"mounts: source {m.source!r} was replaced after run() resolved it (device:inode "
                f"{m.identity[0]}:{m.identity[1]}, now {found[0]}:{found[1]}); refusing to mount it"
            )
    except BaseException:
        os.close(fd)
        raise
    return fd, dataclasses.replace(m, identity=found)


@contextlib.contextmanager
def opened_sources(spec: ContainerSpec) -> Iterator[tuple[ContainerSpec, tuple[int, ...]]]:
    """The spec with every source's identity, and one fd per mount; the fds close on exit.

    Close them as soon as the request carrying them is sent: the kernel holds its own references
    to descriptors in flight, and the launcher and the container's first process their copies.
    """
    fds: list[int] = []
    try:
        mounts = []
        for m in spec.mounts:
            fd, resolved = open_source(m)
            fds.append(fd)
            mounts.append(resolved)
        yield dataclasses.replace(spec, mounts=tuple(mounts)), tuple(fds)
    finally:
        for fd in fds:
            os.close(fd)
