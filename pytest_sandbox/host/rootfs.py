"""Building a container's root filesystem: overlays, /proc, /dev, masks, pivot_root (stdlib only).

Runs in the container's first process (its PID 1), in two halves:

1. :func:`mount_image` and :func:`mount_proc` -- while it is still host root, in a
   private mount namespace owned by the host's user namespace.  Each layer is cloned as a detached
   mount (``open_tree(OPEN_TREE_CLONE)``) and, where the filesystem supports it, *idmapped* to the
   container's uid range (``mount_setattr(MOUNT_ATTR_IDMAP)``, Linux >= 5.12; overlayfs accepts
   idmapped layers since 5.19), so host-root-owned files appear owned by container root and stay
   writable through copy-up while the container's root is an unprivileged host uid.  Layers are
   passed to overlayfs as ``/proc/self/fd/N``: no path escaping (``:``/``,`` in layer paths), and
   the mount data stays short for deep stacks.  Idmapping needs CAP_SYS_ADMIN in the user
   namespace of the layer's filesystem (the host's), which is why this half runs before the
   container's user namespace exists.  User bind mounts are cloned just before (:func:`clone_binds`,
   from the fds pytest opened), for the same reason, and attached after ``pivot_root`` so their
   targets resolve inside the container.  Layers, binds and the overlays are all ``nodev``: only
   the container's own /dev holds device nodes that open.

2. :func:`finish_rootfs` -- inside the container's user and mount namespaces.  The copied mounts
   are *locked* (mount_namespaces(7)): ``pivot_root`` refuses a locked new root, so the rootfs is
   first bind-mounted onto itself.  /sys is mounted *before* the old root is detached: the kernel
   lets a user namespace mount sysfs only while a fully visible instance exists in the mount
   namespace (``mnt_already_visible``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass

from ..core.errors import LayerNotADirectoryError, LayerNotFoundError, SetupError
from ..core.spec import BindMount, ContainerSpec, TmpfsMount
from . import libc
from .cleanup import remove_tree_at
from .writable import clone_scratch, mount_writable, tmpfs_bounds

# podman's defaults (containers/common pkg/config/default.go).
MASKED_PATHS = (
    "proc/acpi",
    "proc/kcore",
    "proc/keys",
    "proc/latency_stats",
    "proc/sched_debug",
    "proc/scsi",
    "proc/timer_list",
    "proc/timer_stats",
    "proc/interrupts",
    "sys/devices/virtual/powercap",
    "sys/firmware",
    "sys/fs/selinux",
)
READONLY_PATHS = ("proc/asound", "proc/bus", "proc/fs", "proc/irq", "proc/sys", "proc/sysrq-trigger")
# name, major, minor: the devices every container gets (runtime-tools' defaultDevices minus ptmx,
# which is a symlink into the container's own devpts instance).
DEVICES = (("null", 1, 3), ("zero", 1, 5), ("full", 1, 7), ("random", 1, 8), ("urandom", 1, 9), ("tty", 5, 0))
DEV_LINKS = (
    ("fd", "/proc/self/fd"),
    ("stdin", "/proc/self/fd/0"),
    ("stdout", "/proc/self/fd/1"),
    ("stderr", "/proc/self/fd/2"),
    ("ptmx", "pts/ptmx"),
)
_PROC_FLAGS = libc.MS_NOSUID | libc.MS_NODEV | libc.MS_NOEXEC


WRITABLE = "writable"  # the writable tmpfs' mount point: mounted in the container's namespaces only
HELD_WRITABLE = "writable.fd"  # the launcher's symlink to its fd of that tmpfs: the host's way in
HELD_WRITABLE_ID = "writable.id"  # "st_dev st_ino" of that tmpfs' root, written before the symlink


@dataclass
class ContainerDirs:
    """The launcher's per-container state directory (host side).

    The writable layer (each overlay's upper and work directory) is not stored here but on a
    tmpfs of its own (``size=``/``nr_inodes=`` of the spec's ``writable_size``), which the first
    process mounts on :attr:`writable` in its private mount namespace, so no host mount exists.
    The launcher keeps an ``O_PATH`` fd of it (opened through ``/proc/<first pid>/cwd``) and
    links :attr:`held_writable` to ``/proc/<launcher pid>/fd/<n>``: that is how pytest reads an
    upper directory (commit, build steps), also after the container exited.
    """

    base: str

    @property
    def rootfs(self) -> str:
        return os.path.join(self.base, "rootfs")

    @property
    def writable(self) -> str:
        return os.path.join(self.base, WRITABLE)

    @property
    def held_writable(self) -> str:
        return os.path.join(self.base, HELD_WRITABLE)

    @property
    def held_writable_id(self) -> str:
        return os.path.join(self.base, HELD_WRITABLE_ID)

    def upper(self, index: int) -> str:
        """Overlay ``index``'s upper directory as the host reaches it (through the launcher's fd)."""
        return os.path.join(self.held_writable, f"upper.{index}")

    @property
    def stdout(self) -> str:
        return os.path.join(self.base, "stdout")

    @property
    def stderr(self) -> str:
        return os.path.join(self.base, "stderr")


def record_held_writable(dirs: ContainerDirs, fd: int, launcher_pid: int) -> None:
    """Link :attr:`ContainerDirs.held_writable` to the launcher's ``fd`` of the writable tmpfs,
    after writing that tmpfs root's identity, which :func:`open_held_writable` checks."""
    st = os.fstat(fd)
    tmp = dirs.held_writable_id + ".tmp"
    with open(tmp, "x", encoding="ascii") as f:
        f.write(f"{st.st_dev} {st.st_ino}\n")
    os.rename(tmp, dirs.held_writable_id)  # complete before the link exists: never half-read
    os.symlink(f"/proc/{launcher_pid}/fd/{fd}", dirs.held_writable)


def open_held_writable(dirs: ContainerDirs) -> int:
    """An ``O_PATH`` fd of the container's writable tmpfs, through the launcher's link to it.

    The link is ``/proc/<launcher pid>/fd/<n>``: once that launcher is gone and its pid reused, it
    leads to whatever the new process has as fd n (another container's files, a host directory).
    So the directory opened is checked against the identity the launcher recorded when it took
    its fd, and the caller reads through this fd only, never by the path again.  OSError
    (``ESTALE``) if it is not that tmpfs; ``ENOENT`` if there is no link or record.
    """
    with open(dirs.held_writable_id, encoding="ascii") as f:
        want = tuple(int(n) for n in f.read().split())
    # Follows the link (a /proc magic link: the launcher's very fd), never a symlink below it.
    fd = os.open(dirs.held_writable, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != want:
            raise OSError(
                errno.ESTALE,
                f"not the container's writable tmpfs (device/inode {st.st_dev}/{st.st_ino}, "
                f"recorded {want[0]}/{want[1]}): its launcher has exited",
                dirs.held_writable,
            )
    except BaseException:
        os.close(fd)
        raise
    return fd


def empty_held_writable(base: str) -> None:
    """Delete what a container's writable tmpfs holds, through the launcher's link to it.

    The cleaner does this before the launcher closes its fd: the last reference to a tmpfs frees
    every inode in it, and ten thousand files must not be freed on the launcher's loop.  The tmpfs
    root holds only the ``upper.N``/``work.N``/``tmp``/``tmpfs.N`` directories the first process
    made (the container sees the overlays and those binds, never this root).
    """
    held = os.path.join(base, HELD_WRITABLE)
    if not os.path.islink(held):
        return
    fd = os.open(held, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)  # follows the launcher's link
    try:
        for name in os.listdir(fd):
            remove_tree_at(fd, name)
    finally:
        os.close(fd)


@dataclass
class PreparedBind:
    fd: int  # a detached mount (open_tree clone), attached after pivot_root
    target: str
    is_dir: bool


def _layer_fd(path: str, idmap_fd: int | None, index: int, attach_at: str) -> int:
    """An O_PATH fd of a read-only (idmapped where possible) clone of one layer directory.

    The clone is attached at ``attach_at`` (in our private mount namespace; the overlay is then
    mounted on top of the stack): Linux 6.1 (Debian 12's, checked in the VM) refuses layers on
    detached mounts ("overlayfs: failed to clone lowerpath": clone_private_mount wants a mount of
    the caller's namespace); 6.18 accepts them, but attaching costs one syscall and works on both.
    """
    try:
        # No symlink in any component: a layer (or a layer's /usr) that is one, or a directory
        # above it swapped for one by a container that writes there, would clone whatever it
        # names (the layer paths pytest planned are canonical: see host/bindsource for binds).
        source = libc.open_no_symlinks(path)
    except SetupError as e:
        if e.errno == errno.ENOENT:
            raise LayerNotFoundError(
                f"layer {index}: {path!r} does not exist", path=path, errno=e.errno
            ) from None
        if e.errno == errno.ELOOP:
            raise LayerNotADirectoryError(
                f"layer {index}: {path!r} is, or is reached through, a symlink", path=path, errno=e.errno
            ) from None
        raise
    try:
        fd = libc.open_tree(
            "", libc.OPEN_TREE_CLONE | libc.OPEN_TREE_CLOEXEC | libc.AT_EMPTY_PATH, dirfd=source
        )
    finally:
        os.close(source)
    st = os.fstat(fd)
    if not stat.S_ISDIR(st.st_mode):
        os.close(fd)
        raise LayerNotADirectoryError(
            f"layer {index}: {path!r} is not a directory", path=path, errno=errno.ENOTDIR
        )
    try:
        # nodev: a device node in a layer directory (a disk, /dev/kvm) must not open inside.
        _try_idmap(fd, idmap_fd, libc.MOUNT_ATTR_RDONLY | libc.MOUNT_ATTR_NODEV, path)
        libc.move_mount_fd(fd, attach_at, what=path)
    finally:
        os.close(fd)
    return os.open(attach_at, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)


def _try_idmap(fd: int, idmap_fd: int | None, attrs: int, path: str, *, recursive: bool = False) -> None:
    """Idmap the detached mount ``fd`` to the container's range and set ``attrs`` (read-only).

    ``recursive``: the tree's submounts too -- a read-only bind must not have writable mounts
    under it.  Idmapping falls back to the top mount alone, then to none, where a filesystem
    cannot be idmapped (9p, overlayfs, tmpfs < 6.3, NFS...): files there keep their host owners
    and look like "nobody" inside, still usable.  ``attrs`` are always applied to the whole tree.
    """
    tree = libc.AT_EMPTY_PATH | (libc.AT_RECURSIVE if recursive else 0)
    if idmap_fd is not None:
        for flags in dict.fromkeys((tree, libc.AT_EMPTY_PATH)):
            try:
                libc.mount_setattr(fd, libc.MOUNT_ATTR_IDMAP, userns_fd=idmap_fd, flags=flags, what=path)
                break
            except SetupError as e:
                if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM):
                    raise
    if attrs:
        libc.mount_setattr(fd, attrs, flags=tree, what=path)


def _mkdir_owned(path: str, uid: int) -> None:
    with libc.named("mkdir", path):
        os.mkdir(path, 0o755)
    with libc.named("chown", path):
        os.chown(path, uid, uid)


def mount_image(
    spec: ContainerSpec, dirs: ContainerDirs, idmap_fd: int | None, root_uid: int
) -> list[PreparedBind]:
    """Half 1 (host root, private mount namespace): overlays at ``dirs.rootfs``, and its /dev.

    Returns the detached clones of the scratch directories (``host/writable.scratch_mounts``), which
    :func:`finish_rootfs` attaches.
    """
    with libc.named("mkdir", dirs.rootfs):
        os.mkdir(dirs.rootfs, 0o755)
    mount_writable(dirs.writable, spec.writable_size)
    for index, overlay in enumerate(spec.overlays):
        upper, work = (os.path.join(dirs.writable, f"{kind}.{index}") for kind in ("upper", "work"))
        _mkdir_owned(upper, root_uid)
        with libc.named("mkdir", work):
            os.mkdir(work, 0o700)
        if index == 0:
            _write_etc_files(upper, spec.etc_files, root_uid)
        target = dirs.rootfs if not overlay.target else _plain_dir(dirs.rootfs, overlay.target)
        _mount_overlay(target, overlay.lowers, upper, work, idmap_fd)
    _make_dev(_plain_dir(dirs.rootfs, "dev"), root_uid)
    return [
        PreparedBind(fd, target, is_dir=True) for fd, target in clone_scratch(spec, dirs.writable, root_uid)
    ]


def _make_dev(dev: str, root_uid: int) -> None:
    """The container's /dev: a small tmpfs with real device nodes, made while still host root.

    A tmpfs mounted from the host's user namespace may hold device nodes (one mounted inside a
    user namespace is always ``nodev``), so ``mknod`` here replaces six bind mounts of the host's
    nodes.  The container cannot add nodes: mknod needs CAP_MKNOD in the *host's* namespace.
    """
    libc.mount(
        "tmpfs",
        dev,
        "tmpfs",
        libc.MS_NOSUID | libc.MS_NOEXEC,
        f"mode=755,size=65536k,uid={root_uid},gid={root_uid}",
    )
    for name, major, minor in DEVICES:
        path = os.path.join(dev, name)
        with libc.named("mknod", path):
            os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(major, minor))
        with libc.named("chmod", path):
            os.chmod(path, 0o666)  # mknod's mode went through the umask
        with libc.named("chown", path):
            os.chown(path, root_uid, root_uid)
    for sub in ("pts", "shm", "mqueue"):
        with libc.named("mkdir", os.path.join(dev, sub)):
            os.mkdir(os.path.join(dev, sub), 0o755)
    for name, target in DEV_LINKS:
        link = os.path.join(dev, name)
        with libc.named("symlink", link):
            os.symlink(target, link)
        with libc.named("lchown", link):
            os.lchown(link, root_uid, root_uid)


def _mount_overlay(target: str, lowers: Iterable[str], upper: str, work: str, idmap_fd: int | None) -> None:
    fds: list[int] = []
    try:
        for i, path in enumerate(lowers):
            fds.append(_layer_fd(path, idmap_fd, i, target))
        with libc.named("open", upper):
            ufd = os.open(upper, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        with libc.named("open", work):
            wfd = os.open(work, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        fds += [ufd, wfd]
        lowerdir = ":".join(f"/proc/self/fd/{fd}" for fd in fds[:-2])
        data = f"lowerdir={lowerdir},upperdir=/proc/self/fd/{ufd},workdir=/proc/self/fd/{wfd}"
        # volatile (Linux >= 5.10): the upper layer is thrown away with the container, so skip
        # its syncs.  nodev: the lowers are nodev, but the overlay is a mount of its own and
        # would open a device node of a layer again.
        libc.mount("overlay", target, "overlay", libc.MS_NODEV, data + ",volatile")
    finally:
        for fd in fds:
            os.close(fd)


def _write_etc_files(upper: str, files: Iterable[tuple[str, str]], root_uid: int) -> None:
    files = list(files)
    if not files:
        return
    etc = os.path.join(upper, "etc")
    _mkdir_owned(etc, root_uid)
    for name, content in files:
        path = os.path.join(etc, name)
        with libc.named("open", path):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            with libc.named("write", path):
                os.write(fd, content.encode())
            with libc.named("fchown", path):
                os.fchown(fd, root_uid, root_uid)
        finally:
            os.close(fd)


def _plain_dir(root: str, rel: str) -> str:
    """``root/rel`` after checking that no component is a symlink or a non-directory.

    Setup runs before any container process exists, so nothing can swap a component between this
    check and the mount; what we guard against is an *image* that ships ``/proc`` or ``/usr`` as a
    symlink to a host path (runc CVE-2019-19921, CVE-2023-27561).
    """
    path = root
    for part in rel.strip("/").split("/"):
        path = os.path.join(path, part)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            with libc.named("mkdir", path):
                os.mkdir(path, 0o755)
            continue
        if not stat.S_ISDIR(st.st_mode):
            kind = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a directory"
            raise SetupError(
                f"/{rel} in the image is {kind}; it must be mounted on an ordinary directory",
                call="mount",
                path="/" + rel,
                errno=errno.ENOTDIR,
                hint="fix the image layer that replaces it",
            )
    return path


def clone_binds(
    mounts: Iterable[BindMount], source_fds: Iterable[int], idmap_fd: int | None
) -> list[PreparedBind]:
    """Half 0 (host root, still in the launcher's mount namespace): detached clones of the sources.

    Each source comes as the O_PATH fd pytest opened (host/bindsource) and is cloned from that fd,
    never looked up by path again: a path would be walked a second time, through whatever symlink
    a container planted or swapped in meanwhile (issue 9, item 1).  This must happen before the
    private mount namespace: open_tree clones only a mount of the caller's namespace
    (``may_copy_tree``), and the fds name mounts of the host's.
    """
    mounts, source_fds = list(mounts), list(source_fds)
    if len(mounts) != len(source_fds):
        raise SetupError(
            f"mounts: {len(source_fds)} source fds for {len(mounts)} mounts",
            call="open_tree",
            errno=errno.EINVAL,
        )
    binds: list[PreparedBind] = []
    try:
        for m, source_fd in zip(mounts, source_fds, strict=True):
            binds.append(_clone_bind(m, source_fd, idmap_fd))
    except BaseException:
        for b in binds:
            os.close(b.fd)
        raise
    return binds


def _clone_bind(m: BindMount, source_fd: int, idmap_fd: int | None) -> PreparedBind:
    flags = libc.OPEN_TREE_CLONE | libc.OPEN_TREE_CLOEXEC | libc.AT_RECURSIVE | libc.AT_EMPTY_PATH
    try:
        fd = libc.open_tree("", flags, dirfd=source_fd)
    except SetupError as e:
        raise SetupError(
            f"mounts: cannot bind {m.source!r}: {os.strerror(e.errno or 0)}",
            call="open_tree",
            path=m.source,
            errno=e.errno or 0,
        ) from None
    try:
        st = os.fstat(fd)
        if m.identity is not None and (st.st_dev, st.st_ino) != m.identity:
            raise SetupError(
                f"mounts: {m.source!r} is no longer the object run() resolved; refusing to mount it",
                call="open_tree",
                path=m.source,
                errno=errno.ESTALE,
            )
        # Private: a clone of a shared host mount joins its peer group, and mounts made under it
        # inside would propagate to the host (the old path-based clone came after MS_PRIVATE).
        libc.mount_setattr(fd, 0, flags=libc.AT_EMPTY_PATH | libc.AT_RECURSIVE, propagation=libc.MS_PRIVATE)
        # nodev: a device node in a bind source (a disk, /dev/kvm) must not open inside.
        attrs = libc.MOUNT_ATTR_NODEV | (libc.MOUNT_ATTR_RDONLY if m.read_only else 0)
        _try_idmap(fd, idmap_fd, attrs, m.source, recursive=True)
    except BaseException:
        os.close(fd)
        raise
    return PreparedBind(fd, m.target, stat.S_ISDIR(st.st_mode))


def mount_proc(rootfs: str) -> None:
    """The container's /proc, mounted by its PID 1 while still host root (see launcher.create)."""
    libc.mount("proc", _plain_dir(rootfs, "proc"), "proc", _PROC_FLAGS)


def mount_sysfs(rootfs: str) -> None:
    """/sys, read-only, for the network namespace we are in (host root: see launcher.create)."""
    libc.mount("sysfs", _plain_dir(rootfs, "sys"), "sysfs", _PROC_FLAGS | libc.MS_RDONLY)


def mask_plan() -> list[tuple[str, bool]]:
    """(path, is_directory) of each masked path this kernel has; computed once per launcher."""
    plan = []
    for rel in MASKED_PATHS:
        try:
            plan.append((rel, stat.S_ISDIR(os.lstat("/" + rel).st_mode)))
        except OSError:
            continue
    return plan


def finish_rootfs(
    spec: ContainerSpec,
    binds: list[PreparedBind],
    masks: list[tuple[str, bool]],
    *,
    scratch: Iterable[PreparedBind] = (),
    cgroup2: bool,
    sysfs: bool = True,
) -> None:
    """Half 2 (PID 1, container namespaces): system mounts, masks, pivot_root, user mounts.

    Starts in the container's state directory (``rootfs/`` is relative to it): as an unprivileged
    host uid we could not walk the state directory's absolute path.
    """
    libc.mount("rootfs", "rootfs", None, libc.MS_BIND | libc.MS_REC)  # an unlocked new root
    with libc.named("chdir", "rootfs"):
        os.chdir("rootfs")
    _forbid_nested_user_namespaces()
    if sysfs:  # else mount_sysfs did, before the user namespace
        libc.mount("sysfs", _plain_dir(".", "sys"), "sysfs", _PROC_FLAGS | libc.MS_RDONLY)
    if cgroup2:
        with contextlib.suppress(SetupError):
            libc.mount("cgroup2", "sys/fs/cgroup", "cgroup2", _PROC_FLAGS | libc.MS_RDONLY)
    _mount_dev_filesystems()
    _mask_paths(masks)
    libc.pivot_root(".", ".")
    libc.umount2(".", libc.MNT_DETACH)
    with libc.named("chdir", "/"):
        os.chdir("/")
    user_targets = {t.target for t in spec.tmpfs} | {b.target for b in binds}
    # In mount_image's order (writable.scratch_mounts): /tmp, then tmpfs= in order, then binds, as before
    # (a later target may lie below an earlier one).
    scratch = list(scratch)
    if "/tmp" not in user_targets:
        _attach_bind(scratch.pop(0))
    for t in spec.tmpfs:
        if t.size is None:
            _attach_bind(scratch.pop(0))
        else:
            _mount_tmpfs(t)
    for b in binds:
        _attach_bind(b)
    if spec.read_only:
        # Every overlay of the image: on the host base /usr (and /lib* where not usr-merged) are
        # overlays of their own, not part of the root mount.  (One hidden under a user's mount
        # is out of reach; by path we would hit the user's mount instead.)
        overlays = ["/" + o.target for o in spec.overlays if o.target]
        for target in ["/"] + [t for t in overlays if t not in user_targets]:
            libc.mount_setattr(libc.AT_FDCWD, libc.MOUNT_ATTR_RDONLY, path=target, flags=0)


def _forbid_nested_user_namespaces() -> None:
    """Creating user namespaces inside reaches kernel code written for root (CVE-2022-0185 class).

    Limit 0 in the container's namespace forbids it below, as bwrap --disable-userns does; /proc/sys
    becomes read-only right after, so the container cannot raise it again.
    """
    limit = "proc/sys/user/max_user_namespaces"
    with libc.named("open", limit):
        fd = os.open(limit, os.O_WRONLY | os.O_CLOEXEC)
    try:
        with libc.named("write", limit):
            os.write(fd, b"0")
    finally:
        os.close(fd)


def _mount_dev_filesystems() -> None:
    """The parts of /dev that must belong to the container's own namespaces."""
    libc.mount(
        "devpts", "dev/pts", "devpts", libc.MS_NOSUID | libc.MS_NOEXEC, "newinstance,ptmxmode=0666,mode=0620"
    )
    libc.mount(
        "shm", "dev/shm", "tmpfs", libc.MS_NOSUID | libc.MS_NODEV | libc.MS_NOEXEC, "mode=1777,size=65536k"
    )
    libc.mount("mqueue", "dev/mqueue", "mqueue", libc.MS_NOSUID | libc.MS_NODEV | libc.MS_NOEXEC)


def _mask_paths(masks: list[tuple[str, bool]]) -> None:
    for rel, is_dir in masks:
        try:
            if is_dir:
                libc.mount("tmpfs", rel, "tmpfs", libc.MS_RDONLY | _PROC_FLAGS, "size=0,mode=0555")
            else:
                libc.mount("dev/null", rel, None, libc.MS_BIND)
        except SetupError as e:
            if e.errno not in (errno.ENOENT, errno.ENOTDIR):
                raise
    for rel in READONLY_PATHS:
        try:
            libc.mount(rel, rel, None, libc.MS_BIND | libc.MS_REC)
        except SetupError as e:
            if e.errno == errno.ENOENT:
                continue
            raise
        # mount_setattr changes only the bits asked for, so the locked nosuid/nodev/noexec of
        # procfs stay as they are (a MS_REMOUNT would have to repeat them or fail with EPERM).
        libc.mount_setattr(libc.AT_FDCWD, libc.MOUNT_ATTR_RDONLY, path=rel, flags=libc.AT_RECURSIVE)


def _mount_tmpfs(t: TmpfsMount) -> None:
    """A ``tmpfs=`` mount given a size: a tmpfs of its own, bounded by that size alone (the
    sizeless ones and /tmp are binds of the writable tmpfs: see host/writable)."""
    with libc.named("mkdir", t.target):
        os.makedirs(t.target, exist_ok=True)
    data = f"mode={t.mode:o}" + tmpfs_bounds(t.size)
    libc.mount("tmpfs", t.target, "tmpfs", libc.MS_NOSUID | libc.MS_NODEV, data)


def _attach_bind(b: PreparedBind) -> None:
    # After pivot_root, symlinks in the target resolve inside the container's root.
    with libc.named("mkdir", b.target):
        os.makedirs(b.target if b.is_dir else os.path.dirname(b.target), exist_ok=True)
    if not b.is_dir and not os.path.lexists(b.target):
        with libc.named("open", b.target):
            os.close(os.open(b.target, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644))
    libc.move_mount_fd(b.fd, b.target)
    os.close(b.fd)
