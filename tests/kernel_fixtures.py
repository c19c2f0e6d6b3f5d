"""Fixtures of the kernel tiers (tests/kernel, tests/vm) and of the examples: the leak check, a
busybox layer and image, and ``spawn`` (plain processes for the cgroup backend tests).

The conftest.py of each of those directories imports what it uses from here; tests/unit imports
none of it (its tests start no launcher, so there is nothing to check for leaks).

``leak_check`` (autouse where imported) snapshots what pytest_sandbox may leave on the host --
processes under the launcher, cgroup directories of this process, container state directories,
host mounts named psbx, the interfaces in the session's hub network namespace and its subnet
leases, this process's fds and threads -- before and after every test, and fails the test on any
difference.  A test marked ``no_leak_check`` checks itself.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pytest_sandbox import Image
from pytest_sandbox.core.naming import PROJECT_CGROUP
from pytest_sandbox.host.cgroups.base import Cgroup
from tests import probes
from tests.e2e_support import Spawn, children, comm, descendants

BUSYBOX = shutil.which("busybox") or "/bin/busybox"

LAUNCHER_PARTS = ("psbx-cleaner", "psbx-spare")


def _is_spare_cgroup(path: str) -> bool:
    try:
        with open(os.path.join(path, "cgroup.procs")) as f:
            pids = [int(x) for x in f.read().split()]
    except OSError:
        return False
    return bool(pids) and all(comm(p) == "psbx-spare" for p in pids)


@dataclass(frozen=True)
class LeakSnapshot:
    processes: frozenset[str]
    cgroups: frozenset[str]
    state: frozenset[str]
    mounts: frozenset[str]
    networks: frozenset[str]
    fds: int
    threads: frozenset[str]  # "name #n": a second psbx-net (a leaked Networks) counts too

    @classmethod
    def take(cls) -> LeakSnapshot:
        # The hub namespace and the psbx-net thread live as long as the session: made before the
        # first snapshot, so their fds and thread are part of every "before".
        hub = probes.hub()
        spares = probes.spare_links()  # namespaces made ahead for a network's next start
        networks = {f"link {n}" for n in hub.link_names() if n != "lo" and n not in spares}
        networks |= {f"lease {s}" for s in probes.my_leases()}
        # Nothing of ours belongs in the host's own namespace at all (not only the hub's).
        networks |= {f"host link {n}" for n in os.listdir("/sys/class/net") if n.startswith("psbx")}
        launcher = probes.launcher_pid_if_started()
        procs: set[str] = set()
        if launcher:
            # The launcher's long-lived helpers are part of it: the cleaner, and the spare (a
            # container's first process forked ahead of time, waiting in its own cgroup).
            procs = {f"{p} {comm(p)}" for p, _ in descendants(launcher) if comm(p) not in LAUNCHER_PARTS}
        # And this process's own children (a second launcher, a server a test forgot), zombies too.
        procs |= {f"{p} {comm(p)} (child)" for p in children(os.getpid()) if p != launcher}
        cgroups: set[str] = set()
        for root, dirs, _files in _walk_cgroups(probes.owner(), probes.cgroup_root()):
            cgroups.update(os.path.join(root, d) for d in dirs if not _is_spare_cgroup(os.path.join(root, d)))
        try:
            state = {e for e in os.listdir(probes.state_dir()) if e != "launcher.log"}
        except FileNotFoundError:
            state = set()
        with open("/proc/self/mountinfo") as f:
            mounts = {line.split()[4] for line in f if "psbx" in line}
        names = sorted(t.name for t in threading.enumerate() if t.name != "psbx-launcher-reader")
        threads = {f"{name} #{names[:i].count(name) + 1}" for i, name in enumerate(names)}
        fds = set(os.listdir("/proc/self/fd")) - {str(probes.launcher_fd())}
        return cls(
            frozenset(procs),
            frozenset(cgroups),
            frozenset(state),
            frozenset(mounts),
            frozenset(networks),
            len(fds),
            frozenset(threads),
        )

    def diff(self, later: LeakSnapshot) -> list[str]:
        problems = []
        for name in ("processes", "cgroups", "state", "mounts", "networks", "threads"):
            extra = getattr(later, name) - getattr(self, name)
            if extra:
                problems.append(f"{name} left behind: {sorted(extra)}")
        if later.fds > self.fds:
            problems.append(f"file descriptors: {self.fds} before, {later.fds} after")
        return problems


def _walk_cgroups(owner: str, cgroup_root: str) -> Iterator[tuple[str, list[str], list[str]]]:
    try:
        hierarchies = os.listdir(cgroup_root)
    except OSError:
        return
    for h in ["", *hierarchies]:
        group = os.path.join(cgroup_root, h, PROJECT_CGROUP, owner)
        if os.path.isdir(group):
            yield from os.walk(group)


@pytest.fixture(autouse=True)
def leak_check(request: pytest.FixtureRequest) -> Generator[None, None, None]:
    if request.node.get_closest_marker("no_leak_check"):
        yield
        return
    before = LeakSnapshot.take()
    yield
    problems: list[str] = []
    for _ in range(50):  # processes may take a moment to be reaped after a kill
        problems = before.diff(LeakSnapshot.take())
        if not problems:
            return
        time.sleep(0.02)
    pytest.fail("leak check: " + "; ".join(problems), pytrace=False)


def make_busybox_layer(dest: Path) -> Path:
    """A minimal root filesystem: a static busybox and a symlink for every applet it has."""
    if not os.path.exists(BUSYBOX):
        pytest.skip("busybox-static is not installed (apt-get install busybox-static)")
    bindir = dest / "bin"
    bindir.mkdir(parents=True)
    shutil.copy2(BUSYBOX, bindir / "busybox")
    applets = os.popen(f"{BUSYBOX} --list").read().split()
    for applet in applets:
        if applet != "busybox":
            (bindir / applet).symlink_to("busybox")
    (dest / "etc").mkdir()
    (dest / "etc" / "passwd").write_text(
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n"
        "app:x:1000:1000:app:/home/app:/bin/sh\n"
    )
    (dest / "etc" / "group").write_text("root:x:0:\nnogroup:x:65534:\napp:x:1000:\nextra:x:2000:app\n")
    return dest


@pytest.fixture(scope="session")
def busybox_layer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A session-wide busybox layer directory (never modified by containers)."""
    return make_busybox_layer(tmp_path_factory.mktemp("busybox") / "rootfs")


@pytest.fixture(scope="session")
def busybox_image(busybox_layer: Path) -> Image:
    """An image made only of the busybox layer (no host base)."""
    return Image.from_layers(busybox_layer, base=None)


@pytest.fixture
def spawn() -> Iterator[Spawn]:
    """Start ``argv`` held at a gate; it runs once ``attach`` put it into the cgroup (if any).

    For the cgroup backend tests, which drive cgroups with plain processes.  Only processes this
    fixture started are killed at the end, by pid.
    """
    procs: list[subprocess.Popen[bytes]] = []

    def _spawn(
        argv: list[str], cg: Cgroup | None = None, *, stdout: int | None = None, stderr: int | None = None
    ) -> subprocess.Popen[bytes]:
        gate = 'read _ && exec "$@"'
        p = subprocess.Popen(
            ["/bin/sh", "-c", gate, "sh", *argv], stdin=subprocess.PIPE, stdout=stdout, stderr=stderr
        )
        procs.append(p)
        if cg is not None:
            cg.attach(p.pid)
        assert p.stdin is not None
        p.stdin.write(b"go\n")
        p.stdin.close()
        return p

    yield _spawn
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()
        if p.stdout is not None:
            p.stdout.close()
