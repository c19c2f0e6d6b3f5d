"""seccomp filters: compiled to BPF in pytest by libseccomp, installed in the container by the kernel.

Compiling (:func:`compile_profile`) goes through Debian's libseccomp2 (``libseccomp.so.2``) with
ctypes -- no C compiler at run time, no Python dependency: the few calls needed (init, arch_add,
syscall_resolve_name, rule_add_array, attr_set, export_bpf, release) are bound here, as runc binds
the same ones in Go.  A profile is compiled once per distinct resolved profile (cached) and the BPF
program travels with the spec to the launcher.

Installing (:func:`install`) is stdlib-only and runs in the container's process as the very last
step before the command starts: ``prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &sock_fprog)``
(seccomp(2)), after no_new_privs, which is what lets a process without CAP_SYS_ADMIN install one.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import struct
from collections.abc import Iterator

from ..core.errors import InvalidSpecError, SeccompUnavailableError
from ..core.seccomp import ResolvedProfile, Rule
from . import libc

LIBRARY = "libseccomp.so.2"
DEBIAN_PACKAGE = "libseccomp2"
BPF_INSTRUCTION_BYTES = 8  # struct sock_filter
BPF_MAXINSNS = 4096  # the kernel refuses a longer program (EINVAL)

# seccomp.h: SCMP_ACT_*
_ACT_KILL_PROCESS = 0x80000000
_ACT_KILL_THREAD = 0x00000000
_ACT_TRAP = 0x00030000
_ACT_ERRNO = 0x00050000
_ACT_TRACE = 0x7FF00000
_ACT_LOG = 0x7FFC0000
_ACT_ALLOW = 0x7FFF0000
_ACTIONS = {
    "SCMP_ACT_KILL": _ACT_KILL_THREAD,
    "SCMP_ACT_KILL_THREAD": _ACT_KILL_THREAD,
    "SCMP_ACT_KILL_PROCESS": _ACT_KILL_PROCESS,
    "SCMP_ACT_TRAP": _ACT_TRAP,
    "SCMP_ACT_ERRNO": _ACT_ERRNO,
    "SCMP_ACT_TRACE": _ACT_TRACE,
    "SCMP_ACT_LOG": _ACT_LOG,
    "SCMP_ACT_ALLOW": _ACT_ALLOW,
}
# enum scmp_compare
_OPS = {
    "SCMP_CMP_NE": 1,
    "SCMP_CMP_LT": 2,
    "SCMP_CMP_LE": 3,
    "SCMP_CMP_EQ": 4,
    "SCMP_CMP_GE": 5,
    "SCMP_CMP_GT": 6,
    "SCMP_CMP_MASKED_EQ": 7,
}
_NR_SCMP_ERROR = -1
_FLTATR_CTL_NNP = 3  # enum scmp_filter_attr
_FLTATR_CTL_OPTIMIZE = 8
_OPTIMIZE_BINARY_TREE = 2  # a balanced tree of syscall numbers, not a linear list (libseccomp >= 2.5)

SECCOMP_MODE_FILTER = 2  # prctl(PR_SET_SECCOMP, ...)

# Classic BPF over struct seccomp_data (linux/seccomp.h: nr at 0, arch at 4, args[] from 16).
_BPF_LD_W_ABS = 0x20
_BPF_JEQ_K = 0x15
_BPF_RET_K = 0x06
_DATA_NR, _DATA_ARCH, _DATA_ARG0 = 0, 4, 16
_AUDIT_ARCH_I386 = 0x40000003
_I386_NR_SOCKETCALL = 102
_SECCOMP_RET_ERRNO = 0x00050000


class _ArgCmp(ctypes.Structure):
    """struct scmp_arg_cmp"""

    _fields_ = [
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    ]


class _SockFprog(ctypes.Structure):
    """struct sock_fprog (linux/filter.h)"""

    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


# -- compiling (pytest) ------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _library() -> ctypes.CDLL:
    try:
        lib = ctypes.CDLL(LIBRARY, use_errno=True)
    except OSError as e:
        raise SeccompUnavailableError(
            f"seccomp: cannot load {LIBRARY} ({e}); pytest_sandbox compiles seccomp profiles with it",
            hint=f"install Debian's {DEBIAN_PACKAGE} (apt-get install {DEBIAN_PACKAGE}), or run "
            "containers without a filter: seccomp='unconfined' (ini sandbox_seccomp = unconfined)",
        ) from None
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_release.restype = None
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    lib.seccomp_arch_resolve_name.restype = ctypes.c_uint32
    lib.seccomp_arch_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_arch_add.argtypes = [ctypes.c_void_p, ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_array.argtypes = [
        ctypes.c_void_p,
        ctypes.c_uint32,
        ctypes.c_int,
        ctypes.c_uint,
        ctypes.POINTER(_ArgCmp),
    ]
    lib.seccomp_attr_set.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32]
    lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
    return lib


def available() -> bool:
    """Whether libseccomp can be loaded (compiling needs it; installing does not)."""
    try:
        _library()
    except SeccompUnavailableError:
        return False
    return True


def _action_value(action: str, errno_ret: int | None) -> int:
    value = _ACTIONS[action]
    if value in (_ACT_ERRNO, _ACT_TRACE):
        # runc: SCMP_ACT_ERRNO / SCMP_ACT_TRACE without errnoRet return EPERM
        value |= (errno.EPERM if errno_ret is None else errno_ret) & 0xFFFF
    return value


@functools.lru_cache(maxsize=16)
def compile_profile(profile: ResolvedProfile) -> bytes:
    """The BPF program of ``profile`` (struct sock_filter[]), compiled once per distinct profile."""
    lib = _library()
    default = _action_value(profile.default_action, profile.default_errno)
    ctx = lib.seccomp_init(default)
    if not ctx:
        raise InvalidSpecError(f"seccomp: libseccomp refused the default action {profile.default_action}")
    try:
        # The launcher sets no_new_privs itself, right before installing (become()).
        lib.seccomp_attr_set(ctx, _FLTATR_CTL_NNP, 0)
        lib.seccomp_attr_set(ctx, _FLTATR_CTL_OPTIMIZE, _OPTIMIZE_BINARY_TREE)  # old libseccomp: ignored
        for arch in profile.architectures:
            _add_arch(lib, ctx, arch)
        for rule in profile.rules:
            action = _action_value(rule.action, rule.errno_ret)
            if action != default:  # libseccomp refuses a rule that repeats the default (runc skips it)
                _add_rule(lib, ctx, rule, action)
        program = _i386_socketcall_guard(profile.i386_socketcall_refusals) + _export(lib, ctx)
    finally:
        lib.seccomp_release(ctx)
    if len(program) // BPF_INSTRUCTION_BYTES > BPF_MAXINSNS:
        raise InvalidSpecError(
            f"seccomp: the profile compiles to {len(program) // BPF_INSTRUCTION_BYTES} BPF instructions; "
            f"the kernel takes at most {BPF_MAXINSNS}"
        )
    return program


def _add_arch(lib: ctypes.CDLL, ctx: int, arch: str) -> None:
    token = lib.seccomp_arch_resolve_name(arch.removeprefix("SCMP_ARCH_").lower().encode())
    if token == 0:
        return  # unknown to this libseccomp: its syscalls then meet the bad-arch action (killed)
    rc = lib.seccomp_arch_add(ctx, token)
    if rc < 0 and rc != -errno.EEXIST:  # the native one is there from seccomp_init
        raise InvalidSpecError(f"seccomp: architectures: libseccomp refused {arch}: {os.strerror(-rc)}")


def _add_rule(lib: ctypes.CDLL, ctx: int, rule: Rule, action: int) -> None:
    for name in rule.names:
        nr = lib.seccomp_syscall_resolve_name(name.encode())
        if nr == _NR_SCMP_ERROR:
            continue  # unknown to libseccomp (as runc: a newer profile on an older library)
        for conditions in _condition_sets(rule):
            rc = lib.seccomp_rule_add_array(ctx, action, nr, len(conditions), conditions)
            if rc < 0:
                raise InvalidSpecError(
                    f"seccomp: syscalls: libseccomp refused the rule {rule.action} for {name!r}: "
                    f"{os.strerror(-rc)}"
                )


def _condition_sets(rule: Rule) -> Iterator[ctypes.Array[_ArgCmp]]:
    """The argument conditions, as rules: one rule with all of them (AND), except that several
    conditions on one argument become one rule each (OR) -- libseccomp cannot AND those; runc does
    the same."""
    conditions = [_ArgCmp(a.index, _OPS[a.op], a.value, a.value_two) for a in rule.args]
    indexes = [a.index for a in rule.args]
    if len(set(indexes)) < len(indexes):
        for c in conditions:
            yield (_ArgCmp * 1)(c)
    else:
        yield (_ArgCmp * len(conditions))(*conditions)


def _bpf(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
    return struct.pack("=HBBI", code, jt, jf, k)  # struct sock_filter


def _i386_socketcall_guard(refusals: tuple[tuple[int, int], ...]) -> bytes:
    """BPF run before libseccomp's program: an i386 socketcall whose op (args[0]) is refused returns
    its errno; anything else falls through (core.seccomp.I386_SOCKETCALL_REFUSALS says why).

    Not a libseccomp rule: on i386 libseccomp turns every ``socket`` rule of the profile into an
    unconditional socketcall(SYS_SOCKET) rule, and the less specific rule wins (a conditional one
    for the same op is dropped or refused with EEXIST).  BPF jumps are relative and forward only,
    so libseccomp's program runs unchanged after this prefix.  Only the low 32 bits of args[0] are
    compared, as the kernel reads an i386 argument (a 64-bit caller of int $0x80 may leave the
    high half of rbx set).
    """
    if not refusals:
        return b""
    ops = b"".join(
        _bpf(_BPF_JEQ_K, op, jf=1) + _bpf(_BPF_RET_K, _SECCOMP_RET_ERRNO | (err & 0xFFFF))
        for op, err in refusals
    )
    length = 5 + len(ops) // BPF_INSTRUCTION_BYTES  # the prefix; the jumps below land just past it
    return (
        _bpf(_BPF_LD_W_ABS, _DATA_ARCH)
        + _bpf(_BPF_JEQ_K, _AUDIT_ARCH_I386, jf=length - 2)
        + _bpf(_BPF_LD_W_ABS, _DATA_NR)
        + _bpf(_BPF_JEQ_K, _I386_NR_SOCKETCALL, jf=length - 4)
        + _bpf(_BPF_LD_W_ABS, _DATA_ARG0)  # little-endian: the low half of args[0]
        + ops
    )


def _export(lib: ctypes.CDLL, ctx: int) -> bytes:
    fd = os.memfd_create("psbx-seccomp", os.MFD_CLOEXEC)
    try:
        rc = lib.seccomp_export_bpf(ctx, fd)
        if rc < 0:
            raise InvalidSpecError(f"seccomp: libseccomp could not compile the profile: {os.strerror(-rc)}")
        os.lseek(fd, 0, os.SEEK_SET)
        return b"".join(iter(lambda: os.read(fd, 1 << 16), b""))
    finally:
        os.close(fd)


# -- installing (the launcher, in the container's process) -------------------------------------


def install(program: bytes) -> None:
    """Install ``program`` on this process (inherited by every child and kept across execve).

    Needs no_new_privs first (seccomp(2): else CAP_SYS_ADMIN in the user namespace is required).
    """
    if not program or len(program) % BPF_INSTRUCTION_BYTES:
        raise InvalidSpecError(f"seccomp: a BPF program of {len(program)} bytes is not whole instructions")
    buf = ctypes.create_string_buffer(program, len(program))
    prog = _SockFprog(len(program) // BPF_INSTRUCTION_BYTES, ctypes.addressof(buf))
    libc.prctl(libc.PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(prog))
