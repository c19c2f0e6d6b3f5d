"""cgroup v1 backend: one directory per controller hierarchy (stdlib only: runs in the launcher).

Which hierarchies a container gets, and why (measured on this host, kernel 6.18, 2 vCPUs):

- ``mkdir`` costs ~8-12 us in pids, cpuacct, freezer, cpu and cpuset, 10-110 us in memory (per-cpu
  stats are allocated); ``rmdir`` 5-16 us.  ``create()`` with no limit (4 mkdirs) takes ~55 us,
  with memory+pids+cpus+cpuset ~110 us.  Attaching a task (``cgroup.procs`` write) costs one RCU
  grace period (~7 ms median, up to ~16 ms) for the *first* hierarchy -- the write side of
  cgroup_threadgroup_rwsem waits for readers (rcu_sync) unless another attach ran in the last
  ~15 ms -- and ~10 us for each further hierarchy written right after it.  So every extra
  hierarchy costs ~20 us on a container start that costs milliseconds anyway.
- That buys, for *every* container: memory (peak memory and OOM kills, even with no limit), pids
  (fork-failure counts and a second view of the tasks), cpuacct (CPU usage) and freezer (a kill that
  a fork bomb cannot outrun).  ``cpu`` is created only for a quota or shares, ``cpuset`` only for a
  cpuset: a cpuset directory needs cpus/mems set up before any task can join it.

Kernel references (Documentation/admin-guide/cgroup-v1/): memory.rst, cpusets.rst, freezer-subsystem.rst,
pids.rst, cgroups.rst, and scheduler/sched-bwc.rst for the CFS quota.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable
from functools import partial

from ...core.limits import CPU_PERIOD_US, UNLIMITED, Limits
from ...core.naming import PROJECT_CGROUP
from . import _fs
from ._common import check_leaf, check_owner, sweep_owners, unavailable
from .base import Cgroup, CgroupBackend, CgroupStats

# Hierarchies every container gets (stats + reliable kill), and the order its task joins them.
ALWAYS = ("memory", "pids", "cpuacct", "freezer")

# How long one freeze may take before we kill anyway (a task in uninterruptible sleep delays FROZEN).
_FREEZE_WAIT_S = 0.1
# How long to wait for killed tasks to exit before doing another freeze/kill/thaw round.
_ROUND_WAIT_S = 0.25

_LIMIT_FILES = (
    "memory.limit_in_bytes",
    "memory.memsw.limit_in_bytes",
    "memory.swappiness",
    "cpu.cfs_period_us",
    "cpu.cfs_quota_us",
    "cpu.shares",
    "cpuset.cpus",
    "cpuset.mems",
    "pids.max",
)


class V1Cgroup(Cgroup):
    """One container's cgroup: the same leaf name in each hierarchy used."""

    def __init__(
        self, name: str, dirs: dict[str, str], applier: Callable[[dict[str, str], Limits], None] | None = None
    ) -> None:
        self.name = name
        self._by_ctrl = dirs  # controller -> leaf directory (co-mounted controllers share one)
        self._dirs = list(dict.fromkeys(dirs.values()))  # unique, in attach order
        self._applier = applier

    @property
    def paths(self) -> list[str]:
        return list(self._dirs)

    def attach(self, pid: int = 0) -> None:
        # "0" is the writing task itself (kernel/cgroup/cgroup.c cgroup_procs_write_start), and
        # cgroup.procs moves the whole thread group, unlike ``tasks``.
        value = str(pid)
        for d in self._dirs:
            _fs.write(d + "/cgroup.procs", value)

    def apply(self, limits: Limits) -> None:
        if self._applier is None:
            raise TypeError("this cgroup was not made by a backend; it cannot apply limits")
        missing = [c for c in limits.controllers() if c not in self._by_ctrl]
        if missing:
            raise ValueError(
                f"cgroup {self.name} has no {', '.join(missing)} directory; create it with every_controller"
            )
        self._applier(self._by_ctrl, limits)

    def pids(self) -> set[int]:
        return _fs.procs_of(self._all_dirs())

    def _all_dirs(self) -> list[str]:
        out: list[str] = []
        for d in self._dirs:
            out.extend(_fs.subtree(d))
        return out

    def _file(self, controller: str, name: str) -> str | None:
        d = self._by_ctrl.get(controller)
        return None if d is None else f"{d}/{name}"

    def _read(self, controller: str, name: str) -> str | None:
        path = self._file(controller, name)
        return None if path is None else _fs.read_optional(path)

    def stats(self) -> CgroupStats:
        usage = self._read("cpuacct", "cpuacct.usage")
        cpu = _fs.parse_kv(self._read("cpu", "cpu.stat") or "")
        peak = self._read("memory", "memory.max_usage_in_bytes")
        return CgroupStats(
            oom_kills=self._subtree_sum("memory", "memory.oom_control", "oom_kill"),
            pids_limit_hits=self._subtree_sum("pids", "pids.events", "max"),
            cpu_usage_s=None if usage is None else int(usage) / 1e9,
            cpu_throttled_s=cpu.get("throttled_time", 0) / 1e9,
            nr_throttled=cpu.get("nr_throttled", 0),
            memory_peak=None if peak is None else int(peak),
        )

    def _subtree_sum(self, controller: str, name: str, key: str) -> int:
        """Sum a counter over the leaf and the sub-cgroups the container made.

        On v1 both counters are local: memcg_memory_event() stops at the victim's own memcg
        unless on the default hierarchy (mm/memcontrol.c, "!cgroup_subsys_on_dfl ... break"), and
        pids.events counts a failed fork in the *forking* task's cgroup (kernel/cgroup/pids.c keeps
        that for v1).  A container that moved a task into its own sub-cgroup must still see it.
        """
        top = self._by_ctrl.get(controller)
        if top is None:
            return 0
        total = 0
        for d in _fs.subtree(top):
            total += _fs.parse_kv(_fs.read_optional(f"{d}/{name}") or "").get(key, 0)
        return total

    def read_limits(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for d in self._dirs:
            for name in _LIMIT_FILES:
                text = _fs.read_optional(f"{d}/{name}")
                if text is not None:
                    out[name] = text.strip()
        return out

    def kill(self, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        if not self.pids():
            return  # the common case: the container's init already took everything with it
        freezer = self._by_ctrl.get("freezer")
        while True:
            frozen = freezer is not None and self._freeze(freezer, deadline)
            dirs = self._all_dirs()
            pids = _fs.procs_of(dirs)
            if pids:
                _fs.signal_procs(pids, dirs)
            if frozen and freezer is not None:
                # A frozen task keeps its pending SIGKILL until thawed (checked on 6.18: it sits in
                # D state until THAWED), so thaw the leaf *and* every sub-cgroup -- the container
                # may have frozen one itself, and freezer.self_freezing survives the leaf's thaw.
                self._thaw(freezer)
            round_end = min(deadline, time.monotonic() + _ROUND_WAIT_S)
            if _fs.wait_until(lambda: not _fs.procs_of(self._all_dirs()), round_end):
                return
            if time.monotonic() >= deadline:
                left = sorted(self.pids())
                raise OSError(
                    errno.EBUSY,
                    f"processes {left} are still in the cgroup {timeout:g} s after SIGKILL",
                    self._dirs[0],
                )

    def _freeze(self, freezer: str, deadline: float) -> bool:
        """FROZEN stops forks, so a fork bomb cannot outrun the kill loop; False if no freezer dir."""
        state = freezer + "/freezer.state"
        try:
            _fs.write(state, "FROZEN")
        except FileNotFoundError:
            return False
        # The write only starts freezing; the state reads FREEZING until every task is stopped.
        # Bounded: a task in uninterruptible sleep must not hold up the kill.
        until = min(deadline, time.monotonic() + _FREEZE_WAIT_S)
        _fs.wait_until(lambda: (_fs.read_optional(state) or "FROZEN").strip() == "FROZEN", until)
        return True

    def _thaw(self, freezer: str) -> None:
        for d in reversed(_fs.subtree(freezer)):
            state = d + "/freezer.state"
            try:
                _fs.with_chmod_retry(partial(_fs.write, state, "THAWED"), state, 0o644)
            except FileNotFoundError:
                continue

    def remove(self, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        dirs = self._all_dirs()
        if _fs.procs_of(dirs):
            self.kill(timeout)
            dirs = self._all_dirs()  # the workload may have made sub-cgroups before it died
        _fs.rmdir_dirs(dirs, deadline)


class V1Backend(CgroupBackend):
    """Per-controller hierarchies under ``root`` (default /sys/fs/cgroup), found in mountinfo once."""

    name = "v1"

    def __init__(
        self,
        root: str = "/sys/fs/cgroup",
        *,
        mounts: list[_fs.Mount] | None = None,
        swap_active: bool | None = None,
    ) -> None:
        self.root = os.path.normpath(root)
        self._mounts: dict[str, str] = {}  # usable controller -> mount point
        self._mount_ctrls: dict[str, frozenset[str]] = {}  # usable mount point -> its controllers
        self._problems: dict[str, tuple[str, str]] = {}  # unusable controller -> (reason, hint)
        for m in _fs.read_mountinfo() if mounts is None else mounts:
            if m.fstype == "cgroup" and m.controllers and _fs.is_under(m.mountpoint, self.root):
                self._add_mount(m)
        mem = self._mounts.get("memory")
        # memory.memsw.* exist only with swap accounting (CONFIG_MEMCG_SWAP + swapaccount=1).
        self._memsw = mem is not None and os.path.exists(mem + "/memory.memsw.limit_in_bytes")
        self._swap = _fs.host_swap_active() if swap_active is None else swap_active

    def _add_mount(self, m: _fs.Mount) -> None:
        problem = _mount_problem(m)
        for c in m.controllers:
            if c in self._mounts:
                continue  # the same hierarchy mounted twice: the first usable mount wins
            if problem is None:
                self._mounts[c] = m.mountpoint
                self._mount_ctrls[m.mountpoint] = m.controllers
                self._problems.pop(c, None)
            else:
                self._problems.setdefault(c, problem)

    @property
    def controllers(self) -> dict[str, str]:
        """Usable controllers and the mount point of their hierarchy."""
        return dict(self._mounts)

    def usable(self) -> bool:
        return bool(self._mounts)

    def problem(self) -> tuple[str, str]:
        """(reason, hint) saying why no hierarchy is usable (for the none backend)."""
        reasons = list(dict.fromkeys(reason for reason, _ in self._problems.values()))
        if not reasons:
            return _missing("memory", self.root)
        hint = next(iter(self._problems.values()))[1]
        return (f"no writable cgroup v1 hierarchy under {self.root}: {'; '.join(reasons)}", hint)

    def describe(self) -> str:
        names = " ".join(c for c in (*ALWAYS, "cpu", "cpuset") if c in self._mounts)
        swap = "memsw" if self._memsw else "no swap accounting"
        return f"cgroup v1 ({names or 'no usable controller'}; {swap}) under {self.root}"

    # ------------------------------------------------------------------------------------ check

    def check(self, limits: Limits) -> None:
        for ctrl in limits.controllers():
            if ctrl not in self._mounts:
                reason, hint = self._problems.get(ctrl) or _missing(ctrl, self.root)
                raise unavailable(limits, ctrl, reason, hint)
        swap = limits.memory_swap
        if swap is not None and swap not in (UNLIMITED, limits.memory) and not self._memsw and self._swap:
            raise unavailable(
                limits,
                "memory",
                "this kernel does not account swap per cgroup (no memory.memsw.limit_in_bytes) and the "
                "host has swap enabled, so memory+swap cannot be capped",
                "boot with swapaccount=1 (CONFIG_MEMCG_SWAP), or leave memory_swap unset (no swap), "
                "or use memory_swap=-1 (unlimited swap)",
            )

    # ----------------------------------------------------------------------------------- create

    def _needed(self, limits: Limits, every: bool) -> list[str]:
        ctrls = [c for c in ALWAYS if c in self._mounts]
        if (every or limits.cpu_quota_us is not None or limits.cpu_shares is not None) and (
            not every or "cpu" in self._mounts
        ):
            ctrls.append("cpu")
        if (every or limits.cpuset is not None) and (not every or "cpuset" in self._mounts):
            ctrls.append("cpuset")
        return ctrls

    def create(self, owner: str, leaf: str, limits: Limits, *, every_controller: bool = False) -> Cgroup:
        self.check(limits)
        check_owner(owner)
        check_leaf(leaf)
        ctrls = self._needed(limits, every_controller)
        made: dict[str, str] = {}  # mount point -> leaf dir
        dirs: dict[str, str] = {}
        try:
            for ctrl in ctrls:
                mp = self._mounts[ctrl]
                if mp not in made:
                    made[mp] = self._mkleaf(mp, owner, leaf)
                dirs[ctrl] = made[mp]
            self._apply(dirs, limits)
        except BaseException:
            for d in reversed(made.values()):
                _fs.rmdir_after_error(d)  # a leftover owner group is swept with its owner
            raise
        return V1Cgroup(leaf, dirs, self._apply)

    def _mkleaf(self, mountpoint: str, owner: str, leaf: str) -> str:
        """mkdir the leaf; only when its parents are missing create them (once per owner)."""
        # Any hierarchy with cpuset in it (also co-mounted, e.g. "cpu,cpuset") needs cpus/mems.
        cpuset = "cpuset" in self._mount_ctrls[mountpoint]
        project = f"{mountpoint}/{PROJECT_CGROUP}"
        group = f"{project}/{owner}"

        def make_parents() -> None:
            _fs.mkdir_exist_ok(project)
            if cpuset:
                _cpuset_inherit(project, mountpoint)
            _fs.mkdir_exist_ok(group)
            if cpuset:
                _cpuset_inherit(group, project)

        return _fs.mkdir_leaf(f"{group}/{leaf}", make_parents)

    def _apply(self, dirs: dict[str, str], limits: Limits) -> None:
        if limits.memory is not None:
            self._apply_memory(dirs["memory"], limits.memory, limits.memory_swap)
        if limits.cpu_quota_us is not None:
            cpu = dirs["cpu"]
            if limits.cpu_period_us != CPU_PERIOD_US:  # a new cgroup starts at 100 ms (sched-bwc.rst)
                _fs.write(cpu + "/cpu.cfs_period_us", str(limits.cpu_period_us))
            _fs.write(cpu + "/cpu.cfs_quota_us", str(limits.cpu_quota_us))
        if limits.cpu_shares is not None:
            _fs.write(dirs["cpu"] + "/cpu.shares", str(limits.cpu_shares))
        if limits.cpuset is not None:
            # cpus/mems were copied from the owner group at mkdir (cgroup.clone_children=1 there).
            _fs.write(dirs["cpuset"] + "/cpuset.cpus", limits.cpuset)
        if limits.pids is not None:
            _fs.write(dirs["pids"] + "/pids.max", str(limits.pids))

    def _apply_memory(self, d: str, memory: int, swap: int | None) -> None:
        # memsw.limit_in_bytes must always be >= limit_in_bytes (cgroup-v1/memory.rst 2.4; the
        # kernel answers EINVAL otherwise, checked).  A new cgroup has both unlimited, so the limit
        # goes first; writing memsw first would be refused.
        _fs.write(d + "/memory.limit_in_bytes", str(memory))
        if swap is None or swap == UNLIMITED:
            return  # memsw of a new cgroup is already unlimited
        if self._memsw:
            _fs.write(d + "/memory.memsw.limit_in_bytes", str(swap))
        if swap == memory and (self._swap or not self._memsw):
            # Swap off.  memory.rst 5.3: "limit reclaim enforces that 0 swappiness really prevents
            # from any swapping even if there is a swap storage available" -- the guarantee when
            # memsw is missing; with memsw it also keeps global reclaim from preferring our anon pages.
            _fs.write(d + "/memory.swappiness", "0")

    # ---------------------------------------------------------------------------- owner / sweep

    def _hierarchies(self) -> list[str]:
        return list(dict.fromkeys(self._mounts.values()))

    def remove_owner(self, owner: str) -> None:
        check_owner(owner)
        groups = [f"{mp}/{PROJECT_CGROUP}/{owner}" for mp in self._hierarchies()]
        leaves: set[str] = set()
        for g in groups:
            leaves.update(_fs.list_dirs(g))
        deadline = time.monotonic() + 10.0
        for leaf in sorted(leaves):
            self._leaf(owner, leaf).remove()
        for g in groups:
            _fs.rmdir_tree(g, deadline)  # anything left is a dir of ours without tasks
            _fs.rmdir_quiet(os.path.dirname(g))  # the project parent, if no other session uses it

    def _leaf(self, owner: str, leaf: str) -> V1Cgroup:
        """The leaf as it exists now, in whichever hierarchies it was created."""
        dirs: dict[str, str] = {}
        for ctrl, mp in self._mounts.items():
            path = f"{mp}/{PROJECT_CGROUP}/{owner}/{leaf}"
            if os.path.isdir(path):
                dirs[ctrl] = path
        return V1Cgroup(leaf, dirs)

    def sweep(self) -> list[str]:
        names: set[str] = set()
        for mp in self._hierarchies():
            names.update(_fs.list_dirs(f"{mp}/{PROJECT_CGROUP}"))
        return sweep_owners(names, self.remove_owner)


# ------------------------------------------------------------------------------------ helpers


def _cpuset_inherit(d: str, parent: str) -> None:
    """Give a directory we created the parent's cpus and mems, and clone_children=1.

    cgroup-v1/cpusets.rst: a new cpuset starts with empty cpus/mems and no task can be attached
    until both are set.  cgroup.clone_children=1 (cgroup-v1/cgroups.rst: it only affects cpuset)
    makes the kernel copy them into every child at mkdir, so a leaf costs no extra writes.  We never
    write the parent when it is the hierarchy root (not ours); a project parent another session is
    still filling in reads empty -- then we fill it ourselves from the root.
    """
    if (_fs.read_optional(d + "/cpuset.mems") or "").strip() and (
        _fs.read_optional(d + "/cgroup.clone_children") or ""
    ).strip() == "1":
        return
    cpus = _fs.read_text(parent + "/cpuset.cpus").strip()
    mems = _fs.read_text(parent + "/cpuset.mems").strip()
    if not (cpus and mems):
        grand = os.path.dirname(parent)
        _cpuset_inherit(parent, grand)
        cpus = _fs.read_text(parent + "/cpuset.cpus").strip()
        mems = _fs.read_text(parent + "/cpuset.mems").strip()
    _fs.write(d + "/cpuset.cpus", cpus)
    _fs.write(d + "/cpuset.mems", mems)
    _fs.write(d + "/cgroup.clone_children", "1")


def _mount_problem(m: _fs.Mount) -> tuple[str, str] | None:
    """Why we cannot create cgroups in this hierarchy, with the fix; None if we can."""
    ctrls = ",".join(sorted(m.controllers))
    if m.readonly:
        return (
            f"the {ctrls} hierarchy is mounted read-only at {m.mountpoint}",
            "run where the cgroup filesystem is writable (inside a container: a privileged "
            "container or a writable cgroup mount); remounting the host's cgroupfs is not our call",
        )
    if not os.access(m.mountpoint, os.W_OK | os.X_OK):
        return (
            f"uid {os.geteuid()} may not create cgroups in {m.mountpoint} (not root, and no cgroup "
            "is delegated to this user)",
            "run pytest as root, or use a cgroup v2 host and delegate a subtree to your user "
            "(systemd-run --user --scope -p Delegate=yes pytest ...)",
        )
    return None


def _missing(ctrl: str, root: str) -> tuple[str, str]:
    enabled = _proc_cgroups_enabled().get(ctrl)
    if enabled is None:
        return (
            f"this kernel has no {ctrl} controller (not in /proc/cgroups)",
            f"use a kernel built with the {ctrl} cgroup controller",
        )
    if not enabled:
        return (
            f"the {ctrl} controller is disabled on the kernel command line (/proc/cgroups)",
            f"boot with cgroup_enable={ctrl}",
        )
    return (
        f"no cgroup v1 hierarchy with the {ctrl} controller is mounted under {root}",
        f"mount it: mkdir -p {root}/{ctrl} && mount -t cgroup -o {ctrl} cgroup {root}/{ctrl}",
    )


def _proc_cgroups_enabled(path: str = "/proc/cgroups") -> dict[str, bool]:
    try:
        text = _fs.read_text(path)
    except OSError:
        return {}
    out: dict[str, bool] = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) == 4 and not line.startswith("#"):
            out[fields[0]] = fields[3] == "1"
    return out
