"""The container's first process, which is also its PID 1: from a fork of the launcher to init.

The launcher forks us into a new PID namespace (it unshares CLONE_NEWPID just for that fork), so
we are PID 1 from the start and no second fork is needed (a forked Python process costs ~0.7 ms).
Order (each step needs the one before; see docs/architecture.md, "How a container is born"):

1. (host root) close every inherited fd we do not need, become non-dumpable, join the cgroup
   leaf (before any namespace: the cgroup namespace's root is the cgroup we are in when we
   unshare it) -- a *spare* does this ahead of time, then waits for a spec -- and put stdio on
   the container's output pipes.
2. (host root) clone the bind sources from the fds pytest opened (in the launcher's mount
   namespace: open_tree clones only mounts of the caller's); private mount namespace; mount
   the image's overlays, /dev and /proc -- see :mod:`pytest_sandbox.host.rootfs` for why this
   happens before the user namespace exists.  /proc is mounted here because our PID namespace
   is owned by the host's user namespace: the container's root could not mount it, and cannot
   mount another one.
3. become the container's own unprivileged host uid (:mod:`.userns`: the namespace's usage is
   charged to it, not to host root), unshare the user namespace; the launcher writes
   uid_map/gid_map (only a process with CAP_SETUID in the *parent* namespace may write a
   multi-id map); become root in it.
4. unshare mount, UTS, IPC, network and cgroup namespaces, all owned by the new user namespace,
   so the container's root has capabilities over them (it can bind port 80, set its hostname).
   A container on a private network joins instead the network namespace pytest prepared for it
   (owned by the host's user namespace: see :mod:`pytest_sandbox.net.netlink`), in step 2, while it
   is still host root -- and mounts its /sys there, as a user namespace that does not own the
   network namespace may not mount sysfs (``net_current_may_mount``).
5. finish the rootfs, pivot, and become init (:func:`~pytest_sandbox.launcher.init.run_init`).
"""

from __future__ import annotations

import os
import select
import signal
import socket
from dataclasses import dataclass, field
from typing import NoReturn

from ..core.spec import ContainerSpec
from ..host import libc, rootfs
from ..host.cgroups.base import Cgroup
from . import fdpass, trace, userns
from .init import report_setup_failure, run_init
from .protocol import UsernsMade, decode_handover, decode_spec, write_event

# Made after the user namespace, so that they are owned by it and the container's root has
# capabilities over them (and nothing else).  The PID namespace is not here: the launcher creates
# it when it forks us (see first_process).
NAMESPACES = (
    libc.CLONE_NEWNS | libc.CLONE_NEWUTS | libc.CLONE_NEWIPC | libc.CLONE_NEWNET | libc.CLONE_NEWCGROUP
)
NAMESPACES_BUT_NET = NAMESPACES & ~libc.CLONE_NEWNET


def open_stdio(stdin: str | None, output_fds: tuple[int, int]) -> None:
    """fds 0, 1, 2 of the container: the input file (or /dev/null) and the write ends of its output
    pipes -- never a log file, which the command could truncate or grow sparse (issue 9, item 2):
    the launcher copies the pipes into capped, rotated files (:mod:`.logs`)."""
    with libc.named("open", stdin or "/dev/null"):
        fd = os.open(stdin or "/dev/null", os.O_RDONLY | os.O_CLOEXEC)
    for target, source in enumerate((fd, *output_fds)):
        os.dup2(source, target)  # dup2 clears close-on-exec on the target: the command inherits it
        os.close(source)


@dataclass(frozen=True)
class LaunchContext:
    """What every container's first process gets from the launcher, the same for all."""

    lifeline_fd: int
    idmap_fd: int | None
    root_uid: int
    cgroup2: bool
    masks: list[tuple[str, bool]]
    limits: userns.UserLimits = field(default_factory=userns.host_limits)  # read in the launcher


@dataclass(frozen=True)
class Pipes:
    status_fd: int  # events to the launcher
    go_fd: int  # the launcher's "id maps written"
    spec_fd: int = -1  # a spare reads its spec here
    output_fds: tuple[int, int] = (-1, -1)  # write ends of the stdout and stderr pipes


def become_namespace_root() -> None:
    """Become uid/gid 0 of the user namespace just made or entered, and restore what that resets.

    Shared by the container's init and the exec helper, so that both end up alike: changing the
    euid clears the parent-death signal and resets "dumpable" to fs.suid_dumpable
    (commit_creds), so both are set again; a fresh anonymous session keyring, so the invoker's
    keys are not visible (runc does the same); and a known umask for what the command creates.
    """
    with libc.named("setresgid"):
        os.setresgid(0, 0, 0)
    with libc.named("setresuid"):
        os.setresuid(0, 0, 0)
    libc.prctl(libc.PR_SET_PDEATHSIG, signal.SIGKILL)
    libc.prctl(libc.PR_SET_DUMPABLE, 0)
    libc.join_new_session_keyring()
    os.umask(0o022)


def _join_prepared_netns(path: str) -> None:
    """setns into the network namespace pytest made for this container (``/proc/<pid>/fd/<n>``)."""
    with libc.named("open", path):
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        libc.setns(fd, libc.CLONE_NEWNET)  # EINVAL unless the fd is a network namespace
    finally:
        os.close(fd)


def launcher_gone(lifeline_fd: int) -> bool:
    """Nothing is ever written to the lifeline: readable means its write end, the launcher, is gone.

    (getppid() cannot tell: as PID 1 of a new PID namespace our parent is invisible, ppid 0.)
    """
    return bool(select.select([lifeline_fd], [], [], 0)[0])


def first_process(
    ctx: LaunchContext,
    pipes: Pipes,
    cgroup: Cgroup | None,
    spec: ContainerSpec | None = None,
    dirs: rootfs.ContainerDirs | None = None,
    *,
    mount_fds: tuple[int, ...] = (),
) -> NoReturn:
    """Run in a fresh fork of the launcher.  Never returns.

    Without ``spec`` this is a *spare*: it joins its cgroup now -- on cgroup v1 the first attach
    after a quiet moment waits for an RCU grace period, 5-20 ms -- and then waits for the launcher
    to send the spec of the next container, which therefore starts without that wait.
    """
    try:
        signal.set_wakeup_fd(-1)  # the launcher's wakeup fd number must not hit a file we open
        libc.prctl(libc.PR_SET_PDEATHSIG, signal.SIGKILL)
        if launcher_gone(ctx.lifeline_fd):
            os._exit(137)  # the launcher died before prctl took effect
        keep = {pipes.status_fd, pipes.go_fd, pipes.spec_fd, ctx.lifeline_fd, *mount_fds, *pipes.output_fds}
        keep |= trace.fds()
        libc.close_fds_except(keep | ({ctx.idmap_fd} if ctx.idmap_fd is not None else set()))
        libc.set_process_name("psbx-spare" if spec is None else "psbx-init")
        # Non-dumpable: processes inside cannot ptrace us or our PID 1, nor open our /proc/<pid>/
        # files (runc CVE-2016-9962; BenchExec does the same).
        libc.prctl(libc.PR_SET_DUMPABLE, 0)
        if cgroup is not None:
            cgroup.attach(0)
        if spec is None or dirs is None:
            spec, dirs, mount_fds = _receive_spec(pipes.spec_fd)
            libc.set_process_name("psbx-init")
        trace.event("first: in cgroup, has spec")
        _become_container(ctx, pipes, spec, dirs, mount_fds)
    except BaseException as e:
        report_setup_failure(pipes.status_fd, e)


def _receive_spec(fd: int) -> tuple[ContainerSpec, rootfs.ContainerDirs, tuple[int, ...]]:
    """The spec on the spare's socket (read to EOF), and the bind sources' fds that came with it."""
    chunks: list[bytes] = []
    fds: list[int] = []
    with socket.socket(fileno=fd) as channel:
        while True:
            data, got = fdpass.recv(channel)
            fds += got
            if not data:
                break
            chunks.append(data)
    if not chunks:
        os._exit(0)  # the launcher is shutting down and no longer needs this spare
    directory, spec = decode_handover(b"".join(chunks))
    return decode_spec(spec), rootfs.ContainerDirs(directory), tuple(fds)


def _become_container(
    ctx: LaunchContext,
    pipes: Pipes,
    spec: ContainerSpec,
    dirs: rootfs.ContainerDirs,
    mount_fds: tuple[int, ...],
) -> NoReturn:
    open_stdio(spec.stdin, pipes.output_fds)
    binds = rootfs.clone_binds(spec.mounts, mount_fds, ctx.idmap_fd)
    for fd in mount_fds:
        os.close(fd)  # an fd of a host directory must never reach the container
    libc.unshare(libc.CLONE_NEWNS)
    # Private, so nothing we mount propagates back to the host's namespace (and vice versa).
    libc.mount(None, "/", None, libc.MS_REC | libc.MS_PRIVATE)
    scratch = rootfs.mount_image(spec, dirs, ctx.idmap_fd, ctx.root_uid)
    rootfs.mount_proc(dirs.rootfs)
    if spec.netns is not None:
        _join_prepared_netns(spec.netns)
        rootfs.mount_sysfs(dirs.rootfs)  # tagged with the namespace just joined: its interfaces
    trace.event("first: image mounted")
    with libc.named("chdir", dirs.base):
        os.chdir(dirs.base)  # we continue from here by relative paths (see finish_rootfs)
    if ctx.idmap_fd is not None:
        os.close(ctx.idmap_fd)
    userns.become_owner(ctx.limits)  # host root no more: the namespace is charged to its own uid
    libc.unshare(libc.CLONE_NEWUSER)
    write_event(pipes.status_fd, UsernsMade())
    if os.read(pipes.go_fd, 1) != b"g":
        os._exit(125)  # the launcher could not write our id maps and reports that itself
    os.close(pipes.go_fd)
    trace.event("first: id maps written")
    become_namespace_root()
    userns.set_namespace_limits(ctx.limits)
    if spec.netns is None:
        libc.unshare(NAMESPACES)
        libc.loopback_up()  # 127.0.0.1 works inside, as in Docker's network=none
    else:
        libc.unshare(NAMESPACES_BUT_NET)  # joined in step 2; pytest brought lo and eth* up
    libc.sethostname(spec.hostname)
    trace.event("first: namespaces unshared")
    rootfs.finish_rootfs(
        spec, binds, ctx.masks, scratch=scratch, cgroup2=ctx.cgroup2, sysfs=spec.netns is None
    )
    trace.event("init: rootfs ready")
    run_init(spec.process, spec.hostname, pipes.status_fd, ctx.lifeline_fd)
