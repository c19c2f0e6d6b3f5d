"""cgroup backends: v1 (per-controller hierarchies), v2 (unified) and none (stdlib only).

:func:`detect` looks at /proc/self/mountinfo once and picks the backend for ``root``.  Backends
take ``root`` as a constructor argument and keep no module-level state, so tests can build one on
any directory (an undelegated cgroup, an empty tmpfs) and see the "no silent unlimited run" error.
"""

from __future__ import annotations

import os

from ._fs import Mount, is_under, mount_containing, parse_mountinfo, read_mountinfo
from .base import Cgroup, CgroupBackend, CgroupStats
from .none import NoneBackend, NullCgroup
from .v1 import V1Backend, V1Cgroup
from .v2 import V2Backend, V2Cgroup, shares_to_weight

__all__ = [
    "Cgroup",
    "CgroupBackend",
    "CgroupStats",
    "Mount",
    "NoneBackend",
    "NullCgroup",
    "V1Backend",
    "V1Cgroup",
    "V2Backend",
    "V2Cgroup",
    "classify",
    "detect",
    "parse_mountinfo",
    "shares_to_weight",
]

DEFAULT_ROOT = "/sys/fs/cgroup"


def classify(mounts: list[Mount], root: str = DEFAULT_ROOT) -> tuple[str, str]:
    """Which kind of hierarchy serves ``root``, from mountinfo alone (pure).

    Returns ``("v1", root)`` when v1 controller hierarchies are mounted under ``root`` -- even if a
    controller-less cgroup2 sits at ``root/unified`` (systemd's hybrid layout); ``("v2", path)``
    when ``root`` is inside a cgroup2 mount, or when the only cgroup under ``root`` is a cgroup2
    mount (``path`` is then that mount); else ``("none", reason)``.
    """
    root = os.path.normpath(root)
    if any(m.fstype == "cgroup" and m.controllers and is_under(m.mountpoint, root) for m in mounts):
        return ("v1", root)
    home = mount_containing(mounts, root)
    if home is not None and home.fstype == "cgroup2":
        return ("v2", root)
    below = [m for m in mounts if m.fstype == "cgroup2" and is_under(m.mountpoint, root)]
    if below:
        return ("v2", below[0].mountpoint)
    fstype = home.fstype if home is not None else "nothing"
    return ("none", f"no cgroup filesystem is mounted at {root} (it is {fstype}, per /proc/self/mountinfo)")


def detect(root: str = DEFAULT_ROOT, *, mounts: list[Mount] | None = None) -> CgroupBackend:
    """The backend for this host: V1Backend, V2Backend, or a NoneBackend that says why not."""
    root = os.path.normpath(root)
    if mounts is None:
        try:
            mounts = read_mountinfo()
        except OSError as e:
            return NoneBackend(f"cannot read /proc/self/mountinfo: {e}", "mount /proc")
    kind, detail = classify(mounts, root)
    if kind == "v1":
        v1 = V1Backend(root, mounts=mounts)
        if v1.usable():
            return v1
        return NoneBackend(*v1.problem())
    if kind == "v2":
        v2 = V2Backend(detail)
        if v2.problem is None:
            return v2
        return NoneBackend(*v2.problem)
    return NoneBackend(
        detail,
        f"mount cgroups at {root} (cgroup2: mount -t cgroup2 none {root}), or pass the directory "
        "where they are mounted",
    )
