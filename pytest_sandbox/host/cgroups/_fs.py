"""Low-level cgroupfs helpers shared by the backends (stdlib only: runs inside the launcher).

Every helper here works on raw file descriptors (``os.open`` / ``os.read`` / ``os.write``) rather
than ``open()``: cgroupfs files are tiny and the builtin file object costs an extra ``fstat`` and
``ioctl`` per open, which matters on the container start path.  Every ``OSError`` raised names the
path it was about.

The kill machinery (:func:`signal_procs`, :func:`wait_empty`) and the subtree walk
(:func:`subtree`, :func:`remove_tree`) are shared by v1 and v2: both must cope with sub-cgroups the
container created itself, including ones it ``chmod 000``'d (BenchExec issue #840).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import signal
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from functools import partial
from typing import TypeVar

from ...core.naming import PROJECT_CGROUP

T = TypeVar("T")

# Every path this package writes to, creates or removes must contain this segment: a cheap guard
# against ever writing into a cgroup we did not create (the host supervisor lives in one).
_OURS = f"/{PROJECT_CGROUP}/"

# How often a racing session may remove the project parent between our mkdirs before we give up.
_MKDIR_ATTEMPTS = 8


def mkdir_leaf(path: str, make_parents: Callable[[], None]) -> str:
    """mkdir ``path``; when its parents are missing, ``make_parents()`` and try again.

    Another session may rmdir the (empty) project parent between any two of our mkdirs or writes
    (it sees no owner group of ours yet): start over, a bounded number of times.
    """
    for _ in range(_MKDIR_ATTEMPTS):
        try:
            mkdir(path)
            return path
        except FileNotFoundError:
            pass
        with contextlib.suppress(FileNotFoundError):
            make_parents()
    raise OSError(errno.ENOENT, "the cgroup's parent kept disappearing while creating it", path)


# cgroup v1 controller names as they appear in the super options of a ``cgroup`` mount.
V1_CONTROLLERS = frozenset(
    {
        "cpuset",
        "cpu",
        "cpuacct",
        "blkio",
        "io",
        "memory",
        "devices",
        "freezer",
        "net_cls",
        "perf_event",
        "net_prio",
        "hugetlb",
        "pids",
        "rdma",
        "misc",
        "debug",
    }
)

_ESCAPE_RE = re.compile(r"\\([0-7]{3})")


# --------------------------------------------------------------------------------------------------
# mountinfo (pure)


@dataclass(frozen=True)
class Mount:
    """One line of /proc/self/mountinfo (only the fields the backends need)."""

    mountpoint: str
    fs_root: str
    fstype: str
    options: frozenset[str]
    super_options: frozenset[str]

    @property
    def readonly(self) -> bool:
        return "ro" in self.options or "ro" in self.super_options

    @property
    def controllers(self) -> frozenset[str]:
        """v1 controllers bound to this hierarchy (empty for cgroup2 and named hierarchies)."""
        if self.fstype != "cgroup":
            return frozenset()
        return self.super_options & V1_CONTROLLERS


def unescape_mount_field(text: str) -> str:
    r"""Undo the kernel's octal escapes in mountinfo paths (``\040`` is a space)."""
    return _ESCAPE_RE.sub(lambda m: chr(int(m.group(1), 8)), text)


def parse_mountinfo(text: str) -> list[Mount]:
    """Parse /proc/self/mountinfo (see proc(5)); later mounts on the same point hide earlier ones."""
    by_point: dict[str, Mount] = {}
    for line in text.splitlines():
        fields = line.split()
        try:
            sep = fields.index("-", 6)
        except ValueError:
            continue  # malformed line: ignore rather than guess
        if len(fields) < sep + 3:
            continue
        mount = Mount(
            mountpoint=unescape_mount_field(fields[4]),
            fs_root=unescape_mount_field(fields[3]),
            fstype=fields[sep + 1],
            options=frozenset(fields[5].split(",")),
            super_options=frozenset(fields[sep + 3].split(",")) if len(fields) > sep + 3 else frozenset(),
        )
        by_point.pop(mount.mountpoint, None)  # keep insertion order = mount order
        by_point[mount.mountpoint] = mount
    return list(by_point.values())


def read_mountinfo(path: str = "/proc/self/mountinfo") -> list[Mount]:
    return parse_mountinfo(read_text(path))


def is_under(path: str, root: str) -> bool:
    """True if ``path`` is ``root`` or below it (both normalised absolute paths)."""
    return path == root or path.startswith(root.rstrip("/") + "/")


def mount_containing(mounts: Iterable[Mount], path: str) -> Mount | None:
    """The mount whose mount point is the longest prefix of ``path``."""
    best: Mount | None = None
    for m in mounts:
        if is_under(path, m.mountpoint) and (best is None or len(m.mountpoint) > len(best.mountpoint)):
            best = m
    return best


# --------------------------------------------------------------------------------------------------
# small pure parsers


def parse_kv(text: str) -> dict[str, int]:
    """``key value`` lines (memory.events, cpu.stat, pids.events, memory.oom_control) to a dict."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2:
            try:
                out[parts[0]] = int(parts[1])
            except ValueError:
                continue
    return out


def parse_procs(text: str) -> set[int]:
    return {int(tok) for tok in text.split()}


def swap_active(text: str) -> bool:
    """True if /proc/swaps (its text) lists at least one active swap area."""
    return any(line.strip() for line in text.splitlines()[1:])


def host_swap_active(path: str = "/proc/swaps") -> bool:
    try:
        return swap_active(read_text(path))
    except FileNotFoundError:
        return False  # kernel without CONFIG_SWAP: no swap can exist


# --------------------------------------------------------------------------------------------------
# file I/O (every error names the path)


def _guard(path: str) -> None:
    if _OURS not in path + "/":
        # A programming error, never a runtime condition: refuse rather than touch a foreign cgroup.
        raise PermissionError(errno.EPERM, f"refusing to modify a cgroup outside {_OURS!r}", path)


def read_text(path: str) -> str:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while True:
            try:
                chunk = os.read(fd, 65536)
            except OSError as e:
                raise OSError(e.errno, f"read failed: {e.strerror}", path) from None
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks).decode()
    finally:
        os.close(fd)


def read_optional(path: str) -> str | None:
    """The file's text, or None if it does not exist (a controller file this kernel lacks)."""
    try:
        return read_text(path)
    except FileNotFoundError:
        return None


def write(path: str, value: str) -> None:
    """Write ``value`` to a cgroup control file in one ``write(2)`` (the kernel parses per write)."""
    _guard(path)
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    except OSError as e:
        raise OSError(e.errno, f"cannot write {value!r}: {e.strerror}", path) from None
    finally:
        os.close(fd)


def mkdir(path: str) -> None:
    _guard(path)
    os.mkdir(path, 0o755)


def mkdir_exist_ok(path: str) -> None:
    with contextlib.suppress(FileExistsError):
        mkdir(path)


def rmdir_after_error(path: str) -> None:
    """Undo a mkdir while another error propagates: no task joined yet; never mask that error."""
    with contextlib.suppress(OSError):
        _guard(path)
        os.rmdir(path)


def with_chmod_retry(fn: Callable[[], T], path: str, mode: int) -> T:
    """Run ``fn``; on EACCES ``chmod`` ``path`` back to ``mode`` once and retry.

    A container may ``chmod 000`` the sub-cgroups it created (BenchExec #840) to make them
    unremovable.  They live inside our leaf, so taking them back is ours to do.  As root,
    CAP_DAC_OVERRIDE makes this moot; it matters for delegated (non-root) hierarchies.
    """
    try:
        return fn()
    except PermissionError:
        _guard(path)
        os.chmod(path, mode)
        return fn()


# --------------------------------------------------------------------------------------------------
# subtrees


def subtree(top: str) -> list[str]:
    """``top`` and every cgroup directory below it, parents before children; [] if ``top`` is gone."""
    out: list[str] = []
    stack = [top]
    while stack:
        d = stack.pop()
        try:
            children = with_chmod_retry(partial(_child_dirs, d), d, 0o755)
        except FileNotFoundError:
            continue  # removed under us (a racing remove, or the container's own rmdir)
        out.append(d)
        stack.extend(children)
    return out


def _child_dirs(path: str) -> list[str]:
    with os.scandir(path) as it:
        return [e.path for e in it if e.is_dir(follow_symlinks=False)]


def procs_of(dirs: Iterable[str]) -> set[int]:
    """Every pid listed in ``cgroup.procs`` of ``dirs`` (missing directories count as empty)."""
    pids: set[int] = set()
    for d in dirs:
        path = d + "/cgroup.procs"
        try:
            pids |= parse_procs(with_chmod_retry(partial(read_text, path), path, 0o644))
        except FileNotFoundError:
            continue
    return pids


def signal_procs(pids: Collection[int], dirs: list[str], sig: int = signal.SIGKILL) -> None:
    """Send ``sig`` to each pid that is still in ``dirs``, without ever hitting a recycled pid.

    A pid read from ``cgroup.procs`` may exit and be reused by an unrelated process before we
    signal it (pid_max is 32768 here).  So: open a pidfd for each pid first (pins *that* process),
    re-read the cgroup, and signal only pidfds whose pid is still listed.  If the listed pid is a
    new process, our pidfd is stale and the signal fails harmlessly with ESRCH.  Batches keep the
    number of open pidfds far below RLIMIT_NOFILE whatever the container's size.
    """
    ordered = sorted(pids)
    for i in range(0, len(ordered), _PIDFD_BATCH):
        _signal_batch(ordered[i : i + _PIDFD_BATCH], dirs, sig)


_PIDFD_BATCH = 256


def _signal_batch(pids: list[int], dirs: list[str], sig: int) -> None:
    fds: dict[int, int] = {}
    try:
        for pid in pids:
            try:
                fds[pid] = os.pidfd_open(pid)
            except (ProcessLookupError, InterruptedError):
                continue  # gone already
            except OSError as e:
                if e.errno == errno.EINVAL:
                    continue  # not a thread-group leader (any more): the next round sees the new one
                raise OSError(e.errno, f"pidfd_open({pid}) failed: {e.strerror}", dirs[0]) from None
        still = procs_of(dirs)
        for pid, fd in fds.items():
            if pid in still:
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(fd, sig)
    finally:
        for fd in fds.values():
            os.close(fd)


def wait_until(done: Callable[[], bool], deadline: float) -> bool:
    """Poll ``done`` with a growing sleep (0.5 ms .. 20 ms) until it is true or ``deadline`` passes."""
    delay = 0.0005
    while True:
        if done():
            return True
        now = time.monotonic()
        if now >= deadline:
            return False
        time.sleep(min(delay, deadline - now))
        delay = min(delay * 2, 0.02)


def rmdir_tree(top: str, deadline: float) -> None:
    """Remove ``top`` and its sub-cgroups bottom-up; a cgroup dir can only go once it is empty.

    EBUSY right after a kill means a task is still exiting (``rmdir`` fails while the cgroup is
    populated, Documentation/admin-guide/cgroup-v2.rst "Removing a cgroup"): retry until
    ``deadline``.
    """
    rmdir_dirs(subtree(top), deadline)


def rmdir_dirs(dirs: list[str], deadline: float) -> None:
    """rmdir ``dirs`` (parents listed before their children) in reverse: children first."""
    for d in reversed(dirs):
        _rmdir_retry(d, deadline)


def _rmdir_retry(path: str, deadline: float) -> None:
    _guard(path)
    delay = 0.0005
    while True:
        try:
            with_chmod_retry(partial(os.rmdir, path), os.path.dirname(path), 0o755)
            return
        except FileNotFoundError:
            return
        except OSError as e:
            if e.errno != errno.EBUSY or time.monotonic() >= deadline:
                raise OSError(e.errno, f"cannot remove cgroup: {e.strerror}", path) from None
        time.sleep(delay)
        delay = min(delay * 2, 0.02)


def rmdir_quiet(path: str) -> bool:
    """rmdir a shared parent (project dir); False if another session still uses it or it is gone."""
    _guard(path)
    try:
        os.rmdir(path)
    except OSError as e:
        if e.errno in (errno.EBUSY, errno.ENOTEMPTY, errno.ENOENT, errno.EEXIST):
            return False
        raise
    return True


def list_dirs(path: str) -> list[str]:
    """Names of the sub-directories of ``path`` ([] if it does not exist)."""
    try:
        return [os.path.basename(p) for p in _child_dirs(path)]
    except FileNotFoundError:
        return []
