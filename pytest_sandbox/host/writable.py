"""A container's writable area: one tmpfs, bounded in bytes and inodes, for all it may write.

Its root holds every overlay's ``upper.N``/``work.N`` and the *scratch* directories ``tmp`` and
``tmpfs.N``, which become /tmp and each ``tmpfs=`` mount without a size (bind mounts): so
``writable_size`` bounds the container's whole writable footprint once, not once per mount.
Runs in the container's first process, still host root, in its private mount namespace.
"""

from __future__ import annotations

import os

from ..core.limits import writable_inodes
from ..core.spec import ContainerSpec, TmpfsMount
from . import libc


def mount_writable(path: str, size: int | None) -> None:
    """The container's writable area: a tmpfs of its own, bounded in bytes and inodes.

    Mounted in our private mount namespace only: a launcher killed by SIGKILL leaves no mount on
    the host.  Its pages are charged to the memory cgroup of the task that writes them (mm/shmem.c
    charges each folio to the writer's memcg): the container's.  Full means ENOSPC inside, never
    host memory pressure (the state directory's /dev/shm is as large as RAM).
    """
    with libc.named("mkdir", path):
        os.mkdir(path, 0o700)
    libc.mount(
        "psbx-writable", path, "tmpfs", libc.MS_NOSUID | libc.MS_NODEV, "mode=0700" + tmpfs_bounds(size)
    )


def tmpfs_bounds(size: int | None) -> str:
    """tmpfs options bounding a writable area of ``size`` bytes (none: the kernel's defaults)."""
    return "" if size is None else f",size={size},nr_inodes={writable_inodes(size)}"


def scratch_mounts(spec: ContainerSpec) -> list[TmpfsMount]:
    """/tmp (unless the caller mounts something there) and each ``tmpfs=`` mount without a size.

    They are no tmpfs of their own but directories of the writable tmpfs, bind-mounted: so
    ``writable_size`` bounds the container's whole writable footprint, bytes and inodes, once
    (a tmpfs each would let a container pin that bound once per mount, in RAM).
    """
    user_targets = {t.target for t in spec.tmpfs} | {m.target for m in spec.mounts}
    tmp = [] if "/tmp" in user_targets else [TmpfsMount("/tmp")]
    return tmp + [t for t in spec.tmpfs if t.size is None]


def clone_scratch(spec: ContainerSpec, writable: str, root_uid: int) -> list[tuple[int, str]]:
    """``tmp``/``tmpfs.N`` in the writable tmpfs, next to (never inside) the overlays' upper
    directories, so commit() and build steps do not capture them (as they did not a tmpfs); each
    cloned as a detached mount, nosuid and nodev as the writable tmpfs is (and a tmpfs was):
    (fd, target) pairs, attached after pivot_root.
    """
    clones: list[tuple[int, str]] = []
    try:
        for index, t in enumerate(scratch_mounts(spec)):
            path = os.path.join(writable, "tmp" if index == 0 and t.target == "/tmp" else f"tmpfs.{index}")
            with libc.named("mkdir", path):
                os.mkdir(path, 0o700)
            with libc.named("chown", path):
                os.chown(path, root_uid, root_uid)  # container root's, as its own tmpfs' root was
            with libc.named("chmod", path):
                os.chmod(path, t.mode)  # after chown (which may clear mode bits); mkdir's met the umask
            fd = libc.open_tree(path, libc.OPEN_TREE_CLONE | libc.OPEN_TREE_CLOEXEC)
            clones.append((fd, t.target))
    except BaseException:
        for fd, _ in clones:
            os.close(fd)
        raise
    return clones
