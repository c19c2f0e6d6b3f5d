"""One thread per process that may change network namespace (stdlib only).

A thread's network namespace is its own: ``setns(fd, CLONE_NEWNET)`` and ``unshare(CLONE_NEWNET)``
are allowed in a multithreaded process and move only the calling thread (setns(2), unshare(2)).
A socket -- netlink or TCP -- lives in the namespace of the thread that *created* it, forever.
So every namespace switch of this process happens here, in ``psbx-net``, which always returns to
the host's namespace before taking the next job: no other thread (the test's, pytest's) ever runs
in a container's namespace by accident.  pyroute2 0.9 keeps one netlink socket per thread per
object, so its objects are made and used only here too (see :mod:`pytest_sandbox.net.netlink`).

The thread also runs a selector loop for the loopback port forwarders
(:mod:`pytest_sandbox.net.forward`); a job never blocks for long, so forwarding stays responsive.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import os
import selectors
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any, TypeVar

from ..core.errors import NetworkError
from ..host import libc

T = TypeVar("T")
Handler = Callable[[int], None]  # called with the selector events that fired


class NetThread:
    """Runs jobs and socket handlers on one daemon thread, ``psbx-net``."""

    def __init__(self) -> None:
        # The host's namespace, taken from the creating thread: where psbx-net returns after a job.
        self.host_netns = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._jobs: deque[tuple[Callable[[], Any], Future[Any]]] = deque()
        self._timers: list[tuple[float, int, Callable[[], None]]] = []  # a heap, psbx-net's own
        self._timer_order = itertools.count()
        self._lock = threading.Lock()
        self._closing = False
        # fork(2) copies only the calling thread: in a child this object has no thread behind it,
        # and a job submitted there would wait forever (see submit).
        self._pid = os.getpid()
        self._thread = threading.Thread(target=self._loop, name="psbx-net", daemon=True)
        self._thread.start()

    # -- jobs ------------------------------------------------------------------------------

    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on psbx-net and return its result (re-raising its exception)."""
        if threading.current_thread() is self._thread:
            return fn()
        return self.submit(fn).result()

    @property
    def usable(self) -> bool:
        """True if psbx-net runs jobs for this process (not closed, and not a fork's copy)."""
        return os.getpid() == self._pid and not self._closing and self._thread.is_alive()

    def join(self, timeout: float = 10.0) -> None:
        """Wait for psbx-net to end (after :meth:`close`); nothing to wait for in a fork's copy."""
        if os.getpid() == self._pid and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def submit(self, fn: Callable[[], T]) -> Future[T]:
        if os.getpid() != self._pid:
            # Checked before taking the lock: a fork may have copied it held by psbx-net.
            raise NetworkError(
                f"the network thread belongs to process {self._pid}; this is a child made by "
                "os.fork(), which has no such thread (fork(2) copies only the calling thread)",
                hint="use networks and containers from the process that made them; in a forked "
                "child, make a new Sandbox (it gets the child's own runtime)",
            )
        future: Future[T] = Future()
        with self._lock:
            if self._closing:
                raise NetworkError("the network thread is closed (the session is ending)")
            self._jobs.append((fn, future))
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"j")
        return future

    @contextlib.contextmanager
    def inside(self, netns_fd: int) -> Iterator[None]:
        """On psbx-net only: run the body in ``netns_fd``'s namespace, then return to the host's."""
        assert threading.current_thread() is self._thread, "namespace switches belong to psbx-net"
        libc.setns(netns_fd, libc.CLONE_NEWNET)
        try:
            yield
        finally:
            self._back_home()

    def new_netns(self) -> int:
        """On psbx-net only: a new network namespace, owned by the host's user namespace; its fd.

        The thread is left *inside* it (callers configure it, then leave with :meth:`inside`'s exit
        or :meth:`go_home`).
        """
        assert threading.current_thread() is self._thread, "namespace switches belong to psbx-net"
        libc.unshare(libc.CLONE_NEWNET)
        try:
            return os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        except BaseException:
            self._back_home()
            raise

    def go_home(self) -> None:
        self._back_home()

    def _back_home(self) -> None:
        try:
            libc.setns(self.host_netns, libc.CLONE_NEWNET)
        except OSError:
            # Never go on in a container's namespace: every later socket would be made there.
            os.write(2, b"psbx-net: cannot return to the host network namespace; aborting\n")
            os._exit(70)

    # -- socket handlers (forwarders) ------------------------------------------------------

    def register(self, fd: int, events: int, handler: Handler) -> None:
        """On psbx-net only (from a job or a handler): call ``handler(events)`` when ``fd`` is ready."""
        self._selector.register(fd, events, handler)

    def modify(self, fd: int, events: int, handler: Handler) -> None:
        self._selector.modify(fd, events, handler)

    def unregister(self, fd: int) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(fd)

    # -- the loop --------------------------------------------------------------------------

    def call_later(self, delay: float, fn: Callable[[], None]) -> None:
        """On psbx-net only (from a job or a handler): run ``fn`` there in ``delay`` seconds."""
        heapq.heappush(self._timers, (time.monotonic() + delay, next(self._timer_order), fn))

    def _run_due_timers(self) -> float | None:
        """Run the timers that are due; the seconds until the next one (None: none left)."""
        while self._timers:
            due, _, fn = self._timers[0]
            wait = due - time.monotonic()
            if wait > 0:
                return wait
            heapq.heappop(self._timers)
            try:
                fn()
            except Exception as e:
                os.write(2, f"psbx-net: timer failed: {e!r}\n".encode())
        return None

    def _loop(self) -> None:
        while True:
            for key, events in self._selector.select(self._run_due_timers()):
                if key.data is None:
                    with contextlib.suppress(BlockingIOError):
                        os.read(self._wake_r, 4096)
                    continue
                try:
                    key.data(events)
                except Exception as e:  # one broken relay must not stop the others
                    os.write(2, f"psbx-net: socket handler failed: {e!r}\n".encode())
            while True:
                with self._lock:
                    if not self._jobs:
                        closing = self._closing
                        break
                    fn, future = self._jobs.popleft()
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn())
                    except BaseException as e:
                        future.set_exception(e)
            if closing:
                return

    def close(self) -> None:
        """Run what is queued, then stop the thread (jobs submitted later are refused)."""
        if os.getpid() != self._pid:
            return  # a fork's copy: the thread and its fds are the parent's to close
        with self._lock:
            if self._closing:
                return
            self._closing = True
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"q")
        if self._thread is not threading.current_thread():
            self._thread.join(10)
        self._selector.close()
        for fd in (self._wake_r, self._wake_w, self.host_netns):
            os.close(fd)
