"""Containers and their results (composition: spec + image + launcher + cgroup outcomes)."""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import select
import signal as _signal
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .core.errors import (
    ContainerNotRunningError,
    ContainerStateError,
    InvalidSpecError,
    LauncherError,
    ReadinessError,
    SandboxError,
    SandboxTimeoutError,
)
from .core.spec import (
    ContainerSpec,
    ProcessSpec,
    container_path,
    parse_argv,
    parse_env,
    parse_timeout,
    parse_user,
)
from .core.terminal import output_text
from .core.units import parse_signal
from .host.cgroups.base import CgroupStats
from .launcher.logs import LogFollower, check_stream, newest, read_logs, read_tail, rotated_paths
from .launcher.protocol import Exited
from .net.forward import Forwarder
from .net.netlink import socket_in

if TYPE_CHECKING:
    from .core.layerstack import ImageLike
    from .image import Image  # commit's return type: see commit() for why container may name it
    from .images.store import Store
    from .net.networks import Attached, Network
    from .runtime import Runtime

LOG_TAIL_LINES = 20
TAIL_BYTES = 1 << 14  # what a report or an error quotes, at most, of each stream
WAIT_WINDOW = 1 << 20  # wait_for_log searches the newest output in windows of this size


def _parse_port(port: object) -> int:
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise InvalidSpecError(f"port={port!r}: expected a TCP port number from 1 to 65535")
    return port


@dataclass(frozen=True)
class Result:
    """How a container's command (or an exec) ended, and what the kernel recorded about it.

    ``exit_code`` follows Docker: the command's status, or ``128 + signal`` if a signal killed it
    (then ``signal`` is set too).  The cgroup facts are read before the cgroup is removed.
    """

    exit_code: int
    signal: int | None
    stdout: bytes
    stderr: bytes
    oom_killed: bool = False
    pids_limit_hit: bool = False
    cpu_throttled_s: float = 0.0
    memory_peak: int | None = None
    duration_s: float = 0.0
    cpu_usage_s: float | None = None
    argv: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    def check(self) -> Result:
        """Return self if the command succeeded, else raise AssertionError with its output."""
        if self.exit_code != 0:
            how = f"signal {self.signal}" if self.signal else f"exit code {self.exit_code}"
            raise AssertionError(
                f"{list(self.argv)} failed with {how}"
                + (" (OOM-killed)" if self.oom_killed else "")
                + f"\n--- stdout ---\n{_tail(self.stdout)}\n--- stderr ---\n{_tail(self.stderr)}"
            )
        return self


def _tail(data: bytes, lines: int = LOG_TAIL_LINES) -> str:
    """The last ``lines`` lines of output, at most TAIL_BYTES of it, safe for a terminal."""
    return "\n".join(output_text(data[-TAIL_BYTES:]).splitlines()[-lines:])


def result_from_exit(exited: Exited, stdout: bytes, stderr: bytes, argv: tuple[str, ...]) -> Result:
    stats = exited.stats or CgroupStats()
    return Result(
        exit_code=exited.exit_code,
        signal=exited.signal,
        stdout=stdout,
        stderr=stderr,
        oom_killed=stats.oom_kills > 0,
        pids_limit_hit=stats.pids_limit_hits > 0,
        cpu_throttled_s=stats.cpu_throttled_s,
        memory_peak=stats.memory_peak,
        duration_s=exited.duration_s,
        cpu_usage_s=stats.cpu_usage_s,
        argv=argv,
    )


class Container:
    """A running (or exited) container.  Made by ``sandbox.start()``; removed with its scope."""

    def __init__(
        self,
        runtime: Runtime,
        spec: ContainerSpec,
        image: ImageLike,
        directory: str,
        *,
        name: str | None,
        pid: int,
        init_pid: int,
        attached: Attached | None = None,
    ) -> None:
        self._runtime = runtime
        self._attached = attached  # its private networks (None: loopback only)
        self._own_netns: int | None = None  # without networks: its namespace, opened by address()
        self._forwarders: dict[int, Forwarder] = {}
        self._network_closed = False  # set (under _lock) before remove() closes the fds above
        self._client = runtime.client.pinned()  # to its launcher only: LauncherError once that died
        self.spec = spec
        self.image = image  # what it was started from (an Image, or a bare LayerStack)
        self.dir = directory
        self.id = spec.id
        self.name = name or spec.id
        self.pid = pid
        self.init_pid = init_pid
        self._result: Result | None = None
        self._removed = False
        self._log_limits = runtime.log_limits
        self._exec_count = 0
        self._lock = threading.Lock()
        self._exit_future: Future[Exited] | None = None

    def __repr__(self) -> str:
        state = "removed" if self._removed else ("exited" if self._result else "running")
        return f"<Container {self.name} {list(self.spec.process.argv)} {state}>"

    @property
    def hostname(self) -> str:
        return self.spec.hostname

    @property
    def result(self) -> Result | None:
        """The result once the command has exited (after wait/stop), else None."""
        return self._result

    @property
    def removed(self) -> bool:
        """True once :meth:`remove` (or the sandbox's close) has removed the container."""
        return self._removed

    @property
    def running(self) -> bool:
        if self._result is not None or self._removed or (self._exit_future is None and self._client.lost()):
            return False  # exited, removed, or gone with the launcher that ran it
        return not self._exit().done()

    def _exit(self) -> Future[Exited]:
        """One outstanding ``wait`` request per container, answered by the launcher at exit."""
        with self._lock:
            if self._exit_future is None:
                self._exit_future = self._client.wait(self.id)
            return self._exit_future

    # -- output ----------------------------------------------------------------------------

    def logs(self, stream: str = "both", *, max_bytes: int | None = None) -> bytes:
        """The command's output so far: ``"stdout"``, ``"stderr"`` or ``"both"`` (stdout, then stderr).

        At most the newest ``max_bytes`` of each stream (default: ini ``sandbox_log_max_size``),
        read across its rotated files.  Once removed: the output its :class:`Result` holds (if
        it was waited for), else nothing -- remove() never reads a log.
        """
        streams = check_stream(stream)
        if max_bytes is not None and (
            isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0
        ):
            raise InvalidSpecError(f"max_bytes={max_bytes!r}: expected a number of bytes (an int >= 0)")
        if self._removed:
            res = self._result
            kept = {"stdout": res.stdout if res else b"", "stderr": res.stderr if res else b""}
            return b"".join(newest(kept[s], max_bytes) for s in streams)
        return b"".join(read_tail(os.path.join(self.dir, s), self._log_limits, max_bytes) for s in streams)

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The last ``lines`` lines of output (stdout, then stderr), control characters escaped:
        what failure reports and readiness errors quote.  Reads at most a few KiB."""
        return _tail(self.logs(max_bytes=TAIL_BYTES), lines)

    # -- lifecycle -------------------------------------------------------------------------

    def wait(self, timeout: float | None = None) -> Result:
        """Wait for the command to exit; its :class:`Result`.  Raises SandboxTimeoutError on timeout."""
        if self._result is not None:
            return self._result
        if self._removed:
            raise ContainerNotRunningError(f"container {self.name} was removed")
        try:
            exited = self._exit().result(timeout)
        except FutureTimeout:
            raise SandboxTimeoutError(
                f"container {self.name} {list(self.spec.process.argv)} still running after {timeout} s",
                hint="give a larger timeout, or stop() it",
            ) from None
        with self._lock:
            if self._result is None:
                out, err = read_logs(self.dir, self._log_limits)
                self._result = result_from_exit(exited, out, err, self.spec.process.argv)
        return self._result

    def kill(self, signal: int | str = _signal.SIGKILL) -> None:
        """Send ``signal`` to the command (through the container's init; SIGKILL ends the container)."""
        sig = parse_signal(signal)
        if self._removed:
            raise ContainerNotRunningError(f"container {self.name} was removed")
        self._client.signal(self.id, sig)

    def stop(self, timeout: float = 10.0) -> Result:
        """SIGTERM, then SIGKILL after ``timeout`` seconds (Docker's stop).  Returns the result."""
        if self._result is None and not self._removed:
            with contextlib.suppress(ContainerNotRunningError):
                self.kill(_signal.SIGTERM)
            try:
                return self.wait(timeout)
            except SandboxTimeoutError:
                with contextlib.suppress(ContainerNotRunningError):
                    self.kill(_signal.SIGKILL)
        return self.wait()

    def commit(self, ref: str, *, store: Store | None = None) -> Image:
        """``docker commit``: this container's writable layer on top of its image, tagged ``ref``.

        Deletions are kept as whiteouts; files are owned by the container's ids (not the host's).
        The image's config is kept.  Stop the container first for a consistent snapshot.
        """
        # The one upward import of the composition layer, made late on purpose: commit returns an
        # Image, and the image facade builds on containers (image.run starts one); a top-level
        # import would make container <-> image a cycle.  (pyproject's import-linter contracts and
        # tests/unit/test_import_graph.py allow exactly this edge.)
        from .image import commit_container

        if self._removed:
            raise ContainerNotRunningError(f"container {self.name} was removed; commit before removing it")
        return commit_container(self, ref, settings=self._runtime.settings, store=store)

    def remove(self) -> None:
        """Kill whatever runs, delete the container's layer, logs and cgroup.  Idempotent."""
        if self._removed:
            return
        self._removed = True  # never reads a log: a hostile one must not keep the container alive
        try:
            with contextlib.suppress(LauncherError):  # gone with its launcher: its directory goes here
                self._client.remove(self.id, leftover=self.dir).result()
        finally:
            self._close_network()

    def _close_network(self) -> None:
        with self._lock:
            # From here on _netns() refuses: no new reference, no new forwarder (see address()).
            self._network_closed = True
            forwarders, self._forwarders = list(self._forwarders.values()), {}
            own, self._own_netns = self._own_netns, None
        for forwarder in forwarders:
            with contextlib.suppress(SandboxError):
                forwarder.close()
        if self._attached is not None:
            self._attached.release()
        if own is not None:
            os.close(own)

    # -- exec ------------------------------------------------------------------------------

    def exec(
        self,
        cmd: object,
        *,
        env: Mapping[str, str] | None = None,
        workdir: str | None = None,
        user: str | int | None = None,
        timeout: float | None = None,
        input: bytes | None = None,
    ) -> Result:
        """Run ``cmd`` inside the running container (its namespaces and cgroup) and wait for it."""
        argv = parse_argv(cmd)
        proc = ProcessSpec(
            argv=argv,
            env=parse_env(env, base=dict(self.spec.process.env)),
            workdir=container_path(workdir, what="workdir")
            if workdir is not None
            else self.spec.process.workdir,
            user=parse_user(user) if user is not None else self.spec.process.user,
            # Docker: an exec runs under the container's seccomp profile
            seccomp=self.spec.process.seccomp,
            seccomp_in_init=self.spec.process.seccomp_in_init,
        )
        limit = parse_timeout(timeout)
        if self._removed or self._result is not None:
            raise ContainerNotRunningError(f"container {self.name} is not running; cannot exec {list(argv)}")
        with self._lock:
            self._exec_count += 1
            n = self._exec_count
        exec_id = f"{self.id}.{n}"
        out, err = (os.path.join(self.dir, f"exec.{n}.{s}") for s in ("stdout", "stderr"))
        limits = self._log_limits
        stdin = None
        if input is not None:
            stdin = os.path.join(self.dir, f"exec.{n}.stdin")
            with open(stdin, "wb") as f:
                f.write(input)
        try:
            self._client.exec(exec_id, self.id, proc, stdout=out, stderr=err, stdin=stdin)
            exited, timed_out = self._client.wait_or_kill(exec_id, self._client.wait(exec_id), limit)
            if exited is None:
                raise SandboxTimeoutError(
                    f"exec {list(argv)} in {self.name} did not start within {timeout} s; killed", result=None
                )
            result = result_from_exit(exited, read_tail(out, limits), read_tail(err, limits), argv)
            if timed_out:
                raise SandboxTimeoutError(
                    f"exec {list(argv)} in {self.name} did not finish in {timeout} s; killed", result=result
                )
            return result
        finally:
            for path in (*rotated_paths(out, limits.max_file), *rotated_paths(err, limits.max_file), stdin):
                if path:
                    with contextlib.suppress(OSError):
                        os.unlink(path)
            with contextlib.suppress(LauncherError, ContainerNotRunningError):
                self._client.remove(exec_id).result()

    # -- kernel facts ----------------------------------------------------------------------

    def stats(self) -> CgroupStats:
        """The cgroup's accounting now (or at exit, once exited)."""
        return self._client.stats(self.id)

    def cgroup_limits(self) -> dict[str, str]:
        """The limit files of the container's cgroup as the kernel reports them (while running)."""
        return dict(self._client.limits(self.id).limits)

    # -- network ---------------------------------------------------------------------------

    @property
    def networks(self) -> tuple[Network, ...]:
        """The networks this container is on (empty: loopback only)."""
        return self._attached.networks if self._attached is not None else ()

    def ip(self, network: Network | None = None) -> str:
        """The container's address on ``network`` (default: its first network)."""
        if self._attached is None:
            raise ContainerStateError(
                f"container {self.name} has no network (network=None: loopback only)",
                hint="start it with network=sandbox.network(); from the test, address(port) reaches it "
                "anyway",
            )
        return str(self._attached.ip(network))

    def address(self, port: int) -> tuple[str, int]:
        """``(host, port)`` on which the test process reaches the container's ``port``.

        A listener on the host's 127.0.0.1 relays each connection into the container's network
        namespace, to its first network's address (or its loopback without a network).  The same
        forwarder serves every later call for that port, until the container is removed.
        """
        port = _parse_port(port)
        with self._lock:
            forwarder = self._forwarders.get(port)
        if forwarder is not None:
            return forwarder.address
        net, target = self._runtime.networks.net, (self._target_host(), port)
        forwarder = Forwarder(net, self._netns(), target)  # it owns the namespace reference
        with self._lock:
            # remove() may have run meanwhile (another thread): then nobody would close this one.
            existing = None if self._network_closed else self._forwarders.setdefault(port, forwarder)
        if existing is not forwarder:
            forwarder.close()
            if existing is None:
                raise ContainerNotRunningError(f"container {self.name} was removed")
            forwarder = existing
        return forwarder.address

    def wait_for_port(self, port: int, timeout: float = 30.0) -> None:
        """Wait until ``port`` accepts TCP connections, probed from outside the image (no tool
        needed in it): a connection made from the container's network namespace to its address."""
        port = _parse_port(port)
        target = (self._target_host(), port)
        what = f"port {port} ({target[0]}) to accept connections"
        deadline = time.monotonic() + timeout
        net = self._runtime.networks.net
        netns = self._readiness_netns(what)

        def accepts() -> bool:
            s = socket_in(net, netns)
            try:
                s.settimeout(_attempt_timeout(deadline, 1.0))  # one probe never outlasts the wait
                s.connect(target)
                return True
            except OSError:
                return False
            finally:
                s.close()

        try:
            self.wait_for(accepts, timeout=timeout, what=what)
        finally:
            os.close(netns)

    def wait_for_http(
        self, port: int, path: str = "/", status: int | None = 200, timeout: float = 30.0
    ) -> None:
        """Wait until ``GET path`` on ``port`` answers ``status`` (None: any status)."""
        if not isinstance(path, str) or not path.startswith("/"):
            raise InvalidSpecError(f"path={path!r}: expected an absolute URL path like '/health'")
        want = "any status" if status is None else f"status {status}"
        what = f"GET {path} on port {port} to answer {want}"
        deadline = time.monotonic() + timeout
        try:
            host, local_port = self.address(port)
        except ContainerNotRunningError:
            if self._removed:
                raise
            raise self._exited_error(what) from None
        seen: list[str] = []

        def answers() -> bool:
            # A server that accepts and never answers must not hold one attempt past the deadline.
            conn = http.client.HTTPConnection(host, local_port, timeout=_attempt_timeout(deadline, 2.0))
            try:
                conn.request("GET", path)
                response = conn.getresponse()
                response.read()
                seen.append(f"last answer: {response.status}")
                return status is None or response.status == status
            except (OSError, http.client.HTTPException) as e:
                seen.append(f"last attempt: {type(e).__name__}: {e}")
                return False
            finally:
                conn.close()

        try:
            self.wait_for(answers, timeout=timeout, what=what)
        except ReadinessError as e:
            if seen:
                e.message = f"{e.message}\n({seen[-1]})"
            raise

    def _target_host(self) -> str:
        return str(self._attached.interfaces[0].ip) if self._attached is not None else "127.0.0.1"

    def _netns(self) -> int:
        """A new reference to the container's network namespace: an fd the *caller* closes.

        The container keeps its own reference until remove(); callers get a dup of it, made under
        the lock remove() takes before closing it, so a dup never names a closed fd's number --
        which the next open() anywhere in this process may have reused, e.g. for another
        container's namespace.
        """
        with self._lock:
            if self._removed or self._network_closed:
                raise ContainerNotRunningError(f"container {self.name} was removed")
            if self._attached is not None:
                return os.dup(self._attached.netns_fd)
            if self._own_netns is not None:
                return os.dup(self._own_netns)
        if not self.running:
            raise ContainerNotRunningError(f"container {self.name} is not running; its network is gone")
        # By pid: hold a pidfd across the open, so a pid reused after an exit cannot fool us.
        gone = ContainerNotRunningError(f"container {self.name} exited; its network is gone")
        try:
            pidfd = os.pidfd_open(self.init_pid)
        except ProcessLookupError:
            raise gone from None  # exited (and reaped) since running was read
        try:
            try:
                fd = os.open(f"/proc/{self.init_pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                raise gone from None  # a zombie has no namespaces left to open
            if select.select([pidfd], [], [], 0)[0]:  # readable: init exited meanwhile
                os.close(fd)
                raise gone
        finally:
            os.close(pidfd)
        return self._keep_own_netns(fd)

    def _keep_own_netns(self, fd: int) -> int:
        """Keep ``fd`` as the container's reference (unless another thread was first); a dup."""
        with self._lock:
            if self._network_closed:  # removed meanwhile: its reference would never be closed
                os.close(fd)
                raise ContainerNotRunningError(f"container {self.name} was removed")
            if self._own_netns is None:
                self._own_netns = fd
            else:
                os.close(fd)  # another thread got there first
            return os.dup(self._own_netns)

    def _readiness_netns(self, what: str) -> int:
        """:meth:`_netns` for a readiness wait: a container that exited is that wait's failure
        (exit code and log tail), not a bare "not running"."""
        try:
            return self._netns()
        except ContainerNotRunningError:
            if self._removed:
                raise
            raise self._exited_error(what) from None

    # -- readiness -------------------------------------------------------------------------

    def wait_for_log(
        self, pattern: bytes | str | re.Pattern[bytes], timeout: float = 30.0, *, stream: str = "both"
    ) -> re.Match[bytes]:
        """Wait until the output contains ``pattern``; fail fast if the container exits first.

        bytes and str are matched literally; pass ``re.compile(rb"...")`` for a regular expression.
        The match is returned.
        """
        if isinstance(pattern, str):
            pattern = pattern.encode()
        regex = pattern if isinstance(pattern, re.Pattern) else re.compile(re.escape(pattern))
        found: list[re.Match[bytes]] = []
        # Incremental and bounded: each stream's new bytes are searched in a window of its newest
        # output (WAIT_WINDOW), never the whole log.
        followers = [LogFollower(os.path.join(self.dir, s), WAIT_WINDOW) for s in check_stream(stream)]

        def check() -> bool:
            for follower in followers:
                m = follower.search(regex)
                if m:
                    found.append(m)
                    return True
            return False

        try:
            self.wait_for(check, timeout=timeout, what=f"log line matching {regex.pattern!r}")
        finally:
            for follower in followers:
                follower.close()
        return found[0]

    def wait_for(
        self, condition: Callable[[], object], timeout: float = 30.0, *, what: str = "condition"
    ) -> None:
        """Poll ``condition`` until it returns truthy; fail fast if the container exits first."""
        deadline = time.monotonic() + timeout
        delay = 0.005
        while True:
            if condition():
                return
            exited = not self.running
            if exited and condition():
                return
            if exited:
                raise self._exited_error(what)
            if time.monotonic() >= deadline:
                raise ReadinessError(
                    f"timed out after {timeout} s waiting for {what} in container {self.name}; last output:\n"
                    f"{self.log_tail()}"
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.1)

    def _exited_error(self, what: str) -> ReadinessError:
        res = self._result
        if res is None and not self._removed:
            # Exited but nobody waited yet: the exit is known, collect it for the message.
            with contextlib.suppress(SandboxError):
                res = self.wait(0)
        return ReadinessError(
            f"container {self.name} exited (code {res.exit_code if res else '?'}) before {what}; "
            f"last output:\n{self.log_tail()}",
            result=res,
        )


def _attempt_timeout(deadline: float, longest: float) -> float:
    """How long one readiness attempt may block: at most ``longest``, and not past ``deadline``."""
    return max(0.01, min(longest, deadline - time.monotonic()))
