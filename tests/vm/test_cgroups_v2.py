"""cgroup v2 backend on a real unified hierarchy (a small subset: it runs in an emulated VM).

Run it from the host with .ci/vm-tests, which boots such a VM; on any host that is not
pure cgroup v2 with root, every test here skips.  Workloads are plain processes forked here.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pytest_sandbox.core.errors import CgroupUnavailableError
from pytest_sandbox.core.limits import Limits
from pytest_sandbox.core.naming import PROJECT_CGROUP, cgroup_leaf_name, new_container_id, owner_tag
from pytest_sandbox.host.cgroups import NoneBackend, V2Backend, V2Cgroup, detect
from tests.e2e_support import Spawn, live_owner, settled_pids, survivors
from tests.probes import cgroup_fs

ROOT = "/sys/fs/cgroup"
MiB = 1 << 20


def _host_backend() -> V2Backend | None:
    if os.geteuid() != 0:
        return None
    backend = detect(ROOT)
    return backend if isinstance(backend, V2Backend) else None


pytestmark = pytest.mark.skipif(_host_backend() is None, reason="needs root on a pure cgroup v2 host")


@pytest.fixture(scope="module")
def backend() -> V2Backend:
    b = _host_backend()
    assert b is not None
    return b


@pytest.fixture(scope="module")
def owner(backend: V2Backend) -> Iterator[str]:
    with live_owner(backend.remove_owner) as tag:
        yield tag
    assert not os.path.exists(f"{backend.project}/{tag}")


Make = Callable[..., V2Cgroup]


@pytest.fixture
def make(backend: V2Backend, owner: str) -> Iterator[Make]:
    made: list[V2Cgroup] = []

    def _make(limits: Limits | None = None) -> V2Cgroup:
        cg = backend.create(owner, cgroup_leaf_name(new_container_id()), limits or Limits())
        assert isinstance(cg, V2Cgroup)
        made.append(cg)
        return cg

    yield _make
    for cg in made:
        cg.remove()
        assert not os.path.exists(cg.path)


def test_limits_read_back(make: Make) -> None:
    cg = make(Limits.parse(memory="64m", cpus=0.5, cpu_shares=512, cpuset="0", pids=32))
    assert cg.path.split("/")[-3] == PROJECT_CGROUP
    assert cg.read_limits() == {
        "memory.max": str(64 * MiB),
        "memory.swap.max": "0",  # swap off by default
        "memory.oom.group": "0",  # only the victim dies; the container's init reports it
        "cpu.max": "50000 100000",
        "cpu.weight": "20",
        "cpuset.cpus": "0",
        "pids.max": "32",
    }
    assert make(Limits.parse(memory="64m", memory_swap="128m")).read_limits()["memory.swap.max"] == str(
        64 * MiB
    )
    assert make(Limits.parse(memory="64m", memory_swap=-1)).read_limits()["memory.swap.max"] == "max"


def test_memory_hog_is_oom_killed_and_counted(make: Make, spawn: Spawn) -> None:
    cg = make(Limits.parse(memory="64m"))
    p = spawn([sys.executable, "-S", "-c", "b = b'x' * (200 << 20)"], cg)
    assert p.wait(timeout=120) == -signal.SIGKILL
    stats = cg.stats()
    assert stats.oom_kills >= 1
    assert stats.memory_peak is not None  # memory.peak: Linux 5.19+
    assert 0.95 * 64 * MiB <= stats.memory_peak <= 64 * MiB


def test_cpu_quota_is_enforced(make: Make, spawn: Spawn) -> None:
    cg = make(Limits.parse(cpus=0.1))
    spawn(["/bin/sh", "-c", "while :; do :; done"], cg)
    time.sleep(0.3)
    before, t0 = cg.stats(), time.monotonic()
    time.sleep(2.0)
    after, t1 = cg.stats(), time.monotonic()
    assert before.cpu_usage_s is not None
    assert after.cpu_usage_s is not None
    share = (after.cpu_usage_s - before.cpu_usage_s) / (t1 - t0)
    assert 0.07 <= share <= 0.13, f"{share:.3f} of a CPU"
    assert after.nr_throttled > 0
    assert after.cpu_throttled_s > 0


def fork_bomb(make: Make, spawn: Spawn) -> V2Cgroup:
    """A group under pids=32 with a fork bomb in it, once the bomb has hit the limit."""
    cg = make(Limits.parse(pids=32))
    spawn(["/bin/sh", "-c", "f() { while :; do f & done; }; f"], cg)
    deadline = time.monotonic() + 60
    while cg.stats().pids_limit_hits == 0:
        assert time.monotonic() < deadline, "the pids limit was never hit"
        time.sleep(0.05)
    return cg


def test_fork_bomb_is_contained_and_killed(make: Make, spawn: Spawn) -> None:
    cg = fork_bomb(make, spawn)
    assert len(cg.pids()) <= 32
    t0 = time.monotonic()
    cg.kill()
    assert time.monotonic() - t0 < 2.0
    assert cg.pids() == set()


DAEMONS = """
for i in 1 2 3 4 5; do sleep 1000 & done
setsid sh -c 'sleep 1000 & exec sleep 1000' </dev/null >/dev/null 2>&1 &
sleep 1000 &
moved=$!
mkdir "$1/sub" && echo $moved > "$1/sub/cgroup.procs" && echo 1 > "$1/sub/cgroup.freeze"
chmod 000 "$1/sub"/* && chmod 000 "$1/sub"
echo ready
exec sleep 1000
"""


def test_kill_gets_daemons_and_a_frozen_chmodded_sub_cgroup(make: Make, spawn: Spawn) -> None:
    cg = make(Limits.parse(memory="64m", pids=64))
    p = spawn(["/bin/sh", "-c", DAEMONS, "sh", cg.path], cg, stdout=subprocess.PIPE)
    assert p.stdout is not None
    assert p.stdout.readline() == b"ready\n"
    victims = settled_pids(cg.pids, 9)
    assert len(victims) >= 9
    assert os.stat(cg.path + "/sub").st_mode & 0o777 == 0
    t0 = time.monotonic()
    cg.kill()
    assert time.monotonic() - t0 < 2.0
    assert not survivors(victims)
    cg.remove()
    assert not os.path.exists(cg.path)


def test_sweep_removes_dead_owners_only(backend: V2Backend, spawn: Spawn) -> None:
    ghost = subprocess.Popen(["sleep", "60"])
    dead = owner_tag(ghost.pid)
    ghost.kill()
    ghost.wait()
    live = owner_tag()
    dead_cg = backend.create(dead, cgroup_leaf_name(new_container_id()), Limits())
    assert isinstance(dead_cg, V2Cgroup)
    leftover = spawn(["sleep", "1000"], dead_cg)
    live_cg = backend.create(live, cgroup_leaf_name(new_container_id()), Limits())
    try:
        removed = backend.sweep()
        assert dead in removed
        assert live not in removed
        assert leftover.wait(timeout=10) == -signal.SIGKILL
        assert not os.path.exists(f"{backend.project}/{dead}")
        assert os.path.isdir(live_cg.paths[0])
    finally:
        live_cg.remove()
        # This process's own tag may also be the project runtime's: never remove_owner() it here.
        cgroup_fs.rmdir_quiet(f"{backend.project}/{live}")
        cgroup_fs.rmdir_quiet(backend.project)
        backend.remove_owner(dead)


def test_undelegated_root_is_an_error_naming_the_controller(make: Make, tmp_path: Path) -> None:
    leaf = make()  # its subtree_control is empty: nothing is delegated below it
    undelegated = V2Backend(leaf.path)
    with pytest.raises(CgroupUnavailableError) as info:
        undelegated.check(Limits.parse(memory="64m"))
    assert "memory limit (memory=64m)" in str(info.value)
    assert "not enabled for children" in str(info.value)
    assert f"echo +memory > {leaf.path}/cgroup.subtree_control" in info.value.hint
    os.mkdir(leaf.path + "/sub")  # removed with the leaf; sees no controller at all
    with pytest.raises(CgroupUnavailableError, match="pids controller is not available"):
        V2Backend(leaf.path + "/sub").check(Limits.parse(pids=8))
    none = detect(str(tmp_path))
    assert isinstance(none, NoneBackend)
    with pytest.raises(CgroupUnavailableError, match="no cgroup filesystem is mounted"):
        none.check(Limits.parse(pids=8))


def test_kill_without_cgroup_kill_freezes_and_loops(
    make: Make, spawn: Spawn, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Kernels before 5.14 have no cgroup.kill: freeze + SIGKILL loop must end a fork bomb too."""
    real_write = cgroup_fs.write

    def old_kernel_write(path: str, value: str) -> None:
        if path.endswith("/cgroup.kill"):
            raise FileNotFoundError(2, "No such file or directory (simulated Linux < 5.14)", path)
        real_write(path, value)

    cg = fork_bomb(make, spawn)
    monkeypatch.setattr(cgroup_fs, "write", old_kernel_write)
    t0 = time.monotonic()
    cg.kill()
    assert time.monotonic() - t0 < 2.0
    assert cg.pids() == set()
    assert Path(cg.path, "cgroup.freeze").read_text().strip() == "0"  # thawed again
