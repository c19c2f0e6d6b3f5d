"""The handle a test gets: ``sandbox.run(cmd, **opts)`` and ``sandbox.start(cmd, **opts)``.

Every container started through a handle is removed when the handle closes (the fixture's scope
ends), whatever state it is in.  A handle can carry default options (from a
``@pytest.mark.sandbox(...)`` marker or the constructor) that each call may override.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import threading
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar

from .container import Container, Result, result_from_exit
from .core import naming
from .core.errors import InvalidSpecError, LauncherError, SandboxError, SandboxTimeoutError
from .core.layerstack import ImageLike, LayerStack
from .core.seccomp import SeccompProfile, default_profile
from .core.spec import (
    BindMount,
    ContainerSpec,
    Options,
    ProcessSpec,
    check_exec_size,
    check_option_names,
    parse_argv,
    parse_env,
    parse_options,
)
from .host.cleanup import remove_tree
from .host.overlays import check_layers
from .launcher import trace
from .launcher.logs import read_logs
from .net.networks import Attached, Network
from .runtime import Runtime, get_runtime, require_root

R = TypeVar("R")


def seccomp_program(profile: SeccompProfile | None) -> bytes | None:
    """The BPF program of ``profile`` for our containers (None: unconfined), compiled once.

    Docker evaluates a profile's includes/excludes against the container's bounding set: ours is
    podman's default capability set, without CAP_SYS_ADMIN, so the mount family, setns and
    namespace-creating unshare/clone flags are refused.
    """
    if profile is None:
        return None
    if profile is default_profile():
        return _default_program()  # the common case, without hashing ~400 names (~0.3 ms) each time
    return _compile(profile)


@functools.lru_cache(maxsize=1)
def _default_program() -> bytes:
    return _compile(default_profile())


def _compile(profile: SeccompProfile) -> bytes:
    from .host.seccomp import compile_profile  # late: ctypes and libseccomp only when needed
    from .launcher.process import DEFAULT_CAPS

    return compile_profile(profile.resolve(DEFAULT_CAPS))


def _hosts_file(hostname: str) -> str:
    return f"127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\t{hostname}\n"


def _check_networks(networks: tuple[object, ...]) -> tuple[Network, ...]:
    for n in networks:
        if not isinstance(n, Network):
            raise InvalidSpecError(f"network={n!r}: expected a Network from sandbox.network(), or None")
        if n.closed:
            raise InvalidSpecError(f"network={n!r}: this network is closed (its fixture scope has ended)")
    return tuple(n for n in networks if isinstance(n, Network))


def _with_image_config(options: Options, given: Mapping[str, Any], stack: LayerStack) -> Options:
    """The image's Env/WorkingDir/User under what the call (or marker) gave: env key by key."""
    config = stack.config
    changes: dict[str, Any] = {}
    if config.env:
        changes["env"] = parse_env(given.get("env"), base=dict(config.env))
    if config.workdir and "workdir" not in given:
        changes["workdir"] = config.workdir
    if config.user and "user" not in given:
        changes["user"] = config.user
    return dataclasses.replace(options, **changes) if changes else options


def _with_default_pids(options: Options, given: Mapping[str, Any], default: int | None) -> Options:
    """The settings' pids limit (ini ``sandbox_pids_limit``, 2048) unless the call or marker gave
    ``pids=`` (``-1``: none) or the container has no cgroup; the launcher drops it where the host
    has no pids controller."""
    if default is None or not options.cgroup or given.get("pids") is not None:
        return options
    limits = dataclasses.replace(options.limits, pids=default, pids_default=True)
    return dataclasses.replace(options, limits=limits)


@dataclass(frozen=True)
class _Planned:
    spec: ContainerSpec
    options: Options
    image: ImageLike  # what the caller gave (Container.commit builds on it)
    directory: str
    attached: Attached | None = None  # its networks, until it is removed

    def release(self) -> None:
        if self.attached is not None:
            self.attached.release()


class Sandbox:
    """Starts containers and removes them all on :meth:`close`."""

    def __init__(
        self,
        *,
        defaults: Mapping[str, Any] | None = None,
        runtime: Runtime | None = None,
        on_start: Callable[[Container], None] | None = None,
    ) -> None:
        self.defaults = dict(defaults or {})
        self._runtime = runtime
        self._containers: list[Container] = []
        self._networks: list[Network] = []
        self._removals: list[Future[None]] = []
        self._lock = threading.Lock()
        self._closed = False
        self._on_start = on_start
        self.results: deque[Result] = deque(maxlen=5)  # of the last run()s, for failure reports

    @property
    def runtime(self) -> Runtime:
        return self._runtime or get_runtime()

    @property
    def containers(self) -> list[Container]:
        """Every container started through this handle, oldest first (removed ones too, so that a
        failure report can show their logs, until the handle closes)."""
        with self._lock:
            return list(self._containers)

    # -- public API ------------------------------------------------------------------------

    def network(self, subnet: str | None = None, name: str | None = None) -> Network:
        """A private network (a bridge with its own subnet), removed when this handle closes.

        Containers started with ``network=net`` (or a list) get an address on it and reach each
        other by address, name and ``aliases=``; nothing else reaches them but the test, through
        ``container.address(port)``.  ``subnet`` (e.g. ``"10.50.0.0/24"``) defaults to the next
        free one of the address pools (ini ``sandbox_address_pools``).
        """
        if self._closed:
            raise SandboxError("this sandbox handle is closed (its fixture scope has ended)")
        require_root()  # else unshare(CLONE_NEWNET) would fail with a bare EPERM
        network = self.runtime.networks.create(subnet=subnet, name=name)
        with self._lock:
            self._networks.append(network)
        return network

    def run(self, cmd: object, *, image: ImageLike | None = None, **opts: Any) -> Result:
        """Run ``cmd`` to completion in a fresh container and return its :class:`Result`.

        ``timeout`` (seconds) kills the container and raises :class:`SandboxTimeoutError` carrying
        the partial result.  The container is gone (removed in the background) when this returns.
        """
        planned = self._plan(cmd, image, opts)
        trace.event("client: run")
        exiting = self._create(planned, self.runtime.client.run)
        timeout = planned.options.timeout
        try:
            exited, timed_out = self.runtime.client.wait_or_kill(planned.spec.id, exiting, timeout)
        except BaseException:
            self._remove_later(planned.spec.id)
            planned.release()
            raise
        if exited is None:
            self._remove_later(planned.spec.id)
            planned.release()
            raise SandboxTimeoutError(
                f"{list(planned.spec.process.argv)} did not start within {timeout} s; killed",
                result=None,
                hint="raise timeout= (it includes the container's setup)",
            )
        planned.release()  # the command has exited; the namespace lives while processes are in it
        out, err = read_logs(planned.directory, self.runtime.log_limits)
        result = result_from_exit(exited, out, err, planned.spec.process.argv)
        trace.event("client: result")
        self._remove_later(planned.spec.id)
        self.results.append(result)
        if timed_out:
            raise SandboxTimeoutError(
                f"{list(planned.spec.process.argv)} did not finish in {timeout} s; killed",
                result=result,
                hint="raise timeout=, or check the command is not waiting for input",
            )
        return result

    def start(self, cmd: object, *, image: ImageLike | None = None, **opts: Any) -> Container:
        """Start ``cmd`` in a fresh container in the background; the :class:`Container`."""
        if "timeout" in opts:
            raise InvalidSpecError(
                f"timeout={opts['timeout']!r}: start() runs in the background; give the timeout to "
                "wait(), stop() or a readiness wait (run() takes timeout=)"
            )
        planned = self._plan(cmd, image, opts)
        try:
            started = self._create(planned, self.runtime.client.create).result()
        except BaseException:
            self._remove_later(planned.spec.id)
            planned.release()
            raise
        container = Container(
            self.runtime,
            planned.spec,
            planned.image,
            planned.directory,
            name=planned.options.name,
            pid=started.pid,
            init_pid=started.init_pid,
            attached=planned.attached,
        )
        with self._lock:
            self._containers.append(container)
        if self._on_start is not None:
            self._on_start(container)
        return container

    def close(self) -> None:
        """Remove every container started here (killing those still running).  Idempotent."""
        self._closed = True
        with self._lock:
            containers, self._containers = self._containers, []
            removals, self._removals = self._removals, []
            networks, self._networks = self._networks, []
        errors: list[BaseException] = []
        for c in reversed(containers):
            try:
                c.remove()
            except Exception as e:  # keep removing the others
                errors.append(e)
        for future in removals:
            try:
                future.result(timeout=60)
            except LauncherError:
                pass  # the launcher is gone: it took everything with it
            except Exception as e:
                errors.append(e)
        for network in networks:
            try:
                network.close()
            except Exception as e:
                errors.append(e)
        if errors:
            raise errors[0]

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- internals -------------------------------------------------------------------------

    def _plan(self, cmd: object, image: ImageLike | None, opts: Mapping[str, Any]) -> _Planned:
        """Validate everything, then make the container's state directory (the first thing created)."""
        if self._closed:
            raise SandboxError("this sandbox handle is closed (its fixture scope has ended)")
        argv = parse_argv(cmd)
        merged = {**self.defaults, **opts}
        merged.setdefault("seccomp", self.runtime.settings.seccomp)  # ini sandbox_seccomp
        default_image = merged.pop("image", None)  # defaults (a marker) may name the image too
        check_option_names(merged)
        image = image if image is not None else default_image
        if image is None:
            image = LayerStack()  # the host base
        elif not isinstance(image, ImageLike):
            raise InvalidSpecError(f"image={image!r}: expected an Image, e.g. Image.from_layers(path)")
        stack = image.layer_stack()
        options = _with_image_config(parse_options(**merged), merged, stack)
        check_exec_size(argv, options.env)
        check_layers(stack)
        # A removed container's name is free again (a service restarted under its name).
        if options.name is not None and any(
            c.name == options.name and not c.removed for c in self.containers
        ):
            raise InvalidSpecError(f"name={options.name!r}: a container with this name already exists here")
        seccomp = seccomp_program(options.seccomp)  # compiled before anything is created
        rt = self.runtime
        rt.info()
        options = _with_default_pids(options, merged, rt.settings.pids_limit)
        cid = naming.new_container_id()
        hostname = options.hostname or cid
        spec = ContainerSpec(
            id=cid,
            hostname=hostname,
            process=ProcessSpec(
                argv=argv,
                env=options.env,
                workdir=options.workdir,
                user=options.user,
                seccomp=seccomp,
                seccomp_in_init=options.seccomp is not None and options.seccomp.is_default,
            ),
            overlays=rt.overlays(stack),
            mounts=options.mounts,
            tmpfs=options.tmpfs,
            limits=options.limits,
            cgroup=options.cgroup,
            etc_files=(("hostname", hostname + "\n"), ("hosts", _hosts_file(hostname))),
            read_only=options.read_only,
            writable_size=options.writable_size or options.limits.memory or rt.settings.writable_size,
        )
        networks = _check_networks(options.networks)
        directory = rt.container_dir(cid)  # inside the state directory rt.info() made private
        # 0711: the container's init (an unprivileged host uid) must traverse it to reach rootfs/
        # during setup; the state directory above stays 0700, so no host user can get here.
        os.mkdir(directory)
        attached: Attached | None = None
        try:
            os.chmod(directory, 0o711)
            if options.input is not None:
                stdin = os.path.join(directory, "stdin")
                with open(stdin, "wb") as f:
                    f.write(options.input)
                spec = dataclasses.replace(spec, stdin=stdin)
            if networks:
                names = [options.name or cid, *options.aliases]
                attached = rt.networks.attach(networks, names)
                spec = self._networked(spec, attached, list(dict.fromkeys([*names, hostname])), directory)
        except BaseException:
            if attached is not None:
                attached.release()
            remove_tree(directory)
            raise
        return _Planned(spec, options, image, directory, attached)

    def _networked(
        self, spec: ContainerSpec, attached: Attached, names: list[str], directory: str
    ) -> ContainerSpec:
        """The spec of a container joining its prepared namespace, with a live /etc/hosts."""
        hosts = os.path.join(directory, "hosts")
        self.runtime.networks.join(attached, spec.id, names, hosts)  # writes it
        mounts = spec.mounts
        if not any(m.target == "/etc/hosts" for m in mounts):  # the user's own /etc/hosts wins
            mounts = (*mounts, BindMount(hosts, "/etc/hosts", read_only=True))
        return dataclasses.replace(spec, netns=attached.netns_path, mounts=mounts)

    def _create(self, planned: _Planned, create: Callable[[ContainerSpec, str], Future[R]]) -> Future[R]:
        """``client.create`` or ``client.run``; the state directory goes if the request cannot be sent."""
        try:
            return create(planned.spec, planned.directory)
        except BaseException:
            remove_tree(planned.directory)
            raise

    def _remove_later(self, container_id: str) -> None:
        """Ask the launcher to remove a container without waiting; close() collects the answers."""
        try:
            future = self.runtime.client.remove(container_id)
        except LauncherError:
            return
        with self._lock:
            self._removals.append(future)
            self._removals = [f for f in self._removals if not f.done() or f.exception() is not None]

    def forget(self, container: Container) -> None:
        with self._lock, contextlib.suppress(ValueError):
            self._containers.remove(container)
