"""The launcher protocol's messages, encoded and decoded (pure: no root, no launcher, no kernel)."""

from __future__ import annotations

import dataclasses
import signal
import socket
import struct
from typing import Any

import pytest

from pytest_sandbox.core.errors import InvalidSpecError
from pytest_sandbox.core.limits import Limits
from pytest_sandbox.core.spec import BindMount, ContainerSpec, OverlaySpec, ProcessSpec, TmpfsMount
from pytest_sandbox.host.cgroups.base import CgroupStats
from pytest_sandbox.launcher import protocol
from pytest_sandbox.launcher.protocol import (
    Ack,
    CgroupFiles,
    CommandExited,
    CommandStarted,
    CreateRequest,
    Event,
    ExecRequest,
    Exited,
    FrameBuffer,
    Hello,
    LimitsRequest,
    Op,
    ProtocolError,
    RemoveRequest,
    Request,
    RunRequest,
    SetupFailed,
    ShutdownRequest,
    SignalRequest,
    Started,
    StatsRequest,
    UsernsMade,
    WaitRequest,
)

SPEC = ContainerSpec(
    id="0123456789ab",
    hostname="web",
    process=ProcessSpec(("sh", "-c", "echo é"), env=(("A", "1"), ("B", "x=y")), workdir="/w", user="1:2"),
    overlays=(OverlaySpec("", ("/l/2", "/l/1")), OverlaySpec("/opt", ("/l/3",))),
    mounts=(BindMount("/src", "/dst", read_only=True),),
    tmpfs=(TmpfsMount("/tmp", size=1 << 20, mode=0o1777),),
    limits=Limits.parse(memory="64m", pids=32),
    cgroup=True,
    etc_files=(("hostname", "web\n"),),
    read_only=True,
    stdin="/state/c-0123456789ab/stdin",
    netns="/proc/1/fd/7",
)
SPEC_BYTES = protocol.encode_spec(SPEC)
STATS = CgroupStats(oom_kills=1, pids_limit_hits=2, cpu_usage_s=0.5, cpu_throttled_s=0.25, nr_throttled=3)
ERROR = {"type": "SetupError", "message": "EPERM", "hint": "", "call": "mount", "path": "/", "errno": 1}

REQUESTS: list[Request[Any]] = [
    CreateRequest(SPEC_BYTES, "/state/c-0123456789ab"),
    RunRequest(SPEC_BYTES, "/state/c-0123456789ab"),
    ExecRequest("0123456789ab.1", "0123456789ab", SPEC.process, "/s/out", "/s/err", "/s/in"),
    ExecRequest("0123456789ab.2", "0123456789ab", SPEC.process, "/s/out", "/s/err", None),
    WaitRequest("0123456789ab"),
    SignalRequest("0123456789ab", signal.SIGTERM),
    StatsRequest("0123456789ab"),
    LimitsRequest("0123456789ab"),
    RemoveRequest("0123456789ab.1"),
    ShutdownRequest(),
]


def _one_frame(data: bytes) -> protocol.Frame:
    frames = FrameBuffer().feed(data)
    assert len(frames) == 1
    assert not isinstance(frames[0], ProtocolError), frames[0]
    return frames[0]


@pytest.mark.parametrize("request_", REQUESTS, ids=lambda r: type(r).__name__)
def test_request_round_trip(request_: Request[Any]) -> None:
    header, blob = _one_frame(protocol.encode_request(7, request_))
    assert header["op"] == request_.op.value
    assert protocol.rid_of(header) == 7
    assert protocol.decode_request(header, blob) == request_


def test_every_op_has_a_request() -> None:
    assert {r.op for r in REQUESTS} == set(Op)


def test_the_spec_travels_as_its_bytes() -> None:
    """The spec is the frame's blob, not part of the JSON header, and reaches the spare unchanged."""
    frame = protocol.encode_request(1, CreateRequest(SPEC_BYTES, "/state/c-x"))
    header, blob = _one_frame(frame)
    assert blob == SPEC_BYTES
    assert "spec" not in header
    directory, spec = protocol.decode_handover(protocol.encode_handover("/state/c-é", blob))
    assert (directory, spec) == ("/state/c-é", SPEC_BYTES)
    assert protocol.decode_spec(spec) == SPEC


REPLIES: list[tuple[Request[Any], protocol.Reply, object]] = [
    (CreateRequest(b"", "/d"), Started(101, 100), Started(101, 100)),
    (ExecRequest("c.1", "c", SPEC.process, "/o", "/e"), Started(102), Started(102, 0)),
    (
        RunRequest(b"", "/d"),
        Exited(101, 100, 0, None, 0.012, STATS),
        Exited(101, 100, 0, None, 0.012, STATS),
    ),
    (
        WaitRequest("c.1"),
        Exited(0, 0, None, 9, 1.5, None, ERROR),
        Exited(0, 0, None, 9, 1.5, None, ERROR),
    ),
    (StatsRequest("c"), STATS, STATS),
    (StatsRequest("c"), CgroupStats(), CgroupStats()),
    (
        LimitsRequest("c"),
        CgroupFiles({"memory.max": "67108864"}, ("/sys/fs/cgroup/x",)),
        CgroupFiles({"memory.max": "67108864"}, ("/sys/fs/cgroup/x",)),
    ),
    (SignalRequest("c", 15), Ack(), None),
    (RemoveRequest("c"), Ack(), None),
    (ShutdownRequest(), Ack(), None),
]


@pytest.mark.parametrize(("request_", "reply", "decoded"), REPLIES, ids=lambda x: type(x).__name__)
def test_reply_round_trip(request_: Request[Any], reply: protocol.Reply, decoded: object) -> None:
    header, blob = _one_frame(protocol.encode_reply(3, reply))
    assert (protocol.rid_of(header), blob) == (3, b"")
    assert request_.reply(header["ok"]) == decoded


def test_hello_round_trip() -> None:
    hello = Hello(pid=42, uid_base=100000, idmap=True, cgroup="v1", cgroup_describe="cgroup v1 (memory)")
    header, _ = _one_frame(protocol.encode_reply(0, hello))
    assert Hello.from_wire(header["ok"]) == hello


def test_error_reply() -> None:
    header, _ = _one_frame(protocol.encode_error(5, ERROR))
    assert header == {"rid": 5, "error": ERROR}


@pytest.mark.parametrize(
    ("exited", "code"),
    [
        (Exited(1, 1, 3, None, 0.0), 3),
        (Exited(1, 1, None, signal.SIGTERM, 0.0), 128 + signal.SIGTERM),
        (Exited(1, 1, None, None, 0.0), 128 + signal.SIGKILL),
    ],
)
def test_exit_code_is_dockers(exited: Exited, code: int) -> None:
    assert exited.exit_code == code


EVENTS: list[protocol.StatusEvent] = [
    UsernsMade(),
    CommandStarted(2),
    SetupFailed(ERROR),
    CommandExited(0, None),
    CommandExited(None, signal.SIGKILL),
]


@pytest.mark.parametrize("event", EVENTS, ids=lambda e: type(e).__name__)
def test_event_round_trip(event: protocol.StatusEvent) -> None:
    line = protocol.encode_event(event)
    assert line.endswith(b"\n")
    assert line.count(b"\n") == 1
    assert protocol.decode_event(line) == event


def test_every_event_has_a_message() -> None:
    assert {e.ev for e in EVENTS} == set(Event)


def test_events_split_across_reads() -> None:
    data = b"".join(protocol.encode_event(e) for e in EVENTS)
    lines = protocol.LineBuffer()
    got = [e for i in range(0, len(data), 5) for e in lines.feed(data[i : i + 5])]
    assert got == EVENTS


def test_command_exited_from_a_wait_status() -> None:
    assert CommandExited.from_status(3 << 8) == CommandExited(3, None)
    assert CommandExited.from_status(signal.SIGKILL) == CommandExited(None, signal.SIGKILL)


def test_frames_split_and_joined_across_reads() -> None:
    data = b"".join(protocol.encode_request(rid, r) for rid, r in enumerate(REQUESTS))
    buffer = FrameBuffer()
    fed = [f for i in range(0, len(data), 7) for f in buffer.feed(data[i : i + 7])]
    frames = [f for f in fed if not isinstance(f, ProtocolError)]
    assert len(frames) == len(fed)
    assert [protocol.decode_request(*f) for f in frames] == REQUESTS
    assert [protocol.rid_of(h) for h, _ in frames] == list(range(len(REQUESTS)))


def test_recv_over_a_socket() -> None:
    a, b = socket.socketpair()
    with a, b:
        a.sendall(protocol.encode_request(9, RunRequest(SPEC_BYTES, "/d")))
        frame = protocol.recv(b)
        assert frame is not None
        assert protocol.decode_request(*frame) == RunRequest(SPEC_BYTES, "/d")
        a.shutdown(socket.SHUT_WR)
        assert protocol.recv(b) is None


@pytest.mark.parametrize(
    ("header", "match"),
    [
        ({"rid": 1, "op": "launch"}, "unknown operation 'launch'"),
        ({"rid": 1}, "unknown operation None"),
        ({"rid": 1, "op": "wait"}, "malformed wait request"),
        ({"rid": 1, "op": "signal", "id": "c", "signal": "TERM"}, "malformed signal request"),
        ({"rid": 1, "op": "exec", "id": "c.1", "parent": "c"}, "malformed exec request"),
    ],
)
def test_bad_requests_are_protocol_errors(header: dict[str, Any], match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        protocol.decode_request(header, b"")


@pytest.mark.parametrize(
    ("data", "match", "rid"),
    [
        (struct.pack(">II", 2, 0) + b"[]", "must be a JSON object", -1),
        (struct.pack(">II", 3, 0) + b"{x}", "not JSON", -1),
        (struct.pack(">II", protocol.MAX_HEADER + 1, 0), "over the limits", -1),
        (struct.pack(">II", 10, protocol.MAX_BLOB + 1) + b'{"rid": 7}', "over the limits", 7),
    ],
)
def test_a_bad_frame_is_an_error_in_its_place_and_the_next_frame_reads(
    data: bytes, match: str, rid: int
) -> None:
    """Issue 9, item 9: a frame the launcher cannot take is a ProtocolError in the stream (with its
    request id when its header could be read), its bytes dropped as they come -- never an exception
    out of the reader, which would end the launcher and every container with it."""
    buffer = FrameBuffer()
    header_size, blob_size = struct.unpack_from(">II", data)
    rest = b"\0" * (8 + header_size + blob_size - len(data))  # the refused frame's remaining bytes
    good = protocol.encode_request(8, WaitRequest("after"))
    out = buffer.feed(data)
    for i in range(0, len(rest), 1 << 20):
        out += buffer.feed(rest[i : i + (1 << 20)])
    out += buffer.feed(good)
    assert len(out) == 2, out
    error, frame = out
    assert isinstance(error, ProtocolError)
    assert error.rid == rid
    assert match in str(error)
    assert not isinstance(frame, ProtocolError)
    assert protocol.decode_request(*frame) == WaitRequest("after")
    assert len(buffer._buf) == 0  # nothing of the refused frame was kept


def test_an_oversized_frame_is_never_sent_nor_a_spec_encoded() -> None:
    with pytest.raises(ProtocolError, match="over the limits"):
        protocol.encode_frame({"rid": 1}, b"x" * (protocol.MAX_BLOB + 1))
    big = dataclasses.replace(SPEC, etc_files=(("big", "x" * protocol.MAX_BLOB),))
    with pytest.raises(InvalidSpecError, match=r"spec is \d+ bytes encoded, over the launcher's limit"):
        protocol.encode_spec(big)


def test_bad_spec_events_and_handovers_are_protocol_errors() -> None:
    with pytest.raises(ProtocolError, match="malformed container spec"):
        protocol.decode_spec(b'{"id": "x"}')
    with pytest.raises(ProtocolError, match="malformed status event"):
        protocol.decode_event(b'{"ev": "started"}')
    with pytest.raises(ProtocolError, match="malformed status event"):
        protocol.decode_event(b'{"ev": "paused"}')
    with pytest.raises(ProtocolError, match="shorter than its directory"):
        protocol.decode_handover(struct.pack(">I", 10) + b"/d")
    with pytest.raises(ProtocolError, match="shorter than its length prefix"):
        protocol.decode_handover(b"\0")


def test_rid_of_a_header_without_one() -> None:
    assert protocol.rid_of({}) == -1
    assert protocol.rid_of({"rid": True}) == -1
    assert protocol.rid_of({"rid": "1"}) == -1
