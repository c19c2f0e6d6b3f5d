"""Every host-visible name pytest_sandbox creates comes from here (pure, stdlib only).

All of them start with ``psbx`` so leftovers are easy to find, and all carry the owner's pid and
start time where they outlive a call, so a sweeper can tell a dead owner from a live one (pids are
reused; pid + start time is not).  Interface names must fit IFNAMSIZ-1 = 15 bytes.
"""

from __future__ import annotations

import os
import re
import secrets

PREFIX = "psbx"
PROJECT_CGROUP = "pytest-sandbox"
ID_RANGE = 65536  # container uids/gids 0..65535, mapped to host ids uid_base..uid_base+65535
# Host uids that own containers' user namespaces, one per live container: OWNER_UID_BASE + the
# host pid of its init (launcher/userns).  Pids are below PID_MAX_LIMIT, 2**22 on 64-bit
# (include/linux/threads.h), so the range is that large; it starts right above the default id
# range (config.DEFAULT_UID_BASE + ID_RANGE), and config refuses a uid_base overlapping it.  Like
# the id range, it lies in the host uids systemd leaves to containers (524288-1879048191).
OWNER_UID_BASE = 1_000_065_536
OWNER_UID_COUNT = 1 << 22

_OWNER_RE = re.compile(rf"^{PREFIX}-(\d+)-(\d+)$")
_NAME_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,62}$")


def new_container_id() -> str:
    """12 hex digits, like Docker's short ids."""
    return secrets.token_hex(6)


def valid_name(name: str) -> bool:
    """Container names: ``[a-zA-Z0-9][a-zA-Z0-9_.-]*``, at most 63 characters (a DNS label)."""
    return bool(_NAME_RE.match(name))


def proc_stat(pid: int) -> list[str] | None:
    """Fields 3 onwards of /proc/PID/stat (index 0 = state, 6 = flags, 19 = start time); None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # comm (field 2) may contain spaces and parentheses: split after the last ')'.
    return data[data.rindex(b")") + 2 :].decode().split()


def process_start_time(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (field 22 of /proc/PID/stat), None if gone."""
    fields = proc_stat(pid)
    return None if fields is None else int(fields[19])


def owner_tag(pid: int | None = None) -> str:
    """``psbx-<pid>-<starttime>``: names the resources one pytest process owns."""
    pid = os.getpid() if pid is None else pid
    start = process_start_time(pid)
    return f"{PREFIX}-{pid}-{start if start is not None else 0}"


def parse_owner_tag(name: str) -> tuple[int, int] | None:
    m = _OWNER_RE.match(name)
    return (int(m.group(1)), int(m.group(2))) if m else None


def owner_alive(name: str) -> bool:
    """True unless ``name`` is an owner tag whose process is gone (or was replaced by a new one).

    Names that are not owner tags count as alive: a sweeper never touches what it cannot attribute.
    """
    parsed = parse_owner_tag(name)
    if parsed is None:
        return True
    pid, start = parsed
    return process_start_time(pid) == start


def namespace_owner_uid(host_pid: int) -> int:
    """The host uid that creates, and so owns, the user namespace of the container whose init has
    ``host_pid``: unique among live containers on the host, whichever pytest process runs them."""
    if not 0 < host_pid < OWNER_UID_COUNT:
        raise ValueError(f"pid {host_pid} is outside 1..{OWNER_UID_COUNT - 1} (PID_MAX_LIMIT)")
    return OWNER_UID_BASE + host_pid


def overlaps_owner_uids(uid_base: int) -> bool:
    """Whether the id range starting at ``uid_base`` shares a host uid with the owner range."""
    return uid_base < OWNER_UID_BASE + OWNER_UID_COUNT and uid_base + ID_RANGE > OWNER_UID_BASE


def container_dir_name(container_id: str) -> str:
    return f"c-{container_id}"


def cgroup_leaf_name(container_id: str) -> str:
    return f"{PREFIX}-c-{container_id}"


def _base36(n: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        n, r = divmod(n, 36)
        out = digits[r] + out
        if not n:
            return out


def interface_name(kind: str, serial: int, pid: int | None = None) -> str:
    """``psbx`` + kind (``b`` bridge, ``v`` veth) + base-36 pid + ``x`` + base-36 serial: <= 15 bytes.

    Unique on the host, not only in the hub namespace where these live: pids are unique among
    running processes, and the serial among one process's interfaces.
    """
    name = f"{PREFIX}{kind}{_base36(os.getpid() if pid is None else pid)}x{_base36(serial)}"
    if len(name) > 15:  # IFNAMSIZ - 1; pid <= 2**22 takes 5 digits, so 4 are left for the serial
        raise ValueError(f"interface name {name!r} is longer than 15 bytes (serial {serial} too large)")
    return name
