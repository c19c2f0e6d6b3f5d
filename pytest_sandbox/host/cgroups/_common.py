"""Pieces shared by the backends: name checks, error wording, owner sweeping (stdlib only)."""

from __future__ import annotations

import re
from collections.abc import Callable

from ...core.errors import CgroupUnavailableError
from ...core.limits import UNLIMITED, Limits
from ...core.naming import PREFIX, owner_alive, parse_owner_tag
from ...core.units import format_size

_LEAF_RE = re.compile(rf"^{PREFIX}-[A-Za-z0-9_.-]{{1,200}}$")


def check_owner(owner: str) -> None:
    """Owner groups must be owner tags: only those can be swept when their process dies."""
    if parse_owner_tag(owner) is None:
        raise ValueError(f"cgroup owner {owner!r} is not an owner tag like 'psbx-<pid>-<starttime>'")


def check_leaf(leaf: str) -> None:
    """One path component starting with ``psbx-`` (never '.', '..' or a nested path)."""
    if not _LEAF_RE.match(leaf):
        raise ValueError(f"cgroup leaf name {leaf!r} must look like 'psbx-c-<container id>'")


def requested(limits: Limits, controller: str) -> str:
    """The user's request that needs ``controller``, in their words (``memory=64m``)."""
    parts: list[str] = []
    if controller == "memory" and limits.memory is not None:
        parts.append(f"memory={format_size(limits.memory)}")
        if limits.memory_swap not in (None, limits.memory):
            swap = limits.memory_swap
            parts.append("memory_swap=-1" if swap == UNLIMITED else f"memory_swap={format_size(swap or 0)}")
    elif controller == "cpu":
        if limits.cpus is not None:
            parts.append(f"cpus={limits.cpus:g}")
        if limits.cpu_shares is not None:
            parts.append(f"cpu_shares={limits.cpu_shares}")
    elif controller == "cpuset" and limits.cpuset is not None:
        parts.append(f"cpuset={limits.cpuset!r}")
    elif controller == "pids" and limits.pids is not None:
        parts.append(f"pids={limits.pids}")
    return ", ".join(parts)


def unavailable(
    limits: Limits, controller: str | list[str], reason: str, hint: str
) -> CgroupUnavailableError:
    """The error for a limit that cannot be applied: names the controller(s), the request and the fix."""
    ctrls = [controller] if isinstance(controller, str) else controller
    what = ", ".join(filter(None, (requested(limits, c) for c in ctrls)))
    noun = "limit" if len(ctrls) == 1 else "limits"
    return CgroupUnavailableError(
        f"cannot apply the {' and '.join(ctrls)} {noun} ({what}): {reason}; refusing to run without "
        f"{'it' if len(ctrls) == 1 else 'them'}",
        hint=hint,
    )


def sweep_owners(owner_names: set[str], remove_owner: Callable[[str], None]) -> list[str]:
    """Remove every owner group whose owner is dead; keep going past failures, then report them.

    Names that are not owner tags, and owners that are alive (pid + start time match), are never
    touched.  A failure (a process stuck in uninterruptible sleep, say) does not stop the sweep of
    the others; the first error is re-raised at the end, naming its path.
    """
    removed: list[str] = []
    first_error: OSError | None = None
    for name in sorted(owner_names):
        if parse_owner_tag(name) is None or owner_alive(name):
            continue
        try:
            remove_owner(name)
        except OSError as e:
            first_error = first_error or e
            continue
        removed.append(name)
    if first_error is not None:
        raise first_error
    return removed
