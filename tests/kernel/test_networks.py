# Long module: one subject, private networks, whose tests share the server commands and
# connect probes defined here; the review section keeps each defect beside its test.
"""Private networks: real bridges and veths in the session's hub namespace, real TCP between
containers, published ports reached from this process, readiness waits, and isolation.

Every container here runs the host's python3 (the default image).  Servers are plain
``python3 -m http.server`` or a few lines of socket code, so the tests need nothing in an image.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import resource
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from typing import Any

import pytest
from pyroute2 import IPRoute

from pytest_sandbox import Sandbox
from pytest_sandbox.core.errors import (
    CommandNotFoundError,
    ContainerNotRunningError,
    ContainerStateError,
    InvalidSpecError,
    NetworkError,
    ReadinessError,
)
from tests import probes

HTTP = ["python3", "-m", "http.server"]


def connect_code(host: str, port: int) -> list[str]:
    """A command printing the errno of a TCP connect (0: connected)."""
    code = f"import socket; s = socket.socket(); s.settimeout(3); print(s.connect_ex(({host!r}, {port})))"
    return ["python3", "-c", code]


# -- the example, and talking between containers -----------------------------------------


def test_two_services_by_name_and_from_the_test(sandbox: Sandbox) -> None:
    net = sandbox.network()
    db = sandbox.start([*HTTP, "5000"], network=net, name="db")
    db.wait_for_port(5000)
    app = sandbox.run(
        ["python3", "-c", "import urllib.request as u; print(u.urlopen('http://db:5000').status)"],
        network=net,
    )
    assert app.stdout.strip() == b"200", app
    host, port = db.address(5000)
    assert host == "127.0.0.1"
    assert urllib.request.urlopen(f"http://{host}:{port}").status == 200


def test_by_address_by_name_and_by_alias(sandbox: Sandbox) -> None:
    net = sandbox.network()
    server = sandbox.start([*HTTP, "8080"], network=net, name="web", aliases=["www", "site"])
    server.wait_for_port(8080)
    ip = server.ip()
    assert ipaddress.IPv4Address(ip) in net.subnet
    assert net.members == {server.id: ipaddress.IPv4Address(ip)}
    for target in (ip, "web", "www", "site"):
        r = sandbox.run(connect_code(target, 8080), network=net)
        assert r.stdout.strip() == b"0", (target, r)


def test_a_container_learns_peers_that_start_after_it(sandbox: Sandbox) -> None:
    """/etc/hosts is live: a running container resolves a name added after it started."""
    net = sandbox.network()
    first = sandbox.start(["sleep", "60"], network=net, name="first")
    second = sandbox.start([*HTTP, "9000"], network=net, name="second")
    second.wait_for_port(9000)
    r = first.exec(connect_code("second", 9000))
    assert r.stdout.strip() == b"0", r
    hosts = first.exec(["cat", "/etc/hosts"]).stdout.decode()
    assert f"{second.ip()}\tsecond" in hosts
    assert f"{first.ip()}\tfirst" in hosts


def test_two_networks_and_addresses_on_each(sandbox: Sandbox) -> None:
    front, back = sandbox.network(name="front"), sandbox.network(name="back")
    proxy = sandbox.start(["sleep", "60"], network=[front, back], name="proxy")
    ifaces = proxy.exec(["ls", "/sys/class/net"]).stdout.split()
    assert sorted(ifaces) == [b"eth0", b"eth1", b"lo"]
    assert ipaddress.IPv4Address(proxy.ip(front)) in front.subnet
    assert ipaddress.IPv4Address(proxy.ip(back)) in back.subnet
    assert proxy.ip() == proxy.ip(front)
    assert proxy.networks == (front, back)
    assert not front.subnet.overlaps(back.subnet)


def test_tcp_both_ways_large_and_half_closed(sandbox: Sandbox) -> None:
    """A byte-exact echo of 4 MiB through the published port: relay buffering and half-close."""
    echo = (
        "import socket\n"
        "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
        "s.bind(('0.0.0.0', 7)); s.listen(); print('listening', flush=True)\n"
        "while True:\n"
        "    c, _ = s.accept()\n"
        "    while (d := c.recv(65536)):\n"
        "        c.sendall(d)\n"
        "    c.shutdown(socket.SHUT_WR); c.close()\n"
    )
    server = sandbox.start(["python3", "-c", echo], network=sandbox.network())
    server.wait_for_log("listening")
    payload = os.urandom(4 << 20)
    with socket.create_connection(server.address(7), timeout=10) as c:
        received = bytearray()

        def read() -> None:
            while data := c.recv(65536):
                received.extend(data)

        reader = threading.Thread(target=read)
        reader.start()
        c.sendall(payload)
        c.shutdown(socket.SHUT_WR)  # the echo server sees EOF through the relay, and closes
        reader.join(20)
    assert not reader.is_alive()
    assert bytes(received) == payload


def test_root_and_a_user_bind_privileged_ports_and_ping_sockets_work(sandbox: Sandbox) -> None:
    """Docker's defaults in the prepared namespace: unprivileged ports from 0, ping for all groups."""
    net = sandbox.network()
    code = (
        "import socket; s = socket.socket(); s.bind(('0.0.0.0', 80)); "
        "p = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP); print('ok')"
    )
    assert sandbox.run(["python3", "-c", code], network=net).stdout == b"ok\n"
    r = sandbox.run(["python3", "-c", code], network=net, user="65534")
    assert r.stdout == b"ok\n", r


# -- isolation -----------------------------------------------------------------------------------


def test_networks_are_isolated_in_both_directions(sandbox: Sandbox) -> None:
    a_net, b_net = sandbox.network(), sandbox.network()
    a = sandbox.start([*HTTP, "80"], network=a_net, name="a")
    b = sandbox.start([*HTTP, "80"], network=b_net, name="b")
    a.wait_for_port(80)
    b.wait_for_port(80)
    # Same network: reachable.  Other network: no route (ENETUNREACH), by address; no name either.
    assert sandbox.run(connect_code(a.ip(), 80), network=a_net).stdout.strip() == b"0"
    assert sandbox.run(connect_code(b.ip(), 80), network=b_net).stdout.strip() == b"0"
    # Exact outcomes, so that a probe that merely crashed (no output, exit 127) cannot pass.
    for src_net, dst in ((a_net, b), (b_net, a)):
        r = sandbox.run(connect_code(dst.ip(), 80), network=src_net)
        assert r.stdout.strip() == b"101", r  # ENETUNREACH
        assert sandbox.run(["getent", "hosts", dst.name], network=src_net).exit_code == 2  # not found
    assert sandbox.run(["getent", "hosts", a.name], network=a_net).exit_code == 0
    # From inside a running container too, and its root cannot add a route or an address.
    r = a.exec(connect_code(b.ip(), 80))
    assert r.stdout.strip() == b"101", r
    route = a.exec(["python3", "-c", ADD_ROUTE.format(subnet=b_net.subnet)])
    assert route.stdout.strip() == b"EPERM", route


ADD_ROUTE = """
import socket, struct, errno
# RTM_NEWROUTE via raw netlink: what `ip route add {subnet} dev eth0` sends.
s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)
net, plen = "{subnet}".split("/")
rtmsg = struct.pack("BBBBBBBBI", socket.AF_INET, int(plen), 0, 0, 254, 4, 253, 1, 0)
dst = struct.pack("HH", 8, 1) + socket.inet_aton(net)
oif = struct.pack("HHI", 8, 4, socket.if_nametoindex("eth0"))
body = rtmsg + dst + oif
hdr = struct.pack("IHHII", 16 + len(body), 24, 0x1 | 0x4 | 0x400 | 0x200, 1, 0)
s.send(hdr + body)
reply = s.recv(4096)
err = -struct.unpack_from("i", reply, 16)[0]
print(errno.errorcode.get(err, err) if err else "added")
"""


def test_no_network_means_loopback_only(sandbox: Sandbox) -> None:
    net = sandbox.network()
    server = sandbox.start([*HTTP, "80"], network=net)
    server.wait_for_port(80)
    code = "import os; print(*sorted(os.listdir('/sys/class/net')))\n" + connect_code(server.ip(), 80)[2]
    r = sandbox.run(["python3", "-c", code])
    assert r.stdout.split() == [b"lo", b"101"], r  # only lo; ENETUNREACH
    with pytest.raises(ContainerStateError, match="no network"):
        sandbox.start(["sleep", "5"]).ip()


def test_the_hosts_loopback_services_are_not_reachable(sandbox: Sandbox) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    try:
        for network in (None, sandbox.network()):
            r = sandbox.run(connect_code("127.0.0.1", port), network=network)
            assert r.stdout.strip() == b"111", r  # ECONNREFUSED: its own loopback, not the host's
            listener.settimeout(0.2)
            with pytest.raises(TimeoutError):
                listener.accept()
    finally:
        listener.close()


def test_no_object_of_ours_in_the_hosts_namespace(sandbox: Sandbox) -> None:
    net = sandbox.network()
    c = sandbox.start(["sleep", "60"], network=net)
    assert not [n for n in os.listdir("/sys/class/net") if n.startswith("psbx")]
    hub_links = probes.hub().link_names()
    assert net.bridge in hub_links
    assert any(n.startswith("psbxv") for n in hub_links)
    assert all(len(n.encode()) <= 15 for n in hub_links)
    # The container's namespace is not the host's, nor the hub's.
    inside = os.readlink(f"/proc/{c.init_pid}/ns/net")
    assert inside != os.readlink("/proc/self/ns/net")
    assert inside != os.readlink(f"/proc/self/fd/{probes.hub().fd}")


# -- published ports and waits -------------------------------------------------------------------


def test_address_without_a_network_reaches_the_containers_loopback(sandbox: Sandbox) -> None:
    server = sandbox.start([*HTTP, "8000", "--bind", "127.0.0.1"])
    server.wait_for_port(8000)
    host, port = server.address(8000)
    assert urllib.request.urlopen(f"http://{host}:{port}/").status == 200
    assert server.address(8000) == (host, port)  # one forwarder per port


def test_wait_for_http(sandbox: Sandbox) -> None:
    app = (
        "import http.server, time\n"
        "time.sleep(0.5)\n"
        "class H(http.server.BaseHTTPRequestHandler):\n"
        "    def do_GET(self):\n"
        "        self.send_response(204 if self.path == '/health' else 404); self.end_headers()\n"
        "http.server.HTTPServer(('0.0.0.0', 8000), H).serve_forever()\n"
    )
    c = sandbox.start(["python3", "-c", app], network=sandbox.network())
    c.wait_for_http(8000, "/health", 204, timeout=20)
    with pytest.raises(ReadinessError, match="last answer: 404"):
        c.wait_for_http(8000, "/", 200, timeout=0.5)


def test_waits_time_out_with_the_log_tail(sandbox: Sandbox) -> None:
    c = sandbox.start(
        ["sh", "-c", "echo starting up; echo still thinking; sleep 60"], network=sandbox.network()
    )
    c.wait_for_log("still thinking")
    t0 = time.monotonic()
    with pytest.raises(ReadinessError) as info:
        c.wait_for_port(5432, timeout=1.0)
    assert 1.0 <= time.monotonic() - t0 < 5
    assert "timed out after 1.0 s" in str(info.value)
    assert "still thinking" in str(info.value)
    with pytest.raises(ReadinessError, match="still thinking"):
        c.wait_for_http(5432, timeout=0.5)
    with pytest.raises(ReadinessError, match="still thinking"):
        c.wait_for(lambda: False, timeout=0.3)


def test_waits_fail_fast_when_the_container_exits(sandbox: Sandbox) -> None:
    c = sandbox.start(["sh", "-c", "echo cannot open config; sleep 0.3; exit 3"], network=sandbox.network())
    t0 = time.monotonic()
    with pytest.raises(ReadinessError) as info:
        c.wait_for_port(5432, timeout=30)
    assert time.monotonic() - t0 < 5
    assert "exited (code 3)" in str(info.value)
    assert "cannot open config" in str(info.value)
    assert info.value.result is not None
    assert info.value.result.exit_code == 3


def test_address_of_a_stopped_container_is_an_error(sandbox: Sandbox) -> None:
    c = sandbox.start(["sleep", "60"])
    c.stop(timeout=1)
    with pytest.raises(ContainerNotRunningError):
        c.address(80)


# -- bad input, before anything is created -------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"network": "bridge"}, "expected a Network"),
        ({"network": [None]}, "expected a Network"),
        ({"aliases": ["x"]}, "give network= too"),
    ],
)
def test_bad_network_options(sandbox: Sandbox, kwargs: dict[str, Any], match: str) -> None:
    before = os.listdir(probes.state_dir()) if os.path.isdir(probes.state_dir()) else []
    with pytest.raises(InvalidSpecError, match=match):
        sandbox.run(["true"], **kwargs)
    assert os.listdir(probes.state_dir()) == before


def test_bad_aliases_ports_and_names(sandbox: Sandbox) -> None:
    net = sandbox.network()
    with pytest.raises(InvalidSpecError, match="aliases"):
        sandbox.run(["true"], network=net, aliases=["no spaces"])
    with pytest.raises(InvalidSpecError, match="listed twice"):
        sandbox.run(["true"], network=[net, net])
    c = sandbox.start(["sleep", "30"], network=net, name="taken")
    with pytest.raises(InvalidSpecError, match="already used on network"):
        sandbox.start(["sleep", "30"], network=net, aliases=["taken"])
    for port in (0, 65536, "80", True):
        with pytest.raises(InvalidSpecError, match="port"):
            c.address(port)  # type: ignore[arg-type]
    with pytest.raises(InvalidSpecError, match="path"):
        c.wait_for_http(80, "health")


def test_bad_network_arguments(sandbox: Sandbox) -> None:
    for subnet in ("10.0.0.0/33", "10.0.0.1/24", "fe80::/64", "banana", "10.0.0.0/30"):
        with pytest.raises(InvalidSpecError, match="subnet"):
            sandbox.network(subnet=subnet)
    with pytest.raises(InvalidSpecError, match="name"):
        sandbox.network(name="has space")
    sandbox.network(name="dup")
    with pytest.raises(InvalidSpecError, match="already exists"):
        sandbox.network(name="dup")


def test_a_closed_network_cannot_be_joined(sandbox: Sandbox) -> None:
    net = sandbox.network()
    net.close()
    with pytest.raises(InvalidSpecError, match="closed"):
        sandbox.run(["true"], network=net)


def test_without_pyroute2_a_network_is_a_network_error() -> None:
    """pyroute2 is a dependency; a broken install that lacks it gets a NetworkError that says so
    from sandbox.network(), not a ModuleNotFoundError from the network thread."""
    code = (
        "import sys; sys.modules['pyroute2'] = None\n"
        "from pytest_sandbox import Sandbox\n"
        "from pytest_sandbox.core.errors import NetworkError\n"
        "with Sandbox() as sb:\n"
        "    try:\n"
        "        sb.network()\n"
        "    except NetworkError as e:\n"
        "        print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60, check=True)
    assert b"need the pyroute2 package" in out.stdout, out
    assert b"pip install pyroute2" in out.stdout, out


def test_an_explicit_subnet_and_a_full_one(sandbox: Sandbox) -> None:
    net = sandbox.network(subnet="10.99.7.0/29")  # .1 kept free: .2 - .6 for containers
    assert str(net.subnet) == "10.99.7.0/29"
    started = [sandbox.start(["sleep", "30"], network=net) for _ in range(5)]
    assert [c.ip() for c in started] == [f"10.99.7.{i}" for i in range(2, 7)]
    with pytest.raises(NetworkError, match="no free address"):
        sandbox.start(["sleep", "30"], network=net)
    started[0].remove()
    assert sandbox.start(["sleep", "30"], network=net).ip() == "10.99.7.2"  # freed, reused


def test_an_overlapping_subnet_is_refused_naming_the_network_that_has_it(sandbox: Sandbox) -> None:
    """Issue 9, item 13: a second network on 10.98.0.0/24 (or a /25 in it, or a /16 around it),
    from this handle or another of the session, is a NetworkError naming the first, as Docker's
    "Pool overlaps" -- and no bridge is made for it; closed, the subnet is free again."""
    hub = probes.hub()
    first = sandbox.network(subnet="10.98.0.0/24", name="first")
    bridges = sorted(hub.link_names())
    with Sandbox() as other:
        for handle, subnet in [
            (sandbox, "10.98.0.0/24"),
            (sandbox, "10.98.0.128/25"),
            (other, "10.98.0.0/16"),
        ]:
            with pytest.raises(
                NetworkError,
                match=rf"subnet='{subnet}': Pool overlaps with other one on this address space: "
                r"network 'first' has 10\.98\.0\.0/24",
            ):
                handle.network(subnet=subnet)
        assert str(other.network(subnet="10.98.1.0/24").subnet) == "10.98.1.0/24"  # next to it: fine
    assert sorted(hub.link_names()) == bridges
    first.close()
    assert str(sandbox.network(subnet="10.98.0.0/16").subnet) == "10.98.0.0/16"


def test_the_pool_skips_a_subnet_taken_explicitly(tmp_path: Any) -> None:
    """Issue 9, item 13: a network from the pool never overlaps one given as subnet= in the same
    process: with a pool of two /24s and the first taken explicitly, the pool gives the second,
    then has none left."""
    from pytest_sandbox.config import parse_address_pools
    from pytest_sandbox.core.naming import owner_tag
    from pytest_sandbox.net.networks import Networks

    pools = parse_address_pools("base=10.97.0.0/23,size=24", what="test")
    networks = Networks(pools, lease_dir=str(tmp_path), owner=owner_tag())
    try:
        networks.create(subnet="10.97.0.0/24")
        assert str(networks.create().subnet) == "10.97.1.0/24"
        with pytest.raises(NetworkError, match="no free subnet"):
            networks.create()
    finally:
        networks.close()
    assert networks.leases.mine() == []


def test_a_networked_start_that_fails_gives_everything_back(sandbox: Sandbox) -> None:
    net = sandbox.network()
    networks = probes.networks()
    hub = networks.hub

    def links() -> list[str]:  # not counting the namespace made ahead for the next start
        return sorted(set(hub.link_names()) - networks.spare_links())

    before = links()
    with pytest.raises(CommandNotFoundError):
        sandbox.run(["/no/such/command"], network=net)
    c = sandbox.start(["sleep", "30"], network=net)
    assert c.ip().endswith(".2") or c.ip().endswith(".3")
    c.remove()
    deadline = time.monotonic() + 5
    while links() != before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert links() == before  # the veths went with the containers' namespaces


# -- review: defects found after the first version, each with the test that shows it -------------


def test_a_name_reused_after_its_container_left_resolves_to_the_new_one(sandbox: Sandbox) -> None:
    """A service restarted under the same name: peers resolve the name to the new address.

    /etc/hosts is searched first line first; the line of the removed container must not shadow
    the new one's (it is commented out in every peer's file when the container leaves).
    """
    net = sandbox.network()
    app = sandbox.start(["sleep", "60"], network=net, name="app")
    old = sandbox.start(["sleep", "60"], network=net, name="db")
    old_ip = old.ip()
    old.remove()
    new = sandbox.start([*HTTP, "5000"], network=net, name="db")
    new.wait_for_port(5000)
    assert new.ip() != old_ip  # fresh addresses first
    r = app.exec(["getent", "hosts", "db"])
    assert r.stdout.split()[:2] == [new.ip().encode(), b"db"], r
    assert app.exec(connect_code("db", 5000)).stdout.strip() == b"0"
    hosts = app.exec(["cat", "/etc/hosts"]).stdout.decode()
    assert f"{old_ip}\tdb" not in [line for line in hosts.splitlines() if not line.startswith("#")]


def test_containers_started_at_once_from_threads_all_know_each_other(
    sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each new member's /etc/hosts and the others' must agree even when starts interleave."""
    net = sandbox.network()
    networks = probes.networks()
    real = networks.hosts_file

    def slow_hosts_file(*args: Any) -> str:  # widen the window a concurrent start could slip into
        text = real(*args)
        time.sleep(0.05)
        return text

    monkeypatch.setattr(networks, "hosts_file", slow_hosts_file)
    barrier = threading.Barrier(6)
    started: list[Any] = []
    errors: list[BaseException] = []

    def start(i: int) -> None:
        try:
            barrier.wait()
            started.append(sandbox.start(["sleep", "60"], network=net, name=f"t{i}"))
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=start, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert len(started) == 6
    for c in started:
        with open(os.path.join(c.dir, "hosts")) as f:
            hosts = f.read()
        for other in started:
            assert f"{other.ip()}\t{other.name}" in hosts, (c.name, other.name, hosts)


def test_the_same_name_started_at_once_from_two_threads_is_refused_once(sandbox: Sandbox) -> None:
    net = sandbox.network()
    barrier = threading.Barrier(4)
    outcomes: list[object] = []

    def start() -> None:
        barrier.wait()
        try:
            outcomes.append(sandbox.start(["sleep", "60"], network=net, aliases=["same"]))
        except InvalidSpecError as e:
            outcomes.append(e)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(outcomes) == 4
    assert sum(not isinstance(o, InvalidSpecError) for o in outcomes) == 1, outcomes


def test_waits_on_a_container_without_network_that_exited_carry_the_log(sandbox: Sandbox) -> None:
    """network=None: the namespace is the container's own and goes with it; the wait must still
    report the exit with the log tail (not a bare 'not running')."""
    c = sandbox.start(["sh", "-c", "echo bad config; exit 4"])
    c.wait(10)
    waits: list[Callable[[], None]] = [
        lambda: c.wait_for_port(80, timeout=5),
        lambda: c.wait_for_http(80, timeout=5),
    ]
    for wait in waits:
        t0 = time.monotonic()
        with pytest.raises(ReadinessError, match="bad config") as info:
            wait()
        assert time.monotonic() - t0 < 2
        assert "exited (code 4)" in str(info.value)
        assert info.value.result is not None
        assert info.value.result.exit_code == 4
    c.remove()
    with pytest.raises(ContainerNotRunningError, match="removed"):
        c.wait_for_port(80, timeout=1)


def test_wait_for_http_keeps_its_timeout_against_a_server_that_never_answers(sandbox: Sandbox) -> None:
    mute = (
        "import socket, time\n"
        "s = socket.socket(); s.bind(('0.0.0.0', 8000)); s.listen(); print('up', flush=True)\n"
        "conns = []\n"
        "while True: conns.append(s.accept())\n"
    )
    c = sandbox.start(["python3", "-c", mute], network=sandbox.network())
    c.wait_for_log("up")
    t0 = time.monotonic()
    with pytest.raises(ReadinessError, match=r"timed out after 0\.5 s"):
        c.wait_for_http(8000, timeout=0.5)
    assert time.monotonic() - t0 < 1.5


def test_address_racing_remove_leaves_no_forwarder(sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch) -> None:
    """remove() from another thread between address()'s namespace lookup and its registration:
    the forwarder must not outlive the container (its listener would leak, and it would later
    setns into whatever the closed fd number came to name)."""
    c = sandbox.start(["sleep", "60"], network=sandbox.network())
    probes.after_netns_lookup(monkeypatch, c, c.remove)
    with pytest.raises(ContainerNotRunningError):
        c.address(80)
    assert probes.forwarders(c) == {}


def test_a_forwarder_keeps_its_own_namespace_reference(sandbox: Sandbox) -> None:
    """The forwarder must not relay through the container's fd number: once that fd is closed
    the number may name another container's namespace."""
    server = sandbox.start([*HTTP, "8000"], network=sandbox.network())
    server.wait_for_port(8000)
    host, port = server.address(8000)
    forwarder = probes.forwarders(server)[8000]
    container_fd = probes.container_netns_fd(server)
    assert container_fd is not None
    assert forwarder.netns_fd != container_fd
    assert os.readlink(f"/proc/self/fd/{forwarder.netns_fd}") == os.readlink(f"/proc/self/fd/{container_fd}")
    assert urllib.request.urlopen(f"http://{host}:{port}/").status == 200
    server.remove()  # closes both references (the leak check counts this process's fds)
    assert probes.forwarder_closed(forwarder)


def test_a_forked_child_gets_an_error_not_a_hang(sandbox: Sandbox) -> None:
    """After os.fork() the child has no psbx-net thread: network calls on the parent's objects
    must fail at once rather than wait forever for a thread that does not exist there."""
    c = sandbox.start([*HTTP, "8000"], network=sandbox.network())
    c.wait_for_port(8000)
    c.address(8000)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            os.close(r)
            try:
                c.wait_for_port(8000, timeout=2)
            except NetworkError as e:
                os.write(w, f"NetworkError: {e}".encode())
                code = 0
        finally:
            os._exit(code)
    os.close(w)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            time.sleep(0.02)
        else:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            pytest.fail("the forked child hung on a network call")
        message = os.read(r, 4096).decode()
    finally:
        os.close(r)
    assert os.waitstatus_to_exitcode(status) == 0, message
    assert "fork" in message


def test_host_addresses_are_not_reachable_from_a_network(sandbox: Sandbox) -> None:
    """Not only the host's loopback: none of the host's addresses (a listener on 0.0.0.0)."""
    listener = socket.socket()
    listener.bind(("0.0.0.0", 0))
    listener.listen()
    port = listener.getsockname()[1]
    with IPRoute() as ipr:  # this thread is in the host's namespace
        addresses = [str(m.get("address")) for m in ipr.get_addr(family=socket.AF_INET)]
    addresses = [a for a in addresses if not a.startswith("127.")]
    assert addresses, "the host should have a non-loopback address to try"
    net = sandbox.network()
    try:
        code = (
            "import socket, sys\n"
            "for a in sys.argv[1:]:\n"
            f"    s = socket.socket(); s.settimeout(2); print(a, s.connect_ex((a, {port})))\n"
        )
        r = sandbox.run(["python3", "-c", code, *addresses], network=net)
        for line in r.stdout.decode().splitlines():
            assert line.split()[1] == "101", r  # ENETUNREACH: no route out of the network at all
        assert len(r.stdout.splitlines()) == len(addresses), r
        listener.settimeout(0.2)
        with pytest.raises(TimeoutError):
            listener.accept()
    finally:
        listener.close()


def test_the_hosts_abstract_unix_sockets_are_not_reachable(sandbox: Sandbox) -> None:
    """CVE-2020-15257: abstract unix socket names are per network namespace; none of the host's
    is reachable from a container, with or without a private network."""
    name = f"\0psbx-test-{os.getpid()}-{time.monotonic_ns()}"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(name)
    listener.listen()
    code = (
        "import socket, sys\n"
        "s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n"
        "print(s.connect_ex('\\0' + sys.argv[1][1:]))\n"
    )
    try:
        # The probe itself works: from the host's namespace the name answers.
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        assert probe.connect_ex(name) == 0
        probe.close()
        listener.accept()[0].close()
        for network in (None, sandbox.network()):
            r = sandbox.run(["python3", "-c", code, "@" + name[1:]], network=network)
            assert r.stdout.strip() == b"111", r  # ECONNREFUSED: no such name in its namespace
        listener.settimeout(0.2)
        with pytest.raises(TimeoutError):
            listener.accept()
    finally:
        listener.close()


def test_container_root_cannot_change_its_network_sysctls_nor_open_raw_sockets(sandbox: Sandbox) -> None:
    """The prepared namespace is owned by the host's user namespace: no CAP_NET_ADMIN (sysctls,
    addresses) and no CAP_NET_RAW (packet sockets, so no sniffing or forged frames) there."""
    code = (
        "import socket, errno\n"
        "out = []\n"
        "try:\n"
        "    open('/proc/sys/net/ipv4/ip_forward', 'w').write('1'); out.append('written')\n"
        "except OSError as e: out.append(errno.errorcode[e.errno])\n"
        "for fam, kind, proto in ((socket.AF_PACKET, socket.SOCK_RAW, 0x300), "
        "(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP)):\n"
        "    try: socket.socket(fam, kind, proto); out.append('opened')\n"
        "    except OSError as e: out.append(errno.errorcode[e.errno])\n"
        "print(*out)\n"
    )
    r = sandbox.run(["python3", "-c", code], network=sandbox.network())
    sysctl, packet, raw = r.stdout.split()
    assert sysctl in (b"EROFS", b"EACCES", b"EPERM"), r
    assert packet == raw == b"EPERM", r


def test_the_hub_and_the_containers_do_not_forward(sandbox: Sandbox) -> None:
    """Forwarding is off in the hub whatever the host has (a new namespace copies the host's IPv4
    conf/all, ip_forward included: net.core.devconf_inherit_init_net)."""
    net = sandbox.network()
    c = sandbox.start(["sleep", "60"], network=net)
    hub = probes.hub()
    values = hub.sysctls(
        "net/ipv4/ip_forward",
        "net/ipv6/conf/all/forwarding",
        "net/ipv4/conf/all/route_localnet",
        f"net/ipv4/conf/{net.bridge}/route_localnet",
    )
    assert values == ["0", "0", "0", "0"], values
    inside = c.exec(["cat", "/proc/sys/net/ipv4/ip_forward", "/proc/sys/net/ipv4/conf/all/route_localnet"])
    assert inside.stdout.split() == [b"0", b"0"], inside


def test_network_objects_used_after_the_session_closed_them(tmp_path: Any) -> None:
    """Teardown order is not ours to choose (a handle closed after the runtime, at exit): closing
    a forwarder, a container's namespace or a network after the networks closed must neither
    raise nor leave an fd open (the leak check counts them), and nothing new may be made."""
    from pytest_sandbox.core.naming import owner_tag
    from pytest_sandbox.net.forward import Forwarder
    from pytest_sandbox.net.ipam import DEFAULT_POOLS
    from pytest_sandbox.net.networks import Networks

    networks = Networks(DEFAULT_POOLS, lease_dir=str(tmp_path), owner=owner_tag())
    net = networks.create()
    attached = networks.attach([net], ["x"])
    forwarder = Forwarder(networks.net, os.dup(attached.netns_fd), (str(attached.ip()), 80))

    def refused() -> bytes:  # nothing listens inside: the client's connection is reset
        with socket.create_connection(forwarder.address, timeout=5) as c:
            return c.recv(1)

    with pytest.raises(ConnectionResetError):
        refused()
    networks.close()
    forwarder.close()
    forwarder.close()
    attached.release()
    net.close()
    assert networks.leases.mine() == []
    with pytest.raises(NetworkError, match="closed"):
        networks.create()
    with pytest.raises(NetworkError, match="closed"):
        Sandbox(runtime=probes.closed_runtime()).network()


def test_ipv6_link_local_does_not_cross_networks(sandbox: Sandbox) -> None:
    """IPv4 has no route between networks; IPv6 link-local needs none -- but it needs a link,
    and two networks share none (the hub bridges nothing between them, forwards nothing)."""
    a_net, b_net = sandbox.network(), sandbox.network()
    server = (
        "import socket\n"
        "s = socket.socket(socket.AF_INET6); s.bind(('::', 8000)); s.listen(); print('up', flush=True)\n"
        "while True: s.accept()[0].close()\n"
    )
    a = sandbox.start(["python3", "-c", server], network=a_net)
    a.wait_for_log("up")
    addr = a.exec(["python3", "-c", LINK_LOCAL]).stdout.decode().strip()
    assert addr.startswith("fe80:"), addr
    # The probe retries while its own link-local address is tentative (EADDRNOTAVAIL until
    # duplicate address detection is done, ~1 s after the interface came up).
    code = (
        "import socket, sys, time\n"
        "for _ in range(50):\n"
        "    s = socket.socket(socket.AF_INET6); s.settimeout(2)\n"
        "    err = s.connect_ex((sys.argv[1], 8000, 0, socket.if_nametoindex('eth0')))\n"
        "    if err != 99: break\n"
        "    time.sleep(0.1)\n"
        "print(err)\n"
    )
    probes = [sandbox.start(["python3", "-c", code, addr], network=n) for n in (a_net, b_net)]
    same, other = (p.wait(30) for p in probes)
    assert same.stdout.strip() == b"0", same  # the probe works on the same link
    # EHOSTUNREACH (neighbour discovery found no one) or the 2 s timeout (EAGAIN).
    assert other.stdout.strip() in (b"113", b"11"), other


LINK_LOCAL = """
for line in open('/proc/net/if_inet6'):
    hexaddr, _, _, scope, _, name = line.split()
    if name == 'eth0' and scope == '20':
        print(':'.join(hexaddr[i:i + 4] for i in range(0, 32, 4)))
"""


def test_a_refused_upstream_resets_the_clients_connection(sandbox: Sandbox) -> None:
    """Nothing listens on the port inside: the client's connection is reset, as a refused connect
    would fail -- not closed cleanly, which would look like a service that answered nothing."""
    c = sandbox.start(["sleep", "60"], network=sandbox.network())
    address = c.address(8080)

    def exchange() -> bytes:
        with socket.create_connection(address, timeout=5) as s:
            s.sendall(b"GET / HTTP/1.0\r\n\r\n")
            return s.recv(1)

    for _ in range(3):  # the reset may come before connect() returns, or at the first read
        with pytest.raises(ConnectionResetError):
            exchange()


CLIENT = """
import socket, sys
sys.stdin.readline()  # go
with socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=20) as s:
    s.sendall(b"ping")
    s.shutdown(socket.SHUT_WR)
    print(s.recv(100).decode(), flush=True)
"""


def test_out_of_fds_the_forwarder_pauses_instead_of_spinning(sandbox: Sandbox) -> None:
    """accept() failing with EMFILE leaves the connection queued and the listener readable: psbx-net
    must not spin on it.  With every fd of this process taken for half a second, its CPU time stays
    low; once fds are free, the queued connection is served."""
    echo = (
        "import socket; s = socket.socket(); s.bind(('0.0.0.0', 7)); s.listen(); print('up', flush=True)\n"
        "c, _ = s.accept(); c.sendall(c.recv(100).upper()); c.close()\n"
    )
    server = sandbox.start(["python3", "-c", echo], network=sandbox.network())
    server.wait_for_log("up")
    _, port = server.address(7)
    client = subprocess.Popen(
        [sys.executable, "-c", CLIENT, str(port)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert client.stdin is not None
    assert client.stdout is not None
    tid = probes.net_thread_id()
    stat = open(f"/proc/self/task/{tid}/stat")  # noqa: SIM115 -- kept open: no fd to spare later

    def cpu_ticks() -> int:
        stat.seek(0)
        fields = stat.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    fillers: list[int] = []
    try:
        resource.setrlimit(
            resource.RLIMIT_NOFILE, (max(int(fd) for fd in os.listdir("/proc/self/fd")) + 8, hard)
        )
        with contextlib.suppress(OSError):
            while True:
                fillers.append(os.dup(0))
        before = cpu_ticks()
        client.stdin.write("go\n")
        client.stdin.flush()
        time.sleep(0.5)
        spent = cpu_ticks() - before
    finally:
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    try:
        assert spent < 0.2 * os.sysconf("SC_CLK_TCK"), f"psbx-net spun: {spent} ticks in 0.5 s"
        assert client.stdout.readline().strip() == "PING"  # served once fds were free again
        assert client.wait(20) == 0
    finally:
        stat.close()
        client.stdin.close()
        client.stdout.close()
        if client.poll() is None:
            client.kill()
            client.wait()
