# Long module: the whole wire protocol -- every request, reply and status event, their framing
# and its limits -- is one contract between two processes; split, each message would be read apart.
"""The launcher's wire protocol: typed messages, shared by the pytest side and the launcher.

Stdlib, :mod:`pytest_sandbox.core` and the cgroup stats record only: the launcher imports it.

Between pytest and its launcher: a ``SOCK_STREAM`` socketpair carrying frames of two 4-byte
big-endian lengths, a UTF-8 JSON object (the *header*) and a *blob* of raw bytes (empty but for
``create`` and ``run``, where it is the encoded :class:`~pytest_sandbox.core.spec.ContainerSpec`).
A request's header carries ``rid`` (request id, chosen by the client) and ``op``; every request
gets exactly one reply ``{"rid": ..., "ok": {...}}`` or ``{"rid": ..., "error": {...}}`` (an error
dict from :func:`pytest_sandbox.core.errors.to_wire`).  Replies may come out of order: ``wait`` is
answered only when the process exits.  On starting, the launcher sends :class:`Hello` as the reply
to request 0, which nobody sent.

Operations (``id`` is a container id, or ``<container id>.<n>`` for an exec):

=========  ===============================================  ========================================
op         request                                          reply
=========  ===============================================  ========================================
create     :class:`CreateRequest` (spec bytes, state dir)   :class:`Started` (the command runs)
run        :class:`RunRequest` (the same)                   :class:`Exited` (answered at exit: one
                                                            round trip instead of two)
exec       :class:`ExecRequest`                             :class:`Started`
wait       :class:`WaitRequest`                             :class:`Exited`
signal     :class:`SignalRequest`                           :class:`Ack`
stats      :class:`StatsRequest`                            ``CgroupStats`` now (or at exit)
limits     :class:`LimitsRequest`                           :class:`CgroupFiles`
remove     :class:`RemoveRequest`                           :class:`Ack` (after everything is gone)
shutdown   :class:`ShutdownRequest`                         :class:`Ack` (the launcher then exits)
=========  ===============================================  ========================================

The spec is encoded once, by pytest (:func:`encode_spec`).  The launcher parses it for what it
needs (id, limits) and hands a spare first process the same bytes, untouched, with the state
directory in front (:func:`encode_handover`).  A container's init and an exec helper report on a
pipe, one JSON object per line (:class:`Event`: ``userns``, ``started``, ``error``, ``exit``).

Sizes are bounded (:data:`MAX_HEADER`, :data:`MAX_BLOB`): the client refuses to send a larger
frame, and the launcher's :class:`FrameBuffer` reads one that comes anyway without keeping it and
answers it with an error -- no message can make the launcher, and every container with it, die.
"""

from __future__ import annotations

import enum
import json
import os
import signal
import socket
import struct
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Generic, TypeVar

from ..core.errors import InvalidSpecError
from ..core.spec import ContainerSpec, ProcessSpec
from ..host.cgroups.base import CgroupStats

_HEADER = struct.Struct(">II")  # header length, blob length
_LENGTH = struct.Struct(">I")
# A header holds at most an exec's argv and env: 2 MiB as execve(2) counts them (core/spec.
# check_exec_size), which JSON's escapes make at most 6 times larger.  A blob is an encoded spec.
MAX_HEADER = 16 << 20
MAX_BLOB = 16 << 20

Wire = dict[str, Any]
Frame = tuple[Wire, bytes]  # (header, blob)


class ProtocolError(ValueError):
    """A frame or message that does not follow this protocol; ``rid``: its request's, if known."""

    def __init__(self, message: str, *, rid: int = -1) -> None:
        super().__init__(message)
        self.rid = rid


class Op(str, enum.Enum):
    """What a request asks the launcher to do."""

    CREATE = "create"
    RUN = "run"
    EXEC = "exec"
    WAIT = "wait"
    SIGNAL = "signal"
    STATS = "stats"
    LIMITS = "limits"
    REMOVE = "remove"
    SHUTDOWN = "shutdown"


class Event(str, enum.Enum):
    """What a container's first process, its init or an exec helper tells the launcher."""

    USERNS = "userns"  # the user namespace exists: write its id maps, then say "go"
    STARTED = "started"
    ERROR = "error"
    EXIT = "exit"


# -- replies ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hello:
    """What the launcher found when it started."""

    pid: int
    uid_base: int
    idmap: bool  # idmapped layer mounts are possible
    cgroup: str  # the backend's name: "v1", "v2" or "none"
    cgroup_describe: str  # one line for the pytest header

    def to_wire(self) -> Wire:
        return asdict(self)

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> Hello:
        return cls(
            int(d["pid"]), int(d["uid_base"]), bool(d["idmap"]), str(d["cgroup"]), str(d["cgroup_describe"])
        )


@dataclass(frozen=True)
class Started:
    """A container's or an exec's command runs: its host pid (0 if it exited before we could look
    it up) and, for a container, the host pid of its init (0 for an exec)."""

    pid: int
    init_pid: int = 0

    def to_wire(self) -> Wire:
        return asdict(self)

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> Started:
        return cls(int(d["pid"]), int(d["init_pid"]))


@dataclass(frozen=True)
class Exited:
    """How a command ended: ``code`` if it exited, ``signal`` if a signal killed it."""

    pid: int
    init_pid: int
    code: int | None
    signal: int | None
    duration_s: float
    stats: CgroupStats | None = None  # read from its cgroup before that was removed
    error: Wire | None = None  # to_wire() of a setup failure

    @property
    def exit_code(self) -> int:
        """Docker's: the status, or 128 + the signal (SIGKILL if neither is known)."""
        if self.code is not None:
            return self.code
        return 128 + (self.signal or signal.SIGKILL)

    def to_wire(self) -> Wire:
        return {
            "pid": self.pid,
            "init_pid": self.init_pid,
            "code": self.code,
            "signal": self.signal,
            "duration_s": self.duration_s,
            "stats": self.stats.to_wire() if self.stats is not None else None,
            "error": self.error,
        }

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> Exited:
        return cls(
            pid=int(d["pid"]),
            init_pid=int(d["init_pid"]),
            code=_optional_int(d["code"]),
            signal=_optional_int(d["signal"]),
            duration_s=float(d["duration_s"]),
            stats=CgroupStats.from_wire(d["stats"]) if d["stats"] is not None else None,
            error=dict(d["error"]) if d["error"] is not None else None,
        )


@dataclass(frozen=True)
class CgroupFiles:
    """A container's cgroup as the kernel reports it: its limit files and its directories."""

    limits: Mapping[str, str]
    paths: tuple[str, ...]

    def to_wire(self) -> Wire:
        return {"limits": dict(self.limits), "paths": list(self.paths)}

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> CgroupFiles:
        return cls({str(k): str(v) for k, v in d["limits"].items()}, tuple(str(p) for p in d["paths"]))


@dataclass(frozen=True)
class Ack:
    """Done, nothing to say."""

    def to_wire(self) -> Wire:
        return {}


Reply = Hello | Started | Exited | CgroupStats | CgroupFiles | Ack
R = TypeVar("R")


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)


# -- requests -----------------------------------------------------------------------------------


class Request(Generic[R]):
    """A request; ``R`` is what its reply decodes to on the client's side."""

    op: ClassVar[Op]

    @property
    def blob(self) -> bytes:
        return b""

    @property
    def fds(self) -> tuple[int, ...]:  # sent with the frame (launcher/fdpass)
        return ()

    def to_wire(self) -> Wire:
        return {}

    def reply(self, ok: Mapping[str, Any]) -> R:
        raise NotImplementedError


@dataclass(frozen=True)
class _ById(Request[R]):
    id: str

    def to_wire(self) -> Wire:
        return {"id": self.id}


@dataclass(frozen=True)
class _WithSpec(Request[R]):
    spec: bytes  # encode_spec(): travels as the blob, and on to a spare as it is
    directory: str  # its state directory, made by the client
    mount_fds: tuple[int, ...] = ()  # an O_PATH fd per bind mount (host/bindsource), by SCM_RIGHTS

    @property
    def blob(self) -> bytes:
        return self.spec

    @property
    def fds(self) -> tuple[int, ...]:
        return self.mount_fds

    def to_wire(self) -> Wire:
        return {"dir": self.directory, "fds": len(self.mount_fds)}


@dataclass(frozen=True)
class CreateRequest(_WithSpec[Started]):
    """Create a container; answered when its command has started."""

    op: ClassVar[Op] = Op.CREATE

    def reply(self, ok: Mapping[str, Any]) -> Started:
        return Started.from_wire(ok)


@dataclass(frozen=True)
class RunRequest(_WithSpec[Exited]):
    """Create a container; answered when its command has exited (``sandbox.run``)."""

    op: ClassVar[Op] = Op.RUN

    def reply(self, ok: Mapping[str, Any]) -> Exited:
        return Exited.from_wire(ok)


@dataclass(frozen=True)
class ExecRequest(Request[Started]):
    """Run ``process`` in the running container ``parent``, as exec ``id``."""

    op: ClassVar[Op] = Op.EXEC
    id: str
    parent: str
    process: ProcessSpec
    stdout: str
    stderr: str
    stdin: str | None = None

    def to_wire(self) -> Wire:
        return {
            "id": self.id,
            "parent": self.parent,
            "process": self.process.to_wire(),
            "stdout": self.stdout,
            "stderr": self.stderr,
            "stdin": self.stdin,
        }

    def reply(self, ok: Mapping[str, Any]) -> Started:
        return Started.from_wire(ok)


@dataclass(frozen=True)
class WaitRequest(_ById[Exited]):
    op: ClassVar[Op] = Op.WAIT

    def reply(self, ok: Mapping[str, Any]) -> Exited:
        return Exited.from_wire(ok)


@dataclass(frozen=True)
class SignalRequest(Request[None]):
    op: ClassVar[Op] = Op.SIGNAL
    id: str
    signal: int

    def to_wire(self) -> Wire:
        return {"id": self.id, "signal": self.signal}

    def reply(self, ok: Mapping[str, Any]) -> None:
        return None


@dataclass(frozen=True)
class StatsRequest(_ById[CgroupStats]):
    op: ClassVar[Op] = Op.STATS

    def reply(self, ok: Mapping[str, Any]) -> CgroupStats:
        return CgroupStats.from_wire(dict(ok))


@dataclass(frozen=True)
class LimitsRequest(_ById[CgroupFiles]):
    op: ClassVar[Op] = Op.LIMITS

    def reply(self, ok: Mapping[str, Any]) -> CgroupFiles:
        return CgroupFiles.from_wire(ok)


@dataclass(frozen=True)
class RemoveRequest(_ById[None]):
    op: ClassVar[Op] = Op.REMOVE

    def reply(self, ok: Mapping[str, Any]) -> None:
        return None


@dataclass(frozen=True)
class ShutdownRequest(Request[None]):
    op: ClassVar[Op] = Op.SHUTDOWN

    def reply(self, ok: Mapping[str, Any]) -> None:
        return None


AnyRequest = (
    CreateRequest
    | RunRequest
    | ExecRequest
    | WaitRequest
    | SignalRequest
    | StatsRequest
    | LimitsRequest
    | RemoveRequest
    | ShutdownRequest
)


def _request_from_wire(op: Op, h: Wire, blob: bytes, fds: tuple[int, ...]) -> AnyRequest:
    if op is Op.CREATE:
        return CreateRequest(blob, str(h["dir"]), fds)
    if op is Op.RUN:
        return RunRequest(blob, str(h["dir"]), fds)
    if op is Op.EXEC:
        stdin = h["stdin"]
        return ExecRequest(
            str(h["id"]),
            str(h["parent"]),
            ProcessSpec.from_wire(h["process"]),
            str(h["stdout"]),
            str(h["stderr"]),
            None if stdin is None else str(stdin),
        )
    if op is Op.SIGNAL:
        return SignalRequest(str(h["id"]), int(h["signal"]))
    if op is Op.SHUTDOWN:
        return ShutdownRequest()
    ident = str(h["id"])
    if op is Op.WAIT:
        return WaitRequest(ident)
    if op is Op.STATS:
        return StatsRequest(ident)
    if op is Op.LIMITS:
        return LimitsRequest(ident)
    return RemoveRequest(ident)


# -- frames -------------------------------------------------------------------------------------


def encode_frame(header: Wire, blob: bytes = b"") -> bytes:
    body = json.dumps(header, separators=(",", ":")).encode()
    _check_sizes(len(body), len(blob))
    return _HEADER.pack(len(body), len(blob)) + body + blob


def _check_sizes(header_size: int, blob_size: int) -> None:
    if header_size > MAX_HEADER or blob_size > MAX_BLOB:
        raise _size_error(header_size, blob_size)


def _size_error(header_size: int, blob_size: int, rid: int = -1) -> ProtocolError:
    return ProtocolError(
        f"launcher protocol: a frame of {header_size} + {blob_size} bytes (header + blob) is over "
        f"the limits of {MAX_HEADER} + {MAX_BLOB}",
        rid=rid,
    )


def _sizes(prefix: bytes | bytearray) -> tuple[int, int]:
    header_size, blob_size = _HEADER.unpack_from(prefix)
    _check_sizes(header_size, blob_size)
    return header_size, blob_size


def _header(body: bytes) -> Wire:
    try:
        header = json.loads(body)
    except ValueError as e:
        raise ProtocolError(f"launcher protocol: a frame's header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise ProtocolError("launcher protocol: a frame's header must be a JSON object")
    return header


def encode_request(rid: int, request: Request[Any]) -> bytes:
    return encode_frame({"rid": rid, "op": request.op.value, **request.to_wire()}, request.blob)


def decode_request(header: Wire, blob: bytes, fds: tuple[int, ...] = ()) -> AnyRequest:
    """The typed request of a frame; ProtocolError if it is not a well-formed one."""
    try:
        op = Op(header.get("op"))
    except ValueError:
        raise ProtocolError(f"launcher protocol: unknown operation {header.get('op')!r}") from None
    try:
        return _request_from_wire(op, header, blob, fds)
    except (KeyError, TypeError, ValueError) as e:
        raise ProtocolError(f"launcher protocol: malformed {op.value} request ({e!r})") from None


def rid_of(header: Wire) -> int:
    """A frame's request id (-1 if it has none: a reply to it goes nowhere)."""
    rid = header.get("rid")
    return rid if isinstance(rid, int) and not isinstance(rid, bool) else -1


def encode_reply(rid: int, reply: Reply) -> bytes:
    return encode_frame({"rid": rid, "ok": reply.to_wire()})


def encode_error(rid: int, error: Wire) -> bytes:
    return encode_frame({"rid": rid, "error": error})


def send(sock: socket.socket, frame: bytes) -> None:
    sock.sendall(frame)


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    chunks = []
    while n:
        chunk = sock.recv(n)
        if not chunk:
            return None
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def recv(sock: socket.socket) -> Frame | None:
    """One frame, or None at end of stream."""
    prefix = _recv_exact(sock, _HEADER.size)
    if prefix is None:
        return None
    header_size, blob_size = _sizes(prefix)
    body = _recv_exact(sock, header_size + blob_size)
    if body is None:
        return None
    return _header(body[:header_size]), body[header_size:]


class FrameBuffer:
    """Splits a non-blocking byte stream into frames.

    Never raises: a frame it cannot take -- over a size limit, or a header that is not a JSON
    object -- comes out as a :class:`ProtocolError` in its place (with its ``rid`` when its header
    could be read), and its bytes are consumed without being kept, so the next frame reads as usual.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._skip = 0  # bytes of a refused frame yet to come: read and dropped

    def feed(self, data: bytes) -> list[Frame | ProtocolError]:
        dropped = min(self._skip, len(data))
        self._skip -= dropped
        self._buf += data[dropped:]
        out: list[Frame | ProtocolError] = []
        while len(self._buf) >= _HEADER.size:
            header_size, blob_size = _HEADER.unpack_from(self._buf)
            header_end = _HEADER.size + header_size
            end = header_end + blob_size
            if header_size > MAX_HEADER or (blob_size > MAX_BLOB and len(self._buf) >= header_end):
                rid = (
                    -1
                    if header_size > MAX_HEADER
                    else rid_of(_header_or_empty(self._buf[_HEADER.size : header_end]))
                )
                out.append(_size_error(header_size, blob_size, rid))
                self._drop(end)
                continue
            if len(self._buf) < end:
                break
            body = bytes(self._buf[_HEADER.size : end])
            del self._buf[:end]
            try:
                out.append((_header(body[:header_size]), body[header_size:]))
            except ProtocolError as e:
                out.append(e)
        return out

    def _drop(self, size: int) -> None:
        """Drop the next ``size`` bytes of the stream: those buffered now, the rest as they come."""
        now = min(size, len(self._buf))
        del self._buf[:now]
        self._skip = size - now


def _header_or_empty(body: bytes | bytearray) -> Wire:
    try:
        return _header(bytes(body))
    except ProtocolError:
        return {}


# -- the spec and its hand-over to a spare ------------------------------------------------------


def encode_spec(spec: ContainerSpec) -> bytes:
    """The spec as it travels: encoded once, by the client (InvalidSpecError if over the limit)."""
    data = json.dumps(spec.to_wire(), separators=(",", ":")).encode()
    if len(data) > MAX_BLOB:
        raise InvalidSpecError(
            f"the container's spec is {len(data)} bytes encoded, over the launcher's limit of "
            f"{MAX_BLOB} (16 MiB): give fewer or shorter mounts, tmpfs, env or cmd"
        )
    return data


def decode_spec(data: bytes) -> ContainerSpec:
    try:
        return ContainerSpec.from_wire(json.loads(data))
    except (KeyError, TypeError, ValueError) as e:
        raise ProtocolError(f"launcher protocol: malformed container spec ({e!r})") from None


def encode_handover(directory: str, spec: bytes) -> bytes:
    """What a spare reads on its pipe: the state directory, then the spec's bytes as they came."""
    path = directory.encode()
    return _LENGTH.pack(len(path)) + path + spec


def decode_handover(data: bytes) -> tuple[str, bytes]:
    """(state directory, spec bytes) of :func:`encode_handover`."""
    if len(data) < _LENGTH.size:
        raise ProtocolError("launcher protocol: a hand-over shorter than its length prefix")
    (size,) = _LENGTH.unpack_from(data)
    end = _LENGTH.size + size
    if len(data) < end:
        raise ProtocolError("launcher protocol: a hand-over shorter than its directory")
    return data[_LENGTH.size : end].decode(), data[end:]


# -- status events (container process -> launcher) ----------------------------------------------


@dataclass(frozen=True)
class UsernsMade:
    """The first process made its user namespace and waits for its id maps."""

    ev: ClassVar[Event] = Event.USERNS


@dataclass(frozen=True)
class CommandStarted:
    pid: int  # in the reporter's PID namespace

    ev: ClassVar[Event] = Event.STARTED


@dataclass(frozen=True)
class SetupFailed:
    error: Wire  # to_wire() of the exception

    ev: ClassVar[Event] = Event.ERROR


@dataclass(frozen=True)
class CommandExited:
    code: int | None
    signal: int | None

    ev: ClassVar[Event] = Event.EXIT

    @classmethod
    def from_status(cls, status: int) -> CommandExited:
        """From a wait status."""
        if os.WIFSIGNALED(status):
            return cls(None, os.WTERMSIG(status))
        return cls(os.WEXITSTATUS(status), None)


StatusEvent = UsernsMade | CommandStarted | SetupFailed | CommandExited


def encode_event(event: StatusEvent) -> bytes:
    # vars(), not asdict(): no deep copy, on the path of every start (the fields are flat)
    return json.dumps({"ev": event.ev.value, **vars(event)}, separators=(",", ":")).encode() + b"\n"


def decode_event(line: bytes) -> StatusEvent:
    try:
        d = json.loads(line)
        ev = Event(d["ev"])
        if ev is Event.USERNS:
            return UsernsMade()
        if ev is Event.STARTED:
            return CommandStarted(int(d["pid"]))
        if ev is Event.ERROR:
            return SetupFailed(dict(d["error"]))
        return CommandExited(_optional_int(d["code"]), _optional_int(d["signal"]))
    except (KeyError, TypeError, ValueError) as e:
        raise ProtocolError(f"launcher protocol: malformed status event {line[:200]!r} ({e!r})") from None


def write_event(fd: int, event: StatusEvent) -> None:
    """One status line from a container process to the launcher (atomic: well under PIPE_BUF)."""
    os.write(fd, encode_event(event))


class LineBuffer:
    """Splits a status pipe's bytes into events."""

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, data: bytes) -> list[StatusEvent]:
        self._buf += data
        *lines, self._buf = self._buf.split(b"\n")
        return [decode_event(line) for line in lines if line.strip()]
