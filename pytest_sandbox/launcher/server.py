# Long module: one event loop's state machine -- every handler reads and moves the same entities
# (spare, containers, execs, their pipes and waiters); split up, each part would need all of it.
"""The launcher: a small, single-threaded fork server, one per pytest process (stdlib only).

Why it exists: a pytest process is multi-threaded and may be large; forking namespaces straight
out of it is unsafe (a lock held by another thread stays locked in the child forever) and slow
(fork copies page tables in proportion to the parent's memory).  This process is started fresh as
``python -I -S`` with only stdlib imports, never starts a thread, and forks one child per container
(:mod:`.create`) or exec (:mod:`.enter`).  It is the parent of every container's init (each forked
into a PID namespace of its own), writes their uid/gid maps, owns their cgroups and state
directories, and reports starts and exits to the client over the socket (:mod:`.protocol`).

Death handling: the client's end of the socket closes when the pytest process exits, however it
exits (SIGKILL included), and the launcher then kills every container, removes every cgroup and
state directory, and exits.  If the launcher itself is SIGKILLed, every container init sees its
*lifeline* pipe close and takes its PID namespace down; cgroup and state directories left behind
are swept by the next session (their names carry the owner's pid and start time).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import errno
import gc
import os
import secrets
import select
import selectors
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..core.errors import CgroupUnavailableError, ContainerNotRunningError, SandboxError, SetupError, to_wire
from ..core.limits import Limits
from ..core.naming import ID_RANGE, cgroup_leaf_name, proc_stat
from ..core.spec import ContainerSpec
from ..host import libc
from ..host.cgroups import detect
from ..host.cgroups.base import Cgroup, CgroupBackend, CgroupStats
from ..host.rootfs import WRITABLE, ContainerDirs, mask_plan, record_held_writable
from . import fdpass, protocol, trace
from .cleaner import Cleaner, remove_quietly
from .create import LaunchContext, Pipes, first_process
from .enter import exec_main
from .logs import LogLimits, LogPipe, output_pipes
from .protocol import (
    Ack,
    CgroupFiles,
    CommandExited,
    CommandStarted,
    CreateRequest,
    ExecRequest,
    Exited,
    Hello,
    LimitsRequest,
    Op,
    RemoveRequest,
    Reply,
    RunRequest,
    SetupFailed,
    ShutdownRequest,
    SignalRequest,
    Started,
    StatsRequest,
    StatusEvent,
    UsernsMade,
    WaitRequest,
)

REAP_POLL = 1.0  # seconds: how often to look for an exit no SIGCHLD reported (see serve)
SPEC_PIPE_SIZE = 1 << 20  # a spare's spec is written in one go; a larger spec gets a fresh fork
_SO_SNDBUFFORCE = 32  # socket(7); not in Python's socket module
# Sent straight to the command, not through its init: the init cannot forward SIGSTOP, and keeps
# SIGPIPE and SIGCHLD for itself (init._NOT_FORWARDED) -- through it they would be lost.
_DIRECT_SIGNALS = frozenset({signal.SIGSTOP, signal.SIGCONT, signal.SIGPIPE, signal.SIGCHLD})


@dataclass
class Spare:
    """A container's first process forked ahead of time and already in a fresh cgroup."""

    pid: int
    status_fd: int
    go_fd: int
    spec_fd: int
    cgroup: Cgroup
    output_fds: tuple[int, int]  # read ends of its stdout and stderr pipes


@dataclass
class Entity:
    """A container (its init) or an exec (its helper), as the launcher tracks it."""

    id: str
    kind: str  # "container" or "exec"
    pid: int  # our child: the container's first process (its PID 1), or the exec helper
    status_fd: int
    go_fd: int = -1
    dirs: ContainerDirs | None = None
    cgroup: Cgroup | None = None
    parent: Entity | None = None
    spec: ContainerSpec | None = None
    pidfd: int = -1  # of ``pid``: signals and setns without the pid-reuse race
    main_pid: int = 0  # host pid of the command (0 if it exited before we could look it up)
    main_pidfd: int = -1
    started: bool = False
    create_rid: int | None = None
    until_exit: bool = False  # answer create only at exit (run()): one round trip instead of two
    waiters: list[int] = field(default_factory=list)
    remove_rids: list[int] = field(default_factory=list)
    exit: CommandExited | None = None
    error: protocol.Wire | None = None
    stats: CgroupStats | None = None
    lines: protocol.LineBuffer = field(default_factory=protocol.LineBuffer)
    logs: tuple[LogPipe, ...] = ()  # its stdout and stderr, copied into capped files
    reaped: bool = False
    wait_status: int | None = None  # of ``pid``, once reaped
    pipe_closed: bool = False
    exited: bool = False  # the command's exit is known and was answered
    finished: bool = False  # and every process of it is gone
    started_at: float = field(default_factory=time.monotonic)
    exited_at: float = 0.0
    counters_before: tuple[int, int] = (0, 0)  # an exec's container's OOM kills and pids hits at start

    @property
    def running(self) -> bool:
        return self.started and not self.exited


class Launcher:
    def __init__(
        self, sock: socket.socket, owner: str, uid_base: int, cgroup_root: str, log_limits: LogLimits
    ) -> None:
        self.sock = sock
        self.log_limits = log_limits
        self.log_pipes: set[LogPipe] = set()  # open until EOF, or the container's end
        self.owner = owner
        self.uid_base = uid_base
        self.pid = os.getpid()
        self.sel = selectors.DefaultSelector()
        self.frames = protocol.FrameBuffer()
        self.fd_inbox: collections.deque[int] = collections.deque()  # SCM_RIGHTS not yet claimed
        self.entities: dict[str, Entity] = {}
        self.by_pid: dict[int, Entity] = {}
        self.backend: CgroupBackend = detect(cgroup_root)
        self.lifeline_r, self.lifeline_w = os.pipe()
        self.own_pidns = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
        self.idmap_fd = self._make_idmap_userns()
        self.cleaner = Cleaner(keep=trace.fds())
        self.ctx = LaunchContext(
            lifeline_fd=self.lifeline_r,
            idmap_fd=self.idmap_fd,
            root_uid=self.uid_base,
            cgroup2=self.backend.name == "v2",
            masks=mask_plan(),
        )
        self.spare: Spare | None = None
        # state directory -> our O_PATH fd of its container's writable tmpfs (see _hold_writable)
        self.writable_fds: dict[str, int] = {}
        self.spares = self.backend.name != "none"  # no cgroup, nothing slow to do ahead of time
        self.finished_count = 0
        self.running = True
        self.handlers: dict[Op, Callable[[int, Any], Reply | None]] = {
            Op.CREATE: self.op_create,
            Op.RUN: self.op_run,
            Op.EXEC: self.op_exec,
            Op.WAIT: self.op_wait,
            Op.SIGNAL: self.op_signal,
            Op.STATS: self.op_stats,
            Op.LIMITS: self.op_limits,
            Op.REMOVE: self.op_remove,
            Op.SHUTDOWN: self.op_shutdown,
        }

    # -- setup -----------------------------------------------------------------------------

    def _make_idmap_userns(self) -> int | None:
        """A user namespace with the containers' id map, used only to idmap layer mounts.

        Every container gets its own user namespace with this same map; an idmapped mount needs
        *a* namespace carrying the map at the moment the container's layers are mounted, which is
        before the container's own namespace exists.
        """
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.close(r)
                libc.unshare(libc.CLONE_NEWUSER)
                os.write(w, b"u")
                time.sleep(60)
            finally:
                os._exit(0)
        os.close(w)
        fd = None
        try:
            if os.read(r, 1) == b"u":
                write_id_maps(pid, self.uid_base)
                fd = os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            fd = None
        finally:
            os.close(r)
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        return fd

    def hello(self) -> Hello:
        return Hello(
            pid=self.pid,
            uid_base=self.uid_base,
            idmap=self.idmap_fd is not None,
            cgroup=self.backend.name,
            cgroup_describe=self.backend.describe(),
        )

    # -- event loop ------------------------------------------------------------------------

    def serve(self) -> None:
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.signal(signal.SIGTERM, lambda *_: None)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        self.sel.register(self.sock, selectors.EVENT_READ, self._on_socket)
        self.sel.register(wake_r, selectors.EVENT_READ, self._on_wakeup)
        self.sel.register(self.cleaner.done_fd, selectors.EVENT_READ, self._on_cleaned)
        self._reap()
        self._make_spare()
        next_reap = time.monotonic() + REAP_POLL
        while self.running:
            for key, _ in self.sel.select(REAP_POLL if self.by_pid else None):
                key.data(key.fileobj)
            if self.by_pid and time.monotonic() >= next_reap:
                # SIGCHLD is not the only way we learn of an exit: a child that dies while another
                # process ptraces it (strace, gdb) is reported to that tracer first, and its
                # SIGCHLD to us was seen lost (a zombie left, nothing pending, its removal hung).
                self._reap()
                next_reap = time.monotonic() + REAP_POLL
        self._shutdown()

    def _on_socket(self, _sock: object) -> None:
        try:
            data, fds = fdpass.recv(self.sock)
        except ConnectionError:
            data, fds = b"", []
        self.fd_inbox.extend(fds)
        if not data:
            self.running = False  # the pytest process is gone
            return
        for frame in self.frames.feed(data):
            if isinstance(frame, protocol.ProtocolError):
                self._refuse_frame(frame)
            else:
                self._dispatch(*frame)

    def _refuse_frame(self, error: protocol.ProtocolError) -> None:
        """A frame too large or not readable: answered (if its request id could be read), its
        descriptors closed -- whatever is in the inbox now came with it -- and nothing else."""
        while self.fd_inbox:
            os.close(self.fd_inbox.popleft())
        print(f"psbx-launcher: refused a frame: {error}", file=sys.stderr, flush=True)
        self._reply_error(error.rid, to_wire(error))

    def _on_wakeup(self, fd: object) -> None:
        assert isinstance(fd, int)
        with contextlib.suppress(BlockingIOError):
            while os.read(fd, 4096):
                pass
        self._reap()

    def _reply(self, rid: int | None, reply: Reply) -> None:
        if rid is not None and rid >= 0:
            try:
                frame = protocol.encode_reply(rid, reply)
            except protocol.ProtocolError as e:  # over the size limit: say so, never die of it
                frame = protocol.encode_error(rid, to_wire(e))
            self._send(frame)

    def _reply_error(self, rid: int | None, error: protocol.Wire) -> None:
        if rid is not None and rid >= 0:
            self._send(protocol.encode_error(rid, error))

    def _send(self, frame: bytes) -> None:
        try:
            protocol.send(self.sock, frame)
        except OSError:
            self.running = False

    def _dispatch(self, header: protocol.Wire, blob: bytes) -> None:
        rid = protocol.rid_of(header)
        fds: tuple[int, ...] = ()
        try:
            fds = fdpass.take(header, self.fd_inbox)
            request = protocol.decode_request(header, blob, fds)
            reply = self.handlers[request.op](rid, request)
        except BaseException as e:  # report, never die: other containers depend on us
            self._reply_error(rid, to_wire(e))
            return
        finally:
            for fd in fds:  # the container's first process has its own copies by now
                os.close(fd)
        if reply is not None:  # None: answered later (at start, exit or removal)
            self._reply(rid, reply)

    # -- operations ------------------------------------------------------------------------

    def op_create(self, rid: int, request: CreateRequest) -> None:
        self._create(rid, request, until_exit=False)

    def op_run(self, rid: int, request: RunRequest) -> None:
        self._create(rid, request, until_exit=True)

    def _create(self, rid: int, request: CreateRequest | RunRequest, *, until_exit: bool) -> None:
        trace.event("launcher: create")
        # Parsed here for what the launcher needs (id, limits); a spare gets the bytes as they came.
        spec = protocol.decode_spec(request.spec)
        if spec.id in self.entities:
            raise SandboxError(f"container {spec.id} already exists")
        dirs = ContainerDirs(request.directory)
        try:
            if len(request.mount_fds) != len(spec.mounts):
                raise SandboxError(
                    f"container {spec.id}: {len(request.mount_fds)} fds came for {len(spec.mounts)} mounts"
                )
            if spec.cgroup:
                spec = self._without_unsupported_default(spec)
                self.backend.check(spec.limits)
            payload = protocol.encode_handover(request.directory, request.spec)
            spare = self.spare if spec.cgroup and len(payload) < SPEC_PIPE_SIZE else None
            handed = False
            if spare is not None:
                self.spare = None
                handed = self._hand_over(spare, spec, payload, request.mount_fds)
            if spare is not None and handed:
                pid, status_r, go_w, cgroup = spare.pid, spare.status_fd, spare.go_fd, spare.cgroup
                outputs = spare.output_fds
            else:
                cgroup = None
                if spec.cgroup:
                    cgroup = self.backend.create(self.owner, cgroup_leaf_name(spec.id), spec.limits)
                pid, status_r, go_w, outputs = self._fork_first(
                    cgroup, spec, dirs, mount_fds=request.mount_fds
                )
        except BaseException:
            # Never tracked, so no remove() would delete it: the directory the client made goes now.
            remove_quietly(dirs.base)
            raise
        ent = Entity(
            spec.id,
            "container",
            pid,
            status_r,
            go_fd=go_w,
            dirs=dirs,
            cgroup=cgroup,
            spec=spec,
            create_rid=rid,
            until_exit=until_exit,
        )
        with contextlib.suppress(OSError):
            ent.pidfd = os.pidfd_open(pid)  # our child, not yet reaped: it is the right process
        self._track(ent)
        self._follow_output(ent, outputs, (dirs.stdout, dirs.stderr))
        # Now, while this container sets itself up on another CPU: the next one's spare.  Its
        # first event (the id-map request) comes about a millisecond later, after the fork is done.
        if self.spare is None:
            self._make_spare()

    def _without_unsupported_default(self, spec: ContainerSpec) -> ContainerSpec:
        """The default pids limit applies where the host has the pids controller (as podman's
        default does); a pids limit the caller asked for is checked like every limit."""
        if not spec.limits.pids_default:
            return spec
        try:
            self.backend.check(Limits(pids=spec.limits.pids))
        except CgroupUnavailableError:
            return dataclasses.replace(spec, limits=dataclasses.replace(spec.limits, pids=None))
        return spec

    def _hand_over(
        self, spare: Spare, spec: ContainerSpec, payload: bytes, mount_fds: tuple[int, ...]
    ) -> bool:
        """Give the spare its container's limits and spec; False if the spare is gone (use a fork).

        A spare may have died (its cgroup attach failed, say) before its SIGCHLD was handled:
        its pipe then says EPIPE.  A limit the cgroup refuses is the caller's error, raised.
        """
        try:
            spare.cgroup.apply(spec.limits)
            channel, spare.spec_fd = socket.socket(fileno=spare.spec_fd), -1
            with channel:  # closed after: the spare reads to EOF
                fdpass.send(channel, payload, mount_fds)
        except OSError as e:
            self._discard_spare(spare)
            if isinstance(e, (BrokenPipeError, ConnectionError)):
                return False
            raise
        except BaseException:
            self._discard_spare(spare)
            raise
        return True

    def _fork_first(
        self,
        cgroup: Cgroup | None,
        spec: ContainerSpec | None = None,
        dirs: ContainerDirs | None = None,
        spec_r: int = -1,
        mount_fds: tuple[int, ...] = (),
    ) -> tuple[int, int, int, tuple[int, int]]:
        """Fork a container's first process: (pid, status fd, go fd, read ends of its stdout and
        stderr pipes); a spare when spec is None."""
        status_r, status_w = os.pipe()
        go_r, go_w = os.pipe()
        output_r, output_w = output_pipes()
        pid = -1
        try:
            # The child is PID 1 of a new PID namespace (unshare(CLONE_NEWPID) affects only the
            # children forked after it); then we go back to forking into our own namespace.
            libc.unshare(libc.CLONE_NEWPID)
            try:
                pid = _fork()
            finally:
                if os.getpid() == self.pid:
                    self._restore_pidns()
        except BaseException:
            if pid > 0:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, 0)
            for fd in (status_r, status_w, go_r, go_w, *output_r, *output_w):
                os.close(fd)
            if cgroup is not None:
                cgroup.remove()
            raise
        if pid == 0:
            first_process(
                self.ctx, Pipes(status_w, go_r, spec_r, output_w), cgroup, spec, dirs, mount_fds=mount_fds
            )
        for fd in (status_w, go_r, *output_w):  # the write ends live only in the child: EOF is theirs
            os.close(fd)
        return pid, status_r, go_w, output_r

    def _restore_pidns(self) -> None:
        """Fork into our own PID namespace again.

        Until this succeeds, every later fork would land in the namespace just made -- a second
        ``unshare(CLONE_NEWPID)`` is refused (EINVAL) -- so a failure is retried, and if the
        kernel keeps refusing, the launcher stops: the client starts a fresh one.
        """
        error: SetupError | None = None
        for _ in range(3):
            try:
                libc.setns(self.own_pidns, libc.CLONE_NEWPID)
                return
            except SetupError as e:
                error = e
        self.running = False
        assert error is not None
        raise error

    def _make_spare(self) -> None:
        if not self.spares or not self.running:
            return
        try:
            cgroup = self.backend.create(
                self.owner, cgroup_leaf_name(secrets.token_hex(6)), Limits(), every_controller=True
            )
        except (OSError, SandboxError) as e:
            print(
                f"psbx-launcher: no spare containers ({e}); each start pays its own cgroup attach",
                file=sys.stderr,
            )
            self.spares = False
            return
        spec_r, spec_w = _spec_channel()
        try:
            pid, status_r, go_w, outputs = self._fork_first(cgroup, spec_r=spec_r)
        except OSError as e:
            # Not the caller's failure: the start that asked for this spare has its process already,
            # and the next start forks its own (and tries again for a spare).
            os.close(spec_w)
            print(f"psbx-launcher: cannot fork a spare ({e}); the next start forks its own", file=sys.stderr)
            return
        except BaseException:
            os.close(spec_w)
            raise
        finally:
            os.close(spec_r)
        self.spare = Spare(pid, status_r, go_w, spec_w, cgroup, outputs)

    def _discard_spare(self, spare: Spare, *, reaped: bool = False) -> None:
        for fd in (spare.status_fd, spare.go_fd, spare.spec_fd, *spare.output_fds):
            with contextlib.suppress(OSError):
                os.close(fd)
        if not reaped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(spare.pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(spare.pid, 0)
        try:
            spare.cgroup.remove()
        except OSError as e:
            print(f"psbx-launcher: cannot remove a spare's cgroup: {e}", file=sys.stderr)

    def op_exec(self, rid: int, request: ExecRequest) -> None:
        parent = self._container(request.parent)
        if not parent.running or parent.pidfd < 0:
            raise ContainerNotRunningError(f"container {parent.id} is not running; cannot exec into it")
        exec_id = request.id
        if exec_id in self.entities:
            raise SandboxError(f"exec {exec_id} already exists")
        assert parent.spec is not None
        status_r, status_w = os.pipe()
        output_r, output_w = output_pipes()
        try:
            pid = _fork()
        except BaseException:
            for fd in (status_r, status_w, *output_r, *output_w):
                os.close(fd)
            raise
        if pid == 0:
            exec_main(
                request.process,
                parent.spec.hostname,
                parent.cgroup,
                init_pidfd=parent.pidfd,
                status_fd=status_w,
                stdin=request.stdin,
                output_fds=output_w,
                launcher_pid=self.pid,
            )
        for fd in (status_w, *output_w):
            os.close(fd)
        ent = Entity(exec_id, "exec", pid, status_r, parent=parent, create_rid=rid)
        with contextlib.suppress(OSError):
            ent.pidfd = os.pidfd_open(pid)
        ent.counters_before = _counters(parent.cgroup)
        self._track(ent)
        self._follow_output(ent, output_r, (request.stdout, request.stderr))

    def op_wait(self, rid: int, request: WaitRequest) -> Exited | None:
        ent = self._entity(request.id)
        if ent.exited:
            return self._exit_info(ent)
        ent.waiters.append(rid)
        return None

    def op_signal(self, rid: int, request: SignalRequest) -> Ack:
        ent = self._entity(request.id)
        sig = request.signal
        if ent.exited or ent.reaped:
            raise ContainerNotRunningError(f"{ent.kind} {ent.id} has exited; cannot signal it")
        # init forwards the others; SIGKILL to it ends the whole PID namespace.  Exec commands have no init.
        # pidfds, not pids: the process may have been reaped, and its pid reused, a moment ago.
        target = ent.main_pidfd if ent.kind == "exec" or sig in _DIRECT_SIGNALS else ent.pidfd
        if target >= 0:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(target, sig)
        return Ack()

    def op_stats(self, rid: int, request: StatsRequest) -> CgroupStats:
        ent = self._container(request.id)
        if ent.stats is not None:
            return ent.stats
        return ent.cgroup.stats() if ent.cgroup else CgroupStats()

    def op_limits(self, rid: int, request: LimitsRequest) -> CgroupFiles:
        ent = self._container(request.id)
        if ent.finished or ent.cgroup is None:
            raise ContainerNotRunningError(f"container {ent.id} has no cgroup now")
        return CgroupFiles(ent.cgroup.read_limits(), tuple(ent.cgroup.paths))

    def op_remove(self, rid: int, request: RemoveRequest) -> Ack | None:
        ent = self.entities.get(request.id)
        if ent is None:
            return Ack()  # removing twice is not an error
        ent.remove_rids.append(rid)
        if ent.finished:
            self._forget(ent)  # answers when the cleaner has deleted its directory
            return None
        self._kill(ent)
        return None

    def op_shutdown(self, rid: int, request: ShutdownRequest) -> Ack:
        self.running = False
        return Ack()

    # -- tracking --------------------------------------------------------------------------

    def _entity(self, ident: str) -> Entity:
        ent = self.entities.get(ident)
        if ent is None:
            raise ContainerNotRunningError(f"no such container or exec: {ident}")
        return ent

    def _container(self, ident: str) -> Entity:
        ent = self._entity(ident)
        if ent.kind != "container":
            raise SandboxError(f"{ident} is an exec, not a container")
        return ent

    def _track(self, ent: Entity) -> None:
        self.entities[ent.id] = ent
        self.by_pid[ent.pid] = ent
        self.sel.register(ent.status_fd, selectors.EVENT_READ, lambda fd, e=ent: self._on_status(e))

    def _follow_output(self, ent: Entity, read_fds: tuple[int, int], paths: tuple[str, str]) -> None:
        """Copy the entity's output pipes into its log files, in this loop, one chunk per turn."""
        ent.logs = tuple(LogPipe(fd, path, self.log_limits) for fd, path in zip(read_fds, paths, strict=True))
        for log in ent.logs:
            self.log_pipes.add(log)
            self.sel.register(log.fd, selectors.EVENT_READ, lambda _fd, lg=log: self._on_output(lg))

    def _on_output(self, log: LogPipe) -> None:
        if not log.pump():  # EOF, or closed earlier in this same turn (then a no-op)
            self._close_log(log)

    def _close_log(self, log: LogPipe) -> None:
        if log.fd >= 0:
            self.sel.unregister(log.fd)
        log.close()
        self.log_pipes.discard(log)

    def _end_output(self, ent: Entity) -> None:
        """The entity is gone: its last output goes to the files, then the files are closed.

        A container's pipes have no writer left (its PID namespace is gone) and are closed; an
        exec's may still be held by a background process it started, which must neither block
        nor get SIGPIPE: those are read, and what comes is dropped, until EOF.
        """
        for log in ent.logs:
            if not log.drain() or ent.kind == "container":
                self._close_log(log)
            else:
                log.stop_writing()

    def _on_status(self, ent: Entity) -> None:
        data = os.read(ent.status_fd, 65536)
        if not data:
            self.sel.unregister(ent.status_fd)
            os.close(ent.status_fd)
            ent.pipe_closed = True
            self._maybe_finish(ent)
            return
        for event in ent.lines.feed(data):
            self._on_event(ent, event)

    def _on_event(self, ent: Entity, event: StatusEvent) -> None:
        if isinstance(event, UsernsMade):
            try:
                self._hold_writable(ent)
            except OSError as e:
                self._fail(
                    ent, SetupError(f"cannot hold the container's writable layer: {e}", errno=e.errno or 0)
                )
                with contextlib.suppress(ProcessLookupError):
                    os.kill(ent.pid, signal.SIGKILL)
                os.close(ent.go_fd)
                ent.go_fd = -1
                return
            try:
                write_id_maps(ent.pid, self.uid_base)
                os.write(ent.go_fd, b"g")
            except OSError as e:
                self._fail(
                    ent,
                    SetupError(
                        f"cannot write the uid/gid map of the container: {e}",
                        call="write",
                        path=f"/proc/{ent.pid}/uid_map",
                        errno=e.errno or 0,
                    ),
                )
                with contextlib.suppress(ProcessLookupError):
                    os.kill(ent.pid, signal.SIGKILL)
            finally:
                os.close(ent.go_fd)
                ent.go_fd = -1
        elif isinstance(event, CommandStarted):
            trace.event("launcher: started")
            ent.started = True
            ent.main_pid = event.pid if ent.kind == "exec" else self._host_pid_of_main(ent)
            if ent.main_pid:
                with contextlib.suppress(OSError):
                    ent.main_pidfd = os.pidfd_open(ent.main_pid)
            if not ent.until_exit:
                rid, ent.create_rid = ent.create_rid, None
                self._reply(rid, Started(ent.main_pid, ent.pid if ent.kind == "container" else 0))
        elif isinstance(event, SetupFailed):
            ent.error = self._explain(ent, event.error)
            rid, ent.create_rid = ent.create_rid, None
            self._reply_error(rid, ent.error)
        else:
            ent.exit = event
            self._exited(ent)

    def _hold_writable(self, ent: Entity) -> None:
        """Keep the container's writable tmpfs reachable from the host until it is removed.

        The first process mounted it in its private mount namespace and now waits for its id maps
        in its state directory: ``/proc/<pid>/cwd/writable`` there is that mount (a magic link
        resolves in the process's own mount tree).  Our O_PATH fd pins it after the container's
        namespaces are gone (a commit after the exit), and dies with us (nothing left on a
        SIGKILL); pytest reads through the link ``writable.fd`` -> ``/proc/<our pid>/fd/<n>``,
        checking the tmpfs' identity recorded in ``writable.id`` (a reused pid has other fds).
        """
        dirs = ent.dirs
        if dirs is None:
            return
        fd = os.open(
            f"/proc/{ent.pid}/cwd/{WRITABLE}", os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
        )
        try:
            if os.fstat(fd).st_dev == os.stat(dirs.base).st_dev:
                raise OSError(errno.ENOENT, "the writable tmpfs is not mounted", dirs.writable)
            record_held_writable(dirs, fd, self.pid)  # and the tmpfs' identity, which pytest checks
        except BaseException:
            os.close(fd)
            raise
        self.writable_fds[dirs.base] = fd

    def _release_writable(self, base: str) -> None:
        """Let the writable tmpfs of a removed container go (freed with its last reference)."""
        fd = self.writable_fds.pop(base, None)
        if fd is not None:
            os.close(fd)

    def _release_every_writable(self) -> None:
        for base in list(self.writable_fds):
            self._release_writable(base)

    def _host_pid_of_main(self, ent: Entity) -> int:
        """The command is the only child of the container's init when it starts."""
        try:
            with open(f"/proc/{ent.pid}/task/{ent.pid}/children") as f:
                children = f.read().split()
            return int(children[0]) if children else 0
        except OSError:
            return 0

    def _fail(self, ent: Entity, exc: BaseException) -> None:
        ent.error = self._explain(ent, to_wire(exc))
        rid, ent.create_rid = ent.create_rid, None
        self._reply_error(rid, ent.error)

    def _explain(self, ent: Entity, error: protocol.Wire) -> protocol.Wire:
        """An exec that failed because its container was dying is "not running", not a setup error.

        setns into namespaces whose init just exited says ESRCH, a fork into a PID namespace
        without init says ENOMEM: both would send the user looking for the wrong problem.
        """
        parent = ent.parent
        if ent.kind != "exec" or parent is None or not _gone(parent):
            return error
        return to_wire(
            ContainerNotRunningError(
                f"container {parent.id} exited while exec {ent.id} was starting ({error.get('message', '')})"
            )
        )

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self._on_exit(pid, status)

    def _on_exit(self, pid: int, status: int) -> None:
        if pid == self.cleaner.pid:
            return
        if self.spare is not None and pid == self.spare.pid:
            spare, self.spare = self.spare, None
            print(f"psbx-launcher: a spare died ({_describe_status(status)})", file=sys.stderr)
            self._discard_spare(spare, reaped=True)
            return
        ent = self.by_pid.pop(pid, None)
        if ent is None:
            return  # the idmap helper of __init__, or a spare discarded and reaped already
        ent.reaped = True
        ent.wait_status = status
        self._maybe_finish(ent)

    def _exited(self, ent: Entity) -> None:
        """The command's exit is known: read the cgroup's outcomes and answer every waiter.

        This happens when init *reports* the exit, before init itself exits and the kernel tears
        the namespaces down (a millisecond, off the caller's path); the cgroup is still there.
        """
        if ent.exited:
            return
        ent.exited = True
        ent.exited_at = time.monotonic()
        if ent.create_rid is not None and ent.until_exit and ent.started and ent.error is None:
            ent.waiters.append(ent.create_rid)
            ent.create_rid = None
        if ent.cgroup is not None:
            try:
                ent.stats = ent.cgroup.stats()
            except OSError:
                ent.stats = CgroupStats()
        elif ent.kind == "exec" and ent.parent is not None:
            # An exec shares its container's cgroup: what happened in between is its part.
            (oom0, pids0), (oom1, pids1) = ent.counters_before, _counters(ent.parent.cgroup)
            ent.stats = CgroupStats(oom_kills=oom1 - oom0, pids_limit_hits=pids1 - pids0)
        for log in ent.logs:  # what the command wrote is in its pipes now: its result includes it
            log.drain()
        trace.event("launcher: exited")
        info = self._exit_info(ent)
        for rid in ent.waiters:
            self._reply(rid, info)
        ent.waiters.clear()

    def _maybe_finish(self, ent: Entity) -> None:
        """Once every process of the entity is reaped and its pipe closed: release everything."""
        if ent.finished or not ent.pipe_closed or not ent.reaped:
            return
        if ent.create_rid is not None and not (ent.until_exit and ent.started):  # died before reporting
            self._fail(ent, SetupError(f"container setup process died ({_describe_status(ent.wait_status)})"))
        if ent.exit is None:  # killed: init never reported an exit
            st = ent.wait_status
            sig = os.WTERMSIG(st) if st is not None and os.WIFSIGNALED(st) else signal.SIGKILL
            ent.exit = CommandExited(None, sig)
        self._exited(ent)
        self._end_output(ent)
        ent.finished = True
        self.finished_count += 1
        if self.finished_count % 256 == 0:
            # gc is off (see main); collect what cycles there are now and then, between starts.
            gc.collect()
            gc.freeze()
        for fd in (ent.pidfd, ent.main_pidfd, ent.go_fd):
            if fd >= 0:
                os.close(fd)
        ent.pidfd = ent.main_pidfd = ent.go_fd = -1
        if ent.kind == "container":
            for child in list(self.entities.values()):
                if child.parent is ent and not child.finished:
                    _sigkill(child)
        self._remove_cgroup(ent)
        if ent.remove_rids:
            self._forget(ent)

    def _exit_info(self, ent: Entity) -> Exited:
        exit_ = ent.exit or CommandExited(None, signal.SIGKILL)
        return Exited(
            pid=ent.main_pid,
            init_pid=ent.pid if ent.kind == "container" else 0,
            code=exit_.code,
            signal=exit_.signal,
            duration_s=ent.exited_at - ent.started_at,
            stats=ent.stats,
            error=ent.error,
        )

    def _remove_cgroup(self, ent: Entity) -> None:
        cg, ent.cgroup = ent.cgroup, None
        if cg is not None:
            try:
                cg.remove()
            except OSError as e:
                print(f"psbx-launcher: cannot remove cgroup of {ent.id}: {e}", file=sys.stderr)

    def _kill(self, ent: Entity) -> None:
        # A container's PID 1 takes its whole PID namespace with it; an exec helper is killed
        # with its container (or here) and its command then dies with the namespace.
        _sigkill(ent)
        if ent.cgroup is not None:
            with contextlib.suppress(OSError):
                ent.cgroup.kill(timeout=2.0)

    def _forget(self, ent: Entity) -> None:
        self.entities.pop(ent.id, None)
        if ent.kind == "container":
            for child in [c for c in self.entities.values() if c.parent is ent]:
                self.entities.pop(child.id, None)
            if ent.dirs is not None:
                # The cleaner deletes it; removal is answered when the directory is gone.
                if self.cleaner.submit(ent.dirs.base, ent.remove_rids):
                    ent.remove_rids = []  # and its writable tmpfs goes once the cleaner emptied it
                else:
                    remove_quietly(ent.dirs.base)
                    self._release_writable(ent.dirs.base)
        for rid in ent.remove_rids:
            self._reply(rid, Ack())
        ent.remove_rids.clear()

    def _on_cleaned(self, _fd: object) -> None:
        finished = self.cleaner.done()
        if finished is None:  # the cleaner died: what it had not done, we do
            self.sel.unregister(self.cleaner.done_fd)
            print("psbx-launcher: the cleaner exited; deleting state directories in-process", file=sys.stderr)
            for path, rids in self.cleaner.take_back():
                remove_quietly(path)
                finished = [*(finished or []), (path, rids)]
        for path, rids in finished or []:
            self._release_writable(path)
            for rid in rids:
                self._reply(rid, Ack())

    def _shutdown(self) -> None:
        """Kill everything, wait for it, remove every cgroup and state directory."""
        if self.spare is not None:
            spare, self.spare = self.spare, None
            self._discard_spare(spare)
        for ent in self.entities.values():
            if not ent.finished:
                self._kill(ent)
        deadline = time.monotonic() + 10
        while any(not e.finished for e in self.entities.values()) and time.monotonic() < deadline:
            try:
                pid, status = os.waitpid(-1, 0)
            except ChildProcessError:
                break
            self._on_exit(pid, status)
            for ent in list(self.entities.values()):
                if not ent.pipe_closed:
                    with contextlib.suppress(OSError):
                        while os.read(ent.status_fd, 65536):
                            pass
                    ent.pipe_closed = True
                self._maybe_finish(ent)
        for log in list(self.log_pipes):
            self._close_log(log)
        for ent in list(self.entities.values()):
            self._remove_cgroup(ent)
            if ent.dirs is not None:
                remove_quietly(ent.dirs.base)
        self.cleaner.close()
        self._release_every_writable()
        with contextlib.suppress(OSError):
            self.backend.remove_owner(self.owner)


def _spec_channel() -> tuple[int, int]:
    """A spare's (read, write) ends for its spec: a unix socket, as the spec's mount fds ride along.

    Its send buffer holds a whole spec, so the hand-over never waits for the spare to read (what
    a pipe of SPEC_PIPE_SIZE did before; SO_SNDBUFFORCE passes net.core.wmem_max, as root).
    """
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    for option in (_SO_SNDBUFFORCE, socket.SO_SNDBUF):
        try:
            ours.setsockopt(socket.SOL_SOCKET, option, SPEC_PIPE_SIZE)
            break
        except OSError:
            continue
    return theirs.detach(), ours.detach()


def _fork() -> int:
    """os.fork(), failing (EAGAIN: out of pids or memory) with a SetupError that names the call."""
    try:
        return os.fork()
    except OSError as e:
        raise SetupError(f"fork: {os.strerror(e.errno or 0)}", call="fork", errno=e.errno or 0) from None


def _sigkill(ent: Entity) -> None:
    """SIGKILL the entity's process through its pidfd: never a reaped pid that was reused."""
    if ent.pidfd >= 0 and not ent.reaped:
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(ent.pidfd, signal.SIGKILL)


def _counters(cgroup: Cgroup | None) -> tuple[int, int]:
    """(OOM kills, pids-limit hits) of a cgroup so far."""
    if cgroup is None:
        return (0, 0)
    try:
        stats = cgroup.stats()
    except OSError:
        return (0, 0)
    return (stats.oom_kills, stats.pids_limit_hits)


PF_EXITING = 0x4  # include/linux/sched.h: set at the start of do_exit()


def _gone(ent: Entity) -> bool:
    """Whether a container's init has exited or is exiting."""
    if ent.exited or ent.finished or ent.pidfd < 0:
        return True
    ready, _, _ = select.select([ent.pidfd], [], [], 0)  # a pidfd is readable once it exited
    if ready:
        return True
    # Between SIGKILL and exit, the init drops its namespaces (setns then fails with ESRCH) and
    # waits for its PID namespace to empty; only its kernel flags tell (proc(5), field 9).
    fields = proc_stat(ent.pid)
    return fields is None or bool(int(fields[6]) & PF_EXITING)


def write_id_maps(pid: int, base: int) -> None:
    """Map container ids 0..65535 to host ids base..base+65535 (user_namespaces(7))."""
    line = f"0 {base} {ID_RANGE}\n"
    for name in ("uid_map", "gid_map"):
        with open(f"/proc/{pid}/{name}", "w") as f:
            f.write(line)


def _describe_status(status: int | None) -> str:
    if status is None:
        return "unknown status"
    if os.WIFSIGNALED(status):
        return f"killed by signal {os.WTERMSIG(status)}"
    return f"exit status {os.WEXITSTATUS(status)}"


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="psbx-launcher")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--owner", required=True)
    parser.add_argument("--state-dir", default=None)
    parser.add_argument("--uid-base", type=int, required=True)
    parser.add_argument("--cgroup-root", default="/sys/fs/cgroup")
    parser.add_argument("--log-max-size", type=int, default=LogLimits().max_size)
    parser.add_argument("--log-max-file", type=int, default=LogLimits().max_file)
    args = parser.parse_args(argv)
    libc.set_process_name("psbx-launcher")
    trace.enable()
    # Every container process is a fork of this one and runs Python: a garbage collection there
    # would touch every object and copy most of our pages (copy-on-write), ~5 ms per container.
    # Nothing here builds reference cycles worth collecting; freeze what exists, collect nothing.
    gc.disable()
    gc.freeze()
    sock = socket.socket(fileno=args.fd)
    try:
        limits = LogLimits(args.log_max_size, args.log_max_file)
        launcher = Launcher(sock, args.owner, args.uid_base, args.cgroup_root, limits)
    except BaseException as e:
        with contextlib.suppress(OSError):
            protocol.send(sock, protocol.encode_error(0, to_wire(e)))
        raise
    protocol.send(sock, protocol.encode_reply(0, launcher.hello()))
    launcher.serve()
    # An orderly end (the pytest process closed the socket or died, even by SIGKILL): everything is
    # gone, so the owner's state directory (launcher.log included) goes too.  Not on a crash of our
    # own: then the log explains it, and the next session's sweep removes the directory.
    if args.state_dir and os.path.basename(os.path.normpath(args.state_dir)) == args.owner:
        remove_quietly(args.state_dir)
