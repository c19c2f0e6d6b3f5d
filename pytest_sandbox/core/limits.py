"""Resource limits of one container, validated and normalised (pure, stdlib only).

The user's words (``memory="64m"``, ``cpus=0.5``, ``pids=32``) become kernel units here, once, so the
cgroup backends only write numbers.  Semantics, each chosen on purpose and tested:

- ``memory``: bytes; at least 6 MiB (Docker's minimum: our init and the command's loader must fit).
- ``memory_swap``: Docker's total of memory + swap.  Unlike Docker, the default is *no swap*
  (``memory_swap == memory``) so an OOM is deterministic; ``-1`` allows unlimited swap.
- ``cpus``: a CFS quota of ``cpus * period`` per ``period`` (100 ms) -- the seed's cpu.cfs_quota_us.
- ``cpu_shares``: the v1 weight (2..262144, default 1024); v2 converts it to ``cpu.weight``.
- ``cpuset``: the CPUs the container may run on, normalised to the kernel's list format.
- ``pids``: the most tasks the container may have, our init included, so at least 2.  ``0`` is not a
  silent "unlimited" (runc's surprise): it is an error.  Unset, the container gets the default
  (:attr:`Limits.pids_default`: ini ``sandbox_pids_limit``, 2048 as podman's, applied by the sandbox
  only where the pids controller exists); ``-1`` is no limit, as podman's ``--pids-limit=-1``.
- the writable area (:func:`writable_inodes`): a container's writable layer and its /tmp are each a
  tmpfs of ``writable_size`` bytes and ``writable_inodes(size)`` inodes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from .errors import InvalidSpecError
from .units import format_size, online_cpus, parse_cpus, parse_cpuset, parse_size

MIN_MEMORY = 6 << 20
CPU_PERIOD_US = 100_000
MIN_CPU_SHARES = 2
MAX_CPU_SHARES = 262_144
MIN_PIDS = 2
UNLIMITED = -1
MIN_WRITABLE_SIZE = 1 << 20
# One inode per 8 KiB of a writable tmpfs: a tmpfs inode costs ~1 KiB of kernel memory that its
# size= does not count, so the inode bound keeps that part under ~1/8 of the size too.
BYTES_PER_INODE = 8 << 10
MIN_WRITABLE_INODES = 1024


@dataclass(frozen=True)
class Limits:
    memory: int | None = None
    memory_swap: int | None = None  # memory + swap in bytes; UNLIMITED (-1) for unlimited swap
    cpu_quota_us: int | None = None
    cpu_period_us: int = CPU_PERIOD_US
    cpu_shares: int | None = None
    cpuset: str | None = None
    pids: int | None = None
    # The pids limit above is the settings' default, not the caller's: the launcher drops it where
    # the host has no pids controller (podman: "2048 on systems that support the pids controller").
    pids_default: bool = False

    @classmethod
    def parse(
        cls,
        *,
        memory: object = None,
        memory_swap: object = None,
        cpus: object = None,
        cpu_shares: object = None,
        cpuset: object = None,
        pids: object = None,
    ) -> Limits:
        """Validate the user's words; raise :class:`InvalidSpecError` naming the bad value."""
        mem = None if memory is None else _parse_memory(memory)
        return cls(
            memory=mem,
            memory_swap=_parse_memory_swap(memory_swap, mem, memory),
            cpu_quota_us=None if cpus is None else _parse_cpu_quota(cpus),
            cpu_shares=None if cpu_shares is None else _parse_cpu_shares(cpu_shares),
            cpuset=None if cpuset is None else parse_cpuset(cpuset, online=online_cpus()),
            pids=None if pids is None else _parse_pids(pids),
        )

    @property
    def cpus(self) -> float | None:
        return None if self.cpu_quota_us is None else self.cpu_quota_us / self.cpu_period_us

    def is_empty(self) -> bool:
        skip = ("cpu_period_us", "pids_default")
        return all(getattr(self, f.name) is None for f in fields(self) if f.name not in skip)

    def controllers(self) -> list[str]:
        """The cgroup controllers these limits need (names of the v2 unified hierarchy)."""
        out = []
        if self.memory is not None:
            out.append("memory")
        if self.cpu_quota_us is not None or self.cpu_shares is not None:
            out.append("cpu")
        if self.cpuset is not None:
            out.append("cpuset")
        if self.pids is not None:
            out.append("pids")
        return out

    def to_wire(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> Limits:
        return cls(**data)


def _parse_memory(memory: object) -> int:
    mem = parse_size(memory, what="memory")
    if mem == 0:
        raise InvalidSpecError("memory=0: 0 is not a limit; leave memory unset for no limit")
    if mem < MIN_MEMORY:
        raise InvalidSpecError(
            f"memory={memory!r}: minimum memory limit allowed is {format_size(MIN_MEMORY)} "
            "(the container's init and the command's loader need it)"
        )
    return mem


def _parse_memory_swap(memory_swap: object, mem: int | None, memory: object) -> int | None:
    """Docker's memory + swap total; ``memory`` is the user's word, ``mem`` its bytes."""
    if memory_swap is None:
        return mem  # swap off by default: OOM is deterministic (None when memory is unset too)
    if mem is None:
        raise InvalidSpecError(
            f"memory_swap={memory_swap!r}: set memory too; memory_swap is the total of memory and swap"
        )
    if memory_swap in (-1, "-1"):
        return UNLIMITED
    swap = parse_size(memory_swap, what="memory_swap")
    if swap < mem:
        raise InvalidSpecError(
            f"memory_swap={memory_swap!r}: must be at least memory={memory!r} "
            "(it is the total of memory and swap); use -1 for unlimited swap"
        )
    return swap


def _parse_cpu_quota(cpus: object) -> int:
    n = parse_cpus(cpus, online=len(online_cpus()))
    return max(1000, round(n * CPU_PERIOD_US))


def _parse_cpu_shares(cpu_shares: object) -> int:
    if (
        isinstance(cpu_shares, bool)
        or not isinstance(cpu_shares, int)
        or not MIN_CPU_SHARES <= cpu_shares <= MAX_CPU_SHARES
    ):
        raise InvalidSpecError(
            f"cpu_shares={cpu_shares!r}: expected an int from {MIN_CPU_SHARES} to {MAX_CPU_SHARES} "
            "(1024 is the default weight)"
        )
    return cpu_shares


def _parse_pids(pids: object) -> int | None:
    if pids == UNLIMITED and not isinstance(pids, bool):
        return None  # podman's --pids-limit=-1: no limit, not even the default
    if isinstance(pids, bool) or not isinstance(pids, int) or pids < MIN_PIDS:
        raise InvalidSpecError(
            f"pids={pids!r}: expected an int of at least {MIN_PIDS} (the container's init counts as "
            "one task), or -1 for no limit"
        )
    return pids


def writable_inodes(size: int) -> int:
    """The nr_inodes= of a writable tmpfs of ``size`` bytes (see BYTES_PER_INODE)."""
    return max(MIN_WRITABLE_INODES, size // BYTES_PER_INODE)


def parse_writable_size(value: object) -> int:
    """``writable_size=``: the bound of the container's writable layer and of its /tmp."""
    size = parse_size(value, what="writable_size")
    if size < MIN_WRITABLE_SIZE:
        raise InvalidSpecError(
            f"writable_size={value!r}: expected at least {format_size(MIN_WRITABLE_SIZE)} "
            "(the container's /etc files and mount points live there)"
        )
    return size


def parse_pids_setting(raw: str, *, what: str) -> int | None:
    """The settings' default pids limit (ini ``sandbox_pids_limit``): at least 2, or -1 for none."""
    text = raw.strip()
    if text == str(UNLIMITED):
        return None
    if not text.isdigit() or int(text) < MIN_PIDS:
        raise InvalidSpecError(f"{what}={raw!r}: expected an int of at least {MIN_PIDS}, or -1 for no limit")
    return int(text)


def parse_size_setting(raw: str, *, what: str) -> int:
    """A size setting (``sandbox_writable_size``, ``sandbox_max_layer_size``): at least 1 MiB."""
    size = parse_size(raw.strip(), what=what)
    if size < MIN_WRITABLE_SIZE:
        least = format_size(MIN_WRITABLE_SIZE)
        raise InvalidSpecError(f"{what}={raw!r}: expected a size of at least {least}")
    return size
