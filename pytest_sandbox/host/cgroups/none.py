"""The null backend: no usable cgroup hierarchy on this host (stdlib only).

Containers without limits still run -- their PID namespace kills everything when the init exits --
but any limit is refused with :class:`CgroupUnavailableError` saying why (the reason and hint given
by :func:`~pytest_sandbox.host.cgroups.detect`), never silently dropped.
"""

from __future__ import annotations

from ...core.limits import Limits
from ._common import check_leaf, check_owner, unavailable
from .base import Cgroup, CgroupBackend, CgroupStats

DEFAULT_REASON = "no usable cgroup hierarchy was found"
DEFAULT_HINT = "run pytest as root on a host with cgroups mounted at /sys/fs/cgroup"


class NullCgroup(Cgroup):
    """A cgroup that is not there: no paths, default stats, no-op kill/remove."""

    def __init__(self, name: str) -> None:
        self.name = name

    @property
    def paths(self) -> list[str]:
        return []

    def attach(self, pid: int = 0) -> None:
        return None

    def apply(self, limits: Limits) -> None:
        if not limits.is_empty():
            raise ValueError("a null cgroup cannot hold limits")

    def pids(self) -> set[int]:
        return set()

    def stats(self) -> CgroupStats:
        return CgroupStats()

    def read_limits(self) -> dict[str, str]:
        return {}

    def kill(self, timeout: float = 5.0) -> None:
        return None  # the container's PID namespace takes every process with its init

    def remove(self) -> None:
        return None


class NoneBackend(CgroupBackend):
    name = "none"

    def __init__(self, reason: str = DEFAULT_REASON, hint: str = DEFAULT_HINT) -> None:
        self.reason = reason
        self.hint = hint

    def describe(self) -> str:
        return f"none ({self.reason})"

    def check(self, limits: Limits) -> None:
        controllers = limits.controllers()
        if controllers:
            raise unavailable(limits, controllers, self.reason, self.hint)

    def create(self, owner: str, leaf: str, limits: Limits, *, every_controller: bool = False) -> Cgroup:
        self.check(limits)
        check_owner(owner)
        check_leaf(leaf)
        return NullCgroup(leaf)

    def remove_owner(self, owner: str) -> None:
        check_owner(owner)

    def sweep(self) -> list[str]:
        return []
