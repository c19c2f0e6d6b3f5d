"""``Container.exec``: a fork of the launcher that joins a running container and runs a command.

It joins the container's cgroup first (as host root; the cgroup namespace it then enters is rooted
there), then every namespace at once with ``setns(pidfd, ...)`` (Linux >= 5.8) -- a pidfd names the
container's init without the pid-reuse race of /proc/<pid>/ns paths.  setns into a PID namespace
only affects children, so the command runs as a child (:func:`~.process.launch`) while this
process stays outside the container's PID namespace, non-dumpable, waiting to report the exit.
"""

from __future__ import annotations

import os
import signal
from typing import NoReturn

from ..core.spec import ProcessSpec
from ..host import libc
from ..host.cgroups.base import Cgroup
from . import trace, userns
from .create import NAMESPACES_BUT_NET, become_namespace_root, open_stdio
from .init import report_setup_failure
from .process import launch, prepare
from .protocol import CommandExited, CommandStarted, write_event


def exec_main(
    proc: ProcessSpec,
    hostname: str,
    cgroup: Cgroup | None,
    *,
    init_pidfd: int,
    status_fd: int,
    stdin: str | None,
    output_fds: tuple[int, int],
    launcher_pid: int,
) -> NoReturn:
    """Run in a fresh fork of the launcher.  Never returns."""
    try:
        signal.set_wakeup_fd(-1)
        libc.prctl(libc.PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != launcher_pid:
            os._exit(137)
        open_stdio(stdin, output_fds)
        libc.close_fds_except({status_fd, init_pidfd} | trace.fds())
        libc.set_process_name("psbx-exec")
        libc.prctl(libc.PR_SET_DUMPABLE, 0)
        if cgroup is not None:
            cgroup.attach(0)
        userns.set_rlimits(userns.host_limits())  # the init's, while we may still raise them
        # The network namespace first, while host root: one prepared by pytest is owned by the
        # host's user namespace, and once in the container's user namespace we would have no
        # capability over it (setns(2) checks each namespace with the credentials of the user
        # namespace joined in the same call).
        libc.setns(init_pidfd, libc.CLONE_NEWNET)
        libc.setns(init_pidfd, libc.CLONE_NEWUSER | libc.CLONE_NEWPID | NAMESPACES_BUT_NET)
        os.close(init_pidfd)
        become_namespace_root()
        pid = launch(prepare(proc, hostname))
        write_event(status_fd, CommandStarted(pid))
        _, status = os.waitpid(pid, 0)
        write_event(status_fd, CommandExited.from_status(status))
        os._exit(0)
    except BaseException as e:
        report_setup_failure(status_fd, e)
