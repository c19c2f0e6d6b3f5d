"""Shared fixtures of the test suite: a busybox layer (Debian's busybox-static) and images."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_sandbox import Image
from pytest_sandbox.host.cgroups.base import Cgroup
from tests.e2e_support import Spawn

BUSYBOX = shutil.which("busybox") or "/bin/busybox"


def _pure_cgroup_v2() -> bool:
    try:
        with open("/proc/self/mountinfo") as f:
            fstypes = {line.split(" - ", 1)[1].split()[0] for line in f if " - " in line}
    except OSError:
        return False
    return "cgroup2" in fstypes and "cgroup" not in fstypes and os.geteuid() == 0


# tests/vm needs a pure cgroup v2 host (.ci/vm-tests boots one in a VM).  Elsewhere it is
# not collected at all rather than skipped: the host suite runs in strict mode (a skip fails
# there), and those tests do run -- in the VM, strictly too.
collect_ignore_glob = [] if _pure_cgroup_v2() else ["vm/*"]


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
