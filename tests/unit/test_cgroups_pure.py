"""cgroup helpers that need no cgroup: mountinfo parsing, classify, names, the write guard, and
the backends' checks on fake hierarchies (directories in tmp_path).  The kernel side is in
tests/kernel/test_cgroups_v1.py and tests/vm/test_cgroups_v2.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_sandbox.core.errors import CgroupUnavailableError
from pytest_sandbox.core.limits import Limits
from pytest_sandbox.core.naming import cgroup_leaf_name, new_container_id
from pytest_sandbox.host.cgroups import (
    CgroupStats,
    Mount,
    NoneBackend,
    NullCgroup,
    V1Backend,
    classify,
    detect,
    parse_mountinfo,
    shares_to_weight,
)
from tests.probes import cgroup_fs, check_leaf, check_owner, requested

ROOT = "/sys/fs/cgroup"  # a path the parsed mountinfo texts below use; never touched

HYBRID = """\
25 30 0:23 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids ro,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
77 60 0:50 / /mnt/with\\040space rw - tmpfs tmpfs rw
"""


PURE_V2 = """\
25 30 0:23 / /sys rw,nosuid - sysfs sysfs rw
31 25 0:28 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate
"""


def test_parse_mountinfo_reads_controllers_options_and_escapes() -> None:
    mounts = {m.mountpoint: m for m in parse_mountinfo(HYBRID)}
    assert mounts["/sys/fs/cgroup/cpu,cpuacct"].controllers == {"cpu", "cpuacct"}
    assert mounts["/sys/fs/cgroup/systemd"].controllers == frozenset()  # named, no controller
    assert mounts["/sys/fs/cgroup/unified"].controllers == frozenset()
    assert mounts["/sys/fs/cgroup/pids"].readonly
    assert not mounts["/sys/fs/cgroup/memory"].readonly
    assert "/mnt/with space" in mounts


def test_parse_mountinfo_keeps_the_top_mount_and_skips_garbage() -> None:
    text = HYBRID + "99 31 0:60 / /sys/fs/cgroup/memory rw - tmpfs tmpfs rw\nnot a mountinfo line\n"
    mounts = {m.mountpoint: m for m in parse_mountinfo(text)}
    assert mounts["/sys/fs/cgroup/memory"].fstype == "tmpfs"


def test_classify_hybrid_is_v1_even_with_unified_mounted() -> None:
    assert classify(parse_mountinfo(HYBRID), ROOT) == ("v1", ROOT)


def test_classify_pure_v2_and_delegated_subdirectory() -> None:
    mounts = parse_mountinfo(PURE_V2)
    assert classify(mounts, ROOT) == ("v2", ROOT)
    assert classify(mounts, ROOT + "/user.slice/app") == ("v2", ROOT + "/user.slice/app")


def test_classify_nothing_mounted_explains() -> None:
    kind, reason = classify(parse_mountinfo(HYBRID), "/mnt/with space")
    assert kind == "none"
    assert "no cgroup filesystem is mounted at /mnt/with space" in reason
    assert "tmpfs" in reason


def test_classify_only_unified_below_root_is_v2() -> None:
    text = (
        "31 23 0:28 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n"
        "41 31 0:38 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n"
    )
    assert classify(parse_mountinfo(text), ROOT) == ("v2", ROOT + "/unified")


@pytest.mark.parametrize(("shares", "weight"), [(2, 1), (1024, 39), (512, 20), (262144, 10000), (100, 4)])
def test_shares_to_weight_matches_runc(shares: int, weight: int) -> None:
    assert shares_to_weight(shares) == weight


def test_parse_kv_and_swaps() -> None:
    assert cgroup_fs.parse_kv("oom_kill_disable 0\nunder_oom 0\noom_kill 3\nbogus\nx y\n") == {
        "oom_kill_disable": 0,
        "under_oom": 0,
        "oom_kill": 3,
    }
    header = "Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n"
    assert not cgroup_fs.swap_active(header)
    assert cgroup_fs.swap_active(header + "/swapfile  file  1048572  0  -2\n")


def test_names_are_checked() -> None:
    check_owner("psbx-12-345")
    check_leaf(cgroup_leaf_name(new_container_id()))
    for bad_owner in ("process_api", "psbx-12", "../psbx-1-2", ""):
        with pytest.raises(ValueError, match="owner tag"):
            check_owner(bad_owner)
    for bad_leaf in ("..", "psbx-a/b", "leaf", "psbx-"):
        with pytest.raises(ValueError, match="leaf name"):
            check_leaf(bad_leaf)


def test_requested_quotes_the_users_words() -> None:
    limits = Limits.parse(memory="64m", memory_swap="128m", cpus=0.5, cpu_shares=512, pids=32)
    assert requested(limits, "memory") == "memory=64m, memory_swap=128m"
    assert requested(limits, "cpu") == "cpus=0.5, cpu_shares=512"
    assert requested(limits, "pids") == "pids=32"


def test_write_guard_refuses_paths_outside_the_project(tmp_path: Path) -> None:
    target = tmp_path / "process_api" / "cgroup.procs"
    target.parent.mkdir()
    target.write_text("")
    with pytest.raises(PermissionError, match="refusing") as info:
        cgroup_fs.write(str(target), "1")
    assert info.value.filename == str(target)
    assert target.read_text() == ""
    with pytest.raises(PermissionError):
        cgroup_fs.mkdir(str(tmp_path / "psbx-x"))


def test_none_backend_explains_and_is_a_no_op() -> None:
    backend = NoneBackend("no cgroup filesystem is mounted at /x", "mount it")
    backend.check(Limits())
    cg = backend.create("psbx-1-2", "psbx-c-000000000000", Limits())
    assert isinstance(cg, NullCgroup)
    assert cg.paths == []
    assert cg.stats() == CgroupStats()
    assert cg.stats().cpu_usage_s is None
    assert cg.pids() == set()
    cg.attach(0)
    cg.kill()
    cg.remove()
    assert backend.sweep() == []
    with pytest.raises(CgroupUnavailableError) as info:
        backend.create("psbx-1-2", "psbx-c-000000000000", Limits.parse(memory="64m", pids=32))
    err = info.value
    assert isinstance(err, OSError)
    assert "memory and pids limits (memory=64m, pids=32)" in str(err)
    assert "no cgroup filesystem is mounted at /x" in str(err)
    assert err.hint == "mount it"
    assert "none (no cgroup filesystem" in backend.describe()


def test_v1_backend_on_an_empty_directory_refuses_limits(tmp_path: Path) -> None:
    backend = V1Backend(str(tmp_path), mounts=[])
    assert not backend.usable()
    backend.check(Limits())  # no limit asked: nothing to refuse
    for limits, ctrl in [
        (Limits.parse(memory="64m"), "memory"),
        (Limits.parse(pids=32), "pids"),
        (Limits.parse(cpus=0.5), "cpu"),
        (Limits.parse(cpuset="0"), "cpuset"),
    ]:
        with pytest.raises(CgroupUnavailableError) as info:
            backend.create("psbx-1-2", "psbx-c-000000000000", limits)
        assert f"cannot apply the {ctrl} limit" in str(info.value)
        assert f"no cgroup v1 hierarchy with the {ctrl} controller is mounted under {tmp_path}" in str(
            info.value
        )
        assert f"mount -t cgroup -o {ctrl}" in info.value.hint
    assert list(tmp_path.iterdir()) == []  # nothing was created


def test_detect_on_an_empty_directory_is_none(tmp_path: Path) -> None:
    backend = detect(str(tmp_path))
    assert isinstance(backend, NoneBackend)
    with pytest.raises(CgroupUnavailableError, match=r"memory limit \(memory=64m\).*no cgroup filesystem"):
        backend.check(Limits.parse(memory="64m"))


def test_v1_backend_finds_co_mounted_and_read_only_hierarchies(tmp_path: Path) -> None:
    for d in ("cpu,cpuacct", "memory", "pids"):
        (tmp_path / d).mkdir()
    text = HYBRID.replace("/sys/fs/cgroup", str(tmp_path))
    backend = V1Backend(str(tmp_path), mounts=parse_mountinfo(text), swap_active=False)
    assert backend.controllers == {
        "cpu": f"{tmp_path}/cpu,cpuacct",
        "cpuacct": f"{tmp_path}/cpu,cpuacct",
        "memory": f"{tmp_path}/memory",
    }
    backend.check(Limits.parse(memory="64m", cpus=0.5))
    with pytest.raises(CgroupUnavailableError, match=f"read-only at {tmp_path}/pids"):
        backend.check(Limits.parse(pids=8))
    assert backend.describe().startswith("cgroup v1 (memory cpuacct cpu;")


def test_v1_swap_limit_without_swap_accounting(tmp_path: Path) -> None:
    """memory_swap needs memsw when the host swaps; without swap the limit still holds."""
    (tmp_path / "memory").mkdir()  # a fake hierarchy without memory.memsw.* files
    mount = Mount(
        mountpoint=str(tmp_path / "memory"),
        fs_root="/",
        fstype="cgroup",
        options=frozenset({"rw"}),
        super_options=frozenset({"rw", "memory"}),
    )
    swapping = V1Backend(str(tmp_path), mounts=[mount], swap_active=True)
    swapping.check(Limits.parse(memory="64m"))  # swap off: memory.swappiness=0 guarantees it
    swapping.check(Limits.parse(memory="64m", memory_swap=-1))
    with pytest.raises(CgroupUnavailableError, match=r"memory limit.*memory_swap=128m") as info:
        swapping.check(Limits.parse(memory="64m", memory_swap="128m"))
    assert "swapaccount=1" in info.value.hint
    V1Backend(str(tmp_path), mounts=[mount], swap_active=False).check(
        Limits.parse(memory="64m", memory_swap="128m")
    )
