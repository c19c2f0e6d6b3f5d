"""Whole containers on a pure cgroup v2 kernel: limits applied, visible inside, and enforced.

The backend tests next to this file drive the v2 backend directly; these go through the public
API (launcher, spare first process, cgroup namespace), as a user's test does.  They run in the
VM that ``.ci/vm-tests`` boots (Python is 10-30x slower there: few, cheap containers).
"""

from __future__ import annotations

import time
import urllib.request

from pytest_sandbox import Image, Sandbox


def test_limits_are_written_and_visible_inside(sandbox: Sandbox, busybox_image: Image) -> None:
    """memory.max, memory.swap.max (no swap), cpu.max and pids.max, read on the host and inside."""
    c = sandbox.start(["sleep", "60"], image=busybox_image, memory="40m", cpus=0.5, pids=32)
    files = c.cgroup_limits()
    assert files["memory.max"] == str(40 << 20)
    assert files["memory.swap.max"] == "0"
    assert files["cpu.max"] == "50000 100000"
    assert files["pids.max"] == "32"
    inside = c.exec(["cat", "/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/cpu.max", "/sys/fs/cgroup/pids.max"])
    assert inside.stdout.split(b"\n")[:4] == [str(40 << 20).encode(), b"50000 100000", b"32", b""]
    assert c.exec(["cat", "/proc/self/cgroup"]).stdout == b"0::/\n"  # its own cgroup namespace
    c.stop(timeout=1)


def test_memory_hog_is_oom_killed(sandbox: Sandbox, busybox_image: Image) -> None:
    """A process needing more than memory.max is killed by the kernel and the result says so."""
    hog = "head -c 200m /dev/zero | tail > /dev/null"
    r = sandbox.run(["sh", "-c", hog], image=busybox_image, memory="32m")
    assert r.oom_killed
    assert r.exit_code != 0
    assert r.memory_peak is None or r.memory_peak <= 32 << 20


def test_fork_bomb_hits_pids_max(sandbox: Sandbox, busybox_image: Image) -> None:
    """A fork bomb under pids=16 gets EAGAIN, pids.events counts it, and the container still stops."""
    bomb = "i=0; while [ $i -lt 40 ]; do sleep 30 & i=$((i+1)); done; wait"
    c = sandbox.start(["sh", "-c", bomb], image=busybox_image, pids=16)
    deadline = time.monotonic() + 60
    while not c.stats().pids_limit_hits and time.monotonic() < deadline:
        time.sleep(0.2)
    assert c.stats().pids_limit_hits > 0
    result = c.stop(timeout=1)
    assert result.pids_limit_hit


def test_cpu_quota_is_enforced(sandbox: Sandbox, busybox_image: Image) -> None:
    """cpus=0.1 holds a busy loop near a tenth of a CPU, by the cgroup's own accounting."""
    c = sandbox.start(["sh", "-c", "while :; do :; done"], image=busybox_image, cpus=0.1)
    time.sleep(0.5)
    before, t0 = c.stats().cpu_usage_s, time.monotonic()
    time.sleep(3.0)
    after, t1 = c.stats().cpu_usage_s, time.monotonic()
    assert before is not None
    assert after is not None
    assert 0.07 <= (after - before) / (t1 - t0) <= 0.13
    assert c.stop(timeout=1).cpu_throttled_s > 0


def test_private_network_on_this_kernel(sandbox: Sandbox, busybox_image: Image) -> None:
    """Networks on Debian's 6.1 kernel too: a veth made inside a prepared namespace, joined by the
    container's first process, /sys for it, a bridge between two containers, a published port."""
    net = sandbox.network()
    web = sandbox.start(["httpd", "-f", "-p", "80", "-h", "/etc"], image=busybox_image, network=net)
    assert sorted(web.exec(["ls", "/sys/class/net"]).stdout.split()) == [b"eth0", b"lo"]
    web.wait_for_port(80, timeout=60)
    r = sandbox.run(["wget", "-q", "-O", "-", f"http://{web.ip()}/passwd"], image=busybox_image, network=net)
    assert r.stdout.startswith(b"root:"), r
    host, port = web.address(80)
    with urllib.request.urlopen(f"http://{host}:{port}/group", timeout=30) as response:
        assert response.read().startswith(b"root:")
    other = sandbox.run(
        ["wget", "-q", "-T", "2", "-O", "-", f"http://{web.ip()}/passwd"],
        image=busybox_image,
        network=sandbox.network(),
    )
    assert other.exit_code != 0  # another network: no route
