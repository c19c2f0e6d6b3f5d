"""The seed's cgroup demo, as a test: a busy loop limited to 10 % of one CPU.

The seed writes 10000 into cpu.cfs_quota_us by hand and watches pidstat show ~10 %.  Here
``cpus=0.1`` does the same, and the measurement comes from the container's own cgroup accounting
(not from sampling ps), over 2 s of wall time.
"""

import time

from pytest_sandbox import Sandbox


def test_busy_loop_gets_a_tenth_of_a_cpu(sandbox: Sandbox) -> None:
    spinner = sandbox.start(["sh", "-c", "while :; do :; done"], cpus=0.1)
    time.sleep(0.3)  # let it reach steady state
    before, t0 = spinner.stats().cpu_usage_s, time.monotonic()
    time.sleep(2.0)
    after, t1 = spinner.stats().cpu_usage_s, time.monotonic()
    assert before is not None
    assert after is not None
    share = (after - before) / (t1 - t0)
    print(f"busy loop with cpus=0.1 used {share:.1%} of one CPU")
    assert 0.07 <= share <= 0.13

    result = spinner.stop(timeout=1)
    assert result.cpu_throttled_s > 0  # the kernel throttled it, and we can see it
