"""Host-side probes for the end-to-end limit, teardown, crash and xdist tests (no mocks).

Everything here looks at the kernel's own view -- ``/proc``, the cgroup filesystems, the state
directory parent -- never at pytest_sandbox's bookkeeping, so a test built on it fails when the
feature is broken rather than when the bookkeeping disagrees with itself.  Processes are named by
``(pid, start time)`` so a recycled pid never passes for a survivor (or hides one).
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from pytest_sandbox.core.naming import PREFIX, PROJECT_CGROUP, owner_tag, proc_stat, process_start_time
from tests.probes import V1_CONTROLLERS

CGROUP_ROOT = "/sys/fs/cgroup"

Proc = tuple[int, int]  # (pid, start time in clock ticks since boot)
Spawn = Callable[..., subprocess.Popen[bytes]]  # the ``spawn`` fixture (tests/kernel_fixtures.py)


# -- processes -----------------------------------------------------------------------------------


def proc_state(pid: int) -> str | None:
    """The one-letter state of ``pid`` (``R``, ``S``, ``Z``...), None if it is gone."""
    fields = proc_stat(pid)
    return None if fields is None else fields[0]


def comm(pid: int) -> str:
    """The process's name (``psbx-spare``, ``psbx-init``...), "" if it is gone."""
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def ident(pid: int) -> Proc | None:
    """``(pid, start time)`` of a live process, None if it is gone."""
    start = process_start_time(pid)
    return None if start is None else (pid, start)


def alive(proc: Proc) -> bool:
    """True while that very process exists and is not a zombie (pid reuse cannot fool it)."""
    pid, start = proc
    return process_start_time(pid) == start and proc_state(pid) not in (None, "Z", "X")


def settled_pids(pids: Callable[[], set[int]], at_least: int, timeout: float = 10.0) -> set[Proc]:
    """The processes ``pids()`` reports once there are ``at_least`` of them (or at the timeout).

    A shell's ``cmd &`` returns before the child forked its own children (a ``setsid sh -c 'a & b'``
    daemon's ``a``): counting right after the shell said "ready" races with those forks.
    """
    deadline = time.monotonic() + timeout
    while True:
        procs = {p for p in map(ident, pids()) if p is not None}
        if len(procs) >= at_least or time.monotonic() > deadline:
            return procs
        time.sleep(0.01)


def survivors(procs: Iterable[Proc]) -> set[Proc]:
    return {p for p in procs if alive(p)}


def wait_gone(procs: Iterable[Proc], timeout: float) -> tuple[set[Proc], float]:
    """Poll until none of ``procs`` is alive; (those still alive, seconds waited)."""
    procs = set(procs)
    t0 = time.monotonic()
    left = survivors(procs)
    while left and time.monotonic() - t0 < timeout:
        time.sleep(0.01)
        left = survivors(left)
    return left, time.monotonic() - t0


def kill_procs(procs: Iterable[Proc]) -> None:
    """SIGKILL each still-alive process of ``procs`` (only those: a pidfd pins it before the check)."""
    for pid, start in procs:
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            continue
        try:
            if alive((pid, start)):
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(fd, signal.SIGKILL)
        finally:
            os.close(fd)


def all_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def pid_ns(pid: int) -> int | None:
    """The inode of ``pid``'s PID namespace (None if it is gone)."""
    try:
        return os.stat(f"/proc/{pid}/ns/pid").st_ino
    except OSError:
        return None


def procs_in_pid_ns(ns_inode: int) -> set[Proc]:
    """Every live process whose PID namespace is ``ns_inode`` (host pids)."""
    out: set[Proc] = set()
    for pid in all_pids():
        if pid_ns(pid) == ns_inode:
            p = ident(pid)
            if p is not None and alive(p):
                out.add(p)
    return out


@contextlib.contextmanager
def live_owner(remove_owner: Callable[[str], None]) -> Iterator[str]:
    """The owner tag of a live helper process, so a backend test's groups never mix with a
    launcher's; its groups are removed (``remove_owner``) and the helper ended afterwards."""
    helper = subprocess.Popen(["sleep", "3600"])
    tag = owner_tag(helper.pid)
    try:
        yield tag
    finally:
        remove_owner(tag)
        helper.kill()
        helper.wait()


def children(pid: int) -> set[int]:
    out: set[int] = set()
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/children") as f:
            out.update(int(x) for x in f.read().split())
    return out


def descendants(pid: int) -> set[Proc]:
    """Every live process below ``pid`` in the process tree (not ``pid`` itself)."""
    seen: set[int] = set()
    todo = [pid]
    while todo:
        for child in children(todo.pop()):
            if child not in seen:
                seen.add(child)
                todo.append(child)
    return {p for p in (ident(c) for c in seen) if p is not None}


def cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def procs_with_arg(arg: str) -> set[Proc]:
    """Live processes that have ``arg`` (a unique token) as one of their arguments."""
    out: set[Proc] = set()
    for pid in all_pids():
        if arg in cmdline(pid):
            p = ident(pid)
            if p is not None and alive(p):
                out.add(p)
    return out


def cgroup_paths_of(pid: int) -> list[str]:
    """Host paths of the pytest-sandbox cgroups ``pid`` is in (from /proc/<pid>/cgroup).

    /proc/<pid>/cgroup shows paths relative to the *reader's* cgroup namespace root; the test
    process is in the host's, so these are full paths below each hierarchy's mount point.
    """
    mounts = cgroup_mounts()
    out = []
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    for line in lines:
        _, ctrls, path = line.split(":", 2)
        if f"/{PROJECT_CGROUP}/" not in path + "/":
            continue
        mountpoint = mounts.get(ctrls)
        if mountpoint is not None:
            out.append(mountpoint + path)
    return out


def cgroup_mounts() -> dict[str, str]:
    """Controller list as /proc/<pid>/cgroup spells it (``""`` for cgroup2) -> mount point."""
    out: dict[str, str] = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-", 6)
            fstype, opts = fields[sep + 1], fields[sep + 3] if len(fields) > sep + 3 else ""
            if fstype == "cgroup2":
                out.setdefault("", fields[4])
            elif fstype == "cgroup":
                ctrls = [o for o in opts.split(",") if o in V1_CONTROLLERS]
                names = [o for o in opts.split(",") if o.startswith("name=")]
                out.setdefault(",".join(ctrls + names), fields[4])
    return out


def owner_cgroup_dirs(owner: str, root: str = CGROUP_ROOT) -> list[str]:
    """Every ``pytest-sandbox/<owner>`` group directory that exists, in any hierarchy (v1 or v2)."""
    pattern_v1 = os.path.join(root, "*", PROJECT_CGROUP, owner)
    pattern_v2 = os.path.join(root, PROJECT_CGROUP, owner)
    return sorted(glob.glob(pattern_v1) + glob.glob(pattern_v2))


def wait_until(condition: Callable[[], object], timeout: float, interval: float = 0.01) -> float | None:
    """Poll ``condition``; seconds it took to become true, or None on timeout."""
    t0 = time.monotonic()
    while True:
        if condition():
            return time.monotonic() - t0
        if time.monotonic() - t0 >= timeout:
            return None
        time.sleep(interval)


def launcher_settled(launcher: int) -> None:
    """Wait until only the cleaner and one spare (forked, waiting in its cgroup) are left under
    the launcher: every removal done, so its fd count is comparable with an earlier one."""

    def quiet() -> bool:
        comms = sorted(comm(pid) for pid, _ in descendants(launcher))
        spares = [p for p in children(launcher) if comm(p) == "psbx-spare" and proc_state(p) == "S"]
        return comms == ["psbx-cleaner", "psbx-spare"] and len(spares) == 1

    assert wait_until(quiet, 10.0) is not None, f"launcher {launcher} did not settle: {descendants(launcher)}"


# -- child pytest sessions -----------------------------------------------------------------------


def child_env(tmpdir: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a child pytest session: our plugin autoloaded, a private state parent.

    A private state parent (``$PYTEST_SANDBOX_STATE_DIR``, and ``$TMPDIR`` for good measure) makes
    the child's state directory ``<parent>/psbx-<pid>-<start>`` invisible to every other session's
    sweeper: if it disappears, the child's own launcher (or the sweep under test) removed it.
    """
    env = {
        k: v
        for k, v in os.environ.items()
        if not (k.startswith("PYTEST_") and not k.startswith("PYTEST_SANDBOX_")) and k != "COV_CORE_SOURCE"
    }
    env["TMPDIR"] = str(tmpdir)
    env["PYTEST_SANDBOX_STATE_DIR"] = str(tmpdir)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.pop("PYTEST_SANDBOX_STRICT", None)
    env.update(extra or {})
    return env


def write_child_project(directory: Path, files: Mapping[str, str]) -> None:
    """A self-contained rootdir for a child session (its own pytest.ini, so nothing above leaks in)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "pytest.ini").write_text("[pytest]\naddopts = -p no:cacheprovider\n")
    for name, text in files.items():
        (directory / name).write_text(text)


def pytest_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args]


def spawn_pytest(directory: Path, env: Mapping[str, str], *args: str) -> subprocess.Popen[bytes]:
    log = open(directory / "child.log", "wb")  # noqa: SIM115 -- closed by the caller via finish()
    try:
        return subprocess.Popen(
            pytest_argv(*args),
            cwd=directory,
            env=dict(env),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    finally:
        log.close()  # the child has its own copy


def child_output(directory: Path) -> str:
    try:
        return (directory / "child.log").read_text(errors="replace")
    except OSError:
        return ""


def wait_for_file(path: Path, proc: subprocess.Popen[bytes], timeout: float) -> Any:
    """Wait until a child wrote JSON to ``path`` (written atomically by rename); its content."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return json.loads(path.read_text())
        if proc.poll() is not None:
            raise AssertionError(
                f"child pytest exited ({proc.returncode}) before writing {path.name}:\n"
                + child_output(path.parent)
            )
        time.sleep(0.02)
    raise AssertionError(
        f"child pytest did not write {path.name} in {timeout} s:\n" + child_output(path.parent)
    )


def kill_child(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL a child pytest we started (by its pid) and reap it; no-op if it already exited."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def state_dirs(parent: Path) -> list[str]:
    """``psbx-*`` entries in a state directory parent."""
    try:
        return sorted(n for n in os.listdir(parent) if n.startswith(PREFIX + "-"))
    except FileNotFoundError:
        return []


# The snippet a generated child test uses to describe itself: atomically written JSON.
CHILD_REPORT = """
import json, os

def report(path, **data):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.rename(tmp, path)
"""
