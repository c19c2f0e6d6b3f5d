#!/usr/bin/env python3
"""Start->exit latency of ``/bin/true``: pytest_sandbox vs bubblewrap, side by side.

Usage (as root, after ``.ci/setup``)::

    .venv/bin/python bench/startup.py              # 100 rounds, then the report
    .venv/bin/python bench/startup.py --rounds 300 --ballast-gib 2

All variants run on the same rootfs -- a busybox layer from Debian's busybox-static -- and are
interleaved round by round so that drift (other load, CPU frequency) hits each the same way:

- ``full``: a pytest_sandbox container -- user, mount, PID, UTS, IPC, network and cgroup
  namespaces, the layer on overlayfs with its own upper layer, pivot_root, and a cgroup with
  memory, pids and cpu limits -- from ``sandbox.run()`` to its Result;
- ``no-cgroup``: the same with ``cgroup=False``;
- ``unconfined``: ``full`` with ``seccomp="unconfined"``: ``full`` runs under Docker's default
  seccomp profile (the default), so the difference is the filter's cost -- compiled once per
  profile in this process, installed by the container's init before posix_spawn; ``custom
  profile`` is ``full`` with a profile given as a dict (a different filter: installed in a forked
  child before execve, so that init does not run under it);
- ``full+veth``: ``full`` on a private network (``network=sandbox.network()``): its network
  namespace prepared with lo, an address on a veth whose other end is on the network's bridge in
  the session's hub namespace -- the issue's "full container + one veth on a private network";
- ``bwrap``: ``bwrap --unshare-all`` on the same directory (bind-mounted, no overlay), the reference;
- ``... + N MiB RSS``: the same rounds again after the benchmark process has grown by
  ``--ballast-gib`` GiB of touched memory (then once more small, so that drift over the run is
  not taken for an effect of size): the launcher forks containers, not this process, so the
  latency must not grow with it;
- ``full-spaced``: ``full`` with 100 ms pauses between starts, as tests really start containers
  (the kernel's cgroup migration cost is an RCU grace period when nothing migrated recently).

The ratios full/bwrap (target <= 2.5) and full+veth/bwrap (target <= 3) are the figures the
project tracks.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pytest_sandbox import Image, Sandbox

LIMITS = {"memory": "64m", "pids": 32, "cpus": 1}
CUSTOM_PROFILE = {
    "defaultAction": "SCMP_ACT_ALLOW",
    "syscalls": [{"names": ["kexec_load"], "action": "SCMP_ACT_ERRNO"}],
}


def busybox_rootfs(dest: Path) -> Path:
    busybox = shutil.which("busybox")
    if busybox is None:
        sys.exit("busybox-static is needed: apt-get install busybox-static")
    (dest / "bin").mkdir(parents=True)
    shutil.copy2(busybox, dest / "bin" / "busybox")
    for applet in ("sh", "true"):
        (dest / "bin" / applet).symlink_to("busybox")
    for d in ("proc", "dev", "sys", "tmp", "etc"):
        (dest / d).mkdir()
    return dest


def interleave(
    variants: dict[str, Callable[[], object]], rounds: int, samples: dict[str, list[float]], suffix: str
) -> None:
    """Run every variant once per round, in the same order, so drift hits them alike."""
    for name in variants:
        samples.setdefault(name + suffix, [])
    for _ in range(rounds):
        for name, fn in variants.items():
            samples[name + suffix].append(timed(fn))


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def summary(samples: list[float]) -> str:
    qs = statistics.quantiles(samples, n=10)
    median = statistics.median(samples)
    return f"median {median:6.2f} ms   p10 {qs[0]:6.2f}   p90 {qs[-1]:6.2f}   (n={len(samples)})"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--ballast-gib", type=float, default=1.0)
    parser.add_argument("--spaced", type=int, default=30, help="rounds of the 100 ms-spaced variant")
    args = parser.parse_args()
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        sys.exit("bubblewrap is needed: apt-get install bubblewrap")

    with tempfile.TemporaryDirectory(prefix="psbx-bench-") as tmp:
        rootfs = busybox_rootfs(Path(tmp) / "rootfs")
        image = Image.from_layers(rootfs, base=None)
        bwrap_cmd = [
            bwrap,
            "--unshare-all",
            "--bind",
            str(rootfs),
            "/",
            "--proc",
            "/proc",
            "--dev",
            "/dev",
            "/bin/true",
        ]
        with Sandbox() as sb:
            net = sb.network()
            variants: dict[str, Callable[[], object]] = {
                "full": lambda: sb.run(["/bin/true"], image=image, **LIMITS).check(),
                "full+veth": lambda: sb.run(["/bin/true"], image=image, network=net, **LIMITS).check(),
                "no-cgroup": lambda: sb.run(["/bin/true"], image=image, cgroup=False).check(),
                "unconfined": lambda: sb.run(
                    ["/bin/true"], image=image, seccomp="unconfined", **LIMITS
                ).check(),
                "custom profile": lambda: sb.run(
                    ["/bin/true"], image=image, seccomp=CUSTOM_PROFILE, **LIMITS
                ).check(),
                "bwrap": lambda: subprocess.run(bwrap_cmd, check=True),
            }
            for _ in range(args.warmup):
                for fn in variants.values():
                    fn()
            samples: dict[str, list[float]] = {}
            interleave(variants, args.rounds, samples, "")

            # The same rounds again with this process grown by --ballast-gib of touched memory:
            # pytest processes are big, and fork() cost grows with the forking process's size.
            ballast = bytearray(int(args.ballast_gib * (1 << 30)))
            for i in range(0, len(ballast), 4096):
                ballast[i] = 1  # touch every page: the process really is that big
            time.sleep(3)  # let the kernel finish with the fresh pages (zeroing, reclaim scans)
            suffix = f" + {_rss_mib():.0f} MiB RSS"
            sized = {k: v for k, v in variants.items() if k in ("full", "bwrap")}
            interleave(sized, args.rounds, samples, suffix)
            del ballast
            # And once more without it: drift over the run must not pass for an effect of size.
            interleave(sized, args.rounds, samples, " (again, small)")

            spaced = []
            for _ in range(args.spaced):
                time.sleep(0.1)
                spaced.append(timed(variants["full"]))
            samples["full-spaced (100 ms apart)"] = spaced

    width = max(len(n) for n in samples)
    print(f"start->exit of /bin/true on a busybox rootfs, {os.cpu_count()} CPUs, kernel {os.uname().release}")
    for name, values in samples.items():
        print(f"  {name:<{width}}  {summary(values)}")
    full, ref = statistics.median(samples["full"]), statistics.median(samples["bwrap"])
    print(
        f"  ratio full/bwrap = {full / ref:.2f} (target <= 2.5); "
        f"no-cgroup/bwrap = {statistics.median(samples['no-cgroup']) / ref:.2f}; "
        f"full+veth/bwrap = {statistics.median(samples['full+veth']) / ref:.2f} (target <= 3)"
    )
    unconfined = statistics.median(samples["unconfined"])
    print(
        f"  seccomp: default profile {full:.2f} ms vs unconfined {unconfined:.2f} ms "
        f"({full - unconfined:+.2f} ms); custom profile {statistics.median(samples['custom profile']):.2f} ms"
    )
    big = [name for name in samples if name.startswith("full + ")]
    if big:
        small = (full + statistics.median(samples["full (again, small)"])) / 2
        print(
            f"  with the ballast: full {statistics.median(samples[big[0]]):.2f} ms vs {small:.2f} ms without "
            "(the mean of the runs before and after it)"
        )


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


if __name__ == "__main__":
    main()
