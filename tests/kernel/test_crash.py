"""Crash safety: SIGKILL of pytest, SIGKILL of our launcher, and the next session's sweep.

Each test runs a *child* pytest session (``python -m pytest`` on a generated module, in its own
rootdir and with a private ``TMPDIR``) and kills parts of it with SIGKILL, the way a CI cancel or
the OOM killer would.  Plain subprocesses rather than ``pytester.runpytest_subprocess``: the tests
need the child's pid to kill it mid-test, its environment (TMPDIR) and a side channel (a JSON
report file) while it still runs, none of which pytester offers.

The private TMPDIR matters: the child's state directory ``$TMPDIR/psbx-<pid>-<start>`` is then
invisible to every other session's sweeper, so if it disappears, the child's own launcher removed
it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pytest_sandbox.core.naming import PROJECT_CGROUP, owner_tag, process_start_time
from tests.e2e_support import (
    CHILD_REPORT,
    Proc,
    child_env,
    child_output,
    cmdline,
    descendants,
    ident,
    kill_child,
    kill_procs,
    owner_cgroup_dirs,
    pid_ns,
    procs_in_pid_ns,
    spawn_pytest,
    state_dirs,
    survivors,
    wait_for_file,
    wait_gone,
    wait_until,
    write_child_project,
)
from tests.probes import cgroup_backend_name

START_TIMEOUT = 60.0  # a child session on a loaded 2-core host under xdist

HOLDER = (
    CHILD_REPORT
    + """
import sys, time
from pytest_sandbox.runtime import get_runtime


def describe(*containers):
    rt = get_runtime()
    return dict(
        pytest_pid=os.getpid(),
        launcher_pid=rt.client.pid,
        owner=rt.owner,
        state_dir=rt.state_dir,
        containers=[dict(id=c.id, pid=c.pid, init_pid=c.init_pid, dir=c.dir) for c in containers],
    )


def test_hold(sandbox):
    a = sandbox.start(["sleep", "1000"], memory="64m", pids=16)
    b = sandbox.start(["sh", "-c", "sleep 1000 & sleep 1000 & echo ready; exec sleep 1000"], cpus=0.5)
    b.wait_for_log(b"ready")
    b.exec(["sh", "-c", "setsid sleep 1000 &"])
    report(os.environ["PSBX_REPORT"], **describe(a, b))
    release = os.environ["PSBX_RELEASE"]
    deadline = time.monotonic() + 120
    while not os.path.exists(release) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert a.running and b.running
"""
)

LAUNCHER_VICTIM = (
    CHILD_REPORT
    + """
import time
from pytest_sandbox import LauncherError, SandboxError
from pytest_sandbox.runtime import get_runtime


def test_launcher_killed(sandbox):
    rt = get_runtime()
    a = sandbox.start(["sleep", "1000"], memory="64m")
    b = sandbox.start(["sh", "-c", "sleep 1000 & echo ready; exec sleep 1000"])
    b.wait_for_log(b"ready")
    report(os.environ["PSBX_REPORT"], pytest_pid=os.getpid(), launcher_pid=rt.client.pid, owner=rt.owner,
           containers=[dict(pid=c.pid, init_pid=c.init_pid) for c in (a, b)])
    while not os.path.exists(os.environ["PSBX_RELEASE"]):
        time.sleep(0.02)
    outcome = {}
    try:
        r = sandbox.run(["echo", "alive"], memory="64m", timeout=30)
        outcome["first"] = "ok"
    except LauncherError as e:
        outcome["first"] = "LauncherError"
        outcome["message"] = str(e)[:300]
        r = sandbox.run(["echo", "alive"], memory="64m", timeout=30)
    outcome["stdout"] = r.stdout.decode()
    outcome["new_launcher_pid"] = rt.client.pid
    waits = []
    for c in (a, b):
        try:
            waits.append(repr(c.wait(timeout=10)))
        except SandboxError as e:
            waits.append(type(e).__name__)
    outcome["waits"] = waits
    report(os.environ["PSBX_REPORT2"], **outcome)
"""
)

ONE_CONTAINER = """
def test_one(sandbox):
    assert sandbox.run(["true"]).exit_code == 0
"""


@dataclass
class Children:
    """Child pytest sessions a test started, and the processes they own that it has seen."""

    sessions: list[subprocess.Popen[bytes]] = field(default_factory=list)
    procs: set[Proc] = field(default_factory=set)

    def append(self, session: subprocess.Popen[bytes]) -> None:
        self.sessions.append(session)


@pytest.fixture
def children() -> Iterator[Children]:
    """Child sessions are SIGKILLed (by pid) and reaped at the end; if the test failed with some of
    their processes still alive (a broken teardown), those are killed too, so nothing outlives it."""
    kids = Children()
    yield kids
    for p in kids.sessions:
        kill_child(p)
    if survivors(kids.procs):
        time.sleep(1.0)  # their launcher may still be cleaning up
        kill_procs(kids.procs)


def _owned_procs(info: dict[str, object], children: Children) -> set[Proc]:
    """Every live process of a child session below pytest: launcher, cleaner, inits, workloads."""
    launcher = int(info["launcher_pid"])  # type: ignore[call-overload]
    procs = descendants(launcher)
    me = ident(launcher)
    assert me is not None, "the child's launcher is not running"
    procs.add(me)
    for c in info["containers"]:  # type: ignore[attr-defined]
        ns = pid_ns(int(c["pid"]))
        assert ns is not None, f"container process {c['pid']} is not running"
        procs |= procs_in_pid_ns(ns)
    children.procs |= procs
    return procs


def _sleeps(procs: set[Proc]) -> list[Proc]:
    return [p for p in procs if cmdline(p[0])[:1] == ["sleep"]]


def test_sigkill_of_pytest_leaves_nothing(tmp_path: Path, children: Children) -> None:
    """SIGKILL the pytest process mid-test: its launcher sees EOF, kills the containers, removes
    their cgroups and the state directory, and exits -- within a few seconds, with no sweeper."""
    project, tmpdir = tmp_path / "child", tmp_path / "tmp"
    tmpdir.mkdir()
    write_child_project(project, {"test_hold.py": HOLDER})
    report = project / "report.json"
    env = child_env(tmpdir, {"PSBX_REPORT": str(report), "PSBX_RELEASE": str(project / "never")})
    child = spawn_pytest(project, env, "-q", "test_hold.py")
    children.append(child)
    info = wait_for_file(report, child, START_TIMEOUT)
    assert info["pytest_pid"] == child.pid
    # Background jobs exist once the child reports, but may not have exec'd sleep yet.
    waited = wait_until(lambda: len(_sleeps(_owned_procs(info, children))) == 5, 10.0)
    assert waited is not None, f"expected the child's 5 sleeps, found {_sleeps(_owned_procs(info, children))}"
    procs = _owned_procs(info, children)
    owner = str(info["owner"])
    cgroups = owner_cgroup_dirs(owner)
    backend = cgroup_backend_name()
    if backend in ("v1", "v2"):
        assert cgroups, f"the child's cgroup group {owner} does not exist while it runs"
    assert state_dirs(tmpdir) == [owner]

    os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=10)
    left, procs_s = wait_gone(procs, 10.0)
    assert not left, f"processes of the killed session survived: {sorted(left)}\n{child_output(project)}"
    state_s = wait_until(lambda: not state_dirs(tmpdir), 10.0)
    cgroup_s = wait_until(lambda: not owner_cgroup_dirs(owner), 10.0)
    print(
        f"SIGKILL of pytest: processes gone in {procs_s:.3f} s, state dir in {state_s} s, "
        f"cgroups in {cgroup_s} s"
    )
    assert cgroup_s is not None, f"cgroup groups left: {owner_cgroup_dirs(owner)}"
    assert state_s is not None, f"state directory left: {state_dirs(tmpdir)}"
    assert max(procs_s, state_s, cgroup_s) < 5.0


def test_sigkill_of_the_launcher_kills_containers_and_the_session_recovers(
    tmp_path: Path, children: Children
) -> None:
    """SIGKILL the child's launcher: the containers die through their lifeline, the next start gets
    a fresh launcher (or first a LauncherError), and the session still ends with nothing left."""
    project, tmpdir = tmp_path / "child", tmp_path / "tmp"
    tmpdir.mkdir()
    write_child_project(project, {"test_victim.py": LAUNCHER_VICTIM})
    report, report2, release = project / "report.json", project / "report2.json", project / "release"
    env = child_env(
        tmpdir, {"PSBX_REPORT": str(report), "PSBX_REPORT2": str(report2), "PSBX_RELEASE": str(release)}
    )
    child = spawn_pytest(project, env, "-q", "test_victim.py")
    children.append(child)
    info = wait_for_file(report, child, START_TIMEOUT)
    launcher = int(info["launcher_pid"])
    procs = _owned_procs(info, children)
    assert len(procs) >= 7  # launcher, cleaner, 2 inits, 3 sleeps

    t0 = time.monotonic()
    os.kill(launcher, signal.SIGKILL)
    left, gone_s = wait_gone(procs, 5.0)
    print(f"SIGKILL of the launcher: its containers were gone in {gone_s:.3f} s")
    assert not left, f"processes survived their launcher: {sorted(left)}"
    assert gone_s < 3.0
    release.write_text("go")
    outcome = wait_for_file(report2, child, START_TIMEOUT)
    assert outcome["first"] in ("ok", "LauncherError"), outcome
    assert outcome["stdout"] == "alive\n"
    assert outcome["new_launcher_pid"] not in (None, launcher)
    new_launcher = {p for p in [ident(int(outcome["new_launcher_pid"]))] if p is not None}
    for w in outcome["waits"]:  # waiting on a container of the dead launcher: a typed error, no hang
        assert w in ("LauncherError", "ContainerNotRunningError") or w.startswith("Result("), w
    assert child.wait(timeout=60) == 0, child_output(project)
    owner = str(info["owner"])
    assert wait_until(lambda: not owner_cgroup_dirs(owner), 5.0) is not None, owner_cgroup_dirs(owner)
    assert wait_until(lambda: not state_dirs(tmpdir), 5.0) is not None, state_dirs(tmpdir)
    assert not wait_gone(new_launcher, 5.0)[0], "the fresh launcher outlived its session"
    print(f"launcher crash scenario total {time.monotonic() - t0:.2f} s")


def _dead_pid() -> int:
    """A pid no process has now (a child that already exited and was reaped)."""
    p = subprocess.Popen(["true"])
    p.wait()
    assert process_start_time(p.pid) is None
    return p.pid


def _make_fake_owner_cgroups(owner: str, like: list[str]) -> list[str]:
    """Owner groups named ``owner`` next to the live owner groups ``like`` (same hierarchies)."""
    made = []
    for live in like:
        project = os.path.dirname(live)
        assert project.endswith("/" + PROJECT_CGROUP)
        if os.path.exists(os.path.join(project, "cpuset.cpus")):
            continue  # a cpuset group needs cpus/mems before it can hold tasks; not needed here
        group = os.path.join(project, owner)
        os.mkdir(group)
        made.append(group)
        os.mkdir(os.path.join(group, "psbx-c-0123456789ab"))
    return made


def _remove_fake_groups(groups: list[str]) -> None:
    for group in groups:
        for root, dirs, _ in os.walk(group, topdown=False):
            for d in dirs:
                with contextlib.suppress(OSError):
                    os.rmdir(os.path.join(root, d))
        with contextlib.suppress(OSError):
            os.rmdir(group)


def _fake_crashed_state_dirs(tmpdir: Path, owners: tuple[str, ...]) -> None:
    """The state dirs a crashed run leaves: a container's overlay work dir and a launcher log."""
    for name in owners:
        work = tmpdir / name / "c-0123456789ab" / "work" / "work"
        work.mkdir(parents=True)
        work.chmod(0)  # what overlayfs leaves: d---------
        (tmpdir / name / "launcher.log").write_text("crashed\n")


def _leave_in_containers(pid: int, owner_groups: list[str]) -> None:
    """A process the crashed run left behind, in its container's leaf in every hierarchy."""
    for group in owner_groups:
        Path(group, "psbx-c-0123456789ab", "cgroup.procs").write_text(str(pid))


def _run_one_container_session(project: Path, tmpdir: Path) -> None:
    """A whole pytest session that starts one container: its start sweeps what dead owners left."""
    write_child_project(project, {"test_one.py": ONE_CONTAINER})
    nxt = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "test_one.py"],
        cwd=project,
        env=child_env(tmpdir),
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert nxt.returncode == 0, nxt.stdout.decode() + nxt.stderr.decode()


def test_next_session_sweeps_dead_owners_and_spares_live_ones(tmp_path: Path, children: Children) -> None:
    """A crashed run's state dir and cgroup group (owner pid dead, or pid reused with another start
    time) are removed by the next session's start -- a leftover process in them killed -- while a
    live session's state dir, cgroups and running containers are left untouched."""
    backend = cgroup_backend_name()
    project, tmpdir = tmp_path / "live", tmp_path / "tmp"
    tmpdir.mkdir()
    write_child_project(project, {"test_hold.py": HOLDER})
    report, release = project / "report.json", project / "release"
    env = child_env(tmpdir, {"PSBX_REPORT": str(report), "PSBX_RELEASE": str(release)})
    live = spawn_pytest(project, env, "-q", "test_hold.py")
    children.append(live)
    info = wait_for_file(report, live, START_TIMEOUT)
    live_owner = str(info["owner"])
    live_cgroups = owner_cgroup_dirs(live_owner)
    live_procs = _owned_procs(info, children)

    dead = f"psbx-{_dead_pid()}-4242"
    reused = f"psbx-{os.getpid()}-{(process_start_time(os.getpid()) or 0) + 1}"  # our pid, another start
    assert reused != owner_tag()
    _fake_crashed_state_dirs(tmpdir, (dead, reused))
    groups: list[str] = []
    leftover: subprocess.Popen[bytes] | None = None
    try:
        if backend in ("v1", "v2"):
            assert live_cgroups
            groups = _make_fake_owner_cgroups(dead, live_cgroups)
            groups += _make_fake_owner_cgroups(reused, live_cgroups)
            leftover = subprocess.Popen(["sleep", "1000"])
            _leave_in_containers(leftover.pid, [g for g in groups if os.path.basename(g) == dead])
        leftover_proc = ident(leftover.pid) if leftover else None

        _run_one_container_session(tmp_path / "next", tmpdir)

        assert state_dirs(tmpdir) == [live_owner], "the sweep missed a dead owner or removed the live one"
        assert not [g for g in groups if os.path.exists(g)], "dead owners' cgroup groups were not swept"
        if leftover is not None and leftover_proc is not None:
            leftover.wait(timeout=5)  # killed by the sweep (we reap our own child)
            assert leftover.returncode == -signal.SIGKILL
        assert owner_cgroup_dirs(live_owner) == live_cgroups, "the live session's cgroups were touched"
        assert not (live_procs - survivors(live_procs)), "the live session's processes were killed"
    finally:
        if leftover is not None and leftover.poll() is None:
            leftover.kill()
            leftover.wait()
        _remove_fake_groups(groups)
        release.write_text("go")
    assert live.wait(timeout=60) == 0, child_output(project)
    assert wait_until(lambda: not state_dirs(tmpdir), 5.0) is not None, state_dirs(tmpdir)
    assert wait_until(lambda: not owner_cgroup_dirs(live_owner), 5.0) is not None


HANDLES_AFTER_DEATH = (
    CHILD_REPORT
    + """
import re, signal, time
import pytest
from pytest_sandbox import LauncherError, ReadinessError
from pytest_sandbox.images.store import Store
from pytest_sandbox.runtime import get_runtime

STORE = Store(os.environ["PSBX_REPORT"] + ".store")
DIED = r"launcher \\(pid \\d+\\) was killed by signal 9 \\(SIGKILL\\): every container it ran is gone"
CALLS = {
    "wait": lambda c: c.wait(),
    "wait(timeout)": lambda c: c.wait(timeout=60),
    "exec": lambda c: c.exec(["true"]),
    "kill": lambda c: c.kill(),
    "stop": lambda c: c.stop(timeout=60),
    "stats": lambda c: c.stats(),
    "cgroup_limits": lambda c: c.cgroup_limits(),
    "commit": lambda c: c.commit("psbx-dead:1", store=STORE),  # its writable layer went with it
}


def test_every_handle_reports_the_death(sandbox, sandbox_session):
    kept = sandbox_session.start(["sleep", "1000"])  # removed by the session's teardown
    a = sandbox.start(["sleep", "1000"], memory="64m")
    b = sandbox.start(["sh", "-c", "echo hello; exec sleep 1000"])
    b.wait_for_log("hello")
    assert a.running  # a's exit is being waited for now; b's and kept's are not
    launcher = get_runtime().client.pid
    os.kill(launcher, signal.SIGKILL)
    t0 = time.monotonic()
    while a.running and time.monotonic() - t0 < 10:
        time.sleep(0.001)
    out = {"noticed_s": time.monotonic() - t0, "running": [c.running for c in (a, b, kept)]}
    slowest = 0.0
    for c in (a, b):
        for name, call in CALLS.items():
            t = time.monotonic()
            with pytest.raises(LauncherError, match=DIED):
                call(c)
            slowest = max(slowest, time.monotonic() - t)
        t = time.monotonic()
        with pytest.raises(ReadinessError):  # a readiness wait: the container is gone, at once
            c.wait_for_log("never", timeout=60)
        slowest = max(slowest, time.monotonic() - t)
    out["slowest_call_s"] = slowest
    out["store_made"] = os.path.exists(STORE.root)
    assert b.logs(stream="stdout") == b"hello\\n"  # its output is still there to read
    t = time.monotonic()
    a.remove()
    b.remove()
    out["remove_s"] = time.monotonic() - t
    out["dirs_left"] = [os.path.exists(c.dir) for c in (a, b)]
    out["next_run"] = sandbox.run(["echo", "alive"]).stdout.decode()
    out["new_launcher"] = get_runtime().client.pid not in (None, launcher)
    report(os.environ["PSBX_REPORT"], **out)
"""
)


def test_after_the_launcher_dies_every_handle_says_so_and_nothing_hangs(
    tmp_path: Path, children: Children
) -> None:
    """Issue 9, item 9: SIGKILL the launcher from inside a test (a child session): every container
    handle then reports it -- ``running`` is False, each call raises LauncherError saying the
    launcher was killed by SIGKILL, at once (none hangs, none starts a launcher that would not
    know the container; commit too, storing nothing: security review, item 1) -- its output
    stays readable, remove() deletes its directory, the next run gets a fresh launcher, and the
    fixtures' teardown (a session-scoped handle's container too) completes: the child session
    passes and leaves nothing."""
    project, tmpdir = tmp_path / "child", tmp_path / "tmp"
    tmpdir.mkdir()
    write_child_project(project, {"test_death.py": HANDLES_AFTER_DEATH})
    report = project / "report.json"
    child = spawn_pytest(project, child_env(tmpdir, {"PSBX_REPORT": str(report)}), "-q", "test_death.py")
    children.append(child)
    assert child.wait(timeout=120) == 0, child_output(project)
    out = wait_for_file(report, child, 1.0)
    print(
        f"launcher death noticed in {out['noticed_s']:.4f} s; slowest call after it "
        f"{out['slowest_call_s']:.4f} s; remove of two containers {out['remove_s']:.4f} s"
    )
    assert out["running"] == [False, False, False]
    assert out["noticed_s"] < 2.0
    assert out["slowest_call_s"] < 1.0
    assert out["dirs_left"] == [False, False]
    assert out["store_made"] is False  # commit stored nothing, not even the parent image
    assert out["next_run"] == "alive\n"
    assert out["new_launcher"]
    assert "1 passed" in child_output(project)
    assert wait_until(lambda: not state_dirs(tmpdir), 5.0) is not None, state_dirs(tmpdir)
