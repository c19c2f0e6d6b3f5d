"""What a container is, validated and frozen before anything is created (pure, stdlib only).

:func:`parse_options` turns the keyword arguments of ``sandbox.run``/``sandbox.start`` into a
:class:`Options`; every mistake raises :class:`InvalidSpecError` naming the value and the fix.  The
launcher receives a :class:`ContainerSpec` (options + the image's overlay plan + ids) as a dict.
"""

from __future__ import annotations

import base64
import difflib
import functools
import inspect
import os
import posixpath
import re
import stat
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import InvalidSpecError
from .limits import Limits, parse_writable_size
from .naming import ID_RANGE, valid_name
from .seccomp import SeccompProfile, parse_seccomp
from .units import parse_size

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_ENV_KEY_RE = re.compile(r"^[^=\0]+$")
_HOSTNAME_RE = re.compile(
    r"^[a-zA-Z0-9]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?(\.[a-zA-Z0-9]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?)*$"
)
_USER_RE = re.compile(r"^[a-zA-Z0-9_.][a-zA-Z0-9_.-]{0,31}\$?$")
MAX_MAPPED_ID = ID_RANGE - 1
MAX_MOUNTS = 200  # bind mounts per container: their fds go in one SCM_RIGHTS message (SCM_MAX_FD 253)


@dataclass(frozen=True)
class BindMount:
    source: str  # absolute host path, with no symlink in it
    target: str  # absolute container path
    read_only: bool = False
    # (st_dev, st_ino) of the source when run() resolved it: the object the launcher must mount
    # (host/bindsource opens it again, by fd, and refuses anything else).  None: not resolved yet.
    identity: tuple[int, int] | None = field(default=None, compare=False)


@dataclass(frozen=True)
class TmpfsMount:
    target: str
    size: int | None = None
    mode: int = 0o1777


@dataclass(frozen=True)
class ProcessSpec:
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
    workdir: str = "/"
    user: str | None = None  # "uid", "uid:gid", "name" or "name:group"; None: root
    # The compiled seccomp filter (struct sock_filter[], see pytest_sandbox.host.seccomp); None:
    # unconfined.  seccomp_in_init: the built-in profile, which allows all that the container's
    # init and the exec helper still do, so they may take it too (the posix_spawn fast path).
    seccomp: bytes | None = None
    seccomp_in_init: bool = False

    def __post_init__(self) -> None:
        check_exec_size(self.argv, self.env)  # what execve(2) would refuse, refused before it is sent

    def to_wire(self) -> dict[str, Any]:
        return {
            "argv": list(self.argv),
            "env": [list(kv) for kv in self.env],
            "workdir": self.workdir,
            "user": self.user,
            "seccomp": None if self.seccomp is None else _b64encode(self.seccomp),
            "seccomp_in_init": self.seccomp_in_init,
        }

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> ProcessSpec:
        return cls(
            argv=tuple(d["argv"]),
            env=tuple((k, v) for k, v in d["env"]),
            workdir=d["workdir"],
            user=d["user"],
            seccomp=None if d.get("seccomp") is None else _b64decode(d["seccomp"]),
            seccomp_in_init=bool(d.get("seccomp_in_init")),
        )


# Every start carries the same ~10 KB filter: encode it, and check and decode it, once (~0.15 ms).
@functools.lru_cache(maxsize=8)
def _b64encode(program: bytes) -> str:
    return base64.b64encode(program).decode()


@functools.lru_cache(maxsize=8)
def _b64decode(text: str) -> bytes:
    return base64.b64decode(text, validate=True)


@dataclass(frozen=True)
class OverlaySpec:
    """One overlay mount: ``lowers`` are host directories, topmost first; ``target`` "" is the root."""

    target: str
    lowers: tuple[str, ...]


@dataclass(frozen=True)
class Options:
    """The validated keyword arguments of run()/start()."""

    env: tuple[tuple[str, str], ...] = ()
    workdir: str = "/"
    user: str | None = None
    hostname: str | None = None
    name: str | None = None
    limits: Limits = field(default_factory=Limits)
    mounts: tuple[BindMount, ...] = ()
    tmpfs: tuple[TmpfsMount, ...] = ()
    timeout: float | None = None
    read_only: bool = False
    input: bytes | None = None
    cgroup: bool = True
    networks: tuple[object, ...] = ()  # pytest_sandbox.net.networks.Network objects (checked there)
    aliases: tuple[str, ...] = ()
    writable_size: int | None = None  # None: the memory limit, else ini sandbox_writable_size
    seccomp: SeccompProfile | None = None  # None: unconfined


@dataclass(frozen=True)
class ContainerSpec:
    """Everything the launcher needs to create one container."""

    id: str
    hostname: str
    process: ProcessSpec
    overlays: tuple[OverlaySpec, ...]
    mounts: tuple[BindMount, ...] = ()
    tmpfs: tuple[TmpfsMount, ...] = ()
    limits: Limits = field(default_factory=Limits)
    cgroup: bool = True
    etc_files: tuple[tuple[str, str], ...] = ()
    read_only: bool = False
    stdin: str | None = None
    # A network namespace prepared for the container (pytest_sandbox.net.networks), as a path the
    # first process opens while still host root; None: the container makes its own (loopback only).
    netns: str | None = None
    # The bound of the writable area: the writable layer's own tmpfs and /tmp (and a tmpfs= mount
    # given no size) each get size=writable_size, nr_inodes=limits.writable_inodes(writable_size).
    # None: unbounded (the kernel's tmpfs default, half of RAM); the sandbox always sets it.
    writable_size: int | None = None

    def to_wire(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "hostname": self.hostname,
            "process": self.process.to_wire(),
            "overlays": [{"target": o.target, "lowers": list(o.lowers)} for o in self.overlays],
            "mounts": [
                {"source": m.source, "target": m.target, "read_only": m.read_only, "identity": m.identity}
                for m in self.mounts
            ],
            "tmpfs": [{"target": t.target, "size": t.size, "mode": t.mode} for t in self.tmpfs],
            "limits": self.limits.to_wire(),
            "cgroup": self.cgroup,
            "etc_files": [list(kv) for kv in self.etc_files],
            "read_only": self.read_only,
            "stdin": self.stdin,
            "netns": self.netns,
            "writable_size": self.writable_size,
        }

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> ContainerSpec:
        return cls(
            id=d["id"],
            hostname=d["hostname"],
            process=ProcessSpec.from_wire(d["process"]),
            overlays=tuple(OverlaySpec(o["target"], tuple(o["lowers"])) for o in d["overlays"]),
            mounts=tuple(
                BindMount(m["source"], m["target"], m["read_only"], _identity_from_wire(m.get("identity")))
                for m in d["mounts"]
            ),
            tmpfs=tuple(TmpfsMount(t["target"], t["size"], t["mode"]) for t in d["tmpfs"]),
            limits=Limits.from_wire(d["limits"]),
            cgroup=d["cgroup"],
            etc_files=tuple((k, v) for k, v in d["etc_files"]),
            netns=d.get("netns"),
            read_only=d["read_only"],
            stdin=d["stdin"],
            writable_size=d.get("writable_size"),
        )


def _identity_from_wire(value: object) -> tuple[int, int] | None:
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise ValueError(f"a mount's identity must be [dev, ino], not {value!r}")
    return (int(value[0]), int(value[1]))


def parse_argv(cmd: object) -> tuple[str, ...]:
    if isinstance(cmd, (str, bytes)):
        raise InvalidSpecError(
            f"cmd={cmd!r}: pass a list of arguments, e.g. ['ls', '-l'], or a shell command as "
            f"['sh', '-c', {cmd!r}]"
        )
    if not isinstance(cmd, Sequence) or not cmd:
        raise InvalidSpecError(f"cmd={cmd!r}: expected a non-empty list of strings, e.g. ['ls', '-l']")
    argv = []
    for item in cmd:
        arg = os.fspath(item) if isinstance(item, os.PathLike) else item
        if not isinstance(arg, str):
            raise InvalidSpecError(f"cmd={cmd!r}: argument {arg!r} is not a string")
        if "\0" in arg:
            raise InvalidSpecError(f"cmd={cmd!r}: argument {arg!r} contains a NUL byte")
        argv.append(arg)
    if not argv[0]:
        raise InvalidSpecError(f"cmd={cmd!r}: the program name is empty")
    return tuple(argv)


def container_path(value: object, *, what: str) -> str:
    """A normalised absolute path inside the container."""
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value:
        raise InvalidSpecError(
            f"{what}={value!r}: expected an absolute path inside the container, e.g. '/app'"
        )
    if "\0" in value:
        raise InvalidSpecError(f"{what}={value!r}: contains a NUL byte")
    if not value.startswith("/"):
        raise InvalidSpecError(
            f"{what}={value!r}: must be an absolute path inside the container, e.g. {'/' + value!r}"
        )
    norm = posixpath.normpath(value)
    if norm.startswith("//"):
        norm = "/" + norm.lstrip("/")
    # /proc/self/fd/N as a working directory put runc's processes in the host's filesystem
    # (CVE-2024-21626); no path under /proc is a sensible mount target or workdir either.
    if norm == "/proc" or norm.startswith("/proc/"):
        raise InvalidSpecError(f"{what}={value!r}: paths under /proc are not allowed (CVE-2024-21626)")
    return norm


# PYTHONUNBUFFERED: a command's stdout is a log file, so Python would block-buffer it and
# wait_for_log(b"Serving HTTP") would wait for a flush that never comes (Docker's classic trap).
# Pass env={"PYTHONUNBUFFERED": ""} to get buffering back.
DEFAULT_ENV = {"PATH": DEFAULT_PATH, "PYTHONUNBUFFERED": "1"}


def parse_env(env: object, *, base: Mapping[str, str] | None = None) -> tuple[tuple[str, str], ...]:
    merged: dict[str, str] = dict(DEFAULT_ENV)
    if base:
        merged.update(base)
    if env is None:
        env = {}
    if not isinstance(env, Mapping):
        raise InvalidSpecError(f"env={env!r}: expected a mapping of names to strings, e.g. {{'DEBUG': '1'}}")
    for key, raw in env.items():
        if not isinstance(key, str) or not _ENV_KEY_RE.match(key):
            raise InvalidSpecError(
                f"env: invalid variable name {key!r} (must be non-empty, without '=' or NUL)"
            )
        val = str(raw) if isinstance(raw, (int, float)) and not isinstance(raw, bool) else raw
        if not isinstance(val, str) or "\0" in val:
            raise InvalidSpecError(f"env[{key!r}]={val!r}: expected a string without NUL bytes")
        merged[key] = val
    return tuple(merged.items())


def parse_user(user: object) -> str | None:
    """``0``, ``"1000"``, ``"1000:1000"``, ``"nobody"``, ``"postgres:postgres"``; None is root."""
    if user is None:
        return None
    if isinstance(user, int) and not isinstance(user, bool):
        user = str(user)
    if not isinstance(user, str) or not user:
        raise InvalidSpecError(f"user={user!r}: expected 'uid', 'uid:gid', 'name' or 'name:group'")
    parts = user.split(":")
    if len(parts) > 2 or not all(parts):
        raise InvalidSpecError(f"user={user!r}: expected 'uid', 'uid:gid', 'name' or 'name:group'")
    for part in parts:
        if part.isascii() and part.isdigit():  # not str.isdigit alone: int("²") raises ValueError
            if int(part) > MAX_MAPPED_ID:
                raise InvalidSpecError(
                    f"user={user!r}: id {part} is outside the container's user namespace (0-{MAX_MAPPED_ID})"
                )
        elif not _USER_RE.match(part):
            raise InvalidSpecError(f"user={user!r}: {part!r} is not a valid user or group name")
    return user


def parse_hostname(hostname: object) -> str | None:
    if hostname is None:
        return None
    if not isinstance(hostname, str) or len(hostname) > 64 or not _HOSTNAME_RE.match(hostname):
        raise InvalidSpecError(
            f"hostname={hostname!r}: expected letters, digits, '-' and '.', at most 64 characters (RFC 1123)"
        )
    return hostname


def parse_mounts(mounts: object) -> tuple[BindMount, ...]:
    """``{host: container}``, ``{host: (container, "ro")}``, ``["host:container[:ro]"]`` or BindMounts."""
    if mounts is None:
        return ()
    out = []
    targets = set()
    for given, dst, mode in _mount_items(mounts):
        mount = _bind_mount(given, dst, mode)
        if mount.target in targets:
            raise InvalidSpecError(f"mounts: two mounts target {mount.target!r}")
        targets.add(mount.target)
        out.append(mount)
    if len(out) > MAX_MOUNTS:
        raise InvalidSpecError(
            f"mounts: {len(out)} given; at most {MAX_MOUNTS} bind mounts per container (each source "
            "travels to the launcher as a descriptor, and one message carries at most 253)"
        )
    return tuple(out)


def _mount_items(mounts: object) -> list[tuple[object, object, object]]:
    """Each accepted shape of ``mounts`` as (source, target, mode) triples, not yet checked."""
    if isinstance(mounts, Mapping):
        return [
            (src, dst[0], dst[1]) if isinstance(dst, (tuple, list)) and len(dst) == 2 else (src, dst, "rw")
            for src, dst in mounts.items()
        ]
    if isinstance(mounts, Iterable) and not isinstance(mounts, (str, bytes)):
        return [_mount_item(m) for m in mounts]
    raise InvalidSpecError(f"mounts={mounts!r}: expected a mapping of host paths to container paths")


def _mount_item(m: object) -> tuple[object, object, object]:
    if isinstance(m, BindMount):
        return (m.source, m.target, "ro" if m.read_only else "rw")
    if isinstance(m, str):
        parts = m.split(":")
        if len(parts) not in (2, 3):
            raise InvalidSpecError(f"mounts: {m!r}: expected 'host_path:container_path[:ro|rw]'")
        return (parts[0], parts[1], parts[2] if len(parts) == 3 else "rw")
    raise InvalidSpecError(f"mounts: {m!r}: expected 'host:container[:ro]' or a BindMount")


def _bind_mount(given: object, dst: object, mode: object) -> BindMount:
    if mode not in ("ro", "rw"):
        raise InvalidSpecError(f"mounts: mode {mode!r} for {given!r}: expected 'ro' or 'rw'")
    src = os.fspath(given) if isinstance(given, os.PathLike) else given
    if not isinstance(src, str) or not os.path.isabs(src):
        raise InvalidSpecError(f"mounts: source {src!r} must be an absolute host path")
    if not os.path.exists(src):
        raise InvalidSpecError(f"mounts: source {src!r} does not exist on the host")
    target = container_path(dst, what=f"mounts[{src!r}]")
    if target == "/":
        raise InvalidSpecError(f"mounts: cannot mount {src!r} over the container's root; use an image layer")
    real, identity = _resolve_source(src)
    return BindMount(real, target, mode == "ro", identity)


def _resolve_source(src: str) -> tuple[str, tuple[int, int]]:
    """``src`` normalised and its (st_dev, st_ino); it must be its own canonical path (no symlink).

    Resolved once, here; the launcher mounts exactly this object or nothing (issue 9, item 1).
    A symlink is refused rather than followed: a container with a read-write bind of a parent
    directory can plant one (``ln -s / shared/cache``) for the next container that mounts it, and
    a symlink followed later, when the mount is made, can be swapped in between the two lookups.
    """
    try:
        real = os.path.realpath(src)
    except OSError as e:  # readlink of a symlink swapped for a directory meanwhile: EINVAL
        raise InvalidSpecError(f"mounts: source {src!r} changed while resolved ({e.strerror})") from None
    if real != posixpath.normpath(src):
        raise InvalidSpecError(
            f"mounts: source {src!r} goes through a symlink (it resolves to {real!r}); give the "
            "resolved path: a bind source is never followed through a symlink, which a container "
            "writing a parent directory could have planted"
        )
    try:
        st = os.stat(real, follow_symlinks=False)
    except OSError as e:
        raise InvalidSpecError(f"mounts: source {src!r}: {e.strerror}") from None
    if stat.S_ISLNK(st.st_mode):  # replaced by a symlink since realpath looked
        raise InvalidSpecError(f"mounts: source {src!r} changed while resolved (now a symlink)")
    return real, (st.st_dev, st.st_ino)


def parse_tmpfs(tmpfs: object) -> tuple[TmpfsMount, ...]:
    """``["/run"]`` or ``{"/run": "64m"}`` (None for no size limit)."""
    if tmpfs is None:
        return ()
    pairs: list[tuple[object, object]]
    if isinstance(tmpfs, Mapping):
        pairs = list(tmpfs.items())
    elif isinstance(tmpfs, (str, os.PathLike)):
        pairs = [(tmpfs, None)]
    elif isinstance(tmpfs, Iterable):
        pairs = [(t, None) for t in tmpfs]
    else:
        raise InvalidSpecError(f"tmpfs={tmpfs!r}: expected a list of paths or a mapping of path to size")
    out = []
    for path, size in pairs:
        target = container_path(path, what="tmpfs")
        if target == "/":
            raise InvalidSpecError("tmpfs: cannot mount a tmpfs over the container's root")
        out.append(TmpfsMount(target, None if size is None else parse_size(size, what=f"tmpfs[{target!r}]")))
    return tuple(out)


def parse_timeout(timeout: object) -> float | None:
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise InvalidSpecError(f"timeout={timeout!r}: expected a positive number of seconds, or None")
    return float(timeout)


def parse_options(
    *,
    env: object = None,
    workdir: object = "/",
    user: object = None,
    hostname: object = None,
    name: object = None,
    memory: object = None,
    memory_swap: object = None,
    cpus: object = None,
    cpu_shares: object = None,
    cpuset: object = None,
    pids: object = None,
    mounts: object = None,
    tmpfs: object = None,
    timeout: object = None,
    network: object = None,
    aliases: object = None,
    read_only: object = False,
    input: object = None,
    cgroup: object = True,
    writable_size: object = None,
    seccomp: object = "default",
) -> Options:
    """Validate every keyword of run()/start(); raise InvalidSpecError before anything exists."""
    networks = _as_tuple(network)
    if len(set(map(id, networks))) != len(networks):
        raise InvalidSpecError(f"network={network!r}: a network is listed twice")
    alias_names = parse_aliases(aliases)
    if alias_names and not networks:
        raise InvalidSpecError(f"aliases={aliases!r}: aliases are names on a network; give network= too")
    if name is not None and (not isinstance(name, str) or not valid_name(name)):
        raise InvalidSpecError(
            f"name={name!r}: expected letters, digits, '_', '.', '-' (starting with a letter or digit), "
            "at most 63 characters"
        )
    if not isinstance(read_only, bool):
        raise InvalidSpecError(f"read_only={read_only!r}: expected True or False")
    if not isinstance(cgroup, bool):
        raise InvalidSpecError(f"cgroup={cgroup!r}: expected True or False")
    limits = Limits.parse(
        memory=memory, memory_swap=memory_swap, cpus=cpus, cpu_shares=cpu_shares, cpuset=cpuset, pids=pids
    )
    if not cgroup and not limits.is_empty():
        raise InvalidSpecError(
            f"cgroup=False with limits ({', '.join(limits.controllers())}): "
            "limits need a cgroup; drop one or the other"
        )
    if input is not None and not isinstance(input, (bytes, bytearray, memoryview)):
        raise InvalidSpecError(f"input={input!r}: expected bytes (use 'text'.encode())")
    return Options(
        env=parse_env(env),
        workdir=container_path(workdir, what="workdir"),
        user=parse_user(user),
        hostname=parse_hostname(hostname),
        name=name,
        limits=limits,
        mounts=parse_mounts(mounts),
        tmpfs=parse_tmpfs(tmpfs),
        timeout=parse_timeout(timeout),
        read_only=read_only,
        input=None if input is None else bytes(input),
        cgroup=cgroup,
        networks=networks,
        aliases=alias_names,
        writable_size=None if writable_size is None else parse_writable_size(writable_size),
        seccomp=parse_seccomp(seccomp),
    )


def _as_tuple(value: object) -> tuple[object, ...]:
    if value is None:
        return ()
    if isinstance(value, (list, tuple)):
        return tuple(value)
    return (value,)


def parse_aliases(aliases: object) -> tuple[str, ...]:
    """More names for the container on its networks (Docker's ``--network-alias``)."""
    if aliases is None:
        return ()
    items = [aliases] if isinstance(aliases, str) else aliases
    if not isinstance(items, (list, tuple)):
        raise InvalidSpecError(f"aliases={aliases!r}: expected a name or a list of names")
    for a in items:
        if not isinstance(a, str) or not valid_name(a):
            raise InvalidSpecError(
                f"aliases: {a!r}: expected letters, digits, '_', '.', '-' (starting with a letter or digit), "
                "at most 63 characters"
            )
    return tuple(items)


OPTION_NAMES = frozenset(inspect.signature(parse_options).parameters)

#: What defaults (``@pytest.mark.sandbox``, ``Sandbox(defaults=)``) may name: run()'s options and image.
DEFAULT_NAMES = OPTION_NAMES | {"image"}
# Checked only at run(): a bind mount's source may not exist yet when a test is collected, and a
# network (and its aliases) is an object made by a running test.
_RUN_TIME_OPTIONS = frozenset({"image", "mounts", "network", "aliases"})


def check_option_names(names: Iterable[str]) -> None:
    """InvalidSpecError for an unknown option, naming the closest valid one (a typo like memroy=)."""
    unknown = sorted(set(names) - DEFAULT_NAMES)
    if unknown:
        close = difflib.get_close_matches(unknown[0], sorted(DEFAULT_NAMES), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise InvalidSpecError(
            f"unknown option {unknown[0]!r}{hint}; the options are: {', '.join(sorted(DEFAULT_NAMES))}"
        )


def check_defaults(defaults: Mapping[str, object]) -> None:
    """What can be checked of default options before a test runs (a marker's, at collection):
    their names, and the values that do not depend on what exists at run time."""
    check_option_names(defaults)
    parse_options(**{k: v for k, v in defaults.items() if k not in _RUN_TIME_OPTIONS})


# execve(2)'s limits, as the kernel counts them: one argument or NAME=value string, its NUL
# included, may have MAX_ARG_STRLEN (32 pages) bytes; all of them together, with their pointers,
# a quarter of the stack limit -- 2 MiB with the usual 8 MiB.  Beyond either, E2BIG.  Checked here,
# before anything is made, so that a huge value is an error naming it, not a message the launcher
# is asked to carry (issue 9: a 65 MiB env= value took the launcher down).
MAX_ARG_STRLEN = 32 * 4096
MAX_ARGS_AND_ENV = 2 << 20


def check_exec_size(argv: Sequence[str], env: Sequence[tuple[str, str]]) -> None:
    """InvalidSpecError naming the argument or variable that execve(2) would refuse (E2BIG)."""
    strings = [(f"cmd[{i}]", a) for i, a in enumerate(argv)] + [(f"env[{k!r}]", f"{k}={v}") for k, v in env]
    total = 0
    for what, text in strings:
        size = len(text.encode("utf-8", "surrogatepass")) + 1
        if size > MAX_ARG_STRLEN:
            raise InvalidSpecError(
                f"{what}: {size - 1} bytes; one argument or NAME=value may have at most "
                f"{MAX_ARG_STRLEN - 1} (MAX_ARG_STRLEN, execve(2))",
                hint="pass large data as a file: mounts= or input=, not in cmd or env",
            )
        total += size + 8  # and its pointer
    if total > MAX_ARGS_AND_ENV:
        raise InvalidSpecError(
            f"cmd and env together: {total} bytes; at most {MAX_ARGS_AND_ENV} (2 MiB: execve(2)'s "
            "limit with the default 8 MiB stack)",
            hint="pass large data as a file: mounts= or input=, not in cmd or env",
        )
