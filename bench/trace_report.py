#!/usr/bin/env python3
"""Summarise a container start trace: the median time of each phase.

    PYTEST_SANDBOX_TRACE=/tmp/trace.log .venv/bin/python bench/startup.py --rounds 50
    .venv/bin/python bench/trace_report.py /tmp/trace.log

Each ``client: run`` line starts a container; the following events (launcher, first process,
init) up to ``client: result`` are its phases.  Events are matched by name in order, so runs that
overlap (threads, xdist) make a meaningless report: trace one sequential loop.
"""

from __future__ import annotations

import statistics
import sys
from collections import defaultdict


def main(path: str) -> None:
    runs: list[list[tuple[int, str]]] = []
    with open(path) as f:
        for line in f:
            ts, _pid, name = line.rstrip("\n").split(" ", 2)
            if name == "client: run":
                runs.append([])
            if runs:
                runs[-1].append((int(ts), name))
    steps: dict[str, list[float]] = defaultdict(list)
    order: list[str] = []
    for run in runs:
        t0 = prev = run[0][0]
        for when, event in run:
            if event not in steps:
                order.append(event)
            steps[event].append((when - prev) / 1e6)
            prev = when
        steps["total"].append((run[-1][0] - t0) / 1e6)
    if not runs:
        sys.exit(f"no 'client: run' event in {path}: was PYTEST_SANDBOX_TRACE set for the client too?")
    print(f"{len(runs)} container starts; median ms per phase (time since the previous event):")
    for name in [*order, "total"]:
        print(f"  {name:<34} {statistics.median(steps[name]):7.3f}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/psbx-trace.log")
