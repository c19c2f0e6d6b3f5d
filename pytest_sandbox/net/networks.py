"""Private networks as a test sees them: ``sandbox.network()``, addresses, names, published ports.

Composition over :mod:`~pytest_sandbox.net.netlink` (netlink), :mod:`~pytest_sandbox.net.ipam` (subnets),
:mod:`~pytest_sandbox.net.forward` (published ports) and :mod:`~pytest_sandbox.net.netthread`.

* One :class:`Networks` per pytest process (the runtime holds it): the ``psbx-net`` thread, the
  hub namespace (made on first use), the subnet leases.  Closing it -- or the process dying --
  frees the hub and everything in it.
* A :class:`Network` is one bridge in the hub with one leased subnet, or the ``subnet=`` given,
  which must not overlap another network of this process (Docker's "Pool overlaps").  Containers
  get the next free address (``.1`` is kept free, as Docker keeps it for the gateway).
* Names: every member of a network is written to the ``/etc/hosts`` of every other member --
  ``<address> <name> <aliases...> <hostname>`` -- a file of the container's state directory
  bind-mounted read-only; containers joining later are *appended* (O_APPEND, one write per
  line), so a running service learns new peers without a DNS server.  A member that leaves has
  its line turned into a comment in place (one byte, ``#``): resolvers take the first matching
  line, so a stale line would shadow a later container of the same name.  The file is edited in
  place, never replaced, because a bind mount pins the inode it was made on.  Joins and leaves of
  all networks are serialized (one lock per process), so a member's own file and its peers' are
  always written from the same membership.
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import os
import threading
from collections.abc import Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

from ..config import AddressPool
from ..core import naming
from ..core.errors import InvalidSpecError, NetworkError
from .ipam import DEFAULT_POOLS, LEASE_DIR, SubnetLeases, parse_subnet
from .netlink import Attachment, Hub, host_networks, require_pyroute2
from .netthread import NetThread

LOCALHOST_LINES = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"


@dataclass
class Member:
    """A container on one network."""

    container_id: str
    interface: ipaddress.IPv4Interface
    names: tuple[str, ...]  # name, aliases, hostname (what resolves to the address)
    hosts_file: str  # its /etc/hosts on the host, to append peers to

    def hosts_line(self) -> str:
        return f"{self.interface.ip}\t{' '.join(self.names)}\n"


class Network:
    """A private L2 network (a bridge in the session's hub) with its own subnet."""

    def __init__(
        self,
        manager: Networks,
        *,
        name: str,
        subnet: ipaddress.IPv4Network,
        leased: bool,
        bridge: str,
        index: int,
    ) -> None:
        self._manager = manager
        self.name = name
        self.subnet = subnet
        self.bridge = bridge  # the bridge's name in the hub namespace
        self.bridge_index = index
        self._leased = leased
        self._members: dict[str, Member] = {}
        self._fresh = itertools.islice(subnet.hosts(), 1, None)  # .1 stays free (the gateway's)
        self._freed: list[ipaddress.IPv4Address] = []
        self._lock = threading.Lock()
        self._spare: _Spare | None = None
        self.closed = False

    def __repr__(self) -> str:
        state = " closed" if self.closed else ""
        return f"<Network {self.name} {self.subnet}{state}>"

    @property
    def members(self) -> dict[str, ipaddress.IPv4Address]:
        """Container id -> address, for every container on this network now."""
        with self._lock:
            return {cid: m.interface.ip for cid, m in self._members.items()}

    def _reserve(self) -> ipaddress.IPv4Interface:
        with self._lock:
            if self.closed:
                raise NetworkError(f"network {self.name} is closed (its fixture scope has ended)")
            address = next(self._fresh, None)
            if address is None and self._freed:
                address = self._freed.pop(0)  # the oldest freed: least likely to be in a stale line
            if address is None:
                raise NetworkError(
                    f"network {self.name} ({self.subnet}) has no free address left",
                    hint="make a network with a larger subnet= (e.g. a /16), or stop containers",
                )
            return ipaddress.IPv4Interface(f"{address}/{self.subnet.prefixlen}")

    def _offer_spare(self, spare: _Spare) -> bool:
        with self._lock:
            if self._spare is not None or self.closed:
                return False
            self._spare = spare
            return True

    def _unreserve(self, interface: ipaddress.IPv4Interface) -> None:
        with self._lock:
            self._freed.append(interface.ip)

    def _names_taken(self, names: Iterable[str]) -> str | None:
        with self._lock:
            used = {n for m in self._members.values() for n in m.names}
        return next((n for n in names if n in used), None)

    def _join(self, member: Member) -> list[Member]:
        """Add ``member``; the members already there (whose hosts files learn the new one).
        Called with the manager's membership lock held."""
        with self._lock:
            others = list(self._members.values())
            self._members[member.container_id] = member
        for other in others:
            _append(other.hosts_file, member.hosts_line())
        return others

    def _leave(self, container_id: str) -> None:
        with self._manager._membership:
            with self._lock:
                member = self._members.pop(container_id, None)
                if member is not None:
                    self._freed.append(member.interface.ip)
                others = list(self._members.values())
            if member is not None:
                for other in others:
                    _comment_out(other.hosts_file, member.hosts_line())

    def close(self) -> None:
        """Remove the bridge and give the subnet back.  Containers still on it keep running
        (their side of the link is down); closing the sandbox removes them first."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
        self._manager._closed_network(self)


def _comment_out(path: str, line: str) -> None:
    """Turn every live copy of ``line`` in a running container's /etc/hosts into a comment.

    In place (the bind mount pins the inode), one byte per line: a concurrent reader sees the line
    whole, live or commented, never torn.
    """
    with contextlib.suppress(FileNotFoundError):  # removed meanwhile: nobody reads it any more
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            data = os.pread(fd, os.fstat(fd).st_size, 0)
            target, offset = line.encode(), 0
            for raw in data.splitlines(keepends=True):
                if raw == target:
                    os.pwrite(fd, b"#", offset)
                offset += len(raw)
        finally:
            os.close(fd)


def _append(path: str, line: str) -> None:
    """Append one line to a running container's /etc/hosts (a bind-mounted file of its own)."""
    with contextlib.suppress(FileNotFoundError):  # removed meanwhile: nobody reads it any more
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            os.write(fd, line.encode())  # one write: a reader sees the whole line or none of it
        finally:
            os.close(fd)


@dataclass(frozen=True)
class _Spare:
    """A container namespace on one network, being made ahead of the start that will use it."""

    future: Future[int]
    interface: ipaddress.IPv4Interface
    host_ifname: str

    def discard(self) -> None:
        def close(f: Future[int]) -> None:
            if not f.cancelled() and f.exception() is None:
                os.close(f.result())  # the kernel removes the namespace and its veth

        self.future.add_done_callback(close)


@dataclass
class Attached:
    """A container's side of its networks, from before it starts until it is removed."""

    netns_fd: int
    networks: tuple[Network, ...]
    interfaces: tuple[ipaddress.IPv4Interface, ...]
    members: list[tuple[Network, Member]] = field(default_factory=list)
    released: bool = False

    @property
    def netns_path(self) -> str:
        # How the container's first process (root, in the host's /proc) opens the namespace: this
        # process keeps the fd open until the container is removed, so the number cannot be reused.
        return f"/proc/{os.getpid()}/fd/{self.netns_fd}"

    def ip(self, network: Network | None = None) -> ipaddress.IPv4Address:
        if network is None:
            return self.interfaces[0].ip
        for net, interface in zip(self.networks, self.interfaces, strict=False):
            if net is network:
                return interface.ip
        raise InvalidSpecError(f"the container is not on network {network.name}")

    def release(self) -> None:
        """Leave the networks and close the namespace fd (the kernel then removes the veths)."""
        if self.released:
            return
        self.released = True
        for net, member in self.members:
            net._leave(member.container_id)
        if not self.members:
            for net, interface in zip(self.networks, self.interfaces, strict=False):
                net._unreserve(interface)
        os.close(self.netns_fd)


class Networks:
    """This process's networks: the psbx-net thread, the hub, the subnet leases."""

    def __init__(
        self,
        pools: Sequence[AddressPool] = DEFAULT_POOLS,
        lease_dir: str = LEASE_DIR,
        owner: str | None = None,
    ) -> None:
        self.pools = tuple(pools)
        self.leases = SubnetLeases(lease_dir, owner)
        self._lock = threading.Lock()
        # Held across "write a new member's hosts file from the members now" and "add it, append
        # it to theirs" (and across a leave): two containers starting at once from two threads
        # would otherwise each miss the other.  Reentrant: a leave may run inside a failed join.
        self._membership = threading.RLock()
        self._net: NetThread | None = None
        self._hub: Hub | None = None
        self._serial = itertools.count()
        self._names: set[str] = set()
        self._open: list[Network] = []
        # Subnet -> the name of this process's network holding it (under _lock).  _choosing is
        # held across "is it free" and "record it", so two threads cannot both take one subnet.
        self._subnets: dict[ipaddress.IPv4Network, str] = {}
        self._choosing = threading.Lock()
        self.closed = False

    @property
    def net(self) -> NetThread:
        with self._lock:
            if self.closed:
                raise NetworkError("networks are closed (the session is ending)")
            if self._net is None:
                self._net = NetThread()
            return self._net

    @property
    def hub(self) -> Hub:
        net = self.net
        with self._lock:
            if self._hub is None:
                self._hub = Hub(net)
            return self._hub

    def interface_name(self, kind: str) -> str:
        return naming.interface_name(kind, next(self._serial))

    def create(self, subnet: object = None, name: object = None) -> Network:
        """A new network: ``subnet`` (e.g. ``"10.50.0.0/24"``) or the next free one of the pools."""
        explicit = parse_subnet(subnet)
        require_pyroute2()
        if name is not None and (not isinstance(name, str) or not naming.valid_name(name)):
            raise InvalidSpecError(
                f"name={name!r}: expected letters, digits, '_', '.', '-' (starting with a letter or digit), "
                "at most 63 characters"
            )
        with self._lock:
            label = name or f"net{next(self._serial)}"
            if label in self._names:
                raise InvalidSpecError(f"name={label!r}: a network with this name already exists here")
            self._names.add(label)
        try:
            hub = self.hub
            chosen = self._choose_subnet(explicit, label, hub)
            try:
                bridge = self.interface_name("b")
                index = hub.add_bridge(bridge)
            except BaseException:
                self._give_back(chosen, leased=explicit is None)
                raise
        except BaseException:
            with self._lock:
                self._names.discard(label)
            raise
        network = Network(
            self, name=label, subnet=chosen, leased=explicit is None, bridge=bridge, index=index
        )
        with self._lock:
            self._open.append(network)
        return network

    def _choose_subnet(
        self, explicit: ipaddress.IPv4Network | None, label: str, hub: Hub
    ) -> ipaddress.IPv4Network:
        """``explicit`` if no network of this process overlaps it, else the next free subnet of
        the pools (leased host-wide, and skipping this process's explicit subnets); recorded."""
        with self._choosing:
            with self._lock:
                held = dict(self._subnets)
            if explicit is None:
                chosen = self.leases.allocate(self.pools, lambda: [*host_networks(hub.net), *held])
            else:
                # Two bridges of one hub with overlapping subnets: a container on both would get
                # one address twice (eth0 and eth1) and route to only one (Docker refuses it too).
                # Not leased: another process's hub is its own namespace, never meets this one, and
                # refusing there would fail parallel tests that pick the same fixed subnet.
                chosen = explicit
                for subnet, holder in held.items():
                    if subnet.overlaps(explicit):
                        raise NetworkError(
                            f"subnet={str(explicit)!r}: Pool overlaps with other one on this address "
                            f"space: network {holder!r} has {subnet}",
                            hint=f"choose a subnet outside {subnet}, leave subnet= out for a free one, "
                            f"or close network {holder!r} first",
                        )
            with self._lock:
                self._subnets[chosen] = label
            return chosen

    def _give_back(self, subnet: ipaddress.IPv4Network, *, leased: bool) -> None:
        with self._lock:
            self._subnets.pop(subnet, None)
        if leased:
            self.leases.release(subnet)

    def attach(self, networks: Sequence[Network], names: Sequence[str]) -> Attached:
        """Reserve addresses and make the container's namespace, wired to ``networks``."""
        for net in networks:
            if net._manager is not self:
                raise InvalidSpecError(f"network {net.name} belongs to another process (made before a fork)")
            taken = net._names_taken(names)
            if taken is not None:
                raise InvalidSpecError(f"name {taken!r} is already used on network {net.name}")
        if len(networks) == 1:
            spare = self._take_spare(networks[0])
            if spare is not None:
                self._prepare_spare(networks[0])  # for the next start, while this one runs
                return Attached(spare[0], tuple(networks), (spare[1],))
        interfaces: list[ipaddress.IPv4Interface] = []
        try:
            for net in networks:
                interfaces.append(net._reserve())
            attachments = [
                Attachment(net.bridge_index, self.interface_name("v"), f"eth{i}", interface)
                for i, (net, interface) in enumerate(zip(networks, interfaces, strict=False))
            ]
            fd = self.hub.container_netns(attachments)
        except BaseException:
            for net, interface in zip(networks, interfaces, strict=False):
                net._unreserve(interface)
            raise
        if len(networks) == 1:
            self._prepare_spare(networks[0])
        return Attached(fd, tuple(networks), tuple(interfaces))

    def _prepare_spare(self, net: Network) -> None:
        """Start making the next one-network namespace of ``net`` on psbx-net (~4 ms of netlink),
        so that the next start on it only takes it: the same idea as the launcher's spare."""
        with net._lock:
            if net._spare is not None or net.closed:
                return
        try:
            interface = net._reserve()
        except NetworkError:
            return  # full: the next start says so itself
        attachment = Attachment(net.bridge_index, self.interface_name("v"), "eth0", interface)
        hub = self.hub
        spare = _Spare(
            hub.net.submit(lambda: hub.make_container_netns([attachment])), interface, attachment.host_ifname
        )
        if not net._offer_spare(spare):
            spare.discard()
            net._unreserve(interface)

    def _take_spare(self, net: Network) -> tuple[int, ipaddress.IPv4Interface] | None:
        with net._lock:
            spare, net._spare = net._spare, None
        if spare is None:
            return None
        try:
            return spare.future.result(), spare.interface
        except Exception:
            net._unreserve(spare.interface)
            return None  # made on demand instead, which reports the error if it is lasting

    def spare_links(self) -> set[str]:
        """Hub-side veth names of namespaces made ahead of time (not leaks: for the leak check)."""
        with self._lock:
            networks = list(self._open)
        return {n._spare.host_ifname for n in networks if n._spare is not None}

    def hosts_file(self, attached: Attached, names: Sequence[str]) -> str:
        """The /etc/hosts of a container joining ``attached.networks``: itself and their members."""
        lines = [LOCALHOST_LINES]
        seen: set[str] = set()
        for interface in attached.interfaces:
            lines.append(f"{interface.ip}\t{' '.join(names)}\n")
        for net in attached.networks:
            with net._lock:
                for member in net._members.values():
                    line = member.hosts_line()
                    if line not in seen:
                        seen.add(line)
                        lines.append(line)
        return "".join(lines)

    def join(self, attached: Attached, container_id: str, names: Sequence[str], hosts_file: str) -> None:
        """Write the container's /etc/hosts (``hosts_file``, created here) and make it known to
        the other members of its networks -- one step under the membership lock."""
        with self._membership:
            for net in attached.networks:  # checked in attach() too, but another start may have won
                taken = net._names_taken(names)
                if taken is not None:
                    raise InvalidSpecError(f"name {taken!r} is already used on network {net.name}")
            with open(hosts_file, "x") as f:
                f.write(self.hosts_file(attached, names))
            for net, interface in zip(attached.networks, attached.interfaces, strict=False):
                member = Member(container_id, interface, tuple(names), hosts_file)
                net._join(member)
                attached.members.append((net, member))

    def _closed_network(self, network: Network) -> None:
        with network._lock:
            spare, network._spare = network._spare, None
        if spare is not None:
            spare.discard()
        with self._lock:
            if network in self._open:
                self._open.remove(network)
            self._names.discard(network.name)
            hub = self._hub
        if hub is not None:
            hub.remove_bridge(network.bridge_index)
        self._give_back(network.subnet, leased=network._leased)

    def close(self) -> None:
        """Close every network, the hub (the kernel frees all in it) and the psbx-net thread."""
        with self._lock:
            if self.closed:
                return
            networks = list(self._open)
        for network in networks:
            network.close()
        with self._lock:
            self.closed = True
            hub, self._hub = self._hub, None
            net, self._net = self._net, None
        if hub is not None:
            hub.close()
        if net is not None:
            net.close()
