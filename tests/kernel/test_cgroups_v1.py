"""cgroup backends on the real kernel (v1 hierarchies, as on this host).

The workloads are plain processes this test forks itself (the container runtime is written
elsewhere).  Every cgroup a test creates is removed by the test's own fixtures; nothing outside
``<hierarchy>/pytest-sandbox/`` is ever written.  They need root and a cgroup v1 host; the
pure helpers (mountinfo parsing, classify, the write guard) are tested in tests/unit/test_cgroups_pure.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import pytest

from pytest_sandbox.core.errors import CgroupUnavailableError
from pytest_sandbox.core.limits import Limits
from pytest_sandbox.core.naming import PROJECT_CGROUP, cgroup_leaf_name, new_container_id, owner_tag
from pytest_sandbox.host.cgroups import (
    CgroupStats,
    V1Backend,
    V1Cgroup,
    detect,
)
from tests.e2e_support import Spawn, ident, live_owner, settled_pids, survivors
from tests.probes import cgroup_fs

ROOT = "/sys/fs/cgroup"
MiB = 1 << 20
V1_UNLIMITED = "9223372036854771712"  # PAGE_COUNTER_MAX * PAGE_SIZE, what v1 shows for "no limit"


def _host_backend() -> V1Backend | None:
    if os.geteuid() != 0:
        return None
    backend = detect(ROOT)
    return backend if isinstance(backend, V1Backend) else None


needs_v1 = pytest.mark.skipif(_host_backend() is None, reason="needs root on a cgroup v1 host")


# ---------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def backend() -> V1Backend:
    b = _host_backend()
    assert b is not None
    return b


@pytest.fixture(scope="module")
def owner(backend: V1Backend) -> Iterator[str]:
    """A live owner tag of a helper process, so our groups never mix with a launcher's."""
    with live_owner(backend.remove_owner) as tag:
        yield tag
    for mp in set(backend.controllers.values()):
        assert not os.path.exists(f"{mp}/{PROJECT_CGROUP}/{tag}")


Make = Callable[..., V1Cgroup]


@pytest.fixture
def make(backend: V1Backend, owner: str) -> Iterator[Make]:
    made: list[V1Cgroup] = []

    def _make(limits: Limits | None = None, *, who: str | None = None) -> V1Cgroup:
        cg = backend.create(who or owner, cgroup_leaf_name(new_container_id()), limits or Limits())
        assert isinstance(cg, V1Cgroup)
        made.append(cg)
        return cg

    yield _make
    for cg in made:
        cg.remove()
        assert not any(os.path.exists(p) for p in cg.paths)


def _wait_for(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


# ------------------------------------------------------------------------------- kernel tests


@needs_v1
def test_layout_and_hierarchies_for_empty_limits(backend: V1Backend, owner: str, make: Make) -> None:
    cg = make()
    assert [p.split("/")[-4:] for p in cg.paths] == [
        [c, PROJECT_CGROUP, owner, cg.name] for c in ("memory", "pids", "cpuacct", "freezer")
    ]
    assert all(os.path.isdir(p) for p in cg.paths)
    assert "cgroup v1 (memory pids cpuacct freezer cpu cpuset" in backend.describe()


@needs_v1
def test_limits_read_back(make: Make) -> None:
    cg = make(Limits.parse(memory="64m", cpus=0.5, cpu_shares=512, cpuset="0", pids=32))
    assert {p.split("/")[-4] for p in cg.paths} == {"memory", "pids", "cpuacct", "freezer", "cpu", "cpuset"}
    got = cg.read_limits()
    assert got["memory.limit_in_bytes"] == str(64 * MiB)
    assert got["memory.memsw.limit_in_bytes"] == str(64 * MiB)  # swap off by default
    assert got["cpu.cfs_quota_us"] == "50000"
    assert got["cpu.cfs_period_us"] == "100000"
    assert got["cpu.shares"] == "512"
    assert got["cpuset.cpus"] == "0"
    assert got["cpuset.mems"] != ""  # copied down, or no task could join
    assert got["pids.max"] == "32"


@needs_v1
@pytest.mark.parametrize(("swap", "memsw"), [("128m", str(128 * MiB)), (-1, V1_UNLIMITED)])
def test_memory_swap_read_back(make: Make, swap: object, memsw: str) -> None:
    got = make(Limits.parse(memory="64m", memory_swap=swap)).read_limits()
    assert got["memory.limit_in_bytes"] == str(64 * MiB)
    assert got["memory.memsw.limit_in_bytes"] == memsw


@needs_v1
def test_empty_limits_leave_everything_unlimited(make: Make) -> None:
    got = make().read_limits()
    assert got["memory.limit_in_bytes"] == V1_UNLIMITED
    assert got["pids.max"] == "max"


@needs_v1
def test_cpuset_cgroup_accepts_a_task(make: Make, spawn: Spawn) -> None:
    cg = make(Limits.parse(cpuset="1"))
    p = spawn(["sleep", "30"], cg)
    assert p.pid in cg.pids()
    assert Path(f"/proc/{p.pid}/status").read_text().split("Cpus_allowed_list:")[1].split()[0] == "1"


@needs_v1
def test_failed_limit_write_names_the_file_and_leaves_nothing(backend: V1Backend, owner: str) -> None:
    leaf = cgroup_leaf_name(new_container_id())
    bad = Limits(cpuset="63")  # not online: the kernel refuses it
    with pytest.raises(OSError, match="cannot write '63'") as info:
        backend.create(owner, leaf, bad)
    assert str(info.value.filename).endswith(f"/{leaf}/cpuset.cpus")
    for mp in set(backend.controllers.values()):
        assert not os.path.exists(f"{mp}/{PROJECT_CGROUP}/{owner}/{leaf}")


@needs_v1
def test_create_retries_when_a_parent_vanishes(
    backend: V1Backend, make: Make, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another session may rmdir the empty project parent between our mkdirs: we retry."""
    real_mkdir = cgroup_fs.mkdir
    fired: list[str] = []
    helper = subprocess.Popen(["sleep", "60"])
    fresh_owner = owner_tag(helper.pid)

    def racing_mkdir(path: str) -> None:
        if path.endswith("/" + fresh_owner) and not fired:
            fired.append(path)
            raise FileNotFoundError(2, "No such file or directory (simulated race)", path)
        real_mkdir(path)

    monkeypatch.setattr(cgroup_fs, "mkdir", racing_mkdir)
    try:
        cg = make(Limits.parse(pids=8), who=fresh_owner)
        assert fired
        assert cg.read_limits()["pids.max"] == "8"
        cg.remove()
    finally:
        backend.remove_owner(fresh_owner)
        helper.kill()
        helper.wait()


@needs_v1
def test_attach_self_and_stats_of_a_quiet_process(make: Make) -> None:
    cg = make(Limits.parse(memory="64m"))
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child: the launcher's way, attach(0) then exec
        try:
            cg.attach(0)
            os.execv("/bin/true", ["true"])
        finally:
            os._exit(127)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    stats = cg.stats()
    assert stats.oom_kills == 0
    assert stats.pids_limit_hits == 0
    assert stats.cpu_usage_s is not None
    assert stats.cpu_usage_s > 0
    assert stats.memory_peak is not None
    assert 0 < stats.memory_peak < 64 * MiB
    assert CgroupStats.from_wire(stats.to_wire()) == stats


HOG = "b = b'x' * (200 << 20)"  # touches every page: 200 MiB really resident


@needs_v1
def test_memory_hog_is_oom_killed_and_counted(make: Make, spawn: Spawn) -> None:
    cg = make(Limits.parse(memory="64m"))
    p = spawn([sys.executable, "-S", "-c", HOG], cg, stderr=subprocess.DEVNULL)
    assert p.wait(timeout=30) == -signal.SIGKILL
    stats = cg.stats()
    assert stats.oom_kills >= 1
    assert stats.memory_peak is not None
    assert 0.95 * 64 * MiB <= stats.memory_peak <= 64 * MiB  # BenchExec's +-5 %


@needs_v1
def test_oom_in_a_sub_cgroup_the_workload_made_is_counted(make: Make, spawn: Spawn) -> None:
    cg = make(Limits.parse(memory="64m"))
    mem = next(p for p in cg.paths if "/memory/" in p)
    script = f'mkdir "$1/sub" && echo $$ > "$1/sub/cgroup.procs" && exec {sys.executable} -S -c "{HOG}"'
    p = spawn(["/bin/sh", "-c", script, "sh", mem], cg, stderr=subprocess.DEVNULL)
    assert p.wait(timeout=30) == -signal.SIGKILL
    assert cg.stats().oom_kills >= 1


@needs_v1
def test_cpu_quota_of_a_tenth_of_a_cpu(make: Make, spawn: Spawn) -> None:
    cg = make(Limits.parse(cpus=0.1))
    spawn(["/bin/sh", "-c", "while :; do :; done"], cg)
    time.sleep(0.3)  # let the first periods pass
    before, t0 = cg.stats(), time.monotonic()
    time.sleep(2.0)
    after, t1 = cg.stats(), time.monotonic()
    assert before.cpu_usage_s is not None
    assert after.cpu_usage_s is not None
    share = (after.cpu_usage_s - before.cpu_usage_s) / (t1 - t0)
    assert 0.07 <= share <= 0.13, f"{share:.3f} of a CPU"
    assert after.nr_throttled > before.nr_throttled > 0
    assert after.cpu_throttled_s > 0


FORK_BOMB = "f() { while :; do f & done; }; f"


@needs_v1
def test_fork_bomb_is_contained_and_killed_quickly(make: Make, spawn: Spawn) -> None:
    cg = make(Limits.parse(pids=32))
    p = spawn(["/bin/sh", "-c", FORK_BOMB], cg, stderr=subprocess.DEVNULL)
    _wait_for(lambda: cg.stats().pids_limit_hits > 0, 10, "the pids limit to be hit")
    assert len(cg.pids()) <= 32
    victims = {p for p in map(ident, cg.pids()) if p is not None}
    t0 = time.monotonic()
    cg.kill()
    elapsed = time.monotonic() - t0
    assert elapsed < 2.0
    assert cg.pids() == set()
    assert p.wait(timeout=5) in (-signal.SIGKILL, 2)  # dash's top shell may exit on "Cannot fork"
    assert not survivors(victims)


DAEMONS = """
for i in 1 2 3 4 5; do sleep 1000 & done
setsid sh -c 'sleep 1000 & exec sleep 1000' </dev/null >/dev/null 2>&1 &
sleep 1000 &
moved=$!
for d in "$@"; do mkdir "$d/sub" && echo $moved > "$d/sub/cgroup.procs"; done
for d in "$@"; do [ -e "$d/sub/freezer.state" ] && echo FROZEN > "$d/sub/freezer.state"; done
for d in "$@"; do chmod 000 "$d/sub"/* && chmod 000 "$d/sub"; done
echo ready
exec sleep 1000
"""


@needs_v1
def test_kill_gets_daemons_and_frozen_chmodded_sub_cgroups(make: Make, spawn: Spawn) -> None:
    cg = make(Limits.parse(pids=64))
    p = spawn(["/bin/sh", "-c", DAEMONS, "sh", *cg.paths], cg, stdout=subprocess.PIPE)
    assert p.stdout is not None
    assert p.stdout.readline() == b"ready\n"
    victims = settled_pids(cg.pids, 9)
    assert len(victims) >= 9  # 5 sleeps + the daemon's 2 + the moved one + the main one
    sub = [f"{d}/sub" for d in cg.paths]
    assert all(os.stat(s).st_mode & 0o777 == 0 for s in sub)
    assert Path(sub[3], "freezer.state").read_text().strip() == "FROZEN"
    t0 = time.monotonic()
    cg.kill()
    assert time.monotonic() - t0 < 2.0
    assert cg.pids() == set()
    assert not survivors(victims)
    cg.remove()
    assert not any(os.path.exists(d) for d in cg.paths)
    cg.remove()  # idempotent


@needs_v1
def test_remove_kills_what_is_left(make: Make, spawn: Spawn) -> None:
    cg = make()
    p = spawn(["sleep", "1000"], cg)
    cg.remove()
    assert p.wait(timeout=5) == -signal.SIGKILL
    assert not any(os.path.exists(d) for d in cg.paths)


@needs_v1
def test_sweep_removes_dead_owners_only(backend: V1Backend, spawn: Spawn) -> None:
    ghost = subprocess.Popen(["sleep", "60"])
    dead = owner_tag(ghost.pid)
    ghost.kill()
    ghost.wait()
    live = owner_tag()  # this pytest process, with its real start time
    leaf = cgroup_leaf_name(new_container_id())
    dead_cg = backend.create(dead, leaf, Limits.parse(pids=8))
    leftover = spawn(["sleep", "1000"], dead_cg)  # a container process that outlived its owner
    live_cg = backend.create(live, leaf, Limits())
    foreign = f"{backend.controllers['pids']}/{PROJECT_CGROUP}/psbx-not-an-owner"
    os.mkdir(foreign)
    try:
        removed = backend.sweep()
        assert dead in removed
        assert live not in removed
        assert leftover.wait(timeout=5) == -signal.SIGKILL
        assert not any(os.path.exists(d) for d in dead_cg.paths)
        assert all(os.path.isdir(d) for d in live_cg.paths)
        assert os.path.isdir(foreign)
        assert dead not in backend.sweep()
    finally:
        os.rmdir(foreign)
        live_cg.remove()
        _drop_if_unused(backend.controllers.values(), live)
        backend.remove_owner(dead)
    assert not any(os.path.exists(d) for d in live_cg.paths)


def _drop_if_unused(mountpoints: Iterable[str], owner: str) -> None:
    """rmdir ``owner``'s group and the project parent where empty: this pytest process's own tag
    may also be in use by the project's runtime, so never ``remove_owner`` it from a test."""
    for mp in set(mountpoints):
        cgroup_fs.rmdir_quiet(f"{mp}/{PROJECT_CGROUP}/{owner}")
        cgroup_fs.rmdir_quiet(f"{mp}/{PROJECT_CGROUP}")


@needs_v1
def test_remove_owner_drops_the_project_parent_when_last(backend: V1Backend) -> None:
    helper = subprocess.Popen(["sleep", "60"])
    try:
        tag = owner_tag(helper.pid)
        backend.create(tag, cgroup_leaf_name(new_container_id()), Limits())
        backend.remove_owner(tag)
        backend.remove_owner(tag)  # idempotent
        for mp in set(backend.controllers.values()):
            project = f"{mp}/{PROJECT_CGROUP}"
            assert not os.path.exists(f"{project}/{tag}")
            # Gone unless another session (a concurrent pytest run) still has a group there.
            assert not os.path.isdir(project) or cgroup_fs.list_dirs(project)
    finally:
        helper.kill()
        helper.wait()


@needs_v1
def test_check_reports_a_read_only_hierarchy(tmp_path: Path) -> None:
    """A read-only cgroupfs (as inside an unprivileged container), in a private mount namespace."""
    code = (
        "import json, sys\n"
        "from pytest_sandbox.host.cgroups import detect\n"
        "from pytest_sandbox.core.limits import Limits\n"
        "b = detect(sys.argv[1])\n"
        "try:\n    b.check(Limits.parse(pids=4)); out = {'error': None}\n"
        "except OSError as e:\n    out = {'error': str(e), 'hint': e.hint}\n"
        "out['describe'] = b.describe(); print(json.dumps(out))\n"
    )
    script = (
        'mount -t tmpfs none "$1" && mkdir "$1/pids" && mount -t cgroup -o ro,pids cgroup "$1/pids" '
        '&& exec "$2" -c "$3" "$1"'
    )
    out = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", str(tmp_path),
         sys.executable, code],
        check=True, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    result = json.loads(out.stdout)
    assert "pids limit (pids=4)" in result["error"]
    assert f"mounted read-only at {tmp_path}/pids" in result["error"]
    assert "writable" in result["hint"]


@needs_v1
def test_detect_as_an_unprivileged_user_explains() -> None:
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            os.close(read_end)
            os.setgroups([])
            os.setresgid(65534, 65534, 65534)
            os.setresuid(65534, 65534, 65534)
            b = detect(ROOT)
            try:
                b.check(Limits.parse(memory="64m"))
                out = {"name": b.name, "error": ""}
            except CgroupUnavailableError as e:
                out = {"name": b.name, "error": str(e)}
            os.write(write_end, json.dumps(out).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        result = json.loads(f.read())
    os.waitpid(pid, 0)
    assert result["name"] == "none"
    assert "cannot apply the memory limit (memory=64m)" in result["error"]
    assert "uid 65534 may not create cgroups" in result["error"]
    assert "run pytest as root" in result["error"]


@needs_v1
def test_kill_without_a_freezer_still_ends_a_fork_bomb(make: Make, spawn: Spawn) -> None:
    """Hosts without the freezer hierarchy fall back to a plain SIGKILL loop."""
    cg = make(Limits.parse(pids=32))
    p = spawn(["/bin/sh", "-c", FORK_BOMB], cg, stderr=subprocess.DEVNULL)
    _wait_for(lambda: cg.stats().pids_limit_hits > 0, 10, "the pids limit to be hit")
    unfrozen = V1Cgroup(cg.name, {p.split("/")[-4]: p for p in cg.paths if "/freezer/" not in p})
    t0 = time.monotonic()
    unfrozen.kill()
    assert time.monotonic() - t0 < 2.0
    assert cg.pids() == set()
    p.wait(timeout=5)


@needs_v1
def test_chmod_000_sub_cgroups_are_taken_back_without_root(tmp_path: Path) -> None:
    """A delegated (non-root) owner must undo a container's chmod 000 to walk and remove its tree.

    Root bypasses permissions (CAP_DAC_OVERRIDE), so this drops to uid 65534 in a forked child and
    works on a plain directory tree shaped like a cgroup subtree.
    """
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="psbx-test-", dir="/tmp"))
    try:
        base.chmod(0o755)
        top = base / PROJECT_CGROUP / "leaf"
        (top / "sub" / "deeper").mkdir(parents=True)
        (top / "other").mkdir()
        for d in (base / PROJECT_CGROUP, top, top / "sub", top / "sub" / "deeper", top / "other"):
            os.chown(d, 65534, 65534)
        (top / "sub" / "deeper").chmod(0)
        (top / "sub").chmod(0)
        (top / "other").chmod(0)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            code = 1
            try:
                os.setgroups([])
                os.setresgid(65534, 65534, 65534)
                os.setresuid(65534, 65534, 65534)
                assert len(cgroup_fs.subtree(str(top))) == 4
                cgroup_fs.rmdir_tree(str(top), time.monotonic() + 5)
                code = 0
            finally:
                os._exit(code)
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
        assert not top.exists()
    finally:
        subprocess.run(["rm", "-rf", str(base)], check=True)
