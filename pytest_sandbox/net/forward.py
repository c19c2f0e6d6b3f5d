"""Published ports: a loopback listener in the host's namespace relaying into a container's.

``container.address(port)`` returns ``("127.0.0.1", P)``; connections to P are relayed to the
container's ``port`` -- on its first network's address, or on its loopback without a network.
The upstream socket is *created* inside the container's network namespace (on ``psbx-net``,
:mod:`pytest_sandbox.net.netthread`), so no route, bridge address or firewall rule on the host is
needed, nothing of ours is visible in the host's namespace, and every xdist worker gets its own
ports from the kernel (bind to port 0).  Only the published port is reachable from the host; the
container still cannot reach the host (no ``route_localnet``: CVE-2020-8558).
"""

from __future__ import annotations

import contextlib
import errno
import os
import selectors
import socket
import struct

from ..core.errors import NetworkError
from .netthread import NetThread

ACCEPT_PAUSE = 0.05  # seconds without accepting after running out of fds
BUFFER_LIMIT = 1 << 18  # per direction: stop reading from a side while the other is this far behind
READ, WRITE = selectors.EVENT_READ, selectors.EVENT_WRITE


class Forwarder:
    """Relays ``127.0.0.1:<port>`` (host) to ``target`` inside ``netns_fd``'s namespace.

    The forwarder *owns* ``netns_fd`` (a reference of its own, closed by :meth:`close`, also if
    the constructor fails): every accepted connection setns()es through it, so it must name the
    same namespace for the forwarder's whole life -- a borrowed fd closed by its owner could be
    reused by the next open(), e.g. another container's namespace.
    """

    def __init__(self, net: NetThread, netns_fd: int, target: tuple[str, int]) -> None:
        self.net = net
        self.netns_fd = netns_fd
        self.target = target
        self._relays: set[_Relay] = set()
        self._closed = False
        try:
            self.listener = net.call(self._listen)
        except BaseException:
            os.close(netns_fd)
            raise
        self.address: tuple[str, int] = self.listener.getsockname()

    def _listen(self) -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        try:
            s.bind(("127.0.0.1", 0))
            s.listen(128)
            self.net.register(s.fileno(), READ, self._on_accept)
        except BaseException:
            s.close()
            raise
        return s

    def _on_accept(self, _events: int) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM) and not self._closed:
                    # Out of fds: the connection stays in the backlog and the listener readable,
                    # so selecting on it again would spin psbx-net at 100% CPU.  Pause instead.
                    self.net.unregister(self.listener.fileno())
                    self.net.call_later(ACCEPT_PAUSE, self._resume)
                return  # else the listener was closed by close() in between
            client.setblocking(False)
            try:
                with self.net.inside(self.netns_fd):
                    upstream = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
                upstream.setblocking(False)
            except OSError:
                client.close()
                continue
            relay = _Relay(self, client, upstream)
            if not relay.closed:
                self._relays.add(relay)

    def _resume(self) -> None:
        if not self._closed:
            self.net.register(self.listener.fileno(), READ, self._on_accept)
            self._on_accept(READ)

    def close(self) -> None:
        """Stop listening, drop every relayed connection, release the namespace.  Idempotent."""

        def close() -> None:
            if self._closed:
                return
            self._closed = True
            self.net.unregister(self.listener.fileno())
            self.listener.close()
            for relay in list(self._relays):
                relay.close()
            os.close(self.netns_fd)

        if self.net.usable:
            with contextlib.suppress(NetworkError):  # closed meanwhile: then it is ours, below
                self.net.call(close)
                return
        # No psbx-net to run it (the session's networks are closed, or this is a fork's copy):
        # once it has ended, nothing else touches these sockets, so close them here.
        self.net.join()
        close()


class _Relay:
    """One relayed connection: bytes both ways, half-closes passed on, bounded buffers."""

    def __init__(self, owner: Forwarder, client: socket.socket, upstream: socket.socket) -> None:
        self.owner = owner
        self.net = owner.net
        self.client, self.upstream = client, upstream
        self.pending: dict[socket.socket, bytearray] = {client: bytearray(), upstream: bytearray()}
        self.eof: dict[socket.socket, bool] = {client: False, upstream: False}
        self.shut: dict[socket.socket, bool] = {client: False, upstream: False}
        self.registered: dict[socket.socket, int] = {}
        self.closed = False
        err = upstream.connect_ex(owner.target)
        if err not in (0, errno.EINPROGRESS):
            self.close()
            return
        self._set(upstream, WRITE, self._on_connected)

    def _other(self, s: socket.socket) -> socket.socket:
        return self.upstream if s is self.client else self.client

    def _set(self, s: socket.socket, events: int, handler: object = None) -> None:
        current = self.registered.get(s, 0)
        callback = handler or (lambda ev, s=s: self._on_ready(s, ev))
        if events == 0:
            if current:
                self.net.unregister(s.fileno())
                del self.registered[s]
        elif current:
            self.net.modify(s.fileno(), events, callback)  # type: ignore[arg-type]
            self.registered[s] = events
        else:
            self.net.register(s.fileno(), events, callback)  # type: ignore[arg-type]
            self.registered[s] = events

    def _on_connected(self, _events: int) -> None:
        if self.upstream.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
            # Refused: reset the client's connection (SO_LINGER 0: close sends RST, socket(7)), so
            # it fails as a refused connect would, not as a service answering nothing.
            with contextlib.suppress(OSError):
                self.client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close()
            return
        self.registered.pop(self.upstream, None)
        self.net.unregister(self.upstream.fileno())
        self._update()

    def _on_ready(self, s: socket.socket, events: int) -> None:
        try:
            if events & READ:
                data = s.recv(65536)
                if data:
                    self.pending[self._other(s)] += data
                else:
                    self.eof[s] = True
            if events & WRITE and self.pending[s]:
                sent = s.send(self.pending[s])
                del self.pending[s][:sent]
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            self.close()
            return
        self._update()

    def _update(self) -> None:
        for s in (self.client, self.upstream):
            if self.eof[self._other(s)] and not self.pending[s] and not self.shut[s]:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_WR)  # pass the half-close on (HTTP/1.0 clients rely on it)
                self.shut[s] = True
        if self.shut[self.client] and self.shut[self.upstream]:
            self.close()
            return
        for s in (self.client, self.upstream):
            events = 0
            if not self.eof[s] and len(self.pending[self._other(s)]) < BUFFER_LIMIT:
                events |= READ
            if self.pending[s]:
                events |= WRITE
            self._set(s, events)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for s in (self.client, self.upstream):
            if s in self.registered:
                self.net.unregister(s.fileno())
            s.close()
        self.registered.clear()
        self.owner._relays.discard(self)
