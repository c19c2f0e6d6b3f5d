"""cgroup v2 (unified hierarchy) backend (stdlib only: runs in the launcher).

Layout ``<root>/pytest-sandbox/<owner>/<leaf>``.  Controllers reach a leaf only through
``cgroup.subtree_control`` of every ancestor (Documentation/admin-guide/cgroup-v2.rst "Enabling and
Disabling").  The root's is not ours to write: a controller missing there is an error with the fix.
We enable the wanted ones in the two directories we create (project parent, owner group) once per
owner, so a leaf costs one ``mkdir`` plus its limit writes.

Choices, each against cgroup-v2.rst:

- ``memory.swap.max`` = memory_swap - memory, 0 by default: no swap, a deterministic OOM.
- ``memory.oom.group`` is left at its default 0 ("The default value is 0", cgroup-v2.rst) -- not
  written, one syscall saved: the OOM killer takes only the victim, so the container's init survives
  to report it.
- OOM kills: ``memory.events.local`` ``oom_kill`` summed over the leaf *and* the sub-cgroups the
  container made -- the leaf is the container, so a victim it moved into its own sub-cgroup is still
  its OOM kill (the leaf's ``.local`` alone would miss it, as BenchExec's reading would).
- Kill: ``cgroup.kill`` (5.14+) kills the leaf and all descendants atomically w.r.t. forks; before
  that, ``cgroup.freeze`` + a SIGKILL loop ("Processes in the frozen cgroup can be killed by a fatal
  signal").  Completion is read from ``cgroup.events`` ``populated``, which covers the whole subtree.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable

from ...core.limits import UNLIMITED, Limits
from ...core.naming import PROJECT_CGROUP
from . import _fs
from ._common import check_leaf, check_owner, sweep_owners, unavailable
from .base import Cgroup, CgroupBackend, CgroupStats

# Enabled in the subtree_control of the directories we create, when the root offers them.
WANTED = ("memory", "pids", "cpu", "cpuset", "io")
_LIMIT_FILES = (
    "memory.max",
    "memory.swap.max",
    "memory.oom.group",
    "cpu.max",
    "cpu.weight",
    "cpuset.cpus",
    "pids.max",
)


def shares_to_weight(shares: int) -> int:
    """cgroup v1 cpu.shares (2..262144) to v2 cpu.weight (1..10000), the runc/crun mapping."""
    return 1 + ((shares - 2) * 9999) // 262142


def _populated(d: str) -> bool:
    text = _fs.read_optional(d + "/cgroup.events")
    return text is not None and _fs.parse_kv(text).get("populated", 0) == 1


class V2Cgroup(Cgroup):
    def __init__(self, name: str, path: str, applier: Callable[[str, Limits], None] | None = None) -> None:
        self.name = name
        self.path = path
        self._applier = applier

    @property
    def paths(self) -> list[str]:
        return [self.path]

    def attach(self, pid: int = 0) -> None:
        # "0" is the writing process (cgroup-v2.rst "cgroup.procs").
        _fs.write(self.path + "/cgroup.procs", str(pid))

    def apply(self, limits: Limits) -> None:
        if self._applier is None:
            raise TypeError("this cgroup was not made by a backend; it cannot apply limits")
        self._applier(self.path, limits)

    def pids(self) -> set[int]:
        return _fs.procs_of(_fs.subtree(self.path))

    def _read(self, name: str) -> str | None:
        return _fs.read_optional(f"{self.path}/{name}")

    def stats(self) -> CgroupStats:
        cpu_text = self._read("cpu.stat")
        cpu = _fs.parse_kv(cpu_text or "")
        peak = self._read("memory.peak")  # Linux 5.19+
        return CgroupStats(
            oom_kills=self._oom_kills(),
            pids_limit_hits=self._pids_limit_hits(),
            cpu_usage_s=None if cpu_text is None else cpu.get("usage_usec", 0) / 1e6,
            cpu_throttled_s=cpu.get("throttled_usec", 0) / 1e6,
            nr_throttled=cpu.get("nr_throttled", 0),
            memory_peak=None if peak is None else int(peak),
        )

    def _oom_kills(self) -> int:
        # memory.events.local (5.2+) summed over the subtree counts every OOM kill of a process in
        # the container, wherever it moved itself, and is exact whether or not cgroup2 is mounted
        # with memory_localevents (which makes memory.events local too).  Before 5.2 only the
        # local memory.events existed: sum that instead.
        name = "memory.events.local"
        if not os.path.exists(f"{self.path}/{name}"):
            name = "memory.events"
        return self._subtree_sum(name, "oom_kill")

    def _pids_limit_hits(self) -> int:
        # Linux 6.14+ (where pids.events.local exists) counts "max" in pids.events at the cgroup
        # whose limit was hit and its ancestors: the leaf's file covers the subtree.  Before that,
        # the event was counted in the *forking* task's cgroup: sum over the subtree.
        if os.path.exists(self.path + "/pids.events.local"):
            return _fs.parse_kv(self._read("pids.events") or "").get("max", 0)
        return self._subtree_sum("pids.events", "max")

    def _subtree_sum(self, name: str, key: str) -> int:
        total = 0
        for d in _fs.subtree(self.path):
            total += _fs.parse_kv(_fs.read_optional(f"{d}/{name}") or "").get(key, 0)
        return total

    def read_limits(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for name in _LIMIT_FILES:
            text = self._read(name)
            if text is not None:
                out[name] = text.strip()
        return out

    def kill(self, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        if not _populated(self.path):
            return  # the common case: the container's init already took everything with it
        try:
            # cgroup-v2.rst "cgroup.kill": kills every process in the cgroup and its descendants,
            # and the kernel makes it safe against concurrent forks.
            _fs.write(self.path + "/cgroup.kill", "1")
        except FileNotFoundError:
            if not os.path.isdir(self.path):
                return
            self._freeze_and_kill(deadline)  # Linux < 5.14
        if not _fs.wait_until(lambda: not _populated(self.path), deadline):
            raise OSError(
                errno.EBUSY,
                f"processes {sorted(self.pids())} are still in the cgroup {timeout:g} s after SIGKILL",
                self.path,
            )

    def _freeze_and_kill(self, deadline: float) -> None:
        freeze = self.path + "/cgroup.freeze"  # Linux 5.2+; without it the loop still converges
        try:
            _fs.write(freeze, "1")
        except FileNotFoundError:
            freeze = ""
        try:
            while True:
                dirs = _fs.subtree(self.path)
                pids = _fs.procs_of(dirs)
                if not pids:
                    return
                _fs.signal_procs(pids, dirs)
                round_end = min(deadline, time.monotonic() + 0.25)
                if _fs.wait_until(lambda: not _populated(self.path), round_end):
                    return
                if time.monotonic() >= deadline:
                    return  # kill() reports what is left
        finally:
            if freeze:
                _fs.write(freeze, "0")  # leave a usable cgroup if the caller keeps it

    def remove(self, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        self.kill(timeout)
        _fs.rmdir_tree(self.path, deadline)


class V2Backend(CgroupBackend):
    """The unified hierarchy at ``root`` (default /sys/fs/cgroup, or a delegated subtree)."""

    name = "v2"

    def __init__(self, root: str = "/sys/fs/cgroup", *, swap_active: bool | None = None) -> None:
        self.root = os.path.normpath(root)
        self.project = f"{self.root}/{PROJECT_CGROUP}"
        self._problem: tuple[str, str] | None = None
        self.enabled: frozenset[str] = frozenset()  # controllers the root passes to its children
        self.available: frozenset[str] = frozenset()  # controllers the root itself has
        subtree = _fs.read_optional(self.root + "/cgroup.subtree_control")
        controllers = _fs.read_optional(self.root + "/cgroup.controllers")
        if subtree is None or controllers is None:
            self._problem = (
                f"{self.root} is not a cgroup v2 directory (no cgroup.subtree_control)",
                "mount cgroup2 there (mount -t cgroup2 none /sys/fs/cgroup) or pass the root of a "
                "delegated cgroup v2 subtree",
            )
        else:
            self.enabled = frozenset(subtree.split())
            self.available = frozenset(controllers.split())
            self._problem = _writable_problem(self.root)
        self._subtree_value = " ".join(f"+{c}" for c in WANTED if c in self.enabled)
        self._swap = _fs.host_swap_active() if swap_active is None else swap_active

    def usable(self) -> bool:
        return self._problem is None

    @property
    def problem(self) -> tuple[str, str] | None:
        """(reason, hint) when nothing can be created here at all."""
        return self._problem

    def describe(self) -> str:
        names = " ".join(c for c in WANTED if c in self.enabled)
        return f"cgroup v2 ({names or 'no controller enabled'}) under {self.root}"

    # ------------------------------------------------------------------------------------ check

    def check(self, limits: Limits) -> None:
        for ctrl in limits.controllers():
            if self._problem is not None:
                raise unavailable(limits, ctrl, *self._problem)
            if ctrl not in self.enabled:
                raise unavailable(limits, ctrl, *self._not_enabled(ctrl))

    def _not_enabled(self, ctrl: str) -> tuple[str, str]:
        if ctrl in self.available:
            return (
                f"the {ctrl} controller is not enabled for children of {self.root} "
                "(missing from its cgroup.subtree_control)",
                f"echo +{ctrl} > {self.root}/cgroup.subtree_control (as root; with systemd: "
                "Delegate=yes on the unit that owns this cgroup)",
            )
        return (
            f"the {ctrl} controller is not available in {self.root} (not in cgroup.controllers: "
            "the parent does not delegate it, or a cgroup v1 hierarchy holds it)",
            f"enable +{ctrl} in every ancestor's cgroup.subtree_control, or boot with "
            "systemd.unified_cgroup_hierarchy=1 cgroup_no_v1=all",
        )

    # ----------------------------------------------------------------------------------- create

    def create(self, owner: str, leaf: str, limits: Limits, *, every_controller: bool = False) -> Cgroup:
        # One directory has every enabled controller: every_controller changes nothing here.
        self.check(limits)
        check_owner(owner)
        check_leaf(leaf)
        path = self._mkleaf(owner, leaf)
        try:
            self._apply(path, limits)
        except BaseException:
            _fs.rmdir_after_error(path)  # a leftover owner group is swept with its owner
            raise
        return V2Cgroup(leaf, path, self._apply)

    def _mkleaf(self, owner: str, leaf: str) -> str:
        group = f"{self.project}/{owner}"

        def make_parents() -> None:
            # First leaf of this owner, or another session removed the empty project parent: (re)
            # create the parents and enable the controllers in both.  Enabling is idempotent, and
            # done even on EEXIST: a racing creator may not have done it yet.
            _fs.mkdir_exist_ok(self.project)
            self._enable(self.project)
            _fs.mkdir_exist_ok(group)
            self._enable(group)

        return _fs.mkdir_leaf(f"{group}/{leaf}", make_parents)

    def _enable(self, d: str) -> None:
        if self._subtree_value:
            # One write enables them all ("+memory +pids" is parsed per token by the kernel).
            _fs.write(d + "/cgroup.subtree_control", self._subtree_value)

    def _apply(self, path: str, limits: Limits) -> None:
        if limits.memory is not None:
            _fs.write(path + "/memory.max", str(limits.memory))
            self._apply_swap(path, limits)
        if limits.cpu_quota_us is not None:
            _fs.write(path + "/cpu.max", f"{limits.cpu_quota_us} {limits.cpu_period_us}")
        if limits.cpu_shares is not None:
            _fs.write(path + "/cpu.weight", str(shares_to_weight(limits.cpu_shares)))
        if limits.cpuset is not None:
            _fs.write(path + "/cpuset.cpus", limits.cpuset)
        if limits.pids is not None:
            _fs.write(path + "/pids.max", str(limits.pids))

    def _apply_swap(self, path: str, limits: Limits) -> None:
        swap = limits.memory_swap
        if swap is None or swap == UNLIMITED or limits.memory is None:
            return  # a new cgroup's memory.swap.max is already "max"
        try:
            _fs.write(path + "/memory.swap.max", str(swap - limits.memory))
        except FileNotFoundError:
            # No swap accounting (CONFIG_SWAP off, or swapaccount=0).  Without host swap there
            # is nothing to swap to, so "no swap" holds anyway; with it we cannot promise it.
            if self._swap:
                raise unavailable(
                    limits,
                    "memory",
                    f"{path}/memory.swap.max does not exist (no swap accounting) and the host has "
                    "swap enabled, so the container's swap cannot be limited",
                    "boot without swapaccount=0, or swapoff -a, or pass memory_swap=-1 to allow swap",
                ) from None

    # ---------------------------------------------------------------------------- owner / sweep

    def remove_owner(self, owner: str) -> None:
        check_owner(owner)
        group = f"{self.project}/{owner}"
        deadline = time.monotonic() + 10.0
        for leaf in sorted(_fs.list_dirs(group)):
            V2Cgroup(leaf, f"{group}/{leaf}").remove()
        _fs.rmdir_tree(group, deadline)
        _fs.rmdir_quiet(self.project)  # only if no other session uses it

    def sweep(self) -> list[str]:
        return sweep_owners(set(_fs.list_dirs(self.project)), self.remove_owner)


def _writable_problem(root: str) -> tuple[str, str] | None:
    if os.access(root, os.W_OK | os.X_OK):
        return None
    try:
        readonly = bool(os.statvfs(root).f_flag & os.ST_RDONLY)
    except OSError:
        readonly = False
    if readonly:
        return (
            f"the cgroup v2 filesystem at {root} is mounted read-only",
            "run where the cgroup filesystem is writable (inside a container: a writable cgroup "
            "mount with a private cgroup namespace)",
        )
    return (
        f"uid {os.geteuid()} may not create cgroups in {root} (not root, and no cgroup is delegated "
        "to this user)",
        "run pytest as root, or in a delegated subtree: systemd-run --user --scope -p Delegate=yes "
        "pytest ... and point the sandbox at that cgroup",
    )
