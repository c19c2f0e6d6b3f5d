"""Container output with real containers: pipes, capped and rotated logs, bounded reads, escaped
reports (issue 9, items 2 and 11).

A container used to own its log files: ``ftruncate(1, 1 << 40)`` made a 1 TiB sparse log, and
then run(), exec(), wait_for_log() and remove() raised MemoryError and a failing test's report
an INTERNALERROR.  The tests that need other log settings, or a failing test, run a child pytest
in a subprocess (a child in this process would share this session's runtime and settings).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from pytest_sandbox import ReadinessError, Sandbox

pytest_plugins = ["pytester"]

CHILD_ARGS = ("-p", "no:cacheprovider", "-p", "no:randomly", "--color=no")

# The command of the flood tests: try to make the log 1 TiB, then write 64 MiB, then READY.
FLOOD = r"""
import os, sys
try:
    os.ftruncate(1, 1 << 40)
    print("ftruncate worked", file=sys.stderr, flush=True)
except OSError as e:
    print("ftruncate refused", e.errno, file=sys.stderr, flush=True)
block = b"x" * 65535 + b"\n"
for _ in range(1024):
    sys.stdout.buffer.write(block)
sys.stdout.buffer.write(b"READY\n")
sys.stdout.flush()
if sys.argv[1:] == ["stay"]:
    import time
    time.sleep(120)
"""

FLOOD_CHILD = """
import json, os, time

FLOOD = {flood!r}
CAP = 1 << 20


def peak_rss():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def log_files(directory):
    names = [n for n in os.listdir(directory) if n.startswith(("stdout", "stderr"))]
    return {{n: os.stat(os.path.join(directory, n)) for n in names}}


def test_flood(sandbox):
    before = peak_rss()
    # run(): its Result holds at most the cap of each stream, the newest bytes.
    r = sandbox.run(["python3", "-c", FLOOD], timeout=300)
    assert r.exit_code == 0
    assert b"ftruncate refused 22" in r.stderr  # EINVAL: stdout is a pipe
    assert len(r.stdout) == CAP and r.stdout.endswith(b"x\\nREADY\\n")

    c = sandbox.start(["python3", "-c", FLOOD, "stay"])
    c.wait_for_log(b"READY", timeout=300)  # through 64 rotations
    files = log_files(c.dir)
    assert sorted(files) == ["stderr", "stdout", "stdout.1"], sorted(files)
    assert all(st.st_size <= CAP and st.st_blocks * 512 <= CAP + 65536 for st in files.values())
    out = c.logs("stdout")
    assert len(out) == CAP and out.endswith(b"x\\nREADY\\n")  # across stdout.1 and stdout
    assert len(c.logs("stdout", max_bytes=2 * CAP)) <= 2 * CAP
    assert b"ftruncate refused 22" in c.logs("stderr")
    e = c.exec(["python3", "-c", FLOOD])
    assert len(e.stdout) == CAP and e.stdout.endswith(b"READY\\n")
    assert e.stderr.startswith(b"ftruncate refused 22")
    t0 = time.monotonic()
    c.remove()
    removed_in = time.monotonic() - t0
    assert not os.path.exists(c.dir)
    with open("measured.json", "w") as f:
        json.dump({{"before": before, "after": peak_rss(), "remove_s": removed_in}}, f)
"""


def test_a_flooding_container_cannot_grow_its_log_or_pytest(pytester: pytest.Pytester) -> None:
    """Issue 9, item 2: ftruncate(1, 1 TiB) is refused (stdout is a pipe) and 64 MiB of output
    leave at most max_size * max_file on disk; run(), logs(), wait_for_log(), exec() and remove()
    work, and the child pytest's peak RSS (VmHWM) grows by far less than what was written."""
    pytester.makepyfile(FLOOD_CHILD.format(flood=FLOOD))
    result = pytester.runpytest_subprocess(
        *CHILD_ARGS, "-o", "sandbox_log_max_size=1m", "-o", "sandbox_log_max_file=2", timeout=600
    )
    assert result.ret == 0, result.stdout.str()
    measured = json.loads((pytester.path / "measured.json").read_text())
    grown = measured["after"] - measured["before"]
    print(f"child pytest peak RSS {measured['before'] >> 20} -> {measured['after'] >> 20} MiB")
    assert grown < 24 << 20, measured  # 3 x 64 MiB went through; reads hold ~ 2 x the 1 MiB cap
    assert measured["remove_s"] < 5


REPORT_CHILD = r"""
def test_fails(sandbox):
    flood = "head -c 100m /dev/zero | tr '\\0' x; printf 'tail\\033[2J-line\\n'; sleep 60"
    c = sandbox.start(["sh", "-c", flood])
    c.wait_for_log(b"-line", timeout=300)
    sandbox.run(["sh", "-c", "printf 'run\\033]52;c;cHduZWQ=\\007out\\n'; exit 1"])
    assert False, "fails on purpose"
"""


def test_a_failing_test_with_a_huge_hostile_log_gets_a_normal_bounded_report(
    pytester: pytest.Pytester,
) -> None:
    """Issue 9, items 2 and 11: 100 MiB on one line and escape sequences in a failing test's
    containers make a normal failure report -- no INTERNALERROR, a bounded tail, no raw ESC."""
    pytester.makepyfile(REPORT_CHILD)
    result = pytester.runpytest_subprocess(*CHILD_ARGS, timeout=600)
    result.assert_outcomes(failed=1)
    text = result.stdout.str() + result.stderr.str()
    assert "INTERNALERROR" not in text
    assert "\x1b" not in text
    assert "\x07" not in text
    assert "tail\\x1b[2J-line" in text  # the container's last line, escaped
    assert "run\\x1b]52;c;cHduZWQ=\\x07out" in text
    assert len(text) < 100_000, len(text)


FULL_DISK_CHILD = """
import time


def test_output_to_a_full_disk(sandbox):
    t0 = time.monotonic()
    sleeper = sandbox.start(["sleep", "60"])  # first: a full disk leaves no room for a new container
    c = sandbox.start(["sh", "-c", "head -c 64m /dev/zero; exit 7"])
    assert c.wait(120).exit_code == 7  # its writes all succeeded: the output was dropped
    assert len(c.logs("stdout")) <= 2 << 20  # what the 2 MiB disk held
    c.remove()
    r = sandbox.run(["sh", "-c", "head -c 64m /dev/zero; exit 0"], timeout=120)
    assert r.exit_code == 0
    e = sleeper.exec(["head", "-c", "64m", "/dev/zero"], timeout=120)
    assert e.exit_code == 0
    assert time.monotonic() - t0 < 60
"""


def test_a_full_disk_drops_output_and_nothing_waits_for_it(pytester: pytest.Pytester, tmp_path: Path) -> None:
    """The state directory on a 2 MiB tmpfs: the log writer's writes fail with ENOSPC, the output
    is dropped and the pipes drained, so exits, waits, exec and removal go on."""
    state = tmp_path / "small-state"
    state.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m,mode=0755", "logs-test-full", str(state)], check=True
    )
    try:
        pytester.makepyfile(FULL_DISK_CHILD)
        result = pytester.runpytest_subprocess(*CHILD_ARGS, f"--sandbox-state-dir={state}", timeout=300)
        result.assert_outcomes(passed=1)
        assert os.listdir(state) == []  # the child's session removed its state directory
    finally:
        subprocess.run(["umount", str(state)], check=True)


def test_an_exec_returns_while_its_background_process_holds_the_output(sandbox: Sandbox) -> None:
    """An exec's result comes at its exit, not at the EOF a background child delays; that child
    keeps writing (its output is drained and dropped: no SIGPIPE, no blocking), and remove()
    does not wait for a pipe a flood holds."""
    c = sandbox.start(["sleep", "60"])
    t0 = time.monotonic()
    r = c.exec(["sh", "-c", "(sleep 1; echo late; echo alive > /tmp/alive) & echo now"], timeout=30)
    assert time.monotonic() - t0 < 1.0
    assert r.stdout == b"now\n"
    c.wait_for(
        lambda: c.exec(["cat", "/tmp/alive"]).stdout == b"alive\n", timeout=10, what="the background child"
    )
    c.exec(["sh", "-c", "yes & yes >&2 &"])
    t0 = time.monotonic()
    c.remove()
    assert time.monotonic() - t0 < 5.0


def test_escape_sequences_in_errors_are_escaped(sandbox: Sandbox) -> None:
    """Issue 9, item 11: a readiness error and Result.check() quote output with \\x1b, not ESC."""
    c = sandbox.start(["sh", "-c", r"printf 'boot\033[2J\033]0;title\007\n'; exit 3"])
    with pytest.raises(ReadinessError) as info:  # the container exited first
        c.wait_for_log(b"never", timeout=30)
    assert "boot\\x1b[2J\\x1b]0;title\\x07" in str(info.value)
    assert "\x1b" not in str(info.value)
    r = sandbox.run(["sh", "-c", r"printf '\033[31mred\r\n' >&2; exit 1"])
    with pytest.raises(AssertionError) as failed:
        r.check()
    assert "\\x1b[31mred\\r" in str(failed.value)
    assert "\x1b" not in str(failed.value)
    assert r.stderr == b"\x1b[31mred\r\n"  # the bytes themselves are kept as written


def test_a_flooding_container_does_not_starve_the_launcher(sandbox: Sandbox) -> None:
    """The launcher copies output in its loop, one 64 KiB read per ready pipe per turn: with two
    containers writing as fast as they can, other containers still start, run and exit, and the
    floods' output keeps coming."""
    floods = [sandbox.start(["sh", "-c", "yes; sleep 60"]), sandbox.start(["sh", "-c", "yes >&2; sleep 60"])]
    floods[0].wait_for_log(b"y\ny\n", timeout=30)
    took = []
    for _ in range(5):
        t0 = time.monotonic()
        assert sandbox.run(["sh", "-c", "echo hello"], timeout=30).stdout == b"hello\n"
        took.append(time.monotonic() - t0)
    print(f"run() while two containers flood: {[round(t * 1000, 1) for t in took]} ms")
    assert max(took) < 3.0, took  # ~10 ms on an idle machine; generous for a loaded CI host
    assert floods[1].logs("stderr", max_bytes=4).endswith(b"y\n")
    for c in floods:
        t0 = time.monotonic()
        c.remove()
        assert time.monotonic() - t0 < 5.0
