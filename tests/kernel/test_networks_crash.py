"""Networks under xdist and under SIGKILL: distinct subnets, unique names, nothing left on the host.

Child pytest sessions (plain subprocesses, as in test_crash.py) run generated modules.  What "ours"
means on the host: an interface named psbx*, a network namespace made by a session (found by the
inode the child reports, in every process's ns/net and open fds), a live lease in /run/psbx-ipam.
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_sandbox.net.ipam import LEASE_DIR, SubnetLeases
from tests.e2e_support import (
    CHILD_REPORT,
    child_env,
    child_output,
    kill_child,
    pytest_argv,
    spawn_pytest,
    wait_for_file,
    wait_until,
    write_child_project,
)

DESCRIBE = (
    CHILD_REPORT
    + """
from pytest_sandbox.runtime import get_runtime


def netns_inode(fd):
    return os.readlink(f"/proc/self/fd/{fd}")


def describe(net, containers):
    rt = get_runtime()
    hub = rt.networks.hub
    return dict(
        pid=os.getpid(),
        owner=rt.owner,
        subnet=str(net.subnet),
        ips=[c.ip() for c in containers],
        hub=netns_inode(hub.fd),
        container_netns=[os.readlink(f"/proc/{c.init_pid}/ns/net") for c in containers],
        links=hub.link_names(),
    )
"""
)

XDIST_MODULE = (
    DESCRIBE
    + """
import pytest

REPORTS = os.environ["PSBX_REPORTS"]


@pytest.mark.parametrize("i", range(20))
def test_network_of_three(sandbox_module, i):
    net = sandbox_module.network(name=f"n{i}")
    server = sandbox_module.start(["python3", "-m", "http.server", "80"], network=net, name=f"server{i}")
    others = [sandbox_module.start(["sleep", "300"], network=net, name=f"c{i}-{j}") for j in (1, 2)]
    server.wait_for_port(80)
    probe = f"import socket; socket.create_connection(('server{i}', 80), timeout=5); print('ok')"
    assert others[0].exec(["python3", "-c", probe]).stdout == b"ok\\n"
    report(os.path.join(REPORTS, f"{i}.json"), **describe(net, [server, *others]))
"""
)

HOLD_MODULE = (
    DESCRIBE
    + """
import time


def test_hold(sandbox):
    net = sandbox.network()
    server = sandbox.start(["python3", "-m", "http.server", "80"], network=net, name="server")
    client = sandbox.start(["sleep", "1000"], network=net)
    server.wait_for_port(80)
    server.address(80)  # a forwarder too
    report(os.environ["PSBX_REPORT"], **describe(net, [server, client]))
    time.sleep(1000)
"""
)


def holders_of(inodes: set[str]) -> list[str]:
    """Processes whose network namespace, or one of whose open fds, is one of ``inodes``."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        links = []
        try:
            links.append(os.readlink(f"/proc/{pid}/ns/net"))
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    links.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
                except OSError:
                    continue
        except OSError:
            continue
        found += [f"{pid}: {link}" for link in links if link in inodes]
    return found


def host_links() -> list[str]:
    return sorted(n for n in os.listdir("/sys/class/net") if n.startswith("psbx"))


def live_leases_of(owners: set[str]) -> list[str]:
    out = []
    for name in os.listdir(LEASE_DIR) if os.path.isdir(LEASE_DIR) else []:
        try:
            with open(os.path.join(LEASE_DIR, name)) as f:
                if f.read().strip() in owners:
                    out.append(name)
        except OSError:
            continue
    return out


@pytest.fixture
def child() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for p in started:
        kill_child(p)


def test_twenty_networks_of_three_under_xdist(tmp_path: Path) -> None:
    project, tmpdir, reports = tmp_path / "child", tmp_path / "tmp", tmp_path / "reports"
    tmpdir.mkdir()
    reports.mkdir()
    write_child_project(project, {"test_nets.py": XDIST_MODULE})
    env = child_env(tmpdir, {"PSBX_REPORTS": str(reports)})
    r = subprocess.run(
        pytest_argv("-n", "2", "-q", "test_nets.py"),
        cwd=project,
        env=env,
        capture_output=True,
        check=False,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout.decode() + r.stderr.decode()
    infos = [json.loads((reports / f"{i}.json").read_text()) for i in range(20)]
    assert len({i["pid"] for i in infos}) == 2, "expected both xdist workers to make networks"
    subnets = [ipaddress.IPv4Network(i["subnet"]) for i in infos]
    for a in range(20):
        for b in range(a + 1, 20):
            assert not subnets[a].overlaps(subnets[b]), (subnets[a], subnets[b])
    for info, subnet in zip(infos, subnets, strict=False):
        assert all(ipaddress.IPv4Address(ip) in subnet for ip in info["ips"])
        assert len(set(info["container_netns"])) == 3
    # Interface names: every worker's hub holds its bridges and veth ends, all <= 15 bytes, and
    # unique across the two workers (each name carries its worker's pid).
    last_links: dict[int, set[str]] = {}
    for info in infos:
        last_links[info["pid"]] = set(info["links"]) - {"lo"}
    first, second = last_links.values()
    assert not first & second
    assert all(len(n.encode()) <= 15 and n.startswith("psbx") for n in first | second)
    assert sum(n.startswith("psbxb") for n in first) >= 2
    assert sum(n.startswith("psbxb") for n in second) >= 2
    # After the run: nothing on the host, no namespace held, no lease of theirs.
    owners = {i["owner"] for i in infos}
    inodes = {i["hub"] for i in infos} | {ns for i in infos for ns in i["container_netns"]}
    assert wait_until(lambda: not holders_of(inodes), 10.0) is not None, holders_of(inodes)
    assert host_links() == []
    assert live_leases_of(owners) == []


def test_sigkill_of_pytest_in_a_networked_test_leaves_nothing(
    tmp_path: Path, child: list[subprocess.Popen[bytes]]
) -> None:
    project, tmpdir = tmp_path / "child", tmp_path / "tmp"
    tmpdir.mkdir()
    write_child_project(project, {"test_hold.py": HOLD_MODULE})
    report = project / "report.json"
    proc = spawn_pytest(project, child_env(tmpdir, {"PSBX_REPORT": str(report)}), "-q", "test_hold.py")
    child.append(proc)
    info = wait_for_file(report, proc, 60.0)
    inodes = {info["hub"], *info["container_netns"]}
    assert holders_of({info["hub"]}), "the child should hold its hub namespace while it runs"
    assert live_leases_of({info["owner"]}), "the child should hold a lease while it runs"
    assert any(n.startswith("psbxb") for n in info["links"])
    assert host_links() == []

    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    gone = wait_until(lambda: not holders_of(inodes), 10.0)
    assert gone is not None, f"namespaces still held: {holders_of(inodes)}\n{child_output(project)}"
    print(f"SIGKILL of pytest: hub and container network namespaces gone in {gone:.3f} s")
    assert host_links() == []
    # The lease file outlives its owner, but no one counts it: the next allocation sweeps it.
    SubnetLeases().sweep()  # under the lock: never racing another session's allocation
    assert live_leases_of({info["owner"]}) == []
