"""Thin ctypes wrappers for the Linux syscalls Python 3.10/3.11 does not expose (stdlib only).

``os.unshare``/``os.setns`` arrive only in 3.12, and the new mount API (open_tree, mount_setattr,
move_mount), pivot_root, close_range, capset, sethostname and keyctl never reached ``os`` at all
(pidfd_open and pidfd_send_signal did, and are used from there).  Every wrapper
raises :class:`~pytest_sandbox.core.errors.SetupError` naming the call and the path, so a failure inside
a container's setup reads "mount(/proc): Operation not permitted", not "OSError 1".

Syscall numbers of the calls added since Linux 5.2 are the same on every architecture we support
(the unified table starting at 424); the older ones differ and are looked up per machine.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import platform
import socket
import stat
import struct
from collections.abc import Iterator
from typing import Any

from ..core.errors import SetupError

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long

# clone(2) / unshare(2) flags
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

# mount(2) flags
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MNT_DETACH = 0x2

# open_tree(2) / mount_setattr(2) / move_mount(2)
OPEN_TREE_CLONE = 0x1
OPEN_TREE_CLOEXEC = os.O_CLOEXEC
AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
AT_RECURSIVE = 0x8000
AT_SYMLINK_NOFOLLOW = 0x100
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NODEV = 0x4
MOUNT_ATTR_IDMAP = 0x00100000
MOVE_MOUNT_F_EMPTY_PATH = 0x4


# prctl(2)
PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_NAME = 15
PR_SET_SECCOMP = 22
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4

KEYCTL_JOIN_SESSION_KEYRING = 1

_NR_COMMON = {
    "open_tree": 428,
    "move_mount": 429,
    "close_range": 436,
    "mount_setattr": 442,
    "openat2": 437,
}
_NR_ARCH = {
    "x86_64": {"pivot_root": 155, "keyctl": 250, "capset": 126},
    "aarch64": {"pivot_root": 41, "keyctl": 219, "capset": 91},
}


def _nr(name: str) -> int:
    if name in _NR_COMMON:
        return _NR_COMMON[name]
    machine = platform.machine()
    try:
        return _NR_ARCH[machine][name]
    except KeyError:
        raise SetupError(
            f"{name}: syscall number unknown on {machine}",
            call=name,
            hint="pytest_sandbox supports x86_64 and aarch64",
        ) from None


def _fail(call: str, path: str = "", err: int | None = None) -> SetupError:
    code = ctypes.get_errno() if err is None else err
    where = f"({path})" if path else ""
    return SetupError(f"{call}{where}: {os.strerror(code)}", call=call, path=path, errno=code)


def _check(ret: int, call: str, path: str = "") -> int:
    if ret < 0:
        raise _fail(call, path)
    return ret


def _b(path: str | None) -> bytes | None:
    return None if path is None else os.fsencode(path)


def syscall(name: str, *args: Any, path: str = "") -> int:
    return _check(_libc.syscall(_nr(name), *args), name, path)


def unshare(flags: int) -> None:
    _check(_libc.unshare(ctypes.c_int(flags)), "unshare")


def setns(fd: int, nstype: int = 0) -> None:
    _check(_libc.setns(ctypes.c_int(fd), ctypes.c_int(nstype)), "setns")


def mount(
    source: str | None, target: str, fstype: str | None, flags: int = 0, data: str | None = None
) -> None:
    ret = _libc.mount(_b(source), _b(target), _b(fstype), ctypes.c_ulong(flags), _b(data))
    _check(ret, f"mount[{fstype or ('bind' if flags & MS_BIND else 'flags')}]", target)


def umount2(target: str, flags: int = 0) -> None:
    _check(_libc.umount2(_b(target), ctypes.c_int(flags)), "umount2", target)


def pivot_root(new_root: str, put_old: str) -> None:
    syscall("pivot_root", _b(new_root), _b(put_old), path=new_root)


def sethostname(name: str) -> None:
    raw = name.encode()
    _check(_libc.sethostname(raw, ctypes.c_size_t(len(raw))), "sethostname", name)


# netdevice(7)
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1


def loopback_up() -> None:
    """Bring up ``lo`` of the current network namespace (a new one starts with it down)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            ifreq = bytearray(40)  # struct ifreq: the name, then a union whose first member is the flags
            struct.pack_into("16sh", ifreq, 0, b"lo", 0)
            fcntl.ioctl(s.fileno(), SIOCGIFFLAGS, ifreq)
            flags = struct.unpack_from("16sh", ifreq)[1]
            struct.pack_into("16sh", ifreq, 0, b"lo", flags | IFF_UP)
            fcntl.ioctl(s.fileno(), SIOCSIFFLAGS, ifreq)
    except OSError as e:
        raise _fail("ioctl(SIOCSIFFLAGS)", "lo", e.errno or 0) from None


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    return _check(
        _libc.prctl(
            ctypes.c_int(option),
            ctypes.c_ulong(arg2),
            ctypes.c_ulong(arg3),
            ctypes.c_ulong(arg4),
            ctypes.c_ulong(arg5),
        ),
        f"prctl({_PRCTL_NAMES.get(option, option)})",
    )


_PRCTL_NAMES = {
    PR_SET_PDEATHSIG: "PR_SET_PDEATHSIG",
    PR_SET_DUMPABLE: "PR_SET_DUMPABLE",
    PR_CAPBSET_DROP: "PR_CAPBSET_DROP",
    PR_SET_NO_NEW_PRIVS: "PR_SET_NO_NEW_PRIVS",
    PR_SET_SECCOMP: "PR_SET_SECCOMP",
    PR_CAP_AMBIENT: "PR_CAP_AMBIENT",
}


@contextlib.contextmanager
def named(call: str, path: str = "") -> Iterator[None]:
    """Turn an OSError of a plain ``os.*`` call into a SetupError naming ``call`` and the path."""
    try:
        yield
    except SetupError:
        raise
    except OSError as e:
        raise _fail(call, path or str(e.filename or ""), e.errno or 0) from None


def set_process_name(name: str) -> None:
    """The ``comm`` shown by ps/top (15 bytes); best effort."""
    buf = ctypes.create_string_buffer(name.encode()[:15])
    _libc.prctl(ctypes.c_int(PR_SET_NAME), buf, 0, 0, 0)


def open_tree(path: str, flags: int, dirfd: int = AT_FDCWD) -> int:
    return syscall("open_tree", ctypes.c_int(dirfd), _b(path), ctypes.c_uint(flags), path=path)


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def mount_setattr(
    fd: int,
    attr_set: int,
    *,
    path: str = "",
    flags: int = AT_EMPTY_PATH,
    userns_fd: int = 0,
    attr_clr: int = 0,
    propagation: int = 0,
    what: str = "",
) -> None:
    attr = _MountAttr(attr_set=attr_set, attr_clr=attr_clr, propagation=propagation, userns_fd=userns_fd)
    syscall(
        "mount_setattr",
        ctypes.c_int(fd),
        _b(path or ""),
        ctypes.c_uint(flags),
        ctypes.byref(attr),
        ctypes.c_size_t(ctypes.sizeof(attr)),
        path=what or path,
    )


def move_mount_fd(fd: int, target: str, *, what: str = "") -> None:
    """Attach the detached mount ``fd`` (from open_tree(OPEN_TREE_CLONE)) at ``target``."""
    syscall(
        "move_mount",
        ctypes.c_int(fd),
        b"",
        ctypes.c_int(AT_FDCWD),
        _b(target),
        ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH),
        path=what or target,
    )


# openat2(2)
RESOLVE_NO_SYMLINKS = 0x04


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def open_no_symlinks(path: str) -> int:
    """An ``O_PATH`` fd of absolute ``path``, reached without following a symlink in any component.

    ``openat2(RESOLVE_NO_SYMLINKS)`` (Linux >= 5.6) fails with ELOOP at the first symlink, magic
    links included (a trailing one, which it returns as itself, is refused here too), so the
    object opened is the one the path names now, with nothing redirected; on an older kernel the
    same walk is made one component at a time with ``O_NOFOLLOW``.
    """
    flags = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
    how = _OpenHow(flags=flags, mode=0, resolve=RESOLVE_NO_SYMLINKS)
    ret = _libc.syscall(
        _nr("openat2"), ctypes.c_int(AT_FDCWD), _b(path), ctypes.byref(how), ctypes.sizeof(how)
    )
    if ret < 0:
        err = ctypes.get_errno()
        if err not in (errno.ENOSYS, errno.EPERM):  # EPERM: a seccomp filter that does not know it
            raise _fail("openat2", path, err)
        return _walk_no_symlinks(path, flags)
    try:
        if stat.S_ISLNK(os.fstat(ret).st_mode):  # a trailing symlink comes back as itself (O_NOFOLLOW)
            raise _fail("openat2", path, errno.ELOOP)
    except BaseException:
        os.close(ret)
        raise
    return int(ret)


def _walk_no_symlinks(path: str, flags: int) -> int:
    fd = os.open("/", flags)
    try:
        for part in [p for p in path.split("/") if p]:
            if part == "..":
                raise _fail("openat", path, errno.EXDEV)  # as openat2 with RESOLVE_BENEATH would say
            with named("openat", path):
                child = os.open(part, flags, dir_fd=fd)
            os.close(fd)
            fd = child
            if stat.S_ISLNK(os.fstat(fd).st_mode):  # O_PATH|O_NOFOLLOW opens the link itself
                raise _fail("openat", path, errno.ELOOP)
    except BaseException:
        os.close(fd)
        raise
    return fd


def close_range(first: int, last: int = 0xFFFFFFFF, flags: int = 0) -> None:
    syscall("close_range", ctypes.c_uint(first), ctypes.c_uint(last), ctypes.c_uint(flags))


def close_fds_except(keep: set[int]) -> None:
    """Close every fd >= 3 except ``keep`` (a few close_range calls, not one close per fd)."""
    start = 3
    for fd in sorted(k for k in keep if k >= 3):
        if fd > start:
            close_range(start, fd - 1)
        start = fd + 1
    close_range(start)


def join_new_session_keyring() -> None:
    """A fresh anonymous session keyring: the container must not inherit the invoker's keys."""
    syscall("keyctl", ctypes.c_int(KEYCTL_JOIN_SESSION_KEYRING), None)


# capabilities(7)
_LINUX_CAPABILITY_VERSION_3 = 0x20080522


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


def capset(effective: int, permitted: int, inheritable: int = 0) -> None:
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    for i in range(2):
        data[i].effective = (effective >> (32 * i)) & 0xFFFFFFFF
        data[i].permitted = (permitted >> (32 * i)) & 0xFFFFFFFF
        data[i].inheritable = (inheritable >> (32 * i)) & 0xFFFFFFFF
    syscall("capset", ctypes.byref(header), data)


def cap_last_cap() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except OSError:
        return 40
