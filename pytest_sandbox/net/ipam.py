"""Subnets for private networks: address pools, leased across processes under a file lock.

A pool is written as Docker's ``--default-address-pool`` (daemon.json ``default-address-pools``):
``base=10.243.0.0/16,size=24`` -- the base range, cut into subnets of that prefix length.  Every
pytest process on the host (xdist workers, two runs at once) leases from one directory,
``/run/psbx-ipam``: a lease is a file named after the subnet holding the owner tag
(``psbx-<pid>-<start>``), created under ``filelock`` on ``.lock`` in that directory.  Leases of dead
owners (a run killed with SIGKILL) are swept by the next allocation; live ones are never touched.

The networks themselves live in each session's own namespace, so two sessions with the same subnet
would not even meet; the lease keeps subnets distinct anyway, so that addresses in logs and failure
reports name one network each, and a subnet the host itself uses is skipped (a container's service
reached by address from a host tool would otherwise be ambiguous).  A ``subnet=`` given explicitly
is not leased, for the same reason it cannot collide; the process's own networks refuse an
overlapping one, and give its subnets as busy to :meth:`SubnetLeases.allocate`.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from ..config import AddressPool, default_address_pools
from ..core import naming
from ..core.errors import InvalidSpecError, NetworkError

if TYPE_CHECKING:
    from filelock import FileLock

LEASE_DIR = "/run/psbx-ipam"
#: The default pool (10.243.0.0/16 in /24s); pools are parsed with the other settings (config.py).
DEFAULT_POOLS = default_address_pools()


def parse_subnet(subnet: object) -> ipaddress.IPv4Network | None:
    """A user's explicit ``subnet=``: ``"10.50.0.0/24"`` (an IPv4 network, /8 to /29)."""
    if subnet is None:
        return None
    try:
        net = ipaddress.IPv4Network(subnet)
    except (ValueError, TypeError) as e:
        raise InvalidSpecError(
            f"subnet={subnet!r}: expected an IPv4 network like '10.50.0.0/24' ({e})"
        ) from None
    if not 8 <= net.prefixlen <= 29:
        raise InvalidSpecError(f"subnet={subnet!r}: the prefix length must be between 8 and 29")
    return net


def _lease_name(subnet: ipaddress.IPv4Network) -> str:
    return f"{subnet.network_address}-{subnet.prefixlen}"


def _lease_subnet(name: str) -> ipaddress.IPv4Network | None:
    addr, _, prefix = name.partition("-")
    try:
        return ipaddress.IPv4Network(f"{addr}/{prefix}")
    except ValueError:
        return None


class SubnetLeases:
    """Leases of subnets, shared by every pytest process on the host."""

    def __init__(self, directory: str = LEASE_DIR, owner: str | None = None) -> None:
        self.directory = directory
        self.owner = owner or naming.owner_tag()

    def allocate(
        self,
        pools: Iterable[AddressPool],
        host_networks: Callable[[], list[ipaddress.IPv4Network]],
    ) -> ipaddress.IPv4Network:
        """The first subnet of the pools not leased by a live owner and not used by the host."""
        pools = tuple(pools)
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        with _lock(self.directory):
            taken = self._live_leases()
            busy = host_networks()
            for pool in pools:
                for subnet in pool.subnets():
                    # Overlap, not equality: another session's pools may cut the same range into
                    # subnets of another size (its /20 holds our /24s).
                    if any(subnet.overlaps(t) for t in taken) or any(subnet.overlaps(b) for b in busy):
                        continue
                    path = os.path.join(self.directory, _lease_name(subnet))
                    with open(path, "x") as f:
                        f.write(self.owner + "\n")
                    return subnet
        raise NetworkError(
            f"no free subnet in the address pools ({', '.join(map(str, pools))}): {len(taken)} are "
            "leased by running sessions, the rest overlap the host's own networks",
            hint="close networks you no longer need, or add a pool (ini sandbox_address_pools, "
            "env PYTEST_SANDBOX_ADDRESS_POOLS)",
        )

    def release(self, subnet: ipaddress.IPv4Network) -> None:
        path = os.path.join(self.directory, _lease_name(subnet))
        with contextlib.suppress(FileNotFoundError), _lock(self.directory):
            if _read_owner(path) == self.owner:
                os.unlink(path)

    def sweep(self) -> set[ipaddress.IPv4Network]:
        """Remove the leases of dead owners (under the lock); the subnets leased by live ones."""
        with contextlib.suppress(FileNotFoundError), _lock(self.directory):
            return self._live_leases()
        return set()

    def _live_leases(self) -> set[ipaddress.IPv4Network]:
        """Subnets leased by live owners; the leases of dead ones are removed on the way.

        Only with the lock held: an empty lease is one whose writer died between create and
        write, which is true only if every writer holds the lock across both."""
        live = set()
        for name in os.listdir(self.directory):
            subnet = _lease_subnet(name)
            if subnet is None:
                continue
            path = os.path.join(self.directory, name)
            owner = _read_owner(path)
            # Empty: its writer died between create and write (both happen under the lock).
            if not owner or (naming.parse_owner_tag(owner) and not naming.owner_alive(owner)):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                continue
            live.add(subnet)
        return live

    def mine(self) -> list[ipaddress.IPv4Network]:
        """The subnets this owner holds (for tests and leak checks)."""
        out = []
        with contextlib.suppress(FileNotFoundError):
            for name in os.listdir(self.directory):
                subnet = _lease_subnet(name)
                if subnet is not None and _read_owner(os.path.join(self.directory, name)) == self.owner:
                    out.append(subnet)
        return out


def _lock(directory: str) -> FileLock:
    from filelock import FileLock

    return FileLock(os.path.join(directory, ".lock"))


def _read_owner(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except FileNotFoundError:
        return None
