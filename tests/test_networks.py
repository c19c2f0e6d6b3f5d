"""Private networks: real bridges and veths in the session's hub namespace, real TCP between
containers, published ports reached from this process, readiness waits, and isolation.

Every container here runs the host's python3 (the default image).  Servers are plain
``python3 -m http.server`` or a few lines of socket code, so the tests need nothing in an image.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import threading
import time
import urllib.request
from typing import Any

import pytest

from pytest_sandbox import Sandbox
from pytest_sandbox.errors import (
    CommandNotFoundError,
    ContainerNotRunningError,
    ContainerStateError,
    InvalidSpecError,
    NetworkError,
    ReadinessError,
)
from pytest_sandbox.runtime import get_runtime

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
    for src_net, dst in ((a_net, b), (b_net, a)):
        r = sandbox.run(connect_code(dst.ip(), 80), network=src_net)
        assert r.stdout.strip() != b"0", r
        assert sandbox.run(["getent", "hosts", dst.name], network=src_net).exit_code != 0
    # From inside a running container too, and its root cannot add a route or an address.
    r = a.exec(connect_code(b.ip(), 80))
    assert r.stdout.strip() != b"0"
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
    hub_links = get_runtime().networks.hub.link_names()
    assert net.bridge in hub_links
    assert any(n.startswith("psbxv") for n in hub_links)
    assert all(len(n.encode()) <= 15 for n in hub_links)
    # The container's namespace is not the host's, nor the hub's.
    inside = os.readlink(f"/proc/{c.init_pid}/ns/net")
    assert inside != os.readlink("/proc/self/ns/net")


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
    before = os.listdir(get_runtime().state_dir) if os.path.isdir(get_runtime().state_dir) else []
    with pytest.raises(InvalidSpecError, match=match):
        sandbox.run(["true"], **kwargs)
    assert os.listdir(get_runtime().state_dir) == before


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


def test_an_explicit_subnet_and_a_full_one(sandbox: Sandbox) -> None:
    net = sandbox.network(subnet="10.99.7.0/29")  # .1 kept free: .2 - .6 for containers
    assert str(net.subnet) == "10.99.7.0/29"
    started = [sandbox.start(["sleep", "30"], network=net) for _ in range(5)]
    assert [c.ip() for c in started] == [f"10.99.7.{i}" for i in range(2, 7)]
    with pytest.raises(NetworkError, match="no free address"):
        sandbox.start(["sleep", "30"], network=net)
    started[0].remove()
    assert sandbox.start(["sleep", "30"], network=net).ip() == "10.99.7.2"  # freed, reused


def test_a_networked_start_that_fails_gives_everything_back(sandbox: Sandbox) -> None:
    net = sandbox.network()
    networks = get_runtime().networks
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
