"""The ``seccomp=`` option: Docker's seccomp profile format, parsed, checked and resolved (pure).

A profile is Docker's JSON (``docker run --security-opt seccomp=profile.json``): ``defaultAction``
(``defaultErrnoRet``), ``architectures`` or ``archMap``, and ``syscalls[]`` -- ``names``,
``action`` (``errnoRet``), ``args`` (``index``, ``value``, ``valueTwo``, ``op``) and
``includes``/``excludes`` (``caps``, ``arches``, ``minKernel``).  :func:`parse_seccomp` checks every
field before anything is created and names the bad one; :meth:`SeccompProfile.resolve` then
evaluates the includes/excludes against the container's capability bounding set, the machine and
the kernel exactly as moby's ``setupSeccomp`` does, giving the :class:`ResolvedProfile` that
:mod:`pytest_sandbox.host.seccomp` compiles to BPF.

``"default"`` is Docker's own default profile, embedded unmodified in ``seccomp_default.json``
(moby/profiles, Apache-2.0; its attribution is the file's ``comment``).
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import json
import os
import platform
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import InvalidSpecError

DEFAULT_PROFILE_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "seccomp_default.json")

ACTIONS = frozenset(
    {
        "SCMP_ACT_KILL",
        "SCMP_ACT_KILL_PROCESS",
        "SCMP_ACT_KILL_THREAD",
        "SCMP_ACT_TRAP",
        "SCMP_ACT_ERRNO",
        "SCMP_ACT_TRACE",
        "SCMP_ACT_ALLOW",
        "SCMP_ACT_LOG",
    }
)
_WITH_ERRNO = frozenset({"SCMP_ACT_ERRNO", "SCMP_ACT_TRACE"})
OPERATORS = frozenset(
    {
        "SCMP_CMP_NE",
        "SCMP_CMP_LT",
        "SCMP_CMP_LE",
        "SCMP_CMP_EQ",
        "SCMP_CMP_GE",
        "SCMP_CMP_GT",
        "SCMP_CMP_MASKED_EQ",
    }
)
# Docker's "native" architecture names (includes/excludes "arches") -> libseccomp's, as moby's
# nativeToSeccomp; and uname -m -> Docker's native name (moby uses Go's GOARCH).
NATIVE_TO_SCMP = {
    "x86": "SCMP_ARCH_X86",
    "amd64": "SCMP_ARCH_X86_64",
    "x32": "SCMP_ARCH_X32",
    "arm": "SCMP_ARCH_ARM",
    "arm64": "SCMP_ARCH_AARCH64",
    "loongarch64": "SCMP_ARCH_LOONGARCH64",
    "mips64": "SCMP_ARCH_MIPS64",
    "mips64n32": "SCMP_ARCH_MIPS64N32",
    "mipsel64": "SCMP_ARCH_MIPSEL64",
    "mips3l64n32": "SCMP_ARCH_MIPSEL64N32",
    "mipsel": "SCMP_ARCH_MIPSEL",
    "mips": "SCMP_ARCH_MIPS",
    "ppc": "SCMP_ARCH_PPC",
    "ppc64": "SCMP_ARCH_PPC64",
    "ppc64le": "SCMP_ARCH_PPC64LE",
    "riscv64": "SCMP_ARCH_RISCV64",
    "s390": "SCMP_ARCH_S390",
    "s390x": "SCMP_ARCH_S390X",
}
ARCHITECTURES = frozenset(NATIVE_TO_SCMP.values())
_MACHINE_TO_NATIVE = {
    "x86_64": "amd64",
    "aarch64": "arm64",
    "armv7l": "arm",
    "armv6l": "arm",
    "i686": "x86",
    "i386": "x86",
    "ppc64le": "ppc64le",
    "ppc64": "ppc64",
    "s390x": "s390x",
    "riscv64": "riscv64",
    "loongarch64": "loongarch64",
    "mips64": "mips64",
}
# capabilities(7), by number: the names Docker's includes/excludes "caps" use.
CAPABILITY_NAMES = (
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
)
# i386's socketcall(2) multiplexes the socket calls: socketcall(op, args) with the op's arguments in
# memory at ``args``, where a seccomp filter cannot look (seccomp(2): it sees registers only).  The
# default profile checks socket()'s family (AF_ALG 38 and AF_VSOCK 40 refused), but it allows
# socketcall, and libseccomp turns each conditional ``socket`` rule into an unconditional
# socketcall(SYS_SOCKET) rule for i386 (it must drop the family condition): so
# socketcall(SYS_SOCKET, {AF_VSOCK, ...}) through int $0x80 made the socket the direct call refuses.
# With the built-in default on an x86_64 host (socketcall exists only in its i386 sub-architecture,
# not in amd64 or x32) the SYS_SOCKET op is answered ENOSYS before any rule: "no such call", as
# Docker answers clone3, whose flags are behind a pointer too; a libc that can choose (musl, glibc
# built for Linux >= 4.3) then uses the direct socket call (i386 nr 359), which the filter checks --
# EPERM would read as a policy refusal of sockets.  Every other op stays allowed; SYS_SOCKETPAIR too:
# the profile allows socketpair(2) for every family on every architecture, so refusing it would
# protect nothing.  The cost: an i386 program whose libc makes sockets only through socketcall
# (glibc built for kernels before 4.3, e.g. Debian's i386 glibc) cannot create sockets under the
# default profile; it runs under seccomp="unconfined" or a custom profile.
SYS_SOCKET = 1  # linux/net.h: socketcall's op numbers
I386_SOCKETCALL_REFUSALS = ((SYS_SOCKET, errno.ENOSYS),)
_SYSCALL_NAME_RE = re.compile(r"^[a-z_][a-z0-9_]{0,63}$")
_CAP_RE = re.compile(r"^CAP_[A-Z_]{1,40}$")
_KERNEL_RE = re.compile(r"^(\d{1,3})\.(\d{1,3})$")
_MAX_ERRNO = 4095  # errno values a syscall can return (include/linux/err.h MAX_ERRNO)
_MAX_PROFILE_BYTES = 1 << 20
_TOP_KEYS = frozenset(
    {
        "defaultAction",
        "defaultErrnoRet",
        "architectures",
        "archMap",
        "syscalls",
        "flags",
        "listenerPath",
        "listenerMetadata",
        "comment",
    }
)
_SYSCALL_KEYS = frozenset({"names", "name", "action", "errnoRet", "args", "comment", "includes", "excludes"})
_ARG_KEYS = frozenset({"index", "value", "valueTwo", "op"})
_FILTER_KEYS = frozenset({"caps", "arches", "minKernel"})


@dataclass(frozen=True)
class ArgCondition:
    """One argument compared with ``value`` by ``op`` (MASKED_EQ: ``arg & value == value_two``)."""

    index: int
    value: int
    value_two: int
    op: str


@dataclass(frozen=True)
class Condition:
    """``includes`` or ``excludes`` of a syscalls[] entry."""

    caps: tuple[str, ...] = ()
    arches: tuple[str, ...] = ()
    min_kernel: tuple[int, int] | None = None


@dataclass(frozen=True)
class Rule:
    """What a resolved profile does for some syscalls (under some argument conditions)."""

    names: tuple[str, ...]
    action: str
    errno_ret: int | None = None
    args: tuple[ArgCondition, ...] = ()


@dataclass(frozen=True)
class SyscallEntry:
    rule: Rule
    includes: Condition = Condition()
    excludes: Condition = Condition()


@dataclass(frozen=True)
class ResolvedProfile:
    """A profile for one container: only the rules that apply to its capabilities, machine, kernel."""

    default_action: str
    default_errno: int | None
    architectures: tuple[str, ...]
    rules: tuple[Rule, ...]
    # (socketcall op, errno): i386 socketcall(2) ops answered with errno before any rule applies
    i386_socketcall_refusals: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True)
class SeccompProfile:
    """A checked profile in Docker's format; ``source`` names it in messages."""

    source: str
    default_action: str
    default_errno: int | None
    architectures: tuple[str, ...]
    arch_map: tuple[tuple[str, tuple[str, ...]], ...]
    syscalls: tuple[SyscallEntry, ...]

    @property
    def is_default(self) -> bool:
        return self.source == "default"

    def resolve(
        self, caps: frozenset[int], *, machine: str | None = None, kernel: str | None = None
    ) -> ResolvedProfile:
        """The rules that apply, as moby's setupSeccomp picks them (``caps``: the bounding set)."""
        native = _MACHINE_TO_NATIVE.get(machine or platform.machine(), "")
        cap_names = frozenset(CAPABILITY_NAMES[c] for c in caps if c < len(CAPABILITY_NAMES))
        version = _kernel_version(kernel or platform.release())
        rules = tuple(
            e.rule for e in self.syscalls if _applies(e, native=native, caps=cap_names, kernel=version)
        )
        arches = self._arches(native)
        refusals: tuple[tuple[int, int], ...] = ()
        if self.is_default and native == "amd64" and "SCMP_ARCH_X86" in arches:
            refusals = I386_SOCKETCALL_REFUSALS
        return ResolvedProfile(self.default_action, self.default_errno, arches, rules, refusals)

    def _arches(self, native: str) -> tuple[str, ...]:
        if self.architectures:
            return self.architectures
        own = NATIVE_TO_SCMP.get(native)
        for arch, subs in self.arch_map:
            if arch == own:
                return (arch, *subs)
        return ()


def _applies(e: SyscallEntry, *, native: str, caps: frozenset[str], kernel: tuple[int, int]) -> bool:
    """moby: an entry is skipped if any exclude matches or any include does not."""
    ex, inc = e.excludes, e.includes
    if native in ex.arches or any(c in caps for c in ex.caps):
        return False
    if ex.min_kernel is not None and kernel >= ex.min_kernel:
        return False
    if inc.arches and native not in inc.arches:
        return False
    if not all(c in caps for c in inc.caps):
        return False
    return inc.min_kernel is None or kernel >= inc.min_kernel


def _kernel_version(release: str) -> tuple[int, int]:
    m = re.match(r"^(\d+)\.(\d+)", release)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


# -- parsing ---------------------------------------------------------------------------------


def parse_seccomp(value: object) -> SeccompProfile | None:
    """``"default"``, ``"unconfined"`` (None: no filter), a profile dict or a path to a .json file."""
    if value == "default":
        return default_profile()
    if value == "unconfined":
        return None
    if isinstance(value, Mapping):
        return parse_profile(value, source="seccomp")
    if isinstance(value, (str, os.PathLike)) and os.fspath(value).endswith(".json"):
        return load_profile(os.fspath(value))
    raise InvalidSpecError(
        f"seccomp={value!r}: expected 'default', 'unconfined', a profile in Docker's JSON format "
        "(a dict) or the path of a .json file holding one"
    )


def parse_setting(raw: str, *, what: str) -> str:
    """ini sandbox_seccomp: 'default', 'unconfined', or a profile file (made absolute; checked now,
    read again at each start)."""
    if raw in ("default", "unconfined"):
        return raw
    path = os.path.abspath(os.path.expanduser(raw.strip()))
    try:
        parse_seccomp(path)
    except InvalidSpecError as e:
        raise InvalidSpecError(f"{what}: {e.message}", hint=e.hint) from None
    return path


@functools.lru_cache(maxsize=1)
def default_profile() -> SeccompProfile:
    """Docker's default profile (parsed once per process)."""
    return dataclasses.replace(load_profile(DEFAULT_PROFILE_FILE), source="default")


def load_profile(path: str) -> SeccompProfile:
    """A profile from a JSON file (bounded read: 1 MiB is far more than any real profile)."""
    try:
        with open(path, "rb") as f:
            data = f.read(_MAX_PROFILE_BYTES + 1)
    except OSError as e:
        raise InvalidSpecError(f"seccomp={path!r}: cannot read the profile: {e.strerror}") from None
    if len(data) > _MAX_PROFILE_BYTES:
        raise InvalidSpecError(f"seccomp={path!r}: the profile is larger than 1 MiB")
    try:
        doc = json.loads(data)
    except ValueError as e:
        raise InvalidSpecError(f"seccomp={path!r}: not valid JSON: {e}") from None
    if not isinstance(doc, Mapping):
        raise InvalidSpecError(f"seccomp={path!r}: expected a JSON object (Docker's profile format)")
    return parse_profile(doc, source=f"seccomp={path!r}")


def parse_profile(doc: Mapping[str, Any], *, source: str) -> SeccompProfile:
    """Check every field of a profile in Docker's format; InvalidSpecError names the bad one."""
    _no_unknown_keys(doc, _TOP_KEYS, source)
    if doc.get("listenerPath") or doc.get("listenerMetadata"):
        raise InvalidSpecError(f"{source}: listenerPath: seccomp notify listeners are not supported")
    if doc.get("flags"):
        raise InvalidSpecError(f"{source}: flags: filter flags are not supported (give an empty list)")
    action = _action(doc.get("defaultAction"), f"{source}: defaultAction")
    default_errno = _errno_ret(doc, "defaultErrnoRet", action, f"{source}: defaultErrnoRet")
    architectures = tuple(_arch(a, f"{source}: architectures") for a in _list(doc, "architectures", source))
    arch_map = tuple(
        _arch_map_entry(m, f"{source}: archMap[{i}]") for i, m in enumerate(_list(doc, "archMap", source))
    )
    if architectures and arch_map:
        raise InvalidSpecError(f"{source}: give 'architectures' or 'archMap', not both (as Docker)")
    syscalls = tuple(
        _syscall(s, f"{source}: syscalls[{i}]") for i, s in enumerate(_list(doc, "syscalls", source))
    )
    return SeccompProfile(source, action, default_errno, architectures, arch_map, syscalls)


def _no_unknown_keys(d: Mapping[str, Any], known: frozenset[str], where: str) -> None:
    unknown = sorted(str(k) for k in d if k not in known)
    if unknown:
        raise InvalidSpecError(
            f"{where}: unknown field {unknown[0]!r}; the fields are {', '.join(sorted(known))}"
        )


def _list(d: Mapping[str, Any], key: str, where: str) -> list[Any]:
    value = d.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise InvalidSpecError(f"{where}: {key}: expected a list, got {value!r}")
    return value


def _action(value: object, where: str) -> str:
    if value == "SCMP_ACT_NOTIFY":
        raise InvalidSpecError(f"{where}: SCMP_ACT_NOTIFY (a user-space listener) is not supported")
    if not isinstance(value, str) or value not in ACTIONS:
        raise InvalidSpecError(f"{where}={value!r}: expected one of {', '.join(sorted(ACTIONS))}")
    return value


def _errno_ret(d: Mapping[str, Any], key: str, action: str, where: str) -> int | None:
    value = d.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _MAX_ERRNO:
        raise InvalidSpecError(f"{where}={value!r}: expected an errno number from 0 to {_MAX_ERRNO}")
    if action not in _WITH_ERRNO:
        raise InvalidSpecError(f"{where}: only SCMP_ACT_ERRNO and SCMP_ACT_TRACE take an errno, not {action}")
    return value


def _arch(value: object, where: str) -> str:
    if not isinstance(value, str) or value not in ARCHITECTURES:
        raise InvalidSpecError(f"{where}: {value!r} is not a libseccomp architecture (e.g. SCMP_ARCH_X86_64)")
    return value


def _arch_map_entry(m: object, where: str) -> tuple[str, tuple[str, ...]]:
    if not isinstance(m, Mapping):
        raise InvalidSpecError(f"{where}: expected an object with architecture and subArchitectures")
    _no_unknown_keys(m, frozenset({"architecture", "subArchitectures"}), where)
    subs = m.get("subArchitectures") or []
    if not isinstance(subs, list):
        raise InvalidSpecError(f"{where}: subArchitectures: expected a list or null")
    return _arch(m.get("architecture"), f"{where}: architecture"), tuple(
        _arch(a, f"{where}: subArchitectures") for a in subs
    )


def _syscall(s: object, where: str) -> SyscallEntry:
    if not isinstance(s, Mapping):
        raise InvalidSpecError(f"{where}: expected an object with names and action")
    _no_unknown_keys(s, _SYSCALL_KEYS, where)
    action = _action(s.get("action"), f"{where}: action")
    rule = Rule(
        names=_names(s, where),
        action=action,
        errno_ret=_errno_ret(s, "errnoRet", action, f"{where}: errnoRet"),
        args=tuple(_arg(a, f"{where}: args[{i}]") for i, a in enumerate(_list(s, "args", where))),
    )
    if len(rule.args) > 6:
        raise InvalidSpecError(f"{where}: args: a syscall has at most 6 arguments")
    return SyscallEntry(
        rule,
        _condition(s.get("includes"), f"{where}: includes"),
        _condition(s.get("excludes"), f"{where}: excludes"),
    )


def _names(s: Mapping[str, Any], where: str) -> tuple[str, ...]:
    names = _list(s, "names", where)
    if s.get("name"):
        if names:
            raise InvalidSpecError(f"{where}: give 'name' or 'names', not both (as Docker)")
        names = [s["name"]]
    if not names:
        raise InvalidSpecError(f"{where}: names: expected at least one syscall name")
    for n in names:
        if not isinstance(n, str) or not _SYSCALL_NAME_RE.match(n):
            raise InvalidSpecError(f"{where}: names: {n!r} is not a syscall name (e.g. 'mkdir')")
    return tuple(names)


def _arg(a: object, where: str) -> ArgCondition:
    if not isinstance(a, Mapping):
        raise InvalidSpecError(f"{where}: expected an object with index, value, valueTwo, op")
    _no_unknown_keys(a, _ARG_KEYS, where)
    index = a.get("index")
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index <= 5:
        raise InvalidSpecError(f"{where}: index={index!r}: expected an argument number from 0 to 5")
    op = a.get("op")
    if not isinstance(op, str) or op not in OPERATORS:
        raise InvalidSpecError(f"{where}: op={op!r}: expected one of {', '.join(sorted(OPERATORS))}")
    return ArgCondition(
        index,
        _u64(a.get("value", 0), f"{where}: value"),
        _u64(a.get("valueTwo", 0), f"{where}: valueTwo"),
        op,
    )


def _u64(value: object, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << 64:
        raise InvalidSpecError(f"{where}={value!r}: expected an unsigned 64-bit integer")
    return value


def _condition(c: object, where: str) -> Condition:
    if c is None:
        return Condition()
    if not isinstance(c, Mapping):
        raise InvalidSpecError(f"{where}: expected an object with caps, arches, minKernel")
    _no_unknown_keys(c, _FILTER_KEYS, where)
    caps = _list(c, "caps", where)
    for cap in caps:
        if not isinstance(cap, str) or not _CAP_RE.match(cap):
            raise InvalidSpecError(f"{where}: caps: {cap!r} is not a capability name (e.g. CAP_SYS_ADMIN)")
    arches = _list(c, "arches", where)
    for arch in arches:
        if not isinstance(arch, str) or arch not in NATIVE_TO_SCMP:
            raise InvalidSpecError(
                f"{where}: arches: {arch!r}: expected one of {', '.join(sorted(NATIVE_TO_SCMP))}"
            )
    return Condition(tuple(caps), tuple(arches), _min_kernel(c.get("minKernel"), f"{where}: minKernel"))


def _min_kernel(value: object, where: str) -> tuple[int, int] | None:
    if value is None or value == "":
        return None
    m = _KERNEL_RE.match(value) if isinstance(value, str) else None
    if m is None or (m.group(1), m.group(2)) == ("0", "0"):
        raise InvalidSpecError(f'{where}={value!r}: expected "<kernel>.<major>", e.g. "4.8"')
    return int(m.group(1)), int(m.group(2))
