"""PID 1 of a container: start the command, forward signals, reap zombies, report the exit.

This is the container's first process (:mod:`.create`), forked from the launcher (no exec), so it
is Python code already in memory; after pivot_root it must import nothing new.  It is
non-dumpable, so nothing inside the container can ptrace it or open its /proc files (runc
CVE-2016-9962).  Two things end it with the launcher: its parent-death signal, and the
launcher's *lifeline* pipe, which it watches -- if the launcher dies, the write end closes and
init exits.  The kernel then kills every process of the PID namespace (pid_namespaces(7)): no
container outlives its pytest process, however that process ends.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
from typing import NoReturn

from ..core.errors import to_wire
from ..core.spec import ProcessSpec
from . import trace
from .process import launch, prepare
from .protocol import CommandExited, CommandStarted, SetupFailed, StatusEvent, write_event

_NOT_FORWARDED = {signal.SIGKILL, signal.SIGSTOP, signal.SIGCHLD, signal.SIGPIPE}
_FORWARDED = sorted(set(signal.valid_signals()) - _NOT_FORWARDED)


class _Forwarder:
    """Signal handlers installed *before* the command starts, so none is lost.

    A PID namespace's init receives only the signals it has a handler for -- others are dropped
    by the kernel (pid_namespaces(7)) -- and the command may be up and trapping signals before
    posix_spawn even returns here.  Signals that arrive before we know the command's pid are held
    and delivered as soon as we do.
    """

    def __init__(self) -> None:
        self.pid = 0
        self.held: list[int] = []

    def __call__(self, signum: int, _frame: object) -> None:
        if self.pid > 0:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signum)
        elif self.pid == 0:
            self.held.append(signum)

    def started(self, pid: int) -> None:
        self.pid = pid
        held, self.held = self.held, []
        for signum in held:
            self(signum, None)


def run_init(proc: ProcessSpec, hostname: str, status_fd: int, lifeline_fd: int) -> NoReturn:
    """Run the command as our child and report it on ``status_fd``.  Never returns."""
    forward = _Forwarder()
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # a handler, so SIGCHLD writes to the wakeup fd
    for sig in _FORWARDED:
        with contextlib.suppress(OSError, ValueError):  # glibc-reserved real-time signals
            signal.signal(sig, forward)
    try:
        main_pid = launch(prepare(proc, hostname))
    except BaseException as e:
        report_setup_failure(status_fd, e)
    forward.started(main_pid)
    trace.event("init: command started")
    _report(status_fd, CommandStarted(main_pid))
    status = _wait_main(main_pid, wake_r, lifeline_fd)
    forward.pid = -1  # reaped: its pid may be reused inside the namespace
    trace.event("init: command exited")
    _report(status_fd, CommandExited.from_status(status))
    # Exiting as PID 1 makes the kernel SIGKILL whatever is left in the namespace (Docker semantics:
    # the container ends with its main process).
    os._exit(0)


def _wait_main(main_pid: int, wake_r: int, lifeline_fd: int) -> int:
    """Reap every child until the main one exits; return its wait status."""
    while True:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                pid = 0
            if pid == 0:
                break
            if pid == main_pid:
                return status
        ready, _, _ = select.select([wake_r, lifeline_fd], [], [])
        if lifeline_fd in ready:
            os._exit(137)  # the launcher is gone: take the whole namespace down with us
        try:
            while os.read(wake_r, 4096):
                pass
        except BlockingIOError:
            pass


def _report(fd: int, event: StatusEvent) -> None:
    try:
        write_event(fd, event)
    except OSError:
        os._exit(137)  # the launcher is gone


def report_setup_failure(fd: int, exc: BaseException) -> NoReturn:
    error = to_wire(exc)
    try:
        write_event(fd, SetupFailed(error))
    finally:
        os._exit(125)
