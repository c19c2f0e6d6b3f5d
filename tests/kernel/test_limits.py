"""Resource limits end to end: real cgroups, real workloads, numbers read from the kernel.

Each test asks for a limit through the public API, runs something that pushes against it, and
checks what the kernel recorded (the container's own cgroup accounting), not what pytest_sandbox
believes it asked for.
"""

from __future__ import annotations

import errno
import time
from pathlib import Path

import pytest

from pytest_sandbox import CgroupUnavailableError, Container, Sandbox
from tests import probes
from tests.e2e_support import cgroup_paths_of, pid_ns, procs_in_pid_ns, wait_gone
from tests.probes import cgroup_backend_name

MiB = 1 << 20

# A spin loop in the shell: the seed's CPU demo.
SPIN = ["sh", "-c", "while :; do :; done"]

# Touches every page (b"x" * n writes n bytes), so the memory is really charged to the cgroup.
HOG = ["python3", "-c", "c = []\nfor i in range(200):\n    c.append(b'x' * (1 << 20))\nprint('survived')"]

# A real fork bomb: every process keeps forking; each reports the first failure it sees.  It
# ignores SIGTERM, so stopping it takes the SIGKILL path while it is still forking.
FORK_BOMB = [
    "python3",
    "-c",
    "import os, signal, time\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "reported = False\n"
    "while True:\n"
    "    try:\n"
    "        os.fork()\n"
    "    except OSError as e:\n"
    "        if not reported:\n"
    "            os.write(2, f'fork: {os.strerror(e.errno)} (errno {e.errno})\\n'.encode())\n"
    "            reported = True\n"
    "        time.sleep(0.01)\n",
]


@pytest.fixture(scope="module")
def backend() -> str:
    """The cgroup backend the launcher found; limit tests need a real one."""
    name = cgroup_backend_name()
    if name not in ("v1", "v2"):
        pytest.skip(f"no usable cgroup backend ({name}): limits cannot be tested here")
    return name


def _cpu_share(c: Container, seconds: float) -> float:
    """Fraction of one core ``c`` used over ``seconds`` of wall time, from its cgroup's CPU counter."""
    s0, t0 = c.stats(), time.monotonic()
    time.sleep(seconds)
    s1, t1 = c.stats(), time.monotonic()
    assert s0.cpu_usage_s is not None
    assert s1.cpu_usage_s is not None
    return (s1.cpu_usage_s - s0.cpu_usage_s) / (t1 - t0)


def test_cpu_quota_holds_a_spin_loop_at_a_tenth_of_a_core(sandbox: Sandbox, backend: str) -> None:
    """cpus=0.1: a busy loop gets 7-13 % of one core (cgroup CPU accounting), and is throttled."""
    c = sandbox.start(SPIN, cpus=0.1)
    time.sleep(0.3)  # let it start spinning and hit its first throttle
    share = _cpu_share(c, 2.0)
    print(f"cpus=0.1 spin loop: {share * 100:.2f} % of one core over 2 s")
    assert 0.07 <= share <= 0.13, f"cpus=0.1 gave {share * 100:.1f} % of a core"
    running = c.stats()
    assert running.nr_throttled > 0
    assert running.cpu_throttled_s > 0
    result = c.stop(timeout=2)
    assert result.cpu_throttled_s > 0, result
    assert result.cpu_usage_s is not None
    assert 0 < result.cpu_usage_s < 0.5, result


def test_unlimited_spin_loop_uses_a_whole_core(sandbox: Sandbox, backend: str) -> None:
    """Control for the quota test: without cpus= the same loop gets far more than 13 %, unthrottled."""
    c = sandbox.start(SPIN)
    time.sleep(0.1)
    share = _cpu_share(c, 0.5)
    print(f"unlimited spin loop: {share * 100:.2f} % of one core")
    assert share > 0.3, f"an unlimited spin loop got only {share * 100:.1f} % of a core"
    assert c.stats().nr_throttled == 0


def test_memory_hog_is_oom_killed_deterministically(sandbox: Sandbox, backend: str) -> None:
    """memory=64m: a 200 MiB hog is OOM-killed (signal 9, exit 137) with its peak at the limit."""
    limit = 64 * MiB
    r = sandbox.run(HOG, memory="64m", timeout=60)
    print(
        f"OOM: exit {r.exit_code} signal {r.signal} peak {r.memory_peak} "
        f"({(r.memory_peak or 0) / limit:.3f} x limit)"
    )
    assert r.oom_killed, r
    assert r.signal == 9, r
    assert r.exit_code == 137, r
    assert b"survived" not in r.stdout
    assert r.memory_peak is not None
    # BenchExec's bar: the measured peak is within 5 % of the limit (and never above it).
    assert 0.95 * limit <= r.memory_peak <= limit, r.memory_peak
    with pytest.raises(AssertionError, match="OOM-killed"):
        r.check()


def test_normal_command_under_the_same_limit_is_not_oom(sandbox: Sandbox, backend: str) -> None:
    """The same memory=64m settings with a small workload: exit 0 and oom_killed False."""
    r = sandbox.run(["python3", "-c", "x = b'x' * (8 << 20); print(len(x))"], memory="64m", timeout=60)
    assert r.exit_code == 0, r
    assert r.signal is None
    assert not r.oom_killed
    assert r.stdout == b"8388608\n"
    assert r.memory_peak is not None
    assert 8 * MiB <= r.memory_peak < 64 * MiB


def test_exec_hog_is_oom_killed_and_the_container_survives(sandbox: Sandbox, backend: str) -> None:
    """An exec'd hog is the OOM victim (reported on the exec's result); the main process lives on."""
    c = sandbox.start(["sleep", "1000"], memory="64m")
    r = c.exec(HOG, timeout=60)
    assert r.oom_killed, r
    assert r.signal == 9, r
    assert r.exit_code == 137, r
    assert c.running
    assert c.exec(["true"]).exit_code == 0
    assert c.stats().oom_kills >= 1


def test_swap_is_off_by_default_so_oom_does_not_depend_on_the_host(sandbox: Sandbox, backend: str) -> None:
    """memory= without memory_swap= caps memory+swap at the same value (no swap for the container)."""
    c = sandbox.start(["sleep", "1000"], memory="64m")
    limits = c.cgroup_limits()
    if backend == "v1":
        assert limits["memory.limit_in_bytes"] == str(64 * MiB)
        if "memory.memsw.limit_in_bytes" in limits:
            assert limits["memory.memsw.limit_in_bytes"] == str(64 * MiB)
        else:  # no swap accounting: swappiness 0 is the guarantee (memory.rst 5.3)
            assert limits["memory.swappiness"] == "0"
    else:
        assert limits["memory.max"] == str(64 * MiB)
        assert limits["memory.swap.max"] == "0"


def test_fork_bomb_hits_the_pids_limit_and_stays_stoppable(sandbox: Sandbox, backend: str) -> None:
    """pids=32: a fork bomb gets EAGAIN, never exceeds 32 tasks, is counted, and stops fast."""
    c = sandbox.start(FORK_BOMB, pids=32, cpus=0.5)
    c.wait_for_log(b"Resource temporarily unavailable", timeout=20)
    assert f"errno {errno.EAGAIN}".encode() in c.logs("stderr")
    ns = pid_ns(c.pid)
    assert ns is not None
    bomb = procs_in_pid_ns(ns)
    assert 16 < len(bomb) <= 32, f"{len(bomb)} processes in the container with pids=32"
    assert c.stats().pids_limit_hits > 0
    t0 = time.monotonic()
    result = c.stop(timeout=0.5)  # SIGTERM is ignored: SIGKILL after 0.5 s
    sandbox.close()
    stop_s = time.monotonic() - t0
    left, _ = wait_gone(bomb, 2.0)
    print(f"fork bomb: {len(bomb)} tasks at the limit; stop+remove took {stop_s:.3f} s")
    assert not left, f"fork bomb processes survived teardown: {sorted(left)}"
    assert stop_s < 3.0, f"stopping a fork bomb took {stop_s:.2f} s"
    assert result.signal == 9, result
    assert result.pids_limit_hit, result


def test_limits_read_back_from_the_cgroup_files(sandbox: Sandbox, backend: str) -> None:
    """Every limit asked for is what the kernel's files say, via the API and read directly."""
    c = sandbox.start(["sleep", "1000"], memory="64m", cpus=0.5, pids=32, cpu_shares=512, cpuset="0")
    limits = c.cgroup_limits()
    if backend == "v1":
        expected = {
            "memory.limit_in_bytes": "67108864",
            "memory.memsw.limit_in_bytes": "67108864",
            "cpu.cfs_quota_us": "50000",
            "cpu.cfs_period_us": "100000",
            "pids.max": "32",
            "cpu.shares": "512",
            "cpuset.cpus": "0",
        }
        if "memory.memsw.limit_in_bytes" not in limits:
            del expected["memory.memsw.limit_in_bytes"]
    else:
        from pytest_sandbox.host.cgroups import shares_to_weight

        expected = {
            "memory.max": "67108864",
            "memory.swap.max": "0",
            "cpu.max": "50000 100000",
            "pids.max": "32",
            "cpu.weight": str(shares_to_weight(512)),
            "cpuset.cpus": "0",
        }
    assert {k: limits.get(k) for k in expected} == expected
    # The same values straight from the cgroup directories the container's process is in.
    direct: dict[str, str] = {}
    for path in cgroup_paths_of(c.pid):
        for name in expected:
            f = Path(path) / name
            if f.exists():
                direct[name] = f.read_text().strip()
    assert direct == expected


def test_container_without_limits_still_reports_accounting(sandbox: Sandbox, backend: str) -> None:
    """No limits asked: the result still carries peak memory and CPU time from the cgroup."""
    r = sandbox.run(
        ["python3", "-c", "x = b'x' * (32 << 20)\nn = 0\nfor i in range(2000000):\n    n += i\nprint(n > 0)"],
        timeout=60,
    )
    assert r.exit_code == 0, r
    assert r.stdout == b"True\n"
    assert r.memory_peak is not None
    assert r.memory_peak >= 32 * MiB, r.memory_peak
    assert r.cpu_usage_s is not None
    assert r.cpu_usage_s > 0.02, r.cpu_usage_s
    assert not r.oom_killed
    assert not r.pids_limit_hit
    assert r.cpu_throttled_s == 0


def test_limit_without_a_controller_is_an_error_never_a_silent_unlimited_run(tmp_path: Path) -> None:
    """cgroup root without cgroups: memory= raises CgroupUnavailableError naming the controller and
    a fix, and the command never runs; a container without limits still works there."""
    nocg = tmp_path / "not-a-cgroup-fs"
    nocg.mkdir()
    shared = tmp_path / "shared"
    shared.mkdir()
    rt = probes.new_runtime(cgroup_root=str(nocg), state_dir=str(tmp_path / "state"))
    try:
        with Sandbox(runtime=rt) as sb:
            assert rt.info().cgroup == "none"
            with pytest.raises(CgroupUnavailableError, match="memory") as info:
                sb.run(["touch", "/shared/ran"], memory="64m", mounts={str(shared): "/shared"})
            assert info.value.hint
            assert not (shared / "ran").exists(), "the command ran without its memory limit"
            with pytest.raises(CgroupUnavailableError, match="pids"):
                sb.run(["touch", "/shared/ran"], pids=10, mounts={str(shared): "/shared"})
            assert not (shared / "ran").exists()
            r = sb.run(["touch", "/shared/ran"], mounts={str(shared): "/shared"})
            assert r.exit_code == 0
            assert (shared / "ran").exists()
    finally:
        rt.close()
