"""Who owns a container's user namespace, and the per-user kernel limits it starts with.

The kernel counts some resources per user -- inotify instances and watches, fanotify groups,
namespaces, queued signals, message-queue bytes -- and charges them at every level of the chain
of user namespaces: in the parent namespace, to the uid that *owns* the child, i.e. the euid
that created it (kernel/ucount.c: ``inc_ucount`` and ``inc_rlimit_get_ucounts`` walk
``ns->ucounts``).  Created by host root, every container spent host root's budget: one container
with ``memory="64m", pids=4`` took all 128 inotify instances and queued 96,361 signals, after
which host root's ``inotify_init1`` failed with EMFILE and its ``sigqueue`` with EAGAIN (issue
9, item 3).  So the container's first process, once its host-root work is done, becomes a host
uid of its own (:func:`become_owner`, :func:`~pytest_sandbox.core.naming.namespace_owner_uid`)
and creates the namespace as that uid; each live container is then one host user, with one
user's budget, which it shares with no one.

The budget: the namespace's ``rlimit_max`` -- the ceiling on what its whole tree may queue --
is copied from the creator's rlimits at creation (``create_user_ns``), so :data:`RLIMITS` are set
first; the per-namespace counters (``/proc/sys/user/max_*``, INT_MAX in a new namespace) are set
inside it to the host's per-user values (:func:`set_namespace_limits`), so a program reading
them sees the limits that hold.  The command runs without CAP_SYS_RESOURCE
(:data:`~pytest_sandbox.launcher.process.DEFAULT_CAPS`): it can lower these, never raise them.
"""

from __future__ import annotations

import functools
import os
import resource
import signal
from dataclasses import dataclass

from ..core.naming import namespace_owner_uid
from ..host import libc

CAP_SYS_ADMIN = 21
CAP_SYS_RESOURCE = 24
PR_SET_KEEPCAPS = 8
NOFILE = 1 << 20  # podman's default RLIMIT_NOFILE, soft and hard (containers.conf default_ulimits)
MSGQUEUE = 819200  # the kernel's default RLIMIT_MSGQUEUE (MQ_BYTES_MAX, include/linux/mqueue.h)
_USER_SYSCTLS = "/proc/sys/user"


@dataclass(frozen=True)
class UserLimits:
    """rlimits (soft = hard) and ``/proc/sys/user`` values every container starts with."""

    rlimits: tuple[tuple[int, int], ...]
    sysctls: tuple[tuple[str, int], ...]


def _read_int(path: str, default: int) -> int:
    try:
        with open(path) as f:
            return int(f.read())
    except (OSError, ValueError):
        return default


def _has_capability(cap: int) -> bool:
    try:
        with open("/proc/self/status") as f:
            line = next(x for x in f if x.startswith("CapEff:"))
    except (OSError, StopIteration):
        return False
    return bool(int(line.split()[1], 16) >> cap & 1)


@functools.cache
def host_limits() -> UserLimits:
    """Read once, in the launcher (see LaunchContext): its forks inherit the cached answer.

    RLIMIT_SIGPENDING is the kernel's own default for a user's first process, threads-max / 2
    (``fork_init``): what the reviewer's container reached, now per container instead of shared
    with host root.  RLIMIT_NOFILE is podman's, bounded by fs.nr_open (setrlimit's EPERM above it).
    """
    wanted = (
        (resource.RLIMIT_SIGPENDING, max(1, _read_int("/proc/sys/kernel/threads-max", 1 << 16) // 2)),
        (resource.RLIMIT_MSGQUEUE, MSGQUEUE),
        (resource.RLIMIT_NOFILE, min(NOFILE, _read_int("/proc/sys/fs/nr_open", NOFILE))),
    )
    # Without CAP_SYS_RESOURCE (a launcher inside a container whose runtime dropped it) a hard
    # limit cannot be raised: then the launcher's own hard limit is the most there is.
    raise_ok = _has_capability(CAP_SYS_RESOURCE)
    rlimits = tuple(
        (which, value if raise_ok else min(value, resource.getrlimit(which)[1])) for which, value in wanted
    )
    try:
        names = sorted(n for n in os.listdir(_USER_SYSCTLS) if n.startswith("max_"))
    except OSError:
        names = []
    names = [n for n in names if n != "max_user_namespaces"]  # rootfs sets 0: no nested ones
    sysctls = tuple((n, v) for n in names if (v := _read_int(f"{_USER_SYSCTLS}/{n}", -1)) >= 0)
    return UserLimits(rlimits, sysctls)


def set_rlimits(limits: UserLimits) -> None:
    """The container's rlimits, set while host root (raising a hard limit needs CAP_SYS_RESOURCE).

    The container's init and exec helpers both set them, so every command starts with the same.
    """
    for which, value in limits.rlimits:
        with libc.named("setrlimit"):
            resource.setrlimit(which, (value, value))


def become_owner(limits: UserLimits) -> int:
    """Set the rlimits and switch from host root to this container's own host uid; return it.

    Call right before ``unshare(CLONE_NEWUSER)``, after every step that needs host root (mounts,
    cgroup, joining a prepared network namespace): from here on we have no capability over any
    host object.  CAP_SYS_ADMIN alone is kept (PR_SET_KEEPCAPS, then capset) for the unshare
    only, where it makes the creation privileged: a kernel restricting unprivileged user
    namespaces (Ubuntu's apparmor_restrict_unprivileged_userns, Debian's
    kernel.unprivileged_userns_clone=0) would otherwise refuse it, or deny us capabilities in
    it.  The namespace's owner is our euid either way; the new namespace gives us its own full
    set and leaves no host capability.
    """
    set_rlimits(limits)
    # /proc is still the launcher's: /proc/self names our pid there (getpid() says 1, the PID
    # namespace's view).  Pids are unique among live processes, so owners are unique too.
    owner = namespace_owner_uid(int(os.readlink("/proc/self")))
    with libc.named("setgroups"):
        os.setgroups([])  # host root's supplementary groups must not come along
    libc.prctl(PR_SET_KEEPCAPS, 1)
    with libc.named("setresgid"):
        os.setresgid(owner, owner, owner)
    with libc.named("setresuid"):
        os.setresuid(owner, owner, owner)
    libc.prctl(PR_SET_KEEPCAPS, 0)
    libc.capset(1 << CAP_SYS_ADMIN, 1 << CAP_SYS_ADMIN, 0)
    # The euid change cleared the parent-death signal and reset "dumpable" (commit_creds): a
    # dumpable process of a uid with full capabilities over the namespace could be ptraced.
    libc.prctl(libc.PR_SET_PDEATHSIG, signal.SIGKILL)
    libc.prctl(libc.PR_SET_DUMPABLE, 0)
    return owner


def set_namespace_limits(limits: UserLimits) -> None:
    """Write the host's per-user values into ``/proc/sys/user`` of the namespace we are root of.

    Those files show the values of the *caller's* user namespace (``set_lookup``), writable with
    CAP_SYS_RESOURCE there (``set_permissions``); a new namespace starts at INT_MAX.
    """
    for name, value in limits.sysctls:
        path = f"{_USER_SYSCTLS}/{name}"
        with libc.named("write", path):
            fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.write(fd, str(value).encode())
            finally:
                os.close(fd)
