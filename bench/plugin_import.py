#!/usr/bin/env python3
"""What the pytest_sandbox plugin adds to a pytest run that starts no sandbox.

Usage (after ``.ci/setup``; root is not needed)::

    .venv/bin/python bench/plugin_import.py            # 30 runs of each, then the report
    .venv/bin/python bench/plugin_import.py --runs 50

Each run is ``python -m pytest --co -q -p no:cacheprovider`` of an empty directory, once with the
plugin (as installed, through its ``pytest11`` entry point) and once without it
(``-p no:sandbox``), interleaved run by run so that drift (other load, CPU frequency) hits both
the same way.  The figure is the difference of the medians; the target is under 15 ms.  Wall
time is the figure; the CPU time (user + system) of each run is shown too, because on a busy
machine it moves much less than wall time does.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

TARGET_MS = 15.0


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def one_run(cwd: str, *extra: str) -> tuple[float, float]:
    """Wall and CPU time in ms of one ``pytest --co -q`` of ``cwd`` (exit 5: no tests collected)."""
    argv = [sys.executable, "-m", "pytest", "--co", "-q", "-p", "no:cacheprovider", *extra]
    # Bytecode is cached (the first, uncounted run writes it), as for an installed package: with
    # PYTHONDONTWRITEBYTECODE every run would compile the package's modules again.
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("PYTEST_") and k != "PYTHONDONTWRITEBYTECODE"
    }
    cpu = _children_cpu()
    start = time.perf_counter()
    r = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, check=False)
    elapsed = (time.perf_counter() - start) * 1000
    if r.returncode != 5:
        sys.exit(f"{argv} in {cwd}: exit {r.returncode}\n{r.stdout.decode()}{r.stderr.decode()}")
    return elapsed, (_children_cpu() - cpu) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    with_plugin: list[tuple[float, float]] = []
    without: list[tuple[float, float]] = []
    with tempfile.TemporaryDirectory(prefix="psbx-bench-") as empty:
        one_run(empty)  # warm the page cache and the .pyc files once, not counted
        one_run(empty, "-p", "no:sandbox")
        for _ in range(args.runs):
            with_plugin.append(one_run(empty))
            without.append(one_run(empty, "-p", "no:sandbox"))
    a, b = (statistics.median(w for w, _ in runs) for runs in (with_plugin, without))
    ca, cb = (statistics.median(c for _, c in runs) for runs in (with_plugin, without))
    print(f"pytest --co -q of an empty directory, {args.runs} runs each, interleaved (median):")
    print("                          wall      cpu")
    print(f"  with the plugin     {a:7.1f} ms {ca:7.1f} ms")
    print(f"  -p no:sandbox       {b:7.1f} ms {cb:7.1f} ms")
    verdict = "ok" if a - b < TARGET_MS else "over the target"
    print(
        f"  added by the plugin {a - b:7.1f} ms {ca - cb:7.1f} ms  (target < {TARGET_MS:.0f} ms: {verdict})"
    )


if __name__ == "__main__":
    main()
