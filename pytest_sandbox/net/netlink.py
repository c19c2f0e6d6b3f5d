"""Netlink through pyroute2: the session's hub namespace, its bridges, containers' veths.

The only module that imports pyroute2 (imported lazily: it costs ~160 ms, paid only by sessions
that make a network).  Everything here runs on ``psbx-net`` (:mod:`pytest_sandbox.net.netthread`):
pyroute2 0.9 opens one netlink socket per *thread* per object, in the namespace the thread is in
at that moment, so each object is made and used on that one thread, in a known namespace.

Layout (docs/architecture.md, "Networks"): no object of ours is in the host's namespace.

* The **hub** is a network namespace this process creates and holds by fd only (never a bind
  mount under /run/netns): when the process dies, even by SIGKILL, the kernel frees it and every
  bridge and veth end in it.  It holds one bridge per network and no IPv4 address: bridges switch
  frames within a network, and the hub routes nothing -- forwarding is switched off explicitly
  (:data:`ISOLATING_SYSCTLS`), because a new namespace *copies* the host's IPv4 ``conf/all`` and
  ``conf/default``, ``ip_forward`` included (``net.core.devconf_inherit_init_net`` = 0, the
  default; Documentation/admin-guide/sysctl/net.rst), and a Docker or Kubernetes host has
  ip_forward = 1 -- so networks cannot reach one another.
* A networked container's namespace is made here too, *before* the container: lo up, the
  sysctls Docker sets (unprivileged ports from 0, ping for every group) and the isolating ones
  (no forwarding, no ``route_localnet``: CVE-2020-8558), one veth per network --
  the peer created directly inside (IFLA_NET_NS_FD), its address set, the hub end enslaved to the
  network's bridge.  The container joins it (setns) instead of making its own.  The namespace is
  owned by the host's user namespace, so the container's root cannot change addresses or routes
  (CAP_NET_ADMIN there is host root's only), which is what keeps one network from reaching another.
* A veth is never deleted one by one: the kernel destroys both ends with the container's
  namespace (an explicit delete waits ~26 ms on RCU).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..core.errors import NetworkError
from ..host import libc
from .netthread import NetThread

if TYPE_CHECKING:
    from pyroute2 import IPRoute

# Set in the hub and in every container namespace, whatever the host has: a new namespace copies
# the host's IPv4 conf/all and conf/default (ip_forward is conf/all/forwarding), so a host with
# forwarding or route_localnet on would hand them to ours.  "default" before any interface is
# made, so bridges and veths are created with them off too.  IPv6 conf is reset to the kernel's
# defaults in a new namespace (forwarding 0) but is set anyway: devconf_inherit_init_net may be 1.
ISOLATING_SYSCTLS = (
    ("net/ipv4/ip_forward", "0"),
    ("net/ipv4/conf/all/route_localnet", "0"),
    ("net/ipv4/conf/default/route_localnet", "0"),
    ("net/ipv6/conf/all/forwarding", "0"),
    ("net/ipv6/conf/default/forwarding", "0"),
)

# What Docker sets in every container's namespace (moby daemon/oci_linux.go, since 20.10).
CONTAINER_SYSCTLS = (
    *ISOLATING_SYSCTLS,
    ("net/ipv4/ip_unprivileged_port_start", "0"),
    ("net/ipv4/ping_group_range", "0 2147483647"),
)


def _write_sysctls(pairs: Sequence[tuple[str, str]]) -> None:
    """Write sysctls of the calling thread's network namespace (on psbx-net, inside it).

    /proc/sys/net resolves to the namespace of the thread that opens the file (proc_sys_net's
    net_ctl_header_lookup uses current->nsproxy).  An ipv6 key is missing when IPv6 is disabled
    (ipv6.disable=1): nothing to switch off then.
    """
    for key, value in pairs:
        try:
            with open(f"/proc/sys/{key}", "w") as f:
                f.write(value)
        except FileNotFoundError:
            if not key.startswith("net/ipv6/"):
                raise


def require_pyroute2() -> None:
    """Import pyroute2 in the calling thread, or raise a NetworkError that says how to get it.

    Called before a network is made: without it the first import would happen on psbx-net, and
    its ModuleNotFoundError would surface there instead of in the test that asked for a network.
    """
    try:
        import pyroute2  # noqa: F401
    except ImportError as e:  # a dependency of the package; missing only from a broken install
        raise NetworkError(
            f"private networks need the pyroute2 package, which cannot be imported ({e})",
            hint="pip install pyroute2 (it is a dependency of pytest-sandbox: reinstall it)",
        ) from None


def _ipr() -> IPRoute:
    require_pyroute2()  # checked again here: a Hub may be made without Networks.create
    from pyroute2 import IPRoute

    return IPRoute()


class _netlink(contextlib.AbstractContextManager["_netlink"]):
    """Turn pyroute2's NetlinkError (an OSError) into a NetworkError naming the operation."""

    def __init__(self, what: str) -> None:
        self.what = what

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        if isinstance(exc, OSError) and not isinstance(exc, NetworkError):
            code = exc.errno or 0
            raise NetworkError(f"{self.what}: {os.strerror(code) if code else exc}") from exc


@dataclass(frozen=True)
class Attachment:
    """One network of a container: the hub-side veth name, the bridge, the container's address."""

    bridge_index: int
    host_ifname: str  # the veth end in the hub (<= 15 bytes, from naming)
    ifname: str  # inside the container: eth0, eth1, ...
    interface: ipaddress.IPv4Interface


class Hub:
    """The session's hub network namespace and its bridges; closed with the session."""

    def __init__(self, net: NetThread) -> None:
        self.net = net
        self.fd, self._ipr = net.call(self._make)

    def _make(self) -> tuple[int, IPRoute]:
        fd = self.net.new_netns()
        try:
            _write_sysctls(ISOLATING_SYSCTLS)
            with _netlink("hub: netlink socket"):
                ipr = _ipr()  # made inside the hub: its socket stays there
        except BaseException:
            os.close(fd)
            raise
        finally:
            self.net.go_home()
        return fd, ipr

    def add_bridge(self, name: str) -> int:
        """A bridge in the hub, up; its interface index."""

        def add() -> int:
            with _netlink(f"create bridge {name}"):
                self._ipr.link("add", ifname=name, kind="bridge")
                (index,) = self._ipr.link_lookup(ifname=name)
                self._ipr.link("set", index=index, state="up")
            return int(index)

        return self.net.call(add)

    def remove_bridge(self, index: int) -> None:
        def remove() -> None:
            with contextlib.suppress(OSError):  # gone already: nothing to do
                self._ipr.link("del", index=index)

        self.net.submit(remove)  # not waited for: nothing depends on it, and it waits on RCU

    def container_netns(self, attachments: Sequence[Attachment]) -> int:
        """A new namespace for one container, wired to ``attachments``' bridges; its fd."""
        return self.net.call(lambda: self.make_container_netns(attachments))

    def make_container_netns(self, attachments: Sequence[Attachment]) -> int:
        """:meth:`container_netns`, on psbx-net (as a job submitted ahead of time)."""
        fd = self.net.new_netns()  # psbx-net is now inside it
        try:
            with _netlink("container network namespace"):
                inside = _ipr()
            try:
                # SIOCSIFFLAGS, as the launcher does for unnetworked containers: one ioctl, where
                # a pyroute2 request costs ~0.3 ms of Python on every start.
                libc.loopback_up()
                _write_sysctls(CONTAINER_SYSCTLS)  # before the veth: it takes "default"
                for a in attachments:
                    with _netlink(f"create veth {a.host_ifname} to {a.ifname}"):
                        self._ipr.link(
                            "add",
                            ifname=a.host_ifname,
                            kind="veth",
                            master=a.bridge_index,
                            state="up",
                            peer={"ifname": a.ifname, "net_ns_fd": fd},
                        )
                    with _netlink(f"configure {a.ifname} ({a.interface})"):
                        (index,) = inside.link_lookup(ifname=a.ifname)
                        inside.addr(
                            "add",
                            index=index,
                            address=str(a.interface.ip),
                            prefixlen=a.interface.network.prefixlen,
                        )
                        inside.link("set", index=index, state="up")
            finally:
                inside.close()
        except BaseException:
            os.close(fd)  # the kernel removes the namespace, with the veths made so far
            raise
        finally:
            self.net.go_home()
        return fd

    def link_names(self) -> list[str]:
        """Names of the interfaces in the hub now (bridges and hub-side veth ends)."""

        def names() -> list[str]:
            with _netlink("list the hub's interfaces"):
                return [str(m.get("ifname")) for m in self._ipr.get_links()]

        return self.net.call(names)

    def sysctls(self, *keys: str) -> list[str]:
        """The hub's values of ``keys`` (e.g. ``"net/ipv4/ip_forward"``), for checks and tests."""

        def read() -> list[str]:
            with self.net.inside(self.fd):
                out = []
                for key in keys:
                    with open(f"/proc/sys/{key}") as f:
                        out.append(f.read().strip())
                return out

        return self.net.call(read)

    def close(self) -> None:
        """Close the hub: the kernel frees it with every bridge and veth end in it."""

        def close() -> None:
            self._ipr.close()

        with contextlib.suppress(NetworkError):
            self.net.call(close)
        os.close(self.fd)


def socket_in(net: NetThread, netns_fd: int, family: int = socket.AF_INET) -> socket.socket:
    """A TCP socket created in ``netns_fd``'s namespace (usable from any thread afterwards)."""

    def make() -> socket.socket:
        with net.inside(netns_fd):
            return socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)

    return net.call(make)


def host_networks(net: NetThread) -> list[ipaddress.IPv4Network]:
    """IPv4 networks the host uses: its addresses' subnets and its routes' destinations."""

    def read() -> list[ipaddress.IPv4Network]:
        ipr = _ipr()  # psbx-net is at home: the host's namespace
        try:
            out = []
            for msg in ipr.get_addr(family=socket.AF_INET):
                out.append(ipaddress.IPv4Network(f"{msg.get('address')}/{msg['prefixlen']}", strict=False))
            for msg in ipr.get_routes(family=socket.AF_INET):
                dst, length = msg.get("dst"), msg["dst_len"]
                if dst and length:
                    out.append(ipaddress.IPv4Network(f"{dst}/{length}", strict=False))
            return out
        finally:
            ipr.close()

    with _netlink("read the host's addresses and routes"):
        return net.call(read)
