"""The default bounds of a container (issue 9, item 4): pids, and a writable area of its own.

A container that sets nothing gets podman's pids limit (2048), and its writable layer, /tmp and each
tmpfs= mount without a size share one tmpfs of ``sandbox_writable_size`` bytes (one inode per
8 KiB), mounted only in its own mount namespace and charged to its memory cgroup.  Filling it is
ENOSPC inside; the host's /dev/shm (the state directory, as large as RAM) does not grow.  Every
number is the kernel's.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pytest_sandbox import Image, Sandbox
from pytest_sandbox.config import DEFAULT_PIDS_LIMIT, DEFAULT_WRITABLE_SIZE
from pytest_sandbox.core.limits import writable_inodes
from tests import probes
from tests.e2e_support import cgroup_paths_of

MiB = 1 << 20
SLEEP = ["sleep", "60"]

# Fills a directory with empty files until the kernel refuses; prints "<files made> <errno>".
FILL_INODES = (
    "import os, sys\n"
    "d = sys.argv[1]\n"
    "os.makedirs(d, exist_ok=True)\n"
    "n = 0\n"
    "try:\n"
    "    while True:\n"
    "        os.close(os.open(f'{d}/{n}', os.O_CREAT | os.O_WRONLY, 0o644))\n"
    "        n += 1\n"
    "except OSError as e:\n"
    "    print(n, e.errno)\n"
)


def _shm_used(path: str) -> int:
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def _host_mounts() -> str:
    with open("/proc/self/mountinfo") as f:
        return f.read()


def test_a_default_container_gets_enospc_past_its_writable_size_and_host_shm_does_not_grow(
    sandbox: Sandbox, busybox_image: Image
) -> None:
    """Item 4: 1 GiB written by a default container used to land in host /dev/shm.  Now its root
    and /tmp report sandbox_writable_size (1 GiB) as their size, writing past it is ENOSPC, and the
    state directory's filesystem grows by none of it.  The tmpfs is no mount of the host's."""
    state = probes.state_dir()
    c = sandbox.start(SLEEP, image=busybox_image)
    before = _shm_used(state)
    mb = DEFAULT_WRITABLE_SIZE // MiB
    r = c.exec(
        [
            "sh",
            "-c",
            "df -k / /tmp | tail -n 2;"
            f"dd if=/dev/zero of=/big bs=1M count={mb + 16} 2>&1; echo dd=$?;"
            f"dd if=/dev/zero of=/tmp/big bs=1M count={mb + 16} 2>&1; echo dd=$?;"
            "ls -l /big /tmp/big",
        ]
    )
    out = r.stdout.decode()
    sizes = [int(line.split()[1]) * 1024 for line in out.splitlines()[:2]]
    assert sizes == [DEFAULT_WRITABLE_SIZE, DEFAULT_WRITABLE_SIZE], out
    assert out.count("No space left on device") == 2, out
    assert out.count("dd=1") == 2, out
    assert _shm_used(state) - before < 64 * MiB, "what the container wrote landed in the state dir"
    assert "psbx-writable" not in _host_mounts()  # `mount | grep psbx` stays empty
    big = Path(probes.upper_dir(c), "big")  # the host reaches it through the launcher's fd
    assert DEFAULT_WRITABLE_SIZE - 16 * MiB < big.stat().st_size <= DEFAULT_WRITABLE_SIZE


def test_a_default_container_gets_enospc_past_its_writable_inodes(sandbox: Sandbox) -> None:
    """Item 4: 200k files used to take 200k of the host /dev/shm's inodes.  Now the writable layer
    has writable_inodes(1 GiB) = 131072 of its own (its root shows them), and the next file fails
    with ENOSPC."""
    inodes = writable_inodes(DEFAULT_WRITABLE_SIZE)
    assert inodes == 131072
    r = sandbox.run(
        ["sh", "-c", 'df -i / | tail -n 1; python3 -c "$0" /many', FILL_INODES],
        timeout=120,
    )
    assert r.exit_code == 0, r.stderr
    df, result = r.stdout.decode().splitlines()
    assert int(df.split()[1]) == inodes, df
    made, err = map(int, result.split())
    assert err == 28, result  # ENOSPC
    assert inodes - 200 < made < inodes, result  # the image's /etc files and mount points use a few


def test_the_default_pids_limit_is_2048_and_the_caller_or_the_setting_wins(
    sandbox: Sandbox, busybox_image: Image, tmp_path: Path
) -> None:
    """Item 4: no default pids limit before.  Now the kernel's pids.max of a container that sets
    none is 2048 (podman's default); pids= and a marker's default win; -1 lifts it, and so does
    ini sandbox_pids_limit = -1; cgroup=False still runs, with no cgroup at all."""
    if probes.cgroup_backend_name() == "none":
        pytest.skip("no cgroup backend on this host")
    assert DEFAULT_PIDS_LIMIT == 2048

    def pids_max(sb: Sandbox, **options: object) -> str:
        c = sb.start(SLEEP, image=busybox_image, **options)
        try:
            paths = [p for p in cgroup_paths_of(c.pid) if os.path.exists(os.path.join(p, "pids.max"))]
            assert paths, cgroup_paths_of(c.pid)
            return Path(paths[0], "pids.max").read_text().strip()
        finally:
            c.remove()

    assert pids_max(sandbox) == "2048"
    assert pids_max(sandbox, pids=64) == "64"
    assert pids_max(sandbox, pids=-1) == "max"
    with Sandbox(defaults={"pids": 100}) as marked:
        assert pids_max(marked) == "100"
    rt = probes.new_runtime(pids_limit=None, state_dir=str(tmp_path / "state"))  # its own: close() removes it
    try:
        with Sandbox(runtime=rt) as lifted:
            assert pids_max(lifted) == "max"
    finally:
        rt.close()
    assert sandbox.run(["true"], image=busybox_image, cgroup=False).exit_code == 0


def test_the_writable_area_is_charged_to_the_containers_memory_cgroup(
    sandbox: Sandbox, busybox_image: Image
) -> None:
    """Item 4: with memory= set, the writable layer and /tmp are bounded by it, and what they hold
    counts in the container's memory cgroup (tmpfs pages are charged to the writer's memcg): the
    kernel's memory.stat shows it as shmem."""
    if probes.cgroup_backend_name() == "none":
        pytest.skip("no cgroup backend on this host")
    c = sandbox.start(SLEEP, image=busybox_image, memory="256m")
    r = c.exec(
        [
            "sh",
            "-c",
            "df -k / | tail -n 1; dd if=/dev/zero of=/upper bs=1M count=48 2>/dev/null;"
            "dd if=/dev/zero of=/tmp/t bs=1M count=32 2>/dev/null; echo ok",
        ]
    )
    out = r.stdout.decode()
    assert out.endswith("ok\n"), (out, r.stderr)
    assert int(out.split()[1]) * 1024 == 256 * MiB, out  # the memory limit is the default bound
    memdirs = [p for p in cgroup_paths_of(c.pid) if os.path.exists(os.path.join(p, "memory.stat"))]
    assert memdirs, cgroup_paths_of(c.pid)
    stat = dict(line.split() for line in Path(memdirs[0], "memory.stat").read_text().splitlines())
    assert int(stat["shmem"]) >= 80 * MiB, stat
    usage = Path(memdirs[0], "memory.usage_in_bytes" if "total_shmem" in stat else "memory.current")
    assert int(usage.read_text()) >= 80 * MiB


def test_writable_size_option_bounds_layer_tmp_and_sizeless_tmpfs(
    sandbox: Sandbox, busybox_image: Image
) -> None:
    """Item 4: run(writable_size="8m") bounds the root, /tmp and a tmpfs= mount without a size
    together: all three are the one writable tmpfs (df shows its size and inodes on each).  A
    tmpfs= mount given a size is a tmpfs of its own, bounded by that size alone."""
    r = sandbox.run(
        ["sh", "-c", "df -k / /tmp /run/x /run/y | tail -n 4; df -i / | tail -n 1"],
        image=busybox_image,
        writable_size="8m",
        tmpfs={"/run/x": None, "/run/y": "4m"},
    )
    lines = r.stdout.decode().splitlines()
    assert [int(line.split()[1]) for line in lines[:4]] == [8192] * 3 + [4096], lines
    assert int(lines[4].split()[1]) == writable_inodes(8 * MiB) == 1024, lines


def test_root_tmp_and_sizeless_tmpfs_share_one_writable_budget(
    sandbox: Sandbox, busybox_image: Image
) -> None:
    """Item 4 (security review): /, /tmp and each sizeless tmpfs= mount were a tmpfs each, so a
    container without memory= could pin three times writable_size of host RAM.  Now they are one
    budget: 12 + 12 MiB to / and /tmp leave the sizeless /run/x less than 8 MiB of writable_size
    = 32 MiB, and the kernel says ENOSPC there; a sized tmpfs= (/run/y) is bounded by its own size
    and outside the budget.  /tmp stays a sticky, world-writable, nosuid/nodev directory owned
    by container root that exec() sees and commit() does not capture."""
    c = sandbox.start(SLEEP, image=busybox_image, writable_size="32m", tmpfs={"/run/x": None, "/run/y": "4m"})
    r = c.exec(
        [
            "sh",
            "-c",
            "dd if=/dev/zero of=/a bs=1M count=12 2>&1; echo dd=$?;"
            "dd if=/dev/zero of=/tmp/b bs=1M count=12 2>&1; echo dd=$?;"
            "dd if=/dev/zero of=/run/x/c bs=1M count=16 2>&1; echo dd=$?;"
            "dd if=/dev/zero of=/run/y/d bs=1M count=3 2>&1; echo dd=$?;"
            "stat -c '%s' /a /tmp/b /run/x/c /run/y/d; stat -c '%a %u %g' /tmp /run/x",
        ]
    )
    out = r.stdout.decode()
    assert [line for line in out.splitlines() if line.startswith("dd=")] == [
        "dd=0",
        "dd=0",
        "dd=1",
        "dd=0",
    ], out
    assert out.count("No space left on device") == 1, out
    *sizes, tmp_mode, x_mode = out.splitlines()[-6:]
    a, b, x, y = map(int, sizes)
    assert (a, b, y) == (12 * MiB, 12 * MiB, 3 * MiB), out
    assert 31 * MiB < a + b + x <= 32 * MiB, out  # the layer's /etc files and directories use a little
    assert tmp_mode == x_mode == "1777 0 0", out
    options = {}
    for line in c.exec(["cat", "/proc/self/mountinfo"]).stdout.decode().splitlines():
        fields = line.split()
        options[fields[4]] = set(fields[5].split(","))
    assert {"rw", "nosuid", "nodev"} <= options["/tmp"], options
    assert "noexec" not in options["/tmp"], options
    assert {"rw", "nosuid", "nodev"} <= options["/run/x"], options
    assert c.exec(["cat", "/tmp/b"]).stdout == bytes(12 * MiB)  # exec sees /tmp as the command does
    c.exec(["rm", "/a", "/tmp/b", "/run/x/c"])
    assert c.exec(["sh", "-c", "echo kept > /tmp/t && echo layer > /l"]).exit_code == 0
    image = c.commit("budget:test")
    r = sandbox.run(["sh", "-c", "cat /l; ls -A /tmp"], image=image)
    assert r.stdout == b"layer\n", r.stdout  # /tmp was never part of the layer, as with a tmpfs


def test_a_default_containers_tmp_and_sizeless_tmpfs_are_its_writable_layer(
    sandbox: Sandbox, busybox_image: Image
) -> None:
    """Item 4 (security review): by default, /, /tmp and a sizeless tmpfs= all report the one
    1 GiB tmpfs, and 4 MiB written to /tmp show as used on / and /run/x too."""
    r = sandbox.run(
        ["sh", "-c", "dd if=/dev/zero of=/tmp/f bs=1M count=4 2>/dev/null; df -k / /tmp /run/x | tail -n 3"],
        image=busybox_image,
        tmpfs=["/run/x"],
    )
    rows = [line.split() for line in r.stdout.decode().splitlines()]
    assert [int(row[1]) * 1024 for row in rows] == [DEFAULT_WRITABLE_SIZE] * 3, rows
    used = {int(row[2]) for row in rows}
    assert len(used) == 1, rows
    assert used.pop() >= 4096, rows
