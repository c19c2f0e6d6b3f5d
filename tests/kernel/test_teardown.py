"""Teardown kills the whole container through its cgroup and PID namespace, not one pid.

The workloads here try to outlive their container the ways real programs do: background jobs,
a ``setsid`` double-forked daemon, processes started by ``exec``, a process hidden in a sub-cgroup
that is then frozen and locked (``chmod 000``), and commands that ignore SIGTERM.  Survivors are
looked for on the host by PID namespace and by ``(pid, start time)``, so a recycled pid neither
passes for a survivor nor hides one.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pytest_sandbox import Container, ContainerNotRunningError, Sandbox
from tests.e2e_support import (
    Proc,
    cgroup_paths_of,
    ident,
    pid_ns,
    procs_in_pid_ns,
    procs_with_arg,
    survivors,
    wait_gone,
    wait_until,
)
from tests.probes import cgroup_backend_name

# A daemon the classic way: fork, setsid, fork again, parent exits -- reparented to the container's init.
DAEMON = (
    "import os, sys, time\n"
    "if os.fork() == 0:\n"
    "    os.setsid()\n"
    "    if os.fork() == 0:\n"
    "        os.execvp('sleep', ['sleep', sys.argv[1]])\n"
    "    os._exit(0)\n"
    "os.wait()\n"
)


def _token() -> str:
    """A unique sleep duration: finds this test's processes in /proc by their argv."""
    return f"1000.{int(secrets.token_hex(3), 16):08d}"


@dataclass
class Footprint:
    """What one container occupies on the host, taken while it runs."""

    procs: set[Proc] = field(default_factory=set)
    cgroups: list[str] = field(default_factory=list)
    state_dir: str = ""

    @classmethod
    def of(cls, c: Container) -> Footprint:
        ns = pid_ns(c.pid)
        assert ns is not None, "the container's main process is gone"
        procs = procs_in_pid_ns(ns)
        init = ident(c.init_pid)
        assert init is not None
        return cls(procs | {init}, cgroup_paths_of(c.pid), c.dir)

    def assert_gone(self, within: float = 2.0) -> float:
        left, waited = wait_gone(self.procs, within)
        assert not left, f"processes survived teardown for {within} s: {sorted(left)}"
        remaining = [p for p in self.cgroups if os.path.exists(p)]
        assert not remaining, f"cgroup directories left: {remaining}"
        assert not os.path.exists(self.state_dir), f"state directory left: {self.state_dir}"
        return waited


def _start_tree(sb: Sandbox, token: str) -> Container:
    """A container with 5 background sleeps, a setsid daemon and 3 exec'd processes (10 sleeps)."""
    main = (
        f"for i in 1 2 3 4 5; do sleep {token} & done; "
        f'python3 -c "$DAEMON" {token}; '
        f"echo ready; exec sleep {token}"
    )
    c = sb.start(["sh", "-c", main], env={"DAEMON": DAEMON}, memory="128m", pids=64)
    c.wait_for_log(b"ready", timeout=20)
    r = c.exec(["sh", "-c", f"sleep {token} & sleep {token} & setsid sleep {token} & echo spawned"])
    assert r.stdout == b"spawned\n", r
    # Background jobs are forked before the shell moves on, but may not have exec'd sleep yet.
    waited = wait_until(lambda: len(procs_with_arg(token)) >= 10, 10.0)
    assert waited is not None, f"only {len(procs_with_arg(token))} of 10 sleeps started"
    return c


def test_close_kills_the_whole_tree_and_removes_everything() -> None:
    """sandbox.close(): all 10 sleeps (background, daemon, exec'd) die within 2 s; no cgroup or
    state directory remains."""
    token = _token()
    sb = Sandbox()
    try:
        c = _start_tree(sb, token)
        fp = Footprint.of(c)
        sleeps = procs_with_arg(token)
        assert len(sleeps) == 10, f"expected 10 sleeps, found {len(sleeps)}"
        assert sleeps <= fp.procs, "a sleep is outside the container's PID namespace"
        # The daemon really escaped: its own session, and its parent is the container's init.
        sessions = {os.getsid(pid) for pid, _ in sleeps}
        assert len(sessions) >= 3, "no process left the shell's session (setsid did not happen)"
        assert fp.cgroups, "the container's process is in no pytest-sandbox cgroup"
        for path in fp.cgroups:
            listed = {int(p) for p in Path(path, "cgroup.procs").read_text().split()}
            assert {pid for pid, _ in fp.procs} - {c.init_pid} <= listed | _subtree_procs(path)
    finally:
        t0 = time.monotonic()
        sb.close()
        close_s = time.monotonic() - t0
    waited = fp.assert_gone(2.0)
    assert not procs_with_arg(token)
    print(f"teardown: close() {close_s:.3f} s, then {waited:.3f} s until the last process was gone")


@pytest.fixture
def after_sandbox_teardown() -> Iterator[list[Footprint]]:
    """Requested before ``sandbox``, so its teardown runs after the sandbox fixture's."""
    footprints: list[Footprint] = []
    yield footprints
    assert footprints, "the test registered nothing to check"
    for fp in footprints:
        fp.assert_gone(2.0)


def test_fixture_scope_end_kills_the_whole_tree(
    after_sandbox_teardown: list[Footprint], sandbox: Sandbox
) -> None:
    """The ``sandbox`` fixture's teardown alone (no close() in the test) removes the whole tree."""
    token = _token()
    c = _start_tree(sandbox, token)
    after_sandbox_teardown.append(Footprint.of(c))
    assert len(procs_with_arg(token)) == 10


def _subtree_procs(path: str) -> set[int]:
    out: set[int] = set()
    for root, _dirs, files in os.walk(path):
        if "cgroup.procs" in files:
            out |= {int(p) for p in Path(root, "cgroup.procs").read_text().split()}
    return out


def _freezer_leaf(paths: list[str]) -> tuple[str, str]:
    """(directory, freeze file) of the cgroup that can freeze: v1 freezer hierarchy or v2 leaf."""
    for p in paths:
        if os.path.exists(os.path.join(p, "freezer.state")):
            return p, "freezer.state"
        if os.path.exists(os.path.join(p, "cgroup.freeze")):
            return p, "cgroup.freeze"
    raise AssertionError(f"no freezer in {paths}")


def test_frozen_and_locked_sub_cgroup_does_not_block_teardown() -> None:
    """A container process moved into a sub-cgroup of its leaf, frozen there and chmod 000'd, is
    still killed and every cgroup directory removed (BenchExec test_frozen_process).

    A container cannot do this itself here: the cgroup filesystem is not mounted inside (v1 cannot
    be mounted in a user namespace; v2 is mounted read-only), so the test does it from the host, in
    the container's own leaf, exactly as the workload would with a writable mount.
    """
    if cgroup_backend_name() not in ("v1", "v2"):
        pytest.skip("no cgroup backend")
    token = _token()
    sb = Sandbox()
    subs: list[str] = []
    victim: Proc | None = None
    try:
        c = sb.start(["sh", "-c", f"sleep {token} & echo ready; exec sleep {token}"], memory="64m")
        c.wait_for_log(b"ready", timeout=20)
        assert wait_until(lambda: len(procs_with_arg(token)) == 2, 10.0) is not None
        fp = Footprint.of(c)
        hidden = sorted(procs_with_arg(token) - {ident(c.pid)})
        assert len(hidden) == 1
        victim = hidden[0]
        for leaf in fp.cgroups:
            assert "/pytest-sandbox/" in leaf  # only ever touch our own tree
            sub = os.path.join(leaf, "hideout")
            os.mkdir(sub)
            subs.append(sub)
            Path(sub, "cgroup.procs").write_text(str(victim[0]))
        fdir, ffile = _freezer_leaf(subs)
        Path(fdir, ffile).write_text("FROZEN" if ffile == "freezer.state" else "1")
        if ffile == "freezer.state":
            deadline = time.monotonic() + 2
            while Path(fdir, ffile).read_text().strip() != "FROZEN" and time.monotonic() < deadline:
                time.sleep(0.01)
            assert Path(fdir, ffile).read_text().strip() == "FROZEN"
        for sub in subs:
            os.chmod(sub, 0)
        close_s = _close_within(sb, 10.0)
        if close_s is None:
            _rescue(sb, subs, victim)  # thaws the victim, which lets the stuck close() finish
            pytest.fail("sandbox.close() hung on a frozen, chmod 000 sub-cgroup (no kill through the cgroup)")
        waited = fp.assert_gone(2.0)
        assert not any(os.path.exists(s) for s in subs)
        print(f"frozen sub-cgroup: close() {close_s:.3f} s, then {waited:.3f} s")
        assert close_s < 5.0
    finally:
        _rescue(sb, subs, victim)


def _close_within(sb: Sandbox, seconds: float) -> float | None:
    """sb.close() under a watchdog: the seconds it took, or None if it is still stuck."""
    errors: list[BaseException] = []

    def close() -> None:
        try:
            sb.close()
        except BaseException as e:
            errors.append(e)

    t0 = time.monotonic()
    closer = threading.Thread(target=close, name="test-closer", daemon=True)
    closer.start()
    closer.join(seconds)
    if closer.is_alive():
        return None
    if errors:
        raise errors[0]
    return time.monotonic() - t0


def _rescue(sb: Sandbox, subs: list[str], victim: Proc | None) -> None:
    """If teardown failed, thaw, kill and remove what this test made, so nothing outlives it."""
    for sub in subs:
        if os.path.isdir(sub):
            with contextlib.suppress(OSError):
                os.chmod(sub, 0o755)
                for name, value in (("freezer.state", "THAWED"), ("cgroup.freeze", "0")):
                    if os.path.exists(os.path.join(sub, name)):
                        Path(sub, name).write_text(value)
    if victim is not None and survivors([victim]):
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim[0], signal.SIGKILL)
        wait_gone([victim], 2.0)
    for sub in subs:
        with contextlib.suppress(OSError):
            os.rmdir(sub)
    with contextlib.suppress(Exception):
        sb.close()


IGNORE_TERM = ["sh", "-c", "trap '' TERM; echo ready; while :; do sleep 0.05; done"]


def test_stop_kills_a_container_that_ignores_sigterm(sandbox: Sandbox) -> None:
    """stop(timeout=0.5) on a SIGTERM-ignoring command: SIGKILL after the grace time, exit 137."""
    c = sandbox.start(IGNORE_TERM)
    c.wait_for_log(b"ready", timeout=20)
    fp = Footprint.of(c)
    t0 = time.monotonic()
    r = c.stop(timeout=0.5)
    took = time.monotonic() - t0
    assert r.signal == signal.SIGKILL, r
    assert r.exit_code == 137
    assert 0.45 <= took < 3.0, f"stop took {took:.2f} s"
    left, _ = wait_gone(fp.procs, 2.0)
    assert not left


def test_close_does_not_wait_for_sigterm_grace() -> None:
    """Removing containers that ignore SIGTERM is immediate (SIGKILL through the cgroup)."""
    sb = Sandbox()
    try:
        cs = [sb.start(IGNORE_TERM) for _ in range(3)]
        for c in cs:
            c.wait_for_log(b"ready", timeout=20)
        fps = [Footprint.of(c) for c in cs]
    finally:
        t0 = time.monotonic()
        sb.close()
        took = time.monotonic() - t0
    for fp in fps:
        fp.assert_gone(2.0)
    assert took < 2.0, f"close() of 3 SIGTERM-ignoring containers took {took:.2f} s"


def test_main_exit_takes_background_processes_with_it(sandbox: Sandbox) -> None:
    """Docker semantics: when the main command exits, background and setsid'd children die too."""
    token = _token()
    t0 = time.monotonic()
    r = sandbox.run(["sh", "-c", f"sleep {token} & setsid sleep {token} & echo started"], timeout=20)
    assert r.exit_code == 0, r
    assert r.stdout == b"started\n"
    assert time.monotonic() - t0 < 10
    took = wait_until(lambda: not procs_with_arg(token), 2.0)
    assert took is not None, f"background processes outlived the main one: {procs_with_arg(token)}"


def test_remove_and_close_are_idempotent() -> None:
    """remove() twice, close() twice, and API calls after removal give typed errors, not hangs."""
    sb = Sandbox()
    c = sb.start(["sleep", "1000"])
    fp = Footprint.of(c)
    c.remove()
    c.remove()
    fp.assert_gone(2.0)
    with pytest.raises(ContainerNotRunningError):
        c.exec(["true"])
    with pytest.raises(ContainerNotRunningError):
        c.kill()
    sb.close()
    sb.close()
