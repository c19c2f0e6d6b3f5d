"""Per-user kernel limits: a container spends its own host uid's budget, never host root's (issue 9, item 3).

The kernel charges inotify instances, queued signals, message-queue bytes and namespaces to the
uid owning each user namespace in its parent (kernel/ucount.c).  Each container's namespace is
created by a host uid of its own (launcher/userns), so exhausting them inside a container leaves
host root and every neighbour container untouched.  Probes are python3 (host base) through ctypes,
so they report the kernel's exact counts and errnos.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import resource
import signal
import struct
import subprocess
import sys
from collections.abc import Iterator

import pytest

from pytest_sandbox import Sandbox
from pytest_sandbox.core.naming import OWNER_UID_BASE, OWNER_UID_COUNT, namespace_owner_uid
from pytest_sandbox.launcher.userns import MSGQUEUE, host_limits

NS_GET_OWNER_UID = 0xB704  # _IO(0xb7, 0x4), ioctl_ns(2)
_libc = ctypes.CDLL(None, use_errno=True)

# Exhausts inotify instances and message-queue bytes, then queues SIGRTMIN to itself (blocked)
# until the kernel refuses; prints each count and errno, and keeps everything until killed.
EXHAUST = r"""
import ctypes, os, signal, time
libc = ctypes.CDLL(None, use_errno=True)
class sigval(ctypes.Union):
    _fields_ = [("i", ctypes.c_int), ("p", ctypes.c_void_p)]
n = 0
while libc.inotify_init1(0) >= 0:
    n += 1
print("inotify", n, ctypes.get_errno(), flush=True)
m = 0
while libc.mq_open(b"/q%d" % m, os.O_CREAT | os.O_RDWR, 0o600, None) >= 0:
    m += 1
print("mqueue", m, ctypes.get_errno(), flush=True)
signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGRTMIN])
q = 0
while libc.sigqueue(os.getpid(), signal.SIGRTMIN, sigval(0)) == 0:
    q += 1
print("sigqueue", q, ctypes.get_errno(), flush=True)
time.sleep(1000)
"""

# One inotify instance, one queued signal and one message queue, each reported as its errno (0: it worked).
ONE_EACH = r"""
import ctypes, os, signal
libc = ctypes.CDLL(None, use_errno=True)
class sigval(ctypes.Union):
    _fields_ = [("i", ctypes.c_int), ("p", ctypes.c_void_p)]
fd = libc.inotify_init1(0)
a = 0 if fd >= 0 else ctypes.get_errno()
signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGRTMIN])
b = 0 if libc.sigqueue(os.getpid(), signal.SIGRTMIN, sigval(0)) == 0 else ctypes.get_errno()
c = 0 if libc.mq_open(b"/one", os.O_CREAT | os.O_RDWR, 0o600, None) >= 0 else ctypes.get_errno()
print(a, b, c)
"""


class _Sigval(ctypes.Union):
    _fields_ = [("i", ctypes.c_int), ("p", ctypes.c_void_p)]


def _owner_uid(pid: int) -> int:
    """The host uid owning the user namespace of ``pid`` (ioctl NS_GET_OWNER_UID)."""
    fd = os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    try:
        buf = bytearray(4)
        fcntl.ioctl(fd, NS_GET_OWNER_UID, buf)
        return int(struct.unpack("I", buf)[0])
    finally:
        os.close(fd)


def _status_ids(pid: int, field: str) -> list[int]:
    with open(f"/proc/{pid}/status") as f:
        line = next(x for x in f if x.startswith(field + ":"))
    return [int(x) for x in line.split()[1:]]


def _limits(pid: int) -> dict[str, int]:
    """Soft values of /proc/<pid>/limits by name ("Max pending signals" ...)."""
    with open(f"/proc/{pid}/limits") as f:
        rows = f.read().splitlines()[1:]
    return {r[:26].strip(): int(r[26:47].split()[0]) for r in rows if r[26:47].split()[0].isdigit()}


@pytest.fixture
def blocked_host_child() -> Iterator[subprocess.Popen[bytes]]:
    """A host root process with SIGRTMIN blocked, so signals queued to it stay pending."""
    code = (
        "import signal, sys; signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGRTMIN]); "
        "print(1, flush=True); sys.stdin.read()"
    )
    with subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    ) as child:
        assert child.stdout is not None
        assert child.stdout.readline() == b"1\n"
        yield child
        child.kill()


def _host_root_can_inotify_sigqueue_and_mq_open(child: subprocess.Popen[bytes]) -> None:
    fd = _libc.inotify_init1(os.O_CLOEXEC)
    assert fd >= 0, f"host root's inotify_init1: {os.strerror(ctypes.get_errno())}"
    os.close(fd)
    ret = _libc.sigqueue(child.pid, signal.SIGRTMIN, _Sigval(0))
    assert ret == 0, f"host root's sigqueue: {os.strerror(ctypes.get_errno())}"
    name = f"/psbx-test-{os.getpid()}".encode()  # in the host's IPC namespace: unlinked at once
    mq = _libc.mq_open(name, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC, 0o600, None)
    assert mq >= 0, f"host root's mq_open: {os.strerror(ctypes.get_errno())}"
    _libc.mq_unlink(name)
    os.close(mq)


def test_user_namespace_owned_by_a_host_uid_of_its_own(sandbox: Sandbox) -> None:
    """Each container's user namespace is owned by OWNER_UID_BASE + its init's host pid, not root.

    Two live containers: distinct owners in the reserved range; the command runs as the mapped
    container root (uid_base) on the host; init and an exec'd process share the one namespace.
    """
    containers = [sandbox.start(["sleep", "100"]) for _ in range(2)]
    owners = [_owner_uid(c.init_pid) for c in containers]
    assert owners == [namespace_owner_uid(c.init_pid) for c in containers]
    assert len(set(owners)) == 2
    assert all(OWNER_UID_BASE < o < OWNER_UID_BASE + OWNER_UID_COUNT for o in owners)
    c = containers[0]
    with open(f"/proc/{c.pid}/uid_map") as f:
        base = int(f.read().split()[1])
    assert _status_ids(c.pid, "Uid") == [base] * 4
    assert _status_ids(c.pid, "Gid") == [base] * 4
    r = c.exec(["readlink", "/proc/self/ns/user"])
    assert r.stdout.decode().strip() == os.readlink(f"/proc/{c.init_pid}/ns/user")
    assert os.readlink(f"/proc/{c.pid}/ns/user") == os.readlink(f"/proc/{c.init_pid}/ns/user")


def test_container_starts_with_container_rlimits_and_user_limits(sandbox: Sandbox) -> None:
    """rlimits SIGPENDING/MSGQUEUE/NOFILE are the container defaults in run() and exec(), and
    /proc/sys/user inside shows the host's per-user values (INT_MAX in a bare new namespace)."""
    want = dict(host_limits().rlimits)
    c = sandbox.start(["sleep", "100"])
    limits = _limits(c.pid)
    assert limits["Max pending signals"] == want[resource.RLIMIT_SIGPENDING]
    assert limits["Max msgqueue size"] == MSGQUEUE == want[resource.RLIMIT_MSGQUEUE]
    assert limits["Max open files"] == want[resource.RLIMIT_NOFILE]
    r = c.exec(["sh", "-c", "ulimit -n; cat /proc/self/limits | grep -E 'pending|msgqueue'"])
    lines = r.stdout.decode().splitlines()
    assert int(lines[0]) == want[resource.RLIMIT_NOFILE]
    assert f" {want[resource.RLIMIT_SIGPENDING]} " in lines[1]
    assert f" {MSGQUEUE} " in lines[2]
    with open("/proc/sys/user/max_inotify_instances") as f:
        host_value = f.read().strip()
    r = c.exec(["cat", "/proc/sys/user/max_inotify_instances", "/proc/sys/user/max_user_namespaces"])
    assert r.stdout.decode().split() == [host_value, "0"]  # 0: nested user namespaces forbidden


def test_container_cannot_exhaust_host_roots_inotify_and_signals(
    sandbox: Sandbox, blocked_host_child: subprocess.Popen[bytes]
) -> None:
    """Issue 9 item 3: a container with memory="64m", pids=4 takes every inotify instance and
    message-queue byte and queues signals until EAGAIN; host root and a neighbour can still do all.

    Before, the namespace belonged to host root and the container took root's 128 instances and
    96,361 of its pending signals.  The counts asserted are the kernel's own limits: the host's
    per-user inotify limit and the container's RLIMIT_SIGPENDING.
    """
    hog = sandbox.start(["python3", "-c", EXHAUST], memory="64m", pids=4)
    hog.wait_for_log(b"sigqueue", timeout=120)
    words = hog.logs("stdout").decode().split()
    inotify_count, inotify_errno, mq_count, mq_errno, signal_count, signal_errno = (
        int(words[i]) for i in (1, 2, 4, 5, 7, 8)
    )
    with open("/proc/sys/fs/inotify/max_user_instances") as f:
        assert inotify_count == int(f.read())
    assert inotify_errno == errno.EMFILE
    # A queue charges its 10 messages of 8192 bytes (the IPC namespace's defaults) plus the
    # kernel's bookkeeping for them (mq_treesize, ipc/mqueue.c): RLIMIT_MSGQUEUE holds 9.
    queue_bytes = 10 * 8192
    assert MSGQUEUE // (queue_bytes * 1.1) <= mq_count < MSGQUEUE // queue_bytes
    assert mq_errno == errno.EMFILE
    assert signal_count == dict(host_limits().rlimits)[resource.RLIMIT_SIGPENDING]
    assert signal_errno == errno.EAGAIN
    _host_root_can_inotify_sigqueue_and_mq_open(blocked_host_child)
    neighbour = sandbox.run(["python3", "-c", ONE_EACH])
    assert neighbour.stdout == b"0 0 0\n"
    # An exec'd process is container root in the hog's namespace: the same counters, spent.
    inside = hog.exec(["python3", "-c", ONE_EACH])
    assert inside.stdout == f"{errno.EMFILE} {errno.EAGAIN} {errno.EMFILE}\n".encode()
