"""What is collected where: the tiers live in tests/unit, tests/kernel and tests/vm.

tests/vm needs a pure cgroup v2 host (.ci/vm-tests boots one in a VM).  Elsewhere it is not
collected at all rather than skipped: the host suite runs in strict mode (a skip fails there), and
those tests do run -- in the VM, strictly too.  This file needs nothing but the standard library
(tests/unit must not depend on the kernel tiers' fixtures; see tests/kernel_fixtures.py).
"""

from __future__ import annotations

import os


def _pure_cgroup_v2() -> bool:
    try:
        with open("/proc/self/mountinfo") as f:
            fstypes = {line.split(" - ", 1)[1].split()[0] for line in f if " - " in line}
    except OSError:
        return False
    return "cgroup2" in fstypes and "cgroup" not in fstypes and os.geteuid() == 0


collect_ignore_glob = [] if _pure_cgroup_v2() else ["vm/*"]
