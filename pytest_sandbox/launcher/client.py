"""The pytest side of the launcher: spawn it, talk to it from any thread, notice when it dies.

One :class:`LauncherClient` per pytest process (and so per xdist worker).  Each operation of
:mod:`.protocol` is a method with typed parameters, returning its typed reply (or a future of it
where callers wait: ``create``, ``run``, ``wait``, ``remove``).  Requests may come from any thread;
a reader thread matches replies to requests by id (replies can arrive out of order: ``wait`` is
answered when the process exits).  The launcher is started lazily, in its own session
(so a Ctrl-C aimed at pytest's process group lets pytest tear down first), with the socket as its
only inherited fd.  If it dies, every pending call fails with :class:`LauncherError` quoting its
exit status and the tail of its log, and the next call starts a fresh one.  Each launcher is a
*generation*: a container belongs to the one that started it, and a call about it given that
generation (``generation=``) fails with that launcher's death -- at once, never hanging and never
starting a new launcher that would not know the container (:meth:`LauncherClient.lost`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import weakref
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, TypeVar

from ..core.errors import InvalidSpecError, LauncherError, SandboxError, SetupError, from_wire
from ..core.spec import ContainerSpec, ProcessSpec
from ..host.bindsource import opened_sources
from ..host.cgroups.base import CgroupStats
from ..host.cleanup import remove_tree
from . import fdpass, protocol
from .logs import LogLimits
from .protocol import (
    CgroupFiles,
    CreateRequest,
    ExecRequest,
    Exited,
    Hello,
    LimitsRequest,
    RemoveRequest,
    Request,
    RunRequest,
    ShutdownRequest,
    SignalRequest,
    Started,
    StatsRequest,
    WaitRequest,
)

#: The package's parent directory: the launcher's only import path (see launcher_argv).
PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
START_TIMEOUT = 30.0


def launcher_argv() -> list[str]:
    """``python -I -S``, then ``pytest_sandbox.launcher.server.main``: from this package's copy only.

    ``-I`` (no environment, no user site, no script directory) and ``-S`` (no site-packages): the
    launcher runs as root and forks every container, so it sees nothing but the standard library
    and this package -- whose ``__init__`` imports nothing (PEP 562) -- and not pytest, pluggy,
    filelock or pyroute2 (unless they sit next to it).  ``PYTHONPATH`` is ignored under ``-I``, so
    ``-c`` adds the package's parent to the path (``-m`` alone could not find the package) -- *last*:
    that parent is often site-packages, where a stray ``json.py`` or a backport named like a stdlib
    module must never shadow the standard library in a process that runs as root.
    """
    return [
        sys.executable,
        "-I",
        "-S",
        "-c",
        "import sys; sys.path.append(sys.argv.pop(1)); "
        "from pytest_sandbox.launcher.server import main; main(sys.argv[1:])",
        PACKAGE_PARENT,
    ]


def make_private_dir(path: str) -> None:
    """Create ``path`` (mode 0700), or accept it only if it is already ours and private.

    Its parent is world-writable (/dev/shm, /tmp) and its name predictable (pid and start time
    are in /proc): another user could create it first, with symlinks inside, and have root
    work in a directory that user controls.
    """
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        os.mkdir(path, 0o700)
        return
    except FileExistsError:
        pass
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise SetupError(
            f"{path} exists and is not a private directory of uid {os.geteuid()} "
            f"(owner {st.st_uid}, mode {stat.filemode(st.st_mode)}); refusing to use it",
            call="mkdir",
            path=path,
            errno=17,
            hint="another user may have created it; remove it, or set PYTEST_SANDBOX_STATE_DIR",
        )


_clients: weakref.WeakSet[LauncherClient] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for client in list(_clients):
        client._abandon_after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)


R = TypeVar("R")


class LauncherClient:
    def __init__(
        self,
        *,
        state_dir: str,
        owner: str,
        uid_base: int,
        cgroup_root: str,
        log_limits: LogLimits | None = None,
    ) -> None:
        self.state_dir = state_dir
        self.owner = owner
        self.uid_base = uid_base
        self.cgroup_root = cgroup_root
        self.log_limits = log_limits or LogLimits()
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._pending: dict[int, tuple[Request[Any], Future[Any]]] = {}
        self._next_rid = 1
        self._hello: Hello | None = None
        self._dead: LauncherError | None = None
        self._generation = 0  # of the launcher now (or last) running: 1 for the first
        self._deaths: dict[int, LauncherError] = {}  # generation -> how that launcher ended
        _clients.add(self)

    def _abandon_after_fork(self) -> None:
        """In a child forked from our process (multiprocessing, os.fork in a test): let go.

        The socket is only close-on-exec, so a forked child holds it too, and the launcher would
        not see EOF -- and so not clean up -- until that child exited as well, even if pytest was
        SIGKILLed.  Locks are replaced, not taken: another thread may have held them at the fork.
        """
        sock, self._sock, self._proc = self._sock, None, None
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._pending = {}
        self._dead = LauncherError("this process was forked from the one that started the launcher")
        if sock is not None:
            sock.close()

    @property
    def log_path(self) -> str:
        return os.path.join(self.state_dir, "launcher.log")

    @property
    def pid(self) -> int | None:
        """The launcher's pid while it runs."""
        return self._proc.pid if self._proc and self._sock is not None else None

    @property
    def generation(self) -> int:
        """The generation of the launcher running now (or of the last one); 0 before the first."""
        return self._generation

    def lost(self, generation: int) -> LauncherError | None:
        """How the launcher of ``generation`` ended, if it did (None while it runs)."""
        with self._lock:
            if generation == self._generation and self._sock is not None:
                return None
            return self._lost_error(generation)

    def _lost_error(self, generation: int | None) -> LauncherError:
        if generation is not None and generation in self._deaths:
            return self._deaths[generation]
        if generation is not None and generation != self._generation:
            return LauncherError(f"the sandbox launcher that ran this (generation {generation}) is gone")
        return self._dead or LauncherError("the sandbox launcher is not running")

    def pinned(self) -> PinnedClient:
        """This client bound to the launcher running now (started if none is): a container's view."""
        self.hello()
        return PinnedClient(self, self._generation)

    def fileno(self) -> int:
        """Our end of the launcher socket (-1 when not connected)."""
        sock = self._sock
        return sock.fileno() if sock is not None else -1

    # -- operations ------------------------------------------------------------------------

    def hello(self) -> Hello:
        """Start the launcher if it is not running; what it found (idmap support, cgroup backend)."""
        with self._lock:
            if self._sock is None:
                self._start()
            assert self._hello is not None
            return self._hello

    def create(self, spec: ContainerSpec, directory: str) -> Future[Started]:
        """Create a container in its state directory ``directory``; the future holds its start.

        Its bind sources go along as descriptors (host/bindsource), never as paths to look up again.
        """
        with opened_sources(spec) as (sent, fds):
            return self.request(CreateRequest(protocol.encode_spec(sent), directory, fds))

    def run(self, spec: ContainerSpec, directory: str) -> Future[Exited]:
        """:meth:`create`, answered only when the command has exited (one round trip, not two)."""
        with opened_sources(spec) as (sent, fds):
            return self.request(RunRequest(protocol.encode_spec(sent), directory, fds))

    # ``generation``, on calls about a container: that of the launcher that started it (see lost()).

    def exec(
        self,
        exec_id: str,
        parent: str,
        process: ProcessSpec,
        *,
        stdout: str,
        stderr: str,
        stdin: str | None,
        generation: int | None = None,
    ) -> Started:
        """Start ``process`` in the running container ``parent``; wait with :meth:`wait` (exec_id)."""
        return self._call(ExecRequest(exec_id, parent, process, stdout, stderr, stdin), generation=generation)

    def wait(self, ident: str, *, generation: int | None = None) -> Future[Exited]:
        """The exit of a container or exec; answered when it happens."""
        return self.request(WaitRequest(ident), generation=generation)

    def signal(self, ident: str, sig: int, *, generation: int | None = None) -> None:
        self._call(SignalRequest(ident, sig), generation=generation)

    def stats(self, ident: str, *, generation: int | None = None) -> CgroupStats:
        """A container's cgroup accounting now (or at its exit)."""
        return self._call(StatsRequest(ident), generation=generation)

    def limits(self, ident: str, *, generation: int | None = None) -> CgroupFiles:
        """A running container's cgroup limit files as the kernel reports them."""
        return self._call(LimitsRequest(ident), generation=generation)

    def remove(self, ident: str, *, generation: int | None = None) -> Future[None]:
        """Kill a container or exec and delete everything it had; done when the future is."""
        return self.request(RemoveRequest(ident), generation=generation)

    def shutdown(self, timeout: float | None = None) -> None:
        """Ask the launcher to kill and remove everything and exit (see :meth:`close`)."""
        self._call(ShutdownRequest(), timeout=timeout)

    def wait_or_kill(
        self, ident: str, exiting: Future[Exited], timeout: float | None, *, generation: int | None = None
    ) -> tuple[Exited | None, bool]:
        """The exit ``exiting`` holds, SIGKILLing ``ident`` if it has not come within ``timeout`` s.

        Returns (exit, timed out).  The exit is None if the kill came before the command started:
        the launcher then reports a setup that died, but what the caller set was a time limit.
        """
        try:
            return exiting.result(timeout), False
        except FutureTimeout:
            pass
        with contextlib.suppress(SandboxError):  # it may have exited meanwhile
            self.signal(ident, signal.SIGKILL, generation=generation)
        try:
            return exiting.result(), True
        except LauncherError:
            raise  # not about this process: the launcher is gone
        except SandboxError:
            return None, True

    # -- the connection --------------------------------------------------------------------

    def _start(self) -> None:
        make_private_dir(self.state_dir)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            fd = os.open(
                self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
            )
            with open(fd, "ab") as log:
                self._proc = subprocess.Popen(
                    [
                        *launcher_argv(),
                        "--fd",
                        str(theirs.fileno()),
                        "--owner",
                        self.owner,
                        "--state-dir",
                        self.state_dir,
                        "--uid-base",
                        str(self.uid_base),
                        "--cgroup-root",
                        self.cgroup_root,
                        "--log-max-size",
                        str(self.log_limits.max_size),
                        "--log-max-file",
                        str(self.log_limits.max_file),
                    ],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    pass_fds=[theirs.fileno()],
                    start_new_session=True,
                    cwd="/",
                )
        finally:
            theirs.close()
        ours.settimeout(START_TIMEOUT)
        try:
            frame = protocol.recv(ours)
        except (OSError, ValueError) as e:
            frame = None
            reason = str(e)
        else:
            reason = "it exited"
        ours.settimeout(None)
        try:
            hello = self._greeting(frame)
        except BaseException:
            ours.close()
            self._reap()
            raise
        if hello is None:
            ours.close()
            self._reap()
            raise LauncherError(f"the sandbox launcher did not start ({reason}){self._log_tail()}")
        self._hello = hello
        self._sock = ours
        self._dead = None
        self._generation += 1
        threading.Thread(
            target=self._read_loop,
            args=(ours, self._proc, self._generation),
            name="psbx-launcher-reader",
            daemon=True,
        ).start()

    @staticmethod
    def _greeting(frame: protocol.Frame | None) -> Hello | None:
        """The launcher's first frame: its Hello, or the typed error it could not start with."""
        if frame is None:
            return None
        header, _ = frame
        if "error" in header:
            raise from_wire(header["error"])
        try:
            return Hello.from_wire(header["ok"])
        except (KeyError, TypeError, ValueError) as e:
            raise LauncherError(f"the sandbox launcher sent a malformed hello: {e!r}") from None

    def _read_loop(self, sock: socket.socket, proc: subprocess.Popen[bytes] | None, generation: int) -> None:
        while True:
            try:
                frame = protocol.recv(sock)
            except (OSError, ValueError):
                frame = None
            if frame is None:
                break
            header, _ = frame
            with self._lock:
                pending = self._pending.pop(protocol.rid_of(header), None)
            if pending is not None:
                _settle(*pending, header)
        with self._lock:
            if self._sock is sock:
                self._sock = None  # from here on, no request goes to this launcher
        sock.close()
        self._reap(proc)  # this generation's process: a new one may be starting meanwhile
        death = LauncherError(
            f"the sandbox launcher (pid {proc.pid if proc else '?'}) {_ended(proc)}: every container it "
            f"ran is gone{self._log_tail()}"
        )
        with self._lock:
            self._deaths[generation] = death
            if generation == self._generation:
                self._dead = death
            pending_all, self._pending = self._pending, {}
        for _, future in pending_all.values():
            future.set_exception(death)

    def _reap(self, proc: subprocess.Popen[bytes] | None = None) -> None:
        proc = proc or self._proc
        if proc is not None:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def _log_tail(self) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 2000))
                tail = f.read().decode(errors="replace").strip()
        except OSError:
            return ""
        return f"; its log ({self.log_path}) ends with:\n{tail}" if tail else ""

    def request(self, request: Request[R], *, generation: int | None = None) -> Future[R]:
        """Send a request; the future holds its typed reply (or the typed error).

        With ``generation``, only to that launcher: its LauncherError at once if it is gone."""
        if generation is None:
            self.hello()
        future: Future[R] = Future()
        with self._lock:
            sock = self._sock if generation in (None, self._generation) else None
            if sock is None:
                raise self._lost_error(generation)
            rid = self._next_rid
            self._next_rid += 1
            self._pending[rid] = (request, future)
        try:
            frame = protocol.encode_request(rid, request)
            with self._send_lock:
                fdpass.send(sock, frame, request.fds)
        except (OSError, protocol.ProtocolError) as e:
            with self._lock:
                self._pending.pop(rid, None)
            if isinstance(e, protocol.ProtocolError):  # too large to send: the caller's to fix
                raise InvalidSpecError(f"launcher request {request.op.value!r}: {e}") from None
            raise LauncherError(f"cannot reach the sandbox launcher: {e}{self._log_tail()}") from None
        return future

    def _call(self, request: Request[R], timeout: float | None = None, *, generation: int | None = None) -> R:
        future = self.request(request, generation=generation)
        try:
            return future.result(timeout)
        except FutureTimeout:
            raise TimeoutError(
                f"launcher request {request.op.value!r} did not finish in {timeout} s"
            ) from None

    def close(self, timeout: float = 30.0) -> None:
        """Ask the launcher to clean up and exit; wait for it."""
        with self._lock:
            sock, proc = self._sock, self._proc
        if sock is None or proc is None:
            return
        with contextlib.suppress(LauncherError, TimeoutError, OSError):
            self.shutdown(timeout)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        with self._lock:
            if self._sock is sock:
                self._sock = None
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


class PinnedClient:
    """The client as one container sees it: each call goes to the launcher that started the
    container, or fails at once with that launcher's death -- a LauncherError saying how it ended
    -- instead of waiting, or of starting a new launcher that would not know the container."""

    def __init__(self, client: LauncherClient, generation: int) -> None:
        self._client = client
        self.generation = generation

    def lost(self) -> LauncherError | None:
        return self._client.lost(self.generation)

    def check_alive(self) -> None:
        """LauncherError if that launcher is gone (with the fd a container's writable layer is read by)."""
        lost = self.lost()
        if lost is not None:
            raise lost

    def wait(self, ident: str) -> Future[Exited]:
        return self._client.wait(ident, generation=self.generation)

    def signal(self, ident: str, sig: int) -> None:
        self._client.signal(ident, sig, generation=self.generation)

    def stats(self, ident: str) -> CgroupStats:
        return self._client.stats(ident, generation=self.generation)

    def limits(self, ident: str) -> CgroupFiles:
        return self._client.limits(ident, generation=self.generation)

    def remove(self, ident: str, *, leftover: str | None = None) -> Future[None]:
        """If the launcher is gone, ``leftover`` (the container's state directory, which that
        launcher would have deleted) is deleted here, and its LauncherError raised."""
        if leftover is not None and self.lost() is not None:
            with contextlib.suppress(OSError):
                remove_tree(leftover)
        return self._client.remove(ident, generation=self.generation)

    def exec(
        self, exec_id: str, parent: str, process: ProcessSpec, *, stdout: str, stderr: str, stdin: str | None
    ) -> Started:
        return self._client.exec(
            exec_id, parent, process, stdout=stdout, stderr=stderr, stdin=stdin, generation=self.generation
        )

    def wait_or_kill(
        self, ident: str, exiting: Future[Exited], timeout: float | None
    ) -> tuple[Exited | None, bool]:
        return self._client.wait_or_kill(ident, exiting, timeout, generation=self.generation)


def _ended(proc: subprocess.Popen[bytes] | None) -> str:
    """How a launcher process ended, for its LauncherError."""
    code = proc.returncode if proc is not None else None
    if code is None:
        return "closed its socket"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by signal {-code} ({name})"
    return f"exited with status {code}"


def _settle(request: Request[Any], future: Future[Any], header: protocol.Wire) -> None:
    """Answer ``future`` with the reply in ``header``, decoded as ``request`` expects."""
    if "error" in header:
        future.set_exception(from_wire(header["error"]))
        return
    try:
        future.set_result(request.reply(header.get("ok") or {}))
    except (KeyError, TypeError, ValueError) as e:
        future.set_exception(
            LauncherError(f"malformed reply to a launcher {request.op.value!r} request: {e!r}")
        )
