"""Reproducing an out-of-memory kill on demand, deterministically.

Swap is off by default (``memory_swap`` = ``memory``), so a program that needs more than its
limit is OOM-killed every time instead of slowly swapping; the result says so.
"""

from pytest_sandbox import Sandbox

HOG = "b = bytearray(200 << 20); print('survived')"


def test_memory_hog_is_oom_killed(sandbox: Sandbox) -> None:
    result = sandbox.run(["python3", "-c", HOG], memory="64m")
    assert result.oom_killed
    assert result.signal == 9
    assert result.exit_code == 137
    assert b"survived" not in result.stdout
    assert result.memory_peak is not None
    assert result.memory_peak <= 64 << 20


def test_same_program_fits_in_a_bigger_limit(sandbox: Sandbox) -> None:
    result = sandbox.run(["python3", "-c", HOG], memory="512m")
    assert not result.oom_killed
    assert result.exit_code == 0
    assert result.stdout == b"survived\n"
