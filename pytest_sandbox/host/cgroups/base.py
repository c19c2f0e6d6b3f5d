"""The interface every cgroup backend implements (stdlib only: it runs inside the launcher).

Layout, the same on every backend::

    <hierarchy root>/pytest-sandbox/             project parent, shared by all sessions
        psbx-<pid>-<starttime>/                  one group per pytest process (its owner tag)
            psbx-c-<container id>/               one leaf per container

The launcher creates a leaf with its limits *before* the container's first process exists; that
process attaches itself (``attach(0)``) before it unshares its cgroup namespace, so everything it
forks is inside.  When the container ends, the launcher reads :meth:`Cgroup.stats` (OOM kills,
pids-limit hits, throttling, peak memory) and only then removes the leaf: outcomes are read before
removal.  A limit that cannot be applied raises :class:`CgroupUnavailableError` naming the
controller and the fix -- never a silent unlimited run.
"""

from __future__ import annotations

import abc
from dataclasses import asdict, dataclass
from typing import Any

from ...core.limits import Limits


@dataclass(frozen=True)
class CgroupStats:
    """What the kernel recorded about one container's cgroup, read before it is removed."""

    oom_kills: int = 0
    pids_limit_hits: int = 0
    cpu_usage_s: float | None = None
    cpu_throttled_s: float = 0.0
    nr_throttled: int = 0
    memory_peak: int | None = None

    def to_wire(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> CgroupStats:
        return cls(**data)


class Cgroup(abc.ABC):
    """One container's cgroup (a directory per hierarchy on v1, one directory on v2)."""

    name: str

    @property
    @abc.abstractmethod
    def paths(self) -> list[str]:
        """Every directory of this cgroup (one per mounted hierarchy used)."""

    @abc.abstractmethod
    def attach(self, pid: int = 0) -> None:
        """Move ``pid`` (0: the caller) into this cgroup, in every hierarchy."""

    @abc.abstractmethod
    def apply(self, limits: Limits) -> None:
        """Write ``limits`` now, possibly after a task attached (the launcher's pre-attached spare).

        Only for a cgroup made with ``create(..., every_controller=True)`` and no limits.
        """

    @abc.abstractmethod
    def pids(self) -> set[int]:
        """Every process in this cgroup and in sub-cgroups the container created."""

    @abc.abstractmethod
    def stats(self) -> CgroupStats:
        """Current outcomes and accounting."""

    @abc.abstractmethod
    def read_limits(self) -> dict[str, str]:
        """The raw limit files as the kernel reports them, keyed by file name (for tests, debugging)."""

    @abc.abstractmethod
    def kill(self, timeout: float = 5.0) -> None:
        """SIGKILL every process in the cgroup and its sub-cgroups, and wait until none is left.

        Uses ``cgroup.kill`` where the kernel has it, else freeze + kill loop + thaw, so a fork bomb
        cannot outrun it.  Raises ``OSError`` if processes remain after ``timeout``.
        """

    @abc.abstractmethod
    def remove(self) -> None:
        """Kill everything, then remove the directories bottom-up.  Idempotent."""


class CgroupBackend(abc.ABC):
    """Creates and sweeps cgroups on one kind of host."""

    name: str  # "v1", "v2" or "none"

    @abc.abstractmethod
    def check(self, limits: Limits) -> None:
        """Raise ``CgroupUnavailableError`` (naming controller and fix) if ``limits`` cannot be applied."""

    @abc.abstractmethod
    def create(self, owner: str, leaf: str, limits: Limits, *, every_controller: bool = False) -> Cgroup:
        """Create ``<project>/<owner>/<leaf>`` with ``limits`` written; on any error remove what was made.

        ``every_controller``: also the controllers ``limits`` do not need, so that any limit can be
        applied later with :meth:`Cgroup.apply` (the launcher attaches a spare process early).
        """

    @abc.abstractmethod
    def remove_owner(self, owner: str) -> None:
        """Remove the owner's group (killing any leaf left in it) and the project parent if now empty."""

    @abc.abstractmethod
    def sweep(self) -> list[str]:
        """Remove groups whose owner process is dead (pid + start time); return what was removed.

        Groups of live owners -- other pytest sessions running right now -- are never touched.
        """

    def describe(self) -> str:
        """One line for the pytest header."""
        return self.name
